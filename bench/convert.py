"""Benchmark: HF sharded safetensors (bf16, Llama-3-8B shape, random) -> NxD TP=32, against a plain copy.

Prints JSON lines: the copy (the disk limit) and the conversion, each with wall time and
peak RSS of the process doing it, then their ratio. Results go in BENCHMARKS.md.

    python bench/convert.py --workdir /tmp/nxd_lora_bench          # full 8B shape (~16 GB + ~19 GB)
    python bench/convert.py --workdir /tmp/b --layers 2             # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    tie_word_embeddings=False, model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
)


def make_random_checkpoint(path: Path, config: dict, shard_bytes: int = 5 << 30) -> int:
    """Random bf16 weights in HF's sharded safetensors layout; returns the bytes of weights.

    Runs in a child process (``--make-source``) so this process never holds tensors: the peak
    RSS reported for a forked child includes what its parent had resident before ``exec``.
    """
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoint_tools.llama_config import LlamaConfig
    from checkpoint_tools.tp_layout import expected_hf_shapes

    shapes = expected_hf_shapes(LlamaConfig.from_dict(config))
    path.mkdir(parents=True, exist_ok=True)
    plan, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(key)
        size += nbytes
    weight_map, gen = {}, torch.Generator().manual_seed(0)
    for i, keys in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {k: torch.randn(shapes[k], generator=gen, dtype=torch.float32).to(torch.bfloat16) for k in keys}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return total


def drop_page_cache() -> bool:
    """Start each measurement cold when allowed (root on a real kernel); report whether it worked."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_child(cmd: list[str]) -> dict:
    """Run ``cmd`` to completion; wall seconds and the child's peak RSS (ru_maxrss of waited children)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/nxd_lora_bench")
    parser.add_argument("--tp", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quick run")
    parser.add_argument("--memory-budget-gb", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=3, help="alternating copy/convert runs; medians reported")
    parser.add_argument("--keep", action="store_true", help="keep the last conversion (the source is always kept)")
    parser.add_argument("--make-source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    if args.make_source:
        make_random_checkpoint(Path(args.make_source), config)
        return
    work = Path(args.workdir)
    src = work / f"hf-llama3-8b-shape-{args.layers}l"
    if not (src / "config.json").exists():
        made = timed_child([sys.executable, __file__, "--layers", str(args.layers), "--make-source", str(src)])
        print(json.dumps({"event": "made_source", **made}), flush=True)
    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    copies, converts = [], []
    for run in range(args.repeat):  # alternated, since this kind of VM's disk speed drifts
        for out in ("copy", "nxd"):
            shutil.rmtree(work / out, ignore_errors=True)
        cold = drop_page_cache()
        # cp does not fsync and the converter does: sync after the copy so both are durable writes.
        copy = timed_child(["sh", "-c", f"cp -r '{src}' '{work / 'copy'}' && sync"])
        print(json.dumps({"event": "copy", "run": run, "bytes": weights, "cold_cache": cold, **copy}), flush=True)
        shutil.rmtree(work / "copy")
        cold = drop_page_cache()
        convert = timed_child([sys.executable, "-m", "nxd_lora.cli", "convert", str(src), str(work / "nxd"),
                               "--tp", str(args.tp), "--memory-budget-gb", str(args.memory_budget_gb)])
        written = sum(p.stat().st_size for p in (work / "nxd").rglob("*.pt"))
        print(json.dumps({"event": "convert", "run": run, "tp": args.tp, "bytes_written": written,
                          "cold_cache": cold, **convert}), flush=True)
        copies.append(copy)
        converts.append(convert)
        if not args.keep or run < args.repeat - 1:
            shutil.rmtree(work / "nxd")
    copy_s = statistics.median(c["wall_s"] for c in copies)
    convert_s = statistics.median(c["wall_s"] for c in converts)
    print(json.dumps({"event": "summary", "layers": args.layers, "tp": args.tp, "runs": args.repeat,
                      "median_copy_s": copy_s, "median_convert_s": convert_s,
                      "time_ratio_convert_over_copy": round(convert_s / copy_s, 2),
                      "convert_peak_rss_gib": max(c["peak_rss_gib"] for c in converts),
                      "goal": "ratio <= 2, rss <= 3 GiB"}))


if __name__ == "__main__":
    main()
