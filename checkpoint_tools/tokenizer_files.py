"""Tokenizer and generation-config files that travel with converted and exported checkpoints.

A converted checkpoint carries its tokenizer, so ``train`` finds it beside the weights and an
export is a complete model directory. HF and Meta sources have the files already (copied); a
GGUF file holds its tokenizer as metadata, which ``transformers`` turns into a fast tokenizer
(``tokenizer.json`` + ``tokenizer_config.json`` with the chat template inline, as every
transformers version and vLLM read it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from checkpoint_tools.atomic_io import write_json
from checkpoint_tools.llama_config import LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` (or its ``original/``) into ``dest``."""
    copied = []
    for name in TOKENIZER_FILES:
        for candidate in (source / name, source / "original" / name):
            if candidate.is_file():
                shutil.copy2(candidate, dest / name)
                copied.append(name)
                break
    return copied


def has_tokenizer(directory: Path) -> bool:
    return any((directory / sub / name).is_file() for sub in ("", "original")
               for name in ("tokenizer.json", "tokenizer.model"))


def write_gguf_tokenizer(gguf_path: Path, dest: Path) -> list[str]:
    """``tokenizer.json`` + ``tokenizer_config.json`` (chat template inline) built by transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"{gguf_path}: building its tokenizer files needs 'transformers' (pip install transformers)"
                         ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:
        raise ValueError(f"{gguf_path}: transformers cannot build a tokenizer from its metadata "
                         f"({type(err).__name__}: {err})") from None
    with tempfile.TemporaryDirectory(prefix="nxd_lora_tok_") as tmp:
        tok.save_pretrained(tmp, save_jinja_files=False)
        config_path = Path(tmp) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        # The class every transformers version resolves (5.x writes its own backend's name).
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("is_local", None)
        write_json(config_path, config)
        return copy_tokenizer_files(Path(tmp), dest)


def write_generation_config(dest: Path, config: LlamaConfig) -> None:
    """``generation_config.json`` with the model's special token ids (eos stops generation)."""
    fields = {k: config.extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
              if config.extra.get(k) is not None}
    write_json(dest / "generation_config.json", {"_from_model_config": True, **fields})


def write_tokenizer_files(source, dest: Path) -> list[str]:
    """The tokenizer files of a checkpoint ``source`` (see ``checkpoint_tools.sources``) into ``dest``,
    plus a generation config when the source has none."""
    if source.format == "gguf":  # a GGUF file without tokenizer metadata has nothing to write
        written = write_gguf_tokenizer(source.path, dest) if "tokenizer.ggml.model" in source.metadata else []
    else:
        directory = source.path.parent if source.path.name == "original" else source.path
        written = copy_tokenizer_files(directory, dest)
    if "generation_config.json" not in written:
        write_generation_config(dest, source.config)
        written.append("generation_config.json")
    return written
