"""The backend interface: one object per runtime that the trainer and model talk to.

A backend sets up the process groups, names the device, supplies the tensor-parallel
layer classes (``layers``), and owns the few operations that differ by runtime: the
optimizer step, barriers and per-rank tensor files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from checkpoint_tools.atomic_io import load_tensors, save_tensors


class BackendUnavailable(RuntimeError):
    """The runtime a backend needs is not installed or has no device here."""


class Backend(ABC):
    name: str
    kv_layout: str = "trn1"  # of the checkpoint being trained, set by ``setup``; saves record it
    compile_backend: str | None = None    # torch.compile's backend for train.compile (None: refused)
    autocast_dtype: torch.dtype | None = None  # what train.autocast=auto means here (None: no autocast)

    @abstractmethod
    def setup(self, tp_size: int, kv_size_multiplier: int = 1, kv_layout: str = "trn1") -> None:
        """Join the process group (torchrun's env:// variables, or a single process) and build TP groups
        (the kv-shared ones for the checkpoint's ``kv_layout``, trn1 or trn2)."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    def layers(self) -> SimpleNamespace:
        """ParallelEmbedding, ColumnParallelLinear, RowParallelLinear, GQAQKVColumnParallelLinear,
        parallel_cross_entropy, gather_from_tensor_model_parallel_region, state: our eager layers
        unless a backend brings its own (Neuron: neuronx_distributed's)."""
        from nxd_lora import parallel

        return SimpleNamespace(**{name: getattr(parallel, name) for name in parallel.__all__})

    @property
    def rank(self) -> int:
        """Global rank (0 without a process group)."""
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def tp_rank(self) -> int:
        return self.layers.state.get_tensor_model_parallel_rank()

    @property
    def tp_size(self) -> int:
        return self.layers.state.get_tensor_model_parallel_size()

    @abstractmethod
    def barrier(self) -> None: ...

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def step_end(self) -> None:
        """Called after every optimizer step (XLA backends cut and run the step graph here)."""

    def save_rank_tensors(self, state: dict, path: str | Path) -> None:
        """Atomically save this rank's tensors (moved to the CPU first)."""
        save_tensors(state, path)

    def load_rank_tensors(self, path: str | Path) -> dict:
        """Load a rank file (weights only) onto this backend's device."""
        return {k: v.to(self.device) for k, v in load_tensors(path).items()}

    @abstractmethod
    def teardown(self) -> None: ...
