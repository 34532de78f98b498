"""NxD per-rank layout: round trips, the GQA head placement rule, and bad input."""

from __future__ import annotations

import pytest
import torch

from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.tp_layout import (
    query_group_order,
    shard_hf_state_dict,
    shard_lora_state_dict,
    unshard_lora_state_dict,
    unshard_to_hf,
)
from conftest import LLAMA3_TINY, LLAMA32_TIED_TINY, hf_state_dict, make_hf_model
from test_tp_equivalence import random_hf_lora


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("fuse_qkv", [False, True])
@pytest.mark.smoke
def test_hf_to_tp_to_hf_is_bit_exact(tp, fuse_qkv):
    config = LLAMA32_TIED_TINY  # 8 query heads, 1 KV head: tp=8 replicates K/V 8 times
    hf = hf_state_dict(make_hf_model(config))
    cfg = LlamaConfig.from_dict(config)
    ranks = shard_hf_state_dict(hf, cfg, tp, fuse_qkv)
    back = unshard_to_hf(ranks, cfg)
    assert back.keys() == hf.keys()
    for key in hf:
        assert torch.equal(back[key], hf[key]), key


def test_rank_keys_and_shapes_follow_nxd():
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    hf = hf_state_dict(make_hf_model(LLAMA3_TINY))
    rank = shard_hf_state_dict(hf, cfg, 4)[3]
    p = "model.layers.0."
    assert rank[p + "self_attn.qkv_proj.weight_q"].shape == (8, 32)   # 1 of 4 query heads x head_dim 8
    assert rank[p + "self_attn.qkv_proj.weight_k"].shape == (8, 32)   # 2 KV heads x kvm 2 / 4 ranks
    assert rank[p + "mlp.gate_up_proj.weight"].shape == (24, 32)      # [gate_r; up_r], 12 rows each
    assert rank[p + "self_attn.o_proj.weight"].shape == (32, 8)
    assert rank[p + "mlp.down_proj.weight"].shape == (32, 12)
    assert rank["model.embed_tokens.weight"].shape == (16, 32)
    assert torch.equal(rank[p + "mlp.gate_up_proj.weight"][:12], hf[p + "mlp.gate_proj.weight"][36:48])
    assert torch.equal(rank[p + "mlp.gate_up_proj.weight"][12:], hf[p + "mlp.up_proj.weight"][36:48])


def test_replicated_kv_head_placement_matches_query_groups():
    # tp=4 over 2 KV heads (kvm=2): rank r holds KV head r % 2 and a query group of that head.
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    hf = hf_state_dict(make_hf_model(LLAMA3_TINY))
    ranks = shard_hf_state_dict(hf, cfg, 4)
    k = hf["model.layers.0.self_attn.k_proj.weight"].view(2, 8, 32)
    q = hf["model.layers.0.self_attn.q_proj.weight"].view(4, 8, 32)
    assert query_group_order(4, 2) == [0, 2, 1, 3]
    for r, rank in enumerate(ranks):
        assert torch.equal(rank["model.layers.0.self_attn.qkv_proj.weight_k"], k[r % 2])
        q_head = query_group_order(4, 2)[r]
        assert q_head // 2 == r % 2  # HF GQA: query head h attends KV head h // (n_heads / n_kv)
        assert torch.equal(rank["model.layers.0.self_attn.qkv_proj.weight_q"], q[q_head])


def test_unequal_kv_replicas_are_reported():
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    ranks = shard_hf_state_dict(hf_state_dict(make_hf_model(LLAMA3_TINY)), cfg, 4)
    ranks[3]["model.layers.1.self_attn.qkv_proj.weight_v"] += 1e-3
    with pytest.raises(ValueError, match=r"weight_v: KV replica on tp rank 3 differs from rank 1"):
        unshard_to_hf(ranks, cfg)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_lora_shard_round_trip(tp):
    model = make_hf_model(LLAMA3_TINY)
    hf_lora = random_hf_lora(model, rank=3)
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    for fuse in (False, True):
        back = unshard_lora_state_dict(shard_lora_state_dict(hf_lora, cfg, tp, fuse), cfg)
        assert back.keys() == hf_lora.keys()
        for key in hf_lora:
            assert torch.equal(back[key], hf_lora[key]), key


def test_lora_groups_must_share_a():
    model = make_hf_model(LLAMA3_TINY)
    hf_lora = random_hf_lora(model, rank=3)
    hf_lora["model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="k_proj.lora_A.weight differs .* one shared lora_A"):
        shard_lora_state_dict(hf_lora, LlamaConfig.from_dict(LLAMA3_TINY), 2)


def test_bad_state_dicts_name_the_key():
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    hf = hf_state_dict(make_hf_model(LLAMA3_TINY))
    missing = dict(hf)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="missing keys.*layers.1.mlp.up_proj"):
        shard_hf_state_dict(missing, cfg, 2)
    extra = dict(hf, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected keys.*layers.9"):
        shard_hf_state_dict(extra, cfg, 2)
    wrong = dict(hf, **{"model.norm.weight": torch.zeros(31)})
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(31,\), expected \(32,\)"):
        shard_hf_state_dict(wrong, cfg, 2)
