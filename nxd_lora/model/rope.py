"""Rotary position embeddings in the Hugging Face (rotate-half) layout, with llama3 scaling."""

from __future__ import annotations

import math

import torch

from checkpoint_tools.llama_config import LlamaConfig


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair inverse frequencies; Llama 3.1+ rescales the low frequencies (``rope_type: llama3``)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) for given positions; frequencies kept in fp32 for accuracy."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """``[x1*c - sign*x2*s | x2*c + sign*x1*s]`` for halves ``x1, x2`` of the last dim.

    With ``sign=1`` this is ``x * cos + rotate_half(x) * sin`` (cos and sin repeat their first half,
    as the rotate-half layout makes them), rounded product by product as that formula is; with
    ``sign=-1`` it is the transpose, the gradient. The halves are written into the result in
    place: no ``rotate_half`` copy, negation or concatenation."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1)
    torch.mul(x2, cos, out=out2)
    if sign > 0:
        out1.sub_(x2 * sin)
        out2.add_(x1 * sin)
    else:
        out1.add_(x2 * sin)
        out2.sub_(x1 * sin)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape [batch, heads, seq, head_dim] by cos/sin of shape [batch, seq, head_dim]
    (``RotaryEmbedding``'s, whose two halves are equal); the position tables take no gradient."""
    if torch.compiler.is_compiling():
        # The plain formula, which the compiler fuses itself: tracing the function's writes into
        # halves of its result fails on PyTorch 2.9 once shapes turn dynamic (tests/test_compiled_cpu.py).
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)
    half = cos.shape[-1] // 2
    return _Rotary.apply(x, cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1))
