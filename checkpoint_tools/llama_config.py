"""Llama model configuration read from a Hugging Face ``config.json``, with the TP rules.

Accepts both the classic fields (``rope_theta`` + ``rope_scaling``) written by transformers 4
and the hub, and ``rope_parameters`` written by transformers 5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from checkpoint_tools.atomic_io import read_json

SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> LlamaConfig:
        """Build from an HF config dict; ``source`` names the file in error messages."""
        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported (Llama checkpoints have no biases)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act is {act!r}, expected 'silu'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        n_heads = int(raw["num_attention_heads"])
        rope = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or None
        if scaling:
            rope.update(scaling)
        rope_theta = float(raw.get("rope_theta", rope.pop("rope_theta", 10000.0)))
        rope.pop("rope_theta", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{source}: rope_type {rope_type!r} not supported, expected one of {SUPPORTED_ROPE_TYPES}")
        known = set(cls.__dataclass_fields__) | {"rope_parameters", "model_type"}
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // n_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @property
    def initializer_range(self) -> float:
        """Std of the random init of weight matrices (Hugging Face's field; 0.02 when absent)."""
        return float(self.extra.get("initializer_range", 0.02))

    @classmethod
    def from_json(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json(path, "a Hugging Face config.json"), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as Hugging Face ``config.json`` fields (classic rope fields)."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        out.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        if self.rope_scaling is None:
            out.pop("rope_scaling")
        return out


def kv_size_multiplier_for(tp_size: int, num_key_value_heads: int) -> int:
    """NxD's KV replication factor: KV heads are repeated when there are more ranks than heads."""
    return max(1, tp_size // num_key_value_heads)


def check_tensor_parallel(config: LlamaConfig, tp_size: int, kv_size_multiplier: int | None = None) -> int:
    """Validate that ``config`` shards over ``tp_size`` ranks; return the kv_size_multiplier.

    The error names every number involved, since a wrong TP size is the most common
    mistake when moving a recipe between model sizes.
    """
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    kvm = kv_size_multiplier_for(tp_size, n_kv) if kv_size_multiplier is None else kv_size_multiplier
    problems = []
    if tp_size < 1:
        problems.append(f"tp={tp_size} must be >= 1")
    else:
        if n_heads % tp_size:
            problems.append(f"num_attention_heads={n_heads} is not divisible by tp={tp_size}")
        if (n_kv * kvm) % tp_size:
            problems.append(
                f"num_key_value_heads={n_kv} x kv_size_multiplier={kvm} = {n_kv * kvm} is not divisible by tp={tp_size}"
            )
        if n_heads % n_kv:
            problems.append(f"num_attention_heads={n_heads} is not divisible by num_key_value_heads={n_kv}")
        if kvm > 1 and n_kv * kvm != tp_size:
            problems.append(f"kv_size_multiplier={kvm} with num_key_value_heads={n_kv} must give exactly tp={tp_size} KV heads")
        for name, size in (("vocab_size", config.vocab_size), ("intermediate_size", config.intermediate_size)):
            if size % tp_size:
                problems.append(f"{name}={size} is not divisible by tp={tp_size}")
    if problems:
        raise ValueError("cannot shard this Llama over tensor parallelism: " + "; ".join(problems))
    return kvm
