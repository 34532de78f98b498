"""LlamaConfig parsing (transformers 4 and 5 field styles) and the TP divisibility rules."""

from __future__ import annotations

import json

import pytest

from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel, kv_size_multiplier_for
from conftest import LLAMA3_TINY
from nxd_lora.model.llama import LlamaForCausalLM


def test_classic_and_transformers5_rope_fields_parse_the_same():
    import transformers

    classic = LlamaConfig.from_dict(LLAMA3_TINY)
    v5 = LlamaConfig.from_dict(transformers.LlamaConfig(**LLAMA3_TINY).to_dict())
    assert classic == v5
    assert classic.rope_scaling["rope_type"] == "llama3" and classic.rope_theta == 500000.0


def test_llama2_defaults_kv_heads_and_head_dim():
    cfg = LlamaConfig.from_dict(
        dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4)
    )
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 4 and cfg.rope_scaling is None


def test_hf_dict_round_trip(tmp_path):
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert LlamaConfig.from_json(tmp_path) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="mistral"), "model_type is 'mistral'"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_dict(dict(LLAMA3_TINY, **change), source="x/config.json")


def test_missing_and_broken_config_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        LlamaConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(ValueError, match="missing keys.*hidden_size"):
        LlamaConfig.from_json(tmp_path)


@pytest.mark.parametrize("tp, n_kv, kvm", [(32, 8, 4), (8, 8, 1), (4, 8, 1), (8, 2, 4), (1, 8, 1)])
def test_kv_size_multiplier(tp, n_kv, kvm):
    assert kv_size_multiplier_for(tp, n_kv) == kvm


@pytest.mark.smoke
def test_llama3_8b_shards_over_32_ranks():
    cfg = LlamaConfig.from_dict(dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
    assert check_tensor_parallel(cfg, 32) == 4


@pytest.mark.parametrize(
    "tp, message",
    [
        (3, "num_attention_heads=4 is not divisible by tp=3"),
        (8, "num_attention_heads=4 is not divisible by tp=8"),
        (0, "tp=0 must be >= 1"),
    ],
)
def test_bad_tp_sizes_name_the_numbers(tp, message):
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(cfg, tp)
    with pytest.raises(ValueError, match=message):
        LlamaForCausalLM(cfg, tp_size=tp)


def test_kv_heads_that_do_not_tile_the_ranks_are_rejected():
    cfg = LlamaConfig.from_dict(dict(LLAMA3_TINY, num_attention_heads=12, num_key_value_heads=3, hidden_size=48,
                                     vocab_size=48))
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 x kv_size_multiplier=1 = 3 is not divisible by tp=4"):
        check_tensor_parallel(cfg, 4)


def test_vocab_must_divide_tp():
    cfg = LlamaConfig.from_dict(dict(LLAMA3_TINY, vocab_size=66))
    with pytest.raises(ValueError, match="vocab_size=66 is not divisible by tp=4"):
        check_tensor_parallel(cfg, 4)
