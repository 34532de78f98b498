"""Build this rank's Llama (optionally with LoRA) on a backend from full or per-rank weights."""

from __future__ import annotations

import contextlib

import torch

from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.tp_layout import shard_hf_state_dict
from nxd_lora.backends.base import Backend
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.model import apply_lora, load_base_state_dict
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
    """Shard a full HF state dict in memory and keep this rank's part (small models and tests)."""
    return shard_hf_state_dict(hf_state, config, backend.tp_size, fuse_qkv)[backend.tp_rank]
