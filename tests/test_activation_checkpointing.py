"""Activation checkpointing modes: same loss and gradients as without, and exactly the recomputation
each mode promises (counted with torch's FLOP counter)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from checkpoint_tools.llama_config import LlamaConfig
from conftest import LLAMA3_TINY
from nxd_lora.lora.config import LoraConfig
from nxd_lora.lora.model import lora_parameters
from nxd_lora.model.builder import build_model

# torch.utils.checkpoint's non-reentrant early stop and the FLOP counter's counts are PyTorch's internals.
pytestmark = pytest.mark.torch_version

CONFIG = dict(LLAMA3_TINY, hidden_size=64, intermediate_size=160, num_hidden_layers=2)
SEQ = 24


def _step(model, ids, mode):
    """Loss, LoRA grads and FLOPs of one forward + backward under ``mode``."""
    model.set_activation_checkpointing(mode)
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as flops:
        _, loss = model(ids, labels=ids, return_logits=False)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)], flops.get_total_flops()


@pytest.mark.parametrize("targets", [["qkv_proj"], ["qkv_proj", "down_proj"]])
def test_modes_give_the_same_gradients_and_recompute_only_what_they_say(cpu_backend, targets):
    config = LlamaConfig.from_dict(CONFIG)
    model = build_model(config, cpu_backend, None, LoraConfig(lora_rank=4, target_modules=targets)).train()
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to differentiate through
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    ids = torch.randint(0, config.vocab_size, (2, SEQ))
    loss, grads, flops = _step(model, ids, "none")
    recomputed = {}
    for mode in ("mlp", "full"):
        mode_loss, mode_grads, mode_flops = _step(model, ids, mode)
        torch.testing.assert_close(mode_loss, loss, atol=1e-6, rtol=0)
        for got, want in zip(mode_grads, grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        recomputed[mode] = mode_flops - flops
    tokens, h, f = 2 * SEQ, config.hidden_size, config.intermediate_size
    gate_up = 2 * tokens * h * 2 * f  # the matmul FLOPs of gate_up_proj's forward, per layer
    down = 2 * tokens * f * h
    layers = config.num_hidden_layers
    if "down_proj" in targets:  # its LoRA keeps its input: the whole MLP block is recomputed
        assert recomputed["mlp"] > layers * (gate_up + down)
    else:  # a frozen down_proj keeps nothing: recomputation stops before it (non-reentrant early stop)
        assert recomputed["mlp"] == layers * gate_up
    assert recomputed["full"] > recomputed["mlp"] + layers * down  # the whole layer, attention included
