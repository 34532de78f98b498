"""NxD's ``GQAQKVColumnParallelLinear``: the fused Q/K/V projection for grouped-query attention.

Parameters are ``weight_q``, ``weight_k``, ``weight_v`` (``[rows/tp, in]`` each, K/V rows
counted after replication by ``kv_size_multiplier``) or, with ``fuse_qkv``, one
``weight_qkv`` = ``[q_r; k_r; v_r]``. The forward returns the local ``(q, k, v)``.

When K/V are replicated, several ranks hold copies of one KV head; their gradients are
summed over the kv-shared group in backward so the copies stay equal after every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nxd_lora.parallel import mappings, state
from nxd_lora.parallel.layers import InitMethod, _default_init, _divide, _reject_unsupported


class GQAQKVColumnParallelLinear(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        init_method: InitMethod | None = None,
        sequence_parallel_enabled: bool = False,
        keep_master_weight: bool = False,
        kv_size_multiplier: int = 1,
        fuse_qkv: bool = True,
    ):
        super().__init__()
        _reject_unsupported(sequence_parallel_enabled=sequence_parallel_enabled,
                            keep_master_weight=keep_master_weight, bias=bias)
        tp = state.get_tensor_model_parallel_size()
        if tp > 1 and kv_size_multiplier != state.get_kv_size_multiplier():
            raise ValueError(
                f"kv_size_multiplier={kv_size_multiplier} differs from the one the process groups were "
                f"initialised with ({state.get_kv_size_multiplier()})"
            )
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        self.kv_size_multiplier, self.fuse_qkv, self.gather_output = kv_size_multiplier, fuse_qkv, gather_output
        self.q_output_size_per_partition = _divide(output_sizes[0], tp, "output_sizes[0] (query rows)")
        self.kv_output_size_per_partition = _divide(output_sizes[1] * kv_size_multiplier, tp, "output_sizes[1] x kv_size_multiplier")
        init = init_method or _default_init
        shapes = dict(zip("qkv", self._splits()))
        if fuse_qkv:
            self.weight_qkv = nn.Parameter(torch.empty(sum(shapes.values()), input_size, dtype=dtype, device=device))
            for part in self.weight_qkv.data.split(list(shapes.values())):
                init(part)
        else:
            for name, rows in shapes.items():
                weight = nn.Parameter(torch.empty(rows, input_size, dtype=dtype, device=device))
                init(weight)
                self.register_parameter(f"weight_{name}", weight)

    def _splits(self) -> list[int]:
        """Local rows of q, k and v (attribute names as NxD's layer has them)."""
        return [self.q_output_size_per_partition] + [self.kv_output_size_per_partition] * 2

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The local (q, k, v) weights, with K/V gradients summed over their replicas."""
        if self.fuse_qkv:
            q, k, v = self.weight_qkv.split(self._splits())
        else:
            q, k, v = self.weight_q, self.weight_k, self.weight_v
        if self.kv_size_multiplier > 1:
            k, v = mappings.copy_to_kv_shared_region(k), mappings.copy_to_kv_shared_region(v)
        return q, k, v

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = mappings.copy_to_tensor_model_parallel_region(x)
        if self.fuse_qkv and self.kv_size_multiplier == 1:
            outputs = F.linear(x, self.weight_qkv).split(self._splits(), dim=-1)
        else:  # one matmul per weight: concatenating them would keep a copy of all three for backward
            outputs = [F.linear(x, weight) for weight in self.weights()]
        if self.gather_output:
            outputs = [mappings.gather_from_tensor_model_parallel_region(o) for o in outputs]
        return tuple(outputs)
