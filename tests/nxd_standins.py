"""NxD's API as recorded from its source, and stand-ins that hold the neuron backend to it.

``neuronx_distributed`` cannot be installed here (it comes from the Neuron pip repository),
so the neuron backend's code would otherwise never run before it reaches a trn1. This file
records the signatures of every NxD name the backend uses, as NxD 0.17.0 (Neuron SDK 2.28,
tag v2.28.0) defines them, and builds stand-in modules from them:

* every stand-in first binds its call to the recorded signature, so an argument NxD does
  not accept (or a missing one) fails here as it would on Trainium;
* then it delegates to our eager implementation (which mirrors NxD's layout), refusing
  NxD arguments that ours does not implement when they are set;
* ``parallel_cross_entropy`` behaves as NxD's does where callers can tell: per-token loss,
  no ``ignore_index``, and the logits it is given shifted in place.

Where the real package is importable, ``test_neuron_backend`` compares these records with
its signatures, so the record cannot drift from NxD unnoticed.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
from torch.nn import init

from nxd_lora import parallel

NXD_VERSION = "0.17.26814"
STACK_VERSIONS = {  # Neuron SDK 2.28.0's Python packages (and the distributions doctor reads)
    "torch-neuronx": "2.9.0.2.12.22436", "neuronx-distributed": NXD_VERSION, "neuronx-cc": "2.23.6484.0",
    "libneuronxla": "2.2.15515.0",
}


# --- NxD 0.17.0 signatures (src/neuronx_distributed/..., tag v2.28.0) ---------------------------------
def ParallelEmbedding(num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                      max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                      sparse: bool = False, init_method: Callable = init.normal_, device=None,
                      dtype: torch.dtype = torch.float32, shard_across_embedding: bool = False, pad: bool = False,
                      sequence_parallel_enabled: bool = False, tensor_model_parallel_group=None,
                      use_spmd_rank: bool = False, sequence_dimension: Optional[int] = None, tile_cc: bool = False,
                      rank_ordering: Optional[list] = None, collect_output: bool = True): ...


def ColumnParallelLinear(input_size: int, output_size: int, bias: bool = True, gather_output: bool = True,
                         dtype: torch.dtype = torch.float32, device=None, stride: int = 1, init_method=None,
                         sequence_parallel_enabled: bool = False, sequence_dimension: Optional[int] = None,
                         keep_master_weight: bool = False, skip_bias_add: bool = False, pad: bool = False,
                         pad_alignment_size_per_rank: int = 1, keep_padded_output: bool = False,
                         tensor_model_parallel_group=None, reduce_dtype: torch.dtype = torch.float32,
                         rank_ordering: Optional[list] = None): ...


def RowParallelLinear(input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False,
                      dtype: torch.dtype = torch.float32, device=None, stride: int = 1, init_method=None,
                      sequence_parallel_enabled: bool = False, sequence_dimension: Optional[int] = None,
                      keep_master_weight: bool = False, skip_bias_add: bool = False, pad: bool = False,
                      reduce_output: bool = True, tensor_model_parallel_group=None,
                      reduce_dtype: torch.dtype = torch.float32, tile_cc: bool = False,
                      rank_ordering: Optional[list] = None): ...


def GQAQKVColumnParallelLinear(input_size: int, output_sizes: List[int], bias: bool = True,
                               gather_output: bool = True, dtype: torch.dtype = torch.float32, device=None,
                               init_method=None, sequence_parallel_enabled: bool = False,
                               keep_master_weight: bool = False, kv_size_multiplier: int = 1, fuse_qkv: bool = True,
                               reduce_dtype: torch.dtype = torch.float32): ...


def parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0): ...


def gather_from_tensor_model_parallel_region(input_, process_group=None): ...


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                              skip_collective_init: bool = False, lnc_size: int = 1, mesh_only: bool = False): ...


def get_tensor_model_parallel_group(as_list: bool = False): ...
def get_data_parallel_group(as_list: bool = False): ...
def get_tensor_model_parallel_size(): ...
def get_tensor_model_parallel_rank(): ...
def get_data_parallel_size(): ...
def get_data_parallel_rank(): ...
def destroy_model_parallel(): ...
def destroy_kv_group(): ...
def model_parallel_is_initialized(): ...


RECORDED = {
    "neuronx_distributed.parallel_layers.layers": [ParallelEmbedding, ColumnParallelLinear, RowParallelLinear],
    "neuronx_distributed.modules.qkv_linear": [GQAQKVColumnParallelLinear],
    "neuronx_distributed.parallel_layers.loss_functions": [parallel_cross_entropy],
    "neuronx_distributed.parallel_layers.mappings": [gather_from_tensor_model_parallel_region],
    "neuronx_distributed.parallel_layers.parallel_state": [
        initialize_model_parallel, get_tensor_model_parallel_group, get_data_parallel_group,
        get_tensor_model_parallel_size, get_tensor_model_parallel_rank, get_data_parallel_size,
        get_data_parallel_rank, destroy_model_parallel, destroy_kv_group, model_parallel_is_initialized,
    ],
}


def recorded_signature(stub: Callable) -> inspect.Signature:
    return inspect.signature(stub)


def real_signature(obj: Any) -> inspect.Signature:
    """A real NxD callable's signature, without ``self`` for classes."""
    if inspect.isclass(obj):
        params = list(inspect.signature(obj.__init__).parameters.values())[1:]
        return inspect.Signature(params)
    return inspect.signature(obj)


# --- stand-ins ---------------------------------------------------------------------------------------
CALLS: list[dict[str, Any]] = []  # every stand-in call: name and bound arguments (for the tests)


def _checked(stub: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind to NxD's signature (TypeError as NxD would raise); return the non-default arguments."""
    bound = recorded_signature(stub).bind(*args, **kwargs)
    CALLS.append({"name": stub.__name__, "args": {k: repr(v) for k, v in bound.arguments.items()
                                                  if not isinstance(v, torch.Tensor)}})
    return dict(bound.arguments)


def _eager_class(stub: Callable, eager: type) -> type:
    """A subclass of our eager layer whose constructor takes exactly NxD's arguments."""
    ours = set(inspect.signature(eager.__init__).parameters) - {"self"}
    defaults = {k: p.default for k, p in recorded_signature(stub).parameters.items()}

    def __init__(self, *args, **kwargs):
        arguments = _checked(stub, args, kwargs)
        unsupported = [k for k in arguments if k not in ours and arguments[k] != defaults[k]]
        if unsupported:
            raise NotImplementedError(f"stand-in {stub.__name__}: {unsupported} not modelled")
        eager.__init__(self, **{k: v for k, v in arguments.items() if k in ours})

    return type(stub.__name__, (eager,), {"__init__": __init__, "__module__": "neuronx_distributed (stand-in)"})


def _function(stub: Callable, implementation: Callable) -> Callable:
    def call(*args, **kwargs):
        return implementation(**_checked(stub, args, kwargs))

    call.__name__ = stub.__name__
    return call


def _nxd_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0):
    """NxD's behaviour: no ignore_index (out-of-shard targets just miss), logits shifted in place."""
    if label_smoothing:
        raise NotImplementedError("stand-in parallel_cross_entropy: label_smoothing not modelled")
    losses = parallel.parallel_cross_entropy(vocab_parallel_logits, target, ignore_index=-(2**62))
    vocab_parallel_logits.data.sub_(vocab_parallel_logits.data.max(dim=-1, keepdim=True).values)
    return losses


def _initialize_model_parallel(tensor_model_parallel_size=1, **others):
    if not torch.distributed.is_initialized():
        raise AssertionError("NxD's initialize_model_parallel asserts torch.distributed.is_initialized()")
    parallel.state.initialize_model_parallel(tensor_model_parallel_size)


def _state_module() -> types.ModuleType:
    state = parallel.state
    impl = {
        "initialize_model_parallel": _initialize_model_parallel,
        "get_tensor_model_parallel_group": lambda as_list=False: state.get_tensor_model_parallel_group(),
        "get_data_parallel_group": lambda as_list=False: state.get_data_parallel_group(),
        "destroy_kv_group": lambda: None,
    }
    module = types.ModuleType("neuronx_distributed.parallel_layers.parallel_state")
    for stub in RECORDED[module.__name__]:
        setattr(module, stub.__name__, _function(stub, impl.get(stub.__name__) or getattr(state, stub.__name__)))
    return module


def install_modules() -> None:
    """Put stand-in ``torch_neuronx`` and ``neuronx_distributed`` modules in ``sys.modules``."""
    eager = {"ParallelEmbedding": parallel.ParallelEmbedding, "ColumnParallelLinear": parallel.ColumnParallelLinear,
             "RowParallelLinear": parallel.RowParallelLinear,
             "GQAQKVColumnParallelLinear": parallel.GQAQKVColumnParallelLinear}
    functions = {"parallel_cross_entropy": _nxd_cross_entropy,
                 "gather_from_tensor_model_parallel_region":
                     lambda input_, process_group=None: parallel.gather_from_tensor_model_parallel_region(input_)}
    modules = {name: types.ModuleType(name) for name in (
        "torch_neuronx", "neuronx_distributed", "neuronx_distributed.parallel_layers", "neuronx_distributed.modules")}
    modules["torch_neuronx"].__version__ = STACK_VERSIONS["torch-neuronx"]
    for name, stubs in RECORDED.items():
        if name.endswith("parallel_state"):
            modules[name] = _state_module()
            continue
        module = modules[name] = types.ModuleType(name)
        for stub in stubs:
            member = _eager_class(stub, eager[stub.__name__]) if stub.__name__ in eager else \
                _function(stub, functions[stub.__name__])
            setattr(module, stub.__name__, member)
    sys.modules.update(modules)


def write_stack_metadata(directory: Path, versions: dict[str, str] = STACK_VERSIONS) -> Path:
    """Distribution metadata (``*.dist-info``) of the Neuron packages, for a ``sys.path`` entry."""
    for dist, version in versions.items():
        info = directory / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return directory


def write_neuron_ls(bin_dir: Path, neuron_cores: int = 32, cores_per_device: int = 2,
                    memory_size: int = 34359738368, **fields: Any) -> Path:
    """A ``neuron-ls`` printing the ``-j`` output of a host with ``neuron_cores`` cores (trn1 by default:
    2 per 32 GiB device; trn2: 4 logical cores per 96 GiB device and ``logical_neuroncore_config=2``)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    devices = [{"neuron_device": d, "nc_count": cores_per_device, "memory_size": memory_size,
                "neuroncore_ids": list(range(d * cores_per_device, (d + 1) * cores_per_device)), **fields}
               for d in range(neuron_cores // cores_per_device)]
    script = bin_dir / "neuron-ls"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(devices)}\nEOF\n")
    script.chmod(0o755)
    return bin_dir


def install(work_dir: Path, neuron_cores: int = 32) -> None:
    """Everything a process needs to run the neuron backend on the stand-ins (and torch-xla on the CPU)."""
    import os

    install_modules()
    sys.path.insert(0, str(write_stack_metadata(work_dir / "site")))
    os.environ["PATH"] = f"{write_neuron_ls(work_dir / 'bin', neuron_cores)}{os.pathsep}{os.environ['PATH']}"
    os.environ["PJRT_DEVICE"] = "CPU"
