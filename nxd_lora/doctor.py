"""``nxd-lora doctor``: the software stack and hardware this machine offers, and every mismatch.

XLA training on trn1 works with exactly one stack: Neuron SDK 2.28 (torch-neuronx
2.9.0.2.12, neuronx-distributed 0.17, neuronx-cc 2.23) on PyTorch 2.9 and torch-xla 2.9;
later SDKs dropped it. A neighbouring version fails late and obscurely (a compiler error
minutes into the first step, a missing symbol at import), so the doctor names each
component, the version found and the one needed. ``nxd-lora train`` runs the same check
for its backend before doing any work: a mismatch the backend cannot run with is an error,
anything else a warning.

TorchNeuron (backend ``torchneuron``, SDK >= 2.33, trn2/trn3) is the other stack: PyTorch 2.13 or
2.14 with the torch-neuronx of the same family. The doctor tells which stack a host has and which
backend fits it (``recommend``), from the instance type (``nxd_lora.instances``) and the packages.

Versions are read from installed distribution metadata, never by importing the packages
(importing torch_neuronx starts the Neuron runtime).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from glob import glob
from importlib import metadata
from pathlib import Path

from nxd_lora import instances

NEURON_SDK = "2.28"
TORCHNEURON_SDK = "2.33"  # the first SDK with TorchNeuron (public beta, trn2/trn3)
# torch-neuronx versions are <torch>.<neuron build series>.<build>; the series names the SDK.
TORCH_NEURONX_SERIES_TO_SDK = {"2.9.0.2.12": "2.28", "2.9.0.2.13": "2.29", "2.9.0.2.11": "2.27"}

# component -> (version prefix needed, backends for which a mismatch is an error)
PINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("2.9", ("neuron", "xla")),
    "torch-xla": ("2.9", ("neuron", "xla")),
    "torch-neuronx": ("2.9.0.2.12", ("neuron",)),
    "neuronx-distributed": ("0.17", ("neuron",)),
    "neuronx-cc": ("2.23", ("neuron",)),
    "libneuronxla": ("2.2", ("neuron",)),
    "lightning": ("2", ("cpu", "cuda", "neuron", "torchneuron", "xla")),
}
# The compiler and runtime: NxD's CPU mode (NXD_CPU_MODE=1) runs NxD's layers without them.
UNUSED_IN_NXD_CPU_MODE = ("torch-neuronx", "neuronx-cc", "libneuronxla")
# TorchNeuron: torch 2.13 or 2.14, and torch-neuronx of the same <major>.<minor> family.
TORCHNEURON_TORCH = ("2.13", "2.14")
TORCHNEURON_PYTHONS = ("3.12", "3.13", "3.14")
MIN_TORCH = "2.9"  # the cpu and cuda backends: PyTorch 2.9 (SDK 2.28's) through 2.14 (TorchNeuron's) are tested
REPORTED_ONLY = ("transformers", "peft", "safetensors", "boto3")
NEURON_PYTHONS = ("3.10", "3.11", "3.12")


@dataclass(frozen=True)
class Finding:
    component: str
    found: str
    expected: str
    ok: bool
    fatal: bool  # for the backend checked: it cannot run with this

    def line(self) -> str:
        mark = ("ok" if self.expected else "info") if self.ok else ("ERR" if self.fatal else "warn")
        wanted = "" if self.ok or not self.expected else f"  (needs {self.expected})"
        return f"  [{mark:<4}] {self.component:<20} {self.found}{wanted}"


class StackMismatch(RuntimeError):
    """The installed stack cannot run the requested backend."""


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_matches(version: str, prefix: str) -> bool:
    """``2.9.0+cpu`` matches ``2.9``; ``2.10.0`` does not."""
    return version == prefix or version.startswith(prefix + ".") or version.startswith(prefix + "+")


def at_least(version: str, minimum: str) -> bool:
    """``2.14.1+cpu`` is at least ``2.9``; ``2.8.0`` is not (numeric, release part only)."""
    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())

    return numbers(version) >= numbers(minimum)


def neuron_sdk_from_torch_neuronx(version: str | None) -> str | None:
    if version is None:
        return None
    return next((sdk for series, sdk in TORCH_NEURONX_SERIES_TO_SDK.items() if version_matches(version, series)), None)


def neuron_devices() -> tuple[list[dict], str]:
    """(``neuron-ls -j``'s devices, or [] , how they were found or why not)."""
    neuron_ls = shutil.which("neuron-ls")
    if not neuron_ls:
        return [], "no neuron-ls"
    try:
        out = subprocess.run([neuron_ls, "-j"], capture_output=True, text=True, timeout=60, check=True).stdout
        devices = json.loads(out)
        return (devices, "neuron-ls -j") if isinstance(devices, list) else ([], "neuron-ls -j: not a device list")
    except (subprocess.SubprocessError, OSError, ValueError) as err:
        return [], f"neuron-ls -j failed: {err}"


def neuron_core_count() -> tuple[int, str]:
    """(NeuronCores on this host, how it was found): ``neuron-ls -j`` (sum of ``nc_count``), else sysfs."""
    devices, how = neuron_devices()
    try:
        if devices:
            return sum(int(device["nc_count"]) for device in devices), how
    except (KeyError, TypeError, ValueError) as err:
        return 0, f"neuron-ls -j: unexpected output ({err})"
    counts = glob("/sys/devices/virtual/neuron_device/neuron*/core_count")
    if counts:
        return sum(int(Path(p).read_text().strip() or 0) for p in counts), "sysfs core_count"
    return 0, f"{how} and no /sys/devices/virtual/neuron_device"


def nxd_cpu_mode() -> bool:
    """NxD's CPU mode switch, read as ``neuronx_distributed.utils.cpu_mode`` reads it: NxD's layers
    on CPU tensors over gloo, no compiler or NeuronCores (what the NxD conformance tests run)."""
    try:
        return int(os.environ.get("NXD_CPU_MODE", "0")) > 0
    except ValueError:
        raise ValueError(f"NXD_CPU_MODE={os.environ['NXD_CPU_MODE']!r}: expected an integer "
                         "(1 turns NxD's CPU mode on, 0 off)") from None


def neuron_platform() -> str:
    """trn1, trn2 or trn3: the instance type's family where the host names it (DMI), else ``trn2``
    where neuron-ls reports a logical NeuronCore config (trn2 and later only), else ``trn1``; the
    device whose per-core memory the plan checks against (as launch/run_trn1.sh decides)."""
    named = instances.this_instance_type()
    if named:
        return instances.platform_of_instance_type(named)
    devices, _ = neuron_devices()
    return "trn2" if any(isinstance(d, dict) and "logical_neuroncore_config" in d for d in devices) else "trn1"


def torchneuron_findings(python: str) -> list[Finding]:
    """TorchNeuron's pins: torch 2.13/2.14, torch-neuronx of torch's family, a Python it ships for."""
    torch_version = installed_version("torch") or "not installed"
    family = next((f for f in TORCHNEURON_TORCH if version_matches(torch_version, f)), None)
    neuronx = installed_version("torch-neuronx")
    return [
        Finding("torch", torch_version, " or ".join(f"{f}.x" for f in TORCHNEURON_TORCH), family is not None, True),
        Finding("torch-neuronx", neuronx or "not installed", f"{family or '2.14'}.x (torch's family)",
                neuronx is not None and family is not None and version_matches(neuronx, family), True),
        Finding("python", python, " or ".join(TORCHNEURON_PYTHONS), python in TORCHNEURON_PYTHONS, False),
    ]


def default_kv_layout() -> str:
    """The NxD checkpoint layout to write by default: this host's Trainium generation on a Neuron
    host, else trn1 (a CPU box converting for a cluster should say --target)."""
    devices, _ = neuron_devices()
    return instances.layout_of_platform(neuron_platform()) if devices else "trn1"


def host_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**30


def examine(backend: str) -> tuple[list[Finding], dict[str, str]]:
    """Findings for ``backend`` and facts (python, SDK, cores, RAM) for the report."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    findings = torchneuron_findings(python) if backend == "torchneuron" else []
    cpu_mode = backend == "neuron" and nxd_cpu_mode()
    for component, (prefix, fatal_for) in PINS.items():
        if cpu_mode and component in UNUSED_IN_NXD_CPU_MODE:
            fatal_for = ()
        if backend == "torchneuron" and component in ("torch", "torch-neuronx"):
            continue  # TorchNeuron's own pins, above
        relevant = backend in fatal_for or component in ("torch", "lightning")
        version = installed_version(component)
        if version is None and not relevant:
            continue
        if component == "torch" and backend not in fatal_for:  # eager backends: any PyTorch from 2.9
            ok, expected = version is not None and at_least(version, MIN_TORCH), f">= {MIN_TORCH}"
        else:
            ok, expected = version is not None and version_matches(version, prefix), f"{prefix}.x"
        findings.append(Finding(component, version or "not installed", expected, ok, backend in fatal_for))
    for component in REPORTED_ONLY:
        version = installed_version(component)
        findings.append(Finding(component, version or "not installed", "", True, False))
    cores, how = neuron_core_count()
    if backend == "neuron":
        findings.append(Finding("python", python, " or ".join(NEURON_PYTHONS), python in NEURON_PYTHONS, True))
    if backend in ("neuron", "torchneuron") and not cpu_mode:
        findings.append(Finding("NeuronCores", f"{cores} ({how})", "at least 1", cores > 0, True))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if cores and local > cores:
            findings.append(Finding("ranks on this node", str(local), f"<= {cores} NeuronCores", False, True))
    sdk = neuron_sdk_from_torch_neuronx(installed_version("torch-neuronx"))
    if sdk is None and torchneuron_family(installed_version("torch-neuronx")):
        sdk = f">= {TORCHNEURON_SDK} (TorchNeuron)"
    platform = neuron_platform() if cores else None
    facts = {"python": python, "neuron sdk": sdk or "none found", "neuron cores": f"{cores} ({how})",
             "instance": f"{instances.this_instance_type() or 'not named by the host'}"
                         + (f" ({platform})" if platform else ""),
             "host memory": f"{host_memory_gib():.1f} GiB", "backend checked": backend,
             "recommended": recommend(platform)}
    return findings, facts



def torchneuron_family(version: str | None) -> str | None:
    """``2.14`` for torch-neuronx 2.14.3 (TorchNeuron); None for SDK 2.28's 2.9.0.2.12.x or nothing."""
    return next((f for f in TORCHNEURON_TORCH if version and version_matches(version, f)), None)


def recommend(platform: str | None) -> str:
    """Which backend this host should train with, and why, in one line."""
    neuronx = installed_version("torch-neuronx")
    if platform is None:
        return "cuda or cpu (no NeuronCores here)"
    if platform == "trn1":
        return f"neuron (trn1 trains with XLA/NxD on Neuron SDK {NEURON_SDK}; TorchNeuron does not support trn1)"
    if torchneuron_family(neuronx):
        return f"torchneuron (TorchNeuron torch-neuronx {neuronx} is installed on this {platform} host)"
    if neuron_sdk_from_torch_neuronx(neuronx):
        return f"neuron (Neuron SDK {neuron_sdk_from_torch_neuronx(neuronx)} is installed; on {platform} TorchNeuron, " \
               f"SDK >= {TORCHNEURON_SDK}, is the newer stack: backend torchneuron)"
    if platform == "trn3":
        return f"torchneuron (trn3 trains with TorchNeuron, SDK >= {TORCHNEURON_SDK}: pip install 'nxd-lora[torchneuron]')"
    return f"torchneuron (SDK >= {TORCHNEURON_SDK}) or neuron (SDK {NEURON_SDK}) on {platform}: neither is installed"


def default_backend() -> str:
    """What a host's stack trains with: torchneuron where TorchNeuron's torch-neuronx is installed
    (or a trn2/trn3 host has none), neuron where SDK 2.28's is (or a trn1 host has none); else cuda
    where torch sees a GPU; else cpu."""
    neuronx = installed_version("torch-neuronx")
    if torchneuron_family(neuronx):
        return "torchneuron"
    if neuronx:
        return "neuron"
    if neuron_core_count()[0]:
        return "neuron" if neuron_platform() == "trn1" else "torchneuron"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def report(backend: str) -> tuple[str, list[Finding]]:
    findings, facts = examine(backend)
    lines = ["nxd-lora doctor"] + [f"  {key:<16} {value}" for key, value in facts.items()] + ["stack:"]
    lines += [f.line() for f in findings]
    problems = [f for f in findings if not f.ok]
    if not problems:
        lines.append(f"no mismatches for backend '{backend}'")
    else:
        lines.append(f"{len(problems)} mismatch(es) for backend '{backend}': "
                     + "; ".join(f"{f.component} {f.found}, needs {f.expected}" for f in problems))
        if backend in ("neuron", "torchneuron"):
            sdk = NEURON_SDK if backend == "neuron" else f">= {TORCHNEURON_SDK} (TorchNeuron)"
            lines.append(f"install Neuron SDK {sdk}: pip install --extra-index-url "
                         f"https://pip.repos.neuron.amazonaws.com 'nxd-lora[{backend}]'")
    return "\n".join(lines), findings


def check_stack(backend: str, warn=print) -> None:
    """Raise ``StackMismatch`` naming every fatal mismatch for ``backend``; ``warn`` the rest."""
    findings, _ = examine(backend)
    fatal = [f for f in findings if not f.ok and f.fatal]
    for finding in findings:
        if not finding.ok and not finding.fatal:
            warn(f"[doctor] warning: {finding.component} is {finding.found}; nxd-lora is tested with {finding.expected}")
    if fatal:
        raise StackMismatch(f"backend '{backend}' cannot run on this stack: "
                            + "; ".join(f"{f.component} is {f.found}, needs {f.expected}" for f in fatal)
                            + " (run 'nxd-lora doctor' for the whole report)")


def findings_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=2)
