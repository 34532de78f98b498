"""Apply LoRA to a tensor-parallel model, freeze the base, and load base weights under LoRA."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from nxd_lora import parallel
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.layers import (
    LoraColumnParallelLinear,
    LoraGQAQKVParallelLinear,
    LoraLayer,
    LoraRowParallelLinear,
    module_seed,
)


def _wrapper_for(module: nn.Module, layers: SimpleNamespace):
    # The GQA class is checked first: on some backends it derives from ColumnParallelLinear.
    if isinstance(module, layers.GQAQKVColumnParallelLinear):
        return LoraGQAQKVParallelLinear
    if isinstance(module, layers.ColumnParallelLinear):
        return LoraColumnParallelLinear
    if isinstance(module, layers.RowParallelLinear):
        return LoraRowParallelLinear
    return None


def apply_lora(model: nn.Module, config: LoraConfig, seed: int = 0, layers: SimpleNamespace | None = None) -> nn.Module:
    """Wrap every target module in place, freeze all non-LoRA parameters, return ``model``."""
    layers = layers or parallel
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in config.target_modules
    ]
    found = {name.rsplit(".", 1)[-1] for name, _ in targets}
    missing = [t for t in config.target_modules if t not in found]
    if missing:
        raise ValueError(f"LoRA target_modules {missing} not found in the model")
    for name, module in targets:
        wrapper = _wrapper_for(module, layers)
        if wrapper is None:
            raise TypeError(f"{name}: cannot apply LoRA to {type(module).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper(module, config, layers, module_seed(name, seed)))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the whole unsharded model, replicas counted once.

    Counted from the config and the LoRA shapes rather than from local tensors, so every
    rank prints the same numbers whatever the TP size and KV replication.
    """
    trainable = sum(m.logical_lora_numel() for m in model.modules() if isinstance(m, LoraLayer))
    cfg = model.config
    h, hd, inter, n = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_hidden_layers
    attn = h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_layer = attn + 3 * h * inter + 2 * h
    base = n * per_layer + h + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return trainable, base + trainable


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def load_base_state_dict(model: nn.Module, rank_state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load a rank's base weights (NxD names, no ``base_layer``) into a model that may carry LoRA.

    Every base parameter must be present with its exact shape; LoRA parameters keep their
    initial values. Errors name the key, the expected and the found shape.
    """
    own = model.state_dict()
    remapped: dict[str, torch.Tensor] = {}
    for key in own:
        if "lora_" in key:
            continue
        ckpt_key = key.replace(".base_layer.", ".")
        if ckpt_key not in rank_state_dict:
            if key == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            raise KeyError(f"{source}: missing key {ckpt_key!r}")
        tensor = rank_state_dict[ckpt_key]
        if tensor.shape != own[key].shape:
            raise ValueError(
                f"{source}: {ckpt_key} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)} "
                f"for tp={getattr(model, 'tp_size', 1)}"
            )
        remapped[key] = tensor
    expected = {k.replace(".base_layer.", ".") for k in own if "lora_" not in k}
    unknown = sorted(set(rank_state_dict) - expected)
    if unknown:
        raise KeyError(f"{source}: unexpected keys {unknown[:5]}")
    model.load_state_dict(remapped, strict=False)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors under NxD's key names."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model: nn.Module, rank_state_dict: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Load this rank's adapter tensors; every LoRA key must be present with its exact shape."""
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(rank_state_dict))
    unknown = sorted(set(rank_state_dict) - set(own))
    if missing or unknown:
        raise KeyError(f"{source}: adapter keys do not match the model (missing {missing[:3]}, unexpected {unknown[:3]})")
    for key, tensor in rank_state_dict.items():
        if tensor.shape != own[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}")
    model.load_state_dict(rank_state_dict, strict=False)
