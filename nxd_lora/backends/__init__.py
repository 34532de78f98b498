"""Runtimes behind one interface; ``get_backend(name)`` imports only the one asked for."""

from __future__ import annotations

import importlib

from nxd_lora.backends.base import Backend, BackendUnavailable

_BACKENDS = {
    "cpu": ("nxd_lora.backends.torch_distributed", "CpuBackend"),
    "cuda": ("nxd_lora.backends.torch_distributed", "CudaBackend"),
    "neuron": ("nxd_lora.backends.neuron", "NeuronBackend"),
    "torchneuron": ("nxd_lora.backends.torchneuron", "TorchNeuronBackend"),
    "xla": ("nxd_lora.backends.xla", "XlaBackend"),
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """Construct the backend called ``name``; unknown names list the valid ones."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {available_backends()}")
    module_name, class_name = _BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["Backend", "BackendUnavailable", "available_backends", "get_backend"]
