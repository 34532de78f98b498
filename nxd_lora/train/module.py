"""The LightningModule: one optimizer step per batch of ``grad_accum`` micro-batches.

Manual optimization, because the things that make TP LoRA training right are ours to do:
the loss of an accumulation window is weighted by its unmasked tokens (summed over DP
ranks), LoRA gradients are summed over data-parallel replicas, and the gradient norm for
clipping counts every element once even when TP ranks hold replicas.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from nxd_lora.lora.layers import LoraLayer
from nxd_lora.lora.model import lora_parameters
from nxd_lora.train.config import TrainConfig


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def lr_lambda(train: TrainConfig):
    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "constant":
            return 1.0
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.schedule == "cosine" else 1 - progress
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * shape

    return factor


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of the LoRA gradients, each logical element counted once.

    Replicated parameters (full ``nn.Linear`` A or B) are identical on every TP rank and are
    counted once; sharded ones are summed over the TP group, K/V replicas divided by their count.
    """
    device = next(model.parameters()).device
    replicated, sharded = torch.zeros((), device=device), torch.zeros((), device=device)
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for part in (module.lora_A, module.lora_B):
            for name, param in part.named_parameters():
                if param.grad is None:
                    continue
                sq = param.grad.float().pow(2).sum()
                if isinstance(part, nn.Linear):
                    replicated += sq
                elif name in ("weight_k", "weight_v"):
                    sharded += sq / part.kv_size_multiplier
                elif name == "weight_qkv":
                    kv = part.kv_output_size_per_partition  # NxD's attribute names, on every backend
                    q, k, v = param.grad.float().split([part.q_output_size_per_partition, kv, kv])
                    sharded += q.pow(2).sum() + (k.pow(2).sum() + v.pow(2).sum()) / part.kv_size_multiplier
                else:
                    sharded += sq
    parallel_state = model.parallel_state
    if parallel_state.get_tensor_model_parallel_size() > 1:
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    return (replicated + sharded).sqrt()


def all_reduce_data_parallel(tensor: torch.Tensor, parallel_state) -> None:
    """Sum ``tensor`` over the data-parallel replicas (nothing to do with one replica)."""
    if parallel_state.get_data_parallel_size() > 1:
        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())


def make_optimizer(params: list[nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the fp32 LoRA parameters: one fused kernel on CUDA; on lazy devices the step
    counter stays on the device (a non-capturable AdamW reads it back with ``.item()``)."""
    device = params[0].device.type
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                             capturable=device == "xla", fused=True if device == "cuda" else None)


def loss_tokens(batch: dict[str, torch.Tensor], parallel_state) -> torch.Tensor:
    """Tokens with a label in ``batch``, summed over data-parallel replicas (at least 1)."""
    tokens = (batch["labels"][:, 1:] != -100).sum().float()
    all_reduce_data_parallel(tokens, parallel_state)
    return tokens.clamp(min=1)


def accumulate_gradients(model: nn.Module, batch: dict[str, torch.Tensor], micro_batch_size: int,
                         tokens: torch.Tensor, backward=torch.Tensor.backward) -> torch.Tensor:
    """Forward and backward over the micro-batches of ``batch``; gradients are of the token-mean
    loss over ``tokens``. Returns the summed token loss (detached, this rank's data)."""
    loss_sum = torch.zeros((), device=tokens.device)
    for start in range(0, batch["input_ids"].shape[0], micro_batch_size):
        part = {k: v[start:start + micro_batch_size] for k, v in batch.items()}
        _, loss = model(part["input_ids"], labels=part["labels"], position_ids=part.get("position_ids"),
                        document_ids=part.get("document_ids"), reduction="sum", return_logits=False)
        backward(loss / tokens)
        loss_sum += loss.detach()
    return loss_sum


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale LoRA gradients to a global norm of at most ``max_norm`` (0: no clipping); returns
    the norm before clipping. No host sync: the scale is computed on the device."""
    grad_norm = _grad_norm(model)
    if max_norm > 0:
        scale = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
        for param in lora_parameters(model):
            if param.grad is not None:
                param.grad.mul_(scale)
    return grad_norm


class LoraModule(L.LightningModule):
    """One optimizer step per batch; returns the step's (device) results for the callbacks to read."""

    def __init__(self, model: nn.Module, train: TrainConfig, start_step: int = 0,
                 resume_states: tuple[dict, dict] | None = None, sync=None, compile_backend: str | None = None):
        super().__init__()
        self.model, self.train_cfg, self.step_count = model, train, start_step
        self.automatic_optimization = False
        self.resume_states, self.sync = resume_states, sync
        # The training forward, compiled when asked; validation and generation run the model as it is
        # (their shapes vary, and each new shape would be a compile). A compiled function, not a module:
        # nothing is registered twice.
        self.train_forward = torch.compile(model.forward, backend=compile_backend) if compile_backend else model
        self.step_ends: list[float] = []  # wall clock at the end of each step (benchmarks' time per step)

    def on_train_start(self) -> None:
        self.step_ends.append(time.perf_counter())
        if self.resume_states is not None:
            optimizer_state, scheduler_state = self.resume_states
            self.optimizers().optimizer.load_state_dict(optimizer_state)
            self.lr_schedulers().load_state_dict(scheduler_state)

    def configure_optimizers(self):
        optimizer = make_optimizer(lora_parameters(self.model), self.train_cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.train_cfg))
        return [optimizer], [scheduler]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        parallel_state = self.model.parallel_state
        tokens = loss_tokens(batch, parallel_state)
        loss_sum = accumulate_gradients(self.train_forward, batch, self.train_cfg.micro_batch_size, tokens,
                                        self.manual_backward)
        for tensor in [loss_sum] + [param.grad for param in lora_parameters(self.model)]:
            all_reduce_data_parallel(tensor, parallel_state)
        grad_norm = clip_gradients(self.model, self.train_cfg.grad_clip)
        mean_loss = loss_sum / tokens  # before the sync: part of the step's graph, not a graph of its own
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.step_count += 1
        if self.sync is not None:
            self.sync()  # lazy devices: run the whole step as one graph before anything is read back
        self.step_ends.append(time.perf_counter())
        # Not under the key "loss", which Lightning would detach (one more op, on a lazy device).
        return {"mean_loss": mean_loss, "grad_norm": grad_norm, "tokens": tokens, "lr": lr}
