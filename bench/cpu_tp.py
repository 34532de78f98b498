"""Benchmark: the trainer's LoRA step on CPU at TP=2 over TP=1 (gloo), on the demo's tiny model.

The step is the real code path (``nxd_lora.train.module``: token-weighted accumulation, TP-aware
clipping, AdamW) on spawned ranks with one thread each. The model is tiny, so the TP=2/TP=1 ratio
shows the cost of the collectives (per layer: two all-reduces forward, two backward, plus the
vocab-parallel loss) against halved matmuls.

    python bench/cpu_tp.py [--steps 20] [--seq 512] [--micro-batch 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_steps(tp: int, steps: int, seq: int, micro_batch: int) -> dict:
    import torch

    from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
    from nxd_lora.backends import get_backend
    from nxd_lora.demo import TINY_CONFIG
    from nxd_lora.lora.config import LoraConfig
    from nxd_lora.lora.model import lora_parameters
    from nxd_lora.model.builder import build_model
    from nxd_lora.train.config import TrainConfig
    from nxd_lora.train.module import accumulate_gradients, clip_gradients, loss_tokens, make_optimizer

    config = LlamaConfig.from_dict(TINY_CONFIG)
    backend = get_backend("cpu")
    backend.setup(tp, check_tensor_parallel(config, tp))
    try:
        lora = LoraConfig(lora_rank=32, lora_alpha=64, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        model = build_model(config, backend, None, lora)
        train = TrainConfig(lr=1e-3, micro_batch_size=micro_batch)
        optimizer = make_optimizer(lora_parameters(model), train)
        ids = torch.randint(0, config.vocab_size, (micro_batch, seq), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids}

        def step():
            tokens = loss_tokens(batch, model.parallel_state)
            accumulate_gradients(model, batch, micro_batch, tokens)
            clip_gradients(model, train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        backend.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        backend.barrier()
        return {"step_s": (time.perf_counter() - start) / steps}
    finally:
        backend.teardown()


def main() -> None:
    from nxd_lora.local_launch import spawn_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    times = {tp: spawn_ranks(time_steps, tp, tp, args.steps, args.seq, args.micro_batch)[0]["step_s"] for tp in (1, 2)}
    print(json.dumps({"model": "demo tiny (hidden 128, 2 layers, vocab 512)", "seq": args.seq,
                      "micro_batch": args.micro_batch, "threads_per_rank": 1, "steps": args.steps,
                      "tp1_step_s": round(times[1], 4), "tp2_step_s": round(times[2], 4),
                      "tp2_over_tp1": round(times[2] / times[1], 3)}))


if __name__ == "__main__":
    main()
