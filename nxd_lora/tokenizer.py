"""One small tokenizer interface over the three formats Llama checkpoints ship.

* HF ``tokenizer.json`` (``tokenizers`` library), with ``tokenizer_config.json`` for specials;
* SentencePiece ``tokenizer.model`` (Llama 2);
* tiktoken BPE ranks ``original/tokenizer.model`` (Llama 3), with Llama 3's 256 special tokens.

The pad id is always distinct from eos, so padding can never be mistaken for an end of text:
Llama 3 pads with ``<|finetune_right_pad_id|>``; formats without a pad token use unk (or id 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_NUM_SPECIALS = 256


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Llama 3's special tokens and ids, which follow the base BPE vocabulary."""
    names = LLAMA3_NAMED_SPECIALS + [
        f"<|reserved_special_token_{i}|>" for i in range(2, LLAMA3_NUM_SPECIALS - len(LLAMA3_NAMED_SPECIALS) + 2)
    ]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


@dataclass
class Tokenizer:
    """Text <-> ids plus the ids training needs. ``specials`` maps special-token text to ids."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    specials: dict[str, int]
    _encode: Callable[[str], list[int]]
    _decode: Callable[[list[int]], str]
    _encode_with_specials: Callable[[str], list[int]] | None = None
    chat_template: str | None = None  # jinja, from tokenizer_config.json or chat_template.jinja
    stop_ids: tuple[int, ...] = ()    # generation ends at any of these: eos + generation_config.json's eos ids

    def encode(self, text: str, bos: bool = False, eos: bool = False, specials_in_text: bool = False) -> list[int]:
        """``specials_in_text``: special-token strings in ``text`` become their ids (rendered templates)."""
        ids = (self._encode_with_specials or self._encode)(text) if specials_in_text else self._encode(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self._decode([i for i in ids if i != self.pad_id])

    @property
    def is_llama3_chat(self) -> bool:
        return "<|start_header_id|>" in self.specials and "<|eot_id|>" in self.specials


def _tiktoken(path: Path) -> Tokenizer:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as err:
        raise ValueError(f"{path}: not a tiktoken BPE file ({type(err).__name__}: {err})") from None
    specials = llama3_special_tokens(len(ranks))
    encoding = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=specials)
    return Tokenizer(
        "tiktoken", len(ranks) + len(specials), specials["<|begin_of_text|>"], specials["<|end_of_text|>"],
        specials["<|finetune_right_pad_id|>"], specials,
        lambda text: encoding.encode(text, disallowed_special=()), lambda ids: encoding.decode(ids),
        lambda text: encoding.encode(text, allowed_special="all"),
    )


def _sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor()
    try:
        model.Load(str(path))
    except Exception as err:
        raise ValueError(f"{path}: not a SentencePiece model ({type(err).__name__}: {err})") from None
    eos = model.eos_id()
    pad = model.pad_id() if model.pad_id() >= 0 else model.unk_id()
    if pad < 0 or pad == eos:
        pad = 0 if eos != 0 else 1
    bos = model.bos_id() if model.bos_id() >= 0 else None
    return Tokenizer("sentencepiece", model.GetPieceSize(), bos, eos, pad, {}, model.EncodeAsIds, model.DecodeIds)


def _hf_tokenizers(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path))
    config_path = path.with_name("tokenizer_config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def token_text(value) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    named = {k: token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    ids = {k: tok.token_to_id(v) if v else None for k, v in named.items()}
    if ids["eos_token"] is None:
        for candidate in ("<|end_of_text|>", "</s>", "<|endoftext|>"):
            if tok.token_to_id(candidate) is not None:
                ids["eos_token"] = tok.token_to_id(candidate)
                break
    if ids["eos_token"] is None:
        raise ValueError(f"{path}: cannot tell the eos token (no eos_token in {config_path.name})")
    pad = ids["pad_token"]
    if pad is None or pad == ids["eos_token"]:
        pad = tok.token_to_id("<|finetune_right_pad_id|>")
    if pad is None or pad == ids["eos_token"]:
        pad = ids["unk_token"] if ids["unk_token"] not in (None, ids["eos_token"]) else 0
    if ids["bos_token"] is None:
        ids["bos_token"] = tok.token_to_id("<|begin_of_text|>") or tok.token_to_id("<s>")
    template = config.get("chat_template")
    jinja = path.with_name("chat_template.jinja")  # where transformers >= 4.50 saves a single template
    if not isinstance(template, str) and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return Tokenizer(
        "hf", tok.get_vocab_size(with_added_tokens=True), ids["bos_token"], ids["eos_token"], pad, specials,
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda token_ids: tok.decode(token_ids, skip_special_tokens=False),
        chat_template=template if isinstance(template, str) else None,
    )


def _generation_eos_ids(model_dir: Path) -> list[int]:
    """``eos_token_id`` of the model's generation_config.json (an id or a list), if there is one."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) for v in values if v is not None):
        raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {value!r}")
    return [v for v in values if v is not None]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a file or a model directory (``tokenizer.json``, then ``tokenizer.model``,
    then ``original/tokenizer.model``); a ``tokenizer.model`` may be SentencePiece or tiktoken."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model", path / "original" / "tokenizer.model"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or original/tokenizer.model")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        tok = _hf_tokenizers(path)
    else:
        head = path.read_bytes()[:256]
        # tiktoken files are text lines "<base64> <rank>"; SentencePiece models are protobuf binaries.
        is_tiktoken = all(32 <= b < 127 or b in (10, 13) for b in head) and b" " in head
        tok = _tiktoken(path) if is_tiktoken else _sentencepiece(path)
    model_dir = path.parent.parent if path.parent.name == "original" else path.parent
    tok.stop_ids = tuple(dict.fromkeys([tok.eos_id, *_generation_eos_ids(model_dir)]))
    if tok.is_llama3_chat:
        tok.stop_ids = tuple(dict.fromkeys([*tok.stop_ids, tok.specials["<|eot_id|>"]]))
    return tok
