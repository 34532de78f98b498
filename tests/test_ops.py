"""The memory-lean RMSNorm and SwiGLU functions and the rotary embedding against their plain formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nxd_lora.model.ops import rms_norm, silu_mul
from nxd_lora.model.rope import apply_rotary

# Bit-for-bit against aten's kernels and autograd's rounding (silu_backward, bf16 products).
pytestmark = pytest.mark.torch_version


def _plain_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_gradients_pass_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-5), (x, weight))
    gate_up = torch.randn(3, 5, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate_up,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_plain_formula_and_backward_matches_autograd(dtype):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 7, 16, generator=gen) * 3).to(dtype).requires_grad_()
    weight = torch.rand(16, generator=gen).to(dtype)
    grad = torch.randn(2, 7, 16, generator=gen).to(dtype)
    out = rms_norm(x, weight, 1e-6)
    ref_x = x.detach().clone().requires_grad_()
    ref = _plain_rms_norm(ref_x, weight, 1e-6)
    assert torch.equal(out, ref)
    (g,) = torch.autograd.grad(out, x, grad)
    (ref_g,) = torch.autograd.grad(ref, ref_x, grad)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g, ref_g, atol=tol, rtol=tol)

    gate_up = torch.randn(2, 7, 32, generator=gen).to(dtype).requires_grad_()
    ref_in = gate_up.detach().clone().requires_grad_()
    gate, up = ref_in.chunk(2, dim=-1)
    out, ref = silu_mul(gate_up), F.silu(gate) * up
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, gate_up, grad)[0], torch.autograd.grad(ref, ref_in, grad)[0],
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_in_row_blocks_is_bit_identical_to_one_block(dtype, monkeypatch):
    """The CPU backward runs a block of rows at a time: with blocks of 3 rows over 2 x 7 rows (a
    short last block) and a non-contiguous incoming gradient, every bit equals the one-block result."""
    from nxd_lora.model import ops

    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(2, 7, 48, generator=gen) * 3).to(dtype).requires_grad_()
    grad = torch.randn(7, 2, 24, generator=gen).to(dtype).transpose(0, 1)
    monkeypatch.setattr(ops, "_CPU_BLOCK_ELEMENTS", 10**9)
    (whole,) = torch.autograd.grad(silu_mul(gate_up), gate_up, grad)
    monkeypatch.setattr(ops, "_CPU_BLOCK_ELEMENTS", 3 * 48)
    (blocked,) = torch.autograd.grad(silu_mul(gate_up), gate_up, grad)
    assert torch.equal(blocked, whole)
    gate, up = gate_up.detach().float().chunk(2, dim=-1)
    plain = torch.cat([torch.ops.aten.silu_backward(grad.float() * up, gate), grad.float() * F.silu(gate)], -1)
    assert torch.equal(blocked, plain.to(dtype))


def test_only_the_input_is_kept_for_backward():
    """What makes these functions lean: one saved tensor the size of the input (plus rstd)."""
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, torch.ones(64), 1e-6)
        silu_mul(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 2 and all(t.data_ptr() == x.data_ptr() for t in big)


def _rotate_half_formula(x, cos, sin):
    """Hugging Face's ``apply_rotary_pos_emb`` for one tensor: ``x * cos + rotate_half(x) * sin``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-second, first), dim=-1) * sin.unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_identical_to_the_rotate_half_formula(dtype):
    """Forward and input gradient rounded as autograd rounds the plain formula, on the strided
    [batch, heads, seq, head_dim] view the attention passes (heads transposed out of a fused row)."""
    gen = torch.Generator().manual_seed(2)
    freqs = torch.randn(2, 11, 8, generator=gen) * 4
    emb = torch.cat((freqs, freqs), dim=-1)  # as RotaryEmbedding builds them
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    rows = torch.randn(2, 11, 5 * 16 + 7, generator=gen).to(dtype)
    x = rows[..., :5 * 16].view(2, 11, 5, 16).transpose(1, 2).detach().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out, ref = apply_rotary(x, cos, sin), _rotate_half_formula(ref_x, cos, sin)
    assert torch.equal(out, ref)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, ref_x, grad)[0])


def test_rotary_gradient_passes_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(3)
    freqs = torch.randn(1, 6, 4, dtype=torch.float64, generator=gen)
    emb = torch.cat((freqs, freqs), dim=-1)
    x = torch.randn(1, 3, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: apply_rotary(a, emb.cos(), emb.sin()), (x,))
