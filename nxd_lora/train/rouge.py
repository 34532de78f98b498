"""Optional ROUGE of greedy answers on validation prompts (``train.rouge: true``).

ROUGE-Lsum compares summaries sentence by sentence; sentences are split with nltk's punkt
when its data is installed, else with a regular expression (no download is attempted).
"""

from __future__ import annotations

import re

import torch

from nxd_lora.data.encode import Encoded
from nxd_lora.tokenizer import Tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
        return nltk.sent_tokenize(text)
    except (ImportError, LookupError):
        return [s for s in _SENTENCE_END.split(text.strip()) if s]


@torch.no_grad()
def greedy_answer(model, prompt: list[int], stop_ids: set[int], max_new_tokens: int, device) -> list[int]:
    """Greedy decoding with the TP model (full logits gathered, so every rank picks the same token)."""
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(ids, gather_logits=True)
        token = int(logits[0, -1].argmax())
        if token in stop_ids:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return out


def rouge_on_examples(model, examples: list[Encoded], tok: Tokenizer, device, max_new_tokens: int = 32,
                      limit: int = 16) -> dict[str, float]:
    """Mean ROUGE-1/2/Lsum F1 of greedy answers against the references of ``examples``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
    stops = {*tok.stop_ids, *(tok.specials[t] for t in ("<|end_of_text|>",) if t in tok.specials)}
    was_training = model.training
    model.eval()
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    chosen = examples[:limit]
    for ex in chosen:
        answer = tok.decode(greedy_answer(model, ex.input_ids[: ex.prompt_length], stops, max_new_tokens, device))
        reference = tok.decode([t for t in ex.input_ids[ex.prompt_length:] if t not in stops])
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(answer)))
        for key in totals:
            totals[key] += scores[key].fmeasure
    model.train(was_training)
    return {f"val/{k}": v / max(len(chosen), 1) for k, v in totals.items()}
