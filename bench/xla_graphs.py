"""Benchmark: XLA graph discipline of the trainer on the ``xla`` backend (torch-xla on the CPU).

A 50-step LoRA run of the tiny demo model on the bundled instruction set (examples of varied
length, packed or padded to a fixed ``seq_len``), validating every 10 steps. Prints, per data
mode, graphs compiled at each step (where any were), whether any graph compiles after the first
validation (goal: none: the step graph compiles once and the eval graph once), and host
transfers at each step (goal: 0 outside logging/validation steps). A step's numbers are read
when its graph has run, so reads made after step s (logging, validation) count in step s + 1.

    python bench/xla_graphs.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS, EVERY = 50, 10


def _run(overrides: list[str]) -> dict:
    import os

    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    os.environ["NXD_LORA_NO_BAR"] = "1"
    return train(load_recipe(None, overrides))


def main() -> None:
    from checkpoint_tools.convert import convert_to_nxd
    from nxd_lora.demo import TINY_OVERRIDES, write_tiny_hf_model
    from nxd_lora.local_launch import spawn_ranks

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        convert_to_nxd(write_tiny_hf_model(tmp / "hf"), tmp / "tp1", 1, log=lambda m: None)
        for packing in (True, False):
            overrides = [f"model.checkpoint={tmp / 'tp1'}", f"model.tokenizer={tmp / 'hf'}", *TINY_OVERRIDES,
                         "train.backend=xla", "train.tp=1", f"train.max_steps={STEPS}", f"train.log_every={EVERY}",
                         f"train.val_every={EVERY}", "train.save_every=0", "train.save_modes=[adapter]",
                         "train.loggers=[csv]", f"data.packing={str(packing).lower()}", "data.seq_len=256",
                         f"train.output_dir={tmp / 'run'}"]
            result = spawn_ranks(_run, 1, overrides)[0]
            compiles = [0] + [s["compiles"] for s in result["step_stats"]]
            transfers = [0] + [s["host_transfers"] for s in result["step_stats"]]
            # step s's stats are read at its end; validation after step s shows up in step s+1's numbers
            quiet = [s for s in range(2, STEPS + 1) if s % EVERY not in (0, 1)]
            print(json.dumps({
                "data": "packed" if packing else "padded", "steps": STEPS, "rows": result["data"]["train_rows"],
                "real_token_fraction": result["data"]["real_token_fraction"],
                "compiles_at_step": {s: compiles[s] - compiles[s - 1] for s in range(1, STEPS + 1)
                                     if compiles[s] != compiles[s - 1]},
                "compiles_after_first_validation": compiles[-1] - compiles[EVERY + 1],
                "max_host_transfers_per_quiet_step": max(transfers[s] - transfers[s - 1] for s in quiet),
                "host_transfers_at_step": {s: transfers[s] - transfers[s - 1] for s in range(1, STEPS + 1)
                                           if transfers[s] != transfers[s - 1]},
            }), flush=True)


if __name__ == "__main__":
    main()
