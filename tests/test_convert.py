"""Checkpoint conversion: HF/Meta -> NxD shards -> HF, loading shards into the model, bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_tools.convert import convert_to_hf, convert_to_nxd
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_format import BASE_TAG, MANIFEST, check_manifest, rank_path, verify_files
from checkpoint_tools.sources import CheckpointError, hf_to_meta_rope_rows, meta_to_hf_rope_rows, open_source
from conftest import LLAMA2_TINY, LLAMA3_TINY, LLAMA32_TIED_TINY, hf_state_dict, make_hf_model
from nxd_lora.cli import main
from nxd_lora.local_launch import spawn_ranks

QUIET = dict(log=lambda message: None)


def load_hf_dir(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for name in set(index["weight_map"].values()):
        out.update(load_file(path / name))
    return out


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    model = make_hf_model(LLAMA3_TINY)
    root = tmp_path_factory.mktemp("llama3")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    torch.save(model.state_dict(), root / "single" / "pytorch_model.bin")  # also HF's .bin layout
    (root / "bin").mkdir()
    shutil.copy(root / "single" / "pytorch_model.bin", root / "bin")
    shutil.copy(root / "single" / "config.json", root / "bin")
    return model, root


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_hf_to_nxd_to_hf_is_bit_exact(llama3, tmp_path, layout, tp):
    model, root = llama3
    convert_to_nxd(root / layout, tmp_path / "nxd", tp, **QUIET)
    convert_to_hf(tmp_path / "nxd", tmp_path / "back", max_shard_bytes=40_000, **QUIET)
    assert_same_state(load_hf_dir(tmp_path / "back"), hf_state_dict(model))
    assert LlamaConfig.from_json(tmp_path / "back") == LlamaConfig.from_dict(LLAMA3_TINY)
    assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize("layout", ["trn1", "trn2"])
@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_tp8_with_kv_replication_and_tied_embeddings(tmp_path, fuse_qkv, layout):
    model = make_hf_model(LLAMA32_TIED_TINY)
    model.save_pretrained(tmp_path / "hf")
    manifest = convert_to_nxd(tmp_path / "hf", tmp_path / "nxd", 8, fuse_qkv=fuse_qkv, target=layout, **QUIET)
    assert manifest["kv_size_multiplier"] == 8 and manifest["kv_layout"] == layout
    rank = torch.load(rank_path(tmp_path / "nxd" / BASE_TAG, 5), weights_only=True)
    # NxD's Llama always has an lm_head: tied models get a copy of the embedding shard.
    assert torch.equal(rank["lm_head.weight"], rank["model.embed_tokens.weight"])
    convert_to_hf(tmp_path / "nxd", tmp_path / "back", **QUIET)
    assert_same_state(load_hf_dir(tmp_path / "back"), hf_state_dict(model))


def test_nxd_layout_files_and_markers(llama3, tmp_path):
    _, root = llama3
    threads = torch.get_num_threads()
    convert_to_nxd(root / "sharded", tmp_path / "ckpt", 2, dtype="bf16", **QUIET)
    assert torch.get_num_threads() == threads  # conversion runs on one torch thread, then restores
    tag = tmp_path / "ckpt" / BASE_TAG
    assert sorted(p.name for p in (tag / "model").iterdir()) == [
        "dp_rank_00_tp_rank_00_pp_rank_00.pt", "dp_rank_00_tp_rank_01_pp_rank_00.pt"]
    assert (tag / "done").read_text() == "1" and (tag / "checkpoint").read_text() == "1"
    state = torch.load(tag / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    manifest = json.loads((tag / MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["source"]["format"] == "hf-safetensors"
    assert verify_files(tag) == []


def make_meta_checkpoint(model, config: dict, directory, n_files: int, embed_dim: int, **params):
    """Write ``model`` as Meta's consolidated.NN.pth (MP=n_files) + params.json."""
    hf = hf_state_dict(model)
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj":
             "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    split_dims = {"tok_embeddings": embed_dim, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
                  "wo": 1, "w2": 1}
    pieces = [dict() for _ in range(n_files)]
    for key, tensor in hf.items():
        if key in names:
            meta = names[key]
        else:
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            meta = f"layers.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        if meta.endswith("wq.weight"):
            tensor = hf_to_meta_rope_rows(tensor, config["num_attention_heads"])
        if meta.endswith("wk.weight"):
            tensor = hf_to_meta_rope_rows(tensor, config["num_key_value_heads"])
        dim = split_dims.get(meta.split(".")[-2])
        for piece, part in zip(pieces, tensor.chunk(n_files, dim) if dim is not None else [tensor] * n_files):
            piece[meta] = part.clone()
    directory.mkdir(parents=True)
    for i, piece in enumerate(pieces):
        piece["rope.freqs"] = torch.zeros(4)
        torch.save(piece, directory / f"consolidated.{i:02d}.pth")
    (directory / "params.json").write_text(json.dumps(dict(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        n_kv_heads=config["num_key_value_heads"], vocab_size=-1, norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"], multiple_of=16, ffn_dim_multiplier=0.5, **params)))


@pytest.mark.parametrize("name, config, n_files, embed_dim", [
    ("llama2-mp2", LLAMA2_TINY, 2, 1),    # Llama 2: ParallelEmbedding split on the embedding dim
    ("llama3-mp2", dict(LLAMA3_TINY, rope_scaling=None), 2, 0),  # Llama 3: split on the vocabulary
    ("llama3-mp1", dict(LLAMA3_TINY, rope_scaling=None), 1, 0),
])
def test_meta_to_nxd_to_hf_matches_the_hf_model(tmp_path, name, config, n_files, embed_dim):
    model = make_hf_model(config)
    make_meta_checkpoint(model, config, tmp_path / "meta" / "original", n_files, embed_dim)
    source = open_source(tmp_path / "meta")
    assert source.format == "meta"
    assert source.config == LlamaConfig.from_dict(dict(config, max_position_embeddings=source.config.max_position_embeddings))
    convert_to_nxd(tmp_path / "meta", tmp_path / "nxd", 2, **QUIET)
    convert_to_hf(tmp_path / "nxd", tmp_path / "hf", **QUIET)
    assert_same_state(load_hf_dir(tmp_path / "hf"), hf_state_dict(model))


def test_meta_scaled_rope_params_become_llama3_rope_scaling(tmp_path):
    config = dict(LLAMA3_TINY, rope_scaling=None)
    make_meta_checkpoint(make_hf_model(config), config, tmp_path / "m", 1, 0, use_scaled_rope=True)
    scaling = open_source(tmp_path / "m").config.rope_scaling
    assert scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}


def test_meta_rope_permutation_gives_the_same_attention_scores():
    """Meta rotates interleaved (re, im) pairs; HF rotates halves. After permuting the q/k rows the
    attention scores must agree: an independent check of the permutation."""
    torch.manual_seed(0)
    heads, hd, dim, seq = 2, 8, 16, 5
    wq, wk = torch.randn(heads * hd, dim), torch.randn(heads * hd, dim)
    x = torch.randn(seq, dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.arange(seq)[:, None].float() * inv_freq  # [seq, hd/2]

    def meta_rope(t):  # Meta's apply_rotary_emb: complex multiply of consecutive pairs
        c = torch.view_as_complex(t.reshape(seq, heads, hd // 2, 2))
        return torch.view_as_real(c * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(seq, heads, hd)

    def hf_rope(t):  # HF's rotate_half
        t = t.reshape(seq, heads, hd)
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    meta_scores = torch.einsum("qhd,khd->hqk", meta_rope(x @ wq.T), meta_rope(x @ wk.T))
    hf_q, hf_k = meta_to_hf_rope_rows(wq, heads), meta_to_hf_rope_rows(wk, heads)
    hf_scores = torch.einsum("qhd,khd->hqk", hf_rope(x @ hf_q.T), hf_rope(x @ hf_k.T))
    torch.testing.assert_close(hf_scores, meta_scores, atol=1e-4, rtol=1e-5)
    assert torch.equal(hf_to_meta_rope_rows(hf_q, heads), wq)


def _logits_from_rank_files(ckpt: str, tp: int, input_ids: torch.Tensor) -> dict:
    from checkpoint_tools.nxd_format import check_manifest as check, manifest_config
    from nxd_lora.backends import get_backend
    from nxd_lora.model.builder import build_model

    manifest = check(f"{ckpt}/{BASE_TAG}", tp=tp)
    backend = get_backend("cpu")
    backend.setup(tp, manifest["kv_size_multiplier"], manifest["kv_layout"])
    try:
        state = backend.load_rank_tensors(rank_path(f"{ckpt}/{BASE_TAG}", backend.tp_rank))
        model = build_model(manifest_config(manifest, ckpt), backend, state, fuse_qkv=manifest["fuse_qkv"])
        with torch.no_grad():
            return {"logits": model(input_ids, gather_logits=True)[0]}
    finally:
        backend.teardown()


@pytest.mark.parametrize("tp, fuse_qkv, layout", [(2, True, "trn1"), (4, False, "trn1"), (4, True, "trn2")])
@pytest.mark.slow
def test_converted_shards_load_into_our_model_and_give_hf_logits(llama3, tmp_path, tp, fuse_qkv, layout):
    model, root = llama3
    convert_to_nxd(root / "sharded", tmp_path / "nxd", tp, fuse_qkv=fuse_qkv, target=layout, **QUIET)
    input_ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = model(input_ids).logits
    for result in spawn_ranks(_logits_from_rank_files, tp, str(tmp_path / "nxd"), tp, input_ids):
        torch.testing.assert_close(result["logits"], expected, atol=2e-5, rtol=0)


# --- bad input: clear errors, nothing left behind --------------------------------------------

def _no_output_left(tmp_path, name="out"):
    leftovers = [p.name for p in tmp_path.iterdir() if name in p.name]
    assert leftovers == [], leftovers


def test_missing_and_truncated_files(llama3, tmp_path):
    _, root = llama3
    broken = tmp_path / "broken"
    shutil.copytree(root / "sharded", broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot be read as safetensors"):
        convert_to_nxd(broken, tmp_path / "out", 2, **QUIET)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: file not found"):
        convert_to_nxd(broken, tmp_path / "out", 2, **QUIET)
    with pytest.raises(CheckpointError, match="no Llama checkpoint found"):
        convert_to_nxd(tmp_path, tmp_path / "out", 2, **QUIET)
    _no_output_left(tmp_path)


def test_config_that_does_not_match_the_weights(llama3, tmp_path):
    _, root = llama3
    wrong = LlamaConfig.from_dict(dict(LLAMA3_TINY, intermediate_size=64))
    with pytest.raises(ValueError, match=r"single: model.layers.0.mlp.gate_proj.weight: shape \(48, 32\), expected \(64, 32\)"):
        convert_to_nxd(root / "single", tmp_path / "out", 2, config=wrong, **QUIET)
    fewer = LlamaConfig.from_dict(dict(LLAMA3_TINY, num_hidden_layers=1))
    with pytest.raises(KeyError, match="unexpected keys.*model.layers.1"):
        convert_to_nxd(root / "single", tmp_path / "out", 2, config=fewer, **QUIET)
    _no_output_left(tmp_path)


def test_bad_tp_and_existing_output(llama3, tmp_path):
    _, root = llama3
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp=8"):
        convert_to_nxd(root / "single", tmp_path / "out", 8, **QUIET)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        convert_to_nxd(root / "single", tmp_path / "out", 2, **QUIET)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    convert_to_nxd(root / "single", tmp_path / "out", 2, overwrite=True, **QUIET)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / BASE_TAG / "done").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_midway_leaves_previous_output_intact(llama3, tmp_path, monkeypatch):
    _, root = llama3
    convert_to_nxd(root / "single", tmp_path / "out", 2, **QUIET)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    import checkpoint_tools.convert as convert_module

    calls, real_write = [], convert_module.write_rank_file

    def failing_write(writer, state, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(writer, state, path)

    monkeypatch.setattr(convert_module, "write_rank_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        convert_to_nxd(root / "single", tmp_path / "out", 4, overwrite=True, memory_budget=1, **QUIET)
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_manifest_mismatch_and_corruption_are_detected(llama3, tmp_path):
    _, root = llama3
    convert_to_nxd(root / "single", tmp_path / "nxd", 2, **QUIET)
    tag = tmp_path / "nxd" / BASE_TAG
    with pytest.raises(ValueError, match=r"tp=2 \(expected 4\)"):
        check_manifest(tag, tp=4)
    path = rank_path(tag, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify_files(tag) == [f"{path}: sha256 differs from the manifest"]
    assert main(["inspect", str(tmp_path / "nxd"), "--verify"]) == 1


@pytest.mark.smoke
def test_cli_round_trip_and_errors(llama3, tmp_path, capsys):
    _, root = llama3
    assert main(["convert", str(root / "sharded"), str(tmp_path / "nxd"), "--tp", "2", "--no-fuse-qkv"]) == 0
    assert main(["convert", str(tmp_path / "nxd"), str(tmp_path / "hf")]) == 0
    assert main(["inspect", str(tmp_path / "nxd"), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    # Without --tp any source becomes an HF directory again (here: a re-shard of the same tensors).
    assert main(["convert", str(root / "sharded"), str(tmp_path / "x")]) == 0
    again = load_file(str(tmp_path / "x" / "model-00001-of-00001.safetensors"))
    back = load_file(str(tmp_path / "hf" / "model-00001-of-00001.safetensors"))
    assert again.keys() == back.keys() and all(torch.equal(again[k], back[k]) for k in again)
    capsys.readouterr()
    assert main(["convert", str(root / "sharded"), str(tmp_path / "x")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(root / "sharded"), str(tmp_path / "x"), "--tp", "2", "--fuse_qkv", "False"])


def test_rank_shard_memory_budget_groups_ranks(llama3, tmp_path):
    from checkpoint_tools.convert import ranks_per_pass

    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    params = 19_616
    assert ranks_per_pass(cfg, 4, torch.float32, memory_budget=params * 4) == 2  # 2 building + 2 writing
    assert ranks_per_pass(cfg, 4, torch.float32, memory_budget=1) == 1
    assert ranks_per_pass(cfg, 4, torch.float32, memory_budget=1 << 40) == 4
    assert math.isclose(params, sum(p.numel() for p in make_hf_model(LLAMA3_TINY).parameters()))
