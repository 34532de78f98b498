"""The Lightning trainer end to end on spawned gloo ranks: learning, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoint_tools.convert import convert_to_nxd
from nxd_lora.data.records import read_records, sample_data_path
from nxd_lora.demo import TINY_OVERRIDES, write_tiny_hf_model
from nxd_lora.local_launch import spawn_ranks
from nxd_lora.train.config import load_recipe
from nxd_lora.train.run import train


def _train(overrides: list[str]) -> dict:
    import os

    os.environ["NXD_LORA_NO_BAR"] = "1"
    return train(load_recipe(None, overrides))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_hf_model(root / "hf")
    convert_to_nxd(root / "hf", root / "tp2", 2, log=lambda m: None)
    small = root / "six.jsonl"
    rows = [json.dumps({"instruction": r.messages[0]["content"], "response": r.messages[-1]["content"]})
            for r in read_records(sample_data_path()).records[7:13]]
    small.write_text("\n".join(rows) + "\n")
    return root


def _overrides(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.checkpoint={tiny / 'tp2'}", f"model.tokenizer={tiny / 'hf'}", "train.tp=2",
            f"train.output_dir={out}", *TINY_OVERRIDES, "train.loggers=[csv]", *extra]


@pytest.mark.slow
@pytest.mark.smoke
def test_loss_falls_by_half_on_a_memorisable_set(tiny, tmp_path):
    result = spawn_ranks(_train, 2, _overrides(tiny, tmp_path, f"data.train_files=[{tiny / 'six.jsonl'}]",
                                               "data.val_fraction=0", "train.max_steps=80", "train.save_every=0",
                                               "train.save_modes=[adapter]"))
    losses = result[0]["losses"]
    assert len(losses) == 80 and result[1]["losses"] == losses  # both TP ranks see the same loss
    assert min(losses[-5:]) <= 0.5 * losses[0], (losses[0], losses[-5:])
    assert (tmp_path / "logs").is_dir() and (tmp_path / "final" / "adapter" / "done").is_file()
    assert json.loads((tmp_path / "final" / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.slow
def test_resumed_losses_equal_the_uninterrupted_run(tiny, tmp_path):
    common = ["train.max_steps=8", "train.save_every=4", "train.save_modes=[adapter]", "data.val_fraction=0"]
    full = spawn_ranks(_train, 2, _overrides(tiny, tmp_path / "full", *common))[0]["losses"]
    first = spawn_ranks(_train, 2, _overrides(tiny, tmp_path / "cut", *common[1:], "train.max_steps=4"))[0]
    assert first["losses"] == pytest.approx(full[:4], abs=1e-6)
    resumed = spawn_ranks(_train, 2, _overrides(tiny, tmp_path / "cut", *common, "train.resume=auto"))[0]
    assert resumed["steps"] == 8 and len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(full[4:], abs=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    with pytest.raises(RuntimeError, match="NonFiniteLoss|loss is (nan|inf)"):
        spawn_ranks(_train, 2, _overrides(tiny, tmp_path, "train.lr=1e30", "train.warmup_steps=0",
                                          "train.grad_clip=0", "train.save_every=1", "train.max_steps=20"))
    tags = sorted(p.parent.name for p in (tmp_path / "checkpoints").glob("*/done"))
    assert tags and all(t.startswith("step_") for t in tags)
    assert not list((tmp_path / "checkpoints").glob(".*partial"))


def test_config_errors_list_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['train.max_step'\]; valid keys in 'train': .*max_steps"):
        load_recipe(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match=r"unknown sections \['optim'\]"):
        load_recipe(None, ["optim.lr=3"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_recipe(None, ["max_steps=3"])
    with pytest.raises(ValueError, match="train.schedule='step'"):
        load_recipe(None, ["train.schedule=step"])
    (tmp_path / "r.yaml").write_text("train:\n  max_steps: 7\nlora:\n  lora_rank: 4\n")
    recipe = load_recipe(tmp_path / "r.yaml", ["train.lr=0.5"])
    assert (recipe.train.max_steps, recipe.train.lr, recipe.lora.lora_rank) == (7, 0.5, 4)


@pytest.mark.slow
def test_empty_dataset_and_wrong_tp_are_errors(tiny, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    data = f"data.train_files=[{tmp_path / 'empty.jsonl'}]"
    with pytest.raises(ValueError, match=r"checkpoint does not match: tp=2 \(expected 1\)"):
        _train(_overrides(tiny, tmp_path, data, "train.tp=1"))
    with pytest.raises(RuntimeError, match="empty.jsonl: no usable records"):
        spawn_ranks(_train, 2, _overrides(tiny, tmp_path, data))


def test_shipped_recipes_parse():
    for path in Path(__file__).resolve().parents[1].glob("configs/*.yaml"):
        recipe = load_recipe(path)
        assert recipe.train.max_steps > 0 and recipe.model.checkpoint, path


def test_missing_data_file_is_named(tiny, tmp_path):
    from nxd_lora.tokenizer import load_tokenizer
    from nxd_lora.train.data import build_rows

    recipe = load_recipe(None, [f"data.train_files=[{tmp_path / 'nope.jsonl'}]"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such data file"):
        build_rows(recipe.data, load_tokenizer(tiny / "hf"), 0)


@pytest.mark.slow
def test_bf16_base_weights_train(tiny, tmp_path):
    result = spawn_ranks(_train, 2, _overrides(tiny, tmp_path, "model.dtype=bfloat16", "train.max_steps=20",
                                               "train.save_every=0", "train.save_modes=[adapter]"))[0]
    assert result["losses"][-1] < 0.9 * result["losses"][0]


def test_cli_train_flags_reach_the_recipe(monkeypatch):
    import nxd_lora.train.run as run
    from nxd_lora.cli import main

    seen = {}
    monkeypatch.setattr(run, "train", lambda recipe: seen.setdefault("recipe", recipe))
    assert main(["train", "--resume", "auto", "train.max_steps=3"]) == 0
    assert (seen["recipe"].train.resume, seen["recipe"].train.max_steps) == ("auto", 3)
    assert main(["train", "train.nope=1"]) == 2


@pytest.mark.slow
def test_under_neuron_parallel_compile_a_few_steps_run_and_nothing_is_saved(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_EXTRACT_GRAPHS_ONLY", "1")  # what the tool sets for the job it runs
    result = spawn_ranks(_train, 2, _overrides(tiny, tmp_path, "train.max_steps=50", "train.save_every=1"))[0]
    assert result["steps"] == 3 and result["saved"] == {}
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "final").exists()


def test_smollm2_recipe_is_the_demo_recipe():
    """configs/smollm2-135m-cpu.yaml trains what ``nxd-lora demo`` trains (paths aside), on the same files."""
    from nxd_lora.demo import REAL_OVERRIDES, REAL_TP, demo_train_files

    shipped = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-cpu.yaml").to_dict()
    demo = load_recipe(None, [*REAL_OVERRIDES, f"train.tp={REAL_TP}", "train.resume=auto",
                              "train.output_dir=runs/smollm2-135m-cpu"]).to_dict()
    assert shipped["lora"] == demo["lora"] and shipped["train"] == demo["train"]
    assert {k: v for k, v in shipped["data"].items() if k != "train_files"} == \
           {k: v for k, v in demo["data"].items() if k != "train_files"}
    root = Path(__file__).resolve().parents[1]
    assert [str((root / f).resolve()) for f in shipped["data"]["train_files"]] == demo_train_files()
