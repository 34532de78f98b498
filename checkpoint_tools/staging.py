"""Staging directories that say who owns them, so the litter of a crashed run can be removed.

Every directory nxd-lora builds before publishing it (``convert``, ``export``, checkpoint
tags, save modes) is a hidden sibling of its destination, ``.<name>.partial[-<suffix>]``,
holding an owner record (``.nxd-lora-owner.json``: pid, host, boot id, the process's start
time) written right after it is created. A process killed with ``kill -9`` cannot clean up;
the next nxd-lora command that writes in the same directory calls ``sweep_stale``, which
removes every staging directory whose owner is gone and leaves alone those whose owner is
alive, or lives on another host (there is no way to tell from here; ``inspect`` lists them).

"Gone" is decided on this host only: no such pid, a zombie, a pid reused by a process that
started later, or a different boot. A pid alone is not enough: in a restarted container the
same pid comes back for another process.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from checkpoint_tools.faults import point_reached

OWNER_FILE = ".nxd-lora-owner.json"
STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)(-[A-Za-z0-9_]+)?$")
UNOWNED_GRACE_SECONDS = 60.0  # a staging directory has no owner record only between mkdir and the next write


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    boot_id: str | None
    start_ticks: int | None  # /proc/<pid>/stat field 22: distinguishes a reused pid
    started: str  # human-readable start of the save, for inspect

    def status(self) -> str:
        """``alive``, ``gone`` or ``other host`` (cannot be checked from here)."""
        if self.host != _host():
            return "other host"
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return "gone"
        stat = _proc_stat(self.pid)
        if stat is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return "gone"
            except PermissionError:
                return "alive"
            return "alive"
        state, ticks = stat
        if state in ("Z", "X") or (self.start_ticks is not None and ticks != self.start_ticks):
            return "gone"
        return "alive"

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _host() -> str:
    return socket.gethostname()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, or None where there is no /proc.
    A missing entry on a host with /proc means the process is gone: ("X", -1)."""
    if not Path("/proc/self/stat").exists():
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ("X", -1)
    return fields[0], int(fields[19])


def this_process() -> Owner:
    stat = _proc_stat(os.getpid())
    return Owner(pid=os.getpid(), host=_host(), boot_id=_boot_id(), start_ticks=stat[1] if stat else None,
                 started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def claim(directory: Path) -> None:
    """Write this process's owner record into ``directory`` (small, so written in place)."""
    (Path(directory) / OWNER_FILE).write_text(json.dumps(asdict(this_process())) + "\n")


def read_owner(directory: Path) -> Owner | None:
    try:
        return Owner(**json.loads((Path(directory) / OWNER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def create_staging(destination: Path) -> Path:
    """A new owned staging directory beside ``destination``: ``.<name>.partial-<random>``."""
    destination = Path(destination)
    while True:
        path = destination.with_name(f".{destination.name}.partial-{secrets.token_hex(4)}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        claim(path)
        return path


def start_staging(path: Path) -> None:
    """Create the fixed-name staging directory ``path`` (rank 0 of a multi-rank save, whose other
    ranks know the name) with this process's owner record. A leftover of a dead owner is replaced;
    one whose owner is alive belongs to another run writing the same tag, which is refused."""
    path = Path(path)
    if path.exists():
        owner = read_owner(path)
        if owner is not None and owner.status() != "gone" and owner.pid != os.getpid():
            raise RuntimeError(f"{path}: being written by {owner.describe()} ({owner.status()}); is another run "
                               f"using the same output directory?")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    claim(path)


@dataclass
class Litter:
    path: Path
    owner: Owner | None
    status: str  # alive | gone | other host | unowned

    @property
    def stale(self) -> bool:
        return self.status in ("gone", "unowned")

    def describe(self) -> str:
        who = self.owner.describe() if self.owner else "no owner record"
        return f"{self.path} ({tree_bytes(self.path) / 2**20:.1f} MiB; {who}: {self.status})"


def find_litter(parent: Path) -> list[Litter]:
    """Every staging directory in ``parent`` (not recursive), with its owner's status."""
    found = []
    try:
        entries = sorted(Path(parent).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for path in entries:
        if not STAGING_NAME.match(path.name) or not path.is_dir() or path.is_symlink():
            continue
        owner = read_owner(path)
        if owner is not None:
            status = owner.status()
        else:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            status = "unowned" if age > UNOWNED_GRACE_SECONDS else "alive"
        found.append(Litter(path, owner, status))
    return found


def stray_owner_records(parent: Path) -> list[Path]:
    """Owner records of gone owners inside published (non-staging) directories of ``parent``: what a
    crash leaves between ``replace_directory``'s claim of the old version and the swap, or between the
    swap and the removal of the new version's record. The version there is complete either way."""
    try:
        entries = sorted(Path(parent).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for path in entries:
        if STAGING_NAME.match(path.name) or not path.is_dir() or path.is_symlink():
            continue
        owner = read_owner(path)
        if owner is not None and owner.status() == "gone":
            found.append(path / OWNER_FILE)
    return found


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def sweep_stale(parent: Path, log: Callable[[str], None] = print) -> int:
    """Remove the stale staging directories in ``parent``; one line each; returns bytes freed.

    An ``.old`` directory (the previous version, renamed aside by ``replace_directory`` where the
    filesystem cannot swap two directories) whose destination is missing is moved back instead:
    the crash hit between the two renames, and it is the last complete version.
    """
    freed = 0
    for published in stray_owner_records(parent):
        published.unlink(missing_ok=True)
        log(f"nxd-lora: removed {published}, an owner record left in a published output by a run that crashed "
            "while swapping it in (the output itself is complete)")
    for item in find_litter(parent):
        if not item.stale:
            continue
        match = STAGING_NAME.match(item.path.name)
        destination = item.path.with_name(match.group("name"))
        if match.group("kind") == "old" and not destination.exists():
            os.replace(item.path, destination)
            (destination / OWNER_FILE).unlink(missing_ok=True)
            log(f"nxd-lora: restored {destination} from {item.path.name}, left by a crashed run")
            continue
        size = tree_bytes(item.path)
        shutil.rmtree(item.path, ignore_errors=True)
        if not item.path.exists():
            freed += size
            log(f"nxd-lora: removed stale staging {item.path} ({item.owner.describe() if item.owner else 'no owner'}"
                f", gone): freed {size / 2**20:.1f} MiB")
    return freed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95, 18):  # EINVAL, ENOSYS, EOPNOTSUPP (filesystem cannot), EXDEV
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_directory(staging: Path, destination: Path) -> None:
    """Move a finished ``staging`` directory onto ``destination``, replacing what was there.

    With an existing destination the two are swapped in one atomic step, so the final name
    always holds one complete version; the old version, now under the staging name (with an
    owner record), is then deleted, and a crash while deleting leaves only stale litter. Where
    the filesystem cannot swap, the old version is renamed aside to ``.<name>.old-<random>``
    first, which ``sweep_stale`` puts back if the crash came before the second rename.
    """
    staging, destination = Path(staging), Path(destination)
    if destination.exists():
        if destination.is_dir():
            claim(destination)
            point_reached("claimed")  # killed here: the published version holds our owner record
        if _exchange(staging, destination):
            point_reached("swapped")  # killed here: the new version holds our owner record
            (destination / OWNER_FILE).unlink(missing_ok=True)
            _remove(staging)
            return
        old = destination.with_name(f".{destination.name}.old-{secrets.token_hex(4)}")
        os.replace(destination, old)
        os.replace(staging, destination)
        point_reached("swapped")
        (destination / OWNER_FILE).unlink(missing_ok=True)
        _remove(old)
    else:
        os.replace(staging, destination)
        point_reached("swapped")
        (destination / OWNER_FILE).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()
