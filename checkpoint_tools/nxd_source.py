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
from checkpoint_tools.tp_layout import check_kv_layout, expected_hf_shapes, unshard_to_hf

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
    """``path`` is the checkpoint root (where its tokenizer files are); ``tag_dir`` holds the ranks."""

    def __init__(self, tag_dir: Path, manifest: dict):
        self.tag_dir, self.manifest = tag_dir, manifest
        self.tp = int(manifest["tp"])
        self.kv_layout = check_kv_layout(manifest.get("kv_layout", "trn1"), str(tag_dir / MANIFEST))
        config = manifest_config(manifest, tag_dir)
        dtype = getattr(torch, manifest["dtype"])
        shapes = expected_hf_shapes(config)
        super().__init__(tag_dir.parent, "nxd", config, shapes, {k: dtype for k in shapes})
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
            self._tensors, self._group = unshard_to_hf(ranks, self.config, self.kv_layout), group
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
    return NxDSource(tag_dir, manifest)
