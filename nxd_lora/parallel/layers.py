"""Eager tensor-parallel layers with NxD's constructor arguments, parameter names and shard layout.

Each layer holds only its rank's shard, named exactly as NxD names it, so a rank file
written by NxD's converter loads with ``load_state_dict`` and vice versa. Arguments NxD
accepts for Neuron-specific features (sequence parallelism, padding, keep_master_weight)
are accepted and rejected when set, rather than silently ignored.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nxd_lora.parallel import mappings, state

InitMethod = Callable[[torch.Tensor], object]


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


def _reject_unsupported(**flags: bool) -> None:
    used = [name for name, value in flags.items() if value]
    if used:
        raise NotImplementedError(f"{', '.join(used)} is only available on the neuron backend")


def _default_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _weight_and_bias(module: nn.Module, weight_shape: tuple[int, int], bias_size: int, dtype: torch.dtype,
                     device: torch.device | None, init_method: InitMethod | None) -> None:
    """This rank's ``weight`` (initialised by ``init_method``) and a zero ``bias`` (or None)."""
    module.weight = nn.Parameter(torch.empty(weight_shape, dtype=dtype, device=device))
    (init_method or _default_init)(module.weight)
    if bias_size:
        module.bias = nn.Parameter(torch.zeros(bias_size, dtype=dtype, device=device))
    else:
        module.register_parameter("bias", None)


class ParallelEmbedding(nn.Module):
    """Embedding sharded on the vocabulary (dim 0): rank r holds rows ``[r*V/tp, (r+1)*V/tp)``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        init_method: InitMethod = nn.init.normal_,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        shard_across_embedding: bool = False,
        pad: bool = False,
        sequence_parallel_enabled: bool = False,
    ):
        super().__init__()
        _reject_unsupported(shard_across_embedding=shard_across_embedding, pad=pad,
                            sequence_parallel_enabled=sequence_parallel_enabled)
        tp, rank = state.get_tensor_model_parallel_size(), state.get_tensor_model_parallel_rank()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        per_rank = _divide(num_embeddings, tp, "num_embeddings")
        self.start_index, self.end_index = rank * per_rank, (rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, dtype=dtype, device=device))
        init_method(self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if state.get_tensor_model_parallel_size() == 1:
            return F.embedding(input_ids, self.weight, self.padding_idx)
        outside = (input_ids < self.start_index) | (input_ids >= self.end_index)
        local_ids = (input_ids - self.start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.reduce_from_tensor_model_parallel_region(out)


class ColumnParallelLinear(nn.Module):
    """``y = x A^T`` with A split on the output dim (weight ``[out/tp, in]``).

    ``stride`` is NxD's interleave factor: with stride k the full output is k equal blocks
    and each rank holds its slice of every block, e.g. ``[gate_r; up_r]`` for stride 2.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        stride: int = 1,
        init_method: InitMethod | None = None,
        sequence_parallel_enabled: bool = False,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
    ):
        super().__init__()
        _reject_unsupported(sequence_parallel_enabled=sequence_parallel_enabled,
                            keep_master_weight=keep_master_weight, pad=pad)
        tp = state.get_tensor_model_parallel_size()
        self.input_size, self.output_size, self.stride = input_size, output_size, stride
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.output_size_per_partition = _divide(output_size, tp, "output_size")
        # As in NxD, the bias is added after the gather, so it is full-size then.
        bias_size = (output_size if gather_output else self.output_size_per_partition) if bias else 0
        _weight_and_bias(self, (self.output_size_per_partition, input_size), bias_size, dtype, device, init_method)

    def forward(self, x: torch.Tensor):
        x = mappings.copy_to_tensor_model_parallel_region(x)
        out = F.linear(x, self.weight)
        if self.gather_output:
            out = mappings.gather_from_tensor_model_parallel_region(out)
        if self.skip_bias_add:
            return out, self.bias
        return out if self.bias is None else out + self.bias


class RowParallelLinear(nn.Module):
    """``y = x A^T`` with A split on the input dim (weight ``[out, in/tp]``, full bias ``[out]``)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        stride: int = 1,
        init_method: InitMethod | None = None,
        sequence_parallel_enabled: bool = False,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
        reduce_output: bool = True,
    ):
        super().__init__()
        _reject_unsupported(sequence_parallel_enabled=sequence_parallel_enabled,
                            keep_master_weight=keep_master_weight, pad=pad)
        tp = state.get_tensor_model_parallel_size()
        self.input_size, self.output_size, self.stride = input_size, output_size, stride
        self.input_is_parallel, self.skip_bias_add, self.reduce_output = input_is_parallel, skip_bias_add, reduce_output
        self.input_size_per_partition = _divide(input_size, tp, "input_size")
        _weight_and_bias(self, (output_size, self.input_size_per_partition), output_size if bias else 0, dtype,
                         device, init_method)

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x)
        out = F.linear(x, self.weight)
        if self.reduce_output:
            out = mappings.reduce_from_tensor_model_parallel_region(out)
        if self.skip_bias_add:
            return out, self.bias
        return out if self.bias is None else out + self.bias
