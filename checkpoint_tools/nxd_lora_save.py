"""LoRA adapters written by NxD's own ``LoraModel`` (``nxd.save_checkpoint(dir, tag, model=...)``),
read as HF-layout adapters, so that users of AWS's NxD Llama LoRA tutorial can export what they
trained (``nxd-lora export``) as a PEFT adapter or a merged model.

What NxD 0.17 writes, and where it goes wrong (checked against its code in ``tests/test_nxd_oracle.py``):

* ``<dir>/<tag>/model/dp_rank_00_tp_rank_TT_pp_rank_00.pt``: the ``lora_`` tensors under the same
  names as ours (``...qkv_proj.lora_B.weight_q``), plus the base (``.base_layer.`` names) when
  ``save_lora_base=True``, plus a ``lora_config`` dict when ``save_lora_config_adapter=True``.
  Otherwise ``adapter_config.json`` goes to ``lora_save_dir`` (default ``./lora_adapter``, relative
  to the working directory of the training), not beside the checkpoint.
* ``merge_sharded_lora=True`` (its default) gathers the sharded LoRA weights into every rank file
  (column-parallel ``lora_B``, row-parallel ``lora_A``). For the GQA qkv layer it then keeps
  ``torch.chunk(gathered, kv_size_multiplier)[0]``, which at kv_size_multiplier > 1 drops query
  rows of ``lora_B.weight_q`` (and mixes up ``weight_qkv``): that is refused, since the lost rows
  cannot be rebuilt. Gathered tensors are split back into rank shards here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from checkpoint_tools.nxd_format import rank_path
from checkpoint_tools.nxd_source import foreign_nxd_tag, is_nxd_checkpoint, rank_files_of
from checkpoint_tools.source_base import CheckpointError
from checkpoint_tools.tp_layout import layouts_differ, unshard_lora_state_dict

ADAPTER_CONFIG = "adapter_config.json"
_LORA_KEY = re.compile(r"^model\.layers\.\d+\.(self_attn\.qkv_proj|self_attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj)"
                       r"\.lora_(A\.weight|B\.weight|B\.weight_q|B\.weight_k|B\.weight_v|B\.weight_qkv)$")
_NXD_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass
class NxDLoraSave:
    """An NxD LoraModel save: its HF-layout adapters, hyper-parameters (our manifest's names) and
    whether its rank files hold the base model too (``save_lora_base=True``)."""

    tag_dir: Path
    tp: int
    adapters: dict[str, torch.Tensor]
    lora: dict
    has_base: bool
    merged_shards: bool


def is_nxd_lora_save(path: str | Path) -> bool:
    """A tag (or a root with one tag) written by ``nxd.save_checkpoint`` (no manifest of ours) whose
    rank 0 holds LoRA tensors."""
    if is_nxd_checkpoint(path):
        return False
    try:
        tag_dir = foreign_nxd_tag(path)
    except CheckpointError:
        return False
    if tag_dir is None:
        return False
    state = torch.load(rank_path(tag_dir, 0), map_location="cpu", mmap=True, weights_only=True)
    return any("lora_" in k for k in state)


def read_lora_config(tag_dir: Path, embedded: dict | None, lora_config: str | Path | None) -> tuple[dict, str]:
    """NxD's LoRA configuration: the rank files' own ``lora_config``, else ``lora_config`` (a path),
    else ``adapter_config.json`` in the tag or beside it; returned with where it came from."""
    if embedded is not None:
        if lora_config is not None:
            raise CheckpointError(f"{rank_path(tag_dir, 0)}: holds its LoRA configuration (NxD's save_lora_config_"
                                  f"adapter=True), so --lora-config {lora_config} does not apply; leave it out")
        return embedded, f"{rank_path(tag_dir, 0)} (lora_config)"
    candidates = [Path(lora_config)] if lora_config else [tag_dir / ADAPTER_CONFIG, tag_dir.parent / ADAPTER_CONFIG]
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text()), str(path)
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if lora_config:
        raise CheckpointError(f"--lora-config {lora_config}: no such file")
    raise CheckpointError(
        f"{tag_dir}: no {ADAPTER_CONFIG} in the tag or beside it. NxD writes it to LoraConfig.lora_save_dir "
        f"(default ./lora_adapter, relative to the directory the training ran in), not beside the checkpoint: "
        f"pass --lora-config PATH/{ADAPTER_CONFIG}")


def _our_lora_fields(config: dict, source: str) -> dict:
    """Our manifest's LoRA fields from NxD's configuration; options this export cannot honour are refused."""
    missing = [k for k in ("lora_alpha",) if k not in config] + ([] if "r" in config or "lora_rank" in config
                                                                 else ["lora_rank"])
    if missing:
        raise CheckpointError(f"{source}: LoRA configuration lacks {missing}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{source}: bias={config['bias']!r}: trained biases have no place in a PEFT LoRA "
                              f"adapter of a bias-free Llama; only bias='none' exports")
    if config.get("modules_to_save"):
        raise CheckpointError(f"{source}: modules_to_save={config['modules_to_save']} is not exported (only LoRA "
                              f"adapters are); remove it or export those modules yourself")
    return {"lora_rank": int(config.get("lora_rank", config.get("r"))), "lora_alpha": config["lora_alpha"],
            "lora_dropout": config.get("lora_dropout", 0.0), "use_rslora": bool(config.get("use_rslora", False))}


def _shard_dims(key: str, config: LlamaConfig, tp: int, kvm: int) -> tuple[tuple[int, ...], int | None, int]:
    """``key``'s shape in one rank's shard (without the rank dimension: rows x LoRA rank or LoRA
    rank x columns, the rank given as -1), the dimension NxD's merge gathers, and how many rank
    shards the gathered tensor holds (tp, or tp / kv_size_multiplier for the GQA layer)."""
    sub, param = _LORA_KEY.match(key).groups()
    hd, n_heads, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    q_rows, kv_rows = n_heads * hd // tp, n_kv * kvm * hd // tp
    if param == "A.weight":
        if sub == "self_attn.o_proj":
            return (-1, n_heads * hd // tp), 1, tp
        if sub == "mlp.down_proj":
            return (-1, config.intermediate_size // tp), 1, tp
        return (-1, config.hidden_size), None, 1
    if sub == "self_attn.qkv_proj":
        rows = {"B.weight_q": q_rows, "B.weight_k": kv_rows, "B.weight_v": kv_rows,
                "B.weight_qkv": q_rows + 2 * kv_rows}[param]
        return (rows, -1), 0, tp // kvm
    if sub == "mlp.gate_up_proj":
        return (2 * config.intermediate_size // tp, -1), 0, tp
    return (config.hidden_size, -1), None, 1


def _matches(shape: torch.Size, want: tuple[int, ...], rank: int) -> bool:
    return len(shape) == 2 and all(w in (-1, s) for s, w in zip(shape, want)) and rank in shape


def read_nxd_lora_save(path: str | Path, config: LlamaConfig, kv_layout: str | None,
                       lora_config: str | Path | None = None) -> NxDLoraSave:
    """The adapters of an NxD LoraModel save, in HF layout, checked against ``config`` and split
    back into rank shards where NxD merged them; ``kv_layout`` is the platform it trained on
    (trn1|trn2; needed only where the two place heads differently)."""
    tag_dir = foreign_nxd_tag(path)
    if tag_dir is None:
        raise CheckpointError(f"{path}: not a checkpoint written by nxd.save_checkpoint (no <tag>/model/"
                              f"dp_rank_00_tp_rank_00_pp_rank_00.pt)")
    tp = len(rank_files_of(tag_dir))
    kvm = check_tensor_parallel(config, tp)
    if kv_layout is None:
        if layouts_differ(tp, kvm):
            raise CheckpointError(f"{tag_dir}: tp={tp} replicates KV heads (kv_size_multiplier {kvm}) and trn1 and trn2 "
                                  f"place heads differently: pass --source-layout trn1 or trn2 (the platform it "
                                  f"trained on), or --base with the base checkpoint it trained on")
        kv_layout = "trn1"
    if kv_layout not in ("trn1", "trn2"):
        raise CheckpointError(f"--source-layout {kv_layout!r} for a LoRA save: choose trn1 or trn2 (the platform "
                              f"it trained on)")
    ranks = []
    embedded = None
    for rank in range(tp):
        state = dict(torch.load(rank_path(tag_dir, rank), map_location="cpu", mmap=True, weights_only=True))
        embedded = state.pop("lora_config", embedded)
        ranks.append(state)
    fields_source = read_lora_config(tag_dir, embedded, lora_config)
    fields = _our_lora_fields(*fields_source)
    first = rank_path(tag_dir, 0)
    lora_keys = sorted(k for k in ranks[0] if "lora_" in k)
    if not lora_keys:
        raise CheckpointError(f"{first}: no LoRA tensors (saved with NxD's merge_lora=True and save_lora_base=True, "
                              f"it is a merged base model: convert it with nxd-lora convert --config CONFIG_JSON)")
    unknown = [k for k in lora_keys if not _LORA_KEY.match(k)]
    if unknown:
        raise CheckpointError(f"{first}: LoRA tensor {unknown[0]} is on a module this export does not know; NxD's "
                              f"Llama modules with LoRA export from {list(_NXD_TARGETS)} (qkv_linear=1 models)")
    r = fields["lora_rank"]
    gathered, sharded = [], []
    for key in lora_keys:
        want, dim, count = _shard_dims(key, config, tp, kvm)
        shape = ranks[0][key].shape
        full = tuple(s * count if d == dim else s for d, s in enumerate(want))
        is_shard = _matches(shape, want, r)
        is_gathered = dim is not None and count > 1 and _matches(shape, full, r)
        if is_gathered:
            gathered.append(key)
        elif is_shard:
            if dim is not None and count > 1:
                sharded.append(key)
        else:
            expect = " or ".join(dict.fromkeys(str(tuple(r if s == -1 else s for s in w)) for w in (want, full)))
            raise CheckpointError(f"{first}: {key} has shape {tuple(shape)}, expected {expect} for this model "
                                  f"(--config) at tp={tp} with LoRA rank {r}")
    if kvm > 1 and not gathered and not sharded and tp > 1:  # GQA at tp == kvm: gathered and shard shapes agree
        q_keys = [k for k in lora_keys if k.endswith(("weight_q", "weight_qkv"))]
        if q_keys and all(torch.equal(ranks[0][q_keys[0]], s[q_keys[0]]) for s in ranks[1:]):
            gathered = q_keys
    if gathered and sharded:
        raise CheckpointError(f"{first}: {gathered[0]} is gathered across ranks but {sharded[0]} is not: not one "
                              f"save of NxD's LoraModel")
    if gathered:
        _refuse_truncated_queries(first, gathered, config, tp, kvm, r)
        for key in gathered:
            _, dim, count = _shard_dims(key, config, tp, kvm)
            for rank, state in enumerate(ranks):
                state[key] = state[key].chunk(count, dim=dim)[rank]
    try:
        adapters = unshard_lora_state_dict([{k: s[k] for k in lora_keys} for s in ranks], config, kv_layout)
    except ValueError as err:
        other = "trn2" if kv_layout == "trn1" else "trn1"
        hint = (f"; was it trained on {other}? pass --source-layout {other}" if layouts_differ(tp, kvm) else "")
        raise CheckpointError(f"{tag_dir}: {err}{hint}") from None
    has_base = any("lora_" not in k for k in ranks[0])
    return NxDLoraSave(tag_dir, tp, adapters, fields, has_base, bool(gathered))


def _refuse_truncated_queries(first: Path, gathered: list[str], config: LlamaConfig, tp: int, kvm: int,
                              r: int) -> None:
    """NxD 0.17's ``merge_sharded_lora_weights`` keeps ``chunk(gathered, kvm)[0]`` of the GQA lora_B:
    at kvm > 1 the query rows past the first 1/kvm are gone."""
    if kvm == 1:
        return
    for key in gathered:
        if key.endswith(("weight_q", "weight_qkv")):
            want, _, count = _shard_dims(key, config, tp, kvm)
            rows = want[0] * tp
            raise CheckpointError(
                f"{first}: {key} has shape ({want[0] * count}, {r}), expected ({rows}, {r}): NxD 0.17's LoraModel "
                f"with merge_sharded_lora=True (its default) gathers the GQA lora_B and keeps only "
                f"chunk(kv_size_multiplier={kvm})[0] of it, so {rows - want[0] * count} of its {rows} query rows were "
                f"never saved and cannot be rebuilt. Save again from the trained model with "
                f"LoraConfig(merge_sharded_lora=False) (rank files keep their shards), or train without qkv_proj "
                f"in target_modules")
