"""launch/run_trn1.sh: the torchrun command, the Neuron environment, Slurm and explicit multi-node,
precompilation, and refusals before anything starts. torchrun, neuron_parallel_compile, scontrol
and neuron-ls are stand-ins on PATH that record how they were called."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nxd_standins

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "run_trn1.sh"
RECIPE_8B = str(ROOT / "configs" / "llama3-8b-trn1-tp32.yaml")
RECIPE_70B = str(ROOT / "configs" / "llama3.1-70b-trn1-tp32.yaml")
RECIPE_8B_TRN2 = str(ROOT / "configs" / "llama3-8b-trn2-tp32.yaml")

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"tool": "{name}", "argv": sys.argv[1:],
                          "env": {{k: v for k, v in os.environ.items()
                                  if k.startswith(("NEURON_", "FI_", "MALLOC_ARENA"))}}}}) + "\\n")
if "{name}" == "neuron_parallel_compile":  # like the real tool: run the command, graphs only
    os.environ["NEURON_EXTRACT_GRAPHS_ONLY"] = "1"
    sys.exit(__import__("subprocess").call(sys.argv[1:]))
if "{name}" == "scontrol":
    print("trn1-node-a\\ntrn1-node-b\\ntrn1-node-c\\ntrn1-node-d")
"""


@pytest.fixture
def launcher(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "neuron_parallel_compile", "scontrol"):
        tool = bin_dir / name
        tool.write_text(RECORDER.format(python=sys.executable, name=name))
        tool.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("NEURON_", "FI_", "SLURM_", "MALLOC_ARENA")) and
                k not in ("NNODES", "NODE_RANK", "MASTER_ADDR")}

    def run(*args: str, env: dict | None = None, neuron_cores: int | None = None, neuron_ls: dict | None = None):
        path = f"{bin_dir}{os.pathsep}{base_env['PATH']}"
        if neuron_cores:
            nls = nxd_standins.write_neuron_ls(tmp_path / "nls", neuron_cores, **(neuron_ls or {}))
            path = f"{nls}{os.pathsep}{path}"
        full_env = dict(base_env, PATH=path, PYTHON=sys.executable, FAKE_LOG=str(log), HOME=str(tmp_path),
                        PYTHONPATH=str(ROOT), **(env or {}))
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                              cwd=tmp_path, timeout=300)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls

    return run


@pytest.mark.smoke
def test_one_node_runs_torchrun_over_every_neuroncore(launcher):
    proc, calls = launcher("--config", RECIPE_8B, "train.max_steps=20", neuron_cores=32)
    assert proc.returncode == 0, proc.stderr
    assert [c["tool"] for c in calls] == ["torchrun"]
    assert calls[0]["argv"] == ["--nproc-per-node", "32", "--nnodes", "1", "-m", "nxd_lora.cli", "train",
                                "--config", RECIPE_8B, "train.backend=neuron", "train.max_steps=20"]
    env = calls[0]["env"]
    assert env["NEURON_CC_FLAGS"] == "--model-type transformer --retry_failed_compilation"
    assert env["NEURON_RT_NUM_CORES"] == "32" and env["MALLOC_ARENA_MAX"] == "64"
    assert env["NEURON_COMPILE_CACHE_URL"].endswith(".cache/neuron-compile-cache")
    assert "FI_PROVIDER" not in env  # EFA settings only between nodes
    assert "-> fits" in proc.stdout  # the plan was checked first


def test_precompile_runs_the_identical_command_under_neuron_parallel_compile_first(launcher):
    proc, calls = launcher("--precompile", "--cache", "s3://my-bucket/neuron-cache", "--config", RECIPE_8B,
                           neuron_cores=32)
    assert proc.returncode == 0, proc.stderr
    assert [c["tool"] for c in calls] == ["neuron_parallel_compile", "torchrun", "torchrun"]
    assert calls[0]["argv"] == ["torchrun", *calls[2]["argv"]] and calls[1]["argv"] == calls[2]["argv"]
    assert calls[1]["env"]["NEURON_EXTRACT_GRAPHS_ONLY"] == "1" and "NEURON_EXTRACT_GRAPHS_ONLY" not in calls[2]["env"]
    assert calls[2]["env"]["NEURON_COMPILE_CACHE_URL"] == "s3://my-bucket/neuron-cache"
    proc, calls = launcher("--precompile-only", "--config", RECIPE_8B, neuron_cores=32)
    assert [c["tool"] for c in calls] == ["neuron_parallel_compile", "torchrun"]


def test_slurm_gives_nodes_rank_and_master_and_turns_on_efa(launcher):
    env = {"SLURM_JOB_NODELIST": "trn1-node-[a-d]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2"}
    proc, calls = launcher("--config", RECIPE_70B, env=env)
    assert proc.returncode == 0, proc.stderr
    torchrun = next(c for c in calls if c["tool"] == "torchrun")
    assert torchrun["argv"][:10] == ["--nproc-per-node", "32", "--nnodes", "4", "--node-rank", "2",
                                     "--master-addr", "trn1-node-a", "--master-port", "44000"]
    assert torchrun["env"]["FI_PROVIDER"] == "efa" and torchrun["env"]["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert "layout: world size 128 = tp 32 x dp 4" in proc.stdout


def test_explicit_multi_node_needs_a_master_address(launcher):
    proc, calls = launcher("--nodes", "2", "--config", RECIPE_8B, neuron_cores=32)
    assert proc.returncode == 2 and not calls
    assert "2 nodes need MASTER_ADDR" in proc.stderr
    proc, calls = launcher("--config", RECIPE_8B, env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5"},
                           neuron_cores=32)
    assert proc.returncode == 0, proc.stderr
    assert calls[0]["argv"][:8] == ["--nproc-per-node", "32", "--nnodes", "2", "--node-rank", "1",
                                    "--master-addr", "10.0.0.5"]


def test_tp_times_dp_must_be_the_world_and_nothing_starts_otherwise(launcher):
    proc, calls = launcher("--config", RECIPE_8B, "train.dp=2", neuron_cores=32)
    assert proc.returncode == 2 and not calls
    assert "train.tp=32 x train.dp=2 = 64 ranks, but the launcher started 32" in proc.stderr
    proc, calls = launcher("--cores-per-node", "8", "--config", RECIPE_8B)
    assert proc.returncode == 2 and not calls
    assert "train.tp=32 does not divide the world size 8" in proc.stderr


def test_a_recipe_that_does_not_fit_is_refused_before_launch(launcher):
    proc, calls = launcher("--config", RECIPE_70B, "train.activation_checkpointing=none", neuron_cores=32)
    assert proc.returncode == 2 and not calls
    assert "more than the 16 GiB of a trn1 rank" in proc.stderr and "nothing was launched" in proc.stderr


def test_trn2_hosts_are_detected_and_compiled_for(launcher):
    trn2 = dict(cores_per_device=4, memory_size=103079215104, logical_neuroncore_config=2)
    proc, calls = launcher("--config", RECIPE_8B_TRN2, "train.dp=2", neuron_cores=64, neuron_ls=trn2)
    assert proc.returncode == 0, proc.stderr
    assert calls[0]["argv"][:2] == ["--nproc-per-node", "64"]
    assert calls[0]["env"]["NEURON_CC_FLAGS"].endswith("--target=trn2")
    assert "on trn2 (24 GiB)" in proc.stdout and "world size 64 = tp 32 x dp 2" in proc.stdout
    assert "checkpoint layout: trn2" in proc.stdout
    # No torch-neuronx here: a trn2 host trains with the current stack, TorchNeuron; --backend chooses.
    assert calls[0]["argv"][-2:] == ["train.backend=torchneuron", "train.dp=2"]
    proc, calls = launcher("--backend", "neuron", "--config", RECIPE_8B_TRN2, "train.dp=2", neuron_cores=64,
                           neuron_ls=trn2)
    assert proc.returncode == 0 and calls[0]["argv"][-2:] == ["train.backend=neuron", "train.dp=2"]
    proc, calls = launcher("--precompile", "--config", RECIPE_8B_TRN2, "train.dp=2", neuron_cores=64, neuron_ls=trn2)
    assert proc.returncode == 2 and not calls and "--precompile is neuron_parallel_compile, XLA's" in proc.stderr
    proc, calls = launcher("--backend", "torchneuron", "--config", RECIPE_8B, neuron_cores=32)
    assert proc.returncode == 2 and not calls and "TorchNeuron has no trn1 support" in proc.stderr
    # The trn1 recipe (trn1 layout, KV heads replicated 4x) is refused there before anything starts.
    proc, calls = launcher("--config", RECIPE_8B, "train.dp=2", neuron_cores=64, neuron_ls=trn2)
    assert proc.returncode == 2 and not calls
    assert "KV layout trn1, but trn2 is needed" in proc.stderr and "nothing was launched" in proc.stderr


def test_bad_arguments_are_named(launcher):
    proc, _ = launcher("--config", "missing.yaml")
    assert proc.returncode == 2 and "missing.yaml: no such recipe file" in proc.stderr
    proc, _ = launcher("--config", RECIPE_8B, "stray")
    assert proc.returncode == 2 and "unexpected argument 'stray'" in proc.stderr
    proc, _ = launcher("--bogus")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
