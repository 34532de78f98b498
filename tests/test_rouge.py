"""ROUGE on generated answers: sentence splitting and scores that rise with training."""

from __future__ import annotations

import pytest

from nxd_lora.train.rouge import split_sentences


def test_regex_split_without_punkt_data():
    assert split_sentences("Paris is big. It is old! Is it? Yes") == ["Paris is big.", "It is old!", "Is it?", "Yes"]


@pytest.mark.smoke
def test_rouge_reported_after_training(tmp_path):
    pytest.importorskip("rouge_score")
    from checkpoint_tools.convert import convert_to_nxd
    from nxd_lora.demo import TINY_OVERRIDES, write_tiny_hf_model
    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    write_tiny_hf_model(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "tp1", 1, log=lambda m: None)
    import os

    os.environ["NXD_LORA_NO_BAR"] = "1"
    result = train(load_recipe(None, [
        f"model.checkpoint={tmp_path / 'tp1'}", f"model.tokenizer={tmp_path / 'hf'}", *TINY_OVERRIDES, "train.tp=1",
        "train.max_steps=5", "train.save_every=0", "train.save_modes=[adapter]", "train.loggers=[csv]",
        "train.rouge=true", "train.rouge_max_new_tokens=8", f"train.output_dir={tmp_path / 'run'}",
    ]))
    for key in ("val/rouge1", "val/rouge2", "val/rougeLsum", "val/loss"):
        assert 0.0 <= result["val"][key] <= (1.0 if "rouge" in key else 100.0), (key, result["val"])


class _Oracle:
    """Stands in for the model: its logits always pick the next token of a fixed answer."""

    def __init__(self, answer: list[int], prompt_length: int, vocab: int, eos: int):
        self.answer, self.prompt_length, self.vocab, self.eos, self.training = answer, prompt_length, vocab, eos, False

    def __call__(self, ids, gather_logits=False):
        import torch

        produced = ids.shape[1] - self.prompt_length
        token = self.answer[produced] if produced < len(self.answer) else self.eos
        logits = torch.zeros(1, ids.shape[1], self.vocab)
        logits[0, -1, token] = 1.0
        return logits, None

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def test_rouge_is_one_for_the_reference_and_zero_for_nothing(tmp_path):
    pytest.importorskip("rouge_score")
    from nxd_lora.data.encode import encode_record
    from nxd_lora.data.records import read_records, sample_data_path
    from nxd_lora.tiny import write_tiktoken_bytes
    from nxd_lora.tokenizer import load_tokenizer
    from nxd_lora.train.rouge import rouge_on_examples

    tok = load_tokenizer(write_tiktoken_bytes(tmp_path / "tokenizer.model"))
    ex = encode_record(read_records(sample_data_path()).records[0], tok)
    answer = ex.input_ids[ex.prompt_length:-1]  # without <|eot_id|>
    perfect = rouge_on_examples(_Oracle(answer, ex.prompt_length, tok.vocab_size, tok.eos_id), [ex], tok, "cpu", 200)
    assert perfect == {"val/rouge1": 1.0, "val/rouge2": 1.0, "val/rougeLsum": 1.0}
    silent = rouge_on_examples(_Oracle([], ex.prompt_length, tok.vocab_size, tok.eos_id), [ex], tok, "cpu", 200)
    assert silent == {"val/rouge1": 0.0, "val/rouge2": 0.0, "val/rougeLsum": 0.0}
