"""Causal GQA attention for eager CPU training, as block-wise matrix products.

Why not always ``F.scaled_dot_product_attention`` on CPU: without AMX tiles its flash kernel
runs at a fraction of the CPU's matmul rate (~50-100 GFLOP/s against ~380 for a bf16 GEMM on an
AMD EPYC developer VM), and it was a third of a LoRA training step of the real demo model; and
given a document mask it cannot skip the masked-out key blocks. ``use_blocked_attention`` says
which of the two runs (with AMX, aten's kernel is the faster one for plain causal attention).
Here the same softmax attention is computed as a few large batched GEMMs per block of query
positions, skipping the key blocks that causality masks (blocks after the diagonal), with the
element-wise work done in place on one score block at a time; each block's probabilities come
from aten's fused softmax row kernel (about half the time of separate max, exp, sum and divide
passes). For sequences up to ``KEEP_PROBS_MAX_SEQ`` forward keeps the probabilities it rounded
for its value product (the blocks up to the diagonal only, in pooled memory) and backward reads
them, instead of redoing the score products, softmax and rounding.
Beyond that, like the flash kernel, forward saves only its inputs and output and backward
recomputes the probabilities block by block, so the [seq, seq] matrix is never held.

Numerics follow the flash kernel: scores and probabilities are fp32 (the scores come from an
fp32 product of the bf16 inputs, which is exact before accumulation; on CPUs with bf16 units
oneDNN forms it from the bf16 values themselves, see ``_fp32_products_from_bf16_operands``),
probabilities are rounded to the input dtype once, for the GEMMs of both passes; the score
gradient P * (dP - delta) is formed from that rounded P and rounded once, as a GEMM operand;
and the key/value gradients accumulate over query blocks in fp32. ``dO @ V^T - rowsum(dO * O)``
comes out of one GEMM in the input dtype (the row sum enters as three extra columns, split so
that they add up to its fp32 value), so its rounding is relative to the difference, as small as
the flash kernel's fp32 subtraction after its fp32 product. Measured against float64 in
bfloat16 (tests/test_attention.py), the output and gradient errors are those of SDPA's kernel.

Queries of one KV head are laid out position-major (row ``pos * groups + g``), so a block of
positions is a contiguous block of rows shared by all heads of the group, and one GEMM per
block covers every query head that reads the same K/V.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from nxd_lora.scratch import eager_cpu, pooled, scratch

from .ops import upcast

_BLOCK_ROWS = 384  # query rows (positions x heads per KV head) per score block: 3 MB of fp32 scores at seq 2048
# Up to this many positions, forward keeps the probabilities (input dtype) for backward instead of
# backward recomputing them. They cost about (seq + block positions) / 2 * heads values per token and
# layer: at 2048 with 9 heads (128-position blocks) 19.6 KB in bf16, about what the rest of a
# SmolLM2 layer saves; beyond, they grow with the length while the rest does not.
KEEP_PROBS_MAX_SEQ = 2048


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[batch, heads, seq, dim] -> [batch * kv_heads, seq * groups, dim], rows position-major."""
    batch, heads, seq, dim = x.shape
    return x.unflatten(1, (kv_heads, heads // kv_heads)).transpose(2, 3).reshape(batch * kv_heads, -1, dim)


def _ungrouped(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Inverse of ``_grouped``, as a [batch, heads, seq, dim] view of [batch, seq, heads, dim] memory
    (so that the caller's ``transpose(1, 2).reshape(batch, seq, heads * dim)`` is free)."""
    bkv, rows, dim = x.shape
    kv_heads = bkv // batch
    seq = rows * kv_heads // heads
    return x.view(batch, kv_heads, seq, heads // kv_heads, dim).permute(0, 2, 1, 3, 4).reshape(
        batch, seq, heads, dim).transpose(1, 2)


def _blocks(seq: int, groups: int):
    step = max(1, _BLOCK_ROWS // groups)
    for start in range(0, seq, step):
        yield start, min(seq, start + step)


def _split3(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) as three ``dtype`` terms whose sum is ``x`` to fp32 precision, on a new last dim."""
    hi = x.to(dtype)
    rest = x - hi.to(x.dtype)
    mid = rest.to(dtype)
    return torch.stack([hi, mid, (rest - mid.to(x.dtype)).to(dtype)], dim=-1)


def _cpu_has(*features: str) -> bool:
    """Whether this CPU has any of ``features`` (cpuinfo's names, e.g. ``amx_tile``), as PyTorch
    sees it: a dict of them in newer PyTorch (2.14), one function per feature in older (2.9)."""
    cpu = torch._C._cpu
    if hasattr(cpu, "_get_cpu_capability"):
        capability = cpu._get_cpu_capability()
        return any(capability.get(name, False) for name in features)
    return any(getattr(cpu, f"_is_{name}_supported", lambda: False)() for name in features)


@functools.cache
def _cpu_has_bf16_units() -> bool:
    return _cpu_has("avx512_bf16", "amx_tile")


@functools.cache
def _cpu_has_amx() -> bool:
    return _cpu_has("amx_tile")


def use_blocked_attention(q: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether attention over ``q`` should run here rather than in ``F.scaled_dot_product_attention``.

    Only eager CPU tensors qualify (CUDA and XLA have fused kernels; a compiled graph keeps SDPA,
    which its compiler lowers itself). On CPUs with AMX tiles aten's flash kernel runs its
    GEMMs on them and is the faster one for causal attention (fwd + bwd, 9/3 heads of 64:
    12.6 vs 15.3 ms at 2 x 512, 59 vs 76 ms at 2048, bf16); with a document mask it cannot skip
    the key blocks after the diagonal as ours does (98 vs 83 ms at 2048), so masks stay here.
    Without AMX (an AMD EPYC with AVX512-BF16, BENCHMARKS.md) ours was 1.2-2.1x faster."""
    return eager_cpu(q) and (attention_mask is not None or not _cpu_has_amx())


@contextmanager
def _fp32_products_from_bf16_operands(enabled: bool):
    """Let oneDNN compute fp32 GEMMs from bf16 operands with fp32 accumulation ("bf32") on CPUs
    with bf16 units (AVX512-BF16, AMX). For fp32 tensors that are upcasts of bf16 values the
    operands convert exactly, so the product is the fp32 GEMM's up to summation order, at 2.6-3x
    its speed (AMX, the score blocks at seq 2048). Only operands that hold exact bf16 values may
    be multiplied inside (the caller says so with ``enabled``): the scale is applied to the result."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    previous = getattr(matmul, "fp32_precision", None)
    if not (enabled and previous is not None and _cpu_has_bf16_units()):  # plain fp32 GEMMs
        yield
        return
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


@functools.lru_cache(maxsize=16)
def _causal_bias(positions: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0 where a query position (with its ``groups`` heads) sees a key of the diagonal block, -inf
    after it: added to the block's scores (x + 0 is x, x - inf is -inf), an unbroadcast add is ~8x
    faster than ``masked_fill_`` with the broadcast triangle."""
    hidden = torch.ones(positions, positions, dtype=torch.bool, device=device).triu_(1)
    bias = torch.zeros(positions, groups, positions, dtype=dtype, device=device)
    return bias.masked_fill_(hidden[:, None, :], float("-inf"))


def _probabilities(q32: torch.Tensor, k32: torch.Tensor, from_bf16: bool, scale: float, start: int, end: int,
                   groups: int, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """fp32 attention probabilities of query positions [start, end) over keys [0, end), from the
    fp32 upcasts of the (unscaled) queries and keys, whose values are bf16 ones if ``from_bf16``."""
    rows = q32[:, start * groups:end * groups]
    scores = scratch("attention.scores", q32.dtype, (rows.shape[0], rows.shape[1], end), q32.device)
    with _fp32_products_from_bf16_operands(from_bf16):
        torch.baddbmm(scores, rows, k32[:, :end].transpose(1, 2), beta=0, alpha=scale, out=scores)
    if mask is None:
        diagonal = scores.view(scores.shape[0], end - start, groups, end)[..., start:end]
        diagonal.add_(_causal_bias(end - start, groups, scores.dtype, scores.device))
    else:  # the same as a bias: building it and adding is ~5x faster than masked_fill_
        bias = torch.where(mask[:, :, start:end, None, :end], scores.new_zeros(()), float("-inf"))
        scores.view(batch, -1, end - start, groups, end).add_(bias)
    return torch.softmax(scores, -1, out=scores)  # aten's fused row kernel: 0.55x the time of max/exp/sum/div


def _kept_numel(batch_kv: int, seq: int, groups: int) -> int:
    return sum(batch_kv * (end - start) * groups * end for start, end in _blocks(seq, groups))


def _probability_blocks(kept: torch.Tensor | None, batch_kv: int, seq: int, groups: int,
                        dtype: torch.dtype, device: torch.device):
    """(start, end, buffer) per block of query positions: where the block's probabilities, rounded to
    the input dtype, are or go; consecutive slices of ``kept``, or one scratch buffer when not kept."""
    offset = 0
    for start, end in _blocks(seq, groups):
        shape = (batch_kv, (end - start) * groups, end)
        if kept is None:
            yield start, end, scratch("attention.probs", dtype, shape, device)
            continue
        numel = shape[0] * shape[1] * shape[2]
        yield start, end, kept[offset:offset + numel].view(shape)
        offset += numel


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                keep_probs: bool) -> torch.Tensor:
        batch, heads, seq, dim = q.shape
        kv_heads, groups = k.shape[1], heads // k.shape[1]
        scale = dim ** -0.5
        qg = _grouped(q, kv_heads)
        kg, vg = k.reshape(batch * kv_heads, seq, dim), v.reshape(batch * kv_heads, seq, dim)
        q32, k32 = upcast(qg), upcast(kg)
        out = torch.empty_like(qg)
        kept = pooled(q.dtype, _kept_numel(qg.shape[0], seq, groups), q.device) if keep_probs else None
        for start, end, low in _probability_blocks(kept, qg.shape[0], seq, groups, q.dtype, q.device):
            low.copy_(_probabilities(q32, k32, q.dtype == torch.bfloat16, scale, start, end, groups, mask, batch))
            torch.bmm(low, vg[:, :end], out=out[:, start * groups:end * groups])
        ctx.save_for_backward(qg, kg, vg, out, mask, kept)
        ctx.shape = (batch, heads, seq, dim)
        return _ungrouped(out, batch, heads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qg, kg, vg, out, mask, kept = ctx.saved_tensors
        batch, heads, seq, dim = ctx.shape
        kv_heads = kg.shape[0] // batch
        groups = heads // kv_heads
        scale = dim ** -0.5
        dout = _grouped(grad, kv_heads)
        delta = (upcast(dout) * upcast(out)).sum(-1)  # rowsum(dO * O)
        # dP - delta in one GEMM, so that its rounding to the input dtype is relative to the
        # difference, not to dP: [dO, -delta (3 terms)] @ [V, 1, 1, 1]^T.
        dout_aug = torch.cat([dout, _split3(-delta, dout.dtype)], dim=-1)
        v_aug = torch.cat([vg, vg.new_ones(vg.shape[:2] + (3,))], dim=-1)
        if kept is None:
            q32, k32 = upcast(qg), upcast(kg)
        dq = torch.empty_like(qg)
        dk = torch.zeros(kg.shape, dtype=torch.promote_types(kg.dtype, torch.float32), device=kg.device)
        dv = torch.zeros_like(dk)
        for start, end, low in _probability_blocks(kept, qg.shape[0], seq, groups, qg.dtype, qg.device):
            if kept is None:
                low.copy_(_probabilities(q32, k32, qg.dtype == torch.bfloat16, scale, start, end, groups, mask, batch))
            rows = slice(start * groups, end * groups)
            dv[:, :end] += torch.bmm(low.transpose(1, 2), dout[:, rows])
            # dS = P * (dP - delta), from the same rounded P that the value product used.
            dscores = torch.bmm(dout_aug[:, rows], v_aug[:, :end].transpose(1, 2),
                                out=scratch("attention.dp", grad.dtype, low.shape, grad.device)).mul_(low)
            torch.bmm(dscores, kg[:, :end], out=dq[:, rows])
            dk[:, :end] += torch.bmm(dscores.transpose(1, 2), qg[:, rows])
        dq = _ungrouped(dq.mul_(scale), batch, heads)
        dk = dk.mul_(scale).view(batch, kv_heads, seq, dim).to(kg.dtype)
        dv = dv.view(batch, kv_heads, seq, dim).to(vg.dtype)
        return dq, dk, dv, None, None


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of ``q`` [batch, heads, seq, dim] over ``k``, ``v`` [batch, kv_heads, seq, dim]
    (query head ``h`` reads KV head ``h // (heads // kv_heads)``), scaled by ``dim ** -0.5``.

    Causal when ``attention_mask`` is None; otherwise ``attention_mask`` is a boolean
    [batch, 1, seq, seq] (True = attend) that must itself be causal (as ``document_attention_mask``
    is): keys after a query block are never read. Every row must attend to at least one key."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError(f"attention_mask must be boolean, got {attention_mask.dtype}")
    keep_probs = (q.shape[2] <= KEEP_PROBS_MAX_SEQ and torch.is_grad_enabled()
                  and any(t.requires_grad for t in (q, k, v)))
    return _BlockedAttention.apply(q, k, v, attention_mask, keep_probs)
