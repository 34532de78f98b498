"""Benchmark: the LoRA training step on the CPU, ours beside transformers + peft, on the real demo model.

The one speed comparison this kind of machine can make honestly. Both sides train LoRA r=16 /
alpha=32 on q, k, v of SmolLM2-135M-Instruct (the embedded demo model, real weights, bf16) on the
same rows of real text (the bundled sample data, tokenized by the model's tokenizer), with the step
builders of ``bench/train_throughput.py``:

* ``hf``: ``transformers.LlamaForCausalLM.from_pretrained`` (SDPA) + ``peft.get_peft_model``;
* ``ours``: the trainer's step (``nxd_lora.train.module``) on the converted NxD checkpoint (fused
  ``qkv_proj``), on the ``cpu`` backend.

Every run is a fresh child process; rounds alternate the order of the two sides, and the table
gives the median over rounds. Peak RSS is the child's high-water mark over the training steps alone
(reset after the model is built, via /proc/self/clear_refs); ``load`` is the whole run's peak,
model loading included.
The TP cases run our step over gloo at TP=3 beside TP=1, one thread per rank (``spawn_ranks``).

    python bench/cpu_side_by_side.py                      # 3 rounds, seq 512 x 2 and 2048 x 1, TP 3 vs 1
    python bench/cpu_side_by_side.py --rounds 1 --steps 1 --cases 64x1 --tp-cases ''   # smoke run
    python bench/cpu_side_by_side.py --profile ours:512x2 --steps 2    # top ops of two steps

Needs the demo model (``nxd-lora fetch-model``); the HF directory and the NxD checkpoints are
converted from it once into ``--work``. Record results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import _hf, _ours  # noqa: E402  (the same two training steps)


def parse_case(case: str) -> tuple[int, int]:
    """``"512x2"`` -> (seq 512, micro-batch 2)."""
    seq, mbs = case.lower().split("x")
    return int(seq), int(mbs)


def model_dirs(work: Path, tp: int) -> tuple[Path, Path]:
    """(HF directory, NxD base tag with fused ``qkv_proj``) of the demo model at ``tp``, converted on first use."""
    from checkpoint_tools.nxd_format import BASE_TAG
    from nxd_lora.assets import asset_path
    from nxd_lora.demo import prepare_real_model

    hf_dir, ckpt = prepare_real_model(work, asset_path(), tp, fuse_qkv=True)
    return hf_dir, ckpt / BASE_TAG


def text_rows(hf_dir: Path, seq: int, mbs: int) -> torch.Tensor:
    """``mbs`` rows of ``seq`` tokens of the bundled sample data (every message, in file order, repeated)."""
    from nxd_lora.data.records import read_records, sample_data_path
    from nxd_lora.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir)
    ids: list[int] = []
    for name in ("instructions.jsonl", "facts.jsonl"):
        for record in read_records(sample_data_path(name)).records:
            for message in record.messages:
                ids.extend(tok.encode(message["content"]))
    need = seq * mbs
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids).view(mbs, seq)


def reset_peak_rss() -> None:
    """Start the kernel's RSS high-water mark (VmHWM) afresh from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def time_steps(step, steps: int, warmup: int, barrier=lambda: None) -> dict:
    """Warm-up steps (their losses kept), then ``steps`` timed ones; peak RSS over the steps only."""
    import gc

    gc.collect()
    load_peak = peak_rss_gib()  # building the model (reading the weights) up to here
    reset_peak_rss()
    losses = [float(step()) for _ in range(warmup)]
    barrier()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    barrier()
    elapsed = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = peak_rss_gib()
    return dict(step_s=elapsed / steps, first_loss=losses[0] if losses else None, last_loss=float(loss),
                peak_rss_gib=peak, load_peak_gib=max(load_peak, peak), page_faults_per_step=faults / steps)


def _shape(hf_dir: Path) -> dict:
    return json.loads((hf_dir / "config.json").read_text())


def _ours_step(work: str, tp: int, seq: int, mbs: int):
    from checkpoint_tools.atomic_io import load_tensors
    from checkpoint_tools.nxd_format import rank_path

    hf_dir, tag = model_dirs(Path(work), tp)
    rank = int(os.environ.get("RANK", 0))
    return _ours(_shape(hf_dir), seq, mbs, "none", "cpu", base_state=load_tensors(rank_path(tag, rank)),
                 ids=text_rows(hf_dir, seq, mbs), tp=tp)


def _hf_step(work: Path, seq: int, mbs: int):
    hf_dir, _ = model_dirs(work, 1)
    return _hf(_shape(hf_dir), seq, mbs, False, "cpu", pretrained=str(hf_dir), ids=text_rows(hf_dir, seq, mbs))


def ours_rank(work: str, tp: int, seq: int, mbs: int, steps: int, warmup: int) -> dict:
    """One rank of our step on the NxD checkpoint at ``tp`` (module level: ``spawn_ranks`` imports it)."""
    step = _ours_step(work, tp, seq, mbs)
    try:
        return time_steps(step, steps, warmup, step.backend.barrier)
    finally:
        step.backend.teardown()


def run_one(impl: str, case: str, tp: int, args: argparse.Namespace) -> dict:
    """One measurement in this process: ``hf``, ``ours`` (all threads), or ``ours-tpN`` (N ranks, 1 thread each)."""
    seq, mbs = parse_case(case)
    result = dict(impl=impl, case=case, tp=tp, torch=torch.__version__)
    if impl == "hf":
        result.update(time_steps(_hf_step(args.work, seq, mbs), args.steps, args.warmup),
                      threads=torch.get_num_threads())
    elif impl == "ours":
        result.update(ours_rank(str(args.work), 1, seq, mbs, args.steps, args.warmup), threads=torch.get_num_threads())
    else:
        from nxd_lora.local_launch import spawn_ranks

        ranks = spawn_ranks(ours_rank, tp, str(args.work), tp, seq, mbs, args.steps, args.warmup)
        result.update(ranks[0], threads=1, peak_rss_gib=sum(r["peak_rss_gib"] for r in ranks),
                      load_peak_gib=sum(r["load_peak_gib"] for r in ranks))
    result["tokens_per_s"] = seq * mbs / result["step_s"]
    return result


def profile_one(impl: str, case: str, args: argparse.Namespace, rows: int = 15) -> str:
    """``torch.profiler`` over ``--steps`` steps of ``hf`` or ``ours`` (TP=1) after the warm-up:
    the top ops by self CPU time, the table BENCHMARKS.md's profiles come from."""
    from torch.profiler import profile

    seq, mbs = parse_case(case)
    step = _hf_step(args.work, seq, mbs) if impl == "hf" else _ours_step(str(args.work), 1, seq, mbs)
    for _ in range(args.warmup):
        step()
    with profile() as prof:
        for _ in range(args.steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_child(impl: str, case: str, tp: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{impl}:{case}:{tp}", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--work", str(args.work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{impl} {case} tp={tp} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


BASELINE = {"ours": "hf", "ours-tp": "ours-tp1"}  # what each side is compared with, in the same round


def median_rows(results: list[dict]) -> dict[tuple, dict]:
    """Per (impl, case, tp): medians over rounds of tokens/s and peak RSS and, against the baseline,
    the median of the per-round ratios (each round's pair ran back to back, so drift of a shared
    machine cancels better than in a ratio of medians)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["impl"], r["case"], r["tp"]), []).append(r)
    speed = {(r["impl"], r["case"], r["round"]): r["tokens_per_s"] for r in results}
    medians = {}
    for (impl, case, tp), rows in groups.items():
        ratios = [r["tokens_per_s"] / speed[(BASELINE[impl], case, r["round"])] for r in rows
                  if (BASELINE.get(impl), case, r["round"]) in speed]
        medians[(impl, case, tp)] = dict(
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
            all_tokens_per_s=[round(r["tokens_per_s"], 1) for r in rows],
            ratio=statistics.median(ratios) if ratios else None, all_ratios=[round(x, 2) for x in ratios],
            peak_rss_gib=statistics.median(r["peak_rss_gib"] for r in rows),
            load_peak_gib=statistics.median(r["load_peak_gib"] for r in rows),
            first_loss=rows[0]["first_loss"], threads=rows[0]["threads"])
    return medians


def table(medians: dict[tuple, dict]) -> str:
    lines = ["| case | impl | TP | threads/rank | tokens/s (median; rounds) | ratio (median; rounds) "
             "| peak RSS GiB (steps; load) | first loss |", "|---|---|---|---|---|---|---|---|"]
    for (impl, case, tp), m in medians.items():
        ratio = ""
        if m["ratio"] is not None:
            ratio = f"{m['ratio']:.2f}x of {'HF' if impl == 'ours' else 'TP=1'}; {m['all_ratios']}"
        lines.append(f"| {case} | {impl} | {tp} | {m['threads']} | {m['tokens_per_s']:.1f}; {m['all_tokens_per_s']} | "
                     f"{ratio} | {m['peak_rss_gib']:.2f}; {m['load_peak_gib']:.2f} | {m['first_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="512x2,2048x1", help="SEQxMICROBATCH, comma-separated")
    parser.add_argument("--tp-cases", default="512x2", help="cases for our TP=3 over TP=1 (empty: none)")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "nxd-lora-bench")
    parser.add_argument("--profile", metavar="IMPL:CASE", help="profile hf or ours on one case instead (e.g. ours:512x2)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        impl, case = args.profile.split(":")
        model_dirs(args.work, 1)
        print(profile_one(impl, case, args))
        return
    if args.one:
        impl, case, tp = args.one.split(":")
        print(json.dumps(run_one(impl, case, int(tp), args)))
        return
    for tp in {1, args.tp}:
        model_dirs(args.work, tp)  # convert once, outside the timed children
    runs = [(impl, case, 1) for case in args.cases.split(",") if case for impl in ("hf", "ours")]
    runs += [(impl, case, tp) for case in args.tp_cases.split(",") if case
             for impl, tp in (("ours-tp1", 1), ("ours-tp", args.tp))]
    results = []
    for round_ in range(args.rounds):
        # Alternate which side goes first, so slow drift of the machine does not favour one.
        for impl, case, tp in (runs if round_ % 2 == 0 else runs[::-1]):
            result = dict(run_child(impl, case, tp, args), round=round_)
            print(json.dumps(result), flush=True)
            results.append(result)
    print(table(median_rows(results)))


if __name__ == "__main__":
    main()
