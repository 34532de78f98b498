"""Reused memory for the large temporaries of eager CPU kernels: per-thread scratch buffers, and a
pool of buffers that outlive the call that filled them (tensors saved for backward).

Why: on the CPU a fresh multi-MB tensor costs a page fault per 4 KiB page on first touch
(glibc returns large freed blocks to the OS), and on the developer VM those faults were a
large, noisy share of a training step: the attention score blocks and the loss's fp32 logits
were re-faulted in every layer and step. A buffer here is allocated once per role, dtype and
thread, grows to the largest size asked for, and is reused; a caller must be done with a view
before it asks for the same role again (each user finishes with its views before returning).
A pooled buffer is handed out whole and comes back to the pool when the tensor handed out is freed
(autograd drops what a node saved once no backward can use it any more), so no view can outlive it.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

_buffers = threading.local()
_free: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
_free_lock = threading.Lock()


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is being computed on by eager CPU kernels: where scratch buffers and hand-blocked
    loops pay. Not in a compiled graph, whose compiler fuses, tiles and allocates itself (a global
    buffer written through views would only become one more mutated graph input)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def scratch(role: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A contiguous ``shape`` view (uninitialised) of this thread's buffer for ``role``."""
    buffers = _buffers.__dict__.setdefault("by_key", {})
    key, numel = (role, dtype, device), math.prod(shape)
    if key not in buffers or buffers[key].numel() < numel:
        buffers.pop(key, None)  # free the smaller one before allocating its successor
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel].view(shape)


def pooled(dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
    """A flat ``numel`` tensor (uninitialised) whose memory returns to a pool when it is garbage:
    for tensors that are refilled every step and held across calls (probabilities kept for
    backward), whose fresh allocation would fault its pages in every step. A request that no free
    buffer fits frees the smaller ones, so the pool does not keep buffers of sizes no longer used."""
    key = (dtype, device)
    with _free_lock:
        free = _free.setdefault(key, [])
        fits = [i for i, b in enumerate(free) if b.numel() >= numel]
        if fits:
            base = free.pop(min(fits, key=lambda i: free[i].numel()))
        else:
            free.clear()
            base = None
    if base is None:
        base = torch.empty(numel, dtype=dtype, device=device)
    handed_out = base[:numel]
    weakref.finalize(handed_out, _give_back, key, base)
    return handed_out


def _give_back(key: tuple[torch.dtype, torch.device], base: torch.Tensor) -> None:
    with _free_lock:
        _free.setdefault(key, []).append(base)
