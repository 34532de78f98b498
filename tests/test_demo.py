"""``nxd-lora demo --tiny`` (the one-minute smoke run) end to end under torchrun, with fewer steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# torchrun (torch.distributed.run) launches it: PyTorch's launcher, smoke-tested on each version.
pytestmark = [pytest.mark.slow, pytest.mark.smoke]


def test_demo_under_torchrun(tmp_path, capsys):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "nxd_lora.cli", "demo", "--tiny", "--output", str(tmp_path),
           "train.max_steps=40", "train.save_every=20"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NXD_LORA_NO_BAR="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    first, last = map(float, re.search(r"\[demo\] train loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert last < 0.85 * first
    assert "world=2 tp=2" in out.stdout and "tuned (PEFT on transformers)" in out.stdout
    peft_vs_merged = float(re.search(r"PEFT vs merged export: ([\d.e+-]+)", out.stdout).group(1))
    tp_vs_peft = float(re.search(r"our TP=2 model vs transformers\+peft: ([\d.e+-]+)", out.stdout).group(1))
    assert peft_vs_merged < 1e-4 and tp_vs_peft < 1e-4
    config = json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32
    assert (tmp_path / "merged-hf" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_20", "step_40"]
    assert sorted(p.name for p in (tmp_path / "run" / "final").iterdir()) == ["adapter", "base_adapter", "merged", "peft"]
    # train's own PEFT copy loads with one call: it names the HF model its base was converted from
    from peft import AutoPeftModelForCausalLM

    final_peft = tmp_path / "run" / "final" / "peft"
    base_model = json.loads((final_peft / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (Path(base_model) / "config.json").is_file(), base_model
    assert type(AutoPeftModelForCausalLM.from_pretrained(final_peft)).__name__ == "PeftModelForCausalLM"

    # what a user exports from a training run loads as it is, each with one call
    import transformers

    from nxd_lora.cli import main

    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "x-peft")]) == 0
    assert f"the final adapter save of training run {run}" in capsys.readouterr().out
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "x-peft")
    assert main(["export", str(run / "final"), str(tmp_path / "x-merged")]) == 0  # final: its adapter again
    assert "the final adapter save" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "x-merged")
    assert main(["export", str(run / "final" / "merged"), str(tmp_path / "x-merged")]) == 0
    assert "is a merged save (the adapter folded into the base): writing a merged HF model" in capsys.readouterr().out
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x-merged")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "x-merged")
    assert (tmp_path / "x-merged" / "generation_config.json").is_file()
    # a run without a final save (stopped early): its newest periodic tag
    shutil.copytree(run / "checkpoints", tmp_path / "stopped" / "checkpoints")
    assert main(["export", str(tmp_path / "stopped"), str(tmp_path / "x-step")]) == 0
    out = capsys.readouterr().out
    assert "step_40" in out and "the newest periodic save of training run" in out
