"""GGUF files (llama.cpp's format) as a checkpoint source: Llama weights under HF names and layout.

The ``gguf`` package (llama.cpp's own reader) parses the file through a memory map and
dequantizes; this module maps names, shapes and the config, and undoes llama.cpp's q/k row
permutation (its converter stores q/k in Meta's interleaved rope layout, the same permutation
as Meta checkpoints). Rows of a quantized tensor are whole blocks, so a dim-0 slice
dequantizes only its own rows: conversion streams as it does for the other sources.

Only what can be checked is accepted: architecture ``llama``, tensor types in
``SUPPORTED_TYPES`` (each round-trips through ``gguf.quants`` in the tests), default rope.
Anything else is an error that names the file, the key or tensor, and what was expected.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.source_base import CheckpointError, Source, meta_to_hf_rope_rows, owned

# Quantized types dequantize to float32; plain floats keep their dtype.
SUPPORTED_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "Q4_0": torch.float32,
                   "Q4_1": torch.float32, "Q5_0": torch.float32, "Q5_1": torch.float32, "Q8_0": torch.float32}
_TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLOCK_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_key_to_hf(name: str) -> str:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _BLOCK_KEY.match(name)
    if match and match.group(2) in _BLOCK:
        return f"model.layers.{match.group(1)}.{_BLOCK[match.group(2)]}.weight"
    raise KeyError(name)


def open_gguf_reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    try:
        return GGUFReader(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as a GGUF file, truncated or corrupt? "
                              f"({type(err).__name__}: {err})") from None


def gguf_metadata(reader, path: Path) -> dict:
    """Scalar and string fields (arrays other than short ones are left out: the vocabulary)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        try:
            out[key] = field.contents()
        except Exception as err:
            raise CheckpointError(f"{path}: metadata key {key!r} cannot be read ({err})") from None
    return out


def gguf_config(meta: dict, tensor_names: set[str], path: Path) -> LlamaConfig:
    """The HF Llama config a GGUF file's ``llama.*`` metadata describes."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    scaling = meta.get("llama.rope.scaling.type")
    if "rope_freqs.weight" in tensor_names or scaling not in (None, "none"):
        what = "a rope_freqs tensor (llama3 rope scaling)" if scaling in (None, "none") else f"rope scaling {scaling!r}"
        raise CheckpointError(f"{path}: {what} is not supported from GGUF; convert the HF or Meta checkpoint instead")

    def need(key: str):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata key {key!r} missing (a Llama GGUF file has it)")
        return meta[key]

    n_heads = int(need("llama.attention.head_count"))
    hidden = int(need("llama.embedding_length"))
    raw = dict(
        vocab_size=int(meta.get("llama.vocab_size") or 0), hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")), num_hidden_layers=int(need("llama.block_count")),
        num_attention_heads=n_heads, num_key_value_heads=int(meta.get("llama.attention.head_count_kv") or n_heads),
        head_dim=int(meta.get("llama.attention.key_length") or hidden // n_heads),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get("llama.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            raw[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    return LlamaConfig.from_dict(raw, source=str(path))


class GGUFSource(Source):
    """A llama.cpp GGUF file, read lazily through ``gguf.GGUFReader``'s memory map."""

    def __init__(self, path: Path, config: LlamaConfig | None = None):
        reader = open_gguf_reader(path)
        self.metadata = gguf_metadata(reader, path)
        shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
        if not self.metadata.get("llama.vocab_size") and "token_embd.weight" in shapes:
            self.metadata["llama.vocab_size"] = shapes["token_embd.weight"][0]
        super().__init__(path, "gguf", config or gguf_config(self.metadata, set(shapes), path))
        self.tensors = {}
        for tensor in reader.tensors:
            try:
                key = gguf_key_to_hf(tensor.name)
            except KeyError:
                raise CheckpointError(f"{path}: unexpected tensor {tensor.name!r} for a Llama GGUF file") from None
            type_name = tensor.tensor_type.name
            if type_name not in SUPPORTED_TYPES:
                raise CheckpointError(f"{path}: tensor {tensor.name!r} has type {type_name}; supported types: "
                                      f"{sorted(SUPPORTED_TYPES)}")
            self.tensors[key] = tensor
            self.shapes[key] = shapes[tensor.name]
            self.dtypes[key] = SUPPORTED_TYPES[type_name]
        if self.config.tie_word_embeddings:
            self.shapes.pop("lm_head.weight", None)

    @property
    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGUF type the file holds (``inspect`` shows it)."""
        return dict(Counter(t.tensor_type.name for t in self.tensors.values()))

    @property
    def dtype(self) -> torch.dtype:
        """float32 when any matrix is quantized (its dequantized values), else the stored float type."""
        types = {t.tensor_type.name for t in self.tensors.values()}
        if types - {"F32", "F16", "BF16"}:
            return torch.float32
        return self.dtypes.get("model.embed_tokens.weight", torch.float32)

    def read(self, key, dim=None, start=0, length=None):
        from gguf.quants import dequantize

        tensor = self.tensors[key]
        raw = tensor.data
        heads = None
        if key.endswith("self_attn.q_proj.weight"):
            heads = self.config.num_attention_heads
        elif key.endswith("self_attn.k_proj.weight"):
            heads = self.config.num_key_value_heads
        if dim == 0 and raw.ndim == 2:
            if heads is not None and (start % self.config.head_dim or length % self.config.head_dim):
                raise ValueError(f"{key}: GGUF q/k rows can only be read in whole heads")
            raw = raw[start:start + length]
        values = torch.from_numpy(dequantize(raw, tensor.tensor_type).copy())
        values = values.reshape(raw.shape[0], -1) if raw.ndim == 2 else values.reshape(-1)
        if heads is not None:
            values = meta_to_hf_rope_rows(values, values.shape[0] // self.config.head_dim)
        if dim not in (None, 0) or (dim == 0 and raw.ndim != 2):
            values = values.narrow(dim, start, length)
        return owned(values.to(self.dtypes[key]))
