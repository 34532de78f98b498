"""Training recipes: YAML files with ``section.key=value`` overrides, checked against the schema.

Unknown sections or keys fail listing the valid ones, so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
import typing
from typing import Any

import yaml

from nxd_lora.lora.config import LoraConfig
from nxd_lora.model.llama import CHECKPOINTING_MODES


@dataclass
class ModelConfig:
    checkpoint: str = ""          # a converted NxD base checkpoint (nxd-lora convert)
    tokenizer: str = ""           # tokenizer.json / tokenizer.model file or directory
    dtype: str = "float32"        # float32 or bfloat16 base weights
    architecture: str = ""        # preset (llama3-8b...) or config.json: sizes `nxd-lora plan` before
                                  # conversion; train checks the checkpoint has this architecture
    kv_layout: str = ""           # trn1 | trn2: the NxD layout model.checkpoint must have ("": the
                                  # checkpoint's; on Trainium it must be the platform's either way)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)   # empty: the bundled sample set
    template: str = "auto"        # auto | llama3 | alpaca
    seq_len: int = 256
    packing: bool = True
    val_fraction: float = 0.1
    train_on_prompt: bool = False
    on_error: str = "fail"        # malformed rows: fail | skip
    on_long_prompt: str = "fail"  # prompts longer than seq_len: fail | skip


@dataclass
class TrainConfig:
    backend: str = "cpu"
    tp: int = 1
    dp: int = 0                   # data-parallel replicas; 0: world size // tp (else checked against it)
    max_steps: int = 100
    micro_batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"      # cosine | linear | constant
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0        # 0 disables clipping
    seed: int = 0
    log_every: int = 1
    val_every: int = 0            # 0: validate at the end only
    save_every: int = 0           # 0: no periodic checkpoints
    output_dir: str = "runs/train"
    resume: str = "none"          # none | auto | <tag directory>
    save_modes: list[str] = field(default_factory=lambda: ["adapter"])
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    rouge: bool = False           # ROUGE of greedy answers on validation prompts (needs rouge-score)
    rouge_max_new_tokens: int = 32
    activation_checkpointing: str = "none"  # none | mlp | full (recompute in backward to save memory)
    autocast: str = "auto"        # auto (the backend's: bfloat16 on torchneuron, else none) | none | bfloat16
    compile: bool = False         # torch.compile the training forward (backend's compiler: "neuron" on
                                  # torchneuron, inductor on cpu/cuda; XLA backends compile graphs anyway)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def build_recipe(raw: dict[str, Any], source: str = "config") -> Recipe:
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown sections {unknown}; valid sections: {sorted(_SECTIONS)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section '{name}' must be a mapping")
        valid = [f.name for f in fields(cls)]
        bad = sorted(set(values) - set(valid))
        if bad:
            raise ValueError(f"{source}: unknown keys {[f'{name}.{k}' for k in bad]}; valid keys in '{name}': {valid}")
        hints = typing.get_type_hints(cls)
        sections[name] = cls(**{k: _coerce(v, hints[k], f"{source}: {name}.{k}") for k, v in values.items()})
    return Recipe(**sections)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a value against its field type; accept ints for floats and numeric strings ("1e-4")."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return value
    if origin is not None:  # Literal and other constrained hints: checked by the dataclass itself
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")


def _expand_home(recipe: Recipe) -> None:
    """``~/...`` in the path fields means the home directory, as in a shell."""
    for section, name in (("model", "checkpoint"), ("model", "tokenizer"), ("model", "architecture"),
                          ("train", "output_dir"), ("train", "resume")):
        obj = getattr(recipe, section)
        setattr(obj, name, os.path.expanduser(getattr(obj, name)))
    recipe.data.train_files = [os.path.expanduser(f) for f in recipe.data.train_files]


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from the defaults) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "defaults"
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recipe file")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r} must look like section.key=value")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"override {item!r}: section '{section}' is not a mapping")
        raw[section][name] = _parse_value(value)
    recipe = build_recipe(raw, source)
    _expand_home(recipe)
    train = recipe.train
    for key, allowed in (("schedule", ("cosine", "linear", "constant")),
                         ("activation_checkpointing", CHECKPOINTING_MODES)):
        if getattr(train, key) not in allowed:
            raise ValueError(f"{source}: train.{key}={getattr(train, key)!r}; expected one of {list(allowed)}")
    return recipe
