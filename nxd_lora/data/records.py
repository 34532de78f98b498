"""Read instruction records from JSONL, JSON or CSV files, and map each schema to chat messages.

Schemas: dolly (instruction / context / response), alpaca (instruction / input / output) and
chat (``messages``: role + content). Every error names the file and the line (JSONL, CSV) or
item (JSON) it comes from; ``on_error="skip"`` drops malformed rows instead and counts them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEMAS = {
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
}
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    messages: list[dict[str, str]]
    source: str  # "file:line" for error messages


@dataclass
class ReadReport:
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def to_messages(row: dict, where: str) -> list[dict[str, str]]:
    """Messages of one row, whatever its schema; the last message is the assistant's answer."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] needs role in {list(ROLES)} and string content")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    for name, (instruction, context, answer) in (("dolly", SCHEMAS["dolly"]), ("alpaca", SCHEMAS["alpaca"])):
        if instruction in row and answer in row:
            text, extra, reply = row[instruction], row.get(context) or "", row[answer]
            if not all(isinstance(v, str) for v in (text, extra, reply)) or not text.strip() or not reply.strip():
                raise ValueError(f"{where}: {name} row needs non-empty string '{instruction}' and '{answer}'")
            user = f"{text}\n\n{extra}" if extra.strip() else text
            return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    raise ValueError(f"{where}: unknown schema (keys {sorted(row)}); expected one of "
                     + "; ".join(f"{k}: {list(v)}" for k, v in SCHEMAS.items()))


def _rows(path: Path):
    """(where, row or parse error) for every row of the file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        yield f"{path}:{number}", ValueError(f"{path}:{number}: invalid JSON ({err.msg})")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        items = data.get("data") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a list of records (or {{'data': [...]}})")
        for i, item in enumerate(items):
            yield f"{path}[{i}]", item
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), 2):
                yield f"{path}:{number}", row
    else:
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; expected .jsonl, .json or .csv")


def read_records(path: str | Path, on_error: str = "fail") -> ReadReport:
    """All records of one file. ``on_error``: "fail" (raise at the first bad row) or "skip"."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r}; expected 'fail' or 'skip'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    report = ReadReport()
    for where, row in _rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            report.records.append(Record(to_messages(row, where), where))
        except ValueError as err:
            if on_error == "fail":
                raise
            report.skipped.append(str(err))
    if not report.records:
        raise ValueError(f"{path}: no usable records" + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))
    return report


def sample_data_path(name: str = "instructions.jsonl") -> Path:
    """A data file shipped with the package (written for this project): ``instructions.jsonl``
    (general instructions, dolly schema), ``facts.jsonl`` (made-up facts no pretrained model
    knows, for the demo), ``replay.jsonl`` (the demo model's own answers to ``replay_prompts.jsonl``,
    chat schema), ``eval_questions.jsonl`` (the demo's table: facts as trained and rephrased, a
    few general questions) and ``general_questions.jsonl`` (general questions in no training file,
    for retention)."""
    return Path(__file__).with_name("sample") / name
