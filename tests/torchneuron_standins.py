"""TorchNeuron's registrations as stand-ins, so the ``torchneuron`` backend's own logic runs in CI.

TorchNeuron (``torch-neuronx`` 2.13/2.14, Neuron SDK >= 2.33) is not installable here. What the
backend relies on is what ``import torch_neuronx`` registers with PyTorch, per the Neuron docs:

* a torch.distributed backend named ``"neuron"``: here one that builds gloo process groups, through
  PyTorch's own ``Backend.register_backend`` (so every group, TP/DP/kv-shared, goes through it);
* a ``torch.compile`` backend named ``"neuron"``: here ``aot_eager`` (AOTAutograd's forward and
  backward graphs, run eagerly), registered through ``torch._dynamo.register_backend``;
* PyTorch's PrivateUse1 device renamed ``"neuron"``. A PrivateUse1 device without kernels cannot hold
  a tensor, so this one thing is not emulated: ``install`` points the backend's device type at the CPU.

``CALLS`` records which stand-in ran (process groups created, graphs compiled), so a test can tell
that the backend used them and not gloo or inductor directly.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

import nxd_standins

TORCH_NEURONX_VERSION = {"2.13": "2.13.3", "2.14": "2.14.3"}  # SDK 2.34's builds, per the Neuron docs
CALLS: list[str] = []


def family() -> str | None:
    """The TorchNeuron family of the installed torch (2.13 or 2.14), or None (e.g. torch 2.9)."""
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return major_minor if major_minor in TORCH_NEURONX_VERSION else None


def _gloo_group(store, rank: int, size: int, timeout):
    CALLS.append("process_group")
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _compile(graph_module, example_inputs):
    CALLS.append("compile")
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("aot_eager")(graph_module, example_inputs)


def install_modules() -> None:
    """A stand-in ``torch_neuronx`` in ``sys.modules`` and its two registrations (once per process)."""
    module = types.ModuleType("torch_neuronx")
    module.__version__ = TORCH_NEURONX_VERSION.get(family() or "", "2.14.3")
    sys.modules["torch_neuronx"] = module
    if not dist.is_backend_available("neuron"):
        dist.Backend.register_backend("neuron", _gloo_group, devices=["cpu"])
    from torch._dynamo import list_backends, register_backend

    if "neuron" not in list_backends(exclude_tags=()):
        register_backend(_compile, name="neuron")


def install(work_dir: Path, neuron_cores: int = 8) -> None:
    """Everything a process needs to run the torchneuron backend here: the modules, a trn2 host's
    neuron-ls (logical cores), torch-neuronx's distribution metadata, and the CPU as device."""
    from nxd_lora.backends import torchneuron

    install_modules()
    work_dir = work_dir / f"rank{os.environ.get('RANK', '0')}"  # ranks install at once: files of their own
    versions = {"torch-neuronx": sys.modules["torch_neuronx"].__version__}
    sys.path.insert(0, str(nxd_standins.write_stack_metadata(work_dir / "site", versions)))
    bin_dir = nxd_standins.write_neuron_ls(work_dir / "bin", neuron_cores, cores_per_device=4,
                                           memory_size=96 * 2**30, logical_neuroncore_config=2)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    torchneuron.TorchNeuronBackend.device_type = "cpu"
