"""The embedded demo (the README's main job): everything built locally, nothing downloaded.

1. a tiny random Llama 3-style model and a Llama-3-format (tiktoken) tokenizer, in HF layout;
2. ``nxd-lora convert`` to a TP=2 NxD checkpoint;
3. ``nxd-lora train`` with Lightning on 2 gloo ranks: LoRA on the bundled instruction set;
4. the three save modes, a PEFT export and a merged export;
5. the adapter loaded with ``peft`` on ``transformers``: base vs tuned answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint_tools.convert import convert_to_nxd
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.tp_layout import expected_hf_shapes
from nxd_lora.data.records import read_records, sample_data_path
from nxd_lora.local_launch import spawn_ranks
from nxd_lora.tiny import write_tiktoken_bytes
from nxd_lora.train.config import load_recipe

DEMO_CONFIG = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=1024,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256},
    bos_token_id=256, eos_token_id=257, tie_word_embeddings=False,
)
DEMO_OVERRIDES = [
    "lora.lora_rank=32", "lora.lora_alpha=64", "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
    "data.seq_len=512", "data.val_fraction=0.1", "train.max_steps=200", "train.lr=0.01", "train.warmup_steps=10",
    "train.micro_batch_size=2", "train.grad_accum=1", "train.save_every=100", "train.log_every=1",
    "train.save_modes=[adapter,base+adapter,merged]",
]


def random_hf_state(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random HF-layout Llama state dict (norms at 1, weights N(0, 0.05))."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.05
        for key, shape in expected_hf_shapes(config).items()
    }


def write_tiny_hf_model(directory: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + original/tokenizer.model (Llama 3 format)."""
    config = LlamaConfig.from_dict(DEMO_CONFIG)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(random_hf_state(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(dict(config.to_hf_dict(), torch_dtype="float32"), indent=2))
    write_tiktoken_bytes(directory / "original" / "tokenizer.model")
    return directory


def _train_rank(config_path: str | None, overrides: list[str]) -> dict:
    from nxd_lora.train.run import train

    return train(load_recipe(config_path, overrides))


def answers(model_dir: Path, adapter_dir: Path, questions: list[str], max_new_tokens: int = 24) -> list[tuple[str, str]]:
    """(base, tuned) greedy answers, the tuned model being peft.PeftModel over transformers."""
    import peft
    import transformers

    from nxd_lora.data.encode import encode_record
    from nxd_lora.data.records import Record
    from nxd_lora.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    tuned = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    eot = tok.specials["<|eot_id|>"]
    out = []
    for question in questions:
        record = Record([{"role": "user", "content": question}, {"role": "assistant", "content": "x"}], "demo")
        prompt = encode_record(record, tok).input_ids
        prompt = prompt[: len(prompt) - len(tok.encode("x")) - 1]
        pair = []
        for model in (base, tuned):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                for _ in range(max_new_tokens):
                    nxt = model(input_ids=ids).logits[0, -1].argmax()
                    if int(nxt) == eot:
                        break
                    ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            pair.append(tok.decode(ids[0, len(prompt):].tolist()))
        out.append((pair[0], pair[1]))
    return out


def run_demo(output: str = "demo_output", tp: int = 2, extra_overrides: list[str] = (), quiet_bar: bool = False) -> dict:
    """Build, convert, train on ``tp`` spawned ranks (or this rank under torchrun), export, compare."""
    from checkpoint_tools.export import export_merged, export_peft

    root = Path(output).resolve()
    launched = "WORLD_SIZE" in os.environ
    rank0 = int(os.environ.get("RANK", "0")) == 0
    hf_dir, ckpt = root / "tiny-llama-hf", root / f"tiny-llama-tp{tp}"
    if rank0 and not (ckpt / "pretrained_weight" / "done").exists():
        write_tiny_hf_model(hf_dir)
        convert_to_nxd(hf_dir, ckpt, tp, overwrite=True)
    overrides = [f"model.checkpoint={ckpt}", f"model.tokenizer={hf_dir}", f"train.tp={tp}",
                 f"train.output_dir={root / 'run'}", *DEMO_OVERRIDES, *extra_overrides]
    if quiet_bar:
        os.environ["NXD_LORA_NO_BAR"] = "1"
    if launched:
        result = _train_rank(None, overrides)
    else:
        result = spawn_ranks(_train_rank, tp, None, overrides)[0]
    if not rank0:
        return result
    losses = result["losses"]
    print(f"[demo] train loss {losses[0]:.3f} -> {min(losses[-5:]):.3f} over {result['steps']} steps; "
          f"validation {result['val']}")
    export_peft(root / "run" / "final" / "adapter", root / "peft-adapter", base_model=str(hf_dir), overwrite=True)
    export_merged(root / "run" / "final" / "merged", root / "merged-hf", overwrite=True, tokenizer_dir=hf_dir)
    records = read_records(sample_data_path()).records
    questions = [r.messages[0]["content"] for r in records[7:10]]
    expected = [r.messages[-1]["content"] for r in records[7:10]]
    result["answers"] = answers(hf_dir, root / "peft-adapter", questions)
    for question, want, (before, after) in zip(questions, expected, result["answers"]):
        print(f"[demo] Q: {question}\n       reference: {want}\n       base:      {before!r}\n       tuned:     {after!r}")
    return result
