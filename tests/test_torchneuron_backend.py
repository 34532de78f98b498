"""The torchneuron backend (TorchNeuron, trn2/trn3) on stand-ins of what torch_neuronx registers, and
the doctor/plan choices per instance type."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

import torchneuron_standins
from checkpoint_tools.atomic_io import load_tensors
from checkpoint_tools.convert import convert_to_nxd
from checkpoint_tools.nxd_format import rank_path
from nxd_lora import doctor, instances
from nxd_lora.backends import BackendUnavailable, get_backend
from nxd_lora.cli import main
from nxd_lora.demo import TINY_OVERRIDES, write_tiny_hf_model
from nxd_lora.local_launch import spawn_ranks
from nxd_lora.train.config import TrainConfig
from nxd_lora.train.run import compile_backend

# TorchNeuron's PyTorch (2.13/2.14) runs the end-to-end tests; 2.9 skips them (acdb639, dd94072 fixed 2.14-only failures).
pytestmark = pytest.mark.torch_version

needs_torchneuron_torch = pytest.mark.skipif(
    torchneuron_standins.family() is None,
    reason="needs PyTorch 2.13 or 2.14 (TorchNeuron's; doctor refuses torchneuron on 2.9): the torch 2.14 job runs it")


def test_without_torch_neuronx_the_backend_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # an import of it fails, as on this machine
    with pytest.raises(BackendUnavailable, match=r"needs torch-neuronx .*nxd-lora\[torchneuron\].*2\.14"):
        get_backend("torchneuron")


def test_sdk_228s_torch_neuronx_is_not_taken_for_torchneuron(monkeypatch):
    """SDK 2.28's torch-neuronx imports fine but registers no dist backend 'neuron' (XLA's is 'xla')."""
    xla_era = types.ModuleType("torch_neuronx")
    xla_era.__version__ = "2.9.0.2.12.22436"
    monkeypatch.setitem(sys.modules, "torch_neuronx", xla_era)
    with pytest.raises(BackendUnavailable, match=r"torch_neuronx \(2\.9\.0\.2\.12\.22436\) registered no "
                                                 r"torch.distributed backend 'neuron'"):
        get_backend("torchneuron")


def test_compile_is_refused_on_backends_that_compile_xla_graphs_themselves():
    cfg = TrainConfig(compile=True)
    with pytest.raises(ValueError, match="backend 'xla' runs XLA"):
        compile_backend(cfg, types.SimpleNamespace(name="xla", compile_backend=None))
    assert compile_backend(cfg, types.SimpleNamespace(name="cpu", compile_backend="inductor")) == "inductor"
    assert compile_backend(TrainConfig(), types.SimpleNamespace(name="cpu", compile_backend="inductor")) is None


def _train_on(backend: str, overrides: list[str], work: str) -> dict:
    """In a fresh process: TorchNeuron's stand-ins (for torchneuron), then the train command."""
    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    os.environ["NXD_LORA_NO_BAR"] = "1"
    if backend == "torchneuron":
        torchneuron_standins.install(Path(work))
    result = train(load_recipe(None, [*overrides, f"train.backend={backend}"]))
    return {"losses": result["losses"], "val": result["val"], "calls": sorted(set(torchneuron_standins.CALLS))}


def _tiny_checkpoint(root: Path, tp: int, target: str) -> list[str]:
    write_tiny_hf_model(root / "hf")
    convert_to_nxd(root / "hf", root / "ckpt", tp, target=target, log=lambda m: None)
    return [f"model.checkpoint={root / 'ckpt'}", f"model.tokenizer={root / 'hf'}", *TINY_OVERRIDES,
            f"train.tp={tp}", "train.max_steps=4", "train.log_every=2", "train.save_every=0",
            "train.save_modes=[adapter]", "train.loggers=[csv]", "data.val_fraction=0.1", "data.seq_len=256", "data.on_long_prompt=skip",
            "train.micro_batch_size=1"]


def _adapter(out: Path, tp: int) -> list[dict[str, torch.Tensor]]:
    return [load_tensors(rank_path(out / "final" / "adapter", rank)) for rank in range(tp)]


@needs_torchneuron_torch
@pytest.mark.slow
def test_torchneuron_trains_the_same_lora_as_cpu_with_bf16_autocast(tmp_path):
    """TP=4 over dist backend 'neuron' (stand-in: gloo underneath) on a trn2-layout checkpoint with
    replicated KV heads (kv_size_multiplier 2): the same losses and LoRA, bit for bit, as the cpu
    backend with the same autocast; and autocast is on by default there (fp32 cpu differs)."""
    common = _tiny_checkpoint(tmp_path, 4, "trn2")
    neuron = spawn_ranks(_train_on, 4, "torchneuron", [*common, f"train.output_dir={tmp_path / 'tn'}"],
                         str(tmp_path / "standins"))[0]
    cpu_bf16 = spawn_ranks(_train_on, 4, "cpu", [*common, f"train.output_dir={tmp_path / 'cpu'}",
                                                 "train.autocast=bfloat16"], "")[0]
    cpu_fp32 = spawn_ranks(_train_on, 4, "cpu", [*common, f"train.output_dir={tmp_path / 'fp32'}"], "")[0]
    assert neuron["calls"] == ["process_group"] and cpu_bf16["calls"] == []  # groups over dist backend "neuron"
    assert neuron["losses"] == cpu_bf16["losses"] and neuron["val"] == cpu_bf16["val"]
    for ours, theirs in zip(_adapter(tmp_path / "tn", 4), _adapter(tmp_path / "cpu", 4)):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert neuron["losses"] != cpu_fp32["losses"]  # the default autocast really ran
    assert neuron["losses"] == pytest.approx(cpu_fp32["losses"], rel=2e-2)  # ... and is bf16 rounding, no more


@needs_torchneuron_torch
@pytest.mark.slow
def test_a_compiled_step_uses_the_neuron_compile_backend_and_trains_the_same(tmp_path):
    common = [*_tiny_checkpoint(tmp_path, 2, "trn2"), "train.autocast=none"]
    eager = spawn_ranks(_train_on, 2, "torchneuron", [*common, f"train.output_dir={tmp_path / 'eager'}"],
                        str(tmp_path / "s1"))[0]
    compiled = spawn_ranks(_train_on, 2, "torchneuron", [*common, f"train.output_dir={tmp_path / 'compiled'}",
                                                         "train.compile=true"], str(tmp_path / "s2"))[0]
    assert "compile" in compiled["calls"] and "compile" not in eager["calls"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    # On these CPU stand-ins eager attention is ours (blocked GEMMs) and the compiled graph's is SDPA:
    # the same math with different fp32 rounding, which training drifts to ~2e-5 on near-zero entries.
    for ours, theirs in zip(_adapter(tmp_path / "compiled", 2), _adapter(tmp_path / "eager", 2)):
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-4)


def _setup_on_trn2(work: str, kv_layout: str) -> str:
    torchneuron_standins.install(Path(work))
    backend = get_backend("torchneuron")
    try:
        backend.setup(4, 2, kv_layout)
    except ValueError as err:
        return str(err)
    finally:
        backend.teardown()
    return f"set up on {backend.device}"


def test_a_trn1_layout_checkpoint_is_refused_on_a_trn2_host(tmp_path):
    message = spawn_ranks(_setup_on_trn2, 1, str(tmp_path), "trn1")[0]
    assert "KV layout trn1, but trn2 is needed" in message and "on this trn2 host" in message
    assert "--retarget trn2" in message


def test_doctor_names_torchneurons_pins(monkeypatch, tmp_path):
    versions = {"torch": "2.14.1", "torch-neuronx": "2.13.3", "lightning": "2.5.0"}
    monkeypatch.setattr(doctor, "installed_version", lambda name: versions.get(name))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(doctor.StackMismatch, match=r"torch-neuronx is 2\.13\.3, needs 2\.14\.x \(torch's family\)"):
        doctor.check_stack("torchneuron")
    versions["torch-neuronx"] = "2.14.3"
    with pytest.raises(doctor.StackMismatch, match="NeuronCores is 0"):
        doctor.check_stack("torchneuron")
    versions["torch"] = "2.9.0"
    with pytest.raises(doctor.StackMismatch, match=r"torch is 2\.9\.0, needs 2\.13\.x or 2\.14\.x"):
        doctor.check_stack("torchneuron")


@pytest.mark.parametrize("host, neuronx, backend", [
    ("trn1.32xlarge", None, "neuron"),
    ("trn1.32xlarge", "2.9.0.2.12.22436", "neuron"),
    ("trn2.48xlarge", None, "torchneuron"),
    ("trn2.48xlarge", "2.9.0.2.12.22436", "neuron"),   # SDK 2.28 installed on trn2: its XLA stack
    ("trn2.48xlarge", "2.14.3", "torchneuron"),
    ("trn3.48xlarge", None, "torchneuron"),
])
def test_doctor_picks_the_stack_per_instance_type(monkeypatch, tmp_path, host, neuronx, backend):
    dmi = tmp_path / "product_name"
    dmi.write_text(f"{host}\n")
    monkeypatch.setattr(instances, "DMI_PRODUCT_NAME", dmi)
    monkeypatch.setattr(doctor, "neuron_core_count", lambda: (64, "neuron-ls -j"))
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: neuronx if name == "torch-neuronx" else real(name))
    assert doctor.neuron_platform() == host[:4]
    assert doctor.default_backend() == backend
    assert doctor.recommend(host[:4]).startswith(backend)
    facts = doctor.examine(backend)[1]
    assert facts["instance"] == f"{host} ({host[:4]})" and facts["recommended"].startswith(backend)


def test_instance_types_give_cores_and_memory_per_core():
    trn2 = instances.instance("ml.trn2.48xlarge")
    assert (trn2.cores(), trn2.core_memory_gib()) == (64, 24.0)
    assert (trn2.cores(1), trn2.core_memory_gib(1)) == (128, 12.0)
    trn1 = instances.instance("trn1.32xlarge")
    assert (trn1.cores(), trn1.core_memory_gib()) == (32, 16.0) and trn1.backends == ("neuron",)
    with pytest.raises(ValueError, match="trn1 has LNC=1 only"):
        trn1.cores(2)
    with pytest.raises(ValueError, match=r"unknown Trainium instance type 'trn9.1xlarge'; known: \["):
        instances.instance("trn9.1xlarge")


def test_plan_per_instance_type(capsys):
    recipe = "configs/llama3-8b-trn2-tp32.yaml"
    assert main(["plan", recipe, "--instance-type", "trn2.48xlarge"]) == 0
    out = capsys.readouterr().out
    assert "1 x trn2.48xlarge (trn2, 64 NeuronCores of 24 GiB at LNC=2" in out
    assert "world size 64 = tp 32 x dp 2" in out and "checkpoint layout: trn2" in out
    assert main(["plan", recipe, "--instance-type", "trn2.48xlarge", "--lnc", "1", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "128 NeuronCores of 12 GiB at LNC=1" in out and "world size 256 = tp 32 x dp 8" in out
    assert "on trn2-lnc1 (12 GiB)" in out
    # at LNC=1 a physical core has half the memory: a recipe that fits a logical core may not
    assert main(["plan", recipe, "data.seq_len=8192", "--instance-type", "trn2.48xlarge"]) == 0
    capsys.readouterr()
    assert main(["plan", recipe, "data.seq_len=8192", "--instance-type", "trn2.48xlarge", "--lnc", "1"]) == 2
    assert "more than the 12 GiB of a trn2-lnc1 rank" in capsys.readouterr().err
