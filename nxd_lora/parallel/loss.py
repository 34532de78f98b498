"""Cross entropy over vocabulary-sharded logits, without gathering the full vocabulary.

Like NxD's ``parallel_cross_entropy`` it returns the per-token loss; positions whose label
equals ``ignore_index`` get loss 0 (NxD leaves masking to the caller; we do it here so a
-100 label cannot index out of range on any rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nxd_lora.parallel import state
from nxd_lora.parallel.mappings import all_reduce_tensor_model_parallel, copy_to_tensor_model_parallel_region
from nxd_lora.scratch import eager_cpu, scratch


def _loss_and_logit_grad(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss of fp32 vocab-sharded ``logits`` (overwritten), and d(loss_t)/d(logits_t):
    ``softmax - one_hot(target)``. Ignored tokens get loss 0; their gradient rows are left as
    they come (finite), for the caller to zero through the per-token scale it applies in
    backward anyway (``_kept``): no extra pass over the logits. Shared by both losses below."""
    vocab_per_rank = logits.shape[-1]
    start = state.get_tensor_model_parallel_rank() * vocab_per_rank
    logits_max = all_reduce_tensor_model_parallel(logits.amax(dim=-1), op=dist.ReduceOp.MAX)  # no argmax: 3x faster
    logits.sub_(logits_max.unsqueeze(-1))
    ignored = target == ignore_index
    outside = (target < start) | (target >= start + vocab_per_rank) | ignored
    local_target = (target - start).masked_fill(outside, 0).unsqueeze(-1)
    target_logit = logits.gather(-1, local_target).squeeze(-1).masked_fill(outside, 0.0)
    target_logit = all_reduce_tensor_model_parallel(target_logit)
    exp = logits.exp_()
    sum_exp = all_reduce_tensor_model_parallel(exp.sum(dim=-1))
    loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
    if not with_grad:
        return loss, None
    grad = exp.div_(sum_exp.unsqueeze(-1))
    grad.scatter_add_(-1, local_target, -(~outside).to(grad.dtype).unsqueeze(-1))
    return loss, grad


def _kept(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1.0 for tokens that count in the loss, 0.0 for ignored ones (fp32, per token)."""
    return (target != ignore_index).to(torch.float32)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
        loss, grad = _loss_and_logit_grad(logits.to(torch.float32, copy=True), target, ignore_index,
                                          with_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad, _kept(target, ignore_index))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad, kept = ctx.saved_tensors
        return grad.mul_((grad_loss * kept).unsqueeze(-1)), None, None


def parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross entropy (fp32) of logits sharded on the last dim over the TP group."""
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, ignore_index)


CHUNK_ELEMENTS = 2**28  # fp32 logits of one chunk: 1 GiB
# On the eager CPU: 64 MiB. The chunk's logits live in scratch buffers (fp32 plus the model dtype),
# which count fully in the process's memory; at 2048 tokens of SmolLM2 (vocab 49152) 341-row chunks
# took the step's loss as long as one whole-sequence chunk (~0.75 s) and 480 MB less memory.
CPU_CHUNK_ELEMENTS = 2**24


def _chunk_rows(vocab_per_rank: int, max_elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so one chunk's fp32 logits stay near ``max_elements``."""
    return max(1, max_elements // vocab_per_rank)


def _fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(hidden @ weight.T).float()``; on the eager CPU into reused scratch buffers (a chunk's logits are
    hundreds of MB, whose fresh pages cost more than the exp over them: see nxd_lora/scratch.py)."""
    if not eager_cpu(hidden):
        return (hidden @ weight.t()).float()
    shape = (hidden.shape[0], weight.shape[0])
    logits = torch.mm(hidden, weight.t(), out=scratch("loss.logits", hidden.dtype, shape, hidden.device))
    if logits.dtype == torch.float32:
        return logits
    return scratch("loss.logits32", torch.float32, shape, hidden.device).copy_(logits)


def _as_dtype(grad_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_logits.to(dtype)``; on the eager CPU into the chunk's (now unused) low-precision logits buffer."""
    if not eager_cpu(grad_logits) or grad_logits.dtype == dtype:
        return grad_logits.to(dtype)
    return scratch("loss.logits", dtype, grad_logits.shape, grad_logits.device).copy_(grad_logits)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token loss of ``hidden @ weight.T`` over a vocabulary-sharded, frozen ``weight``.

    The logits exist one chunk of tokens at a time. Each token's loss depends only on its own
    hidden state, so the forward also computes d(loss_t)/d(hidden_t) per chunk and backward
    scales it by the incoming per-token gradient: no logits are kept or recomputed.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                chunk: int):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for first in range(0, hidden.shape[0], chunk):
            rows = slice(first, first + chunk)
            losses[rows], grad_logits = _loss_and_logit_grad(_fp32_logits(hidden[rows], weight), target[rows],
                                                             ignore_index, with_grad=grad_hidden is not None)
            if grad_hidden is not None:
                grad_hidden[rows] = _as_dtype(grad_logits, hidden.dtype) @ weight
        ctx.save_for_backward(grad_hidden, _kept(target, ignore_index))
        return losses

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, kept = ctx.saved_tensors
        return grad_hidden * (grad_loss * kept).unsqueeze(-1).to(grad_hidden.dtype), None, None, None, None


def parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                  ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """Per-token cross entropy (fp32) of ``hidden @ weight.T`` with ``weight`` this rank's vocabulary
    shard (a column-parallel ``lm_head``), never holding more than one chunk of logits.

    ``weight`` must be frozen (LoRA never trains the head). The hidden-state gradient is summed
    over the TP group, as a column-parallel layer's input gradient is.
    """
    if weight.requires_grad:
        raise ValueError("parallel_linear_cross_entropy needs a frozen weight; use lm_head + parallel_cross_entropy")
    shape = hidden.shape[:-1]
    hidden = copy_to_tensor_model_parallel_region(hidden).reshape(-1, hidden.shape[-1])
    losses = _LinearCrossEntropy.apply(hidden, weight, target.reshape(-1), ignore_index,
                                       chunk or _chunk_rows(weight.shape[0], CPU_CHUNK_ELEMENTS if eager_cpu(hidden)
                                                            else CHUNK_ELEMENTS))
    return losses.view(shape)
