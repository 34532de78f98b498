"""Streaming conversion between Meta/HF/GGUF/NxD Llama checkpoints and TP-sharded NxD checkpoints.

Any source -> HF safetensors (``convert_source_to_hf``: GGUF dequantized, Meta re-laid out, NxD
gathered from memory-mapped rank files), written layer by layer in size-bounded shards with an
index. Any source -> NxD in either KV layout (trn1 or trn2; from NxD: another TP size or the
other layout): ranks are produced a few at a time (as many as fit a memory budget), each pass
reading only those ranks' slices, layer by layer, so peak memory is about the ranks in flight
plus one layer, not the model.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from checkpoint_tools.atomic_io import save_safetensors, write_json
from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from checkpoint_tools.nxd_format import (
    BASE_TAG,
    FORMAT_VERSION,
    MANIFEST,
    BackgroundRankWriter,
    mark_done,
    mark_started,
    publish_directory,
    rank_path,
    write_manifest,
)
from checkpoint_tools.nxd_source import is_nxd_checkpoint
from checkpoint_tools.sources import CheckpointError, Source, open_source
from checkpoint_tools.tokenizer_files import write_tokenizer_files
from checkpoint_tools.tp_layout import check_hf_shapes, check_kv_layout, dict_reader, expected_hf_shapes, shard_ranks

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_releasing_reader(source: Source):
    """Read through ``source``; drop its cached handles whenever reading moves to a new layer."""
    current: list[str | None] = [None]

    def read(key, dim=None, start=0, length=None):
        match = _LAYER_KEY.match(key)
        layer = match.group(1) if match else key
        if layer != current[0]:
            source.release()
            current[0] = layer
        return source.read(key, dim, start, length)

    return read


@contextmanager
def one_torch_thread():
    """Run torch's copies on the calling thread only. Conversion is memory-bound copying beside a
    writer and a hasher thread; torch's intra-op threads only spin waiting on page faults and
    take the cores those threads need (Llama-3-8B to TP=32 on 2 vCPUs: 57 s -> 48 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_rank_file(writer: BackgroundRankWriter, state: dict[str, torch.Tensor], path: Path) -> None:
    """One rank file through ``writer`` (a seam the failure tests patch)."""
    writer.write(state, path)


def ranks_per_pass(config: LlamaConfig, tp: int, dtype: torch.dtype, memory_budget: int) -> int:
    """Ranks built per pass so that one pass being built plus one being written fit the budget."""
    elements = sum(torch.Size(s).numel() for s in expected_hf_shapes(config).values())
    shard_bytes = elements * torch.empty((), dtype=dtype).element_size() / tp
    return max(1, min(tp, int(memory_budget // max(2 * shard_bytes, 1))))


def nxd_checkpoint_bytes(config: LlamaConfig, tp: int, fuse_qkv: bool, dtype: torch.dtype) -> int:
    """Tensor bytes of all rank files of a conversion, from shapes alone (rank 0 laid out on meta
    tensors, times ``tp``: every rank holds equal shapes), KV replicas and copied norms included."""
    meta = {k: torch.empty(s, dtype=dtype, device="meta") for k, s in expected_hf_shapes(config).items()}
    rank0 = shard_ranks(dict_reader(meta), config, tp, [0], fuse_qkv, dtype)[0]
    return tp * sum(t.numel() * t.element_size() for t in rank0.values())


def hf_model_bytes(config: LlamaConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return sum(torch.Size(s).numel() for s in expected_hf_shapes(config).values()) * element


def convert_to_nxd(
    src: str | Path,
    dst: str | Path,
    tp: int,
    fuse_qkv: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
    config: LlamaConfig | None = None,
    memory_budget: int = 3 << 29,  # 1.5 GiB: Llama-3-8B to TP=32 peaks at 1.9 GiB RSS
    log: Callable[[str], None] = print,
    target: str = "trn1",
    source_layout: str | None = None,
) -> dict:
    """Convert a Meta, HF, GGUF or NxD checkpoint into ``<dst>/pretrained_weight/model/*.pt`` + manifest,
    laid out for ``target`` (trn1 or trn2, see ``tp_layout``), with the source's tokenizer files in
    ``<dst>/`` (where ``train`` looks for them by default)."""
    check_kv_layout(target, "--target")
    source = open_source(src, config, source_layout)
    cfg = source.config
    kvm = check_tensor_parallel(cfg, tp)
    check_hf_shapes(source.shapes, cfg, source=str(source.path))
    out_dtype = DTYPES[dtype] if dtype else source.dtype
    per_pass = ranks_per_pass(cfg, tp, out_dtype, memory_budget)
    log(f"convert: {source.format} checkpoint {source.path} -> {dst} (tp={tp}, kv_size_multiplier={kvm}, "
        f"kv_layout={target}, fuse_qkv={fuse_qkv}, dtype={_dtype_name(out_dtype)}, {per_pass} rank(s) per pass)")
    start = time.perf_counter()
    read = layer_releasing_reader(source)
    nbytes = nxd_checkpoint_bytes(cfg, tp, fuse_qkv, out_dtype)
    with publish_directory(dst, overwrite, nbytes, "the NxD checkpoint", log) as staging, one_torch_thread():
        mark_started(staging / BASE_TAG)
        writer = BackgroundRankWriter(staging / BASE_TAG, max_pending=per_pass)
        try:
            for first in range(0, tp, per_pass):
                ranks = list(range(first, min(tp, first + per_pass)))
                states = shard_ranks(read, cfg, tp, ranks, fuse_qkv, out_dtype, target)
                source.release()
                for rank in ranks:
                    write_rank_file(writer, states.pop(0), rank_path(staging / BASE_TAG, rank))
                log(f"convert: wrote ranks {ranks[0]}..{ranks[-1]} of {tp} ({time.perf_counter() - start:.1f}s)")
        finally:
            files = writer.finish()
        tokenizer_files = write_tokenizer_files(source, staging)
        manifest = {
            "format_version": FORMAT_VERSION,
            "written_by": "nxd-lora convert",
            "kind": "base",
            "tag": BASE_TAG,
            "config": cfg.to_hf_dict(),
            "tp": tp,
            "pp": 1,
            "kv_size_multiplier": kvm,
            "kv_layout": target,
            "fuse_qkv": fuse_qkv,
            "fuse_gate_up": True,
            "dtype": _dtype_name(out_dtype),
            "source": {"format": source.format, "path": str(Path(src).absolute())},
            "tokenizer_files": tokenizer_files,
            "files": files,
        }
        write_manifest(staging / BASE_TAG, manifest)
        mark_done(staging / BASE_TAG)
    log(f"convert: done in {time.perf_counter() - start:.1f}s")
    return manifest


def load_rank_files(tag_dir: Path, tp: int) -> list[dict[str, torch.Tensor]]:
    """All rank files of a tag, memory-mapped (weights only); errors name the file."""
    ranks = []
    for rank in range(tp):
        path = rank_path(tag_dir, rank)
        try:
            ranks.append(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: rank file missing (manifest says tp={tp})") from None
        except Exception as err:
            raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    return ranks


def _plan_shards(shapes: dict[str, tuple[int, ...]], element_size: int, max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * element_size
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _layer_of(key: str) -> str:
    match = _LAYER_KEY.match(key)
    return match.group(0) if match else key


def write_hf_model(staging: Path, cfg: LlamaConfig, dtype: torch.dtype,
                   layer_tensors: Callable[[Callable[[str], bool]], dict[str, torch.Tensor]],
                   log: Callable[[str], None] = print, max_shard_bytes: int = 2 << 30) -> None:
    """Write HF safetensors shards + index + config.json into ``staging``, one layer at a time.

    ``layer_tensors(keep)`` returns full HF tensors built from the NxD keys for which
    ``keep(nxd_key)`` is true; it is asked for one layer (or top-level tensor) at a time.
    """
    shapes = expected_hf_shapes(cfg)
    element = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(shapes, element, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for group in dict.fromkeys(_layer_of(k) for k in keys):
            full = layer_tensors(lambda nxd_key, group=group: _layer_of(nxd_key) == group)
            tensors.update({k: v.to(dtype).contiguous() for k, v in full.items() if k in keys})
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"NxD checkpoint lacks tensors for {missing[:5]}")
        save_safetensors(tensors, staging / name)  # staging is published atomically
        weight_map.update({k: name for k in tensors})
        log(f"convert: wrote {name} ({len(tensors)} tensors)")
    write_json(staging / "model.safetensors.index.json",
               {"metadata": {"total_size": hf_model_bytes(cfg, dtype)}, "weight_map": weight_map})
    write_json(staging / "config.json", dict(cfg.to_hf_dict(), torch_dtype=_dtype_name(dtype)))


def convert_to_hf(src: str | Path, dst: str | Path, overwrite: bool = False, max_shard_bytes: int = 2 << 30,
                  log: Callable[[str], None] = print) -> None:
    """Rebuild HF safetensors (sharded + index), config.json and the tokenizer files from a converted
    NxD checkpoint; every file is checked against the manifest first, K/V replicas as they are gathered."""
    if not is_nxd_checkpoint(src):
        raise CheckpointError(f"{src}: not an NxD checkpoint written by nxd-lora (no {MANIFEST} in it or its tags)")
    convert_source_to_hf(src, dst, overwrite=overwrite, max_shard_bytes=max_shard_bytes, log=log)


def convert_source_to_hf(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    config: LlamaConfig | None = None,
    max_shard_bytes: int = 2 << 30,
    log: Callable[[str], None] = print,
    source_layout: str | None = None,
) -> None:
    """Write any readable source (GGUF, Meta, HF) as an HF model directory: sharded safetensors +
    index, config.json, tokenizer files and generation_config.json. One layer in memory at a time."""
    source = open_source(src, config, source_layout)
    cfg = source.config
    check_hf_shapes(source.shapes, cfg, source=str(source.path))
    out_dtype = DTYPES[dtype] if dtype else source.dtype
    log(f"convert: {source.format} checkpoint {source.path} -> HF {dst} (dtype={_dtype_name(out_dtype)})")
    read = layer_releasing_reader(source)

    def layer_tensors(keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        return {key: read(key) for key in source.shapes if keep(key)}

    with publish_directory(dst, overwrite, hf_model_bytes(cfg, out_dtype), "the HF model", log) as staging, \
            one_torch_thread():
        write_hf_model(staging, cfg, out_dtype, layer_tensors, log, max_shard_bytes)
        write_tokenizer_files(source, staging)
