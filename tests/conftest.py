"""Tiny random Llama models built on the spot; no downloads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA3_TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=64,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16},
    tie_word_embeddings=False,
)
LLAMA32_TIED_TINY = dict(LLAMA3_TINY, tie_word_embeddings=True, num_key_value_heads=1, num_attention_heads=8)
LLAMA2_TINY = dict(LLAMA3_TINY, rope_theta=10000.0, rope_scaling=None, num_key_value_heads=4)


def make_hf_model(config: dict, seed: int = 0):
    """A transformers LlamaForCausalLM with random weights, norms included (so layout bugs show)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under HF checkpoint keys (tied lm_head dropped, as on disk)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@pytest.fixture
def tiny_llama3():
    return make_hf_model(LLAMA3_TINY)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real demo model (SmolLM2-135M-Instruct GGUF), fetched at set-up by ``make assets``.

    Missing is a failure, not a skip: the test command of README.md fetches it first."""
    from nxd_lora.assets import asset_path

    return asset_path()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    """The GGUF converted to an HF directory by ``nxd-lora convert`` (no --tp)."""
    from checkpoint_tools.convert import convert_source_to_hf

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert_source_to_hf(smollm2_gguf, out, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def smollm2_tp3(smollm2_hf, tmp_path_factory):
    """smollm2_hf converted to TP=3 (separate q/k/v), the demo's checkpoint. Read-only: a test that
    writes into it works on a copy."""
    from checkpoint_tools.convert import convert_to_nxd

    out = tmp_path_factory.mktemp("smollm2") / "tp3"
    convert_to_nxd(smollm2_hf, out, 3, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def smollm2_tp3_fused(smollm2_hf, tmp_path_factory):
    """smollm2_hf converted to TP=3 with a fused qkv_proj (the CPU bench's checkpoint). Read-only."""
    from checkpoint_tools.convert import convert_to_nxd

    out = tmp_path_factory.mktemp("smollm2") / "tp3-fused"
    convert_to_nxd(smollm2_hf, out, 3, fuse_qkv=True, log=lambda _: None)
    return out


@pytest.fixture
def cpu_backend():
    """The cpu backend set up for one process (TP=1), torn down after the test."""
    from nxd_lora.backends import get_backend

    backend = get_backend("cpu")
    backend.setup(1)
    yield backend
    backend.teardown()
