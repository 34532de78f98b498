"""Eager (torch.distributed) tensor-parallel layers mirroring ``neuronx_distributed.parallel_layers``.

This package doubles as the ``layers`` namespace the model is built from; the Neuron
backend supplies the same names from ``neuronx_distributed``.
"""

from nxd_lora.parallel import state
from nxd_lora.parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from nxd_lora.parallel.loss import parallel_cross_entropy, parallel_linear_cross_entropy
from nxd_lora.parallel.mappings import gather_from_tensor_model_parallel_region
from nxd_lora.parallel.qkv_linear import GQAQKVColumnParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "GQAQKVColumnParallelLinear",
    "ParallelEmbedding",
    "RowParallelLinear",
    "gather_from_tensor_model_parallel_region",
    "parallel_cross_entropy",
    "parallel_linear_cross_entropy",
    "state",
]
