"""The package imports without cycles (lazy function-level imports included) and without Neuron packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nxd_lora", "checkpoint_tools")


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names]
                deps.update(submodules or [node.module])  # "from pkg import module" depends on the module
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in names)
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.append(path)
            elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                walk(start, nxt, path + [nxt])

    for module in sorted(graph):
        walk(module, module, [module])
    return cycles


def test_no_import_cycles():
    graph = import_graph()
    assert "nxd_lora.cli_args" in graph["nxd_lora.sagemaker.command"]  # the checker sees lazy imports
    assert find_cycles(graph) == []
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]  # and would report one


@pytest.mark.smoke
def test_everything_imports_without_neuron_packages():
    modules = sorted(import_graph())
    code = ("import importlib, sys\n"
            f"for m in {[m for m in modules if m != 'nxd_lora.backends.neuron']!r}: importlib.import_module(m)\n"
            "import nxd_lora.backends.neuron\n"
            "bad = [m for m in sys.modules if m.startswith(('torch_neuronx', 'neuronx_distributed'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
