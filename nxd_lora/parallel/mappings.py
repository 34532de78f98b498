"""Autograd-aware collectives between tensor-parallel ranks (the Megatron/NxD "mappings").

Each function is the identity when its group has a single rank, so TP=1 runs without
any process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nxd_lora.parallel import state


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = _group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = _group_size(group)
    if size == 1:
        return x
    return x.chunk(size, dim=-1)[dist.get_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; sum gradients over the group backward (input used by every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Sum partial results over the group forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """Concatenate last-dim shards forward; keep this rank's shard of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


class _ScatterToRegion(torch.autograd.Function):
    """Keep this rank's last-dim shard forward; gather the gradient shards backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.group), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToRegion.apply(x, state.get_tensor_model_parallel_group())


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, state.get_tensor_model_parallel_group())


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _GatherFromRegion.apply(x, state.get_tensor_model_parallel_group())


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToRegion.apply(x, state.get_tensor_model_parallel_group())


def copy_to_kv_shared_region(x: torch.Tensor) -> torch.Tensor:
    """Use a replicated K/V weight so that its gradient is summed over its replicas."""
    return _CopyToRegion.apply(x, state.get_kv_shared_group())


def all_reduce_tensor_model_parallel(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the TP group without autograd (for loss statistics)."""
    group = state.get_tensor_model_parallel_group()
    if _group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x
