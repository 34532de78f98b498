"""A model built from a config (no checkpoint) is initialised as Hugging Face's Llama is."""

from __future__ import annotations

import math

import pytest
import torch

from checkpoint_tools.llama_config import LlamaConfig
from nxd_lora.backends import get_backend
from nxd_lora.model.builder import build_model

CONFIG = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True)


@pytest.mark.parametrize("initializer_range", [None, 0.05])
@pytest.mark.smoke
def test_weights_are_normal_with_the_configs_std_and_norms_one(initializer_range):
    raw = dict(CONFIG) if initializer_range is None else dict(CONFIG, initializer_range=initializer_range)
    config = LlamaConfig.from_dict(raw)
    backend = get_backend("cpu")
    backend.setup(1)
    try:
        model = build_model(config, backend)
    finally:
        backend.teardown()
    std = 0.02 if initializer_range is None else initializer_range
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert abs(param.mean().item()) < 0.1 * std and abs(param.std().item() / std - 1) < 0.05, name
    # So a random model starts where training curves start: near ln(vocab), not hundreds
    # (the old std-1 embedding, tied to lm_head, gave a first loss of ~446 on SmolLM2's shape).
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, loss = model(ids, labels=ids, return_logits=False)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.5
