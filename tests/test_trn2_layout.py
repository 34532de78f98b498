"""NxD's trn2 checkpoint layout beside trn1's: conversion, re-targeting, TP equivalence, refusals.

The reference below is NxD 0.17's ``checkpoint_converter.py --hw_backend trn2`` as DESIGN.md
records it (``modules/qkv_linear.py`` on TRN2): K/V heads ``repeat_interleave``d kvm times so rank
r holds KV head ``r // kvm``; Q heads and o_proj columns in natural order. It is written here
from those facts, independently of ``checkpoint_tools.tp_layout``.
"""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_tools.convert import convert_to_hf, convert_to_nxd
from checkpoint_tools.export import export_merged
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_format import BASE_TAG, rank_path, read_manifest
from checkpoint_tools.sources import CheckpointError
from checkpoint_tools.tp_layout import kv_shared_ranks, shard_lora_state_dict, unshard_lora_state_dict
from conftest import LLAMA3_TINY, LLAMA32_TIED_TINY, hf_state_dict, make_hf_model
from nxd_lora.cli import main
from nxd_lora.local_launch import spawn_ranks
from test_tp_equivalence import ATOL, NXD_TARGETS, peft_reference, random_hf_lora
from tp_workers import forward_backward

QUIET = dict(log=lambda message: None)
EIGHT_HEADS_TWO_KV = dict(LLAMA3_TINY, num_attention_heads=8)  # head_dim 4: TP 2/4/8 gives kvm 1/2/4


def nxd_trn2_reference(hf: dict[str, torch.Tensor], config: dict, tp: int, fuse_qkv: bool) -> list[dict]:
    n_heads, n_kv, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    hd, kvm = hidden // n_heads, max(1, tp // n_kv)

    def kv(weight):
        return weight.view(n_kv, hd, hidden).repeat_interleave(kvm, dim=0).reshape(-1, hidden).chunk(tp)

    ranks = [{} for _ in range(tp)]
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"
    for r, out in enumerate(ranks):
        out["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"].chunk(tp)[r]
        out["lm_head.weight"] = hf[head].chunk(tp)[r]
        out["model.norm.weight"] = hf["model.norm.weight"]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            q = hf[p + "self_attn.q_proj.weight"].chunk(tp)[r]
            k, v = kv(hf[p + "self_attn.k_proj.weight"])[r], kv(hf[p + "self_attn.v_proj.weight"])[r]
            if fuse_qkv:
                out[p + "self_attn.qkv_proj.weight_qkv"] = torch.cat([q, k, v])
            else:
                out.update({p + "self_attn.qkv_proj.weight_q": q, p + "self_attn.qkv_proj.weight_k": k,
                            p + "self_attn.qkv_proj.weight_v": v})
            out[p + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r]
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"].chunk(tp)[r],
                                                            hf[p + "mlp.up_proj.weight"].chunk(tp)[r]])
            out[p + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[r]
            for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                out[p + norm] = hf[p + norm]
    return ranks


def rank_files(ckpt, tp: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(rank_path(ckpt / BASE_TAG, r), weights_only=True) for r in range(tp)]


def assert_same_ranks(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for r, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), r
        for key in b:
            assert torch.equal(a[key], b[key]), (r, key)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trn2")
    out = {}
    for name, config in (("8h2kv", EIGHT_HEADS_TWO_KV), ("tied1kv", LLAMA32_TIED_TINY)):
        model = make_hf_model(config)
        model.save_pretrained(root / name)
        out[name] = (root / name, config, hf_state_dict(model))
    return out


@pytest.mark.parametrize("fuse_qkv", [False, True])
@pytest.mark.parametrize("name, tp, kvm", [("8h2kv", 2, 1), ("8h2kv", 4, 2), ("8h2kv", 8, 4), ("tied1kv", 8, 8)])
def test_trn2_conversion_is_nxds_trn2_layout(hf_dirs, tmp_path, name, tp, kvm, fuse_qkv):
    src, config, hf = hf_dirs[name]
    manifest = convert_to_nxd(src, tmp_path / "trn2", tp, fuse_qkv=fuse_qkv, target="trn2", **QUIET)
    assert (manifest["kv_size_multiplier"], manifest["kv_layout"]) == (kvm, "trn2")
    assert_same_ranks(rank_files(tmp_path / "trn2", tp), nxd_trn2_reference(hf, config, tp, fuse_qkv))
    convert_to_nxd(src, tmp_path / "trn1", tp, fuse_qkv=fuse_qkv, target="trn1", **QUIET)
    trn1 = rank_files(tmp_path / "trn1", tp)
    key = "model.layers.0.self_attn.qkv_proj.weight_" + ("qkv" if fuse_qkv else "k")
    # The layouts are the same bytes without KV replication or with one KV head, and differ otherwise.
    same = all(torch.equal(a[key], b[key]) for a, b in zip(trn1, rank_files(tmp_path / "trn2", tp)))
    assert same == (kvm == 1 or config["num_key_value_heads"] == 1)
    convert_to_hf(tmp_path / "trn2", tmp_path / "back", **QUIET)
    back = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors.torch import load_file

    state = {k: v for f in set(back.values()) for k, v in load_file(tmp_path / "back" / f).items()}
    assert state.keys() == hf.keys() and all(torch.equal(state[k], hf[k]) for k in hf)


def test_kv_shared_groups_follow_the_layout():
    assert kv_shared_ranks(8, 2, "trn1") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert kv_shared_ranks(8, 2, "trn2") == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("tp", [4, 8])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.smoke
def test_lora_shards_round_trip_in_trn2(hf_dirs, tp, fuse):
    _, config, _ = hf_dirs["8h2kv"]
    hf_lora = random_hf_lora(make_hf_model(config), rank=3)
    cfg = LlamaConfig.from_dict(config)
    ranks = shard_lora_state_dict(hf_lora, cfg, tp, fuse, "trn2")
    back = unshard_lora_state_dict(ranks, cfg, "trn2")
    assert back.keys() == hf_lora.keys() and all(torch.equal(back[k], hf_lora[k]) for k in hf_lora)
    with pytest.raises(ValueError, match="KV replica on tp rank"):  # read as trn1, the replicas do not line up
        unshard_lora_state_dict(ranks, cfg, "trn1")


@pytest.mark.slow
def test_retarget_equals_a_direct_conversion_and_back(hf_dirs, tmp_path, capsys):
    src = hf_dirs["8h2kv"][0]
    convert_to_nxd(src, tmp_path / "trn1", 8, fuse_qkv=True, target="trn1", **QUIET)
    convert_to_nxd(src, tmp_path / "trn2", 8, fuse_qkv=True, target="trn2", **QUIET)
    assert main(["convert", str(tmp_path / "trn1"), str(tmp_path / "re2"), "--retarget", "trn2"]) == 0
    assert_same_ranks(rank_files(tmp_path / "re2", 8), rank_files(tmp_path / "trn2", 8))
    manifest = read_manifest(tmp_path / "re2" / BASE_TAG)
    assert (manifest["kv_layout"], manifest["fuse_qkv"], manifest["source"]["format"]) == ("trn2", True, "nxd")
    assert (tmp_path / "re2" / "generation_config.json").is_file()
    assert main(["convert", str(tmp_path / "re2"), str(tmp_path / "re1"), "--retarget", "trn1"]) == 0
    assert_same_ranks(rank_files(tmp_path / "re1", 8), rank_files(tmp_path / "trn1", 8))
    # An NxD source also re-shards: TP=8 trn2 -> TP=4 trn2 equals converting the HF model to TP=4.
    assert main(["convert", str(tmp_path / "re2"), str(tmp_path / "tp4"), "--tp", "4", "--target", "trn2",
                 "--fuse-qkv"]) == 0
    convert_to_nxd(src, tmp_path / "direct4", 4, fuse_qkv=True, target="trn2", **QUIET)
    assert_same_ranks(rank_files(tmp_path / "tp4", 4), rank_files(tmp_path / "direct4", 4))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "re2")]) == 0
    assert "kv_size_multiplier=4 kv_layout=trn2" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "x"), "--retarget", "trn2"]) == 2
    assert "--retarget re-lays out an NxD checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def equivalence(hf_dirs):
    """Forward + backward at TP=1 and at TP 4 / 8 (kvm 2 / 4) in both layouts, and peft's reference."""
    _, config, hf_state = hf_dirs["8h2kv"]
    hf_model = make_hf_model(config)
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, config["vocab_size"], (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :5] = -100
    lora = dict(lora_rank=4, lora_alpha=8)
    hf_lora = random_hf_lora(hf_model, 4)
    ref_logits, ref_loss, _ = peft_reference(hf_model, hf_lora, lora, input_ids, labels)
    results = {}
    for tp, layout in ((1, "trn1"), (4, "trn1"), (4, "trn2"), (8, "trn1"), (8, "trn2")):
        results[tp, layout] = spawn_ranks(forward_backward, tp, config, tp, hf_state, input_ids, labels, True,
                                          dict(lora, target_modules=NXD_TARGETS), hf_lora, layout)
    return dict(config=LlamaConfig.from_dict(config), ref_logits=ref_logits, ref_loss=ref_loss, results=results)


@pytest.mark.parametrize("tp, layout", [(4, "trn1"), (4, "trn2"), (8, "trn1"), (8, "trn2")])
@pytest.mark.slow
def test_both_layouts_compute_peft_and_the_tp1_gradients(equivalence, tp, layout):
    for rank in equivalence["results"][tp, layout]:
        torch.testing.assert_close(rank["logits"], equivalence["ref_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(rank["loss"], equivalence["ref_loss"], atol=ATOL, rtol=0)
    cfg = equivalence["config"]
    ref = unshard_lora_state_dict([r["grads"] for r in equivalence["results"][1, "trn1"]], cfg)
    got = unshard_lora_state_dict([r["grads"] for r in equivalence["results"][tp, layout]], cfg, layout)
    assert ref.keys() == got.keys()
    for key in ref:  # K/V LoRA-B replicas summed over the right ranks: equal, and equal to TP=1
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=1e-4, msg=key)


def test_a_mismatched_layout_is_refused_everywhere(hf_dirs, tmp_path, monkeypatch, capsys):
    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import check_before_start

    src = hf_dirs["8h2kv"][0]
    convert_to_nxd(src, tmp_path / "trn1", 4, target="trn1", **QUIET)
    # train: the recipe says trn2, the checkpoint is trn1 (kvm 2)
    recipe = load_recipe(None, [f"model.checkpoint={tmp_path / 'trn1'}", "train.tp=4", "model.kv_layout=trn2"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"KV layout trn1, but trn2 is needed.*--retarget trn2"):
        check_before_start(recipe)
    # the neuron backend on a trn2 host: refused before it joins a process group (its first check)
    import nxd_lora.backends.neuron as neuron

    on_trn2 = __import__("types").SimpleNamespace(platform=lambda: "trn2")  # no cpu_mode: fails past the check
    with pytest.raises(ValueError, match=r"on this trn2 host\): KV layout trn1, but trn2 is needed"):
        neuron.NeuronBackend.setup(on_trn2, 4, 2, "trn1")
    with pytest.raises(AttributeError):  # kvm 1: same bytes in both layouts, so past the check (then fails)
        neuron.NeuronBackend.setup(on_trn2, 4, 1, "trn1")
    on_trn3 = __import__("types").SimpleNamespace(platform=lambda: "trn3")  # trn3 trains the trn2 layout
    with pytest.raises(ValueError, match=r"on this trn3 host\): KV layout trn1, but trn2 is needed"):
        neuron.NeuronBackend.setup(on_trn3, 4, 2, "trn1")
    # plan: a trn1 recipe on trn2, a trn2 recipe on trn1
    configs = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
    capsys.readouterr()
    assert main(["plan", str(configs / "llama3-8b-trn1-tp32.yaml"), "--device", "trn2"]) == 2
    assert "KV layout trn1, but trn2 is needed" in capsys.readouterr().err
    assert main(["plan", str(configs / "llama3-8b-trn2-tp32.yaml"), "--device", "trn1"]) == 2
    assert main(["plan", str(configs / "llama3-8b-trn2-tp32.yaml"), "--device", "trn2"]) == 0
    assert "checkpoint layout: trn2" in capsys.readouterr().out


@pytest.mark.slow
def test_export_refuses_a_base_of_the_other_layout(hf_dirs, tmp_path):
    from tp_workers import train_and_save

    src = hf_dirs["8h2kv"][0]
    for layout in ("trn1", "trn2"):
        convert_to_nxd(src, tmp_path / layout, 4, target=layout, **QUIET)
    input_ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    spawn_ranks(train_and_save, 4, str(tmp_path / "trn2"), str(tmp_path / "runs"), 4,
                dict(lora_rank=4, lora_alpha=8, target_modules=NXD_TARGETS), input_ids, 1)
    assert read_manifest(tmp_path / "runs" / "adapter" / "step_3")["kv_layout"] == "trn2"
    with pytest.raises(CheckpointError, match=r"base kv_layout='trn1' but the adapter was trained with kv_layout='trn2'"):
        export_merged(tmp_path / "runs" / "adapter", tmp_path / "m", base=tmp_path / "trn1", **QUIET)
    export_merged(tmp_path / "runs" / "adapter", tmp_path / "m", base=tmp_path / "trn2", **QUIET)
