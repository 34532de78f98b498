"""``xla``: torch-xla on the CPU (PJRT_DEVICE=CPU), one process, TP=1.

It runs the lazy-tensor path the Neuron backend uses (graphs traced per step, executed at
``torch_xla.sync()``), so graph discipline is testable without Neuron hardware: fixed shapes,
one compiled step graph after warm-up, no host transfers inside a step. Multi-process
collectives do not work on CPU XLA (every process sees world size 1), hence TP=1 only.
torch-xla must be imported before the process first runs autograd (PyTorch sizes its
autograd device queues then), which the ``nxd-lora train`` process does.
"""

from __future__ import annotations

import importlib
import os

import torch

from nxd_lora.backends.base import Backend, BackendUnavailable
from nxd_lora.parallel import state


class XlaBackend(Backend):
    name = "xla"
    pjrt_device: str | None = "CPU"  # None: leave it to the runtime's plugin (torch-neuronx)

    def __init__(self) -> None:
        if self.pjrt_device:
            os.environ.setdefault("PJRT_DEVICE", self.pjrt_device)
        try:
            self.torch_xla = importlib.import_module("torch_xla")
            self.metrics = importlib.import_module("torch_xla.debug.metrics")
        except ImportError as err:
            raise BackendUnavailable(f"backend 'xla' needs torch-xla ({err}): pip install 'nxd-lora[xla]'") from None
        self.step_stats: list[dict[str, int]] = []

    def setup(self, tp_size: int, kv_size_multiplier: int = 1, kv_layout: str = "trn1") -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != 1 or tp_size != 1:
            raise ValueError(f"backend 'xla' runs one process with tp=1 (got WORLD_SIZE={world}, tp={tp_size}): "
                             "collectives do not work on CPU XLA; use backend 'cpu' for multi-rank TP")
        state.initialize_model_parallel(1, kv_size_multiplier)
        self.kv_layout = kv_layout

    @property
    def device(self) -> torch.device:
        return self.torch_xla.device()

    def barrier(self) -> None:
        pass

    def step_end(self) -> None:
        """Cut and run the step's graph; record the compile and host-transfer counters."""
        self.torch_xla.sync()
        counts = {}
        for metric, key in (("CompileTime", "compiles"), ("TransferFromDeviceTime", "host_transfers")):
            data = self.metrics.metric_data(metric)
            counts[key] = int(data[0]) if data else 0
        self.step_stats.append(counts)

    def teardown(self) -> None:
        state.destroy_model_parallel()
