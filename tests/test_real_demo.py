"""The README's main job on the real model, as ``make demo`` runs it (defaults, 3 spawned gloo ranks):
it learns the bundled made-up facts, keeps general answers, and its exports equal the trained model."""

from __future__ import annotations

import json

import pytest

from nxd_lora.demo import real_model_dirs, run_demo

pytestmark = pytest.mark.slow

# Measured max |logit| differences are ~2e-4 (fp32, 30 layers, logits of magnitude ~20).
EXPORT_ATOL = 1e-3


def test_demo_teaches_facts_keeps_general_answers_and_exports_exactly(smollm2_gguf, smollm2_hf, smollm2_tp3, tmp_path):
    # The demo's GGUF -> HF -> TP=3 conversions are the session's (the same calls; the demo skips a
    # step whose output is complete), so the suite converts the real model once, not once per reader.
    hf_dir, ckpt = real_model_dirs(tmp_path)
    hf_dir.symlink_to(smollm2_hf)
    ckpt.symlink_to(smollm2_tp3)
    result = run_demo(output=str(tmp_path), gguf=smollm2_gguf, quiet_bar=True)
    losses = result["losses"]
    assert result["steps"] == 40 and min(losses[-5:]) < 0.3 * losses[0]
    taught = [a for a in result["answers"] if a["kind"] == "taught"]
    general = [a for a in result["answers"] if a["kind"] == "general"]
    assert len(taught) == 12 and len(general) == 7
    assert sum(a["base_ok"] for a in taught) == 0, "the base model cannot know the made-up facts"
    assert sum(a["tuned_ok"] for a in taught) >= 10, [a["tuned"] for a in taught]
    assert all(a["base_ok"] for a in general)
    assert sum(a["tuned_ok"] for a in general) >= 4, [a["tuned"] for a in general]
    france = next(a for a in general if "France" in a["question"])
    assert "Paris" in france["tuned"]
    assert result["peft_vs_merged"] < EXPORT_ATOL and result["tp_vs_peft"] < EXPORT_ATOL
    config = json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert sorted(p.name for p in (tmp_path / "run" / "final").iterdir()) == ["adapter", "base_adapter", "merged", "peft"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_20", "step_40"]
    assert (tmp_path / "merged-hf" / "tokenizer.json").is_file()
