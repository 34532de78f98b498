"""Fixed-length rows for training: packing several examples per row, or one padded example per row.

Fixed shapes keep the XLA graph count at one. Packed rows carry ``position_ids`` that restart
at each example and ``document_ids`` from which the model builds a block-diagonal causal
mask, so packed examples never attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nxd_lora.data.encode import IGNORE_INDEX, Encoded


@dataclass
class FitReport:
    truncated: list[str]
    dropped: list[str]


def fit_to_length(examples: list[Encoded], seq_len: int, on_long_prompt: str = "fail") -> tuple[list[Encoded], FitReport]:
    """Truncate answers that run past ``seq_len``; a prompt that alone fills it fails or is dropped."""
    report, kept = FitReport([], []), []
    for ex in examples:
        if ex.prompt_length >= seq_len:
            message = f"{ex.source}: prompt is {ex.prompt_length} tokens, seq_len is {seq_len}: no room for the answer"
            if on_long_prompt == "fail":
                raise ValueError(message + " (raise seq_len, or skip such rows)")
            report.dropped.append(message)
            continue
        if len(ex.input_ids) > seq_len:
            report.truncated.append(ex.source)
            ex = Encoded(ex.input_ids[:seq_len], ex.labels[:seq_len], ex.prompt_length, ex.source)
        kept.append(ex)
    return kept, report


def _row(pieces: list[Encoded], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids, labels, positions, docs = [], [], [], []
    for doc, ex in enumerate(pieces, start=1):
        ids += ex.input_ids
        labels += ex.labels
        positions += list(range(len(ex.input_ids)))
        docs += [doc] * len(ex.input_ids)
    pad = seq_len - len(ids)
    return {
        "input_ids": torch.tensor(ids + [pad_id] * pad),
        "labels": torch.tensor(labels + [IGNORE_INDEX] * pad),
        "position_ids": torch.tensor(positions + list(range(pad))),
        "document_ids": torch.tensor(docs + [0] * pad),  # 0: padding, its own block
    }


def pack(examples: list[Encoded], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Greedy first-fit packing in the given order (examples must already fit ``seq_len``)."""
    rows: list[list[Encoded]] = []
    used: list[int] = []
    for ex in examples:
        for i, length in enumerate(used):
            if length + len(ex.input_ids) <= seq_len:
                rows[i].append(ex)
                used[i] += len(ex.input_ids)
                break
        else:
            rows.append([ex])
            used.append(len(ex.input_ids))
    return [_row(r, seq_len, pad_id) for r in rows]


def pad(examples: list[Encoded], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [_row([ex], seq_len, pad_id) for ex in examples]


def real_token_fraction(rows: list[dict[str, torch.Tensor]]) -> float:
    """Share of positions holding real tokens (the packing-efficiency metric)."""
    total = sum(r["document_ids"].numel() for r in rows)
    return sum(int((r["document_ids"] > 0).sum()) for r in rows) / max(total, 1)
