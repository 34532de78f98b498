"""Saving a LoRA model as an NxD checkpoint tag, in NxD's three LoRA save modes.

* ``adapter``       (save_lora_base=False, merge_lora=False): only ``lora_A``/``lora_B``.
* ``base+adapter``  (save_lora_base=True,  merge_lora=False): everything, base under ``base_layer``.
* ``merged``        (save_lora_base=True,  merge_lora=True):  base weights with ``B @ A * scaling``
  added, under plain names, i.e. a base checkpoint that loads without LoRA.

All ranks write into ``<root>/.<tag>.partial/``; after a barrier rank 0 writes the manifest,
``adapter_config.json`` and ``done`` (NxD's markers), then renames the directory to
``<root>/<tag>``. An interrupted save leaves the previous tags untouched.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from checkpoint_tools.atomic_io import write_json
from checkpoint_tools.nxd_format import (
    FORMAT_VERSION,
    mark_done,
    mark_started,
    rank_path,
    replace_directory,
    save_rank_file,
    write_manifest,
)
from nxd_lora.backends.base import Backend
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.layers import LoraLayer
from nxd_lora.lora.model import lora_state_dict

SAVE_MODES = {"adapter": (False, False), "base+adapter": (True, False), "merged": (True, True)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's base weights with the adapters folded in, under NxD base names."""
    merged = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for param, delta in module.delta_weights().items():
                key = f"{name}.base_layer.{param}"
                merged[key] = (merged[key].float() + delta.detach().float()).to(merged[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in merged.items()}


def rank_state_for_mode(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    if mode not in SAVE_MODES:
        raise ValueError(f"save mode {mode!r} unknown; choose one of {list(SAVE_MODES)}")
    if mode == "adapter":
        state = lora_state_dict(model)
    elif mode == "base+adapter":
        state = dict(model.state_dict())
    else:
        state = merged_state_dict(model)
    return {k: v.detach().cpu() for k, v in state.items()}


def nxd_adapter_config(lora: LoraConfig, mode: str) -> dict:
    """The adapter_config.json NxD writes beside a LoRA checkpoint (its field names)."""
    save_base, merge = SAVE_MODES[mode]
    fields = asdict(lora)
    return {
        "bias": fields["bias"], "init_lora_weights": fields["init_lora_weights"], "lora_alpha": fields["lora_alpha"],
        "lora_dropout": fields["lora_dropout"], "lora_rank": fields["lora_rank"], "r": fields["lora_rank"],
        "merge_lora": merge, "save_lora_base": save_base, "modules_to_save": None,
        "save_lora_config_adapter": False, "target_modules": fields["target_modules"],
        "use_rslora": fields["use_rslora"],
    }


def save_lora_checkpoint(model: nn.Module, backend: Backend, root: str | Path, tag: str, mode: str,
                         lora: LoraConfig, extra: dict | None = None, optimizer: dict | None = None,
                         scheduler: dict | None = None, user_content: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns ``<root>/<tag>``.

    For resumable training checkpoints also pass this rank's ``optimizer`` state (written to
    ``optim/<rank file>``), the ``scheduler`` state and ``user_content`` (step, data position,
    RNG), as NxD lays them out (``scheduler.pt``, ``user_content.pt``).
    """
    root = Path(root)
    staging = root / f".{tag}.partial"
    final = root / tag
    if backend.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        mark_started(staging)
    backend.barrier()
    state = rank_state_for_mode(model, mode)
    if model.parallel_state.get_data_parallel_rank() == 0:
        path = rank_path(staging, backend.tp_rank)
        write_json(path.with_suffix(".pt.json"), save_rank_file(state, path))
        if optimizer is not None:
            save_rank_file(optimizer, staging / "optim" / path.name)
    backend.barrier()
    if backend.rank == 0:
        files = {}
        for rank in range(backend.tp_size):
            path = rank_path(staging, rank)
            sidecar = path.with_suffix(".pt.json")
            files[str(path.relative_to(staging))] = json.loads(sidecar.read_text())
            sidecar.unlink()
        manifest = {
            "format_version": FORMAT_VERSION, "written_by": "nxd-lora train", "kind": "lora", "tag": tag,
            "save_mode": mode, "lora": asdict(lora), "config": model.config.to_hf_dict(), "tp": backend.tp_size,
            "pp": 1, "kv_size_multiplier": model.kv_size_multiplier, "kv_layout": "trn1",
            "fuse_qkv": model.fuse_qkv, "fuse_gate_up": True,
            "dtype": str(next(p for n, p in model.named_parameters() if "lora_" not in n).dtype).removeprefix("torch."),
            "files": files, **(extra or {}),
        }
        write_manifest(staging, manifest)
        for name, content in (("scheduler.pt", scheduler), ("user_content.pt", user_content)):
            if content is not None:
                save_rank_file(content, staging / name)
        write_json(staging / "adapter_config.json", nxd_adapter_config(lora, mode), sort_keys=True)
        mark_done(staging)
        replace_directory(staging, final)
    backend.barrier()
    return final

