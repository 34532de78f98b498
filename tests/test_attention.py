"""The block-wise CPU attention against ``F.scaled_dot_product_attention``: exact in float64, causal
and with a packed-document mask, GQA and plain heads, sequences that do not fill the last block;
in bfloat16 no less accurate than SDPA itself (both measured against float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nxd_lora.model import attention
from nxd_lora.model.attention import blocked_attention
from nxd_lora.model.llama import document_attention_mask


def _inputs(batch, heads, kv_heads, seq, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], grad.to(dtype)


def _doc_mask(batch, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq, generator=gen) < 0.02  # a new document every ~50 tokens
    starts[:, 0] = True
    return document_attention_mask(starts.cumsum(1))


def _sdpa(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _out_and_grads(fn, tensors, grad, mask):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, mask)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


@pytest.fixture(params=[None, 40], ids=["default-blocks", "40-row-blocks"])
def block_rows(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(attention, "_BLOCK_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_float64_output_and_gradients_equal_sdpa(heads, kv_heads, masked, block_rows):
    seq = 300  # not a multiple of any block size used here
    tensors, grad = _inputs(2, heads, kv_heads, seq, 16, torch.float64)
    mask = _doc_mask(2, seq) if masked else None
    ours = _out_and_grads(blocked_attention, tensors, grad, mask)
    ref = _out_and_grads(_sdpa, tensors, grad, mask)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(attention, "_BLOCK_ROWS", 4)  # two positions of two heads per block
    tensors, _ = _inputs(1, 4, 2, 7, 4, torch.float64)
    leaves = [t.requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_attention(q, k, v), leaves)
    mask = _doc_mask(1, 7)
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_attention(q, k, v, mask), leaves)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_bfloat16_error_is_no_larger_than_sdpa_error(masked):
    """Both against the float64 result from the same bf16 inputs: ours may round differently, not worse."""
    seq = 700
    tensors, grad = _inputs(2, 9, 3, seq, 64, torch.bfloat16, seed=3)
    mask = _doc_mask(2, seq, seed=3) if masked else None
    exact = _out_and_grads(_sdpa, [t.double() for t in tensors], grad.double(), mask)
    ours = _out_and_grads(blocked_attention, tensors, grad, mask)
    sdpa = _out_and_grads(_sdpa, tensors, grad, mask)
    for name, truth, a, b in zip(["out", "dq", "dk", "dv"], exact, ours, sdpa):
        err_ours = (a.double() - truth).norm() / truth.norm()
        err_sdpa = (b.double() - truth).norm() / truth.norm()
        assert err_ours < 1.5 * err_sdpa + 1e-4, f"{name}: relative error {err_ours:.2e} vs SDPA's {err_sdpa:.2e}"
        assert err_ours < 1e-2, name


def test_float_mask_is_refused():
    tensors, _ = _inputs(1, 2, 2, 5, 4, torch.float32)
    with pytest.raises(TypeError, match="boolean"):
        blocked_attention(*tensors, torch.zeros(1, 1, 5, 5))
