"""Per-thread scratch buffers for the large, short-lived temporaries of eager CPU kernels.

Why: on the CPU a fresh multi-MB tensor costs a page fault per 4 KiB page on first touch
(glibc returns large freed blocks to the OS), and on the developer VM those faults were a
large, noisy share of a training step: the attention score blocks and the loss's fp32 logits
were re-faulted in every layer and step. A buffer here is allocated once per role, dtype and
thread, grows to the largest size asked for, and is reused; a caller must be done with a view
before it asks for the same role again (each user finishes with its views before returning).
"""

from __future__ import annotations

import math
import threading

import torch

_buffers = threading.local()


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
