"""The neuron backend against NxD 0.17's recorded API (stand-ins here), and against NxD itself on Trainium."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os

import pytest
import torch

import nxd_standins
from checkpoint_tools.convert import convert_to_nxd
from nxd_lora import parallel
from nxd_lora.backends.neuron import NXD_NAMES, PARALLEL_STATE, masked_cross_entropy
from nxd_lora.demo import TINY_OVERRIDES, write_tiny_hf_model
from nxd_lora.local_launch import spawn_ranks

HAVE_NXD = importlib.util.find_spec("neuronx_distributed") is not None
needs_xla = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None,
                               reason="needs torch-xla, which exists for PyTorch 2.9 only: the torch 2.9 job runs it")


def test_recorded_signatures_are_nxds_own():
    """The stand-ins' records (still used where NxD's code cannot run here: the XLA lazy-step test below)
    against NxD's real signatures: the installed NxD on a Neuron host, else NxD 0.17's source ($NXD_SRC)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "nxd_cpu"))
    import harness

    if not HAVE_NXD and harness.unavailable_reason():
        pytest.skip(harness.unavailable_reason())
    from workers import start_jobs

    assert start_jobs(1, "trn1", [("recorded_signature_mismatches", ())])[0] == [[]]


def test_the_backend_uses_only_recorded_nxd_names():
    recorded = {(module, stub.__name__) for module, stubs in nxd_standins.RECORDED.items() for stub in stubs}
    used = {(module, name) for name, module in NXD_NAMES.items()}
    assert used <= recorded, used - recorded
    state_names = {stub.__name__ for stub in nxd_standins.RECORDED[PARALLEL_STATE]}
    assert {"initialize_model_parallel", "get_tensor_model_parallel_rank", "get_data_parallel_group"} <= state_names


@pytest.mark.parametrize("name", ["ParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear",
                                  "GQAQKVColumnParallelLinear"])
def test_our_eager_layers_take_nxds_arguments_with_nxds_defaults(name):
    """What lets one model file build on both: each argument of ours is NxD's, same default."""
    ours = inspect.signature(getattr(parallel, name).__init__).parameters
    stub = next(s for stubs in nxd_standins.RECORDED.values() for s in stubs if s.__name__ == name)
    nxd = nxd_standins.recorded_signature(stub).parameters
    for arg, param in ours.items():
        if arg == "self":
            continue
        assert arg in nxd, f"{name}({arg}=...) is not an NxD argument"
        assert param.default == nxd[arg].default, (name, arg, param.default, nxd[arg].default)


@pytest.mark.smoke
def test_masked_cross_entropy_gives_ignore_index_semantics_over_nxds_loss():
    nxd_like = nxd_standins._function(nxd_standins.parallel_cross_entropy, nxd_standins._nxd_cross_entropy)
    logits = torch.randn(2, 5, 11)
    target = torch.tensor([[1, 4, -100, 10, 0], [-100, -100, 3, 2, 7]])
    kept = logits.clone()
    losses = masked_cross_entropy(nxd_like)(logits, target, ignore_index=-100)
    assert torch.equal(logits, kept)  # NxD shifts what it is given: the adapter hands it a copy
    torch.testing.assert_close(losses, parallel.parallel_cross_entropy(kept, target, ignore_index=-100))
    assert torch.all(losses[target == -100] == 0) and torch.all(losses[target != -100] > 0)
    with pytest.raises(TypeError):  # NxD has no ignore_index: calling it so would fail on Trainium
        nxd_like(logits, target, ignore_index=-100)


def _train_on(backend: str, overrides: list[str], work: str) -> dict:
    """In a fresh process: the stand-ins (for neuron), then the train command."""
    from pathlib import Path

    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    os.environ["NXD_LORA_NO_BAR"] = "1"
    if backend == "neuron":
        nxd_standins.install(Path(work))
    result = train(load_recipe(None, [*overrides, f"train.backend={backend}"]))
    result["nxd_calls"] = sorted({call["name"] for call in nxd_standins.CALLS})
    result["qkv_calls"] = [c["args"] for c in nxd_standins.CALLS if c["name"] == "GQAQKVColumnParallelLinear"]
    return result


@needs_xla
@pytest.mark.slow
def test_neuron_backend_trains_like_the_xla_backend_through_nxds_api(tmp_path):
    """The whole train command on the neuron backend: NxD process groups, layers and loss (stand-ins
    bound to NxD's signatures), the doctor and plan checks, the lazy step. Same losses as ``xla``."""
    write_tiny_hf_model(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "tp1", 1, log=lambda m: None)
    common = [f"model.checkpoint={tmp_path / 'tp1'}", f"model.tokenizer={tmp_path / 'hf'}", *TINY_OVERRIDES,
              "train.tp=1", "train.max_steps=8", "train.log_every=4", "train.save_every=4", "train.save_modes=[adapter]",
              "train.loggers=[csv]", "data.val_fraction=0.1", "model.dtype=bfloat16",
              "train.activation_checkpointing=mlp"]
    neuron = spawn_ranks(_train_on, 1, "neuron", [*common, f"train.output_dir={tmp_path / 'neuron'}"],
                         str(tmp_path / "standins"))[0]
    xla = spawn_ranks(_train_on, 1, "xla", [*common, f"train.output_dir={tmp_path / 'xla'}"], "")[0]
    assert {"initialize_model_parallel", "ParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear",
            "GQAQKVColumnParallelLinear", "parallel_cross_entropy", "destroy_model_parallel"} <= set(neuron["nxd_calls"])
    # each layer's base qkv and its LoRA B are NxD GQA layers, with the checkpoint's KV layout
    layers = 2
    assert len(neuron["qkv_calls"]) == 2 * layers
    assert all(c["kv_size_multiplier"] == "1" and c["fuse_qkv"] == "False" for c in neuron["qkv_calls"])
    assert len(neuron["losses"]) == 2 and neuron["losses"][-1] < neuron["losses"][0]
    # bf16 weights, and the two paths round in different places (NxD's layers vs ours): within one
    # bf16 unit of least precision (2**-8). 2e-3 held on the machine this was written on; on an AVX2
    # host (AMD EPYC) the first loss differs by 2.4e-3.
    assert neuron["losses"] == pytest.approx(xla["losses"], rel=2**-8)
    assert neuron["val"]["val/loss"] == pytest.approx(xla["val"]["val/loss"], rel=2**-8)
    assert (tmp_path / "neuron" / "checkpoints" / "step_4" / "done").is_file()
    assert (tmp_path / "neuron" / "final" / "peft" / "adapter_config.json").is_file()
    compiles = [s["compiles"] for s in neuron["step_stats"]]
    # graphs: step 1 (creates AdamW's state), the steady step (2-4, the log step 4 included), and one
    # for the first checkpoint's transfers (counted in step 5); nothing new after that
    assert compiles[1:4] == [compiles[1]] * 3 and compiles[4] - compiles[3] <= 1, compiles
    assert compiles[4:] == [compiles[4]] * (len(compiles) - 4), compiles
