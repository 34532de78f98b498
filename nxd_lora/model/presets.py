"""Architectures of the public Llama checkpoints the recipes name, as Hugging Face config fields.

Used where the weights are not at hand yet: ``nxd-lora plan`` sizes a job before the
checkpoint is converted, and benchmarks build random models of these shapes. Training
itself always reads the config from the converted checkpoint's manifest.
"""

from __future__ import annotations

from typing import Any

from checkpoint_tools.llama_config import LlamaConfig

_LLAMA3_VOCAB = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000)
_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)

PRESETS: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(_LLAMA3_VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                        max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE, eos_token_id=128001),
    "llama3.2-3b": dict(_LLAMA3_VOCAB, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                        max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE, eos_token_id=128001),
    "llama3-8b": dict(_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                      max_position_embeddings=8192, eos_token_id=128001),
    "llama3.1-8b": dict(_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                        max_position_embeddings=131072, rope_scaling=_LLAMA31_ROPE, eos_token_id=128001),
    "llama3.1-70b": dict(_LLAMA3_VOCAB, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_scaling=_LLAMA31_ROPE, eos_token_id=128001),
}


def preset_config(name: str) -> LlamaConfig:
    """The named architecture; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model architecture {name!r}; known: {sorted(PRESETS)} (or give a config.json path)")
    return LlamaConfig.from_dict(PRESETS[name], source=f"preset {name}")
