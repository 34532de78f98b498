"""Owned staging directories, the sweep of crash litter, the directory swap and the disk preflight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from checkpoint_tools import staging
from checkpoint_tools.convert import convert_to_nxd, nxd_checkpoint_bytes
from checkpoint_tools.diskspace import DiskSpaceError, require_free_space
from checkpoint_tools.faults import ENV
from checkpoint_tools.inspect import inspect_path
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_format import BASE_TAG, publish_directory, resolve_tag_dir
from conftest import LLAMA3_TINY, LLAMA32_TIED_TINY, make_hf_model
from nxd_lora.train.run import newest_training_tag

QUIET = dict(log=lambda message: None)


def dead_owner() -> staging.Owner:
    """The owner record of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return replace(staging.this_process(), pid=child.pid, start_ticks=None)


def owned_dir(path, owner: staging.Owner):
    path.mkdir()
    (path / staging.OWNER_FILE).write_text(json.dumps(owner.__dict__))
    (path / "blob").write_bytes(b"x" * 3 * 2**20)
    return path


def test_owner_status_alive_gone_reused_and_other_host():
    me = staging.this_process()
    assert me.status() == "alive"
    assert dead_owner().status() == "gone"
    assert replace(me, start_ticks=me.start_ticks + 1).status() == "gone"  # same pid, another process
    assert replace(me, boot_id="another-boot").status() == "gone"
    assert replace(me, host="elsewhere").status() == "other host"


def test_sweep_removes_only_litter_of_dead_owners(tmp_path):
    gone = owned_dir(tmp_path / ".out.partial-1a2b3c4d", dead_owner())
    alive = owned_dir(tmp_path / ".out2.partial-00000000", staging.this_process())
    remote = owned_dir(tmp_path / ".ckpt.partial", replace(staging.this_process(), host="elsewhere"))
    unowned_fresh = tmp_path / ".x.partial-ffffffff"
    unowned_fresh.mkdir()
    unowned_old = tmp_path / ".y.partial-eeeeeeee"
    unowned_old.mkdir()
    os.utime(unowned_old, (0, 0))
    keep = tmp_path / "out"
    keep.mkdir()
    lines = []
    freed = staging.sweep_stale(tmp_path, lines.append)
    assert not gone.exists() and not unowned_old.exists()
    assert alive.exists() and remote.exists() and unowned_fresh.exists() and keep.exists()
    assert 3 * 2**20 < freed < 3 * 2**20 + 4096  # the blob and its owner record
    assert len(lines) == 2 and "freed 3.0 MiB" in " ".join(lines) and str(gone) in " ".join(lines)


def test_a_live_owner_of_the_same_tag_is_refused_and_a_dead_one_replaced(tmp_path):
    init = replace(staging.this_process(), pid=1, start_ticks=staging._proc_stat(1)[1])  # pid 1 lives
    path = owned_dir(tmp_path / ".step_4.partial", init)
    with pytest.raises(RuntimeError, match=r"\.step_4\.partial: being written by pid 1 .*same output directory"):
        staging.start_staging(path)
    (path / staging.OWNER_FILE).write_text(json.dumps(dead_owner().__dict__))
    staging.start_staging(path)
    assert not (path / "blob").exists() and staging.read_owner(path).pid == os.getpid()


@pytest.mark.smoke
def test_swap_keeps_one_complete_version_and_the_old_one_is_owned(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "v").write_text("old")
    new = staging.create_staging(dest)
    (new / "v").write_text("new")
    seen = {}
    real_remove = staging._remove

    def remove(path):
        seen["old"] = (path.name, (path / "v").read_text(), staging.read_owner(path) is not None)
        real_remove(path)

    monkeypatch.setattr(staging, "_remove", remove)
    staging.replace_directory(new, dest)
    assert (dest / "v").read_text() == "new" and not (dest / staging.OWNER_FILE).exists()
    assert seen["old"] == (new.name, "old", True)  # a crash while deleting leaves owned, sweepable litter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_the_swap_an_old_version_left_alone_is_put_back(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "v").write_text("old")
    new = staging.create_staging(dest)
    staging.replace_directory(new, dest)  # the rename path works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # The crash between its two renames: only ".out.old-*" (owned by a dead process) holds the model.
    os.replace(dest, tmp_path / ".out.old-12345678")
    (tmp_path / ".out.old-12345678" / staging.OWNER_FILE).write_text(json.dumps(dead_owner().__dict__))
    lines = []
    staging.sweep_stale(tmp_path, lines.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and "restored" in lines[0]
    assert not (dest / staging.OWNER_FILE).exists()


def test_staging_directories_never_count_as_complete_tags(tmp_path):
    for name in ("step_2", ".step_4.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "done").write_text("1")
        (tmp_path / name / "user_content.pt").write_bytes(b"")
    os.utime(tmp_path / "step_2" / "done", (1, 1))
    assert resolve_tag_dir(tmp_path).name == "step_2" and newest_training_tag(tmp_path).name == "step_2"


def test_inspect_lists_litter_beside_a_checkpoint(tmp_path):
    model = make_hf_model(LLAMA3_TINY)
    model.save_pretrained(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "nxd", 2, **QUIET)
    owned_dir(tmp_path / ".nxd.partial-0badf00d", dead_owner())
    report, _ = inspect_path(tmp_path / "nxd")
    assert ".nxd.partial-0badf00d (3.0 MiB; pid" in report and "gone); the next write here removes it" in report


@pytest.mark.parametrize("config,tp,fuse", [(LLAMA3_TINY, 4, False), (LLAMA32_TIED_TINY, 8, True)])
def test_conversion_size_is_known_before_reading(tmp_path, config, tp, fuse):
    model = make_hf_model(config)
    model.save_pretrained(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "nxd", tp, fuse_qkv=fuse, **QUIET)
    written = sum(t.numel() * t.element_size() for p in (tmp_path / "nxd" / BASE_TAG / "model").iterdir()
                  for t in torch.load(p, weights_only=True).values())
    assert nxd_checkpoint_bytes(LlamaConfig.from_dict(config), tp, fuse, torch.float32) == written


def test_preflight_names_the_path_and_both_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "action=free,bytes=1048576")
    with pytest.raises(DiskSpaceError, match=rf"{tmp_path}: the thing needs 64\.0 MiB \(1\.0 KiB of files \+ 64\.0 MiB "
                                             rf"margin\) but the filesystem has only 1\.0 MiB free; nothing was written"):
        require_free_space(tmp_path, 1024, "the thing")
    with pytest.raises(DiskSpaceError):
        with publish_directory(tmp_path / "out", nbytes=1024, **QUIET):
            raise AssertionError("must not start")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv(ENV)
    require_free_space(tmp_path, 1024, "the thing")
