"""A converted NxD checkpoint read as a source: HF-named full tensors, one layer gathered at a time.

This lets every conversion start from an NxD checkpoint as well: back to HF safetensors, to
another TP size, or to the other KV layout (``--retarget trn2``) without writing HF files in
between. Reads memory-map the rank files and gather only the layer being asked for (K/V
replicas checked equal as they are gathered), so memory stays near one layer of the model.
Only base weights can be a source: a ``base`` conversion, or a ``merged`` save of training.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from checkpoint_tools.nxd_format import (
    MANIFEST,
    manifest_config,
    rank_path,
    read_manifest,
    require_verified,
    resolve_tag_dir,
)
from checkpoint_tools.source_base import CheckpointError, Source, owned
from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from checkpoint_tools.tp_layout import (
    check_kv_layout,
    expected_hf_shapes,
    kv_placement_of,
    layouts_differ,
    unshard_to_hf,
)

_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")


def _group_of(key: str) -> str:
    """What is gathered together: one decoder layer, or everything outside the layers."""
    match = _LAYER_PREFIX.match(key)
    return match.group(0) if match else "top"


def is_nxd_checkpoint(path: str | Path) -> bool:
    try:
        return (resolve_tag_dir(path) / MANIFEST).is_file()
    except (FileNotFoundError, NotADirectoryError):
        return False


class NxDSource(Source):
    """``path`` is the checkpoint root (where its tokenizer files are); ``tag_dir`` holds the ranks.

    ``kv_layout`` places the query heads (and o_proj columns); ``kv_placement`` the K/V heads, which
    is the same except in what NxD 0.17's converter writes for trn2 (see ``open_foreign_nxd_source``)."""

    def __init__(self, tag_dir: Path, config: LlamaConfig, tp: int, kv_layout: str, dtype: torch.dtype,
                 kv_placement: str | None = None, format: str = "nxd"):
        self.tag_dir, self.tp = tag_dir, tp
        self.kv_layout = check_kv_layout(kv_layout, str(tag_dir))
        self.kv_placement = kv_placement or self.kv_layout
        shapes = expected_hf_shapes(config)
        super().__init__(tag_dir.parent, format, config, shapes, {k: dtype for k in shapes})
        self._group: str | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def read(self, key: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        group = _group_of(key)
        if group != self._group:
            self._tensors = {}
            ranks = []
            for rank in range(self.tp):
                state = torch.load(rank_path(self.tag_dir, rank), map_location="cpu", mmap=True, weights_only=True)
                ranks.append({k.replace(".base_layer.", "."): v for k, v in state.items()
                              if _group_of(k) == group and "lora_" not in k})
            self._tensors, self._group = unshard_to_hf(ranks, self.config, self.kv_layout, self.kv_placement), group
        if key not in self._tensors:
            raise CheckpointError(f"{self.tag_dir}: no tensors for {key}")
        tensor = self._tensors[key]
        return owned(tensor if dim is None else tensor.narrow(dim, start, length))

    def release(self) -> None:
        """Keeps the gathered group: readers release between every top-level tensor, and
        re-gathering the (vocabulary-sized) head for each rank would copy it tp times over."""


def open_nxd_source(path: str | Path) -> NxDSource:
    """The newest complete tag under ``path`` (or the tag itself), its files checked against the manifest."""
    tag_dir = resolve_tag_dir(path)
    manifest = read_manifest(tag_dir)
    if manifest.get("kind") != "base" and manifest.get("save_mode") != "merged":
        raise CheckpointError(f"{tag_dir}: a {manifest.get('save_mode')!r} LoRA save is not a base model; export it "
                              f"(nxd-lora export, --merged for an HF model) or convert its base checkpoint instead")
    require_verified(tag_dir, manifest)
    return NxDSource(tag_dir, manifest_config(manifest, tag_dir), int(manifest["tp"]),
                     manifest.get("kv_layout", "trn1"), getattr(torch, manifest["dtype"]))


# What a checkpoint written by NxD itself (its converter, or its trainer) can be laid out as: NxD's
# two runtimes, and NxD 0.17's converter output for trn2, whose query heads are in trn2 order but
# whose K/V heads are placed as on trn1 (``checkpoint_converter.py --hw_backend trn2`` replicates them
# with ``repeat(kvm, 1)`` where its TRN2 runtime uses ``repeat_interleave``).
NXD_CONVERTER_TRN2 = "trn2-nxd-converter"
FOREIGN_LAYOUTS = ("trn1", "trn2", NXD_CONVERTER_TRN2)
_RANK_FILE = re.compile(r"^dp_rank_00_tp_rank_(\d\d)_pp_rank_(\d\d)\.pt$")


def foreign_nxd_tag(path: str | Path) -> Path | None:
    """The tag directory of an NxD checkpoint without nxd-lora's manifest (``<tag>/model/dp_rank_00_
    tp_rank_TT_pp_rank_00.pt``), given the tag or a root holding one such tag; else None."""
    path = Path(path)
    candidates = [path, *sorted(p for p in path.glob("*") if p.is_dir())] if path.is_dir() else []
    found = [c for c in candidates if (c / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt").is_file()]
    if len(found) > 1 and path not in found:
        raise CheckpointError(f"{path}: holds several NxD checkpoint tags {[f.name for f in found]}; name one")
    return found[0] if found else None


def open_foreign_nxd_source(path: str | Path, config: LlamaConfig | None, source_layout: str | None) -> NxDSource:
    """A checkpoint written by NxD (its ``checkpoint_converter.py`` or ``save_checkpoint``), which has no
    manifest: the HF ``config`` it came from is needed, the TP size is read from its files, and where
    the layouts differ (replicated KV heads) ``source_layout`` says which it is. The K/V heads' actual
    placement is read from the replicas and must agree; NxD 0.17's trn2 converter bug is named."""
    if source_layout is not None and source_layout not in FOREIGN_LAYOUTS:
        raise CheckpointError(f"--source-layout {source_layout!r} unknown; choose from {list(FOREIGN_LAYOUTS)}")
    tag_dir = foreign_nxd_tag(path)
    if config is None:
        raise CheckpointError(f"{tag_dir}: an NxD checkpoint without nxd-lora's manifest (written by NxD's converter "
                              "or trainer) does not record its model: pass --config CONFIG_JSON (the HF config.json "
                              "of the model it was converted from)")
    tp = len(rank_files_of(tag_dir))
    kvm = check_tensor_parallel(config, tp)
    first = torch.load(rank_path(tag_dir, 0), map_location="cpu", mmap=True, weights_only=True)
    if "model.embed_tokens.weight" not in first:
        what = "a LoRA adapter saved by NxD's LoraModel: export it with nxd-lora export" if any(
            "lora_" in k for k in first) else "not a Llama base model (no model.embed_tokens.weight)"
        raise CheckpointError(f"{rank_path(tag_dir, 0)}: {what}")
    dtype = first["model.embed_tokens.weight"].dtype
    if not layouts_differ(tp, kvm):
        layout = "trn1" if source_layout in (None, NXD_CONVERTER_TRN2) else source_layout
        return NxDSource(tag_dir, config, tp, layout, dtype, format="nxd (NxD-written)")
    placement = _kv_placement(tag_dir, tp, config)
    where = (f"{tag_dir}: tp={tp} replicates each of the {config.num_key_value_heads} KV heads "
             f"{kvm} times (kv_size_multiplier {kvm})")
    if source_layout is None:
        raise CheckpointError(f"{where}, and trn1 and trn2 place query heads differently, which the files cannot "
                              f"tell: pass --source-layout trn1 or trn2 (the --hw_backend it was converted for). "
                              f"Its K/V replicas are placed as {placement or 'neither layout'}")
    if source_layout == "trn2" and placement == "trn1":
        raise CheckpointError(
            f"{where}; its K/V heads are placed as on trn1 (rank r holds KV head r % {config.num_key_value_heads}), "
            f"not as NxD's trn2 runtime places them (rank r holds KV head r // {kvm}): this is what NxD 0.17's "
            f"checkpoint_converter.py --hw_backend trn2 writes (K/V repeat(kvm, 1) instead of repeat_interleave), "
            f"and trained on trn2 its query heads would attend to the wrong KV heads. Repair it in one command: "
            f"nxd-lora convert {path} FIXED --tp {tp} --target trn2 --config CONFIG_JSON --source-layout "
            f"{NXD_CONVERTER_TRN2}")
    wanted = "trn1" if source_layout == NXD_CONVERTER_TRN2 else source_layout
    if placement != wanted:
        raise CheckpointError(f"{where}; --source-layout {source_layout} needs its K/V heads placed as {wanted}, but "
                              f"they are placed as {placement or 'neither layout (replicas differ)'}")
    q_layout = "trn2" if source_layout == NXD_CONVERTER_TRN2 else source_layout
    return NxDSource(tag_dir, config, tp, q_layout, dtype, kv_placement=placement, format="nxd (NxD-written)")


def rank_files_of(tag_dir: Path) -> list[str]:
    """The rank files of an NxD-written tag (``model/dp_rank_00_tp_rank_TT_pp_rank_00.pt``, TT from 00),
    checked to be one data-parallel copy of one pipeline stage, numbered without gaps."""
    model_dir = tag_dir / "model"
    names = sorted(p.name for p in model_dir.glob("dp_rank_*.pt"))
    matches = [_RANK_FILE.match(n) for n in names]
    if not all(matches) or any(m[2] != "00" for m in matches):
        odd = [n for n, m in zip(names, matches) if not m or m[2] != "00"]
        raise CheckpointError(f"{model_dir}: {odd[0]} is not a dp_rank_00_tp_rank_TT_pp_rank_00.pt rank file "
                              "(pipeline-parallel, expert-parallel and xser checkpoints are not read)")
    if [int(m[1]) for m in matches] != list(range(len(names))):
        raise CheckpointError(f"{model_dir}: rank files are not numbered tp_rank_00..{len(names) - 1:02d}: {names}")
    return names


def _kv_placement(tag_dir: Path, tp: int, config: LlamaConfig) -> str | None:
    """trn1 or trn2: where the first layer's K heads sit, from which ranks hold equal replicas."""
    parts = []
    for rank in range(tp):
        state = torch.load(rank_path(tag_dir, rank), map_location="cpu", mmap=True, weights_only=True)
        prefix = "model.layers.0.self_attn.qkv_proj."
        if prefix + "weight_k" in state:
            parts.append(state[prefix + "weight_k"].clone())
        elif prefix + "weight_qkv" in state:
            q_rows = config.num_attention_heads * config.head_dim // tp
            kv_rows = (state[prefix + "weight_qkv"].shape[0] - q_rows) // 2
            parts.append(state[prefix + "weight_qkv"][q_rows:q_rows + kv_rows].clone())
        else:
            raise CheckpointError(f"{rank_path(tag_dir, rank)}: no {prefix}weight_k or weight_qkv (not a Llama "
                                  "checkpoint with NxD's GQA qkv layer)")
    found = kv_placement_of(parts, config.num_key_value_heads)
    return found[0] if len(found) == 1 else None
