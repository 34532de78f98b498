"""Benchmark: LoRA training throughput and peak memory on one CUDA GPU, ours beside HF + PEFT.

Each (implementation, case) runs in a fresh child process, so peak memory is that run's
alone. Both sides train LoRA r=16 / alpha=32 on q, k, v (our fused ``qkv_proj``) of a
randomly initialised bf16 Llama on random tokens, with fused AdamW:

* ``ours``: the trainer's real step (``nxd_lora.train.module``: token-weighted
  accumulation, TP-aware clipping, AdamW) on the ``cuda`` backend, with the case's
  ``activation_checkpointing`` mode and the chunked, logits-free loss;
* ``hf``: ``transformers.LlamaForCausalLM`` (SDPA) + ``peft.get_peft_model``, with
  ``gradient_checkpointing_enable`` when the case asks for checkpointing.

Prints one JSON line per run and a table last. Record results in BENCHMARKS.md.

    python bench/train_throughput.py                       # all cases
    python bench/train_throughput.py --cases 1b-2048x8 --impls ours --steps 5

``--device cpu`` runs the same code on the CPU (the tests use it on a tiny shape so this
script keeps working between the sessions that have a GPU to run it on).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A Llama-3-like shape small enough for a CPU: the smoke case that checks the script itself.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False)


def _shape(name: str) -> dict:
    """HF config fields of a public Llama architecture (nxd_lora.model.presets), or TINY."""
    if name == "tiny":
        return TINY
    sys.path.insert(0, str(ROOT))
    from nxd_lora.model.presets import PRESETS

    return PRESETS[name]


# name: (shape, seq_len, micro_batch, activation checkpointing for ours, checkpointing for HF)
CASES = {
    "tiny-64x2-mlp": ("tiny", 64, 2, "mlp", True),
    "1b-2048x8": ("llama3.2-1b", 2048, 8, "none", False),
    "1b-4096x4-ckpt": ("llama3.2-1b", 4096, 4, "full", True),
    "1b-4096x4": ("llama3.2-1b", 4096, 4, "none", False),
    "8b-4096x2-ckpt": ("llama3-8b", 4096, 2, "full", True),
    "8b-4096x2-mlp": ("llama3-8b", 4096, 2, "mlp", True),
    "8b-4096x1": ("llama3-8b", 4096, 1, "none", False),
    "8b-4096x8-ckpt": ("llama3-8b", 4096, 8, "full", True),
    "8b-4096x8-mlp": ("llama3-8b", 4096, 8, "mlp", True),
}


def _random_batch(vocab: int, batch: int, seq: int, device):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), device=device, generator=gen)


def _ours(shape: dict, seq: int, mbs: int, checkpointing: str, device: str = "cuda", base_state: dict | None = None,
          ids=None, tp: int = 1):
    """The trainer's model and step functions on the backend named ``device`` (cuda or cpu): random
    weights, or this rank's ``base_state`` (an NxD rank file's tensors) at ``tp`` ranks (the
    process groups are set up here), on ``ids`` or random tokens."""
    import torch

    sys.path.insert(0, str(ROOT))
    from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
    from nxd_lora.backends import get_backend
    from nxd_lora.lora.config import LoraConfig
    from nxd_lora.lora.model import lora_parameters
    from nxd_lora.model.builder import build_model
    from nxd_lora.train.config import TrainConfig
    from nxd_lora.train.module import accumulate_gradients, clip_gradients, loss_tokens, make_optimizer

    config = LlamaConfig.from_dict(shape)
    backend = get_backend(device)
    backend.setup(tp, check_tensor_parallel(config, tp))
    model = build_model(config, backend, base_state, LoraConfig(lora_rank=16, lora_alpha=32), fuse_qkv=True,
                        dtype=torch.bfloat16)
    model.set_activation_checkpointing(checkpointing)
    model.train()
    train = TrainConfig(backend=device, lr=1e-4, micro_batch_size=mbs, grad_clip=1.0)
    optimizer = make_optimizer(lora_parameters(model), train)
    ids = _random_batch(config.vocab_size, mbs, seq, backend.device) if ids is None else ids.to(backend.device)
    batch = {"input_ids": ids, "labels": ids}

    def step():
        tokens = loss_tokens(batch, model.parallel_state)
        loss = accumulate_gradients(model, batch, mbs, tokens) / tokens
        clip_gradients(model, train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step.model, step.backend = model, backend
    return step


def _hf(shape: dict, seq: int, mbs: int, checkpointing: bool, device: str = "cuda", pretrained: str | None = None,
        ids=None):
    """transformers + peft, configured as the issue's anchor measurements were: random weights, or
    the Hugging Face model directory ``pretrained``, on ``ids`` or random tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig

    config = HFLlamaConfig(**shape)
    if pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     device_map=device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = _random_batch(config.vocab_size, mbs, seq, device) if ids is None else ids.to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step.model = model
    return step


def run_one(impl: str, case: str, steps: int, warmup: int, device: str = "cuda") -> dict:
    """Build one implementation for one case, run warm-up then timed steps; peak memory on CUDA."""
    import torch

    shape_name, seq, mbs, ours_ckpt, hf_ckpt = CASES[case]
    shape = _shape(shape_name)
    cuda = device == "cuda"
    result = dict(impl=impl, case=case, shape=shape_name, seq=seq, micro_batch=mbs,
                  checkpointing=ours_ckpt if impl == "ours" else ("full" if hf_ckpt else "none"),
                  device=torch.cuda.get_device_name() if cuda else device, torch=torch.__version__)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        step = (_ours(shape, seq, mbs, ours_ckpt, device) if impl == "ours"
                else _hf(shape, seq, mbs, hf_ckpt, device))
        losses = [float(step()) for _ in range(warmup)]
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        elapsed = time.perf_counter() - start
        losses.append(float(loss))
        result.update(tokens_per_s=round(steps * mbs * seq / elapsed), step_s=round(elapsed / steps, 4),
                      first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4))
        if cuda:
            result.update(peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    except torch.OutOfMemoryError:
        result.update(error="out of memory", peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    return result


def _table(rows: list[dict]) -> str:
    lines = [f"{'case':16} {'impl':5} {'ckpt':5} {'tokens/s':>9} {'step s':>7} {'peak GiB':>9}  vs hf"]
    hf = {r["case"]: r.get("tokens_per_s") for r in rows if r["impl"] == "hf"}
    for r in rows:
        speed = r.get("tokens_per_s")
        ratio = f"{speed / hf[r['case']]:.2f}x" if speed and hf.get(r["case"]) and r["impl"] == "ours" else ""
        lines.append(f"{r['case']:16} {r['impl']:5} {r['checkpointing']:5} {speed or r.get('error', '-'):>9} "
                     f"{r.get('step_s', '-'):>7} {r.get('peak_alloc_gib', '-'):>9}  {ratio}")
    return "\n".join(lines)


def _run_child(impl: str, case: str, args: argparse.Namespace) -> dict:
    """One run in a fresh process (its own peak memory); a crash or a hang becomes an error row."""
    cmd = [sys.executable, __file__, "--one", f"{impl}:{case}", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device]
    failed = dict(impl=impl, case=case, checkpointing="?")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except subprocess.TimeoutExpired:
        return dict(failed, error=f"timed out after {args.run_timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else dict(failed, error=f"exit {proc.returncode}: {proc.stderr[-800:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--impls", default="hf,ours")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--run-timeout", type=float, default=300.0,
                        help="seconds one (implementation, case) run may take before it is recorded as timed out")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # impl:case, run in this process
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    if args.one:
        impl, case = args.one.split(":")
        print(json.dumps(run_one(impl, case, args.steps, args.warmup, args.device)), flush=True)
        return
    rows = []
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {list(CASES)}")
        for impl in args.impls.split(","):
            row = _run_child(impl, case, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
