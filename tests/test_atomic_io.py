"""Crash-safe writes keep the previous file; unreadable files are named in the error."""

from __future__ import annotations

import pytest
import torch

from checkpoint_tools.atomic_io import atomic_write, load_tensors, save_safetensors, save_tensors

# torch.save through torch.utils.serialization's config, torch.load with weights_only: PyTorch's API.
pytestmark = pytest.mark.torch_version


def test_interrupted_write_keeps_previous_file(tmp_path):
    path = tmp_path / "rank.pt"
    save_tensors({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(path) as handle:
            handle.write(b"partial bytes")
            raise RuntimeError("interrupted")
    assert torch.equal(load_tensors(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["rank.pt"]  # no temporary left behind


def test_truncated_and_missing_files_are_named(tmp_path):
    path = tmp_path / "rank.pt"
    save_tensors({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="rank.pt: cannot be read"):
        load_tensors(path)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_tensors(tmp_path / "nothing.pt")


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": print}, path)  # a non-tensor object needs full unpickling
    with pytest.raises(ValueError, match="evil.pt: cannot be read"):
        load_tensors(path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Not mkstemp's 0600: exports and checkpoints are shared between users and services."""
    import os

    old = os.umask(umask)
    try:
        save_tensors({"w": torch.ones(1)}, tmp_path / "a.pt")
        save_safetensors({"w": torch.ones(1)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.pt", "a.safetensors")] == [mode, mode]
