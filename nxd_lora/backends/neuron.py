"""Trainium backend: torch-neuronx, torch-xla and neuronx-distributed (NxD).

Every import of ``torch_neuronx`` and ``neuronx_distributed`` in the project lives in this
module, and happens only when the backend is constructed, so everything else imports on a
machine without them. The training path itself lands with the Trainium issue; until then
constructing the backend checks the stack and says what is missing.
"""

from __future__ import annotations

import importlib

from nxd_lora.backends.base import BackendUnavailable

NEURON_PIP_REPOSITORY = "https://pip.repos.neuron.amazonaws.com"
NEURON_SDK = "2.28"
NEURON_TORCH = "2.9"


def import_neuron_stack() -> tuple[object, object]:
    """Import (torch_neuronx, neuronx_distributed) or raise naming the Neuron pip repository."""
    missing = []
    modules = []
    for name in ("torch_neuronx", "neuronx_distributed"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise BackendUnavailable(
            f"backend 'neuron' needs {', '.join(missing)}. These packages are not on PyPI: install them "
            f"on a Neuron machine (Neuron SDK {NEURON_SDK}, PyTorch {NEURON_TORCH}) from the Neuron pip "
            f"repository: pip install --extra-index-url {NEURON_PIP_REPOSITORY} 'nxd-lora[neuron]'"
        )
    return modules[0], modules[1]


class NeuronBackend:
    name = "neuron"

    def __init__(self) -> None:
        self.torch_neuronx, self.nxd = import_neuron_stack()
        raise BackendUnavailable(
            "backend 'neuron': the Neuron stack imports, but the NxD training path is not implemented yet "
            "in this version of nxd-lora; use backend 'cpu' or 'cuda'"
        )
