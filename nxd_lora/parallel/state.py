"""Tensor-parallel process groups, named like NxD's ``parallel_layers.parallel_state``.

Ranks are grouped as in NxD: the tensor-parallel group of global rank ``g`` is the
``tp`` consecutive ranks ``[g // tp * tp, ... + tp)``; data-parallel groups stride across
them. When GQA KV heads are replicated (``kv_size_multiplier > 1``) the ranks of one TP
group that hold the same KV head form a "kv-shared" group, over which the gradients of
the replicated K/V weights are summed; which ranks those are depends on the checkpoint's
KV layout (trn1: ranks ``r % n_kv`` alike; trn2: ranks ``r // kvm`` alike), so the groups are
built from the same function that lays the checkpoint out.

Without an initialised process group everything reports a single rank, so a plain
single-process program (TP=1) needs no setup at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from checkpoint_tools.tp_layout import check_kv_layout, kv_shared_ranks


@dataclass
class _ParallelState:
    tp_size: int
    tp_rank: int
    tp_group: object
    dp_size: int
    dp_rank: int
    dp_group: object
    kv_size_multiplier: int = 1
    kv_shared_group: object = None


_STATE: _ParallelState | None = None


def initialize_model_parallel(tensor_model_parallel_size: int = 1, kv_size_multiplier: int = 1,
                              kv_layout: str = "trn1") -> None:
    """Create the TP, DP and kv-shared groups; every rank must call this with the same arguments."""
    global _STATE
    tp = tensor_model_parallel_size
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if tp < 1 or world % tp != 0:
        raise ValueError(f"tensor_model_parallel_size={tp} must be >= 1 and divide the world size {world}")
    if kv_size_multiplier < 1 or tp % kv_size_multiplier != 0:
        raise ValueError(f"kv_size_multiplier={kv_size_multiplier} must be >= 1 and divide tensor_model_parallel_size={tp}")
    check_kv_layout(kv_layout)
    if world == 1:
        _STATE = _ParallelState(1, 0, None, 1, 0, None, kv_size_multiplier, None)
        return
    tp_group = dp_group = kv_group = None

    def new_group(ranks: list[int]):
        # Every rank creates every group (a collective); single-rank groups are left as None.
        return dist.new_group(ranks) if len(ranks) > 1 else None

    for start in range(0, world, tp):
        ranks = list(range(start, start + tp))
        group = new_group(ranks)
        if rank in ranks:
            tp_group = group
        if kv_size_multiplier > 1:  # ranks holding the same KV head, as the checkpoint layout places them
            for shared in kv_shared_ranks(tp, tp // kv_size_multiplier, kv_layout):
                kv_ranks = [start + r for r in shared]
                kv = new_group(kv_ranks)
                if rank in kv_ranks:
                    kv_group = kv
    for offset in range(tp):
        ranks = list(range(offset, world, tp))
        group = new_group(ranks)
        if rank in ranks:
            dp_group = group
    _STATE = _ParallelState(tp, rank % tp, tp_group, world // tp, rank // tp, dp_group, kv_size_multiplier, kv_group)


def destroy_model_parallel() -> None:
    global _STATE
    _STATE = None


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def get_tensor_model_parallel_size() -> int:
    return _STATE.tp_size if _STATE else 1


def get_tensor_model_parallel_rank() -> int:
    return _STATE.tp_rank if _STATE else 0


def get_tensor_model_parallel_group():
    return _STATE.tp_group if _STATE else None


def get_data_parallel_size() -> int:
    return _STATE.dp_size if _STATE else 1


def get_data_parallel_rank() -> int:
    return _STATE.dp_rank if _STATE else 0


def get_data_parallel_group():
    return _STATE.dp_group if _STATE else None


def get_kv_size_multiplier() -> int:
    return _STATE.kv_size_multiplier if _STATE else 1


def get_kv_shared_group():
    """Group of the TP ranks that hold replicas of this rank's KV heads (None when not replicated)."""
    return _STATE.kv_shared_group if _STATE else None
