"""Eager PyTorch backends over torch.distributed: ``cpu`` (gloo) and ``cuda`` (NCCL).

Launched by torchrun (or anything that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
or as a single process with TP=1 and no process group at all.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nxd_lora.backends.base import Backend, BackendUnavailable
from nxd_lora.parallel import state


class TorchDistributedBackend(Backend):
    dist_backend: str
    compile_backend = "inductor"

    def setup(self, tp_size: int, kv_size_multiplier: int = 1, kv_layout: str = "trn1") -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self._owns_group = world > 1 and not dist.is_initialized()
        if self._owns_group:  # a group the caller made is the caller's to destroy
            self._bind_device()
            dist.init_process_group(self.dist_backend, init_method="env://")
        if world % tp_size:
            raise ValueError(f"tp={tp_size} does not divide the world size {world} (WORLD_SIZE from the launcher)")
        state.initialize_model_parallel(tp_size, kv_size_multiplier, kv_layout)
        self.kv_layout = kv_layout

    def _bind_device(self) -> None:
        """Hook for backends that pin one device per local rank."""

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def teardown(self) -> None:
        state.destroy_model_parallel()
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()


class CpuBackend(TorchDistributedBackend):
    name = "cpu"
    dist_backend = "gloo"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class CudaBackend(TorchDistributedBackend):
    name = "cuda"
    dist_backend = "nccl"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend 'cuda' needs a CUDA GPU, and torch.cuda.is_available() is False here")

    def _bind_device(self) -> None:
        torch.cuda.set_device(self.device)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
