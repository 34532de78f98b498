"""The demo's bundled questions and replay prompts: retention is measured on questions no training
file holds, and answers are scored as whole words."""

from __future__ import annotations

import re

from nxd_lora.data.records import read_records, sample_data_path
from nxd_lora.demo import contains, eval_questions, held_apart_questions, sample_rows


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def test_held_apart_questions_are_in_no_training_file_and_no_replay_prompt():
    held = {_normal(q["question"]) for q in held_apart_questions()}
    assert len(held) >= 25 and all(q["expect"] for q in held_apart_questions())
    trained = {_normal(r.messages[0]["content"]) for name in ("facts.jsonl", "instructions.jsonl")
               for r in read_records(sample_data_path(name)).records}
    prompts = [_normal(row["prompt"]) for row in sample_rows("replay_prompts.jsonl")]
    replay = [_normal(r.messages[0]["content"]) for r in read_records(sample_data_path("replay.jsonl")).records]
    assert set(replay) <= set(prompts) and len(replay) >= 150, "replay.jsonl answers replay_prompts.jsonl"
    replayed = set(prompts)
    table = {_normal(q["question"]) for q in eval_questions()}
    assert not held & trained and not held & replayed and not held & table
    assert not replayed & table, "the demo's table must not ask what the replay trains"


def test_answers_are_scored_on_whole_words_and_any_alternative():
    assert contains("There are 7 days in a week.", "seven|7")
    assert contains("A week has seven days", "seven|7")
    assert not contains("There are 24 hours.", "4")
    assert not contains("The capital is Ottawa.", "Canberra")
    assert contains("Its symbol is Fe.", "Fe") and not contains("Ferrum", "Fe")
