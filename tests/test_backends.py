"""Backend registry, the Neuron stub and import hygiene."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from nxd_lora.backends import BackendUnavailable, get_backend


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose one of \['cpu', 'cuda', 'neuron', 'torchneuron', 'xla'\]"):
        get_backend("tpu")


@pytest.mark.skipif(importlib.util.find_spec("neuronx_distributed") is not None, reason="Neuron packages installed")
def test_neuron_backend_names_the_neuron_pip_repository():
    with pytest.raises(BackendUnavailable, match="pip.repos.neuron.amazonaws.com") as err:
        get_backend("neuron")
    assert "neuronx_distributed" in str(err.value) or "torch_neuronx" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_backend_without_gpu_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        get_backend("cuda")


def _import_all(packages: str) -> set[str]:
    """Top-level modules loaded by importing every module of ``packages`` in a fresh interpreter."""
    code = (
        "import sys, pkgutil, importlib\n"
        f"for name in {packages.split()!r}:\n"
        "    pkg = importlib.import_module(name)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, name + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_everything_imports_without_neuron_packages():
    loaded = _import_all("nxd_lora checkpoint_tools")
    assert not loaded & {"torch_neuronx", "neuronx_distributed"}


def test_checkpoint_tools_need_only_torch_and_safetensors():
    loaded = _import_all("checkpoint_tools")
    assert not loaded & {"lightning", "torch_neuronx", "neuronx_distributed", "nxd_lora", "transformers"}


@pytest.mark.smoke
def test_cpu_backend_single_process():
    backend = get_backend("cpu")
    backend.setup(1)
    try:
        assert (backend.rank, backend.world_size, backend.tp_rank, backend.tp_size) == (0, 1, 0, 1)
        assert backend.device == torch.device("cpu")
        with pytest.raises(ValueError, match="tp=2 does not divide the world size 1"):
            backend.setup(2)
    finally:
        backend.teardown()
