"""The XLA code path (torch-xla on the CPU): the train command compiles its step graph once."""

from __future__ import annotations

import importlib.util

import pytest

from checkpoint_tools.convert import convert_to_nxd
from nxd_lora.demo import DEMO_OVERRIDES, write_tiny_hf_model
from nxd_lora.local_launch import spawn_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None,
                                reason="needs torch-xla (pip install 'nxd-lora[xla]')")


def _train_in_fresh_process(overrides: list[str]) -> dict:
    """torch-xla must load before the autograd engine first runs, so XLA gets a process of its own."""
    import os

    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    os.environ["NXD_LORA_NO_BAR"] = "1"
    return train(load_recipe(None, overrides))


def test_train_on_xla_compiles_once_and_syncs_only_at_log_steps(tmp_path):
    write_tiny_hf_model(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "tp1", 1, log=lambda m: None)
    overrides = [
        f"model.checkpoint={tmp_path / 'tp1'}", f"model.tokenizer={tmp_path / 'hf'}", *DEMO_OVERRIDES,
        "train.backend=xla", "train.tp=1", "train.max_steps=16", "train.log_every=4", "train.save_every=0",
        "train.save_modes=[adapter]", "train.loggers=[csv]", "data.val_fraction=0", f"train.output_dir={tmp_path / 'run'}",
    ]
    result = spawn_ranks(_train_in_fresh_process, 1, overrides)[0]
    stats = result["step_stats"]
    assert len(stats) == 16
    compiles = [s["compiles"] for s in stats]
    transfers = [s["host_transfers"] for s in stats]
    # Warm-up is the first logging interval: the step graph and the three scalar reads of a log step.
    assert compiles[3:] == [compiles[3]] * 13, compiles  # no new graph after warm-up
    for i in range(1, 16):  # step i + 1 logs when it is a multiple of 4
        if (i + 1) % 4:
            assert transfers[i] == transfers[i - 1], (i + 1, transfers)  # nothing read back inside a step
        else:
            assert transfers[i] - transfers[i - 1] <= 3, (i + 1, transfers)  # loss, grad norm, tokens
    assert len(result["losses"]) == 4 and result["losses"][-1] < result["losses"][0]
