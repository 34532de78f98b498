"""Trainium backend: torch-neuronx, torch-xla and neuronx-distributed (NxD), Neuron SDK 2.28.

Every import of ``torch_neuronx`` and ``neuronx_distributed`` in the project lives in this
module, and happens only when the backend is constructed, so everything else imports on a
machine without them.

The layer is thin on purpose: the model, the LoRA wrappers and the trainer are the ones
every backend runs; this backend hands them NxD's classes instead of our eager ones:

* process groups: ``torch.distributed`` with torch-xla's ``xla`` backend (torchrun's env),
  then ``parallel_state.initialize_model_parallel``; NxD's GQA layer builds its kv-shared
  groups itself from ``kv_size_multiplier``;
* layers: NxD's ``ParallelEmbedding``, ``ColumnParallelLinear``, ``RowParallelLinear``,
  ``GQAQKVColumnParallelLinear`` and ``gather_from_tensor_model_parallel_region``, whose
  constructor arguments, parameter names and shard layout ours mirror;
* loss: NxD's ``parallel_cross_entropy``, which has no ``ignore_index`` and shifts the
  logits it is given in place, behind an adapter that does both right;
* LoRA: our wrappers over NxD's layers. They produce NxD ``modules.lora``'s keys and
  sharding (``merge_sharded_lora=False``), and avoid three things NxD's ``LoraModel`` does
  on save: flipping ``save_lora_base``/``merge_lora`` off in place, writing
  ``adapter_config.json`` relative to the working directory, and a reload path that
  misses the ``model/`` folder its own save writes;
* the step: the lazy-tensor loop of the ``xla`` backend (``torch_xla.sync()`` per step),
  with Lightning on a single-device strategy per rank in place of ``NeuronXLAStrategy``.

Checkpoints are plain ``torch.save`` rank files in NxD's layout (``nxd.load_checkpoint``
reads them); NxD's xser format is not written.

NxD's own CPU mode (``NXD_CPU_MODE=1``: NxD's layers on CPU tensors, collectives over gloo) is
honoured as NxD honours it: the backend then joins a gloo group, keeps tensors on the CPU, runs
eager steps, and takes the platform (trn1/trn2: KV placement and kv-shared groups) from
``torch_neuronx.utils.get_platform_target()``, the function NxD's own code paths ask. That is how
the tests run this backend on NxD's real code without Trainium (``tests/nxd_cpu/``).
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

from checkpoint_tools.tp_layout import check_layout_matches, kv_head_of_rank
from nxd_lora.backends.base import BackendUnavailable
from nxd_lora.backends.xla import XlaBackend
from nxd_lora.doctor import neuron_platform, nxd_cpu_mode
from nxd_lora.instances import layout_of_platform

NEURON_PIP_REPOSITORY = "https://pip.repos.neuron.amazonaws.com"
NEURON_SDK = "2.28"
NEURON_TORCH = "2.9"

# Where each name of the layer namespace lives in neuronx_distributed (NxD 0.17, SDK 2.28).
NXD_NAMES = {
    "ParallelEmbedding": "neuronx_distributed.parallel_layers.layers",
    "ColumnParallelLinear": "neuronx_distributed.parallel_layers.layers",
    "RowParallelLinear": "neuronx_distributed.parallel_layers.layers",
    "GQAQKVColumnParallelLinear": "neuronx_distributed.modules.qkv_linear",
    "parallel_cross_entropy": "neuronx_distributed.parallel_layers.loss_functions",
    "gather_from_tensor_model_parallel_region": "neuronx_distributed.parallel_layers.mappings",
}
PARALLEL_STATE = "neuronx_distributed.parallel_layers.parallel_state"


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


def masked_cross_entropy(nxd_parallel_cross_entropy):
    """Our ``parallel_cross_entropy(logits, target, ignore_index)`` over NxD's.

    NxD's takes fp32 logits it may modify (it subtracts the row max in place) and has no
    ``ignore_index``: ignored targets are sent as token 0 and their loss is zeroed.
    """

    def parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        ignored = target == ignore_index
        losses = nxd_parallel_cross_entropy(logits.float().clone(), target.masked_fill(ignored, 0))
        return losses.masked_fill(ignored, 0.0)

    return parallel_cross_entropy


class NeuronBackend(XlaBackend):
    name = "neuron"
    pjrt_device = None  # torch-neuronx registers the Neuron PJRT plugin

    def __init__(self) -> None:
        self.torch_neuronx, self.nxd = import_neuron_stack()
        self.cpu_mode = nxd_cpu_mode()
        super().__init__()
        importlib.import_module("torch_xla.distributed.xla_backend")  # registers dist backend "xla"
        self.xm = importlib.import_module("torch_xla.core.xla_model")
        self.parallel_state = importlib.import_module(PARALLEL_STATE)
        names = {name: getattr(importlib.import_module(module), name) for name, module in NXD_NAMES.items()}
        names["parallel_cross_entropy"] = masked_cross_entropy(names["parallel_cross_entropy"])
        self._layers = SimpleNamespace(**names, state=self.parallel_state)

    def setup(self, tp_size: int, kv_size_multiplier: int = 1, kv_layout: str = "trn1") -> None:
        """Join torchrun's process group over the xla backend and build NxD's TP/DP groups.

        ``kv_size_multiplier`` needs no set-up here: NxD's GQA layer creates the kv-shared
        groups when the model is built, for the platform it runs on. So with replicated KV heads
        the checkpoint's ``kv_layout`` must be this platform's, or K/V gradients would be summed
        across ranks that hold different heads; that is refused here.
        """
        platform = self.platform()
        check_layout_matches(kv_layout, layout_of_platform(platform), tp_size, kv_size_multiplier,
                             f"the checkpoint (on this {platform} host)")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % tp_size:
            raise ValueError(f"tp={tp_size} does not divide the world size {world} (WORLD_SIZE from the launcher)")
        self._owns_group = not dist.is_initialized()
        if self._owns_group:  # a group the caller made is the caller's to destroy
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # one process without torchrun
            os.environ.setdefault("MASTER_PORT", "29500")
            if self.cpu_mode:
                os.environ.setdefault("RANK", "0")
                os.environ.setdefault("WORLD_SIZE", "1")
                dist.init_process_group("gloo", init_method="env://")
            else:
                dist.init_process_group("xla", init_method="xla://")
        self.parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
        self.kv_layout = kv_layout
        if kv_size_multiplier > 1:
            try:
                self.check_kv_shared_groups(tp_size, kv_size_multiplier, kv_layout, platform)
            except ValueError:
                self.teardown()
                raise

    def check_kv_shared_groups(self, tp_size: int, kv_size_multiplier: int, kv_layout: str, platform: str) -> None:
        """Refuse to train where NxD's kv-shared groups (the ranks whose K/V gradients its GQA layer
        sums) are not the ranks that hold the same KV head in ``kv_layout``: NxD 0.17 on trn1 at TP 4
        with data parallelism (its TP groups are strided there, its kv-shared groups are not), and on
        platforms it has no KV placement for (trn3). Asked of NxD's own ``arrange_kv_groups``."""
        hardware = importlib.import_module("neuronx_distributed.utils.utils").hardware
        tp_groups = self.parallel_state.get_tensor_model_parallel_replica_groups()
        nxd_groups = self.parallel_state.arrange_kv_groups(len(tp_groups), tp_size, kv_size_multiplier, False,
                                                           hardware(platform))
        n_kv = tp_size // kv_size_multiplier
        wanted = [sorted(group[r] for r in range(tp_size) if kv_head_of_rank(r, tp_size, n_kv, kv_layout) == head)
                  for group in tp_groups for head in range(n_kv)]
        if sorted(map(sorted, nxd_groups)) != sorted(wanted):
            raise ValueError(
                f"NxD on {platform} at tp={tp_size} with kv_size_multiplier "
                f"{kv_size_multiplier} would sum K/V gradients over ranks {nxd_groups}, but the ranks holding the "
                f"same KV head ({kv_layout} layout over its TP groups {tp_groups}) are {wanted}: the K/V LoRA "
                f"gradients would mix different heads. Choose another TP size (NxD's TP groups are strided on trn1 "
                f"only at TP 4), or run without data parallelism")

    def platform(self) -> str:
        """trn1, trn2 or trn3: the host's (neuron-ls, DMI) on Neuron hardware; in NxD's CPU mode the
        target NxD's own code follows, ``torch_neuronx.utils.get_platform_target()``."""
        if self.cpu_mode:
            return str(importlib.import_module("torch_neuronx.utils").get_platform_target())
        return neuron_platform()  # runs neuron-ls: once

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.cpu_mode else super().device

    def step_end(self) -> None:
        if not self.cpu_mode:  # eager in CPU mode: no graph to cut
            super().step_end()

    @property
    def layers(self) -> SimpleNamespace:
        return self._layers

    def barrier(self) -> None:
        if self.cpu_mode:
            dist.barrier()
        else:
            self.xm.rendezvous("nxd-lora")

    def teardown(self) -> None:
        self.parallel_state.destroy_model_parallel()
        destroy_kv_group = getattr(self.parallel_state, "destroy_kv_group", None)
        if destroy_kv_group is not None:  # destroy_model_parallel leaves the kv-shared group
            destroy_kv_group()
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()
