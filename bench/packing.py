"""Benchmark: share of real (non-padding) tokens per batch with packing vs padding.

Two length distributions:

* ``bundled``: the bundled instruction set (``nxd_lora/data/sample``), encoded with the Llama 3
  chat template by the demo's byte-level tiktoken tokenizer (about 4x the token counts of the real
  Llama 3 tokenizer on the same text);
* ``dolly-like``: 15,000 synthetic examples whose token lengths are log-normal (median 160 tokens,
  sigma 0.9: a long tail like databricks-dolly-15k's; not measured on dolly itself), seed 0.

For each sequence length: ``packed`` (our greedy packing), ``padded`` (one example per row padded
to ``seq_len``, the fixed-shape alternative on XLA), and ``dynamic`` (one example per row padded to
the longest in its micro-batch of 8, what a GPU collator does; on XLA every new length is a new graph).

    python bench/packing.py
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nxd_lora.data.batching import fit_to_length, pack, pad, real_token_fraction  # noqa: E402
from nxd_lora.data.encode import Encoded, encode_record  # noqa: E402
from nxd_lora.data.records import read_records, sample_data_path  # noqa: E402
from nxd_lora.tiny import write_tiktoken_bytes  # noqa: E402
from nxd_lora.tokenizer import load_tokenizer  # noqa: E402


def bundled_examples() -> list[Encoded]:
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(write_tiktoken_bytes(Path(tmp) / "tokenizer.model"))
        return [encode_record(r, tok, "llama3", False) for r in read_records(sample_data_path()).records]


def dolly_like_examples(n: int = 15000, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = max(8, int(rng.lognormvariate(5.075, 0.9)))  # exp(5.075) = 160
        prompt = max(1, length // 3)
        out.append(Encoded([1] * length, [-100] * prompt + [1] * (length - prompt), prompt, f"synthetic[{i}]"))
    return out


def dynamic_padding_fraction(examples: list[Encoded], micro_batch: int = 8) -> float:
    real = total = 0
    for start in range(0, len(examples), micro_batch):
        lengths = [len(e.input_ids) for e in examples[start:start + micro_batch]]
        real, total = real + sum(lengths), total + max(lengths) * len(lengths)
    return real / total


def main() -> None:
    for name, examples in (("bundled", bundled_examples()), ("dolly-like", dolly_like_examples())):
        lengths = sorted(len(e.input_ids) for e in examples)
        for seq_len in (512, 2048, 4096):
            fitted, fit = fit_to_length(examples, seq_len, on_long_prompt="skip")
            row = {"data": name, "examples": len(fitted), "median_tokens": lengths[len(lengths) // 2],
                   "p95_tokens": lengths[int(0.95 * len(lengths))], "seq_len": seq_len,
                   "truncated": len(fit.truncated), "dropped": len(fit.dropped)}
            packed = pack(fitted, seq_len, 0)
            row.update(packed=round(real_token_fraction(packed), 4), packed_rows=len(packed),
                       padded=round(real_token_fraction(pad(fitted, seq_len, 0)), 4), padded_rows=len(fitted),
                       dynamic=round(dynamic_padding_fraction(fitted), 4))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
