"""Build this rank's Llama (optionally with LoRA) on a backend from full or per-rank weights."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from checkpoint_tools.atomic_io import load_tensors
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_format import check_manifest, manifest_config, rank_path
from checkpoint_tools.tp_layout import shard_hf_state_dict
from nxd_lora.backends.base import Backend
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.model import apply_lora, load_base_state_dict, load_lora_state_dict
from nxd_lora.model.llama import LlamaForCausalLM


def build_model(
    config: LlamaConfig,
    backend: Backend,
    base_state: dict[str, torch.Tensor] | None = None,
    lora: LoraConfig | None = None,
    fuse_qkv: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LlamaForCausalLM:
    """The local model of this TP rank, on ``backend.device``.

    ``base_state`` is this rank's NxD state dict (as stored in a rank file). LoRA, when
    given, is applied after the base weights are loaded so that the base is frozen.
    """
    torch.manual_seed(seed)
    # On a GPU the parameters are created there: no host copy of the whole model.
    on_device = torch.device(backend.device) if backend.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        model = LlamaForCausalLM(config, tp_size=backend.tp_size, fuse_qkv=fuse_qkv, dtype=dtype,
                                 layers=backend.layers)
        if base_state is not None:
            load_base_state_dict(model, base_state)
        if lora is not None:
            apply_lora(model, lora, seed=seed, layers=backend.layers)
    return model.to(backend.device)


def rank_state_from_hf(hf_state: dict[str, torch.Tensor], config: LlamaConfig, backend: Backend,
                       fuse_qkv: bool = False) -> dict[str, torch.Tensor]:
    """Shard a full HF state dict in memory (in the backend's KV layout) and keep this rank's part
    (small models and tests)."""
    return shard_hf_state_dict(hf_state, config, backend.tp_size, fuse_qkv, backend.kv_layout)[backend.tp_rank]


def build_trained_model(base_tag: str | Path, lora_tag: str | Path | None, backend: Backend) -> LlamaForCausalLM:
    """This rank's model from a converted base tag plus, when given, a trained ``adapter`` (or
    ``base+adapter``) tag, on an already set-up ``backend``: the model as training left it, for evaluation."""
    lora_manifest = check_manifest(Path(lora_tag), kv_layout=backend.kv_layout) if lora_tag is not None else None
    expected = {"fuse_qkv": lora_manifest["fuse_qkv"]} if lora_manifest else {}
    manifest = check_manifest(Path(base_tag), tp=backend.tp_size, kv_layout=backend.kv_layout, **expected)
    config = manifest_config(manifest, Path(base_tag))
    lora = LoraConfig(**lora_manifest["lora"]) if lora_manifest else None
    model = build_model(config, backend, load_tensors(rank_path(base_tag, backend.tp_rank)), lora,
                        fuse_qkv=manifest["fuse_qkv"])
    if lora_tag is not None:
        adapter = load_tensors(rank_path(lora_tag, backend.tp_rank))
        load_lora_state_dict(model, {k: v for k, v in adapter.items() if "lora_" in k}, str(lora_tag))
    return model.eval()
