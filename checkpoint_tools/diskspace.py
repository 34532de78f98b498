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


# safetensors' writer reports the OS error only in its message.
_FULL_DISK_TEXT = ("No space left on device", "Disk quota exceeded", "(os error 28)", "(os error 122)")
# torch.save's zip writer fails a short write with a RuntimeError that carries no errno
# ("[enforce fail at inline_container.cc:...] unexpected pos ..." or "PytorchStreamWriter failed writing file").
_TORCH_WRITE_FAILURE = ("inline_container.cc", "PytorchStreamWriter failed writing")
# Below this much space left where a torch.save just failed, the filesystem is taken as full.
FULL_BELOW_BYTES = 1 << 20


def is_out_of_space(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, as an OSError or in the message of a writer that reports it as text (safetensors)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(text in str(err) for text in _FULL_DISK_TEXT)


def torch_write_failure_as_enospc(err: RuntimeError, path: str | Path) -> OSError | None:
    """``OSError(ENOSPC)`` for a ``torch.save`` that failed writing ``path`` because its filesystem is
    full (checked now, while the partial file still holds the space), else None: torch's error carries
    no errno, so without this a full disk would reach the user as an internal-looking RuntimeError."""
    if not any(text in str(err) for text in _TORCH_WRITE_FAILURE):
        return None
    probe = Path(path).absolute().parent
    while not probe.exists():
        probe = probe.parent
    if shutil.disk_usage(probe).free >= FULL_BELOW_BYTES:
        return None
    return OSError(errno.ENOSPC, f"No space left on device (torch.save: {err})", str(path))


def out_of_space_error(err: BaseException, destination: Path, what: str) -> DiskSpaceError:
    """The error for ENOSPC midway: says which file failed and that nothing else was changed."""
    detail = f"{getattr(err, 'filename', None) or 'a file'}: {getattr(err, 'strerror', None) or err}"
    return DiskSpaceError(errno.ENOSPC, f"{destination}: the disk filled up while writing {what} ({detail}); the "
                                        f"partial output was removed and {destination} is as it was before. Free "
                                        "space there (or write elsewhere) and run the command again")
