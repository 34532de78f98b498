"""``nxd-lora doctor`` and the stack check train runs: versions, NeuronCores, named mismatches."""

from __future__ import annotations

import pytest

import nxd_standins
from nxd_lora import doctor
from nxd_lora.cli import main

# The doctor checks the installed PyTorch's version against each stack's pins.
pytestmark = pytest.mark.torch_version


@pytest.fixture
def neuron_host(tmp_path, monkeypatch):
    """This machine as a trn1.32xlarge with SDK 2.28's packages, as far as the doctor can tell."""
    site = nxd_standins.write_stack_metadata(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    bin_dir = nxd_standins.write_neuron_ls(tmp_path / "bin", neuron_cores=32)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return tmp_path


def test_doctor_on_a_cpu_machine_names_what_neuron_needs(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no neuron-ls
    assert main(["doctor", "--backend", "cpu"]) == 0
    assert main(["doctor", "--backend", "neuron"]) == 1
    out = capsys.readouterr().out
    assert "torch-neuronx" in out and "not installed  (needs 2.9.0.2.12.x)" in out
    assert "NeuronCores" in out and "pip.repos.neuron.amazonaws.com" in out
    with pytest.raises(doctor.StackMismatch, match=r"neuronx-distributed is not installed, needs 0\.17\.x"):
        doctor.check_stack("neuron")


def test_doctor_on_a_neuron_host_reports_the_sdk_and_cores(neuron_host, capsys):
    if doctor.installed_version("torch-xla") is None:
        pytest.skip("needs torch-xla, which exists for PyTorch 2.9 only (the neuron stack's): the torch 2.9 job runs it")
    assert main(["doctor", "--backend", "neuron"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "neuron sdk       2.28" in out
    assert "neuron cores     32 (neuron-ls -j)" in out
    assert "no mismatches for backend 'neuron'" in out
    doctor.check_stack("neuron")  # no exception


def test_a_neighbouring_sdk_is_a_named_error(neuron_host, monkeypatch, capsys):
    newer = dict(nxd_standins.STACK_VERSIONS, **{"neuronx-distributed": "0.18.27753",
                                                  "torch-neuronx": "2.9.0.2.13.24727"})
    monkeypatch.syspath_prepend(str(nxd_standins.write_stack_metadata(neuron_host / "site-2.29", newer)))
    with pytest.raises(doctor.StackMismatch) as err:
        doctor.check_stack("neuron")
    assert "neuronx-distributed is 0.18.27753, needs 0.17.x" in str(err.value)
    assert "torch-neuronx is 2.9.0.2.13.24727, needs 2.9.0.2.12.x" in str(err.value)
    assert main(["doctor", "--backend", "neuron"]) == 1
    assert "neuron sdk       2.29" in capsys.readouterr().out


def test_more_ranks_than_neuron_cores_is_an_error(neuron_host, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    with pytest.raises(doctor.StackMismatch, match=r"ranks on this node is 64, needs <= 32 NeuronCores"):
        doctor.check_stack("neuron")


def test_version_prefixes():
    assert doctor.version_matches("2.9.0+cpu", "2.9") and doctor.version_matches("2.9", "2.9")
    assert doctor.at_least("2.14.1+cpu", "2.9") and doctor.at_least("2.9.0", "2.9") and not doctor.at_least("2.8.0", "2.9")
    assert not doctor.version_matches("2.10.0", "2.1") and not doctor.version_matches("2.90", "2.9")
    assert doctor.neuron_sdk_from_torch_neuronx("2.9.0.2.12.22436") == "2.28"
    assert doctor.neuron_sdk_from_torch_neuronx("2.9.0.2.14.1") is None


def test_train_refuses_a_stack_that_cannot_run_its_backend(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    code = main(["train", f"train.output_dir={tmp_path}", "train.backend=neuron", "model.checkpoint=missing"])
    assert code == 2
    err = capsys.readouterr().err
    assert "backend 'neuron' cannot run on this stack" in err and "NeuronCores is 0" in err
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_the_platform_is_read_from_neuron_ls(tmp_path, monkeypatch):
    trn1 = nxd_standins.write_neuron_ls(tmp_path / "trn1", 32)
    trn2 = nxd_standins.write_neuron_ls(tmp_path / "trn2", 64, cores_per_device=4, logical_neuroncore_config=2)
    system = __import__("os").environ["PATH"]
    monkeypatch.setenv("PATH", f"{trn1}:{system}")
    assert doctor.neuron_platform() == "trn1" and doctor.neuron_core_count() == (32, "neuron-ls -j")
    monkeypatch.setenv("PATH", f"{trn2}:{system}")
    assert doctor.neuron_platform() == "trn2" and doctor.neuron_core_count() == (64, "neuron-ls -j")


def test_a_trn3_host_converts_to_the_trn2_layout_by_default(tmp_path, monkeypatch):
    """trn3 is a platform, not a checkpoint layout: its NxD layout is trn2's (instances.PLATFORM_LAYOUT)."""
    trn2 = nxd_standins.write_neuron_ls(tmp_path / "trn2", 64, cores_per_device=4, logical_neuroncore_config=2)
    monkeypatch.setenv("PATH", f"{trn2}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr(doctor.instances, "this_instance_type", lambda: "trn3.48xlarge")
    assert doctor.neuron_platform() == "trn3"
    assert doctor.default_kv_layout() == "trn2"


def test_nxds_cpu_mode_needs_no_compiler_or_neuroncores(monkeypatch):
    """NXD_CPU_MODE=1 (NxD's own switch) runs NxD's layers on CPU tensors: the compiler, runtime and
    NeuronCores stop being fatal for backend 'neuron'; NxD itself still is."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("NXD_CPU_MODE", "1")
    findings = {f.component: f for f in doctor.examine("neuron")[0]}
    assert "NeuronCores" not in findings and "neuronx-cc" not in findings
    assert findings["neuronx-distributed"].fatal
    monkeypatch.setenv("NXD_CPU_MODE", "0")
    assert "NeuronCores" in {f.component for f in doctor.examine("neuron")[0]}
    monkeypatch.setenv("NXD_CPU_MODE", "yes")
    with pytest.raises(ValueError, match="NXD_CPU_MODE='yes': expected an integer"):
        doctor.nxd_cpu_mode()
