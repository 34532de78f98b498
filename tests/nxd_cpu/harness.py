"""Run NxD 0.17's own code (neuronx-distributed, tag v2.28.0) on this CPU, in NxD's CPU mode.

NxD is our test oracle: its converter, parallel layers, GQA qkv layer, parallel cross entropy,
LoRA and checkpoint I/O are what a Trainium user runs, so tests compare our code against them
instead of against our reading of them. NxD cannot be pip-installed here (its PyPI names are
placeholders); the tests take it, in this order, from

1. the installed package (a Neuron host with the SDK 2.28 stack), else
2. the source tree at ``$NXD_SRC`` (``.ci/run`` points it at ``../shared/third_party/
   neuronx-distributed-v2.28.0``), run in NxD's own CPU mode (``NXD_CPU_MODE=1``, gloo) on
   torch 2.9 + torch-xla 2.9 (CPU).

For 2., importing any NxD subpackage runs its top-level ``__init__`` (trace, kernels, MoE),
which imports the compiler-only packages ``torch_neuronx``, ``neuronxcc`` and ``libneuronxla``.
``install()`` provides import stubs for them: every name resolves, but calling one raises
``NeuronStubCalled`` naming it, so a path that would need the compiler fails loudly instead of
computing something else. Only what NxD's CPU path calls works:

* ``torch_neuronx.utils.get_platform_target()`` returns ``$NXD_LORA_TEST_PLATFORM`` (trn1 or
  trn2): NxD chooses its TRN1/TRN2 code paths (KV replication, kv-shared groups) from it;
* while ``install()`` imports NxD, calls made at import time (``nki_jit`` decorators, kernel enums and
  configs) return further stubs; after it, every call raises;
* ``CollectivesConfig`` (``initialize_model_parallel`` constructs one).

Gaps of NxD's CPU mode on torch-xla 2.9 (and transformers 5) are bridged without changing what is
computed (``transformers.utils.fx`` and ``torch.classes.neuron``, only named at import, are stubbed too):

* torch-xla 2.9 has no ``xenv.HOST_WORLD_SIZE`` (the number of hosts), which NxD's
  ``get_local_world_size()`` reads in checkpoint load/save: it is defined, and one host is set;
* ``modules/qkv_linear_utils.py`` sums the K/V gradients of replicated KV heads with
  ``xm.all_reduce`` on the kv-shared replica groups, which does nothing to CPU tensors. That call
  is routed to ``torch.distributed.all_reduce`` over NxD's own kv-shared process group (checked to
  hold the same ranks), the sum NxD computes on Trainium;
* NxD's checkpoint save/load orders its ranks with ``xm.rendezvous`` (a barrier of all workers on
  Trainium), which returns at once here; a rank that runs ahead then takes the tag being written
  for an interrupted one (no ``done`` file yet) and deletes it. In ``trainer/checkpoint.py`` and
  ``trainer/checkpoint_storage.py`` it is a ``torch.distributed`` barrier over all ranks;
* ``LoraModel._replace_module`` moves every new LoRA module to the device ``"xla"`` (NxD's LoRA has
  no CPU mode), which on torch-xla's CPU device would split the model across two devices: during
  that call, ``.to("xla")`` leaves a module where it is (on the CPU, with the rest of the model).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

STUBBED_PACKAGES = ("torch_neuronx", "neuronxcc", "libneuronxla")
PLATFORMS = ("trn1", "trn2")
# NxD's modules, imported (with their compiler-only names stubbed) by ``install``.
NXD_MODULES = ("neuronx_distributed", "neuronx_distributed.modules.qkv_linear", "neuronx_distributed.modules.lora",
               "neuronx_distributed.parallel_layers.loss_functions", "neuronx_distributed.trainer.checkpoint")
_IMPORTING = False  # while install() imports NxD: stubs called at import time give stub values
CLONE_HINT = ("git clone -b v2.28.0 https://github.com/aws-neuron/neuronx-distributed "
              "and set NXD_SRC to that directory (CI: ../shared/third_party/neuronx-distributed-v2.28.0)")


class NeuronStubCalled(RuntimeError):
    """A compiler-only function was called on the CPU path: NxD would need Neuron hardware here."""


def platform() -> str:
    value = os.environ.get("NXD_LORA_TEST_PLATFORM", "trn1")
    if value not in PLATFORMS:
        raise ValueError(f"NXD_LORA_TEST_PLATFORM={value!r}: expected one of {PLATFORMS}")
    return value


class _Stub:
    """Any attribute of a stubbed module: a further stub; calling it raises, except while NxD is imported."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> "_Stub":
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        if _IMPORTING:  # module-level decorators, enums and configs of NxD's kernels: a stub value
            return _Stub(f"{self._name}(...)")
        raise NeuronStubCalled(f"{self._name} was called: it needs the Neuron compiler/runtime, "
                               "which the CPU-mode NxD oracle does not have")

    def __getitem__(self, item) -> "_Stub":
        return _Stub(f"{self._name}[{item!r}]")

    def __mro_entries__(self, bases):
        return (type(self._name.rsplit(".", 1)[-1], (), {}),)

    def __repr__(self) -> str:
        return f"<neuron stub {self._name}>"


class _CollectivesConfig:
    """Stand-in for neuronxcc's ``CollectivesConfig``: ``initialize_model_parallel`` builds one for the
    context-parallel groups and keeps this rank's ring-attention source/target pairs, which only
    ring attention (context parallelism > 1, not exercised) reads: they are stubs."""

    def __init__(self, replica_groups=None, **kwargs):
        self.replica_groups = replica_groups
        self.rank_src_tgt_pairs = _Stub("CollectivesConfig.rank_src_tgt_pairs")


def _get_platform_target(*_args, **_kwargs) -> str:
    return platform()


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")


# transformers 5 removed its torch.fx tracer, which NxD's pipeline-parallel tracing imports at the
# top level (NxD 0.17 was built against transformers 4.x). Pipeline tracing is not exercised here.
_GONE_FROM_TRANSFORMERS = {"transformers.utils.fx"}

_WORKING = {  # the names NxD's CPU path calls
    "torch_neuronx.utils": {"get_platform_target": _get_platform_target},
    "torch_neuronx.utils.utils": {"get_platform_target": _get_platform_target, "SUPPORTED_TYPES": ()},
    "neuronxcc.nki._pre_prod_kernels.collectives": {"CollectivesConfig": _CollectivesConfig},
    "neuronxcc.nki._private_kernels.collectives": {"CollectivesConfig": _CollectivesConfig},
}


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED_PACKAGES or fullname in _GONE_FROM_TRANSFORMERS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__dict__.update(_WORKING.get(spec.name, {}))
        return module

    def exec_module(self, module):
        pass


def nxd_source() -> Path | None:
    """``$NXD_SRC/src`` when it holds NxD's package, else None."""
    root = os.environ.get("NXD_SRC")
    if not root:
        return None
    src = Path(root) / "src"
    return src if (src / "neuronx_distributed" / "__init__.py").is_file() else None


def unavailable_reason() -> str | None:
    """Why NxD's own code cannot run here (None when it can)."""
    if importlib.util.find_spec("torch_xla") is None:
        return "NxD's CPU mode needs torch-xla (PyTorch 2.9 only): the torch 2.9 job runs these tests"
    if nxd_source() is None and importlib.util.find_spec("neuronx_distributed") is None:
        where = os.environ.get("NXD_SRC")
        found = f"NXD_SRC={where} has no src/neuronx_distributed" if where else "NXD_SRC is not set"
        return f"needs NxD 0.17's source ({found}): {CLONE_HINT}"
    return None


_INSTALLED = False


def install() -> None:
    """Make ``import neuronx_distributed`` run NxD's own code in its CPU mode (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    os.environ["NXD_CPU_MODE"] = "1"
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch_xla.core.xla_env_vars as xenv  # before the stubs: torch-xla probes for libneuronxla

    src = nxd_source()
    if src is not None:
        if str(src) not in sys.path:
            sys.path.insert(0, str(src))
        for name in list(_GONE_FROM_TRANSFORMERS):
            try:
                importlib.import_module(name)
                _GONE_FROM_TRANSFORMERS.discard(name)
            except ImportError:
                pass
        sys.meta_path.insert(0, _StubFinder())
        import torch

        # torch-neuronx registers TorchScript classes under torch.classes.neuron; NxD's trace module
        # names one in an annotation evaluated at import time.
        torch.classes.neuron = _Stub("torch.classes.neuron")

    if not hasattr(xenv, "HOST_WORLD_SIZE"):
        xenv.HOST_WORLD_SIZE = "HOST_WORLD_SIZE"
    os.environ.setdefault("HOST_WORLD_SIZE", "1")  # the number of hosts: the tests' ranks share this one
    global _IMPORTING
    _IMPORTING = True
    try:
        for name in NXD_MODULES:
            importlib.import_module(name)
    finally:
        _IMPORTING = False
    if src is not None:
        sys.path.append(str(_distribution_metadata(src)))
    import neuronx_distributed.modules.qkv_linear_utils as qkv_utils

    qkv_utils.xm = _KvSharedAllReduce(qkv_utils.xm)
    import neuronx_distributed.trainer.checkpoint as nxd_checkpoint
    import neuronx_distributed.trainer.checkpoint_storage as nxd_checkpoint_storage

    for module in (nxd_checkpoint, nxd_checkpoint_storage):
        module.xm = _RendezvousIsABarrier(module.xm)
    from neuronx_distributed.modules.lora.model import LoraModel

    LoraModel._replace_module = _modules_stay_on_the_cpu(LoraModel._replace_module)
    _INSTALLED = True


def _modules_stay_on_the_cpu(replace_module):
    """``replace_module`` with ``Module.to("xla")`` a no-op while it runs (see the module docstring)."""
    import functools

    import torch

    @functools.wraps(replace_module)
    def wrapper(*args, **kwargs):
        to = torch.nn.Module.to

        def to_unless_xla(module, *to_args, **to_kwargs):
            return module if to_args == ("xla",) and not to_kwargs else to(module, *to_args, **to_kwargs)

        torch.nn.Module.to = to_unless_xla
        try:
            return replace_module(*args, **kwargs)
        finally:
            torch.nn.Module.to = to

    return wrapper


def _distribution_metadata(src: Path) -> Path:
    """A ``*.dist-info`` naming the source tree's NxD version, so that ``importlib.metadata`` (what
    ``nxd-lora doctor`` and the train command's stack check read) sees the NxD that runs."""
    import re
    import tempfile

    version = re.search(r'__version__\s*=\s*"([^"]+)"', (src / "neuronx_distributed" / "_version.py").read_text())[1]
    site = Path(tempfile.gettempdir()) / f"nxd_lora_nxd_metadata_{version}"
    info = site / f"neuronx_distributed-{version}.dist-info"
    if not (info / "METADATA").is_file():
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: neuronx-distributed\nVersion: {version}\n")
    return site


class _XmProxy:
    """NxD's ``xm`` (torch_xla.core.xla_model) in one NxD module, with one call replaced by a subclass."""

    def __init__(self, xm):
        self._xm = xm

    def __getattr__(self, attr):
        return getattr(self._xm, attr)


class _RendezvousIsABarrier(_XmProxy):
    """``xm`` whose ``rendezvous`` waits for every rank, as it does on Trainium (see the module docstring)."""

    def rendezvous(self, tag, payload=b"", replicas=None):
        import torch.distributed as dist

        if replicas:
            raise NotImplementedError(f"harness routes only rendezvous of all ranks (replicas={replicas})")
        if dist.is_initialized():
            dist.barrier()
        return []


class _KvSharedAllReduce(_XmProxy):
    """``xm`` for ``qkv_linear_utils``: its kv-shared ``all_reduce`` runs over gloo in CPU mode."""

    def all_reduce(self, reduce_type, inputs, scale=1.0, groups=None, pin_layout=True):
        import torch.distributed as dist
        from neuronx_distributed.parallel_layers import parallel_state

        if reduce_type != self._xm.REDUCE_SUM or scale != 1.0:
            raise NotImplementedError(f"harness routes only REDUCE_SUM with scale 1 (got {reduce_type}, {scale})")
        if groups != parallel_state.get_kv_shared_replica_groups():
            raise NotImplementedError(f"harness routes only the kv-shared all-reduce (groups={groups})")
        group = parallel_state.get_kv_shared_group()
        mine = [g for g in groups if dist.get_rank() in g]
        assert len(mine) == 1 and sorted(mine[0]) == sorted(dist.get_process_group_ranks(group)), (mine, group)
        tensors = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        outs = []
        for tensor in tensors:
            out = tensor.clone()
            dist.all_reduce(out, group=group)
            outs.append(out)
        return outs if isinstance(inputs, (list, tuple)) else outs[0]
