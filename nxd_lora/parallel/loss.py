"""Cross entropy over vocabulary-sharded logits, without gathering the full vocabulary.

Like NxD's ``parallel_cross_entropy`` it returns the per-token loss; positions whose label
equals ``ignore_index`` get loss 0 (NxD leaves masking to the caller; we do it here so a
-100 label cannot index out of range on any rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nxd_lora.parallel import state
from nxd_lora.parallel.mappings import all_reduce_tensor_model_parallel


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
        logits = logits.float()
        logits_max = all_reduce_tensor_model_parallel(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        vocab_per_rank = logits.shape[-1]
        start = state.get_tensor_model_parallel_rank() * vocab_per_rank
        ignored = target == ignore_index
        outside = (target < start) | (target >= start + vocab_per_rank) | ignored
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = all_reduce_tensor_model_parallel(target_logit)
        exp = shifted.exp()
        sum_exp = all_reduce_tensor_model_parallel(exp.sum(dim=-1))
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax
        inside = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside)
        grad.mul_((grad_loss * (~ignored).to(grad.dtype)).unsqueeze(-1))
        return grad, None, None


def parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross entropy (fp32) of logits sharded on the last dim over the TP group."""
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, ignore_index)
