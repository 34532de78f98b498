"""The cuda backend against transformers; skipped on machines without an NVIDIA GPU."""

from __future__ import annotations

import pytest
import torch

from checkpoint_tools.llama_config import LlamaConfig
from conftest import LLAMA3_TINY, hf_state_dict, make_hf_model
from nxd_lora.backends import get_backend
from nxd_lora.lora.config import LoraConfig
from nxd_lora.model.builder import build_model, rank_state_from_hf

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def test_cuda_backend_matches_transformers_and_trains_lora():
    hf_model = make_hf_model(LLAMA3_TINY)
    config = LlamaConfig.from_dict(LLAMA3_TINY)
    backend = get_backend("cuda")
    backend.setup(1)
    try:
        model = build_model(config, backend, rank_state_from_hf(hf_state_dict(hf_model), config, backend),
                            LoraConfig(lora_rank=4))
        ids = torch.randint(0, 64, (2, 16))
        with torch.no_grad():
            ref = hf_model(ids, labels=ids)
        logits, loss = model(ids.cuda(), labels=ids.cuda(), gather_logits=True)
        torch.testing.assert_close(logits.cpu(), ref.logits, atol=1e-4, rtol=1e-4)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.is_cuda for g in grads)
    finally:
        backend.teardown()
