"""The kill -9 matrix: every writing command, stopped by SIGKILL at chosen points of its output.

Each case runs the real command in a subprocess with ``NXD_LORA_FAULT`` set (see
``checkpoint_tools/faults.py``: the process kills itself right after the named file is written),
then checks that
* the previous good state is still there, byte for byte, and verifies against its manifest;
* the kill left litter (so the case really hit a write in progress), owned by a dead process;
* the next run without a fault succeeds, says it removed the litter, and leaves none.
Training is killed at periodic checkpoints (either rank), at every final save mode and at the
PEFT export, resuming each time; the run that finally completes must end with bit-identical
LoRA weights to a run that was never interrupted. Injected ENOSPC, a disk-space preflight and
a flipped byte complete it. The matrix and its results are recorded in README.md (Reliability).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_tools.faults import ENV
from checkpoint_tools.nxd_format import BASE_TAG, complete_tags, rank_path, read_manifest, require_verified
from checkpoint_tools.staging import OWNER_FILE, find_litter
from nxd_lora.demo import write_tiny_hf_model
from nxd_lora.local_launch import free_port

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "nxd_lora.cli"]
TRAIN = ["train.tp=2", "lora.lora_rank=8", "lora.lora_alpha=16", "lora.target_modules=[qkv_proj,o_proj]",
         "data.seq_len=512", "data.val_fraction=0", "train.max_steps=6", "train.save_every=2",
         "train.save_modes=[adapter,base+adapter,merged]", "train.micro_batch_size=1", "train.loggers=[]"]


def run(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, NXD_LORA_NO_BAR="1", TORCH_CPP_LOG_LEVEL="ERROR")
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "--monitor-interval", "0.1", *CLI[1:], *args], fault)


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def litter_under(root: Path) -> list[Path]:
    """Staging directories anywhere under ``root`` (and beside it)."""
    places = [root.parent, root, *(p for p in root.rglob("*") if p.is_dir())]
    return [item.path for place in places for item in find_litter(place)]


def assert_killed_with_litter(done: subprocess.CompletedProcess, root: Path) -> None:
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    stale = [item for place in [root.parent, root, *root.rglob("*")] if place.is_dir()
             for item in find_litter(place)]
    assert stale and all(item.status == "gone" for item in stale), [i.describe() for i in stale]


def assert_clean_success(done: subprocess.CompletedProcess, root: Path) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "removed stale staging" in done.stdout + done.stderr
    assert litter_under(root) == []


# --- convert: the real model, HF -> NxD TP=3, --overwrite over a good conversion --------------------
CONVERT_POINTS = ["pretrained_weight/checkpoint", "tp_rank_00", "tp_rank_02", "nxd_lora_manifest.json",
                  "pretrained_weight/done"]


@pytest.fixture(scope="module")
def real_tp3(smollm2_tp3, tmp_path_factory):
    """A copy of the session's conversion (`convert smollm2_hf --tp 3`), which every case overwrites
    with the same command; the copy keeps the session's own for its other readers."""
    out = tmp_path_factory.mktemp("matrix") / "tp3"
    shutil.copytree(smollm2_tp3, out)
    require_verified(out / BASE_TAG)
    return out


@pytest.mark.parametrize("point", CONVERT_POINTS)
def test_convert_killed(smollm2_hf, real_tp3, point):
    before = files_of(real_tp3)
    args = [*CLI, "convert", str(smollm2_hf), str(real_tp3), "--tp", "3", "--overwrite"]
    assert_killed_with_litter(run(args, f"action=kill,path={point}"), real_tp3)
    assert files_of(real_tp3) == before
    require_verified(real_tp3 / BASE_TAG)
    assert_clean_success(run(args), real_tp3)
    require_verified(real_tp3 / BASE_TAG)


# --- training: tiny model, TP=2 under torchrun -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_matrix")
    write_tiny_hf_model(root / "hf")
    done = run([*CLI, "convert", str(root / "hf"), str(root / "tp2"), "--tp", "2"])
    assert done.returncode == 0, done.stderr
    return root


def train_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model.checkpoint={tiny / 'tp2'}", f"model.tokenizer={tiny / 'hf'}", f"train.output_dir={out}",
            *TRAIN, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_tp2):
    out = tiny_tp2 / "uninterrupted"
    done = torchrun(train_args(tiny_tp2, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def lora_tensors(out: Path, tag: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(rank_path(out / "final" / tag, r), weights_only=True) for r in range(2)]


# (what is killed, NXD_LORA_FAULT); each resumes the run the previous one left.
TRAIN_KILLS = [
    ("rank 1 after its step_4 rank file", "action=kill,rank=1,path=.step_4.partial/model"),
    ("rank 0 after step_4's manifest", "action=kill,rank=0,path=.step_4.partial/nxd_lora_manifest"),
    ("rank 0 after step_4's done, before the swap", "action=kill,rank=0,path=.step_4.partial/done"),
    ("rank 0 after its step_6 optimizer file", "action=kill,rank=0,path=.step_6.partial/optim"),
    ("final adapter save, rank 1", "action=kill,rank=1,path=.adapter.partial/model"),
    ("final base+adapter save, after the marker", "action=kill,rank=0,path=.base_adapter.partial/checkpoint"),
    ("final merged save, after the manifest", "action=kill,rank=0,path=.merged.partial/nxd_lora_manifest"),
    ("PEFT export", "action=kill,rank=0,path=adapter_model.safetensors"),
]


def test_training_killed_at_every_save_resumes_to_the_uninterrupted_lora(tiny_tp2, uninterrupted):
    out = tiny_tp2 / "killed"
    args = train_args(tiny_tp2, out, "train.resume=auto")
    for what, fault in TRAIN_KILLS:
        periodic = {tag: files_of(tag) for tag in complete_tags(out / "checkpoints")}
        final = complete_tags(out / "final")
        assert_killed_with_litter(torchrun(args, fault), out)
        # Periodic tags are never rewritten: byte for byte as before. A final tag may have been saved
        # again by the killed run (it saves every mode each time), so it must be complete, whichever it is.
        assert {tag: files_of(tag) for tag in periodic} == periodic, what
        assert set(final) <= set(complete_tags(out / "final")), what
        for tag in complete_tags(out / "checkpoints") + complete_tags(out / "final"):
            require_verified(tag)
    assert_clean_success(torchrun(args), out)
    assert (out / "final" / "peft" / "adapter_model.safetensors").is_file()
    for tag in ("adapter", "base_adapter", "merged"):
        for got, want in zip(lora_tensors(out, tag), lora_tensors(uninterrupted, tag)):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), tag
    assert files_of(out / "final" / "peft") == files_of(uninterrupted / "final" / "peft")


def test_training_rank_out_of_space_fails_every_rank_and_keeps_earlier_tags(tiny_tp2):
    out = tiny_tp2 / "enospc"
    done = torchrun(train_args(tiny_tp2, out), "action=enospc,rank=1,path=.step_4.partial/model")
    assert done.returncode != 0
    assert "the disk filled up while writing checkpoint step_4" in done.stdout + done.stderr
    assert [t.name for t in complete_tags(out / "checkpoints")] == ["step_2"] and litter_under(out) == []
    require_verified(out / "checkpoints" / "step_2")


def test_training_refuses_to_start_without_room_for_its_saves(tiny_tp2):
    out = tiny_tp2 / "nospace"
    done = torchrun(train_args(tiny_tp2, out), "action=free,bytes=1000")
    assert done.returncode != 0
    assert "this run's 3 checkpoint(s) and final saves ['adapter', 'base+adapter', 'merged'] needs" in done.stderr
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


# --- export: PEFT and merged, --overwrite over a good export -----------------------------------------
@pytest.mark.parametrize("kind,point", [("peft", "adapter_model.safetensors"), ("peft", "adapter_config.json"),
                                        ("merged", "model-00001-of-00001.safetensors"),
                                        ("merged", "model.safetensors.index.json"), ("merged", "/config.json")])
def test_export_killed(tiny_tp2, uninterrupted, kind, point):
    dst = tiny_tp2 / f"export_{kind}"
    args = [*CLI, "export", str(uninterrupted / "final" / "base_adapter"), str(dst), "--overwrite",
            *(["--merged"] if kind == "merged" else [])]
    if not dst.exists():
        assert run(args).returncode == 0
    before = files_of(dst)
    assert_killed_with_litter(run(args, f"action=kill,path={point}"), dst)
    assert files_of(dst) == before
    assert_clean_success(run(args), dst)
    assert files_of(dst) == before  # the same export again, bit for bit


@pytest.mark.parametrize("point", ["claimed", "swapped"])
def test_export_killed_between_the_renames_leaves_a_complete_output_and_the_next_run_drops_the_owner_record(
        tiny_tp2, uninterrupted, point):
    """The two points of ``replace_directory`` with no file to count: after the published version is
    claimed (before the swap), and after the swap (before the new version's owner record is removed).
    The destination is complete either way (this export is the same bits each time); the record of the
    dead run left in it is removed by the next writer's sweep, saying so."""
    dst = tiny_tp2 / "export_windows"
    args = [*CLI, "export", str(uninterrupted / "final" / "base_adapter"), str(dst), "--overwrite"]
    if not dst.exists():
        assert run(args).returncode == 0
    before = files_of(dst)
    done = run(args, f"action=kill,at={point}")
    assert done.returncode != 0
    after = files_of(dst)
    assert after.pop(OWNER_FILE) and after == before  # complete, plus the dead run's owner record
    done = run(args)
    assert done.returncode == 0 and "an owner record left in a published output" in done.stdout + done.stderr
    assert files_of(dst) == before and litter_under(dst) == []


# --- convert: ENOSPC midway, the preflight, a flipped byte -------------------------------------------
@pytest.mark.smoke
def test_convert_out_of_space_midway_and_before_starting(tiny_tp2):
    dst = tiny_tp2 / "tp2"
    before = files_of(dst)
    args = [*CLI, "convert", str(tiny_tp2 / "hf"), str(dst), "--tp", "2", "--overwrite"]
    done = run(args, "action=enospc,path=tp_rank_01")
    assert done.returncode == 2 and "the disk filled up while writing the NxD checkpoint" in done.stderr
    assert f"{dst} is as it was before" in done.stderr
    assert files_of(dst) == before and litter_under(dst) == []
    fresh = tiny_tp2 / "never_written"
    done = run([*CLI, "convert", str(tiny_tp2 / "hf"), str(fresh), "--tp", "2"], "action=free,bytes=1000")
    assert done.returncode == 2 and f"{fresh}: the NxD checkpoint needs" in done.stderr
    assert "but the filesystem has only 1000 B free; nothing was written" in done.stderr
    assert not fresh.exists() and litter_under(tiny_tp2) == []


def test_a_flipped_byte_is_caught_by_verify_and_by_every_load(tiny_tp2, uninterrupted, tmp_path):
    from nxd_lora.train.run import load_verified

    base = tmp_path / "base"
    assert run([*CLI, "convert", str(tiny_tp2 / "hf"), str(base), "--tp", "2"]).returncode == 0
    trained = tmp_path / "trained"
    subprocess.run(["cp", "-r", str(uninterrupted / "final" / "adapter"), str(trained)], check=True)
    for tag in (base / BASE_TAG, trained):
        path = rank_path(tag, 1)
        data = bytearray(path.read_bytes())
        largest = max(torch.load(path, weights_only=True).values(), key=torch.Tensor.numel)
        at = data.find(largest.contiguous().view(torch.uint8).numpy().tobytes())
        assert at > 0
        data[at + largest.numel() // 2] ^= 0x01  # inside a tensor's data: torch.load reads it without complaint
        path.write_bytes(bytes(data))
        torch.load(path, weights_only=True)
        done = run([*CLI, "inspect", str(tag), "--verify"])
        assert done.returncode == 1 and f"{path}: sha256 differs from the manifest" in done.stdout + done.stderr
        with pytest.raises(ValueError, match=rf"{path}: sha256 differs from the manifest"):
            load_verified(tag, 1, read_manifest(tag))
    done = run([*CLI, "convert", str(base), str(tmp_path / "hf")])
    assert done.returncode == 2 and f"{rank_path(base / BASE_TAG, 1)}: sha256 differs" in done.stderr
    done = run([*CLI, "export", str(trained), str(tmp_path / "peft")])
    assert done.returncode == 2 and f"{rank_path(trained, 1)}: sha256 differs" in done.stderr
