"""The three tokenizer formats load through one interface with a pad id distinct from eos."""

from __future__ import annotations

import pytest

from nxd_lora.tiny import write_hf_tokenizer, write_sentencepiece, write_tiktoken_bytes
from nxd_lora.tokenizer import load_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Tensor parallel LoRA on Trainium.",
         "Answer: forty-two.", "What is the capital of France? Paris."] * 20


def test_tiktoken_llama3_specials(tmp_path):
    write_tiktoken_bytes(tmp_path / "original" / "tokenizer.model")
    tok = load_tokenizer(tmp_path)  # finds original/tokenizer.model
    assert tok.kind == "tiktoken" and tok.vocab_size == 256 + 256
    assert tok.bos_id == 256 and tok.eos_id == 257 and tok.pad_id == 260  # <|finetune_right_pad_id|>
    assert tok.specials["<|eot_id|>"] == 265 and tok.is_llama3_chat
    ids = tok.encode("héllo <|eot_id|>", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and 265 not in ids  # specials in text stay text
    assert tok.decode(ids[1:-1]) == "héllo <|eot_id|>"


@pytest.mark.smoke
def test_hf_tokenizer_json(tmp_path):
    write_hf_tokenizer(tmp_path, TEXTS)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "hf" and tok.pad_id != tok.eos_id
    assert tok.eos_id == tok.specials["<|end_of_text|>"] and tok.is_llama3_chat
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"


def test_sentencepiece_llama2(tmp_path):
    write_sentencepiece(tmp_path / "tokenizer.model", TEXTS)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id not in (tok.eos_id,) and not tok.is_llama3_chat
    assert tok.decode(tok.encode("The lazy dog")) == "The lazy dog"


def test_missing_and_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
