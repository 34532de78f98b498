"""GGUF as a source format, on tiny files written with llama.cpp's own ``gguf`` writer and
quantizers: every supported tensor type reads exactly as transformers dequantizes it, sliced
reads equal whole ones, and bad files fail naming the file and what is wrong, writing nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoint_tools.convert import convert_source_to_hf, convert_to_hf, convert_to_nxd
from checkpoint_tools.gguf_source import SUPPORTED_TYPES
from checkpoint_tools.sources import CheckpointError, open_source
from conftest import hf_state_dict, make_hf_model
from gguf_writer import write_llama_gguf
from safetensors.torch import load_file

# Dimensions are multiples of the 32-element quantization blocks.
GGUF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
                 tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_model():
    return make_hf_model(GGUF_TINY)


def transformers_state(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.state_dict()


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES))
@pytest.mark.torch_version
def test_every_supported_type_reads_as_transformers_dequantizes(tmp_path, tiny_model, qtype):
    path = write_llama_gguf(tmp_path / f"tiny-{qtype}.gguf", GGUF_TINY, hf_state_dict(tiny_model), qtype)
    source = open_source(path)
    reference = transformers_state(path)
    assert source.format == "gguf" and set(source.shapes) == set(reference)
    for key in source.shapes:
        ours = source.read(key)
        assert ours.dtype == SUPPORTED_TYPES[qtype] or ours.ndim == 1, key
        assert torch.equal(ours.float(), reference[key].float()), key
    q = source.read("model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(source.read("model.layers.1.self_attn.q_proj.weight", 0, 16, 32), q[16:48])
    down = source.read("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(source.read("model.layers.0.mlp.down_proj.weight", 1, 32, 64), down[:, 32:96])
    if qtype == "F32":  # unquantized: the HF weights themselves come back (q/k rope order undone)
        for key, value in hf_state_dict(tiny_model).items():
            assert torch.equal(source.read(key), value), key


def test_gguf_config_matches_transformers(tmp_path, tiny_model):
    import transformers

    path = write_llama_gguf(tmp_path / "tiny.gguf", GGUF_TINY, hf_state_dict(tiny_model), "Q8_0")
    ours = open_source(path).config
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and not ours.tie_word_embeddings
    assert ours.extra["bos_token_id"] == 1 and ours.extra["eos_token_id"] == 2


@pytest.mark.smoke
def test_gguf_to_nxd_and_back_equals_dequantized(tmp_path, tiny_model):
    """Sliced streaming reads (2 ranks) rebuild exactly what the whole-tensor reads give."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", GGUF_TINY, hf_state_dict(tiny_model), "Q4_1")
    manifest = convert_to_nxd(path, tmp_path / "nxd", 2, log=lambda _: None)
    assert manifest["source"]["format"] == "gguf" and manifest["source"]["path"] == str(path)
    convert_to_hf(tmp_path / "nxd", tmp_path / "back", log=lambda _: None)
    convert_source_to_hf(path, tmp_path / "direct", log=lambda _: None)
    source = open_source(path)
    back = load_file(str(tmp_path / "back" / "model-00001-of-00001.safetensors"))
    direct = load_file(str(tmp_path / "direct" / "model-00001-of-00001.safetensors"))
    assert set(back) == set(direct) == set(source.shapes)
    for key in source.shapes:
        assert torch.equal(back[key], source.read(key)) and torch.equal(direct[key], back[key]), key
    assert (tmp_path / "direct" / "generation_config.json").is_file()


def test_non_llama_gguf_is_refused_and_nothing_written(tmp_path, tiny_model):
    path = write_llama_gguf(tmp_path / "gpt2.gguf", GGUF_TINY, hf_state_dict(tiny_model), "F32", arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'; only 'llama'"):
        convert_to_nxd(path, tmp_path / "out", 2, log=lambda _: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, tiny_model):
    state = {k: v for k, v in hf_state_dict(tiny_model).items() if "layers.1.mlp.up" not in k}
    # One Q4_K super-block (256 weights in 144 bytes) stands in for the matrix: the type is refused first.
    bad = write_llama_gguf(tmp_path / "k2.gguf", GGUF_TINY, state, "F32",
                           extra_tensors={"blk.1.ffn_up.weight": (np.zeros((1, 144), dtype=np.uint8), "Q4_K")})
    with pytest.raises(CheckpointError, match=r"k2\.gguf: tensor 'blk\.1\.ffn_up\.weight' has type Q4_K; supported"):
        convert_source_to_hf(bad, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_a_clear_error(tmp_path, tiny_model):
    path = write_llama_gguf(tmp_path / "whole.gguf", GGUF_TINY, hf_state_dict(tiny_model), "Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: cannot be read as a GGUF file, truncated or corrupt"):
        convert_to_nxd(cut, tmp_path / "out", 2, log=lambda _: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unknown_tensor_and_llama3_rope_freqs_are_refused(tmp_path, tiny_model):
    state = hf_state_dict(tiny_model)
    freqs = write_llama_gguf(tmp_path / "freqs.gguf", GGUF_TINY, state, "F32",
                             extra_tensors={"rope_freqs.weight": (np.ones(8, dtype=np.float32), "F32")})
    with pytest.raises(CheckpointError, match=r"freqs\.gguf: a rope_freqs tensor \(llama3 rope scaling\) is not supported"):
        open_source(freqs)
    odd = write_llama_gguf(tmp_path / "odd.gguf", GGUF_TINY, state, "F32",
                           extra_tensors={"blk.0.attn_qkv.weight": (np.ones((4, 4), dtype=np.float32), "F32")})
    with pytest.raises(CheckpointError, match=r"odd\.gguf: unexpected tensor 'blk\.0\.attn_qkv\.weight'"):
        open_source(odd)


def test_cli_converts_and_inspects_a_gguf_file(tmp_path, tiny_model, capsys):
    from nxd_lora.cli import main

    path = write_llama_gguf(tmp_path / "tiny.gguf", GGUF_TINY, hf_state_dict(tiny_model), "Q8_0")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"gguf checkpoint {path}" in out and "tensor types: F32 x5, Q8_0 x16" in out
    assert main(["convert", str(path), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(path), str(tmp_path / "nxd"), "--tp", "2"]) == 0
    assert main(["convert", str(path), str(tmp_path / "bad"), "--tp", "3"]) == 2
    assert "num_attention_heads=4 is not divisible by tp=3" in capsys.readouterr().err
