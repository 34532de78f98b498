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
