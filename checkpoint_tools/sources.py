"""Lazy readers for Llama checkpoints on disk, all presenting HF names and the HF rope layout.

Supported, auto-detected by ``open_source``:

* HF safetensors: ``model.safetensors`` or ``model-*-of-*.safetensors`` + index, read with
  ``safetensors.safe_open`` opened per read, so mapped pages are released after each slice.
* HF torch files: ``pytorch_model.bin`` or ``pytorch_model-*.bin`` + index (mmap, weights only).
* GGUF (llama.cpp) files, dequantized: ``checkpoint_tools.gguf_source``.
* NxD checkpoints written by ``nxd-lora convert`` (base weights), gathered layer by layer:
  ``checkpoint_tools.nxd_source``.
* Meta ``consolidated.NN.pth`` + ``params.json`` (in the directory or its ``original/``),
  model-parallel pieces merged along the dim where they differ from the full shape, q/k rows
  permuted from Meta's interleaved rope layout to HF's rotate-half layout.

A source reads slices: ``read(key, dim, start, length)``; ``release()`` drops cached file
handles (the converter calls it between layers to bound memory).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from checkpoint_tools.atomic_io import read_json
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_source import foreign_nxd_tag, is_nxd_checkpoint, open_foreign_nxd_source, open_nxd_source
from checkpoint_tools.source_base import (  # re-exported: the names importers know this module by
    CheckpointError,
    Source,
    hf_to_meta_rope_rows,
    meta_to_hf_rope_rows,
    owned,
)

__all__ = ["CheckpointError", "Source", "hf_to_meta_rope_rows", "meta_to_hf_rope_rows", "open_source", "owned"]

# Buffers some HF checkpoints carry that are recomputed at load time.
_IGNORED_HF_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _load_json(path: Path) -> dict:
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(str(err)) from None


def _torch_load_mmap(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(err).__name__}: {err})") from None


def _narrow(tensor: torch.Tensor, dim: int | None, start: int, length: int | None) -> torch.Tensor:
    """An owned copy of the slice (detached from the mapped file)."""
    return owned(tensor if dim is None else tensor.narrow(dim, start, length))


def _check_index(path: Path, index_keys: set[str] | None, found: set[str]) -> None:
    missing = sorted((index_keys or set()) - found)
    if missing:
        raise CheckpointError(f"{path}: the index lists keys that are not in their files: {missing[:5]}")


class SafetensorsSource(Source):
    def __init__(self, path: Path, config: LlamaConfig, files: list[Path], index_keys: set[str] | None = None):
        super().__init__(path, "hf-safetensors", config)
        self.files: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        piece = handle.get_slice(key)
                        self.files[key] = file
                        self.shapes[key] = tuple(piece.get_shape())
                        self.dtypes[key] = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32)
            except FileNotFoundError:
                raise CheckpointError(f"{file}: file not found") from None
            except Exception as err:
                raise CheckpointError(
                    f"{file}: cannot be read as safetensors, truncated or corrupt? ({type(err).__name__}: {err})"
                ) from None
        _check_index(path, index_keys, set(self.files))

    def read(self, key, dim=None, start=0, length=None):
        with safe_open(str(self.files[key]), framework="pt") as handle:
            piece = handle.get_slice(key)
            if dim is None:
                return owned(piece[:])
            index = [slice(None)] * len(self.shapes[key])
            index[dim] = slice(start, start + length)
            return owned(piece[tuple(index)])


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class TorchFilesSource(Source):
    """HF ``pytorch_model*.bin`` files, loaded with mmap and weights_only; one file cached at a time."""

    def __init__(self, path: Path, config: LlamaConfig, files: list[Path], index_keys: set[str] | None = None):
        super().__init__(path, "hf-bin", config)
        self.files: dict[str, Path] = {}
        self._cached: tuple[Path, dict] | None = None
        for file in files:
            for key, tensor in _torch_load_mmap(file).items():
                self.files[key] = file
                self.shapes[key], self.dtypes[key] = tuple(tensor.shape), tensor.dtype
        _check_index(path, index_keys, set(self.files))

    def _file(self, file: Path) -> dict:
        if self._cached is None or self._cached[0] != file:
            self._cached = (file, _torch_load_mmap(file))
        return self._cached[1]

    def read(self, key, dim=None, start=0, length=None):
        return _narrow(self._file(self.files[key])[key], dim, start, length)

    def release(self) -> None:
        self._cached = None


_META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_META_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_IGNORED = {"rope.freqs"}
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def meta_key_to_hf(key: str) -> str | None:
    """HF name of a Meta key; None for buffers that are recomputed (``rope.freqs``)."""
    if key in _META_IGNORED:
        return None
    if key in _META_TO_HF:
        return _META_TO_HF[key]
    match = _META_LAYER.match(key)
    if match and match.group(2) in _META_LAYER_TO_HF:
        return f"model.layers.{match.group(1)}.{_META_LAYER_TO_HF[match.group(2)]}"
    raise KeyError(key)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's ``FeedForward`` derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class MetaSource(Source):
    """Meta ``consolidated.NN.pth`` files (NN = model-parallel rank) with ``params.json``."""

    def __init__(self, path: Path, files: list[Path], params: dict, config: LlamaConfig | None):
        self.files = files
        self._cached: list[dict] | None = None
        pieces = self._pieces()
        first = pieces[0]
        hf_keys = {}
        for key in first:
            try:
                hf = meta_key_to_hf(key)
            except KeyError:
                raise CheckpointError(f"{files[0]}: unexpected key {key!r} for a Meta Llama checkpoint") from None
            if hf is not None:
                hf_keys[hf] = key
        for file, piece in zip(files[1:], pieces[1:]):
            if set(piece) != set(first):
                diff = sorted(set(piece) ^ set(first))[:5]
                raise CheckpointError(f"{file}: keys differ from {files[0].name} ({diff})")
        config = config or self._config_from_params(path, params, first, len(files), "lm_head.weight" not in hf_keys)
        super().__init__(path, "meta", config)
        self.meta_keys = hf_keys
        from checkpoint_tools.tp_layout import expected_hf_shapes

        expected = expected_hf_shapes(config)
        self.cat_dims: dict[str, int | None] = {}
        for hf, meta in hf_keys.items():
            shapes = [tuple(p[meta].shape) for p in pieces]
            full = expected.get(hf)
            self.cat_dims[hf] = self._cat_dim(hf, shapes, full, files)
            dim = self.cat_dims[hf]
            self.shapes[hf] = shapes[0] if dim is None else tuple(
                sum(s[d] for s in shapes) if d == dim else shapes[0][d] for d in range(len(shapes[0]))
            )
            self.dtypes[hf] = first[meta].dtype
        if config.tie_word_embeddings and "lm_head.weight" in self.shapes:
            del self.shapes["lm_head.weight"]
        self.release()

    @staticmethod
    def _cat_dim(key, shapes, full, files) -> int | None:
        if len(shapes) == 1 or full is None or all(s == full for s in shapes):
            return None
        for dim in range(len(full)):
            if sum(s[dim] for s in shapes) == full[dim] and all(
                s[d] == full[d] for s in shapes for d in range(len(full)) if d != dim
            ):
                return dim
        raise CheckpointError(f"{files[0].parent}: {key}: model-parallel pieces {shapes[:2]}... do not form {full}")

    @staticmethod
    def _config_from_params(path: Path, params: dict, first: dict, n_files: int, tied: bool) -> LlamaConfig:
        source = str(path / "params.json")
        try:
            dim, n_heads = int(params["dim"]), int(params["n_heads"])
            embed = first["tok_embeddings.weight"].shape
            vocab = embed[0] * (n_files if embed[1] == dim else 1)
            w1_rows = first["layers.0.feed_forward.w1.weight"].shape[0] * n_files
            inter = meta_intermediate_size(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
            if inter != w1_rows:
                raise CheckpointError(f"{source}: params give intermediate size {inter} but the weights have {w1_rows}")
            raw = dict(
                vocab_size=vocab, hidden_size=dim, intermediate_size=inter, num_hidden_layers=int(params["n_layers"]),
                num_attention_heads=n_heads, num_key_value_heads=int(params.get("n_kv_heads") or n_heads),
                rms_norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
                tie_word_embeddings=tied,
            )
        except KeyError as err:
            raise CheckpointError(f"{source}: missing key {err}") from None
        if params.get("use_scaled_rope"):
            # Llama 3.2 1B/3B use factor 32, Llama 3.1 factor 8 (params.json does not say which).
            factor = params.get("rope_scaling_factor") or (32.0 if dim in (2048, 3072) else 8.0)
            raw["rope_scaling"] = {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            raw["max_position_embeddings"] = 131072
        else:
            raw["max_position_embeddings"] = 8192 if raw["rope_theta"] >= 500000 else 4096
        return LlamaConfig.from_dict(raw, source=source)

    def _pieces(self) -> list[dict]:
        if self._cached is None:
            self._cached = [_torch_load_mmap(f) for f in self.files]
        return self._cached

    def release(self) -> None:
        self._cached = None

    def read(self, key, dim=None, start=0, length=None):
        meta_key, cat_dim = self.meta_keys[key], self.cat_dims[key]
        pieces = [p[meta_key] for p in self._pieces()]
        if cat_dim is None:
            tensor = _narrow(pieces[0], dim, start, length)
        elif dim is None or dim != cat_dim:
            tensor = torch.cat([p if dim is None else p.narrow(dim, start, length) for p in pieces], dim=cat_dim)
        else:
            parts, offset = [], 0
            for piece in pieces:
                size = piece.shape[dim]
                lo, hi = max(start, offset), min(start + length, offset + size)
                if lo < hi:
                    parts.append(piece.narrow(dim, lo - offset, hi - lo))
                offset += size
            tensor = torch.cat(parts, dim=dim)  # a new tensor, even for one part
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            hd = self.config.head_dim
            if dim not in (None, 0) or start % hd or tensor.shape[0] % hd:
                raise ValueError(f"{key}: Meta q/k rows can only be read in whole heads")
            tensor = meta_to_hf_rope_rows(tensor, tensor.shape[0] // hd)
        return tensor


def _index_files(directory: Path, index_name: str) -> tuple[list[Path], set[str]]:
    """The files an HF index names, and the keys it promises."""
    index = _load_json(directory / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{directory / index_name}: no 'weight_map' object")
    return [directory / name for name in sorted(set(weight_map.values()))], set(weight_map)


def _hf_config(directory: Path, config: LlamaConfig | None) -> LlamaConfig:
    return config or LlamaConfig.from_json(directory / "config.json")


def _drop_ignored(source: Source) -> Source:
    for key in [k for k in source.shapes if _IGNORED_HF_KEYS.match(k)]:
        del source.shapes[key]
    if source.config.tie_word_embeddings:
        source.shapes.pop("lm_head.weight", None)
    return source


def _gguf_source(path: Path, config: LlamaConfig | None) -> Source:
    from checkpoint_tools.gguf_source import GGUFSource  # needs the optional 'gguf' package

    return GGUFSource(path, config)


def open_source(path: str | Path, config: LlamaConfig | None = None, source_layout: str | None = None) -> Source:
    """Detect the checkpoint format under ``path`` and return a lazy source.

    ``config`` overrides the config found beside the weights (config.json or params.json).
    ``source_layout`` is the layout of an NxD-written checkpoint (one without our manifest).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(path, config)
    if path.is_file():
        path = path.parent
    if is_nxd_checkpoint(path):
        if config is not None:
            raise CheckpointError(f"{path}: an NxD checkpoint carries its config in its manifest; --config does not apply")
        if source_layout is not None:
            raise CheckpointError(f"{path}: an nxd-lora checkpoint records its layout in its manifest; "
                                  "--source-layout is for checkpoints written by NxD itself")
        return open_nxd_source(path)
    if foreign_nxd_tag(path) is not None:
        return open_foreign_nxd_source(path, config, source_layout)
    if source_layout is not None:
        raise CheckpointError(f"{path}: --source-layout applies to an NxD checkpoint (<tag>/model/dp_rank_00_tp_rank_"
                              "00_pp_rank_00.pt), and this is not one")
    hf_layouts = (
        ("model.safetensors.index.json", SafetensorsSource),
        ("model.safetensors", SafetensorsSource),
        ("pytorch_model.bin.index.json", TorchFilesSource),
        ("pytorch_model.bin", TorchFilesSource),
    )
    for name, source_class in hf_layouts:
        if (path / name).exists():
            files, keys = _index_files(path, name) if name.endswith(".json") else ([path / name], None)
            return _drop_ignored(source_class(path, _hf_config(path, config), files, keys))
    for meta_dir in (path, path / "original"):
        files = sorted(meta_dir.glob("consolidated.*.pth"))
        if files:
            numbers = [int(f.name.split(".")[1]) for f in files]
            if numbers != list(range(len(files))):
                raise CheckpointError(f"{meta_dir}: consolidated files are not numbered 00..{len(files) - 1:02d}: "
                                      f"{[f.name for f in files]}")
            return MetaSource(meta_dir, files, _load_json(meta_dir / "params.json"), config)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several GGUF files ({[g.name for g in ggufs]}); name the one to convert")
    if ggufs:
        return _gguf_source(ggufs[0], config)
    raise CheckpointError(
        f"{path}: no Llama checkpoint found (expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin[.index.json] with config.json, original/consolidated.NN.pth with params.json, "
        f"or a .gguf file)"
    )
