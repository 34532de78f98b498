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
    """One row: the pieces one after another, then padding (its own document 0)."""
    row = {"input_ids": torch.full((seq_len,), pad_id), "labels": torch.full((seq_len,), IGNORE_INDEX),
           "position_ids": torch.empty(seq_len, dtype=torch.long), "document_ids": torch.zeros(seq_len, dtype=torch.long)}
    start = 0
    for doc, ex in enumerate(pieces, start=1):
        end = start + len(ex.input_ids)
        row["input_ids"][start:end] = torch.tensor(ex.input_ids)
        row["labels"][start:end] = torch.tensor(ex.labels)
        row["position_ids"][start:end] = torch.arange(end - start)  # positions restart in each document
        row["document_ids"][start:end] = doc
        start = end
    row["position_ids"][start:] = torch.arange(seq_len - start)
    return row


def pack(examples: list[Encoded], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Greedy first-fit packing in the given order (examples must already fit ``seq_len``): each
    example goes to the first row with room for it.

    The rows' free space sits in a max segment tree (unopened rows are empty, so "no open row
    fits" finds the next new one), which keeps packing O(n log n): a plain scan over the open
    rows takes a minute on 15k examples.
    """
    size = 1
    while size < max(len(examples), 1):
        size *= 2
    free = [seq_len] * (2 * size)  # free[size + i]: room left in row i; inner nodes: max of children
    rows: list[list[Encoded]] = []
    for ex in examples:
        length = len(ex.input_ids)
        node = 1
        while node < size:  # leftmost leaf with room: descend left whenever the left subtree has it
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(ex)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return [_row(r, seq_len, pad_id) for r in rows]


def pad(examples: list[Encoded], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [_row([ex], seq_len, pad_id) for ex in examples]


def real_token_fraction(rows: list[dict[str, torch.Tensor]]) -> float:
    """Share of positions holding real tokens (the packing-efficiency metric)."""
    total = sum(r["document_ids"].numel() for r in rows)
    return sum(int((r["document_ids"] > 0).sum()) for r in rows) / max(total, 1)
