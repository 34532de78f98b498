"""LoRA configuration, wrapping, freezing, dropout and loading errors (single process, TP=1)."""

from __future__ import annotations

import pytest
import torch

from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.tp_layout import shard_hf_state_dict
from conftest import LLAMA3_TINY, hf_state_dict, make_hf_model
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.model import apply_lora, load_base_state_dict, lora_state_dict
from nxd_lora.model.llama import LlamaForCausalLM


def _model(lora: LoraConfig | None = None) -> LlamaForCausalLM:
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    model = LlamaForCausalLM(cfg, tp_size=1)
    load_base_state_dict(model, shard_hf_state_dict(hf_state_dict(make_hf_model(LLAMA3_TINY)), cfg, 1)[0])
    return apply_lora(model, lora) if lora else model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora_rank=0), "lora_rank must be > 0"),
        (dict(target_modules=["q_proj"]), r"target_modules \['q_proj'\] not supported"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(bias="all"), "bias='all'"),
        (dict(merge_lora=True), "merge_lora=True needs save_lora_base=True"),
    ],
)
def test_bad_lora_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_scaling_and_rslora():
    assert LoraConfig(lora_rank=16, lora_alpha=32).scaling == 2.0
    assert LoraConfig(lora_rank=16, lora_alpha=32, use_rslora=True).scaling == 8.0


@pytest.mark.smoke
def test_only_lora_is_trainable_and_keys_follow_nxd():
    model = _model(LoraConfig(lora_rank=4))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"model.layers.{i}.self_attn.qkv_proj.{name}" for i in range(2)
        for name in ("lora_A.weight", "lora_B.weight_q", "lora_B.weight_k", "lora_B.weight_v")
    )
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.qkv_proj.base_layer.weight_q" in keys
    assert all(v.dtype == torch.float32 for v in lora_state_dict(model).values())


def test_fresh_adapter_is_identity_and_same_seed_same_init():
    base = _model()
    tuned = _model(LoraConfig(lora_rank=4))
    ids = torch.randint(0, 64, (1, 12))
    torch.testing.assert_close(tuned(ids)[0], base(ids)[0], atol=0, rtol=0)  # lora_B starts at zero
    again = _model(LoraConfig(lora_rank=4))
    for key, value in lora_state_dict(tuned).items():
        assert torch.equal(value, lora_state_dict(again)[key])


def test_dropout_only_in_training_mode():
    model = _model(LoraConfig(lora_rank=4, lora_dropout=0.5, target_modules=["qkv_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 64, (1, 12))
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


def test_loading_wrong_base_weights_names_key_and_shape():
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    state = shard_hf_state_dict(hf_state_dict(make_hf_model(LLAMA3_TINY)), cfg, 2)[0]  # a TP=2 shard
    model = LlamaForCausalLM(cfg, tp_size=1)
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \(32, 32\), expected \(64, 32\) for tp=1"):
        load_base_state_dict(model, state, source="rank0.pt")
    full = shard_hf_state_dict(hf_state_dict(make_hf_model(LLAMA3_TINY)), cfg, 1)[0]
    del full["model.norm.weight"]
    with pytest.raises(KeyError, match="rank0.pt: missing key 'model.norm.weight'"):
        load_base_state_dict(model, full, source="rank0.pt")
    with pytest.raises(ValueError, match="tp_size=2, but the process groups were initialised with tp=1"):
        LlamaForCausalLM(cfg, tp_size=2)


def test_unknown_target_in_model_is_an_error():
    model = _model()
    config = LoraConfig(target_modules=["qkv_proj"])
    config.target_modules = ["gate_up_proj", "nope"]
    with pytest.raises(ValueError, match=r"\['nope'\] not found"):
        apply_lora(model, config)
