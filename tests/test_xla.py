"""The XLA code path (torch-xla on the CPU): the train command compiles its step graph once."""

from __future__ import annotations

import importlib.util

import pytest

from checkpoint_tools.convert import convert_to_nxd
from nxd_lora.demo import TINY_OVERRIDES, write_tiny_hf_model
from nxd_lora.local_launch import spawn_ranks

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None,
                                 reason="needs torch-xla, which exists for PyTorch 2.9 only (pip install 'nxd-lora[xla]'): the torch 2.9 job runs it")]


def _train_in_fresh_process(overrides: list[str]) -> dict:
    """torch-xla must load before the autograd engine first runs, so XLA gets a process of its own."""
    import os

    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    os.environ["NXD_LORA_NO_BAR"] = "1"
    return train(load_recipe(None, overrides))


def test_train_on_xla_compiles_its_step_graph_once_and_reads_only_at_log_steps(tmp_path):
    write_tiny_hf_model(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "tp1", 1, log=lambda m: None)
    overrides = [
        f"model.checkpoint={tmp_path / 'tp1'}", f"model.tokenizer={tmp_path / 'hf'}", *TINY_OVERRIDES,
        "train.backend=xla", "train.tp=1", "train.max_steps=16", "train.log_every=4", "train.save_every=0",
        "train.save_modes=[adapter]", "train.loggers=[csv]", "data.val_fraction=0", f"train.output_dir={tmp_path / 'run'}",
    ]
    result = spawn_ranks(_train_in_fresh_process, 1, overrides)[0]
    stats = result["step_stats"]
    assert len(stats) == 16
    compiles = [s["compiles"] for s in stats]
    transfers = [s["host_transfers"] for s in stats]
    # Step 1 compiles its graph (it also creates AdamW's state), step 2 the steady-state one; logging
    # reads values after the step's graph ran, so log steps reuse it.
    assert compiles[1:] == [compiles[1]] * 15, compiles
    for i in range(1, 16):  # stats[i] counts from step i's end (after its reads) to step i + 1's end
        if i % 4:
            assert transfers[i] == transfers[i - 1], (i + 1, transfers)  # nothing read back inside a step
        else:
            assert transfers[i] - transfers[i - 1] <= 3, (i, transfers)  # loss, grad norm, tokens of step i
    assert len(result["losses"]) == 4 and result["losses"][-1] < result["losses"][0]
