"""The embedded demo end to end, launched by torchrun and by the built-in spawner."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from checkpoint_tools.atomic_io import load_tensors
from nxd_lora.demo import rank_file, run_demo


def test_demo_under_torchrun_trains_and_writes_rank_files(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "nxd_lora.cli", "demo", "--tp", "2",
           "--steps", "40", "--output", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    first, last = map(float, re.search(r"\[demo\] loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert last < 0.75 * first
    assert "world=2 tp=2" in out.stdout
    for rank in range(2):
        base = load_tensors(rank_file(tmp_path, rank))
        adapter = load_tensors(rank_file(tmp_path / "adapter", rank))
        assert base["model.layers.0.self_attn.qkv_proj.weight_q"].shape == (32, 64)
        assert adapter["model.layers.0.self_attn.qkv_proj.lora_B.weight_q"].abs().sum() > 0


def test_demo_spawned_at_tp4_with_replicated_kv(tmp_path):
    losses = run_demo(tp=4, steps=15, output=str(tmp_path))
    assert losses[-1] < 0.9 * losses[0]
    assert len(list((tmp_path / "model").glob("dp_rank_00_tp_rank_*_pp_rank_00.pt"))) == 4
