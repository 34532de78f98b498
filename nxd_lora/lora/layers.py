"""LoRA wrappers around tensor-parallel layers, sharded as NxD's ``modules.lora`` shards them.

* Column-parallel base (and the fused GQA qkv): ``lora_A`` is a full, replicated
  ``nn.Linear(in, r)``; ``lora_B`` is sharded on its output like the base. ``lora_B``'s
  input is all-reduced in backward, so every rank gets the full gradient of ``lora_A``.
* Row-parallel base: ``lora_A`` is a ``RowParallelLinear(in, r)`` (sharded input, reduced
  output); ``lora_B`` is a full, replicated ``nn.Linear(r, out)``.

The base moves to ``<name>.base_layer`` so the state-dict keys match NxD's
(``...qkv_proj.base_layer.weight_q``, ``...qkv_proj.lora_B.weight_k``). LoRA weights are
fp32. ``lora_A`` is drawn from the full (unsharded) shape with a generator seeded per
module, so the initial adapter is the same at every TP size (for ``o_proj`` under KV
replication, up to the query-group order of its input columns).
"""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import torch
from torch import nn

from nxd_lora.lora.config import LoraConfig


def _init_lora_a(shape: tuple[int, int], config: LoraConfig, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    full = torch.empty(shape, dtype=torch.float32, device="cpu")  # the generator is a CPU one
    if config.init_lora_weights == "gaussian":
        return full.normal_(std=1 / config.lora_rank, generator=generator)
    bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) as NxD and PEFT use
    return full.uniform_(-bound, bound, generator=generator)


def _replicated_lora_a(in_features: int, config: LoraConfig, seed: int) -> nn.Linear:
    """The full ``lora_A`` that column-parallel and GQA bases share on every rank."""
    lora_a = nn.Linear(in_features, config.lora_rank, bias=False, dtype=torch.float32)
    lora_a.weight.data.copy_(_init_lora_a((config.lora_rank, in_features), config, seed))
    return lora_a


class _Fp32LoraA(torch.autograd.Function):
    """``x.float() @ A.T`` that keeps ``x`` in its own dtype for backward.

    Written plainly, autograd keeps the fp32 copy of a bf16 ``x`` (twice its size) for
    ``A``'s gradient; on a bf16 model that copy is the largest LoRA activation. Upcasting
    again in backward gives the same gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x.to(weight.dtype) @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_weight


class LoraLayer(nn.Module):
    """Common forward: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``."""

    base_layer: nn.Module
    lora_A: nn.Module
    lora_B: nn.Module

    def __init__(self, base_layer: nn.Module, config: LoraConfig):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scaling = config.lora_rank, config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def lora_forward(self, x: torch.Tensor):
        dropout = self.training and isinstance(self.lora_dropout, nn.Dropout)
        if type(self.lora_A) is nn.Linear and not dropout:  # replicated A (column-parallel and qkv bases)
            return self.lora_B(_Fp32LoraA.apply(x, self.lora_A.weight))
        # Dropout in fp32 as PEFT does it; its fp32 output is a new tensor kept for backward anyway.
        return self.lora_B(self.lora_A(self.lora_dropout(x.to(torch.float32))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (self.lora_forward(x) * self.scaling).to(x.dtype)

    def logical_lora_numel(self) -> int:
        """Adapter parameters of the unsharded model (replicas counted once)."""
        return self.rank * (self.base_layer.input_size + self.base_layer.output_size)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """``scaling * B @ A`` for each base weight, in this rank's shard layout (no communication).

        Column-parallel and GQA bases pair ``base_layer.<name>`` with ``lora_B.<name>``
        (``weight``, ``weight_q``...); a row-parallel base takes ``B @ A_r`` on its input shard.
        """
        names = [n for n, _ in self.base_layer.named_parameters(recurse=False) if n.startswith("weight")]
        if isinstance(self.lora_B, nn.Linear):  # row-parallel base: replicated B, sharded A
            return {"weight": (self.lora_B.weight @ self.lora_A.weight) * self.scaling}
        return {n: (getattr(self.lora_B, n) @ self.lora_A.weight) * self.scaling for n in names}


class LoraColumnParallelLinear(LoraLayer):
    def __init__(self, base_layer: nn.Module, config: LoraConfig, layers: SimpleNamespace, seed: int):
        super().__init__(base_layer, config)
        self.lora_A = _replicated_lora_a(base_layer.input_size, config, seed)
        self.lora_B = layers.ColumnParallelLinear(
            config.lora_rank, base_layer.output_size, bias=False, gather_output=base_layer.gather_output,
            stride=base_layer.stride, dtype=torch.float32, init_method=nn.init.zeros_,
        )


class LoraRowParallelLinear(LoraLayer):
    def __init__(self, base_layer: nn.Module, config: LoraConfig, layers: SimpleNamespace, seed: int):
        super().__init__(base_layer, config)
        r = config.lora_rank
        self.lora_A = layers.RowParallelLinear(
            base_layer.input_size, r, bias=False, input_is_parallel=base_layer.input_is_parallel,
            dtype=torch.float32, init_method=nn.init.zeros_,
        )
        local = self.lora_A.weight.shape[1]
        full = _init_lora_a((r, base_layer.input_size), config, seed)
        self.lora_A.weight.data.copy_(full[:, layers.state.get_tensor_model_parallel_rank() * local :][:, :local])
        self.lora_B = nn.Linear(r, base_layer.output_size, bias=False, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)


class LoraGQAQKVParallelLinear(LoraLayer):
    """One shared ``lora_A``; ``lora_B`` is a GQA qkv layer laid out like the base (K/V replicated)."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig, layers: SimpleNamespace, seed: int):
        super().__init__(base_layer, config)
        self.lora_A = _replicated_lora_a(base_layer.input_size, config, seed)
        self.lora_B = layers.GQAQKVColumnParallelLinear(
            config.lora_rank, base_layer.output_sizes, bias=False, gather_output=base_layer.gather_output, dtype=torch.float32,
            init_method=nn.init.zeros_, kv_size_multiplier=base_layer.kv_size_multiplier, fuse_qkv=base_layer.fuse_qkv,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.base_layer(x)
        deltas = self.lora_forward(x)
        return tuple(b + (d * self.scaling).to(b.dtype) for b, d in zip(base, deltas))

    def logical_lora_numel(self) -> int:
        q, kv = self.base_layer.output_sizes
        return self.rank * (self.base_layer.input_size + q + 2 * kv)


def module_seed(name: str, seed: int) -> int:
    """A stable per-module seed (independent of TP size, rank and Python's hash salt)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
