"""Reading what NxD's own LoraModel saves, without NxD: the files laid out as NxD 0.17 writes them
(rank files named by ``nxd.save_checkpoint``, NxD's adapter_config.json fields), built here from an
HF-layout adapter. Every refusal names the file, the key or the option. What NxD itself writes, and the
logits its exports give, are checked on NxD's own code in ``tests/test_nxd_oracle.py``."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_tools.convert import convert_to_nxd
from checkpoint_tools.export import export_nxd_lora
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_lora_save import read_nxd_lora_save
from checkpoint_tools.sources import CheckpointError
from checkpoint_tools.tp_layout import shard_lora_state_dict
from conftest import LLAMA3_TINY, make_hf_model
from nxd_lora.cli import main
from test_tp_equivalence import random_hf_lora

QUIET = dict(log=lambda message: None)
NXD_ADAPTER_CONFIG = {"bias": "none", "init_lora_weights": "default", "lora_alpha": 8, "lora_dropout": 0.0,
                      "lora_rank": 4, "r": 4, "merge_lora": False, "modules_to_save": None, "save_lora_base": False,
                      "save_lora_config_adapter": False, "target_modules": ["qkv_proj", "o_proj"],
                      "use_rslora": False}
TP = 2


@pytest.fixture(scope="module")
def nxd_save(tmp_path_factory):
    """A TP-2 LoRA save as NxD's ``nxd.save_checkpoint(root, "lora", model=lora_model)`` lays it out."""
    root = tmp_path_factory.mktemp("nxd_lora_save")
    model = make_hf_model(LLAMA3_TINY)
    model.save_pretrained(root / "hf")
    hf_lora = {k: v for k, v in random_hf_lora(model, 4).items() if "self_attn" in k}
    ranks = shard_lora_state_dict(hf_lora, LlamaConfig.from_dict(LLAMA3_TINY), TP)
    (root / "lora_adapter" / "lora" / "model").mkdir(parents=True)
    for rank, state in enumerate(ranks):
        torch.save(state, root / "lora_adapter" / "lora" / "model" / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_00.pt")
    (root / "lora_adapter" / "adapter_config.json").write_text(json.dumps(NXD_ADAPTER_CONFIG))
    return dict(root=root, hf_lora=hf_lora, config=LlamaConfig.from_json(root / "hf" / "config.json"))


def test_the_adapter_reads_back_from_the_rank_shards(nxd_save):
    save = read_nxd_lora_save(nxd_save["root"] / "lora_adapter", nxd_save["config"], None)
    assert save.tp == TP and not save.has_base and not save.merged_shards
    assert save.lora == {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}
    assert save.adapters.keys() == nxd_save["hf_lora"].keys()
    assert all(torch.equal(save.adapters[k], nxd_save["hf_lora"][k]) for k in save.adapters)


def test_a_missing_adapter_config_names_where_nxd_put_it_and_the_option(nxd_save, tmp_path):
    import shutil

    shutil.copytree(nxd_save["root"] / "lora_adapter" / "lora", tmp_path / "lora")
    with pytest.raises(CheckpointError, match=r"lora_save_dir .*pass --lora-config PATH/adapter_config.json"):
        read_nxd_lora_save(tmp_path / "lora", nxd_save["config"], None)
    with pytest.raises(CheckpointError, match="--lora-config .*nope.json: no such file"):
        read_nxd_lora_save(tmp_path / "lora", nxd_save["config"], None, tmp_path / "nope.json")


@pytest.mark.parametrize("field, value, message", [
    ("bias", "all", "bias='all': trained biases"),
    ("modules_to_save", ["lm_head"], r"modules_to_save=\['lm_head'\] is not exported"),
])
def test_options_an_export_cannot_honour_are_refused(nxd_save, tmp_path, field, value, message):
    (tmp_path / "cfg.json").write_text(json.dumps(dict(NXD_ADAPTER_CONFIG, **{field: value})))
    with pytest.raises(CheckpointError, match=message):
        read_nxd_lora_save(nxd_save["root"] / "lora_adapter", nxd_save["config"], None, tmp_path / "cfg.json")


def test_a_model_config_that_does_not_fit_names_the_tensor_and_shapes(nxd_save):
    other = LlamaConfig.from_dict(dict(LLAMA3_TINY, hidden_size=64, intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"dp_rank_00_tp_rank_00_pp_rank_00.pt: model.layers.0.self_attn."
                                              r"o_proj.lora_A.weight has shape \(4, 16\), expected \(4, 32\) or \(4, 64\)"):
        read_nxd_lora_save(nxd_save["root"] / "lora_adapter", other, None)


def test_export_options_are_refused_where_they_do_not_apply(nxd_save, tmp_path, capsys):
    root = nxd_save["root"]
    convert_to_nxd(root / "hf", tmp_path / "base", TP, **QUIET)
    capsys.readouterr()
    assert main(["export", str(root / "lora_adapter"), str(tmp_path / "m"), "--merged", "--config",
                 str(root / "hf" / "config.json")]) == 2
    assert "holds the adapter only: a merged export needs --base" in capsys.readouterr().err
    assert main(["export", str(root / "lora_adapter"), str(tmp_path / "p")]) == 2
    assert "pass --config CONFIG_JSON" in capsys.readouterr().err
    assert main(["export", str(root / "lora_adapter"), str(tmp_path / "p"), "--base", str(tmp_path / "base"),
                 "--source-layout", "trn1"]) == 2
    assert "leave out --source-layout" in capsys.readouterr().err
    # a checkpoint of ours takes none of the NxD-save options
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "p"), "--lora-config", "x.json"]) == 2
    assert "--lora-config apply to a LoRA save written by NxD's own LoraModel" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("m", "p"))
    # the merged export from an HF base (its config comes with it): W + alpha/r B A
    export_nxd_lora(root / "lora_adapter", tmp_path / "merged", merged=True, base=root / "hf", **QUIET)
    from safetensors.torch import load_file

    merged = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    hf = load_file(root / "hf" / "model.safetensors")
    lora = nxd_save["hf_lora"]
    key = "model.layers.1.self_attn.k_proj"
    expected = hf[key + ".weight"].double() + 2.0 * lora[key + ".lora_B.weight"].double() @ lora[
        key + ".lora_A.weight"].double()
    torch.testing.assert_close(merged[key + ".weight"].double(), expected, atol=1e-6, rtol=0)
