"""Functions run on spawned ranks by the tests (importable by name in the children)."""

from __future__ import annotations

from functools import partial

import torch

from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from checkpoint_tools.tp_layout import shard_lora_state_dict
from nxd_lora.backends import get_backend
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.model import apply_lora, describe_trainable, load_lora_state_dict, lora_parameters
from nxd_lora.model.builder import build_model, rank_state_from_hf
from nxd_lora.parallel import parallel_linear_cross_entropy


def forward_backward(config_dict: dict, tp: int, hf_state: dict, input_ids: torch.Tensor, labels: torch.Tensor,
                     fuse_qkv: bool, lora_kwargs: dict, hf_lora: dict | None = None, kv_layout: str = "trn1",
                     backend_name: str = "cpu", variants: bool = True) -> dict:
    """Base logits; then with LoRA applied: logits (gathered), loss, this rank's LoRA params and grads;
    and (``variants``) loss + grads again from the chunked logits-free loss under each
    activation-checkpointing mode."""
    config = LlamaConfig.from_dict(config_dict)
    backend = get_backend(backend_name)
    backend.setup(tp, check_tensor_parallel(config, tp), kv_layout)
    try:
        model = build_model(config, backend, rank_state_from_hf(hf_state, config, backend, fuse_qkv), None, fuse_qkv)
        with torch.no_grad():
            base_logits, base_loss = model(input_ids, labels=labels, gather_logits=True)
        apply_lora(model, LoraConfig(**lora_kwargs), layers=backend.layers)
        if hf_lora is not None:
            load_lora_state_dict(model, shard_lora_state_dict(hf_lora, config, tp, fuse_qkv, kv_layout)[backend.tp_rank])
        logits, loss = model(input_ids, labels=labels, gather_logits=True)
        loss.backward()
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert list(named.values()) == lora_parameters(model)
        result = {
            "base_logits": base_logits,
            "base_loss": base_loss,
            "trainable": describe_trainable(model),
            "logits": logits.detach(),
            "loss": loss.detach(),
            "lora": {n: p.detach() for n, p in named.items()},
            "grads": {n: p.grad for n, p in named.items()},
            "variants": {},
        }
        # chunk=7 does not divide the 48 tokens: several chunks and a ragged last one.
        model._linear_cross_entropy = partial(parallel_linear_cross_entropy, chunk=7)
        for mode in ("none", "mlp", "full") if variants else ():
            model.zero_grad(set_to_none=True)
            model.set_activation_checkpointing(mode)
            no_logits, loss = model(input_ids, labels=labels, return_logits=False)
            loss.backward()
            result["variants"][mode] = {"logits": no_logits, "loss": loss.detach(),
                                        "grads": {n: p.grad for n, p in named.items()}}
        return result
    finally:
        backend.teardown()


def train_steps(model, optimizer, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` optimizer steps on the causal-LM loss of ``input_ids``; then the gathered logits."""
    for _ in range(steps):
        _, loss = model(input_ids, labels=input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        logits, _ = model(input_ids, gather_logits=True)
    return logits


def train_and_save(base_dir: str, out_root: str, tp: int, lora_kwargs: dict, input_ids: torch.Tensor,
                   steps: int = 3) -> dict:
    """Load converted rank files, LoRA-train a few steps, save in all three modes; return the logits."""
    from checkpoint_tools.nxd_format import check_manifest, manifest_config, rank_path
    from nxd_lora.checkpointing import SAVE_MODES, save_lora_checkpoint
    from nxd_lora.lora.model import lora_parameters as params_of

    manifest = check_manifest(f"{base_dir}/pretrained_weight", tp=tp)
    config = manifest_config(manifest, base_dir)
    backend = get_backend("cpu")
    backend.setup(tp, manifest["kv_size_multiplier"], manifest["kv_layout"])
    try:
        lora = LoraConfig(**lora_kwargs)
        base = backend.load_rank_tensors(rank_path(f"{base_dir}/pretrained_weight", backend.tp_rank))
        model = build_model(config, backend, base, lora, fuse_qkv=manifest["fuse_qkv"])
        logits = train_steps(model, torch.optim.AdamW(params_of(model), lr=0.05), input_ids, steps)
        for mode in SAVE_MODES:
            save_lora_checkpoint(model, backend, f"{out_root}/{mode.replace('+', '_')}", "step_3", mode, lora)
        return {"logits": logits}
    finally:
        backend.teardown()

