"""Reused CPU buffers: a pooled buffer is reused only once the tensor handed out is garbage, which
for a tensor saved by autograd is when no backward can read it any more."""

from __future__ import annotations

import gc

import pytest
import torch

from nxd_lora import scratch
from nxd_lora.scratch import pooled

# When autograd lets go of a saved tensor is PyTorch's internals.
pytestmark = pytest.mark.torch_version

_CPU = torch.device("cpu")


def _fresh_pool(monkeypatch):
    monkeypatch.setattr(scratch, "_free", {})


def test_pooled_memory_is_reused_only_after_the_holder_is_gone(monkeypatch):
    _fresh_pool(monkeypatch)
    first = pooled(torch.bfloat16, 1000, _CPU)
    address = first.data_ptr()
    second = pooled(torch.bfloat16, 1000, _CPU)
    assert second.data_ptr() != address  # the first is still held
    del first
    gc.collect()
    third = pooled(torch.bfloat16, 600, _CPU)  # a smaller request fits the freed buffer
    assert third.data_ptr() == address and third.shape == (600,)
    assert pooled(torch.float32, 600, _CPU).data_ptr() != address  # pools are per dtype


def test_a_request_no_free_buffer_fits_drops_the_smaller_ones(monkeypatch):
    _fresh_pool(monkeypatch)
    small = pooled(torch.float32, 100, _CPU)
    del small
    gc.collect()
    assert [b.numel() for b in scratch._free[(torch.float32, _CPU)]] == [100]
    large = pooled(torch.float32, 1000, _CPU)
    assert scratch._free[(torch.float32, _CPU)] == [] and large.numel() == 1000


class _KeepsPooled(torch.autograd.Function):
    """Saves a pooled copy of its input for backward, as the blocked attention keeps probabilities."""

    @staticmethod
    def forward(ctx, x):
        kept = pooled(x.dtype, x.numel(), x.device).copy_(x.reshape(-1))
        ctx.save_for_backward(kept)
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        return grad * kept.view(grad.shape)


def test_memory_saved_for_backward_survives_until_the_graph_is_freed(monkeypatch):
    _fresh_pool(monkeypatch)
    x = torch.arange(1.0, 7.0).requires_grad_()
    y = _KeepsPooled.apply(x)
    pooled(torch.float32, 6, _CPU).fill_(-1)  # must not get (and clobber) the saved buffer
    (grad_once,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    pooled(torch.float32, 6, _CPU).fill_(-1)
    (grad_twice,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad_once, x.detach()) and torch.equal(grad_twice, x.detach())
    del y
    gc.collect()
    assert len(scratch._free[(torch.float32, _CPU)]) == 2  # the scratch one and, the graph gone, the saved one
