"""Fine-tuning quality on the real demo model: what LoRA taught, what it kept, and at what speed.

Runs the demo pipeline (SmolLM2-135M-Instruct, GGUF -> HF -> NxD TP=3, the base model's own answers
to the bundled general prompts as replay, LoRA on 3 gloo ranks on the made-up facts + that replay,
PEFT export) and scores base vs tuned greedy answers:

* taught facts (``eval_questions.jsonl``), asked as trained and rephrased (the rephrasings are never
  trained on): hit = the expected word is in the answer; exact = the answer is the trained
  sentence; ROUGE-L F1 against the trained sentence;
* retained: of the held-apart general questions (``general_questions.jsonl``, in no training file)
  the base model answers right, how many the tuned model still answers right; ROUGE-L F1 of the
  tuned answers against the base model's (how much of its wording survives);
* the seven general questions of the demo's table: hit.

Also the loss curve, the median wall time per optimizer step and tokens/s (all positions of the
packed rows, padding included, over the 3 ranks together) on this machine, and the demo's wall time.
One JSON line per run; ``--set`` runs a variant (recipe overrides), several ``--set`` run several
variants in one call (a variant's ``data.train_files`` replaces the facts + replay, e.g. the facts
beside the hand-written ``instructions.jsonl``: the demo's earlier mix).

    NXD_LORA_ASSETS=.assets .venv/bin/python bench/finetune_quality.py
    NXD_LORA_ASSETS=.assets .venv/bin/python bench/finetune_quality.py --set train.lr=0.002 --set train.max_steps=20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nxd_lora.data.records import read_records, sample_data_path  # noqa: E402
from nxd_lora.demo import real_model_dirs, run_demo  # noqa: E402


def trained_answers() -> dict[str, str]:
    """Question -> the answer sentence it was trained with (facts file)."""
    return {r.messages[0]["content"]: r.messages[-1]["content"] for r in read_records(sample_data_path("facts.jsonl")).records}


def score(result: dict) -> dict:
    from rouge_score import rouge_scorer

    from nxd_lora.demo import base_right, retention

    rouge = rouge_scorer.RougeScorer(["rougeL"])
    facts = trained_answers()
    out = {}
    for phrasing in ("trained", "held-out"):
        rows = [a for a in result["answers"] if a["kind"] == "taught" and a["phrasing"] == phrasing]
        references = [next(a for a in facts.values() if r["expect"].lower() in a.lower()) for r in rows]
        out[f"taught_{phrasing}"] = {
            "n": len(rows), "base_hit": sum(r["base_ok"] for r in rows), "tuned_hit": sum(r["tuned_ok"] for r in rows),
            "tuned_exact": sum(" ".join(r["tuned"].split()) == ref for r, ref in zip(rows, references)),
            "tuned_rougeL": round(statistics.mean(rouge.score(ref, r["tuned"])["rougeL"].fmeasure
                                                  for r, ref in zip(rows, references)), 3)}
    kept, known = retention(result["answers"])
    right = base_right(result["answers"])
    out["retained"] = {"base_right": known, "tuned_right": kept, "percent": round(100 * kept / known, 1),
                       "lost": [a["question"] for a in right if not a["tuned_ok"]],
                       "tuned_vs_base_rougeL": round(statistics.mean(rouge.score(a["base"], a["tuned"])["rougeL"].fmeasure
                                                                     for a in right), 3)}
    table = [a for a in result["answers"] if a["kind"] == "general"]
    out["table_general"] = {"n": len(table), "base_hit": sum(a["base_ok"] for a in table),
                            "tuned_hit": sum(a["tuned_ok"] for a in table)}
    return out


def run(variant: list[str], workdir: Path) -> dict:
    result = run_demo(output=str(workdir), extra_overrides=variant, quiet_bar=True)
    steps = result["step_seconds"]
    recipe = result["recipe"]
    tokens_per_step = recipe["train"]["micro_batch_size"] * recipe["train"]["grad_accum"] * recipe["data"]["seq_len"]
    median = statistics.median(steps)
    return {
        "bench": "finetune_quality", "variant": variant, "steps": result["steps"],
        "loss_first": round(result["losses"][0], 4), "loss_last": round(result["losses"][-1], 4),
        "loss_curve": [round(x, 3) for x in result["losses"][:: max(1, len(result["losses"]) // 10)]],
        "median_step_s": round(median, 2), "tokens_per_s": round(tokens_per_step / median, 1),
        "train_s": round(sum(steps), 1), "demo_s": round(result["seconds"], 1),
        "peft_vs_merged": result["peft_vs_merged"], "tp_vs_peft": result["tp_vs_peft"], **score(result),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", nargs="*", action="append", default=None, metavar="OVERRIDE",
                        help="a variant: recipe overrides (repeat --set for several variants)")
    parser.add_argument("--workdir", help="keep outputs here (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    variants = args.set or [[]]
    with tempfile.TemporaryDirectory(prefix="nxd_lora_quality_") as tmp:
        base = Path(args.workdir or tmp)
        prepared = base / "model"  # converted once, shared by the variants
        for i, variant in enumerate(variants):
            workdir = base / f"variant{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            names = [d.name for d in real_model_dirs(workdir)]
            for name in names:
                if (prepared / name).exists() and not (workdir / name).exists():
                    (workdir / name).symlink_to(prepared / name)
            line = run(variant, workdir)
            for name in names:
                if not (prepared / name).exists() and (workdir / name).is_dir():
                    prepared.mkdir(exist_ok=True)
                    (workdir / name).rename(prepared / name)
                    (workdir / name).symlink_to(prepared / name)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
