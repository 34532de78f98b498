"""A compact tensor-parallel Llama built from NxD-style layers.

Module and parameter names follow NxD's Llama (``self_attn.qkv_proj``, ``mlp.gate_up_proj``),
so a rank's state dict is exactly a rank file of an NxD checkpoint. The layer classes come
from a ``layers`` namespace (``nxd_lora.parallel`` here, ``neuronx_distributed`` on Neuron).
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as eager_checkpoint

from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from nxd_lora import parallel
from nxd_lora.model.attention import blocked_attention, use_blocked_attention
from nxd_lora.model.ops import rms_norm, silu_mul
from nxd_lora.model.rope import RotaryEmbedding, apply_rotary

CHECKPOINTING_MODES = ("none", "mlp", "full")


def hf_init(config: LlamaConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, ``initializer_range``) for every weight matrix, as Hugging Face's Llama initialises a
    model built from a config (norms stay 1): a randomly initialised model then starts near
    ln(vocab) and random-weight benchmarks compare like with like."""
    return partial(nn.init.normal_, mean=0.0, std=config.initializer_range)


def checkpoint(function, *args):
    """Recompute ``function`` in backward. On XLA devices torch_xla's version, whose optimization
    barrier keeps the compiler from merging the recomputation back into the forward (which would
    keep the activations after all). It is reentrant only, and a reentrant checkpoint passes
    gradients only through inputs that require them: the first layer's input (the frozen
    embedding's output) is made to, as nothing upstream of it needs a gradient."""
    if args[0].device.type == "xla":
        from torch_xla.utils.checkpoint import checkpoint as xla_checkpoint

        if not args[0].requires_grad:
            args = (args[0].detach().requires_grad_(), *args[1:])
        return xla_checkpoint(function, *args, use_reentrant=True)
    return eager_checkpoint(function, *args, use_reentrant=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA attention over this rank's query heads and the KV heads they attend to."""

    def __init__(self, config: LlamaConfig, tp_size: int, kv_size_multiplier: int, fuse_qkv: bool,
                 layers: SimpleNamespace, dtype: torch.dtype):
        super().__init__()
        init = hf_init(config)
        hd = config.head_dim
        self.head_dim = hd
        self.local_heads = config.num_attention_heads // tp_size
        self.local_kv_heads = config.num_key_value_heads * kv_size_multiplier // tp_size
        self.qkv_proj = layers.GQAQKVColumnParallelLinear(
            config.hidden_size,
            [config.num_attention_heads * hd, config.num_key_value_heads * hd],
            bias=False, gather_output=False, dtype=dtype, init_method=init,
            kv_size_multiplier=kv_size_multiplier, fuse_qkv=fuse_qkv,
        )
        self.o_proj = layers.RowParallelLinear(
            config.num_attention_heads * hd, config.hidden_size, bias=False, input_is_parallel=True, dtype=dtype,
            init_method=init,
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x)
        q = q.view(batch, seq, self.local_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.local_heads // self.local_kv_heads
        # Eager kernels read the shared K/V heads in place (no copies kept for backward);
        # XLA lowers the plain repeated form.
        native_gqa = groups > 1 and q.device.type != "xla"
        if groups > 1 and not native_gqa:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if use_blocked_attention(q, attention_mask):  # eager CPU, where it beats aten's kernel
            out = blocked_attention(q, k, v, attention_mask)
        elif attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=native_gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=native_gqa)
        out = out.transpose(1, 2).reshape(batch, seq, self.local_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU with gate and up fused into one column-parallel ``gate_up_proj`` ([gate_r; up_r])."""

    def __init__(self, config: LlamaConfig, layers: SimpleNamespace, dtype: torch.dtype):
        super().__init__()
        init = hf_init(config)
        self.gate_up_proj = layers.ColumnParallelLinear(
            config.hidden_size, 2 * config.intermediate_size, stride=2, bias=False, gather_output=False, dtype=dtype,
            init_method=init,
        )
        self.down_proj = layers.RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=False, input_is_parallel=True, dtype=dtype,
            init_method=init,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU block.

    ``checkpointing`` trades compute for activation memory in training: ``mlp`` keeps only
    the MLP block's input and recomputes the block (its ``gate_up`` output is the layer's
    largest activation) in backward; ``full`` does that for the whole layer.
    """

    def __init__(self, config: LlamaConfig, tp_size: int, kv_size_multiplier: int, fuse_qkv: bool,
                 layers: SimpleNamespace, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(config, tp_size, kv_size_multiplier, fuse_qkv, layers, dtype)
        self.mlp = MLP(config, layers, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.checkpointing = "none"

    def _mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))

    def _layer(self, x, cos, sin, attention_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask)
        if self.checkpointing == "mlp" and torch.is_grad_enabled():
            return x + checkpoint(self._mlp_block, x)
        return x + self._mlp_block(x)

    def forward(self, x, cos, sin, attention_mask):
        if self.checkpointing == "full" and torch.is_grad_enabled():
            return checkpoint(self._layer, x, cos, sin, attention_mask)
        return self._layer(x, cos, sin, attention_mask)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, tp_size: int, kv_size_multiplier: int, fuse_qkv: bool,
                 layers: SimpleNamespace, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = layers.ParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype,
                                                     init_method=hf_init(config))
        self.layers = nn.ModuleList(
            DecoderLayer(config, tp_size, kv_size_multiplier, fuse_qkv, layers, dtype)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, position_ids, attention_mask):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask)
        return self.norm(x)


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask: causal, and only within the same packed document."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)


class LlamaForCausalLM(nn.Module):
    """Llama with a vocab-parallel ``lm_head`` and vocab-parallel cross entropy.

    ``forward`` returns this rank's vocabulary shard of the logits unless ``gather_logits``;
    with ``labels`` it also returns the mean loss over tokens whose (shifted) label is not
    ``ignore_index``, computed without materialising the full vocabulary on any rank.
    """

    def __init__(self, config: LlamaConfig, tp_size: int | None = None, fuse_qkv: bool = False,
                 dtype: torch.dtype = torch.float32, layers: SimpleNamespace | None = None):
        super().__init__()
        layers = layers or parallel
        initialised_tp = layers.state.get_tensor_model_parallel_size()
        tp_size = initialised_tp if tp_size is None else tp_size
        self.kv_size_multiplier = check_tensor_parallel(config, tp_size)
        if tp_size != initialised_tp:
            raise ValueError(f"tp_size={tp_size}, but the process groups were initialised with tp={initialised_tp}")
        self.config, self.tp_size, self.fuse_qkv = config, tp_size, fuse_qkv
        self.parallel_state = layers.state  # the backend's process groups (ours, or NxD's parallel_state)
        self.model = LlamaModel(config, tp_size, self.kv_size_multiplier, fuse_qkv, layers, dtype)
        self.lm_head = layers.ColumnParallelLinear(
            config.hidden_size, config.vocab_size, bias=False, gather_output=False, dtype=dtype,
            init_method=hf_init(config),
        )
        self._cross_entropy = layers.parallel_cross_entropy
        self._linear_cross_entropy = getattr(layers, "parallel_linear_cross_entropy", None)
        self._gather = layers.gather_from_tensor_model_parallel_region
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_activation_checkpointing(self, mode: str) -> None:
        """``none`` | ``mlp`` | ``full`` for every decoder layer (see ``DecoderLayer``)."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"activation_checkpointing={mode!r}; expected one of {list(CHECKPOINTING_MODES)}")
        for layer in self.model.layers:
            layer.checkpointing = mode

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                gather_logits: bool = False, ignore_index: int = -100, reduction: str = "mean",
                return_logits: bool = True):
        """``document_ids`` (packed rows): tokens attend only within their document.
        ``reduction="sum"`` returns the summed token loss (for token-weighted accumulation).
        ``return_logits=False`` (with labels) returns ``(None, loss)`` and, when the backend
        offers it, computes the loss chunk by chunk without ever holding the logits."""
        attention_mask = None if document_ids is None else document_attention_mask(document_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.model(input_ids, position_ids, attention_mask)
        logits = token_loss = None
        if labels is not None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
        fused = (labels is not None and not (return_logits or gather_logits) and self._linear_cross_entropy
                 is not None and not self.lm_head.weight.requires_grad)
        if fused:
            token_loss = self._linear_cross_entropy(hidden, self.lm_head.weight, shift_labels,
                                                    ignore_index=ignore_index)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                token_loss = self._cross_entropy(logits, shift_labels, ignore_index=ignore_index)
        loss = None
        if token_loss is not None:
            loss = token_loss.sum()
            if reduction == "mean":
                loss = loss / (shift_labels != ignore_index).sum().clamp(min=1)
        if gather_logits:
            logits = self._gather(logits)
        return (logits if return_logits or gather_logits else None), loss
