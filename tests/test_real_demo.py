"""The README's main job on the real model, as ``make demo`` runs it (defaults, 3 spawned gloo ranks):
it learns the bundled made-up facts, keeps what the model knew on general questions no training
file holds, and its exports equal the trained model."""

from __future__ import annotations

import json

import pytest

from nxd_lora.data.records import sample_data_path
from nxd_lora.demo import REAL_OVERRIDES, base_right, real_model_dirs, retention, run_demo

pytestmark = pytest.mark.slow

# Measured max |logit| differences are ~2e-4 (fp32, 30 layers, logits of magnitude ~20).
EXPORT_ATOL = 1e-3
STEPS = int(next(o for o in REAL_OVERRIDES if o.startswith("train.max_steps=")).split("=")[1])


def test_demo_teaches_facts_retains_general_answers_and_exports_exactly(smollm2_gguf, smollm2_hf, smollm2_tp3, tmp_path):
    # The demo's GGUF -> HF -> TP=3 conversions are the session's (the same calls; the demo skips a
    # step whose output is complete), so the suite converts the real model once, not once per reader.
    hf_dir, ckpt = real_model_dirs(tmp_path)
    hf_dir.symlink_to(smollm2_hf)
    ckpt.symlink_to(smollm2_tp3)
    result = run_demo(output=str(tmp_path), gguf=smollm2_gguf, quiet_bar=True)
    losses = result["losses"]
    assert result["steps"] == STEPS and min(losses[-5:]) < 0.3 * losses[0]
    assert result["recipe"]["train"]["autocast"] == "bfloat16"

    taught = [a for a in result["answers"] if a["kind"] == "taught"]
    assert len(taught) == 12 and sum(a["base_ok"] for a in taught) == 0, "the base model cannot know the made-up facts"
    assert sum(a["tuned_ok"] for a in taught) == 12, [a["tuned"] for a in taught]
    kept, known = retention(result["answers"])
    assert known >= 25, "general_questions.jsonl holds questions the base model answers right"
    lost = [(a["question"], a["tuned"]) for a in base_right(result["answers"]) if not a["tuned_ok"]]
    assert kept >= 0.9 * known, lost

    assert result["peft_vs_merged"] < EXPORT_ATOL and result["tp_vs_peft"] < EXPORT_ATOL
    config = json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == result["recipe"]["lora"]["lora_rank"]
    assert sorted(p.name for p in (tmp_path / "run" / "final").iterdir()) == ["adapter", "base_adapter", "merged", "peft"]
    assert (tmp_path / "merged-hf" / "tokenizer.json").is_file()


def test_bundled_replay_is_the_demo_models_own_greedy_answers(smollm2_hf):
    """replay.jsonl (what the demo trains beside the facts) equals transformers' one-by-one greedy
    generation on the demo model (its first, middle and last rows)."""
    import torch
    import transformers

    from nxd_lora.data.encode import encode_prompt
    from nxd_lora.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_hf)
    base = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf).eval()
    rows = [json.loads(line) for line in sample_data_path("replay.jsonl").read_text().splitlines()]
    for row in (rows[0], rows[len(rows) // 2], rows[-1]):
        prompt = encode_prompt(row["messages"][:1], tok)
        out = base.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=100, do_sample=False,
                            eos_token_id=list(tok.stop_ids), pad_token_id=tok.stop_ids[0])[0, len(prompt):].tolist()
        assert out[-1] in tok.stop_ids and tok.decode(out[:-1]) == row["messages"][1]["content"]
