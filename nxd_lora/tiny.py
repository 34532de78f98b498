"""Tiny tokenizers built on the spot (no downloads), in each format Llama ships, for the demo and tests."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from nxd_lora.tokenizer import LLAMA3_NAMED_SPECIALS


def write_tiktoken_bytes(path: str | Path) -> Path:
    """A Llama-3-format ``tokenizer.model``: the 256 single bytes as BPE ranks (a valid, merge-free BPE)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def write_hf_tokenizer(directory: str | Path, texts: list[str], vocab_size: int = 320) -> Path:
    """A byte-level BPE ``tokenizer.json`` + ``tokenizer_config.json`` with Llama 3's named specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_NAMED_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad_id|>"}))
    return directory / "tokenizer.json"


def write_sentencepiece(path: str | Path, texts: list[str], vocab_size: int = 400) -> Path:
    """A Llama-2-style SentencePiece BPE model (unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, byte_fallback=True,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path
