"""Run a function on N local ranks the way torchrun would, and collect what each returns.

Used by ``nxd-lora demo`` and the tests, so multi-rank TP runs on one machine without a
launcher. Each rank is a fresh spawned process with torchrun's environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); results travel back as
``torch.save`` files holding tensors and plain Python values.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # gloo's per-connection chatter
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def spawn_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return the per-rank results in rank order.

    ``fn`` must be importable by name (a module-level function). A failing rank raises
    ``RuntimeError`` carrying that rank's traceback; the other ranks are stopped at once then (they
    would wait forever in their next collective), as is every rank after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nxd_lora_ranks_") as out_dir:
        procs = [
            ctx.Process(target=_rank_entry, args=(fn, rank, world_size, port, out_dir, args), daemon=False)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        errors = sorted(Path(out_dir).glob("rank*.err"))
        if errors:
            raise RuntimeError(f"{errors[0].stem} failed:\n{errors[0].read_text()}")
        failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"ranks exited abnormally (rank, exit code): {failed}")
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
