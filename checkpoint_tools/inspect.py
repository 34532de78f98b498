"""Describe any supported checkpoint: NxD (from its manifest) or HF / Meta / GGUF (from the files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoint_tools.nxd_format import MANIFEST, read_manifest, resolve_tag_dir, verify_files
from checkpoint_tools.sources import open_source
from checkpoint_tools.staging import find_litter


def litter_lines(path: Path) -> list[str]:
    """The staging directories in and beside ``path`` (crashed or running writes), with owners."""
    places = dict.fromkeys(p.absolute() for p in (path, path.parent, path.parent.parent) if p.is_dir())
    return [f"  staging: {item.describe()}" + ("; the next write here removes it" if item.stale else "")
            for place in places for item in find_litter(place)]


def inspect_path(path: str | Path, verify: bool = False, config=None, source_layout: str | None = None) -> tuple[str, list[str]]:
    """(human-readable report, problems). Problems are only looked for with ``verify``; staging
    directories left in or beside the checkpoint are listed either way."""
    try:
        tag_dir = resolve_tag_dir(path)
        has_manifest = (tag_dir / MANIFEST).is_file()
    except FileNotFoundError:
        has_manifest = False
    if has_manifest:
        manifest = read_manifest(tag_dir)
        cfg = manifest["config"]
        lines = [
            f"NxD checkpoint {tag_dir} ({manifest['kind']}, written by {manifest['written_by']})",
            f"  tp={manifest['tp']} kv_size_multiplier={manifest['kv_size_multiplier']}"
            f" kv_layout={manifest.get('kv_layout', 'trn1')} fuse_qkv={manifest['fuse_qkv']}"
            f" dtype={manifest['dtype']}" + (f" save_mode={manifest['save_mode']}" if "save_mode" in manifest else ""),
            f"  model: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']}"
            f"/{cfg['num_key_value_heads']} kv, vocab {cfg['vocab_size']}",
        ]
        if "lora" in manifest:
            lora = manifest["lora"]
            lines.append(f"  lora: r={lora['lora_rank']} alpha={lora['lora_alpha']} targets={lora['target_modules']}")
        if "source" in manifest:
            lines.append(f"  converted from {manifest['source']['format']} {manifest['source']['path']}")
        total = sum(f["bytes"] for f in manifest["files"].values())
        lines.append(f"  {len(manifest['files'])} files, {total / 2**20:.1f} MiB")
        problems = verify_files(tag_dir, manifest) if verify else []
        if verify and not problems:
            lines.append("  verified: every file matches its size and sha256")
        return "\n".join(lines + litter_lines(tag_dir)), problems
    source = open_source(path, config, source_layout)
    params = sum(torch.Size(s).numel() for s in source.shapes.values())
    lines = [
        f"{source.format} checkpoint {source.path}",
        f"  dtype={str(source.dtype).removeprefix('torch.')} parameters={params:,}",
        "  config: " + json.dumps(source.config.to_hf_dict(), sort_keys=True),
    ]
    if getattr(source, "kv_placement", None):  # written by NxD itself
        lines.append(f"  tp={source.tp} kv_layout={source.kv_layout} (query heads) kv_placement={source.kv_placement}"
                     " (K/V heads)")
    if getattr(source, "tensor_types", None):
        lines.append("  tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(source.tensor_types.items())))
    return "\n".join(lines + litter_lines(Path(path))), []
