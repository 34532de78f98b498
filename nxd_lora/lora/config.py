"""LoRA settings, with the field names and defaults of NxD's ``modules.lora.LoraConfig``.

Two deliberate differences: ``target_modules`` defaults to the fused ``qkv_proj`` (NxD's
default, ``q_proj``/``v_proj``, does not exist in a fused NxD Llama) and unknown targets
are an error rather than a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SUPPORTED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass
class LoraConfig:
    lora_rank: int = 16
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["qkv_proj"])
    bias: Literal["none"] = "none"
    use_rslora: bool = False
    init_lora_weights: Literal["default", "gaussian"] = "default"
    lora_verbose: bool = False
    merge_lora: bool = False
    save_lora_base: bool = False

    def __post_init__(self) -> None:
        if self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be > 0, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(dict.fromkeys(self.target_modules))
        unknown = [t for t in self.target_modules if t not in SUPPORTED_TARGETS]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules {unknown or '[]'} not supported; choose from {list(SUPPORTED_TARGETS)}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} not supported: Llama has no biases, use 'none'")
        if self.init_lora_weights not in ("default", "gaussian"):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r}; expected 'default' or 'gaussian'")
        if self.merge_lora and not self.save_lora_base:
            raise ValueError("merge_lora=True needs save_lora_base=True (a merged save contains the base)")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (self.lora_rank**0.5 if self.use_rslora else self.lora_rank)
