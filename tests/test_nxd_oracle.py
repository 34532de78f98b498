"""NxD's own code as the oracle: NxD 0.17 (tag v2.28.0) run in its CPU mode (``tests/nxd_cpu``).

What runs here is NxD's real ``parallel_state``, ``GQAQKVColumnParallelLinear`` (its kv-shared
gradient groups included), parallel layers, parallel cross entropy and ``load_checkpoint``, under
our model, LoRA and train command, at the sizes users run: TP 8 with kv_size_multiplier 4 (Llama-3's
8 KV heads at TP 32, scaled down: 2 KV heads at TP 8), on the trn1 and the trn2 platform (NxD picks
its KV placement and kv-shared groups from the platform). References: transformers + peft, and the
``cpu`` backend (our own eager layers). The one bridge is NxD's CPU-mode gap in the kv-shared
all-reduce (``tests/nxd_cpu/harness.py``).

Starting 8 ranks that import NxD is most of each check's time, so each platform's checks share one
start (``workers.start_jobs``): NxD reads our checkpoints, our model + LoRA on NxD's layers, then the
train command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent / "nxd_cpu"))
import harness  # noqa: E402
from checkpoint_tools.convert import convert_to_nxd  # noqa: E402
from checkpoint_tools.llama_config import LlamaConfig  # noqa: E402
from checkpoint_tools.nxd_source import NXD_CONVERTER_TRN2  # noqa: E402
from checkpoint_tools.sources import CheckpointError  # noqa: E402
from checkpoint_tools.tp_layout import unshard_lora_state_dict  # noqa: E402
from conftest import LLAMA3_TINY, hf_state_dict, make_hf_model  # noqa: E402
from nxd_lora.cli import main  # noqa: E402
from nxd_lora.demo import write_tiny_hf_model  # noqa: E402
from test_tp_equivalence import NXD_TARGETS, peft_reference, random_hf_lora  # noqa: E402
from workers import start_jobs  # noqa: E402

pytestmark = [pytest.mark.slow,  # 8 ranks that import NxD, several times: minutes, so not in `make test-fast`
              pytest.mark.skipif(harness.unavailable_reason() is not None, reason=str(harness.unavailable_reason()))]

QUIET = dict(log=lambda message: None)
EIGHT_HEADS_TWO_KV = dict(LLAMA3_TINY, num_attention_heads=8)  # TP 8: kv_size_multiplier 4
ATOL = 2e-5  # fp32: two implementations of the same sums in different orders
PLATFORMS = ("trn1", "trn2")


def run_nxd_converter(root: Path, layout: str) -> None:
    """NxD 0.17's ``examples/training/llama/convert_checkpoints.py`` on ``root/full.pt`` at TP 8 / kvm 4
    for ``layout``, into ``root/nxd-conv-<layout>/pretrained_weight`` (AWS's Llama LoRA tutorial's flags)."""
    script = Path(harness.nxd_source()).parent / "examples" / "training" / "llama" / "convert_checkpoints.py"
    subprocess.run([str(Path(__file__).parent / "nxd_cpu" / "run"), sys.executable, str(script), "--tp_size", "8",
                    "--qkv_linear", "1", "--kv_size_multiplier", "4", "--convert_from_full_state",
                    "--config", str(root / "hf" / "config.json"), "--input_dir", str(root / "full.pt"),
                    "--output_dir", str(root / f"nxd-conv-{layout}" / "pretrained_weight"), "--hw_backend", layout],
                   check=True, capture_output=True, env={**os.environ, "NXD_LORA_TEST_PLATFORM": layout}, cwd=root)


def train_overrides(root: Path, layout: str, backend: str, out: Path, tp: int = 8) -> list[str]:
    return [f"model.checkpoint={root / f'tiny-tp{tp}-{layout}'}", f"model.tokenizer={root / 'tiny-hf'}", f"train.tp={tp}",
            "lora.lora_rank=8", "lora.lora_alpha=16", "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
            "data.seq_len=256", "data.val_fraction=0.1", "train.max_steps=3", "train.lr=0.01", "train.warmup_steps=1",
            "train.micro_batch_size=2", "train.log_every=1", "train.save_every=0", "train.save_modes=[adapter]",
            "train.loggers=[csv]", "model.dtype=float32", f"train.backend={backend}", f"train.output_dir={out}"]


# TP x DP on 8 ranks with 2 KV heads: trn2 at TP 4 (kv_size_multiplier 2, DP 2); trn1 at TP 2 (DP 4),
# since NxD's trn1 TP-4 groups are strided and its kv-shared groups are not (refused: see the test).
DATA_PARALLEL_TP = {"trn1": 2, "trn2": 4}
NXD_LORA_SAVES = {"shards": {"merge_sharded_lora": False},  # adapter_config.json to lora_save_dir
                  "gathered": {"merge_sharded_lora": True, "save_lora_config_adapter": True}}  # NxD's default merge
NO_QKV = ["o_proj", "gate_up_proj", "down_proj"]


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
    tiny_vocab = __import__("transformers").AutoConfig.from_pretrained(root / "tiny-hf").vocab_size
    tiny_ids = torch.randint(0, tiny_vocab, (2, 24), generator=gen)
    lora = dict(lora_rank=4, lora_alpha=8, target_modules=NXD_TARGETS)
    # NxD's own converter, as AWS's Llama tutorial runs it, for both platforms
    torch.save(state, root / "full.pt")
    for layout in PLATFORMS:
        run_nxd_converter(root, layout)
    main(["convert", str(root / "nxd-conv-trn2"), str(root / "repaired-trn2"), "--tp", "8", "--target", "trn2",
          "--config", str(root / "hf" / "config.json"), "--source-layout", NXD_CONVERTER_TRN2])
    results = {}
    for layout in PLATFORMS:
        for fuse in (False, True):
            convert_to_nxd(root / "hf", root / f"tp8-{layout}-{'fused' if fuse else 'split'}", 8, target=layout,
                           fuse_qkv=fuse, **QUIET)
        dp_tp = DATA_PARALLEL_TP[layout]
        for tp in (8, dp_tp):
            convert_to_nxd(root / "tiny-hf", root / f"tiny-tp{tp}-{layout}", tp, target=layout, **QUIET)
        fb_args = (EIGHT_HEADS_TWO_KV, 8, state, input_ids, labels, False, lora, hf_lora, layout)
        load = [(str(root / f"tp8-{layout}-split"), False), (str(root / f"tp8-{layout}-fused"), True),
                (str(root / f"nxd-conv-{layout}"), False)] + ([(str(root / "repaired-trn2"), False)] if layout == "trn2" else [])
        base = str(root / f"tp8-{layout}-split")
        saves = {str(root / f"nxd-lora-{layout}-{name}"): fields for name, fields in NXD_LORA_SAVES.items()}
        named_jobs = {
            **{name: ("nxd_loads_base", (ckpt, EIGHT_HEADS_TWO_KV, fuse, layout, input_ids))
               for name, (ckpt, fuse) in zip(["split", "fused", "nxd-conv", "repaired"], load)},
            "forward_backward": ("forward_backward", (*fb_args, "neuron", False)),
            "nxd_lora": ("nxd_lora_model_trains_and_saves", (base, EIGHT_HEADS_TWO_KV, layout, input_ids, NXD_TARGETS,
                                                             saves)),
            "nxd_lora_no_qkv": ("nxd_lora_model_trains_and_saves", (
                base, EIGHT_HEADS_TWO_KV, layout, input_ids, NO_QKV,
                {str(root / f"nxd-lora-{layout}-gathered-no-qkv"): {"merge_sharded_lora": True}})),
            "tp4_refusal": ("backend_setup_refusal", (4, layout, EIGHT_HEADS_TWO_KV)),
            "train": ("train_command", (train_overrides(root, layout, "neuron", root / f"run-{layout}-neuron"),)),
            "train_dp": ("train_command", (train_overrides(root, layout, "neuron", root / f"run-{layout}-neuron-dp",
                                                          dp_tp),)),
            "reads_ours": ("nxd_lora_model_reads_our_adapter", (
                str(root / f"tiny-tp8-{layout}"), str(root / f"run-{layout}-neuron" / "final" / "adapter"),
                tiny_ids)),
        }
        cpu_named = {"forward_backward": ("forward_backward", (*fb_args, "cpu", False)),
                     "train": ("train_command", (train_overrides(root, layout, "cpu", root / f"run-{layout}-cpu"),)),
                     "train_dp": ("train_command", (train_overrides(root, layout, "cpu", root / f"run-{layout}-cpu-dp",
                                                                    dp_tp),))}
        results[layout] = {
            where: [dict(zip(jobs, rank)) for rank in start_jobs(8, platform, list(jobs.values()))]
            for where, platform, jobs in (("nxd", layout, named_jobs), ("cpu", None, cpu_named))}
    return dict(root=root, results=results, base_logits=base_logits, ref_logits=ref_logits, ref_loss=ref_loss,
                input_ids=input_ids, tiny_ids=tiny_ids)


@pytest.mark.parametrize("layout", PLATFORMS)
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_nxds_load_checkpoint_reads_our_base_strictly_and_gives_transformers_logits(runs, layout, fused):
    """Our converted base, read by NxD's own ``load_checkpoint(strict=True)`` (no missing or
    unexpected key) into our model on NxD's layers on that layout's platform: transformers' logits."""
    for rank in runs["results"][layout]["nxd"]:
        loaded = rank["fused" if fused else "split"]
        torch.testing.assert_close(loaded["logits"], runs["base_logits"], atol=ATOL, rtol=0)
        assert any(k.endswith("qkv_proj.weight_qkv" if fused else "qkv_proj.weight_k") for k in loaded["keys"])


@pytest.mark.parametrize("layout", PLATFORMS)
def test_our_model_and_lora_on_nxds_layers_at_tp8_kvm4(runs, layout):
    """Logits and loss equal peft's; every LoRA gradient (K/V lora_B replicas included, summed by
    NxD's kv-shared groups) equals the cpu backend's at the same TP."""
    nxd = [rank["forward_backward"] for rank in runs["results"][layout]["nxd"]]
    cpu = [rank["forward_backward"] for rank in runs["results"][layout]["cpu"]]
    for rank in nxd:
        torch.testing.assert_close(rank["logits"], runs["ref_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(rank["loss"], runs["ref_loss"], atol=ATOL, rtol=0)
    config = LlamaConfig.from_dict(EIGHT_HEADS_TWO_KV)
    got = unshard_lora_state_dict([r["grads"] for r in nxd], config, layout)
    ref = unshard_lora_state_dict([r["grads"] for r in cpu], config, layout)
    assert got.keys() == ref.keys() and any("k_proj.lora_B" in k for k in got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=1e-4, msg=key)


def assert_same_training(runs, layout: str, job: str, suffix: str) -> None:
    """The neuron backend's run (``job``) and the cpu backend's: same losses, same exported adapter."""
    nxd, cpu = runs["results"][layout]["nxd"][0][job], runs["results"][layout]["cpu"][0][job]
    assert nxd["steps"] == cpu["steps"] == 3
    assert nxd["losses"] == pytest.approx(cpu["losses"], rel=1e-5)
    assert nxd["val"]["val/loss"] == pytest.approx(cpu["val"]["val/loss"], rel=1e-5)
    peft = Path("final") / "peft" / "adapter_model.safetensors"
    got = load_file(runs["root"] / f"run-{layout}-neuron{suffix}" / peft)
    ref = load_file(runs["root"] / f"run-{layout}-cpu{suffix}" / peft)
    assert got.keys() == ref.keys() and any("k_proj.lora_B" in k for k in got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any(ref[k].abs().max() > 0 for k in ref if "lora_B" in k)  # it trained


@pytest.mark.parametrize("layout", PLATFORMS)
def test_neuron_backend_trains_at_tp8_kvm4_to_the_cpu_backends_lora(runs, layout):
    """``nxd-lora train`` with ``train.backend=neuron`` on NxD's process groups, GQA layer and parallel
    cross entropy: the same losses and the same trained adapter (PEFT export) as ``train.backend=cpu``."""
    assert_same_training(runs, layout, "train", "")


@pytest.mark.parametrize("layout", PLATFORMS)
def test_neuron_backend_trains_with_data_parallelism_to_the_cpu_backends_lora(runs, layout):
    """8 ranks as TP x DP on NxD's own TP/DP groups (trn2: TP 4 x DP 2, kv_size_multiplier 2; trn1:
    TP 2 x DP 4): the cpu backend's losses and adapter."""
    assert_same_training(runs, layout, "train_dp", "-dp")


def test_nxds_trn1_tp4_kv_shared_groups_mix_heads_and_the_neuron_backend_refuses_them(runs):
    """NxD 0.17 on trn1 at TP 4 with data parallelism builds strided TP groups ([0, 2, 4, 6], [1, 3, 5, 7])
    but its kv-shared groups (``arrange_kv_groups``) as if they were contiguous, so its GQA layer would
    sum the K/V gradients of ranks holding different KV heads. The neuron backend asks NxD for both and
    refuses before any work; on trn2 the same TP 4 x DP 2 is accepted (and trains: test above)."""
    trn1 = runs["results"]["trn1"]["nxd"][0]["tp4_refusal"]
    assert "would sum K/V gradients over ranks [[0, 2], [1, 3], [4, 6], [5, 7]]" in trn1, trn1
    assert "its TP groups [[0, 2, 4, 6], [1, 3, 5, 7]]) are [[0, 4], [2, 6], [1, 5], [3, 7]]" in trn1, trn1
    assert all(rank["tp4_refusal"] == "" for rank in runs["results"]["trn2"]["nxd"])


def hf_logits(model_dir: Path, input_ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    """transformers' (and with ``adapter``, peft's) logits, in fp32."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("layout", PLATFORMS)
def test_nxds_own_lora_saves_export_to_peft_and_merged_models_with_nxds_logits(runs, layout, tmp_path, capsys):
    """What NxD's ``LoraModel`` (trained two steps on NxD's LoRA layers, TP 8 / kvm 4) saved with
    ``nxd.save_checkpoint`` and ``merge_sharded_lora=False`` exports as a PEFT adapter and a merged
    model that give NxD's logits in peft and transformers. NxD's own way back in (``LoraConfig(
    load_lora_from_ckpt=True)``) looks for the rank files without the ``model/`` folder its save
    writes, and its adapter_config.json goes to ``lora_save_dir``: ``--lora-config`` names it."""
    root, ids = runs["root"], runs["input_ids"]
    nxd = runs["results"][layout]["nxd"][0]["nxd_lora"]
    shards, base = root / f"nxd-lora-{layout}-shards", str(root / f"tp8-{layout}-split")
    assert f"{shards}/lora/dp_rank_00_tp_rank_00_pp_rank_00.pt is not found" in nxd["nxd_load_error"]
    assert (shards / "lora" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt").is_file()
    assert main(["export", str(shards), str(tmp_path / "peft"), "--base", base]) == 0
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == str(root / "hf")  # what our base was converted from
    torch.testing.assert_close(hf_logits(root / "hf", ids, tmp_path / "peft"), nxd["logits"], atol=ATOL, rtol=0)
    assert main(["export", str(shards / "lora"), str(tmp_path / "merged"), "--merged", "--base", base]) == 0
    torch.testing.assert_close(hf_logits(tmp_path / "merged", ids), nxd["logits"], atol=ATOL, rtol=0)
    assert not torch.allclose(runs["base_logits"], nxd["logits"], atol=1e-2)  # NxD's LoRA changed the model

    # the tag alone (adapter_config.json left in lora_save_dir), with --config instead of --base
    __import__("shutil").copytree(shards / "lora", tmp_path / "copied" / "lora")
    config = ["--config", str(root / "hf" / "config.json"), "--source-layout", layout]
    capsys.readouterr()
    assert main(["export", str(tmp_path / "copied"), str(tmp_path / "x"), *config]) == 2
    assert "pass --lora-config PATH/adapter_config.json" in capsys.readouterr().err
    other = "trn2" if layout == "trn1" else "trn1"
    assert main(["export", str(tmp_path / "copied"), str(tmp_path / "x"), *config[:3], other,
                 "--lora-config", str(shards / "adapter_config.json")]) == 2
    assert f"was it trained on {layout}? pass --source-layout {layout}" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "copied"), str(tmp_path / "peft2"), *config,
                 "--lora-config", str(shards / "adapter_config.json")]) == 2
    assert "no --base given, not converted from an HF model" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "copied"), str(tmp_path / "peft2"), *config, "--base-model",
                 str(root / "hf"), "--lora-config", str(shards / "adapter_config.json")]) == 0
    first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "peft2"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("layout", PLATFORMS)
def test_nxds_merge_sharded_lora_drops_query_rows_at_kvm4_and_export_refuses_it(runs, layout, tmp_path, capsys):
    """NxD's default ``merge_sharded_lora=True`` gathers LoRA weights into every rank file, but for the
    GQA layer keeps ``chunk(gathered, kvm)[0]``: at kvm 4, a quarter of ``lora_B.weight_q``'s rows. The
    export refuses it naming the tensor, its shape and the expected one. Without qkv_proj the gathered
    save is whole, and exports (split back into rank shards) to NxD's logits."""
    root, ids = runs["root"], runs["input_ids"]
    base = str(root / f"tp8-{layout}-split")
    gathered = root / f"nxd-lora-{layout}-gathered" / "lora" / "model"
    files = [torch.load(gathered / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt", weights_only=True) for r in range(8)]
    key = "model.layers.0.self_attn.qkv_proj.lora_B.weight_q"
    q_rows = EIGHT_HEADS_TWO_KV["hidden_size"]  # 8 heads x head_dim
    assert files[0][key].shape == (q_rows // 4, 4)  # the bug, in NxD's own save
    assert all(torch.equal(f[key], files[0][key]) for f in files[1:])
    capsys.readouterr()
    assert main(["export", str(gathered.parent.parent), str(tmp_path / "x"), "--base", base]) == 2
    err = capsys.readouterr().err
    assert f"{key} has shape ({q_rows // 4}, 4), expected ({q_rows}, 4)" in err and "merge_sharded_lora=False" in err
    assert not (tmp_path / "x").exists()

    no_qkv = root / f"nxd-lora-{layout}-gathered-no-qkv"
    nxd = runs["results"][layout]["nxd"][0]["nxd_lora_no_qkv"]["logits"]
    assert main(["export", str(no_qkv), str(tmp_path / "peft"), "--base", base]) == 0
    assert "gathered by merge_sharded_lora" in capsys.readouterr().out
    torch.testing.assert_close(hf_logits(root / "hf", ids, tmp_path / "peft"), nxd, atol=ATOL, rtol=0)
    assert main(["export", str(no_qkv), str(tmp_path / "merged"), "--merged", "--base", base]) == 0
    torch.testing.assert_close(hf_logits(tmp_path / "merged", ids), nxd, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", PLATFORMS)
def test_our_adapter_save_loads_into_nxds_lora_model_with_peft_logits(runs, layout):
    """The adapter-only save of ``train.backend=neuron`` (TP 8 / kvm 4) read into NxD's own ``LoraModel``
    (every adapter weight first set to NaN): no key left over or unfilled, and through NxD's LoRA layers
    the logits of peft on our PEFT export of the same run."""
    root = runs["root"]
    ref = hf_logits(root / "tiny-hf", runs["tiny_ids"], root / f"run-{layout}-neuron" / "final" / "peft")
    for rank in runs["results"][layout]["nxd"]:
        ours = rank["reads_ours"]
        assert ours["unexpected"] == [] and ours["lora_missing"] == []
        torch.testing.assert_close(ours["logits"], ref, atol=ATOL, rtol=0)


def test_nxds_gqa_layer_cannot_backpropagate_a_frozen_fused_qkv_and_train_refuses_it(tmp_path):
    """NxD 0.17's own GQA layer, weights frozen as under LoRA: split q/k/v backpropagates, fused
    ``weight_qkv`` fails (its backward reads the saved weight as a tuple). So ``train.backend=neuron``
    refuses a fused-qkv base before any work and says how to re-lay it out."""
    write_tiny_hf_model(tmp_path / "hf")
    convert_to_nxd(tmp_path / "hf", tmp_path / "fused", 1, fuse_qkv=True, **QUIET)
    recipe = [f"model.checkpoint={tmp_path / 'fused'}", f"model.tokenizer={tmp_path / 'hf'}", "train.tp=1",
              "train.backend=neuron"]
    split, fused, refusal, cpu_refusal = start_jobs(1, "trn1", [
        ("nxd_fused_qkv_backward", (False,)), ("nxd_fused_qkv_backward", (True,)),
        ("refusal_before_start", (recipe,)), ("refusal_before_start", ([*recipe, "train.backend=cpu"],))])[0]
    assert split == "ok"
    assert fused.startswith("TypeError") and "matmul" in fused, fused
    assert "cannot backpropagate through a frozen fused qkv weight" in refusal, refusal
    assert f"nxd-lora convert {tmp_path / 'fused'} NEW_CKPT --tp 1 --target trn1 --no-fuse-qkv" in refusal
    assert cpu_refusal == ""  # our own GQA layer trains a fused base


def test_nxds_converter_writes_our_trn1_layout_and_its_trn2_bug_is_detected_and_repaired(runs, capsys):
    """NxD's own converter (AWS's tutorial flags, TP 8 / kvm 4): its trn1 output is ours tensor for
    tensor and reads back to the HF weights. Its trn2 output has our (and NxD's runtime's) query order
    but trn1's K/V placement (bug: repeat instead of repeat_interleave), so on NxD's own trn2 runtime it
    gives wrong logits; ``convert``/``inspect`` name the bug and the one command that repairs it, whose
    output is our trn2 conversion and gives transformers' logits on that runtime."""
    root = runs["root"]

    def rank_files(directory):
        return [torch.load(directory / "pretrained_weight" / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt",
                           weights_only=True) for r in range(8)]

    for layout in PLATFORMS:
        nxd, ours = rank_files(root / f"nxd-conv-{layout}"), rank_files(root / f"tp8-{layout}-split")
        for rank, (theirs, mine) in enumerate(zip(nxd, ours)):
            assert theirs.keys() == mine.keys()
            differ = sorted(k for k in mine if not torch.equal(theirs[k], mine[k]))
            if layout == "trn1" or rank % 2 == rank // 4:  # the KV head this rank holds in both placements
                assert differ == [], (layout, rank, differ)
            else:
                assert differ and all(k.endswith(("weight_k", "weight_v")) for k in differ), (rank, differ)
    for rank in runs["results"]["trn1"]["nxd"]:
        torch.testing.assert_close(rank["nxd-conv"]["logits"], rank["split"]["logits"], atol=0, rtol=0)
    for rank in runs["results"]["trn2"]["nxd"]:
        assert not torch.allclose(rank["nxd-conv"]["logits"], runs["base_logits"], atol=1e-2)  # the bug, on NxD
        torch.testing.assert_close(rank["repaired"]["logits"], runs["base_logits"], atol=ATOL, rtol=0)
    for repaired, mine in zip(rank_files(root / "repaired-trn2"), rank_files(root / "tp8-trn2-split")):
        assert all(torch.equal(repaired[k], mine[k]) for k in mine)

    config = ["--config", str(root / "hf" / "config.json")]
    nxd_trn2 = str(root / "nxd-conv-trn2")
    capsys.readouterr()
    assert main(["inspect", nxd_trn2, *config]) == 2
    assert "pass --source-layout trn1 or trn2" in capsys.readouterr().err
    assert main(["inspect", nxd_trn2, *config, "--source-layout", "trn2"]) == 2
    err = capsys.readouterr().err
    assert "NxD 0.17's checkpoint_converter.py --hw_backend trn2" in err
    assert f"nxd-lora convert {nxd_trn2} FIXED --tp 8 --target trn2 --config CONFIG_JSON --source-layout " \
           f"{NXD_CONVERTER_TRN2}" in err
    assert main(["inspect", nxd_trn2, *config, "--source-layout", NXD_CONVERTER_TRN2]) == 0
    assert "kv_layout=trn2 (query heads) kv_placement=trn1 (K/V heads)" in capsys.readouterr().out
    assert main(["inspect", str(root / "nxd-conv-trn1"), *config, "--source-layout", "trn2"]) == 2
    assert main(["inspect", str(root / "nxd-conv-trn1")]) == 2  # no config: NxD records none
    assert "pass --config CONFIG_JSON" in capsys.readouterr().err
    # trn1: NxD's converter output reads back to the HF weights exactly
    main(["convert", str(root / "nxd-conv-trn1"), str(root / "back-to-hf"), *config, "--source-layout", "trn1"])
    back = load_file(root / "back-to-hf" / "model.safetensors") if (root / "back-to-hf" / "model.safetensors").exists() \
        else {k: v for f in (root / "back-to-hf").glob("*.safetensors") for k, v in load_file(f).items()}
    original = torch.load(root / "full.pt", weights_only=True)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    with pytest.raises(CheckpointError, match="--source-layout applies to an NxD checkpoint"):
        convert_to_nxd(root / "hf", root / "never", 8, source_layout="trn2", **QUIET)
