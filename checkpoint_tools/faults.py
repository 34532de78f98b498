"""A deterministic fault hook for crash tests: kill the process, or fail a write with ENOSPC,
at an exact point of any writing command, and pretend the disk is smaller than it is.

Every writer calls ``file_written(path)`` when a file of its output is complete. The hook
reads ``NXD_LORA_FAULT`` (comma-separated ``key=value``), for example::

    NXD_LORA_FAULT=action=kill,after=3                 SIGKILL once the 3rd file is written
    NXD_LORA_FAULT=action=kill,after=2,path=step_4,rank=1
                                                      ... counting only files whose path holds
                                                      "step_4", on global rank 1 only
    NXD_LORA_FAULT=action=enospc,after=2               the 2nd file's write fails with ENOSPC
    NXD_LORA_FAULT=action=free,bytes=1000000           the disk-space preflight sees 1 MB free
    NXD_LORA_FAULT=action=kill,at=swapped              SIGKILL at a named point between two renames
                                                      (``point_reached``: claimed, swapped)

Unset (the normal case) it costs one environment lookup per file. It exists so that the crash
matrix in ``tests/test_crash_matrix.py`` can stop a real command at every point it cares about,
the same way on every run, instead of racing a timer.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

ENV = "NXD_LORA_FAULT"
_counted = {"files": 0}


def _spec() -> dict[str, str]:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return {}
    try:
        spec = dict(part.split("=", 1) for part in raw.split(","))
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected comma-separated key=value pairs, e.g. action=kill,after=3") from None
    if spec.get("action") not in ("kill", "enospc", "free"):
        raise ValueError(f"{ENV}={raw!r}: action must be kill, enospc or free")
    return spec


def _applies_here(spec: dict[str, str]) -> bool:
    return "rank" not in spec or spec["rank"] == os.environ.get("RANK", "0")


def file_written(path: str | Path) -> None:
    """Count one finished output file; kill or fail here if the fault spec says so."""
    spec = _spec()
    if spec.get("action") not in ("kill", "enospc") or "at" in spec or not _applies_here(spec):
        return
    if spec.get("path") and spec["path"] not in str(path):
        return
    _counted["files"] += 1
    if _counted["files"] != int(spec.get("after", "1")):
        return
    if spec["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, "No space left on device (injected by NXD_LORA_FAULT)", str(path))


def point_reached(name: str) -> None:
    """A named point of a writer with no file to count (between two renames): SIGKILL here if the
    fault spec says ``action=kill,at=<name>``."""
    spec = _spec()
    if spec.get("action") == "kill" and spec.get("at") == name and _applies_here(spec):
        os.kill(os.getpid(), signal.SIGKILL)


def fake_free_bytes() -> int | None:
    """The free space the preflight should see instead of the real one, if the spec sets it."""
    spec = _spec()
    return int(spec["bytes"]) if spec.get("action") == "free" and _applies_here(spec) else None
