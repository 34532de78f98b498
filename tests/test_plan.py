"""``nxd-lora plan``: exact weight and LoRA counts, activation estimates against what autograd keeps,
the shipped trn1 recipes, and refusals that name the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoint_tools.atomic_io import load_tensors
from checkpoint_tools.convert import convert_to_nxd
from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from nxd_lora.backends import get_backend
from nxd_lora.cli import main
from nxd_lora.demo import write_tiny_hf_model
from nxd_lora.local_launch import spawn_ranks
from nxd_lora.lora.config import LoraConfig
from nxd_lora.model import attention
from nxd_lora.model.builder import build_model
from nxd_lora.plan import activation_bytes_per_token, base_weight_elements, lora_elements
from nxd_lora.train.config import load_recipe

from conftest import LLAMA3_TINY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_base_weights_per_rank_are_the_converters_rank_files(tmp_path, tp):
    hf = write_tiny_hf_model(tmp_path / "hf")  # 2 KV heads: tp=4 replicates them (kv_size_multiplier 2)
    convert_to_nxd(hf, tmp_path / "nxd", tp, log=lambda m: None)
    config = LlamaConfig.from_json(hf)
    kvm = check_tensor_parallel(config, tp)
    for rank in range(tp):
        rank_file = tmp_path / "nxd" / "pretrained_weight" / "model" / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_00.pt"
        assert sum(t.numel() for t in load_tensors(rank_file).values()) == base_weight_elements(config, tp, kvm)


def _lora_numel_on_rank(config_dict: dict, tp: int) -> int:
    config = LlamaConfig.from_dict(config_dict)
    backend = get_backend("cpu")
    backend.setup(tp, check_tensor_parallel(config, tp))
    try:
        model = build_model(config, backend, None, LoraConfig(lora_rank=4, target_modules=ALL_TARGETS))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    finally:
        backend.teardown()


@pytest.mark.slow
def test_lora_elements_per_rank_are_the_models(tmp_path):
    config = LlamaConfig.from_dict(LLAMA3_TINY)
    lora = LoraConfig(lora_rank=4, target_modules=ALL_TARGETS)
    for tp in (1, 4):  # tp=4 over 2 KV heads: lora_B's K/V rows replicated like the base
        numels = spawn_ranks(_lora_numel_on_rank, tp, LLAMA3_TINY, tp) if tp > 1 else [_lora_numel_on_rank(LLAMA3_TINY, 1)]
        assert numels == [lora_elements(config, lora, tp, check_tensor_parallel(config, tp))] * tp


@pytest.mark.parametrize("targets", [["qkv_proj"], ALL_TARGETS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.torch_version
def test_activation_estimate_is_what_autograd_keeps(targets, dtype, dropout, monkeypatch):
    """Bytes saved for backward per token and layer, measured with saved-tensor hooks (weights
    excluded: they are kept anyway), against the plan's formula, for each checkpointing mode.
    Attention keeps what a device's flash kernel keeps: the eager CPU kernel's option to keep its
    probabilities (tests/test_attention.py) is not part of a device plan."""
    monkeypatch.setattr(attention, "KEEP_PROBS_MAX_SEQ", 0)
    config = LlamaConfig.from_dict(dict(LLAMA3_TINY, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                                        num_key_value_heads=2, num_hidden_layers=3, vocab_size=256))
    lora = LoraConfig(lora_rank=8, target_modules=targets, lora_dropout=dropout)
    backend = get_backend("cpu")
    backend.setup(1)
    try:
        model = build_model(config, backend, None, lora, dtype=dtype).train()
        seq = 256
        hidden = model.model.embed_tokens(torch.randint(0, 256, (1, seq))).detach().requires_grad_()
        cos, sin = model.model.rotary_emb(torch.arange(seq)[None], hidden.dtype)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for mode in ("none", "mlp", "full"):
            model.set_activation_checkpointing(mode)
            kept: dict[int, int] = {}

            def pack(tensor):
                kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                x = hidden
                for layer in model.model.layers:
                    x = layer(x, cos, sin, None)
            measured = sum(n for ptr, n in kept.items() if ptr not in weights) / seq / config.num_hidden_layers
            estimate, _ = activation_bytes_per_token(config, lora, 1, 1, dtype.itemsize, mode)
            assert 0.85 <= measured / estimate <= 1.1, (mode, measured, estimate)  # the estimate errs high
    finally:
        backend.teardown()


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*trn1*.yaml")))
def test_shipped_trn1_recipes_fit_a_trn1_neuroncore(recipe, capsys):
    assert main(["plan", str(CONFIGS / recipe), "--world-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "-> fits" in out and "layout: world size 32 = tp" in out
    loaded = load_recipe(CONFIGS / recipe)
    assert loaded.train.backend == "neuron" and loaded.model.architecture


def test_a_plan_that_cannot_fit_is_refused_with_its_numbers(capsys):
    code = main(["plan", str(CONFIGS / "llama3.1-70b-trn1-tp32.yaml"), "train.activation_checkpointing=none"])
    assert code == 2
    err = capsys.readouterr().err
    assert "GiB per rank, more than the 16 GiB of a trn1 rank" in err
    assert "activations (none)" in err and "train.activation_checkpointing=full" in err


def test_overrides_may_follow_options(capsys):
    recipe = str(CONFIGS / "llama3-8b-trn1-tp32.yaml")
    assert main(["plan", recipe, "train.backend=cuda", "--device", "h100", "train.tp=1",
                 "train.micro_batch_size=8", "train.activation_checkpointing=full"]) == 0
    out = capsys.readouterr().out
    assert "micro_batch_size 8, activation_checkpointing full" in out and "on h100 (80 GiB), tp=1" in out
    with pytest.raises(SystemExit):
        main(["plan", recipe, "--device", "h100", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_layout_errors_name_the_numbers(capsys):
    recipe = str(CONFIGS / "llama3-8b-trn1-tp32.yaml")
    assert main(["plan", recipe, "--world-size", "16"]) == 2
    assert "train.tp=32 does not divide the world size 16" in capsys.readouterr().err
    assert main(["plan", recipe, "train.dp=2", "--world-size", "32"]) == 2
    assert "train.tp=32 x train.dp=2 = 64 ranks, but the launcher started 32" in capsys.readouterr().err
    assert main(["plan", recipe, "train.tp=12"]) == 2
    assert "num_attention_heads=32 is not divisible by tp=12" in capsys.readouterr().err


def test_plan_without_checkpoint_or_architecture_says_what_to_set(capsys):
    assert main(["plan", str(CONFIGS / "tiny-cpu.yaml"), "model.checkpoint=/nonexistent"]) == 2
    assert "set one of them" in capsys.readouterr().err


def test_train_refuses_a_checkpoint_of_another_architecture(tmp_path, capsys):
    convert_to_nxd(write_tiny_hf_model(tmp_path / "hf"), tmp_path / "nxd", 1, log=lambda m: None)
    code = main(["train", f"model.checkpoint={tmp_path / 'nxd'}", "model.architecture=llama3-8b",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "the checkpoint is a different model (vocab_size: 128256 vs 512" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
