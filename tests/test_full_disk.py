"""A really full filesystem: a small tmpfs, filled up, under convert, a training save and export.

The crash matrix injects ``OSError(ENOSPC)`` through the fault hook; here the writers meet the real
thing, which ``torch.save`` reports as a RuntimeError with no errno and safetensors as its own error
type. Each command must say the disk filled up, remove its partial output and leave the previous
version of its destination loadable. The disk-space preflight (which would refuse these small
filesystems before writing) is told a large free size through the fault hook, so that the write
itself meets the full disk; the preflight against the real free space is checked last.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from checkpoint_tools.convert import convert_to_nxd
from checkpoint_tools.diskspace import DiskSpaceError
from checkpoint_tools.nxd_format import BASE_TAG, read_manifest, verify_files
from nxd_lora.cli import main
from nxd_lora.demo import write_tiny_hf_model

# How torch.save reports a full disk (a RuntimeError without errno) is PyTorch's behaviour, per version.
pytestmark = pytest.mark.torch_version

QUIET = dict(log=lambda message: None)
PASS_PREFLIGHT = "action=free,bytes=1000000000000"


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs mounted for this test (root only; CI runs as root)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs a small real filesystem to fill: 'mount -t tmpfs' failed here ({done.stderr.strip()}); "
                    "run the suite as root, as CI does")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(fs: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of ``fs``'s free space."""
    free = shutil.disk_usage(fs).free
    with open(fs / "filler", "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, free - leave))


def left_over(fs: Path) -> list[str]:
    """Staging or temporary files left anywhere under ``fs``."""
    return sorted(str(p.relative_to(fs)) for p in fs.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp"))


def test_convert_export_and_a_training_save_on_a_full_disk(small_fs, tmp_path, monkeypatch, capsys):
    from nxd_lora.backends import get_backend
    from nxd_lora.checkpointing import save_lora_checkpoint
    from nxd_lora.lora.config import LoraConfig
    from nxd_lora.model.builder import build_trained_model

    monkeypatch.setenv("NXD_LORA_FAULT", PASS_PREFLIGHT)
    hf = write_tiny_hf_model(tmp_path / "hf")
    ckpt = small_fs / "ckpt"
    convert_to_nxd(hf, ckpt, 1, **QUIET)  # the previous good version, then a LoRA save and exports of it
    backend = get_backend("cpu")
    backend.setup(1)
    try:
        model = build_trained_model(ckpt / BASE_TAG, None, backend)
        lora = LoraConfig(lora_rank=64, lora_alpha=64, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        from nxd_lora.lora.model import apply_lora

        apply_lora(model, lora, layers=backend.layers)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_()
        runs = small_fs / "runs"
        save_lora_checkpoint(model, backend, runs, "step_1", "adapter", lora, **QUIET)
        assert main(["export", str(runs / "step_1"), str(small_fs / "peft"), "--base-model", str(hf)]) == 0
        capsys.readouterr()
        fill(small_fs, leave=16 << 10)  # less than one rank file of the adapter

        # a training save: torch.save meets the full disk
        with pytest.raises(DiskSpaceError, match=r"the disk filled up while writing checkpoint step_2 \(.*No space left"):
            save_lora_checkpoint(model, backend, runs, "step_2", "adapter", lora, **QUIET)
        assert not (runs / "step_2").exists() and (runs / "step_1" / "done").is_file()
        assert verify_files(runs / "step_1") == []
    finally:
        backend.teardown()

    # convert over the previous version (--overwrite): the previous one stays, complete
    before = read_manifest(ckpt / BASE_TAG)
    assert main(["convert", str(hf), str(ckpt), "--tp", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "the disk filled up while writing the NxD checkpoint" in err and "No space left on device" in err, err
    assert read_manifest(ckpt / BASE_TAG) == before and verify_files(ckpt / BASE_TAG) == []

    # export (safetensors' writer) over the previous export, PEFT and merged
    previous = sorted(p.name for p in (small_fs / "peft").iterdir())
    assert main(["export", str(runs / "step_1"), str(small_fs / "peft"), "--overwrite", "--base-model", str(hf)]) == 2
    assert main(["export", str(runs / "step_1"), str(small_fs / "merged"), "--merged", "--base", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("the disk filled up while writing") == 2, err
    assert sorted(p.name for p in (small_fs / "peft").iterdir()) == previous and not (small_fs / "merged").exists()
    assert left_over(small_fs) == []

    # the preflight, on the real free space, refuses before writing anything
    monkeypatch.delenv("NXD_LORA_FAULT")
    assert main(["convert", str(hf), str(small_fs / "other"), "--tp", "1"]) == 2
    assert "nothing was written" in capsys.readouterr().err and not (small_fs / "other").exists()
