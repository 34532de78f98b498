"""Trained adapters -> PEFT and merged HF exports, checked against the trained TP model's logits."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_tools.convert import convert_to_nxd
from checkpoint_tools.export import export_merged, export_peft
from checkpoint_tools.nxd_format import MANIFEST, resolve_tag_dir
from checkpoint_tools.sources import CheckpointError
from conftest import LLAMA3_TINY, make_hf_model
from nxd_lora.cli import main
from nxd_lora.local_launch import spawn_ranks
from tp_workers import train_and_save

QUIET = dict(log=lambda message: None)
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module", params=[pytest.param("trn1", marks=pytest.mark.smoke), "trn2"])
def trained(tmp_path_factory, request):
    """A tiny Llama converted to TP=4 (KV heads replicated, in each NxD layout), LoRA-trained on 4 gloo
    ranks, saved 3 ways."""
    root = tmp_path_factory.mktemp(f"trained_{request.param}")
    model = make_hf_model(LLAMA3_TINY)
    model.save_pretrained(root / "hf")
    convert_to_nxd(root / "hf", root / "base", 4, target=request.param, **QUIET)
    input_ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    lora = dict(lora_rank=4, lora_alpha=8, target_modules=TARGETS)
    results = spawn_ranks(train_and_save, 4, str(root / "base"), str(root / "runs"), 4, lora, input_ids)
    with torch.no_grad():
        base_logits = model(input_ids).logits
    return dict(root=root, input_ids=input_ids, logits=results[0]["logits"], base_logits=base_logits,
                layout=request.param)


def _hf_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_training_changed_the_model(trained):
    assert (trained["logits"] - trained["base_logits"]).abs().max() > 1e-2


def test_peft_adapter_loads_in_peft_and_gives_the_trained_logits(trained, tmp_path):
    import peft
    import transformers

    root = trained["root"]
    export_peft(root / "runs" / "adapter", tmp_path / "peft", base_model=str(root / "hf"), **QUIET)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    base = transformers.LlamaForCausalLM.from_pretrained(root / "hf")
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(_hf_logits(tuned, trained["input_ids"]), trained["logits"], atol=2e-5, rtol=0)


def test_base_plus_adapter_save_exports_the_same_adapter(trained, tmp_path):
    root = trained["root"]
    a = export_peft(root / "runs" / "adapter", tmp_path / "a", base_model=str(root / "hf"), **QUIET)
    b = export_peft(root / "runs" / "base_adapter", tmp_path / "b", base_model=str(root / "hf"), **QUIET)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["adapter", "base_adapter", "merged"])
def test_merged_export_loads_in_transformers_and_equals_base_plus_adapter(trained, tmp_path, mode):
    import transformers

    root = trained["root"]
    base = root / "base" if mode == "adapter" else None
    export_merged(root / "runs" / mode, tmp_path / "merged", base=base, tokenizer_dir=root / "hf", **QUIET)
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_hf_logits(merged, trained["input_ids"]), trained["logits"], atol=2e-5, rtol=0)


def test_saved_tags_carry_nxd_adapter_config_and_manifest(trained):
    for mode, (save_base, merge) in {"adapter": (False, False), "base_adapter": (True, False),
                                     "merged": (True, True)}.items():
        tag = resolve_tag_dir(trained["root"] / "runs" / mode)
        assert tag.name == "step_3" and (tag / "done").read_text() == "1"
        config = json.loads((tag / "adapter_config.json").read_text())
        assert (config["save_lora_base"], config["merge_lora"], config["r"]) == (save_base, merge, 4)
        manifest = json.loads((tag / MANIFEST).read_text())
        assert (manifest["save_mode"], manifest["kv_layout"]) == (mode.replace("_", "+"), trained["layout"])
        keys = torch.load(tag / "model" / "dp_rank_00_tp_rank_03_pp_rank_00.pt", weights_only=True).keys()
        has_lora = any("lora_" in k for k in keys)
        assert has_lora == (mode != "merged")
        assert any("base_layer" in k for k in keys) == (mode == "base_adapter")
        assert (mode == "adapter") == all("lora_" in k for k in keys)


def test_export_errors(trained, tmp_path):
    root = trained["root"]
    with pytest.raises(CheckpointError, match="needs --base"):
        export_merged(root / "runs" / "adapter", tmp_path / "m", **QUIET)
    with pytest.raises(CheckpointError, match="holds no separate adapter"):
        export_peft(root / "runs" / "merged", tmp_path / "p", **QUIET)
    with pytest.raises(CheckpointError, match="expected a trained LoRA checkpoint"):
        export_peft(root / "base", tmp_path / "p", **QUIET)
    assert main(["export", str(root / "runs" / "adapter"), str(tmp_path / "m"), "--merged"]) == 2
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_vllm_limits_are_named():
    from checkpoint_tools.export import vllm_warnings

    assert vllm_warnings({"lora_rank": 16}) == []
    assert vllm_warnings({"lora_rank": 32}) == ["LoRA rank 32 > 16: start vLLM with --max-lora-rank 32 (or higher)"]
