"""Benchmark: what one LoRA training step keeps for backward and how much it computes, ours beside
HF + PEFT, at a real model's layer shapes, on the CPU (no GPU needed).

Throughput and peak memory need a GPU (``bench/train_throughput.py``); the two quantities behind
them do not. For each (implementation, checkpointing) this builds the model of ``--preset``'s
shapes with 1 and then 2 decoder layers (bf16, random weights, LoRA r=16 on q, k, v as in
``train_throughput.py``), runs one forward + backward on ``--seq`` random tokens, and measures:

* bytes kept for backward: every tensor autograd saves (saved-tensor hooks), weights excluded;
* FLOPs: ``torch.utils.flop_counter`` over forward, recomputation and backward.

The 2-layer minus the 1-layer run gives the cost of one decoder layer; the rest is the embedding
and loss side. Both scale exactly to the whole model (flash attention keeps O(seq) per token),
which is what the printed projection to ``--layers`` and ``--micro-batch`` does.

    python bench/step_cost.py                     # llama3-8b shapes, seq 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import _hf, _ours, _shape  # noqa: E402  (the same two training steps and shapes)

RUNS = [("ours", "none"), ("ours", "mlp"), ("ours", "full"), ("hf", "none"), ("hf", "full")]


def measure(impl: str, mode: str, shape: dict, seq: int) -> tuple[float, float]:
    """(bytes kept for backward, FLOPs) of one training step on one row of ``seq`` tokens."""
    torch.manual_seed(0)
    from nxd_lora.model import attention

    # What a device's attention kernel keeps (q, k, v, output), not the eager CPU kernel's probabilities
    # (kept up to KEEP_PROBS_MAX_SEQ positions, a CPU-only trade of memory for time).
    attention.KEEP_PROBS_MAX_SEQ = 0
    step = _ours(shape, seq, 1, mode, "cpu") if impl == "ours" else _hf(shape, seq, 1, mode == "full", "cpu")
    weights = {p.untyped_storage().data_ptr() for p in step.model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return float(sum(kept.values())), float(flops.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b", help="nxd_lora.model.presets name, or 'tiny'")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, help="project to this many layers (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 2, 8], help="project to these")
    parser.add_argument("--runs", default=",".join(f"{i}:{m}" for i, m in RUNS), help="impl:checkpointing,...")
    args = parser.parse_args()
    shape = _shape(args.preset)
    layers = args.layers or shape["num_hidden_layers"]
    rows = []
    for run in args.runs.split(","):
        impl, mode = run.split(":")
        (kept1, flops1), (kept2, flops2) = (measure(impl, mode, dict(shape, num_hidden_layers=n), args.seq)
                                            for n in (1, 2))
        layer_kept, layer_flops = kept2 - kept1, flops2 - flops1
        row = dict(impl=impl, checkpointing=mode, preset=args.preset, seq=args.seq,
                   kept_kib_per_token_layer=round(layer_kept / args.seq / 1024, 2),
                   kept_kib_per_token_rest=round((kept1 - layer_kept) / args.seq / 1024, 2),
                   gflop_per_token_layer=round(layer_flops / args.seq / 1e9, 4),
                   gflop_per_token_rest=round((flops1 - layer_flops) / args.seq / 1e9, 4))
        whole_kept = kept1 + (layers - 1) * layer_kept
        row["gflop_per_token"] = round((flops1 + (layers - 1) * layer_flops) / args.seq / 1e9, 3)
        row["kept_gib"] = {f"x{mbs}": round(mbs * whole_kept / 2**30, 2) for mbs in args.micro_batch}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = next((r for r in rows if r["impl"] == "hf" and r["checkpointing"] == "full"), None)
    print(f"\n{layers} layers, seq {args.seq}: kept for backward (GiB) at micro-batch {args.micro_batch}; "
          "FLOPs per token relative to HF+PEFT with checkpointing")
    for r in rows:
        ratio = f"{r['gflop_per_token'] / ref['gflop_per_token']:.3f}" if ref else "-"
        print(f"  {r['impl']:4} {r['checkpointing']:5} kept {r['kept_gib']}  "
              f"{r['gflop_per_token']:8.2f} GFLOP/token ({ratio})")


if __name__ == "__main__":
    main()
