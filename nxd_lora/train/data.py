"""Training rows from recipe data settings, and the per-step batches each rank reads."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nxd_lora.data.batching import fit_to_length, pack, pad, real_token_fraction
from nxd_lora.data.encode import Encoded, encode_record
from nxd_lora.data.records import ReadReport, Record, read_records, sample_data_path, to_messages
from nxd_lora.tokenizer import Tokenizer
from nxd_lora.train.config import DataConfig


@dataclass
class Rows:
    train: list[dict[str, torch.Tensor]]
    val: list[dict[str, torch.Tensor]]
    report: dict
    val_examples: list[Encoded] = field(default_factory=list)  # unpacked, for generation metrics


def build_rows(data: DataConfig, tok: Tokenizer, seed: int) -> Rows:
    """Read, encode, fit, shuffle (seeded), split, then pack or pad to ``seq_len``."""
    files = data.train_files or [str(sample_data_path())]
    records, skipped = [], []
    for file in files:
        report = read_records(file, on_error=data.on_error) if Path(file).exists() else _hub_records(file, data)
        records += report.records
        skipped += report.skipped
    encoded = [encode_record(r, tok, data.template, data.train_on_prompt) for r in records]
    encoded, fit = fit_to_length(encoded, data.seq_len, data.on_long_prompt)
    random.Random(seed).shuffle(encoded)
    n_val = int(round(len(encoded) * data.val_fraction)) if len(encoded) > 1 else 0
    val, train = encoded[:n_val], encoded[n_val:]
    if not train:
        raise ValueError(f"no training examples left after the validation split (val_fraction={data.val_fraction})")
    build = pack if data.packing else pad
    rows = Rows(build(train, data.seq_len, tok.pad_id), build(val, data.seq_len, tok.pad_id), {}, val)
    rows.report = {"examples": len(encoded), "train_examples": len(train), "val_examples": len(val),
                   "train_rows": len(rows.train), "skipped_rows": len(skipped), "truncated": len(fit.truncated),
                   "dropped_long_prompts": len(fit.dropped), "real_token_fraction": round(real_token_fraction(rows.train), 4)}
    return rows


def _hub_records(dataset_id: str, data: DataConfig) -> ReadReport:
    """A Hugging Face ``datasets`` hub id (needs network access); rows go through the same schemas."""
    looks_like_id = dataset_id.count("/") == 1 and not dataset_id.startswith((".", "/", "~")) \
        and Path(dataset_id).suffix.lower() not in (".jsonl", ".json", ".csv")
    if not looks_like_id:
        raise FileNotFoundError(f"{dataset_id}: no such data file (and not an 'owner/name' datasets hub id)")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{dataset_id}: loading hub datasets needs the 'datasets' package") from None
    try:
        rows = datasets.load_dataset(dataset_id, split="train")
    except Exception as err:
        raise ValueError(f"{dataset_id}: cannot load from the datasets hub ({type(err).__name__}: {err}); "
                         "offline machines need a local JSONL/JSON/CSV file") from None
    report = ReadReport()
    for i, row in enumerate(rows):
        try:
            report.records.append(Record(to_messages(dict(row), f"{dataset_id}[{i}]"), f"{dataset_id}[{i}]"))
        except ValueError as err:
            if data.on_error == "fail":
                raise
            report.skipped.append(str(err))
    return report


class StepBatches(torch.utils.data.IterableDataset):
    """Yields, for each optimizer step from ``start_step``, this DP rank's ``rows_per_step`` rows.

    The order is a seeded shuffle per epoch, so a resumed run reads exactly the rows the
    uninterrupted run would have read at the same step.
    """

    def __init__(self, rows: list[dict[str, torch.Tensor]], rows_per_step: int, dp_size: int, dp_rank: int,
                 seed: int, start_step: int, max_steps: int):
        self.rows, self.per_step, self.dp_size, self.dp_rank = rows, rows_per_step, dp_size, dp_rank
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._cached = epoch, list(range(len(self.rows)))
            random.Random(self.seed * 1000 + epoch).shuffle(self._cached)
        return self._cached

    def __iter__(self):
        need = self.per_step * self.dp_size
        for step in range(self.start_step, self.max_steps):
            picked = []
            for k in range(need):
                flat = step * need + k
                epoch, index = divmod(flat, len(self.rows))
                picked.append(self.rows[self._order(epoch)[index]])
            mine = picked[self.dp_rank * self.per_step:(self.dp_rank + 1) * self.per_step]
            yield {key: torch.stack([r[key] for r in mine]) for key in mine[0]}
