"""Our TP model at TP=1/2/4 (spawned gloo ranks) against transformers + peft on the same weights."""

from __future__ import annotations

import pytest
import torch

from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.tp_layout import unshard_lora_state_dict
from conftest import LLAMA2_TINY, LLAMA3_TINY, LLAMA32_TIED_TINY, hf_state_dict, make_hf_model
from nxd_lora.local_launch import spawn_ranks
from tp_workers import forward_backward

pytestmark = pytest.mark.slow

ATOL = 2e-5
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NXD_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SHARED_A = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

CASES = {
    # name: (config, fuse_qkv, lora kwargs)
    "llama3-gqa-rope-scaling": (LLAMA3_TINY, False, dict(lora_rank=4, lora_alpha=8)),
    "llama3.2-tied-1kv-fused": (LLAMA32_TIED_TINY, True, dict(lora_rank=4, lora_alpha=4, use_rslora=True)),
    "llama2-mha": (LLAMA2_TINY, False, dict(lora_rank=2, lora_alpha=4)),
}


def random_hf_lora(hf_model, rank: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Adapters with non-zero B on every projection; fused groups share one A, as NxD requires."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in hf_model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in HF_TARGETS:
            continue
        out[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.3
        out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.3
    for key in list(out):
        for group in SHARED_A:
            leaf = key.split(".")[-3]
            if leaf in group[1:] and key.endswith("lora_A.weight"):
                out[key] = out[key.replace(leaf, group[0])]
    return out


def peft_reference(hf_model, hf_lora, lora_kwargs, input_ids, labels):
    import peft

    cfg = peft.LoraConfig(
        r=lora_kwargs["lora_rank"], lora_alpha=lora_kwargs["lora_alpha"], lora_dropout=0.0,
        target_modules=list(HF_TARGETS), use_rslora=lora_kwargs.get("use_rslora", False),
    )
    model = peft.get_peft_model(hf_model, cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in hf_lora.items():
            params["base_model.model." + key.replace(".weight", ".default.weight")].copy_(value)
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    grads = {k.removeprefix("base_model.model.").replace(".default", ""): p.grad
             for k, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


# One case runs on every PyTorch the project supports (smoke: spawned gloo ranks against transformers + peft).
@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.smoke] if i == 0 else [])
                                        for i, name in enumerate(CASES)])
def case(request):
    config, fuse_qkv, lora_kwargs = CASES[request.param]
    hf_model = make_hf_model(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        input_ids = torch.randint(0, config["vocab_size"], (2, 24), generator=gen)
        labels = input_ids.clone()
        labels[:, :5] = -100  # prompt tokens masked, as in completion-only training
        base = hf_model(input_ids=input_ids, labels=labels)
    hf_state = hf_state_dict(hf_model)  # before peft wraps the modules in place
    hf_lora = random_hf_lora(hf_model, lora_kwargs["lora_rank"])
    ref_logits, ref_loss, ref_grads = peft_reference(hf_model, hf_lora, lora_kwargs, input_ids, labels)
    results = {}
    for tp in (1, 2, 4):
        results[tp] = spawn_ranks(
            forward_backward, tp, config, tp, hf_state, input_ids, labels, fuse_qkv, dict(lora_kwargs, target_modules=NXD_TARGETS), hf_lora,
        )
    return dict(config=config, base=base, ref_logits=ref_logits, ref_loss=ref_loss, ref_grads=ref_grads,
                results=results, lora_kwargs=lora_kwargs)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_base_logits_and_loss_match_transformers(case, tp):
    for rank_result in case["results"][tp]:
        torch.testing.assert_close(rank_result["base_logits"], case["base"].logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(rank_result["base_loss"], case["base"].loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_lora_logits_and_loss_match_peft(case, tp):
    for rank_result in case["results"][tp]:
        torch.testing.assert_close(rank_result["logits"], case["ref_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(rank_result["loss"], case["ref_loss"], atol=ATOL, rtol=0)
    # The adapter really changes the output, so the comparison above tests the LoRA path.
    assert (case["ref_logits"] - case["base"].logits).abs().max() > 0.1


def _unsharded_grads(results, config_dict):
    config = LlamaConfig.from_dict(config_dict)
    return unshard_lora_state_dict([r["grads"] for r in results], config)


@pytest.mark.parametrize("tp", [2, 4])
def test_lora_gradients_match_tp1(case, tp):
    ref = _unsharded_grads(case["results"][1], case["config"])
    got = _unsharded_grads(case["results"][tp], case["config"])  # also checks replicas are equal
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=1e-4, msg=key)


def test_tp1_lora_gradients_match_peft(case):
    ours = _unsharded_grads(case["results"][1], case["config"])
    ref = case["ref_grads"]
    for key, grad in ours.items():
        leaf = key.split(".")[-3]
        group = next((g for g in SHARED_A if leaf in g), None)
        if key.endswith("lora_A.weight") and group:
            # One shared A feeds every member of the group: its gradient is their sum.
            expected = sum(ref[key.replace(leaf, member)] for member in group)
        else:
            expected = ref[key]
        torch.testing.assert_close(grad, expected, atol=ATOL, rtol=1e-4, msg=key)


def test_trainable_parameter_count_matches_peft(case):
    import peft

    hf_model = make_hf_model(case["config"])
    peft_model = peft.get_peft_model(
        hf_model, peft.LoraConfig(r=case["lora_kwargs"]["lora_rank"], target_modules=list(HF_TARGETS))
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    # Shared A in fused groups: peft has 3 (q,k,v) + 2 (gate,up) copies where we have one.
    cfg = case["config"]
    r, h, layers = case["lora_kwargs"]["lora_rank"], cfg["hidden_size"], cfg["num_hidden_layers"]
    shared_savings = layers * r * h * (2 + 1)
    expected = f"trainable params: {trainable - shared_savings:,} || all params: {total - shared_savings:,}"
    for tp in (1, 2, 4):
        for rank_result in case["results"][tp]:
            assert rank_result["trainable"].startswith(expected)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_chunked_loss_and_activation_checkpointing_give_the_same_loss_and_grads(case, tp):
    """The logits-free chunked loss under each checkpointing mode equals the plain forward/backward."""
    for rank_result in case["results"][tp]:
        for mode, variant in rank_result["variants"].items():
            assert variant["logits"] is None
            torch.testing.assert_close(variant["loss"], rank_result["loss"], atol=ATOL, rtol=0, msg=mode)
            assert variant["grads"].keys() == rank_result["grads"].keys()
            for name, grad in variant["grads"].items():
                torch.testing.assert_close(grad, rank_result["grads"][name], atol=ATOL, rtol=1e-4,
                                           msg=f"{mode}: {name}")
