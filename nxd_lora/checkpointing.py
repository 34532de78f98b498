"""Saving a LoRA model as an NxD checkpoint tag, in NxD's three LoRA save modes.

* ``adapter``       (save_lora_base=False, merge_lora=False): only ``lora_A``/``lora_B``.
* ``base+adapter``  (save_lora_base=True,  merge_lora=False): everything, base under ``base_layer``.
* ``merged``        (save_lora_base=True,  merge_lora=True):  base weights with ``B @ A * scaling``
  added, under plain names, i.e. a base checkpoint that loads without LoRA.

Every rank first checks that the filesystem can hold the whole tag. Rank 0 removes the
staging litter of crashed runs and creates ``<root>/.<tag>.partial/`` with its owner record;
all ranks write into it; after a barrier rank 0 checks that every rank's file arrived, writes
the manifest, ``adapter_config.json`` and ``done`` (NxD's markers), then swaps the directory
onto ``<root>/<tag>``. A failed or interrupted save leaves the previous tags untouched, and a
rank that fails (a full disk, say) makes the save fail on every rank instead of hanging them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from checkpoint_tools.atomic_io import write_json
from checkpoint_tools.diskspace import is_out_of_space, out_of_space_error, require_free_space
from checkpoint_tools.nxd_format import FORMAT_VERSION, mark_done, mark_started, rank_path, save_rank_file, write_manifest
from checkpoint_tools.staging import replace_directory, start_staging, sweep_stale
from nxd_lora.backends.base import Backend
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.layers import LoraLayer
from nxd_lora.lora.model import lora_state_dict

class SaveFailed(RuntimeError):
    """A collective save that one of the ranks could not complete; earlier tags are intact."""


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


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state dict, e.g. an optimizer's."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def planned_save_bytes(model: nn.Module, tp_size: int, modes: list[str], periodic_saves: int) -> int:
    """What a run will write: ``periodic_saves`` resumable adapter tags (adapter + AdamW's two fp32
    moments) and one tag per final save mode; every TP rank holds equal shapes."""
    lora = tensor_bytes(lora_state_dict(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    per_rank = {"adapter": lora, "base+adapter": tensor_bytes(model.state_dict()),
                "merged": tensor_bytes({k: v for k, v in model.state_dict().items() if "lora_" not in k})}
    return tp_size * (periodic_saves * (lora + 2 * trainable) + sum(per_rank[m] for m in modes))


def save_lora_checkpoint(model: nn.Module, backend: Backend, root: str | Path, tag: str, mode: str,
                         lora: LoraConfig, extra: dict | None = None, optimizer: dict | None = None,
                         scheduler: dict | None = None, user_content: dict | None = None,
                         log: Callable[[str], None] = print) -> Path:
    """Collective: every rank calls it. Returns ``<root>/<tag>``.

    For resumable training checkpoints also pass this rank's ``optimizer`` state (written to
    ``optim/<rank file>``), the ``scheduler`` state and ``user_content`` (step, data position,
    RNG), as NxD lays them out (``scheduler.pt``, ``user_content.pt``).
    """
    root = Path(root)
    staging = root / f".{tag}.partial"
    final = root / tag
    state = rank_state_for_mode(model, mode)
    require_free_space(root, backend.tp_size * (tensor_bytes(state) + tensor_bytes(optimizer)), f"checkpoint {tag}")
    if backend.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale(root, log)
        start_staging(staging)
        mark_started(staging)
    backend.barrier()
    failure: BaseException | None = None
    if model.parallel_state.get_data_parallel_rank() == 0:
        try:
            path = rank_path(staging, backend.tp_rank)
            written = {str(path.relative_to(staging)): save_rank_file(state, path)}
            if optimizer is not None:
                optim = staging / "optim" / path.name
                written[str(optim.relative_to(staging))] = save_rank_file(optimizer, optim)
            write_json(path.with_suffix(".pt.json"), written)  # the sidecar says "arrived"
        except Exception as err:
            failure = err
    backend.barrier()
    if backend.rank == 0:
        try:
            if failure is None:
                _publish(staging, final, backend.tp_size, {
                    "format_version": FORMAT_VERSION, "written_by": "nxd-lora train", "kind": "lora", "tag": tag,
                    "save_mode": mode, "lora": asdict(lora), "config": model.config.to_hf_dict(),
                    "tp": backend.tp_size, "pp": 1, "kv_size_multiplier": model.kv_size_multiplier,
                    "kv_layout": backend.kv_layout, "fuse_qkv": model.fuse_qkv, "fuse_gate_up": True,
                    "dtype": str(next(p for n, p in model.named_parameters() if "lora_" not in n).dtype)
                    .removeprefix("torch."), **(extra or {}),
                }, {"scheduler.pt": scheduler, "user_content.pt": user_content}, lora, mode)
        except Exception as err:
            failure = err
        if failure is not None:
            shutil.rmtree(staging, ignore_errors=True)
    backend.barrier()
    if failure is not None:
        if is_out_of_space(failure):
            raise out_of_space_error(failure, final, f"checkpoint {tag}") from failure
        raise failure
    return final


def _publish(staging: Path, final: Path, tp_size: int, manifest: dict, extras: dict[str, dict | None],
             lora: LoraConfig, mode: str) -> None:
    """Rank 0, after every rank has written: manifest, NxD's side files, ``done``, then the swap."""
    files = {}
    for rank in range(tp_size):
        path = rank_path(staging, rank)
        sidecar = path.with_suffix(".pt.json")
        if not sidecar.is_file():
            raise SaveFailed(f"{final}: TP rank {rank} did not write {path.name} (its error is in its own log); "
                               f"the save was abandoned and earlier checkpoints are intact")
        files.update(json.loads(sidecar.read_text()))
        sidecar.unlink()
    write_manifest(staging, dict(manifest, files=files))
    for name, content in extras.items():
        if content is not None:
            save_rank_file(content, staging / name)
    write_json(staging / "adapter_config.json", nxd_adapter_config(lora, mode), sort_keys=True)
    mark_done(staging)
    replace_directory(staging, final)
