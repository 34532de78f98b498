"""The embedded demo: a tiny random Llama, sharded to TP ranks, LoRA-tuned to memorise a batch.

Needs no downloads. It exercises the real pieces end to end: NxD rank files written
atomically, per-rank loading, LoRA on ``qkv_proj``, vocab-parallel loss, and AdamW on the
adapter only. (The Lightning trainer, tokenizers and bundled dataset replace the synthetic
batch when they land.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from checkpoint_tools.atomic_io import save_tensors
from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from checkpoint_tools.tp_layout import expected_hf_shapes, shard_hf_state_dict
from nxd_lora.backends import get_backend
from nxd_lora.local_launch import spawn_ranks
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.model import describe_trainable, lora_parameters, lora_state_dict
from nxd_lora.model.builder import build_model

DEMO_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=128,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32},
)


def random_hf_state(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random HF-layout Llama state dict (norms at 1, weights N(0, 0.05))."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.05
        for key, shape in expected_hf_shapes(config).items()
    }


def rank_file(root: Path, tp_rank: int) -> Path:
    """NxD's per-rank file name under ``<root>/model/``."""
    return Path(root) / "model" / f"dp_rank_00_tp_rank_{tp_rank:02d}_pp_rank_00.pt"


def train_rank(config_dict: dict, tp: int, backend_name: str, root: str, steps: int, lr: float, seed: int) -> dict:
    """One rank of the demo; returns the loss curve (identical on every rank)."""
    config = LlamaConfig.from_dict(config_dict)
    backend = get_backend(backend_name)
    backend.setup(tp, check_tensor_parallel(config, tp))
    try:
        # Each rank writes its own shard of the (seeded, identical everywhere) random model,
        # then reads it back through the same path a converted checkpoint takes.
        shard = shard_hf_state_dict(random_hf_state(config, seed), config, tp)[backend.tp_rank]
        save_tensors(shard, rank_file(Path(root), backend.tp_rank))
        lora = LoraConfig(lora_rank=8, lora_alpha=16, target_modules=["qkv_proj"])
        base = backend.load_rank_tensors(rank_file(Path(root), backend.tp_rank))
        model = build_model(config, backend, base, lora, seed=seed)
        if backend.rank == 0:
            print(f"[demo] backend={backend.name} world={backend.world_size} tp={tp} "
                  f"kv_size_multiplier={model.kv_size_multiplier}; {describe_trainable(model)}", flush=True)
        gen = torch.Generator().manual_seed(seed + backend.rank // tp)  # same batch on the ranks of a TP group
        batch = torch.randint(0, config.vocab_size, (4, 32), generator=gen).to(backend.device)
        optimizer = torch.optim.AdamW(lora_parameters(model), lr=lr, weight_decay=0.0)
        losses = []
        for step in range(steps):
            _, loss = model(batch, labels=batch)
            loss.backward()
            backend.optimizer_step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if backend.rank == 0 and (step % 10 == 0 or step == steps - 1):
                print(f"[demo] step {step:3d}  loss {losses[-1]:.4f}", flush=True)
        backend.save_rank_tensors(lora_state_dict(model), Path(root) / "adapter" / rank_file(Path(""), backend.tp_rank))
        backend.barrier()
        return {"losses": losses}
    finally:
        backend.teardown()


def run_demo(tp: int = 2, steps: int = 60, lr: float = 3e-2, backend: str = "cpu", output: str = "demo_output",
             seed: int = 0) -> list[float]:
    """Write a TP checkpoint of a random tiny Llama, LoRA-train it on ``tp`` ranks, return the losses.

    Under torchrun (WORLD_SIZE set) this process is one rank; otherwise ranks are spawned.
    """
    config = LlamaConfig.from_dict(DEMO_CONFIG)
    check_tensor_parallel(config, tp)
    args = (DEMO_CONFIG, tp, backend, str(Path(output).resolve()), steps, lr, seed)
    start = time.perf_counter()
    launched = "WORLD_SIZE" in os.environ
    losses = train_rank(*args)["losses"] if launched else spawn_ranks(train_rank, tp, *args)[0]["losses"]
    if int(os.environ.get("RANK", "0")) == 0:
        drop = 100 * (1 - losses[-1] / losses[0])
        print(f"[demo] loss {losses[0]:.4f} -> {losses[-1]:.4f} ({drop:.0f}% lower) in "
              f"{time.perf_counter() - start:.1f}s; base and adapter rank files under {output}/", flush=True)
    return losses
