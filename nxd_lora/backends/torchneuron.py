"""``torchneuron``: TorchNeuron (Neuron SDK >= 2.33, PyTorch 2.13/2.14, trn2/trn3), eager PyTorch on Trainium.

TorchNeuron is XLA/NxD training's successor. ``import torch_neuronx`` (of the 2.13/2.14 family)
registers PyTorch's PrivateUse1 device as ``"neuron"`` and a torch.distributed backend of the same
name, and adds a ``torch.compile`` backend ``"neuron"``. So this backend is the eager ``cpu``/``cuda``
one with three names changed: our own TP layers and LoRA run on device ``neuron:<local rank>``, the
TP/DP/kv-shared groups are built over dist backend ``"neuron"`` exactly as over gloo or NCCL, and a
compiled step (``train.compile``) uses compile backend ``"neuron"``. bf16 autocast is its default
(``train.autocast: auto``): TensorEngine matmuls run in bf16.

NxD checkpoints load unchanged. Our layers compute the same result in either KV layout, but a
Trainium host trains its own platform's layout (trn2's on trn2/trn3) so that what it saves is what
NxD on the same host reads; a checkpoint in the other layout is refused, naming ``--retarget``.

The only import of ``torch_neuronx`` for this stack is in ``__init__``, so everything else imports
without it.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist

from checkpoint_tools.tp_layout import check_layout_matches
from nxd_lora.backends.base import BackendUnavailable
from nxd_lora.backends.torch_distributed import TorchDistributedBackend
from nxd_lora.doctor import TORCHNEURON_SDK, TORCHNEURON_TORCH, neuron_platform
from nxd_lora.instances import layout_of_platform

NEURON_PIP_REPOSITORY = "https://pip.repos.neuron.amazonaws.com"
NAME = "neuron"  # TorchNeuron's device type, dist backend and compile backend


def install_hint() -> str:
    return (f"install TorchNeuron (Neuron SDK >= {TORCHNEURON_SDK}, trn2/trn3, PyTorch {' or '.join(TORCHNEURON_TORCH)}) "
            f"from the Neuron pip repository: pip install --extra-index-url {NEURON_PIP_REPOSITORY} "
            "'nxd-lora[torchneuron]' (torch-neuronx of the family matching torch, e.g. torch-neuronx==2.14.*)")


def check_registered(torch_neuronx) -> None:
    """Raise ``BackendUnavailable`` unless importing torch_neuronx registered dist backend ``neuron``
    (what tells TorchNeuron's torch-neuronx from SDK 2.28's XLA one, which registers none)."""
    if not dist.is_available() or not dist.is_backend_available(NAME):
        version = getattr(torch_neuronx, "__version__", "unknown version")
        raise BackendUnavailable(
            f"backend 'torchneuron': torch_neuronx ({version}) registered no torch.distributed backend "
            f"{NAME!r}, so it is not TorchNeuron (SDK 2.28's XLA torch-neuronx is trained with backend "
            f"'neuron' instead); {install_hint()}")


class TorchNeuronBackend(TorchDistributedBackend):
    name = "torchneuron"
    dist_backend = NAME
    compile_backend = NAME
    autocast_dtype = torch.bfloat16
    device_type = NAME

    def __init__(self) -> None:
        try:
            self.torch_neuronx = importlib.import_module("torch_neuronx")
        except ImportError as err:
            raise BackendUnavailable(f"backend 'torchneuron' needs torch-neuronx ({err}); {install_hint()}") from None
        check_registered(self.torch_neuronx)

    def setup(self, tp_size: int, kv_size_multiplier: int = 1, kv_layout: str = "trn1") -> None:
        platform = neuron_platform()  # runs neuron-ls: once
        check_layout_matches(kv_layout, layout_of_platform(platform), tp_size, kv_size_multiplier,
                             f"the checkpoint (on this {platform} host)")
        super().setup(tp_size, kv_size_multiplier, kv_layout)

    def _bind_device(self) -> None:
        if torch.accelerator.is_available():  # TorchNeuron's device; the stand-ins' CPU has no index
            torch.accelerator.set_device_index(self.device.index)

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type, int(os.environ.get("LOCAL_RANK", "0")))
