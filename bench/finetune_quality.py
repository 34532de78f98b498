"""Fine-tuning quality on the real demo model: what LoRA taught, what it kept, and at what speed.

Runs the demo pipeline (SmolLM2-135M-Instruct, GGUF -> HF -> NxD TP=3, LoRA on 3 gloo ranks on the
bundled instructions + made-up facts, PEFT export) and scores base vs tuned greedy answers on
``nxd_lora/data/sample/eval_questions.jsonl``:

* taught facts, asked as trained and rephrased (the rephrasings are never trained on):
  hit = the expected word is in the answer; exact = the answer is the trained sentence;
  ROUGE-L F1 against the trained sentence;
* general questions the base model answers right (all but one never trained on): hit, and
  ROUGE-L F1 of the tuned answer against the base model's answer (how much of it survives).

Also the loss curve, the median wall time per optimizer step and tokens/s (all positions of the
packed rows, padding included, over the 3 ranks together) on this machine. One JSON line per run;
``--set`` runs a variant (recipe overrides), several ``--set`` run several variants in one call.

    NXD_LORA_ASSETS=.assets .venv/bin/python bench/finetune_quality.py
    NXD_LORA_ASSETS=.assets .venv/bin/python bench/finetune_quality.py --set train.lr=0.002 train.micro_batch_size=1
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

    rouge = rouge_scorer.RougeScorer(["rougeL"])
    facts = trained_answers()
    out = {}
    for kind, phrasing in (("taught", "trained"), ("taught", "held-out"), ("general", None)):
        rows = [a for a in result["answers"] if a["kind"] == kind and (phrasing is None or a["phrasing"] == phrasing)]
        name = f"{kind}_{phrasing}" if phrasing else kind
        entry = {"n": len(rows), "base_hit": sum(r["base_ok"] for r in rows), "tuned_hit": sum(r["tuned_ok"] for r in rows)}
        if kind == "taught":
            references = [next(a for a in facts.values() if r["expect"].lower() in a.lower()) for r in rows]
            entry["tuned_exact"] = sum(" ".join(r["tuned"].split()) == ref for r, ref in zip(rows, references))
            entry["base_rougeL"] = round(statistics.mean(rouge.score(ref, r["base"])["rougeL"].fmeasure
                                                         for r, ref in zip(rows, references)), 3)
            entry["tuned_rougeL"] = round(statistics.mean(rouge.score(ref, r["tuned"])["rougeL"].fmeasure
                                                          for r, ref in zip(rows, references)), 3)
        else:
            entry["tuned_vs_base_rougeL"] = round(statistics.mean(rouge.score(r["base"], r["tuned"])["rougeL"].fmeasure
                                                                  for r in rows), 3)
        out[name] = entry
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
