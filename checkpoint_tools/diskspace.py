"""Refuse, before writing anything, an output that its filesystem cannot hold.

Writers compute the bytes they are about to write (tensor sizes are known from shapes before
any weight is read) and call ``require_free_space``, which wants that many plus a margin for
file headers, small files and whatever else shares the disk.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from checkpoint_tools.faults import fake_free_bytes

MARGIN_FRACTION = 0.02
MARGIN_MIN_BYTES = 64 << 20


class DiskSpaceError(OSError):
    """Too little free space for an output: raised before it is started, or on ENOSPC midway."""

    def __str__(self) -> str:
        return self.strerror


def margin(nbytes: int) -> int:
    return max(MARGIN_MIN_BYTES, int(nbytes * MARGIN_FRACTION))


def free_bytes(path: str | Path) -> int:
    """Free space (for an unprivileged writer) on the filesystem that holds, or will hold, ``path``."""
    fake = fake_free_bytes()
    if fake is not None:
        return fake
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError


def require_free_space(path: str | Path, nbytes: int, what: str) -> None:
    """Raise ``DiskSpaceError`` unless ``path``'s filesystem has ``nbytes`` + margin free."""
    needed = nbytes + margin(nbytes)
    free = free_bytes(path)
    if free < needed:
        raise DiskSpaceError(errno.ENOSPC, f"{path}: {what} needs {_size(needed)} ({_size(nbytes)} of files + "
                                           f"{_size(margin(nbytes))} margin) but the filesystem has only "
                                           f"{_size(free)} free; nothing was written")


def is_out_of_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def out_of_space_error(err: OSError, destination: Path, what: str) -> DiskSpaceError:
    """The error for ENOSPC midway: says which file failed and that nothing else was changed."""
    return DiskSpaceError(errno.ENOSPC, f"{destination}: the disk filled up while writing {what} "
                                        f"({err.filename or 'a file'}: {err.strerror}); the partial output was "
                                        f"removed and {destination} is as it was before")
