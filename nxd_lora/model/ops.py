"""Memory-lean autograd functions for the two element-wise blocks of a Llama layer.

Plain eager PyTorch keeps several intermediates of these blocks alive for backward: an
fp32 copy of the input and the normalised activations for RMSNorm, and both ``silu(gate)``
and the ``gate``/``up`` halves for SwiGLU. In LoRA training the base weights are frozen, so
those intermediates are a large share of activation memory. These functions save only
their input (plus RMSNorm's per-token ``rstd``) and recompute the rest in backward, which
is cheap element-wise work. Forward results are bit-identical to the plain formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nxd_lora.scratch import eager_cpu


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64, for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = upcast(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d/dx of x * rstd is rstd * (g - normed * mean(g * normed)) with normed = x * rstd, written
        # as rstd * g - x * (rstd^3 * mean(g * x)): two full-size passes fewer, all in fp32.
        x, weight, rstd = ctx.saved_tensors
        x32 = upcast(x)
        grad_normed = upcast(grad * weight)
        coef = (grad_normed * x32).mean(-1, keepdim=True) * rstd.pow(3)
        grad_x = grad_normed.mul_(rstd).addcmul_(x32, coef, value=-1)  # grad_normed is a fresh tensor
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = upcast(grad * (x32 * rstd).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` computed in fp32 and cast back, as Hugging Face's LlamaRMSNorm."""
    return _RMSNorm.apply(x, weight, eps)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        grad_gate_up = gate_up.new_empty(gate_up.shape)  # contiguous, whatever gate_up's strides
        width = gate_up.shape[-1]
        rows = gate_up.reshape(-1, width), grad.reshape(-1, width // 2), grad_gate_up.view(-1, width)
        # On the CPU, a block of rows at a time: the fp32 temporaries of a block stay in the
        # core's cache (and in malloc's heap) instead of being full-size tensors streamed through
        # memory and faulted in afresh every layer (2.5x faster at the demo model's shapes).
        # Elsewhere one block of all rows: one kernel per pass on CUDA, one graph on XLA, and a
        # compiled graph, which its compiler fuses itself.
        step = max(1, _CPU_BLOCK_ELEMENTS // width) if eager_cpu(gate_up) else max(1, rows[0].shape[0])
        for start in range(0, rows[0].shape[0], step):
            _silu_mul_grad(*(r[start:start + step] for r in rows))
        return grad_gate_up


_CPU_BLOCK_ELEMENTS = 1 << 19  # gate_up elements per block of rows in the CPU backward: 2 MiB in fp32


def _silu_mul_grad(gate_up: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> None:
    """Writes the gradient of ``silu(gate) * up`` for rows ``gate_up`` into ``out``: in fp32 with
    one rounding at the end, in four element-wise passes (aten's fused ``silu_backward``)
    written straight into the two halves of ``out`` (no fp32 cat)."""
    gate, up = upcast(gate_up).chunk(2, dim=-1)
    grad = upcast(grad)
    out_gate, out_up = out.chunk(2, dim=-1)
    out_gate.copy_(torch.ops.aten.silu_backward(grad * up, gate))
    out_up.copy_(grad * F.silu(gate))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` for ``gate_up = [gate | up]`` on the last dim."""
    return _SiluMul.apply(gate_up)
