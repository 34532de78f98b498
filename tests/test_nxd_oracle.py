"""NxD's own code as the oracle: NxD 0.17 (tag v2.28.0) run in its CPU mode (``tests/nxd_cpu``).

What runs here is NxD's real ``parallel_state``, ``GQAQKVColumnParallelLinear`` (its kv-shared
gradient groups included), parallel layers, parallel cross entropy and ``load_checkpoint``, under
our model, LoRA and train command, at the sizes users run: TP 8 with kv_size_multiplier 4 (Llama-3's
8 KV heads at TP 32, scaled down: 2 KV heads at TP 8), on the trn1 and the trn2 platform (NxD picks
its KV placement and kv-shared groups from the platform). References: transformers + peft, and the
``cpu`` backend (our own eager layers). The one bridge is NxD's CPU-mode gap in the kv-shared
all-reduce (``tests/nxd_cpu/harness.py``).

Starting 8 ranks that import NxD is most of each check's time, so each platform's checks share one
start (``workers.run_jobs``): NxD reads our checkpoints, our model + LoRA on NxD's layers, then the
train command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent / "nxd_cpu"))
import harness  # noqa: E402
from checkpoint_tools.convert import convert_to_nxd  # noqa: E402
from checkpoint_tools.llama_config import LlamaConfig  # noqa: E402
from checkpoint_tools.tp_layout import unshard_lora_state_dict  # noqa: E402
from conftest import LLAMA3_TINY, hf_state_dict, make_hf_model  # noqa: E402
from nxd_lora.demo import write_tiny_hf_model  # noqa: E402
from nxd_lora.local_launch import spawn_ranks  # noqa: E402
from test_tp_equivalence import NXD_TARGETS, peft_reference, random_hf_lora  # noqa: E402
from workers import run_jobs  # noqa: E402

pytestmark = pytest.mark.skipif(harness.unavailable_reason() is not None, reason=str(harness.unavailable_reason()))

QUIET = dict(log=lambda message: None)
EIGHT_HEADS_TWO_KV = dict(LLAMA3_TINY, num_attention_heads=8)  # TP 8: kv_size_multiplier 4
ATOL = 2e-5  # fp32: two implementations of the same sums in different orders
PLATFORMS = ("trn1", "trn2")


def train_overrides(root: Path, layout: str, backend: str, out: Path) -> list[str]:
    return [f"model.checkpoint={root / f'tiny-tp8-{layout}'}", f"model.tokenizer={root / 'tiny-hf'}", "train.tp=8",
            "lora.lora_rank=8", "lora.lora_alpha=16", "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
            "data.seq_len=256", "data.val_fraction=0.1", "train.max_steps=3", "train.lr=0.01", "train.warmup_steps=1",
            "train.micro_batch_size=2", "train.log_every=1", "train.save_every=0", "train.save_modes=[adapter]",
            "train.loggers=[csv]", "model.dtype=float32", f"train.backend={backend}", f"train.output_dir={out}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per platform, on 8 ranks: the checks on NxD's code, and the same on the cpu backend."""
    root = tmp_path_factory.mktemp("nxd_oracle")
    hf_model = make_hf_model(EIGHT_HEADS_TWO_KV)
    state = hf_state_dict(hf_model)  # before peft wraps the model's modules
    (root / "hf").mkdir()
    save_file(state, str(root / "hf" / "model.safetensors"), metadata={"format": "pt"})
    __import__("transformers").LlamaConfig(**EIGHT_HEADS_TWO_KV).save_pretrained(root / "hf")
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, EIGHT_HEADS_TWO_KV["vocab_size"], (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :5] = -100
    hf_lora = random_hf_lora(hf_model, 4)
    with torch.no_grad():
        base_logits = hf_model(input_ids).logits
    ref_logits, ref_loss, _ = peft_reference(hf_model, hf_lora, dict(lora_rank=4, lora_alpha=8), input_ids, labels)
    # the demo's tiny model (its tokenizer, the bundled data) with 8 heads, for the train command
    write_tiny_hf_model(root / "tiny-hf", num_attention_heads=8)
    lora = dict(lora_rank=4, lora_alpha=8, target_modules=NXD_TARGETS)
    results = {}
    for layout in PLATFORMS:
        for fuse in (False, True):
            convert_to_nxd(root / "hf", root / f"tp8-{layout}-{'fused' if fuse else 'split'}", 8, target=layout,
                           fuse_qkv=fuse, **QUIET)
        convert_to_nxd(root / "tiny-hf", root / f"tiny-tp8-{layout}", 8, target=layout, **QUIET)
        fb_args = (EIGHT_HEADS_TWO_KV, 8, state, input_ids, labels, False, lora, hf_lora, layout)
        nxd_jobs = [("nxd_loads_our_base", (str(root / f"tp8-{layout}-split"), input_ids)),
                    ("nxd_loads_our_base", (str(root / f"tp8-{layout}-fused"), input_ids)),
                    ("forward_backward", (*fb_args, "neuron", False)),
                    ("train_command", (train_overrides(root, layout, "neuron", root / f"run-{layout}-neuron"),))]
        cpu_jobs = [("forward_backward", (*fb_args, "cpu", False)),
                    ("train_command", (train_overrides(root, layout, "cpu", root / f"run-{layout}-cpu"),))]
        results[layout] = dict(nxd=spawn_ranks(run_jobs, 8, layout, nxd_jobs), cpu=spawn_ranks(run_jobs, 8, None, cpu_jobs))
    return dict(root=root, results=results, base_logits=base_logits, ref_logits=ref_logits, ref_loss=ref_loss)


@pytest.mark.parametrize("layout", PLATFORMS)
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_nxds_load_checkpoint_reads_our_base_strictly_and_gives_transformers_logits(runs, layout, fused):
    """Our converted base, read by NxD's own ``load_checkpoint(strict=True)`` (no missing or
    unexpected key) into our model on NxD's layers on that layout's platform: transformers' logits."""
    for rank in runs["results"][layout]["nxd"]:
        loaded = rank[1 if fused else 0]
        torch.testing.assert_close(loaded["logits"], runs["base_logits"], atol=ATOL, rtol=0)
        assert any(k.endswith("qkv_proj.weight_qkv" if fused else "qkv_proj.weight_k") for k in loaded["keys"])


@pytest.mark.parametrize("layout", PLATFORMS)
def test_our_model_and_lora_on_nxds_layers_at_tp8_kvm4(runs, layout):
    """Logits and loss equal peft's; every LoRA gradient (K/V lora_B replicas included, summed by
    NxD's kv-shared groups) equals the cpu backend's at the same TP."""
    nxd = [rank[2] for rank in runs["results"][layout]["nxd"]]
    cpu = [rank[0] for rank in runs["results"][layout]["cpu"]]
    for rank in nxd:
        torch.testing.assert_close(rank["logits"], runs["ref_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(rank["loss"], runs["ref_loss"], atol=ATOL, rtol=0)
    config = LlamaConfig.from_dict(EIGHT_HEADS_TWO_KV)
    got = unshard_lora_state_dict([r["grads"] for r in nxd], config, layout)
    ref = unshard_lora_state_dict([r["grads"] for r in cpu], config, layout)
    assert got.keys() == ref.keys() and any("k_proj.lora_B" in k for k in got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=1e-4, msg=key)


@pytest.mark.parametrize("layout", PLATFORMS)
def test_neuron_backend_trains_at_tp8_kvm4_to_the_cpu_backends_lora(runs, layout):
    """``nxd-lora train`` with ``train.backend=neuron`` on NxD's process groups, GQA layer and parallel
    cross entropy: the same losses and the same trained adapter (PEFT export) as ``train.backend=cpu``."""
    nxd, cpu = runs["results"][layout]["nxd"][0][3], runs["results"][layout]["cpu"][0][1]
    assert nxd["steps"] == cpu["steps"] == 3
    assert nxd["losses"] == pytest.approx(cpu["losses"], rel=1e-5)
    assert nxd["val"]["val/loss"] == pytest.approx(cpu["val"]["val/loss"], rel=1e-5)
    peft = Path("final") / "peft" / "adapter_model.safetensors"
    got = load_file(runs["root"] / f"run-{layout}-neuron" / peft)
    ref = load_file(runs["root"] / f"run-{layout}-cpu" / peft)
    assert got.keys() == ref.keys() and any("k_proj.lora_B" in k for k in got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any(ref[k].abs().max() > 0 for k in ref if "lora_B" in k)  # it trained


def test_nxds_gqa_layer_cannot_backpropagate_a_frozen_fused_qkv_and_train_refuses_it(tmp_path):
    """NxD 0.17's own GQA layer, weights frozen as under LoRA: split q/k/v backpropagates, fused
    ``weight_qkv`` fails (its backward reads the saved weight as a tuple). So ``train.backend=neuron``
    refuses a fused-qkv base before any work and says how to re-lay it out."""
    write_tiny_hf_model(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "fused", 1, fuse_qkv=True, **QUIET)
    recipe = [f"model.checkpoint={tmp_path / 'fused'}", f"model.tokenizer={tmp_path / 'hf'}", "train.tp=1",
              "train.backend=neuron"]
    split, fused, refusal, cpu_refusal = spawn_ranks(run_jobs, 1, "trn1", [
        ("nxd_fused_qkv_backward", (False,)), ("nxd_fused_qkv_backward", (True,)),
        ("refusal_before_start", (recipe,)), ("refusal_before_start", ([*recipe, "train.backend=cpu"],))])[0]
    assert split == "ok"
    assert fused.startswith("TypeError") and "matmul" in fused, fused
    assert "cannot backpropagate through a frozen fused qkv weight" in refusal, refusal
    assert f"nxd-lora convert {tmp_path / 'fused'} NEW_CKPT --tp 1 --target trn1 --no-fuse-qkv" in refusal
    assert cpu_refusal == ""  # our own GQA layer trains a fused base
