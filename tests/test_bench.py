"""bench/train_throughput.py on the CPU, so the script a GPU session runs keeps working without one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_runs_both_implementations_and_trains(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--device", "cpu",
                           "--cases", "tiny-64x2-mlp", "--steps", "3", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {row["impl"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"hf", "ours"}
    for impl, row in rows.items():
        assert "error" not in row, (impl, row)
        assert row["tokens_per_s"] > 0 and math.isfinite(row["first_loss"])
        # Three AdamW steps on the same batch lower its loss: the step really updates the LoRA weights.
        assert row["last_loss"] < row["first_loss"], (impl, row)
    assert rows["ours"]["checkpointing"] == "mlp" and rows["hf"]["checkpointing"] == "full"
    # The table's last row is ours, with its speed relative to HF's.
    assert proc.stdout.splitlines()[-1].split()[:2] == ["tiny-64x2-mlp", "ours"]
    assert proc.stdout.rstrip().endswith("x")
