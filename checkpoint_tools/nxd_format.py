"""NxD checkpoint directories: rank file names, our manifest, atomic directory publishing.

Layout (as ``neuronx_distributed.trainer.checkpoint`` reads it)::

    <root>/<tag>/model/dp_rank_00_tp_rank_{tp:02d}_pp_rank_00.pt   flat torch.save dicts
    <root>/<tag>/nxd_lora_manifest.json                             ours: config, flags, sha256
    <root>/<tag>/checkpoint                                         "1", written when a save starts
    <root>/<tag>/done                                               "1", written last

The manifest records how the checkpoint was made (NxD's converter records nothing), and
lets a loader refuse a checkpoint that does not match what it was asked for.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from checkpoint_tools.atomic_io import atomic_write, read_json, torch_save, write_json
from checkpoint_tools.diskspace import is_out_of_space, out_of_space_error, require_free_space
from checkpoint_tools.faults import file_written
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.staging import create_staging, replace_directory, sweep_stale

MANIFEST = "nxd_lora_manifest.json"
BASE_TAG = "pretrained_weight"
FORMAT_VERSION = 1


def rank_file_name(tp_rank: int, dp_rank: int = 0, pp_rank: int = 0) -> str:
    return f"dp_rank_{dp_rank:02d}_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


def rank_path(tag_dir: Path, tp_rank: int) -> Path:
    return Path(tag_dir) / "model" / rank_file_name(tp_rank)


def _fsync_and_describe(path: Path) -> dict[str, Any]:
    """Flush ``path`` to disk and return its size and sha256 (reads it back from the page cache)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def save_rank_file(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Atomically ``torch.save`` one rank's flat dict; return its size and sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch_save(state, tmp)
        info = _fsync_and_describe(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    file_written(path)
    return info


class BackgroundRankWriter:
    """Saves rank files into a staging directory off the main thread.

    For directories published as a whole (``publish_directory``), so files need no rename of
    their own. One thread saves, another fsyncs and hashes what was saved, and the caller
    builds the next rank meanwhile; at most ``max_pending`` states wait in memory.
    ``finish`` returns ``{relative name: {bytes, sha256}}``.
    """

    def __init__(self, base: Path, max_pending: int = 1):
        self.base, self.max_pending = Path(base), max(1, max_pending)
        self.saver = ThreadPoolExecutor(max_workers=1)
        self.hasher = ThreadPoolExecutor(max_workers=1)
        self.saved: list[Future] = []
        self.described: dict[str, Future] = {}

    def write(self, state: dict[str, torch.Tensor], path: Path) -> None:
        unfinished = [f for f in self.saved if not f.done()]
        while len(unfinished) >= self.max_pending:
            unfinished.pop(0).result()  # also raises a failed save here, early
        path.parent.mkdir(parents=True, exist_ok=True)
        name = str(path.relative_to(self.base))
        self.saved.append(self.saver.submit(self._save, state, path, name))

    def _save(self, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
        torch_save(state, path)
        file_written(path)
        self.described[name] = self.hasher.submit(_fsync_and_describe, path)

    def finish(self) -> dict[str, dict[str, Any]]:
        try:
            for future in self.saved:
                future.result()
            return {name: future.result() for name, future in self.described.items()}
        finally:
            self.saver.shutdown(cancel_futures=True)
            self.hasher.shutdown(cancel_futures=True)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def mark_started(tag_dir: Path) -> None:
    """NxD writes ``<tag>/checkpoint`` ("1") when a save begins."""
    with atomic_write(Path(tag_dir) / "checkpoint", "w") as handle:
        handle.write("1")


def mark_done(tag_dir: Path) -> None:
    """NxD's completion marker ``<tag>/done`` ("1"); the newest ``done`` is the newest complete tag."""
    with atomic_write(Path(tag_dir) / "done", "w") as handle:
        handle.write("1")


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest, sort_keys=True)


def resolve_tag_dir(path: str | Path) -> Path:
    """A tag directory, given either itself or a checkpoint root; for a root, the newest
    complete tag (newest ``<tag>/done`` by mtime, as ``nxd.load_checkpoint(tag=None)`` picks)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / "model").is_dir():
        return path
    complete = sorted(complete_tags(path), key=lambda p: (p / "done").stat().st_mtime)
    if not complete:
        raise FileNotFoundError(f"{path}: no complete checkpoint (no <tag>/done and no model/ directory)")
    return complete[-1]


def complete_tags(root: Path) -> list[Path]:
    """Tag directories under ``root`` with a ``done`` marker; hidden ones (staging) never count."""
    return [p.parent for p in Path(root).glob("*/done") if not p.parent.name.startswith(".")]


def read_manifest(tag_dir: Path) -> dict[str, Any]:
    path = Path(tag_dir) / MANIFEST
    manifest = read_json(path, "the manifest of a checkpoint written by nxd-lora")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def manifest_config(manifest: dict[str, Any], tag_dir: Path) -> LlamaConfig:
    return LlamaConfig.from_dict(manifest["config"], source=str(Path(tag_dir) / MANIFEST))


def check_manifest(tag_dir: Path, **expected: Any) -> dict[str, Any]:
    """Read the manifest and refuse it when any ``expected`` field differs (names field and values)."""
    manifest = read_manifest(tag_dir)
    wrong = [f"{k}={manifest.get(k)!r} (expected {v!r})" for k, v in expected.items() if manifest.get(k) != v]
    if wrong:
        raise ValueError(f"{Path(tag_dir) / MANIFEST}: checkpoint does not match: {', '.join(wrong)}")
    return manifest


def verify_files(tag_dir: Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Recompute every file's size and sha256 against the manifest; return the problems found."""
    root = Path(tag_dir)
    manifest = manifest or read_manifest(root)
    problems = []
    for name, meta in sorted(manifest["files"].items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {meta['bytes']}")
        elif file_sha256(path) != meta["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


class CorruptCheckpoint(ValueError):
    """A file of a checkpoint differs from its manifest (size or sha256)."""


def require_verified(tag_dir: Path, manifest: dict[str, Any] | None = None, names: list[str] | None = None) -> None:
    """Refuse a checkpoint whose files (or just ``names``, relative to the tag) differ from the
    manifest's sizes and sha256s: a flipped byte in tensor data loads without any error otherwise."""
    manifest = manifest or read_manifest(tag_dir)
    if names is not None:
        missing = [n for n in names if n not in manifest["files"]]
        if missing:
            raise CorruptCheckpoint(f"{Path(tag_dir) / MANIFEST}: lists no {missing[0]}")
        manifest = dict(manifest, files={n: manifest["files"][n] for n in names})
    problems = verify_files(tag_dir, manifest)
    if problems:
        raise CorruptCheckpoint(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                + "; the checkpoint is damaged: convert or save it again")


@contextmanager
def publish_directory(destination: str | Path, overwrite: bool = False, nbytes: int | None = None,
                      what: str = "the output", log=print) -> Iterator[Path]:
    """Build a directory in an owned staging sibling and move it onto ``destination`` only on success.

    First removes the stale staging left beside it by crashed runs, and refuses an existing
    non-empty destination unless ``overwrite``, or (given ``nbytes``, the size of what will be
    written) a filesystem without room for it. On any error the staging directory is removed and
    the destination is left exactly as it was; running out of space midway says so.
    """
    destination = Path(destination).absolute()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        raise FileExistsError(f"{destination}: exists and is not empty (pass --overwrite to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(destination.parent, log)
    if nbytes is not None:
        require_free_space(destination, nbytes, what)
    staging = create_staging(destination)
    try:
        yield staging
        replace_directory(staging, destination)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if is_out_of_space(err):
            raise out_of_space_error(err, destination, what) from err
        raise
