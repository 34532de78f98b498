"""NxD's per-rank tensor-parallel layout of Llama weights: HF state dict <-> rank shards.

This module is the one place that knows how NxD lays a Llama out over TP ranks; the
converter, the exporter and the model loader all call it. Facts (NxD 0.17 of Neuron SDK 2.28
and 0.18, verified in its ``parallel_layers`` and ``modules/qkv_linear.py``; see DESIGN.md):

* embed_tokens, lm_head, q/k/v, gate and up are split on dim 0; o_proj and down_proj on
  dim 1; norms are copied to every rank.
* ``mlp.gate_up_proj.weight`` holds ``[gate_r; up_r]`` on each rank.
* ``self_attn.qkv_proj.weight_q|weight_k|weight_v`` (or fused ``weight_qkv`` = ``[q_r; k_r; v_r]``).
* GQA with tp > n_kv: kvm = tp // n_kv and every rank holds one KV head, placed by the
  checkpoint's ``kv_layout``, which must match the platform that trains it:

  - ``trn1``: K/V become ``W.repeat(kvm, 1)`` then sliced, so rank r holds KV head ``r % n_kv``;
    Q rows and o_proj columns are permuted so rank r holds the query-head group
    ``(r % n_kv) * kvm + r // n_kv`` that attends to that KV head.
  - ``trn2`` (NxD's ``--hw_backend trn2``; ``modules/qkv_linear.py`` on TRN2): K/V heads are
    ``repeat_interleave``d, so rank r holds KV head ``r // kvm``; Q heads and o_proj columns stay
    in natural order (rank r holds query group r), which attends to that head already.

  With kvm = 1 (tp <= n_kv), or a single KV head, the two layouts are the same bytes.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_REPLICATED_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight")


KV_LAYOUTS = ("trn1", "trn2")


def check_kv_layout(layout: str, source: str = "kv_layout") -> str:
    if layout not in KV_LAYOUTS:
        raise ValueError(f"{source}: KV layout {layout!r} unknown; expected one of {list(KV_LAYOUTS)} "
                         f"(the NxD checkpoint layout of the Trainium generation that trains it)")
    return layout


def layouts_differ(tp_size: int, kv_size_multiplier: int) -> bool:
    """Whether trn1 and trn2 place anything differently: only with replicated KV heads (kvm > 1),
    and more than one KV head to place (n_kv = tp / kvm > 1)."""
    return kv_size_multiplier > 1 and tp_size // kv_size_multiplier > 1


def check_layout_matches(found: str, expected: str, tp_size: int, kv_size_multiplier: int, source: str) -> None:
    """Refuse a checkpoint laid out for another platform where the layouts differ (``layouts_differ``)."""
    check_kv_layout(found, source)
    if found != check_kv_layout(expected, source) and layouts_differ(tp_size, kv_size_multiplier):
        raise ValueError(f"{source}: KV layout {found}, but {expected} is needed: with replicated KV heads "
                         f"(tp={tp_size}, kv_size_multiplier={kv_size_multiplier}) the two place heads on different "
                         f"ranks, and training one as the other sums K/V gradients across ranks holding different "
                         f"heads. Re-lay it out: nxd-lora convert CKPT NEW_CKPT --retarget {expected}")


def query_group_order(tp_size: int, n_kv: int, layout: str = "trn1") -> list[int]:
    """For each TP rank, the index of the contiguous query-head group it holds."""
    kvm = max(1, tp_size // n_kv)
    if kvm == 1 or check_kv_layout(layout) == "trn2":
        return list(range(tp_size))
    return [(r % n_kv) * kvm + r // n_kv for r in range(tp_size)]


def kv_head_of_rank(rank: int, tp_size: int, n_kv: int, layout: str = "trn1") -> int:
    """The KV head a rank holds when KV heads are replicated (tp > n_kv: one head per rank)."""
    kvm = tp_size // n_kv
    return rank % n_kv if check_kv_layout(layout) == "trn1" else rank // kvm


def kv_shared_ranks(tp_size: int, n_kv: int, layout: str = "trn1") -> list[list[int]]:
    """Groups of TP ranks holding the same KV head (over which K/V replica gradients are summed)."""
    groups: dict[int, list[int]] = {}
    for rank in range(tp_size):
        groups.setdefault(kv_head_of_rank(rank, tp_size, n_kv, layout), []).append(rank)
    return [groups[h] for h in sorted(groups)]


def _q_rows(weight: torch.Tensor, tp_size: int, n_kv: int, layout: str) -> list[torch.Tensor]:
    groups = weight.chunk(tp_size, dim=0)
    return [groups[g] for g in query_group_order(tp_size, n_kv, layout)]


def _o_cols(weight: torch.Tensor, tp_size: int, n_kv: int, layout: str) -> list[torch.Tensor]:
    groups = weight.chunk(tp_size, dim=1)
    return [groups[g] for g in query_group_order(tp_size, n_kv, layout)]


def _kv_rows(weight: torch.Tensor, tp_size: int, kvm: int, layout: str) -> list[torch.Tensor]:
    if kvm == 1:
        return list(weight.chunk(tp_size, dim=0))
    heads = weight.chunk(tp_size // kvm, dim=0)
    return [heads[kv_head_of_rank(r, tp_size, len(heads), layout)] for r in range(tp_size)]


# A reader returns a slice of one full HF-layout tensor: (key, dim, start, length) -> tensor,
# where dim None means the whole tensor. Sources read only the bytes a slice needs and return
# an owned contiguous tensor (never a view: torch.save would write the whole storage).
Reader = Callable[[str, "int | None", int, "int | None"], torch.Tensor]


def dict_reader(state: dict[str, torch.Tensor]) -> Reader:
    def read(key: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        tensor = state[key]
        return (tensor if dim is None else tensor.narrow(dim, start, length)).clone(memory_format=torch.contiguous_format)

    return read


def check_hf_shapes(shapes: dict[str, tuple[int, ...]], config: LlamaConfig, source: str = "checkpoint") -> None:
    """Every expected key present with its shape, nothing unexpected; errors name key and shapes."""
    expected = expected_hf_shapes(config)
    unknown = sorted(set(shapes) - set(expected))
    if unknown:
        raise KeyError(f"{source}: unexpected keys for this Llama config: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise KeyError(f"{source}: missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(f"{source}: {key}: shape {tuple(shapes[key])}, expected {shape}")


def shard_ranks(read: Reader, config: LlamaConfig, tp_size: int, ranks: list[int], fuse_qkv: bool = False,
                dtype: torch.dtype | None = None, layout: str = "trn1") -> list[dict[str, torch.Tensor]]:
    """NxD state dicts of ``ranks``, reading only the slices they hold, one layer at a time.

    Reads go layer by layer (all requested ranks per layer), so a streaming reader can drop
    its file handles whenever the layer changes.
    """
    kvm = check_tensor_parallel(config, tp_size)
    hd, n_kv = config.head_dim, config.num_key_value_heads
    q_rows = config.num_attention_heads * hd // tp_size
    kv_rows = n_kv * kvm * hd // tp_size
    vocab = config.vocab_size // tp_size
    inter = config.intermediate_size // tp_size
    order = query_group_order(tp_size, n_kv, layout)
    outs: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}

    def put(rank: int, key: str, tensor: torch.Tensor) -> None:
        outs[rank][key] = tensor if dtype in (None, tensor.dtype) else tensor.to(dtype)

    for r in ranks:
        put(r, "model.embed_tokens.weight", read("model.embed_tokens.weight", 0, r * vocab, vocab))
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for r in ranks:
            q_start = order[r] * q_rows
            kv_start = r * kv_rows if kvm == 1 else kv_head_of_rank(r, tp_size, n_kv, layout) * hd
            q = read(p + "self_attn.q_proj.weight", 0, q_start, q_rows)
            k = read(p + "self_attn.k_proj.weight", 0, kv_start, kv_rows)
            v = read(p + "self_attn.v_proj.weight", 0, kv_start, kv_rows)
            if fuse_qkv:
                put(r, p + "self_attn.qkv_proj.weight_qkv", torch.cat([q, k, v]))
            else:
                put(r, p + "self_attn.qkv_proj.weight_q", q)
                put(r, p + "self_attn.qkv_proj.weight_k", k)
                put(r, p + "self_attn.qkv_proj.weight_v", v)
            put(r, p + "self_attn.o_proj.weight", read(p + "self_attn.o_proj.weight", 1, q_start, q_rows))
            gate = read(p + "mlp.gate_proj.weight", 0, r * inter, inter)
            up = read(p + "mlp.up_proj.weight", 0, r * inter, inter)
            put(r, p + "mlp.gate_up_proj.weight", torch.cat([gate, up]))
            put(r, p + "mlp.down_proj.weight", read(p + "mlp.down_proj.weight", 1, r * inter, inter))
            for norm in _REPLICATED_SUFFIXES:
                put(r, p + norm, read(p + norm))
    # NxD's Llama always has an lm_head; with tied embeddings it is a copy of the embedding
    # shard, so the rank file loads with strict=True in NxD as well.
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    for r in ranks:
        put(r, "model.norm.weight", read("model.norm.weight"))
        put(r, "lm_head.weight", read(head, 0, r * vocab, vocab))
    return [outs[r] for r in ranks]


def shard_hf_state_dict(
    hf: dict[str, torch.Tensor], config: LlamaConfig, tp_size: int, fuse_qkv: bool = False, layout: str = "trn1"
) -> list[dict[str, torch.Tensor]]:
    """Split a full in-memory HF Llama state dict into ``tp_size`` NxD rank state dicts."""
    check_tensor_parallel(config, tp_size)
    check_hf_shapes({k: tuple(v.shape) for k, v in hf.items()}, config)
    read = dict_reader(hf)
    return shard_ranks(read, config, tp_size, list(range(tp_size)), fuse_qkv, layout=layout)


def expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a full HF Llama state dict for ``config`` with its shape."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (config.num_attention_heads * hd, h),
                p + "self_attn.k_proj.weight": (config.num_key_value_heads * hd, h),
                p + "self_attn.v_proj.weight": (config.num_key_value_heads * hd, h),
                p + "self_attn.o_proj.weight": (h, config.num_attention_heads * hd),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def _undo_query_group_order(parts: list[torch.Tensor], n_kv: int, dim: int, layout: str) -> torch.Tensor:
    order = query_group_order(len(parts), n_kv, layout)
    groups: list[torch.Tensor | None] = [None] * len(parts)
    for rank, g in enumerate(order):
        groups[g] = parts[rank]
    return torch.cat(groups, dim=dim)  # type: ignore[arg-type]


def unshard_q_rows(parts: list[torch.Tensor], n_kv: int, layout: str = "trn1") -> torch.Tensor:
    """Inverse of the query-group permutation on dim 0 (rank shards -> HF rows)."""
    return _undo_query_group_order(parts, n_kv, 0, layout)


def unshard_o_cols(parts: list[torch.Tensor], n_kv: int, layout: str = "trn1") -> torch.Tensor:
    """Inverse of the query-group permutation on dim 1 (rank shards -> HF columns)."""
    return _undo_query_group_order(parts, n_kv, 1, layout)


def kv_placement_of(parts: list[torch.Tensor], n_kv: int) -> list[str]:
    """The layouts whose K/V replica groups hold equal tensors in ``parts`` (one K or V weight per
    TP rank, replicated heads): ['trn1'], ['trn2'], both (nothing replicated, or one KV head) or none."""
    tp = len(parts)
    return [layout for layout in KV_LAYOUTS
            if all(torch.equal(parts[r], parts[group[0]]) for group in kv_shared_ranks(tp, n_kv, layout) for r in group)]


def unshard_kv_rows(parts: list[torch.Tensor], n_kv: int, name: str = "kv", atol: float = 0.0,
                    layout: str = "trn1") -> torch.Tensor:
    """Rebuild K or V rows, checking that every replica of a KV head matches."""
    tp = len(parts)
    if tp <= n_kv:
        return torch.cat(parts, dim=0)
    heads = []
    for group in kv_shared_ranks(tp, n_kv, layout):
        first = group[0]
        for rank in group[1:]:
            if not torch.allclose(parts[rank], parts[first], atol=atol, rtol=0):
                diff = (parts[rank].float() - parts[first].float()).abs().max().item()
                raise ValueError(f"{name}: KV replica on tp rank {rank} differs from rank {first} (max abs diff "
                                 f"{diff:.3g}; {layout} layout)")
        heads.append(parts[first])
    return torch.cat(heads, dim=0)


def unshard_to_hf(ranks: list[dict[str, torch.Tensor]], config: LlamaConfig,
                  layout: str = "trn1", kv_placement: str | None = None) -> dict[str, torch.Tensor]:
    """Rebuild the full HF state dict from NxD rank state dicts (checks KV replicas are equal).

    ``kv_placement`` (default: ``layout``) is where the K/V heads sit, when a checkpoint places them
    unlike its query heads: NxD 0.17's converter writes trn2 query order with trn1's K/V placement."""
    kv_layout = kv_placement or layout
    tp, n_kv = len(ranks), config.num_key_value_heads
    check_tensor_parallel(config, tp)
    out: dict[str, torch.Tensor] = {}
    first = ranks[0]
    q_rows = config.num_attention_heads * config.head_dim // tp
    for key in first:
        parts = [r[key] for r in ranks]
        match = _LAYER.match(key)
        sub = match.group(2) if match else key
        prefix = key[: len(key) - len(sub)]
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a copy of the embedding (see shard_ranks)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            out[key] = torch.cat(parts, dim=0)
        elif sub == "model.norm.weight" or sub in _REPLICATED_SUFFIXES:
            out[key] = parts[0]
        elif sub == "self_attn.qkv_proj.weight_qkv":
            kv_rows = (parts[0].shape[0] - q_rows) // 2
            split = [p.split([q_rows, kv_rows, kv_rows]) for p in parts]
            out[prefix + "self_attn.q_proj.weight"] = unshard_q_rows([s[0] for s in split], n_kv, layout)
            for i, name in ((1, "k"), (2, "v")):
                out[prefix + f"self_attn.{name}_proj.weight"] = unshard_kv_rows([s[i] for s in split], n_kv, key,
                                                                                layout=kv_layout)
        elif sub == "self_attn.qkv_proj.weight_q":
            out[prefix + "self_attn.q_proj.weight"] = unshard_q_rows(parts, n_kv, layout)
        elif sub in ("self_attn.qkv_proj.weight_k", "self_attn.qkv_proj.weight_v"):
            out[prefix + f"self_attn.{sub[-1]}_proj.weight"] = unshard_kv_rows(parts, n_kv, key, layout=kv_layout)
        elif sub == "self_attn.o_proj.weight":
            out[key] = unshard_o_cols(parts, n_kv, layout)
        elif sub == "mlp.gate_up_proj.weight":
            halves = [p.chunk(2, dim=0) for p in parts]
            out[prefix + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves], dim=0)
            out[prefix + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves], dim=0)
        elif sub == "mlp.down_proj.weight":
            out[key] = torch.cat(parts, dim=1)
        else:
            raise KeyError(f"unknown NxD key {key!r}")
    return out


# --- LoRA adapters --------------------------------------------------------------------------
# HF-layout adapter keys are PEFT's without the "base_model.model." prefix, e.g.
# "model.layers.0.self_attn.q_proj.lora_A.weight". NxD fuses q/k/v (and gate/up) under one
# shared lora_A, so the HF adapters of a fused group must share lora_A.

_FUSED_GROUPS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_HF_TO_NXD_MODULE = {hf: nxd for nxd, group in _FUSED_GROUPS.items() for hf in group}


def shard_lora_state_dict(
    hf_lora: dict[str, torch.Tensor], config: LlamaConfig, tp_size: int, fuse_qkv: bool = False, layout: str = "trn1"
) -> list[dict[str, torch.Tensor]]:
    """Split an HF-layout LoRA adapter into NxD rank state dicts (keys as ``apply_lora`` names them)."""
    kvm = check_tensor_parallel(config, tp_size)
    n_kv = config.num_key_value_heads
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]

    def put(key: str, parts: list[torch.Tensor]) -> None:
        for rank, part in zip(ranks, parts):
            rank[key] = part.clone()

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in hf_lora})
    done: set[str] = set()
    for module in modules:
        match = _LAYER.match(module)
        if not match:
            raise KeyError(f"LoRA module {module!r} is not inside model.layers.N")
        prefix, sub = f"model.layers.{match.group(1)}.", match.group(2)
        nxd = _HF_TO_NXD_MODULE.get(sub, sub)
        target = prefix + nxd
        if target in done:
            continue
        done.add(target)

        def a(name: str) -> torch.Tensor:
            return hf_lora[f"{prefix}{name}.lora_A.weight"]

        def b(name: str) -> torch.Tensor:
            return hf_lora[f"{prefix}{name}.lora_B.weight"]

        if nxd in _FUSED_GROUPS:
            group = _FUSED_GROUPS[nxd]
            missing = [f"{prefix}{m}" for m in group if f"{prefix}{m}.lora_A.weight" not in hf_lora]
            if missing:
                raise KeyError(f"NxD fuses {group} into {nxd}: adapters missing for {missing}")
            for other in group[1:]:
                if not torch.equal(a(group[0]), a(other)):
                    raise ValueError(f"{prefix}{other}.lora_A.weight differs from {prefix}{group[0]}: NxD's fused "
                                     f"{nxd} has one shared lora_A")
            put(target + ".lora_A.weight", [a(group[0])] * tp_size)
            if nxd == "self_attn.qkv_proj":
                q = _q_rows(b(group[0]), tp_size, n_kv, layout)
                k = _kv_rows(b(group[1]), tp_size, kvm, layout)
                v = _kv_rows(b(group[2]), tp_size, kvm, layout)
                if fuse_qkv:
                    put(target + ".lora_B.weight_qkv", [torch.cat(p) for p in zip(q, k, v)])
                else:
                    put(target + ".lora_B.weight_q", q)
                    put(target + ".lora_B.weight_k", k)
                    put(target + ".lora_B.weight_v", v)
            else:
                gate, up = b(group[0]).chunk(tp_size, dim=0), b(group[1]).chunk(tp_size, dim=0)
                put(target + ".lora_B.weight", [torch.cat(p) for p in zip(gate, up)])
        elif nxd == "self_attn.o_proj":
            put(target + ".lora_A.weight", _o_cols(a(nxd), tp_size, n_kv, layout))
            put(target + ".lora_B.weight", [b(nxd)] * tp_size)
        elif nxd == "mlp.down_proj":
            put(target + ".lora_A.weight", list(a(nxd).chunk(tp_size, dim=1)))
            put(target + ".lora_B.weight", [b(nxd)] * tp_size)
        else:
            raise KeyError(f"LoRA on {module!r} has no NxD equivalent")
    return ranks


def unshard_lora_state_dict(ranks: list[dict[str, torch.Tensor]], config: LlamaConfig,
                            layout: str = "trn1") -> dict[str, torch.Tensor]:
    """Rebuild the HF-layout adapter (fused lora_A copied to each part, KV replicas checked)."""
    tp, n_kv = len(ranks), config.num_key_value_heads
    q_rows = config.num_attention_heads * config.head_dim // tp
    out: dict[str, torch.Tensor] = {}
    for key in ranks[0]:
        parts = [r[key] for r in ranks]
        module, _, param = key.partition(".lora_")
        match = _LAYER.match(module)
        if not match:
            raise KeyError(f"unknown NxD LoRA key {key!r}")
        prefix, sub = f"model.layers.{match.group(1)}.", match.group(2)
        for part in parts[1:] if param == "A.weight" and sub in _FUSED_GROUPS else []:
            if not torch.equal(part, parts[0]):
                raise ValueError(f"{key}: replicated lora_A differs between tp ranks")
        if sub in _FUSED_GROUPS and param == "A.weight":
            for hf in _FUSED_GROUPS[sub]:  # a copy each: HF modules own their adapters
                out[f"{prefix}{hf}.lora_A.weight"] = parts[0].clone()
        elif sub == "self_attn.qkv_proj":
            if param == "B.weight_qkv":
                kv_rows = (parts[0].shape[0] - q_rows) // 2
                split = [p.split([q_rows, kv_rows, kv_rows]) for p in parts]
                pieces = {n: [s[i] for s in split] for i, n in enumerate("qkv")}
            else:
                pieces = {param[-1]: parts}
            for name, shards in pieces.items():
                full = (unshard_q_rows(shards, n_kv, layout) if name == "q"
                        else unshard_kv_rows(shards, n_kv, key, layout=layout))
                out[f"{prefix}self_attn.{name}_proj.lora_B.weight"] = full
        elif sub == "mlp.gate_up_proj":
            halves = [p.chunk(2, dim=0) for p in parts]
            out[f"{prefix}mlp.gate_proj.lora_B.weight"] = torch.cat([h[0] for h in halves], dim=0)
            out[f"{prefix}mlp.up_proj.lora_B.weight"] = torch.cat([h[1] for h in halves], dim=0)
        elif sub in ("self_attn.o_proj", "mlp.down_proj") and param == "B.weight":
            for part in parts[1:]:
                if not torch.equal(part, parts[0]):
                    raise ValueError(f"{key}: replicated lora_B differs between tp ranks")
            out[f"{prefix}{sub}.lora_B.weight"] = parts[0]
        elif sub == "self_attn.o_proj":
            out[f"{prefix}{sub}.lora_A.weight"] = unshard_o_cols(parts, n_kv, layout)
        elif sub == "mlp.down_proj":
            out[f"{prefix}{sub}.lora_A.weight"] = torch.cat(parts, dim=1)
        else:
            raise KeyError(f"unknown NxD LoRA key {key!r}")
    return out
