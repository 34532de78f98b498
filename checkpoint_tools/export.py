"""Export trained NxD LoRA checkpoints for the Hugging Face ecosystem.

* ``export_peft``: a PEFT adapter directory (``adapter_model.safetensors`` +
  ``adapter_config.json``) that ``peft.PeftModel.from_pretrained`` loads onto
  ``transformers.LlamaForCausalLM``: fused qkv / gate_up adapters split into HF modules
  (shared ``lora_A`` copied to each), KV replicas checked equal and dropped, query-group
  order undone.
* ``export_merged``: an HF model directory (sharded safetensors + index, config.json,
  generation_config.json, tokenizer files when known) with the adapter folded into the base.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch

from checkpoint_tools.atomic_io import save_safetensors, write_json
from checkpoint_tools.convert import hf_model_bytes, layer_releasing_reader, load_rank_files, write_hf_model
from checkpoint_tools.nxd_format import (
    MANIFEST,
    complete_tags,
    manifest_config,
    publish_directory,
    read_manifest,
    require_verified,
    resolve_tag_dir,
)
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_lora_save import read_nxd_lora_save
from checkpoint_tools.nxd_source import NxDSource, foreign_nxd_tag, is_nxd_checkpoint, open_foreign_nxd_source
from checkpoint_tools.source_base import CheckpointError, Source
from checkpoint_tools.sources import open_source
from checkpoint_tools.tokenizer_files import copy_tokenizer_files, has_tokenizer, write_generation_config
from checkpoint_tools.tp_layout import unshard_lora_state_dict

PEFT_PREFIX = "base_model.model."
VLLM_DEFAULT_MAX_LORA_RANK = 16


def _lora_tag(path: str | Path) -> tuple[Path, dict]:
    tag_dir = resolve_tag_dir(path)
    manifest = read_manifest(tag_dir)
    if manifest.get("kind") != "lora":
        raise CheckpointError(f"{tag_dir}: manifest kind is {manifest.get('kind')!r}, expected a trained LoRA "
                              f"checkpoint ('lora')")
    require_verified(tag_dir, manifest)
    return tag_dir, manifest


def pick_lora_tag(path: str | Path, merged: bool) -> tuple[Path, str]:
    """The LoRA tag ``export`` reads under ``path``, and why: a tag itself; in a training run's
    directory its final save, else its newest periodic tag; among final saves the one the export
    needs (``merged``: the merged save, else one with an adapter; PEFT: one with an adapter)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / "model").is_dir() or not path.is_dir():
        return path, ""
    is_run = (path / "final").is_dir() or (path / "checkpoints").is_dir()
    for root in [path / "final", path / "checkpoints"] if is_run else [path]:
        manifests = {t: read_manifest(t) for t in (complete_tags(root) if root.is_dir() else [])}
        tags = sorted((t for t, m in manifests.items() if m.get("kind") == "lora"),
                      key=lambda t: (t / "done").stat().st_mtime)
        if not tags:
            continue
        if root.name == "checkpoints":
            return tags[-1], f"the newest periodic save of training run {path} (it has no final save)"
        modes = {manifests[t].get("save_mode"): t for t in tags}
        for mode in (["merged", "base+adapter"] if merged else []) + ["adapter", "base+adapter", "merged"]:
            if mode in modes:
                return modes[mode], f"the final {mode} save" + (f" of training run {path}" if is_run else "")
    return path, ""


def peft_adapter_config(lora: dict, target_modules: list[str], base_model: str | None) -> dict:
    """The standard PEFT LoraConfig fields (nothing NxD-specific)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["lora_rank"], "lora_alpha": lora["lora_alpha"],
        "lora_dropout": lora["lora_dropout"], "target_modules": sorted(target_modules), "bias": "none",
        "base_model_name_or_path": base_model, "use_rslora": lora["use_rslora"], "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
    }


def vllm_warnings(lora: dict) -> list[str]:
    """Options that vLLM cannot serve with its defaults."""
    out = []
    if lora["lora_rank"] > VLLM_DEFAULT_MAX_LORA_RANK:
        out.append(f"LoRA rank {lora['lora_rank']} > {VLLM_DEFAULT_MAX_LORA_RANK}: start vLLM with "
                   f"--max-lora-rank {lora['lora_rank']} (or higher)")
    return out


def export_peft(src: str | Path, dst: str | Path, base_model: str | None = None, overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Write a PEFT adapter directory from an ``adapter`` or ``base+adapter`` LoRA checkpoint."""
    tag_dir, manifest = _lora_tag(src)
    if manifest["save_mode"] == "merged":
        raise CheckpointError(f"{tag_dir}: save mode 'merged' holds no separate adapter; use export --merged")
    cfg = manifest_config(manifest, tag_dir)
    adapters = _hf_adapters(tag_dir, int(manifest["tp"]), cfg, manifest.get("kv_layout", "trn1"))
    if base_model is None:
        checkpoint = ((manifest.get("recipe") or {}).get("model") or {}).get("checkpoint")
        base_model = _hf_source_of_base(checkpoint) if checkpoint else None
        if base_model is None:
            raise _unknown_base_model(tag_dir, f"its base {checkpoint}" if checkpoint else "no base recorded")
        log(f"export: base_model_name_or_path {base_model} (the HF model its base was converted from)")
    write_peft_adapter(adapters, manifest["lora"], dst, base_model, overwrite, log)
    return adapters


def _hf_adapters(tag_dir: Path, tp: int, cfg: LlamaConfig, layout: str) -> dict[str, torch.Tensor]:
    """A tag's LoRA tensors, gathered from its rank files into HF layout."""
    ranks = load_rank_files(tag_dir, tp)
    return unshard_lora_state_dict([{k: v for k, v in r.items() if "lora_" in k} for r in ranks], cfg, layout)


def _hf_source_of_base(base: str | Path) -> str | None:
    """The HF model directory an nxd-lora base checkpoint was converted from, as its manifest records
    it (where the adapter is loaded, that path or a copy of it must hold the model): what PEFT's
    ``base_model_name_or_path`` names. None for a base from Meta or GGUF files."""
    try:
        source = read_manifest(resolve_tag_dir(base)).get("source") or {}
    except (OSError, ValueError):
        return None
    if not str(source.get("format", "")).startswith("hf") or not source.get("path"):
        return None
    path = Path(source["path"])
    return str(path.parent if path.suffix in (".safetensors", ".bin", ".json") else path)


def _unknown_base_model(where: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: the Hugging Face model behind the adapter is not known ({why}, not converted from an HF model "
        f"directory): pass --base-model HUB_ID_OR_HF_DIR. adapter_config.json names it as "
        f"base_model_name_or_path, which AutoPeftModelForCausalLM.from_pretrained loads")


def write_peft_adapter(adapters: dict[str, torch.Tensor], lora: dict, dst: str | Path, base_model: str | None,
                       overwrite: bool, log: Callable[[str], None]) -> None:
    """HF-layout ``adapters`` and our ``lora`` fields as a PEFT adapter directory, published atomically."""
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in adapters.items()}
    targets = sorted({k.split(".")[-3] for k in adapters})
    for message in vllm_warnings(lora):
        warnings.warn(message, stacklevel=3)
        log(f"export: warning: {message}")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with publish_directory(dst, overwrite, nbytes, "the PEFT adapter", log) as staging:
        save_safetensors(tensors, staging / "adapter_model.safetensors")
        write_json(staging / "adapter_config.json", peft_adapter_config(lora, targets, base_model), sort_keys=True)
    log(f"export: PEFT adapter ({len(tensors)} tensors, targets {targets}) -> {dst}")


def merge_adapters(hf: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scaling: float) -> None:
    """Fold HF-layout adapters into HF weights in place: ``W += scaling * B @ A`` (in fp32)."""
    for key in [k for k in adapters if k.endswith(".lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        if module + ".weight" not in hf:
            continue  # another layer's: merged when that layer is written
        weight = hf[module + ".weight"]
        delta = adapters[module + ".lora_B.weight"].float() @ adapters[key].float()
        hf[module + ".weight"] = (weight.float() + scaling * delta).to(weight.dtype)


def _scaling(lora: dict) -> float:
    rank = lora["lora_rank"]
    return lora["lora_alpha"] / (rank**0.5 if lora["use_rslora"] else rank)


def export_merged(src: str | Path, dst: str | Path, base: str | Path | None = None, overwrite: bool = False,
                  tokenizer_dir: str | Path | None = None, log: Callable[[str], None] = print) -> None:
    """Write an HF model directory with the adapter merged in.

    ``base`` (a converted NxD base checkpoint) is needed only for ``adapter`` saves.
    """
    tag_dir, manifest = _lora_tag(src)
    cfg = manifest_config(manifest, tag_dir)
    tp, mode = int(manifest["tp"]), manifest["save_mode"]
    if mode == "adapter" and base is None:
        raise CheckpointError(f"{tag_dir}: an adapter-only checkpoint needs --base (the converted base checkpoint)")
    base_dir = resolve_tag_dir(base) if mode == "adapter" else tag_dir
    base_manifest = read_manifest(base_dir)
    if base_dir != tag_dir:
        require_verified(base_dir, base_manifest)
    for field in ("tp", "fuse_qkv", "kv_size_multiplier", "kv_layout"):
        if base_manifest.get(field) != manifest.get(field):
            raise CheckpointError(f"{base_dir}: base {field}={base_manifest.get(field)!r} but the adapter was trained "
                                  f"with {field}={manifest.get(field)!r}")
    if manifest_config(base_manifest, base_dir) != cfg:
        raise CheckpointError(f"{base_dir}: base model config differs from the one the adapter was trained on")
    layout = manifest.get("kv_layout", "trn1")
    adapters = _hf_adapters(tag_dir, tp, cfg, layout) if mode != "merged" else {}
    base_source = NxDSource(base_dir, cfg, tp, layout, getattr(torch, base_manifest["dtype"]))
    write_merged_model(base_source, adapters, _scaling(manifest["lora"]), dst, overwrite,
                       tokenizer_dir or _tokenizer_home(base_dir, base_manifest, manifest), f"{mode} checkpoint", log)


def write_merged_model(base: Source, adapters: dict[str, torch.Tensor], scaling: float, dst: str | Path,
                       overwrite: bool, tokenizer_dir: str | Path | None, what: str,
                       log: Callable[[str], None]) -> None:
    """``base``'s weights with HF-layout ``adapters`` folded in, one layer at a time, as an HF model
    directory (shards, index, config, tokenizer files when known, generation config), published atomically."""
    cfg, dtype = base.config, base.dtype
    read = layer_releasing_reader(base)

    def layer_tensors(keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        hf = {key: read(key) for key in base.shapes if keep(key)}
        merge_adapters(hf, adapters, scaling)
        return hf

    with publish_directory(dst, overwrite, hf_model_bytes(cfg, dtype), "the merged HF model", log) as staging:
        write_hf_model(staging, cfg, dtype, layer_tensors, log)
        copied = copy_tokenizer_files(Path(tokenizer_dir), staging) if tokenizer_dir else []
        if not tokenizer_dir:
            log("export: warning: no tokenizer files found for the base (AutoTokenizer will not load this "
                "directory): pass --tokenizer-dir")
        if "generation_config.json" not in copied:
            write_generation_config(staging, cfg)
    log(f"export: merged HF model ({what}) -> {dst}")


def _tokenizer_home(base_dir: Path, base_manifest: dict, lora_manifest: dict | None = None) -> Path | None:
    """Where the tokenizer files are: beside the base's tag (``nxd-lora convert`` puts them there), the
    directory the base was converted from, or (for a training run's saves) the recipe's tokenizer and
    base checkpoint and what that was converted from."""
    model = ((lora_manifest or {}).get("recipe") or {}).get("model") or {}
    candidates = [base_dir.parent, (base_manifest.get("source") or {}).get("path"), model.get("tokenizer")]
    if model.get("checkpoint"):
        candidates.append(model["checkpoint"])
        candidates.append(_hf_source_of_base(model["checkpoint"]))
    for candidate in (Path(c) for c in candidates if c):
        candidate = candidate.parent if candidate.is_file() else candidate
        if candidate.is_dir() and has_tokenizer(candidate):
            return candidate
    return None


def export_nxd_lora(src: str | Path, dst: str | Path, merged: bool = False, base: str | Path | None = None,
                    config: LlamaConfig | None = None, source_layout: str | None = None,
                    lora_config: str | Path | None = None, base_model: str | None = None,
                    tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Export what NxD's own ``LoraModel`` saved (``nxd.save_checkpoint``; see ``nxd_lora_save``) as a
    PEFT adapter, or (``merged``) an HF model with the adapter folded into ``base``.

    The model comes from ``config`` (its HF config.json) or from ``base``; the platform it trained
    on from ``source_layout`` or from ``base`` when that is an NxD checkpoint. ``base`` is any
    checkpoint ``convert`` reads (ours, NxD's converter output with ``config``, HF, Meta, GGUF); a save
    with ``save_lora_base=True`` is its own base."""
    base_source, ours = None, base is not None and is_nxd_checkpoint(base)
    if base is not None:
        foreign = foreign_nxd_tag(base) is not None
        if ours and source_layout is not None:
            raise CheckpointError(f"{base}: an nxd-lora checkpoint records its layout in its manifest; leave out "
                                  f"--source-layout (it is for the LoRA save and a base written by NxD itself)")
        base_source = open_source(base, None if ours else config, source_layout if foreign and not ours else None)
        if config is not None and base_source.config != config:
            raise CheckpointError(f"{base}: its model config differs from --config")
        config = base_source.config
        if isinstance(base_source, NxDSource):  # the platform the base was laid out for, hence trained on
            source_layout = base_source.kv_layout
    if config is None:
        raise CheckpointError(f"{src}: an NxD LoRA save does not record its model: pass --config CONFIG_JSON (the HF "
                              f"config.json of the base model) or --base (the base checkpoint it trained on)")
    save = read_nxd_lora_save(src, config, source_layout, lora_config)
    log(f"export: NxD LoraModel save {save.tag_dir} (tp={save.tp}, rank {save.lora['lora_rank']}, "
        f"{'gathered by merge_sharded_lora' if save.merged_shards else 'rank shards'}, "
        f"{len(save.adapters)} HF adapter tensors)")
    if not merged:
        if base_model is None and base is not None:
            base_model = str(base_source.path) if base_source.format.startswith("hf") else (
                _hf_source_of_base(base) if ours else None)
        if base_model is None:
            raise _unknown_base_model(save.tag_dir, f"--base {base}" if base else "no --base given")
        write_peft_adapter(save.adapters, save.lora, dst, base_model, overwrite, log)
        return save.adapters
    if save.has_base:
        if base_source is not None:
            raise CheckpointError(f"{save.tag_dir}: holds its base model (NxD's save_lora_base=True), so --base "
                                  f"{base} does not apply; leave it out")
        base_source = open_foreign_nxd_source(save.tag_dir, config, source_layout)
    if base_source is None:
        raise CheckpointError(f"{save.tag_dir}: holds the adapter only: a merged export needs --base (the base "
                              f"checkpoint it trained on: ours, NxD's converter output, or the HF model)")
    tokenizer_home = tokenizer_dir or next((p for p in (base_source.path, Path(base or "."))
                                            if p.is_dir() and has_tokenizer(p)), None)
    write_merged_model(base_source, save.adapters, _scaling(save.lora), dst, overwrite, tokenizer_home,
                       "NxD LoraModel save", log)
    return save.adapters
