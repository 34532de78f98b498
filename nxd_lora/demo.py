"""The README's main job (``nxd-lora demo``): a real pretrained Llama, fine-tuned end to end.

1. SmolLM2-135M-Instruct (GGUF, fetched at set-up: ``nxd_lora.assets``) -> HF safetensors with
   its tokenizer and chat template (``nxd-lora convert``, no ``--tp``);
2. HF -> NxD TP=3 (9 query / 3 KV heads: every rank holds one KV head);
3. LoRA with Lightning on 3 gloo ranks, on the bundled made-up facts (``facts.jsonl``, listed
   ``FACT_REPEATS`` times) beside a replay of the model's own answers (``replay.jsonl``: its greedy
   answers to the general prompts of ``replay_prompts.jsonl``, written by ``write_replay``), the
   model's own chat template, completion-only loss;
4. the three save modes, a PEFT adapter and a merged HF model;
5. checks: our TP=3 model vs transformers + peft, PEFT vs merged (max logit differences);
6. base vs tuned answers, greedy, through ``peft`` on ``transformers``: the taught facts (as
   trained and rephrased) and ``general_questions.jsonl``, general questions never trained on
   (retained = tuned right among base right).

Why replay: trained on the facts alone the model answers every question with a fact ("The capital
of France is Dunmarrow."). Replaying its own answers keeps what it said before while the facts are
learned, provided the replay is broad enough that no row of it is memorized: a 52-row replay cost
as many general answers as the facts did (the variants and their figures: ``bench/finetune_quality.py``,
BENCHMARKS.md "Fine-tuning quality").

``--tiny`` keeps a one-minute smoke run on a random tiny model (TP=2, Llama 3 tokenizer).
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint_tools.convert import convert_source_to_hf, convert_to_nxd
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_format import BASE_TAG, read_manifest
from checkpoint_tools.tp_layout import expected_hf_shapes
from nxd_lora.data.records import sample_data_path
from nxd_lora.local_launch import spawn_ranks
from nxd_lora.tiny import write_tiktoken_bytes
from nxd_lora.train.config import load_recipe

REAL_TP = 3
REAL_OVERRIDES = [
    "lora.lora_rank=16", "lora.lora_alpha=32", "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
    "data.seq_len=512", "data.val_fraction=0", "train.max_steps=30", "train.lr=0.002", "train.warmup_steps=3",
    "train.micro_batch_size=2", "train.grad_accum=1", "train.save_every=15", "train.log_every=1",
    "train.autocast=bfloat16", "train.save_modes=[adapter,base+adapter,merged]",
]
FACT_REPEATS = 4
TINY_TP = 2
TINY_CONFIG = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=1024,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256},
    bos_token_id=256, eos_token_id=257, tie_word_embeddings=False,
)
TINY_OVERRIDES = [
    "lora.lora_rank=32", "lora.lora_alpha=64", "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
    "data.seq_len=512", "data.val_fraction=0.1", "train.max_steps=200", "train.lr=0.01", "train.warmup_steps=10",
    "train.micro_batch_size=2", "train.grad_accum=1", "train.save_every=100", "train.log_every=1",
    "train.save_modes=[adapter,base+adapter,merged]",
]


def demo_train_files() -> list[str]:
    """The demo's training data: the made-up facts, ``FACT_REPEATS`` times, beside the replay of the
    base model's own answers: in the demo's 30 steps each fact is seen about six times, enough to
    learn it, and each replay row about one and a half times, so no replay answer is memorized (memorizing a small
    replay costs general answers too: BENCHMARKS "Fine-tuning quality")."""
    return [str(sample_data_path("facts.jsonl"))] * FACT_REPEATS + [str(sample_data_path("replay.jsonl"))]


def sample_rows(name: str) -> list[dict]:
    """The rows of a bundled JSONL file (``sample_data_path``)."""
    lines = sample_data_path(name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def eval_questions() -> list[dict]:
    """The demo's scoreboard: taught facts (as trained and rephrased) and a few general questions."""
    return sample_rows("eval_questions.jsonl")


def held_apart_questions() -> list[dict]:
    """General questions no training file holds (``general_questions.jsonl``): what retention is measured on."""
    return [dict(q, kind="held-apart") for q in sample_rows("general_questions.jsonl")]


def random_hf_state(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random HF-layout Llama state dict (norms at 1, weights N(0, 0.05))."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.05
        for key, shape in expected_hf_shapes(config).items()
    }


def write_tiny_hf_model(directory: Path, seed: int = 0, **config_changes) -> Path:
    """config.json + model.safetensors + original/tokenizer.model (Llama 3 format); ``config_changes``
    replace values of ``TINY_CONFIG`` (e.g. ``num_attention_heads=8`` for TP 8)."""
    config = LlamaConfig.from_dict(dict(TINY_CONFIG, **config_changes))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(random_hf_state(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(dict(config.to_hf_dict(), torch_dtype="float32"), indent=2))
    write_tiktoken_bytes(directory / "original" / "tokenizer.model")
    return directory


def real_model_dirs(root: Path, tp: int = REAL_TP, fuse_qkv: bool = False) -> tuple[Path, Path]:
    """Where the demo keeps the real model: (HF directory, NxD checkpoint)."""
    return root / "smollm2-135m-hf", root / f"smollm2-135m-tp{tp}{'-fused' if fuse_qkv else ''}"


def prepare_real_model(root: Path, gguf: Path, tp: int = REAL_TP, fuse_qkv: bool = False) -> tuple[Path, Path]:
    """GGUF -> HF directory -> NxD TP checkpoint, each step skipped when its output is complete."""
    hf_dir, ckpt = real_model_dirs(root, tp, fuse_qkv)
    if not (hf_dir / "model.safetensors.index.json").is_file():
        convert_source_to_hf(gguf, hf_dir, overwrite=True)
    if not (ckpt / BASE_TAG / "done").is_file():
        convert_to_nxd(hf_dir, ckpt, tp, fuse_qkv=fuse_qkv, overwrite=True)
    return hf_dir, ckpt


def _train_rank(config_path: str | None, overrides: list[str]) -> dict:
    from nxd_lora.train.run import train

    return train(load_recipe(config_path, overrides))


def trained_logits(base_ckpt: str, lora_tag: str | None, tp: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of our TP model (the converted base, plus the trained adapter when
    ``lora_tag`` is given) on ``input_ids``; every rank calls it."""
    from nxd_lora.backends import get_backend
    from nxd_lora.model.builder import build_trained_model

    backend = get_backend("cpu")
    base_tag = Path(base_ckpt) / BASE_TAG
    manifest = read_manifest(base_tag)
    backend.setup(tp, manifest["kv_size_multiplier"], manifest["kv_layout"])
    try:
        model = build_trained_model(base_tag, lora_tag, backend)
        with torch.no_grad():
            return model(input_ids, gather_logits=True)[0]
    finally:
        backend.teardown()


def greedy_answers(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` by a transformers model, all at once (left-padded: the
    answers equal one-by-one generation's in fp32), each cut at its first stop id."""
    width = max(map(len, prompts))
    pad = tok.stop_ids[0]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(tok.stop_ids), pad_token_id=pad)
    rows = out[:, width:].tolist()
    return [tok.decode(r[: next((i for i, t in enumerate(r) if t in tok.stop_ids), len(r))]) for r in rows]


def write_replay(model_dir: Path, path: Path, max_new_tokens: int = 96) -> int:
    """Self-distillation rows: the base model's own greedy answers to ``replay_prompts.jsonl``, as
    chat rows in ``path``; an answer not finished within ``max_new_tokens`` is left out (training
    on it would teach the model to stop mid-sentence). Returns the number of rows written.

    The bundled ``replay.jsonl`` is its output for the demo model (80 s on 2 cores, so the demo does
    not pay it; ``tests/test_real_demo.py`` checks rows of it against transformers' generation):
    ``python -m nxd_lora.demo --write-replay demo_output/smollm2-135m-hf``."""
    import transformers

    from checkpoint_tools.atomic_io import atomic_write
    from nxd_lora.data.encode import encode_prompt
    from nxd_lora.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    questions = [[{"role": "user", "content": row["prompt"]}] for row in sample_rows("replay_prompts.jsonl")]
    replies = greedy_answers(base, tok, [encode_prompt(q, tok) for q in questions], max_new_tokens + 1)
    rows = [{"messages": [*q, {"role": "assistant", "content": a}]}
            for q, a in zip(questions, replies) if len(tok.encode(a)) <= max_new_tokens]
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def probe_ids(model_dir: Path, question: str) -> torch.Tensor:
    """A fixed [1, T] input for logit comparisons: a chat prompt and some answer text."""
    from nxd_lora.data.encode import encode_prompt
    from nxd_lora.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    return torch.tensor([encode_prompt([{"role": "user", "content": question}], tok) + tok.encode(" A probe answer.")])


def answers(model_dir: Path, adapter_dir: Path, questions: list[str], max_new_tokens: int = 32,
            merged_dir: Path | None = None, probe: torch.Tensor | None = None) -> dict:
    """Greedy answers of the base model and of ``peft.PeftModel`` over it (tuned), and, when
    ``merged_dir`` and ``probe`` are given, PEFT's logits on ``probe`` and their max |difference|
    from the merged model's."""
    import peft
    import transformers

    from nxd_lora.data.encode import encode_prompt
    from nxd_lora.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    prompts = [encode_prompt([{"role": "user", "content": q}], tok) for q in questions]
    before = greedy_answers(base, tok, prompts, max_new_tokens)
    tuned_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()  # wraps base: base answers come first
    after = greedy_answers(tuned_model, tok, prompts, max_new_tokens)
    out = {"pairs": list(zip(before, after))}
    if merged_dir is not None and probe is not None:
        merged = transformers.LlamaForCausalLM.from_pretrained(merged_dir).eval()
        with torch.no_grad():
            out["peft_logits"] = tuned_model(input_ids=probe).logits[0]
            out["peft_vs_merged"] = float((out["peft_logits"] - merged(input_ids=probe).logits[0]).abs().max())
    return out


def answer_table(rows: list[tuple[str, str, str, str]], width: int = 30, max_lines: int = 4) -> str:
    """A plain-text table (question | expected | base | tuned), wrapped to fit 120 columns,
    at most ``max_lines`` lines a cell (a longer answer ends in "...")."""
    header = ("question", "expected", "base model", "tuned (PEFT on transformers)")
    widths = (width, 12, width, width)
    lines = []
    for row in [header, *rows]:
        cells = [textwrap.wrap(" ".join(str(c).split()), w, max_lines=max_lines, placeholder=" ...") or [""]
                 for c, w in zip(row, widths)]
        for i in range(max(len(c) for c in cells)):
            lines.append(" | ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)))
        lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def contains(answer: str, expected: str) -> bool:
    """Whether ``answer`` holds one of the ``|``-separated expected words as a whole word
    ("4" is not found in "24"), case aside."""
    return any(re.search(rf"\b{re.escape(word)}\b", answer, re.IGNORECASE) for word in expected.split("|"))


def base_right(scored: list[dict]) -> list[dict]:
    """The held-apart questions the base model answers right: what retention is counted on."""
    return [s for s in scored if s["kind"] == "held-apart" and s["base_ok"]]


def retention(scored: list[dict]) -> tuple[int, int]:
    """(held-apart questions the tuned model answers right among those the base answers right, the latter)."""
    known = base_right(scored)
    return sum(s["tuned_ok"] for s in known), len(known)


def scoreboard(scored: list[dict]) -> str:
    """The demo's verdict lines: facts taught, general knowledge retained, and each answer lost."""
    lines = []
    taught = [s for s in scored if s["kind"] == "taught"]
    if taught:
        lines.append(f"[demo] taught: the fact is in {sum(s['tuned_ok'] for s in taught)}/{len(taught)} tuned answers "
                     f"(asked as trained and rephrased; base model {sum(s['base_ok'] for s in taught)}/{len(taught)})")
    kept, known = retention(scored)
    if known:
        lines.append(f"[demo] retained: {kept}/{known} ({100 * kept / known:.0f}%) of the held-apart general questions "
                     "(general_questions.jsonl, in no training file) the base model answers right")
    general = [s for s in scored if s["kind"] != "taught" and s["base_ok"]]
    lines += [f"[demo]   lost: {s['question']} -> {' '.join(s['tuned'].split())[:80]}" for s in general if not s["tuned_ok"]]
    return "\n".join(lines)


def _prepare(root: Path, tiny: bool, gguf: str | Path | None, rank0: bool) -> tuple[Path, Path, list[str]]:
    """(HF directory, NxD checkpoint, recipe overrides); rank 0 converts what is not there yet."""
    if tiny:
        hf_dir, ckpt = root / "tiny-llama-hf", root / f"tiny-llama-tp{TINY_TP}"
        if rank0 and not (ckpt / BASE_TAG / "done").exists():
            write_tiny_hf_model(hf_dir)
            convert_to_nxd(hf_dir, ckpt, TINY_TP, overwrite=True)
        return hf_dir, ckpt, [*TINY_OVERRIDES]
    from nxd_lora.assets import asset_path

    hf_dir, ckpt = real_model_dirs(root)
    if rank0:
        prepare_real_model(root, Path(gguf) if gguf else asset_path())
    return hf_dir, ckpt, [*REAL_OVERRIDES, f"data.train_files={json.dumps(demo_train_files())}"]


@contextmanager
def _one_process_group(launched: bool):
    """Under torchrun, one gloo group for the whole demo (the backends leave a group they did not
    create in place); spawned ranks make their own."""
    import torch.distributed as dist

    if not launched or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method="env://")
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_demo(output: str = "demo_output", tiny: bool = False, extra_overrides: list[str] = (),
             gguf: str | Path | None = None, quiet_bar: bool = False) -> dict:
    """Prepare the model, train on spawned ranks (or on this rank under torchrun), export, compare.
    Returns rank 0's training summary with the answers and the logit differences."""
    from checkpoint_tools.export import export_merged, export_peft

    root = Path(output).resolve()
    launched = "WORLD_SIZE" in os.environ
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tp = TINY_TP if tiny else REAL_TP
    started = time.perf_counter()
    if quiet_bar:
        os.environ["NXD_LORA_NO_BAR"] = "1"

    def on_every_rank(fn, *args):
        # The timeout only guards against a hung rank: training takes 6 minutes on 2 idle cores, twice that
        # on a busy machine, and must not be cut short there.
        return fn(*args) if launched else spawn_ranks(fn, tp, *args, timeout=3600.0)[0]

    final = root / "run" / "final"
    questions = [q for q in eval_questions() if q["kind"] == "general"][:3] if tiny else eval_questions()
    with _one_process_group(launched):  # torchrun's store takes one group per job: train and check share it
        hf_dir, ckpt, overrides = _prepare(root, tiny, gguf, rank0)
        if launched:
            torch.distributed.barrier()  # the other ranks wait for rank 0's conversion
        overrides = [f"model.checkpoint={ckpt}", f"model.tokenizer={hf_dir}", f"train.tp={tp}",
                     f"train.output_dir={root / 'run'}", *overrides, *extra_overrides]
        result = on_every_rank(_train_rank, None, overrides)
        probe = probe_ids(hf_dir, questions[0]["question"])
        ours = on_every_rank(trained_logits, str(ckpt), str(final / "adapter"), tp, probe)
    if not rank0:
        return result
    losses = result["losses"]
    print(f"[demo] train loss {losses[0]:.3f} -> {min(losses[-5:]):.3f} over {result['steps']} steps")
    export_peft(final / "adapter", root / "peft-adapter", base_model=str(hf_dir), overwrite=True)
    export_merged(final / "merged", root / "merged-hf", overwrite=True, tokenizer_dir=hf_dir)
    asked = [*questions, *([] if tiny else held_apart_questions())]
    compared = answers(hf_dir, root / "peft-adapter", [q["question"] for q in asked],
                       merged_dir=root / "merged-hf", probe=probe)
    scored = [dict(q, base=before, tuned=after, base_ok=contains(before, q["expect"]),
                   tuned_ok=contains(after, q["expect"])) for q, (before, after) in zip(asked, compared["pairs"])]
    print("[demo] base vs tuned, greedy (taught facts first, then general questions):")
    print(answer_table([(s["question"], s["expect"], s["base"], s["tuned"]) for s in scored[: len(questions)]]))
    print(scoreboard(scored))
    result.update(answers=scored, peft_vs_merged=compared["peft_vs_merged"],
                  tp_vs_peft=float((ours - compared["peft_logits"]).abs().max()),
                  recipe=load_recipe(None, overrides).to_dict(), seconds=time.perf_counter() - started)
    print(f"[demo] max |logit| difference, PEFT vs merged export: {result['peft_vs_merged']:.2e}")
    print(f"[demo] max |logit| difference, our TP={tp} model vs transformers+peft: {result['tp_vs_peft']:.2e}")
    print(f"[demo] done in {result['seconds']:.0f} s; outputs under {root}")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Rewrite the bundled replay.jsonl from the demo model's HF directory.")
    parser.add_argument("--write-replay", metavar="HF_DIR", required=True)
    model = Path(parser.parse_args().write_replay)
    print(f"{write_replay(model, sample_data_path('replay.jsonl'))} rows -> {sample_data_path('replay.jsonl')}")
