"""``nxd-lora train``: set up the backend, build the model and data, fit with Lightning, save, export."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy

from checkpoint_tools.atomic_io import load_tensors
from checkpoint_tools.diskspace import require_free_space
from checkpoint_tools.nxd_format import (
    BASE_TAG,
    check_manifest,
    complete_tags,
    manifest_config,
    rank_path,
    require_verified,
)
from checkpoint_tools.staging import sweep_stale
from checkpoint_tools.tp_layout import check_layout_matches
from nxd_lora.backends import get_backend
from nxd_lora.checkpointing import SAVE_MODES, planned_save_bytes
from nxd_lora.doctor import check_stack, neuron_platform, nxd_cpu_mode
from nxd_lora.lora.model import describe_trainable, load_lora_state_dict
from nxd_lora.model.builder import build_model
from nxd_lora.plan import check_job, device_of_platform
from nxd_lora.tokenizer import load_tokenizer
from nxd_lora.train.callbacks import (
    FinalEvaluation,
    FinalSaves,
    LossWatch,
    PeriodicCheckpoint,
    PeriodicValidation,
    TagWriter,
)
from nxd_lora.train.config import Recipe
from nxd_lora.train.data import StepBatches, build_rows
from nxd_lora.train.module import LoraModule


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _say(backend, message: str) -> None:
    if backend.rank == 0:
        print(f"[train] {message}", flush=True)


def newest_training_tag(root: Path) -> Path | None:
    """The newest complete checkpoint (``*/done``) that can be resumed from (has user_content.pt)."""
    tags = sorted((p for p in complete_tags(root) if (p / "user_content.pt").is_file()),
                  key=lambda p: (p / "done").stat().st_mtime)
    return tags[-1] if tags else None


def load_verified(tag_dir: Path, tp_rank: int, manifest: dict) -> dict[str, torch.Tensor]:
    """This rank's tensors of a checkpoint, after checking the file's sha256 against the manifest."""
    path = rank_path(tag_dir, tp_rank)
    require_verified(tag_dir, manifest, [str(path.relative_to(tag_dir))])
    return load_tensors(path)


PRECOMPILE_STEPS = 3  # under neuron_parallel_compile: enough to trace warm-up and steady-state graphs


def precompiling() -> bool:
    """True under ``neuron_parallel_compile``, which runs the job only to collect its graphs
    (every tensor it computes is zeros): a few steps, no checkpoints, no exports."""
    return os.environ.get("NEURON_EXTRACT_GRAPHS_ONLY", "") not in ("", "0")


# NxD 0.17 (modules/qkv_linear_utils.py, _qkvlinear_autograd_base_setup_bwd) takes the frozen fused
# weight as ``ctx.saved_tensors[:1]``, a tuple, and its backward then fails in ``matmul``: a LoRA run
# over a fused-qkv base cannot backpropagate through NxD's GQA layer (tests/test_nxd_oracle.py shows it
# with NxD's own layer). Split q/k/v weights take the path that works.
NXD_FUSED_QKV_BACKWARD = (
    "{base_tag}: the checkpoint has a fused qkv_proj.weight_qkv, and NxD 0.17's GQAQKVColumnParallelLinear "
    "cannot backpropagate through a frozen fused qkv weight (its backward reads the saved weight as a tuple: "
    "TypeError in matmul), so LoRA training on backend 'neuron' would fail at its first step. Re-lay it out with "
    "split q/k/v weights: nxd-lora convert {root} NEW_CKPT --tp {tp} --target {layout} --no-fuse-qkv")


def check_before_start(recipe: Recipe) -> tuple[Path, dict]:
    """Everything that can be refused before a process group or a model exists: save modes, the
    software stack, the base checkpoint's manifest, the architecture, TP x DP, the memory plan.
    Returns the base tag directory and its manifest."""
    cfg = recipe.train
    check_save_modes(cfg.save_modes)
    if cfg.autocast not in ("auto", *AUTOCAST):
        raise ValueError(f"train.autocast {cfg.autocast!r} unknown; choose from {['auto', *AUTOCAST]}")
    check_stack(cfg.backend, warn=lambda message: print(message, file=sys.stderr) if _local_rank() == 0 else None)
    if not recipe.model.checkpoint:
        raise ValueError("model.checkpoint is required (a directory written by 'nxd-lora convert')")
    base_tag = Path(recipe.model.checkpoint) / BASE_TAG
    manifest = check_manifest(base_tag, tp=cfg.tp)
    if recipe.model.kv_layout:
        check_layout_matches(manifest["kv_layout"], recipe.model.kv_layout, cfg.tp, manifest["kv_size_multiplier"],
                             f"{base_tag} (the recipe's model.kv_layout is {recipe.model.kv_layout})")
    if cfg.backend == "neuron" and manifest["fuse_qkv"]:
        raise ValueError(NXD_FUSED_QKV_BACKWARD.format(base_tag=base_tag, root=recipe.model.checkpoint, tp=cfg.tp,
                                                       layout=manifest["kv_layout"]))
    check_job(recipe, manifest_config(manifest, base_tag), int(os.environ.get("WORLD_SIZE", "1")), str(base_tag),
              device=trainium_device(cfg.backend))
    return base_tag, manifest


def trainium_device(backend: str) -> str | None:
    """The plan's device for this host on a Trainium backend: its platform, at the LNC the runtime is
    told to use (``NEURON_LOGICAL_NC_CONFIG``, trn2); None on other backends."""
    if backend not in ("neuron", "torchneuron") or (backend == "neuron" and nxd_cpu_mode()):
        return None  # no NeuronCore to plan for (NxD's CPU mode runs on host memory)
    lnc = os.environ.get("NEURON_LOGICAL_NC_CONFIG", "")
    return device_of_platform(neuron_platform(), int(lnc) if lnc.isdigit() else None)


def train(recipe: Recipe) -> dict:
    """Run one training job on this rank (under torchrun, every rank calls it). Returns a summary."""
    cfg = recipe.train
    base_tag, manifest = check_before_start(recipe)
    precompile = precompiling()
    backend = get_backend(cfg.backend)
    compiler = compile_backend(cfg, backend)  # refused before any process group exists
    backend.setup(cfg.tp, manifest["kv_size_multiplier"], manifest["kv_layout"])

    def say(message: str) -> None:
        _say(backend, message)

    try:
        L.seed_everything(cfg.seed, workers=False, verbose=False)
        config = manifest_config(manifest, base_tag)
        tok, rows = load_data(recipe, config)
        say(f"data: {json.dumps(rows.report)}")
        model = load_model(recipe, backend, base_tag, manifest)
        say(f"backend={backend.name} world={backend.world_size} tp={cfg.tp} "
            f"kv_size_multiplier={model.kv_size_multiplier}; {describe_trainable(model)}")
        prepare_output(recipe, backend, model, precompile, say)
        start_step, resume_states = resume(recipe, backend, model, manifest, say)

        writer = TagWriter(backend, recipe, say)
        watch = LossWatch(cfg.log_every, cfg.save_every)
        final = FinalEvaluation(rows, recipe, tok, backend.device, rouge=cfg.rouge and not precompile)
        saves = FinalSaves(writer, cfg.save_modes)
        writes = not precompile  # under neuron_parallel_compile every tensor is zeros: nothing is saved
        callbacks = [watch, *([PeriodicCheckpoint(writer, cfg.save_every)] if writes else []),
                     PeriodicValidation(rows.val, cfg.val_every, backend.device), final, *([saves] if writes else [])]
        steps = max(cfg.max_steps - start_step, 0)
        if precompile:
            steps = min(steps, PRECOMPILE_STEPS)
            say(f"neuron_parallel_compile: collecting graphs over {steps} steps; nothing is saved")

        module = LoraModule(model, cfg, start_step, resume_states, sync=backend.step_end,
                            compile_backend=compiler)
        parallel_state = model.parallel_state
        batches = StepBatches(rows.train, cfg.micro_batch_size * cfg.grad_accum, parallel_state.get_data_parallel_size(),
                              parallel_state.get_data_parallel_rank(), cfg.seed, start_step, cfg.max_steps)
        trainer(recipe, backend, steps, callbacks).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))

        if not precompile:
            say(f"done at step {module.step_count}; {json.dumps(final.metrics)}; saved {saves.saved}")
        ends = module.step_ends
        return {"losses": watch.history, "val": final.metrics, "saved": saves.saved, "steps": module.step_count,
                "step_seconds": [b - a for a, b in zip(ends, ends[1:])], "data": rows.report,
                "step_stats": getattr(backend, "step_stats", [])}
    finally:
        backend.teardown()


def load_data(recipe: Recipe, config) -> tuple:
    """(tokenizer, rows): the recipe's data rendered, packed and split."""
    tok = load_tokenizer(recipe.model.tokenizer or recipe.model.checkpoint)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    return tok, build_rows(recipe.data, tok, recipe.train.seed)


def load_model(recipe: Recipe, backend, base_tag: Path, manifest: dict):
    """This rank's model: the base rank file (sha256-checked) with LoRA applied."""
    base = load_verified(base_tag, backend.tp_rank, manifest)
    model = build_model(manifest_config(manifest, base_tag), backend, base, recipe.lora, fuse_qkv=manifest["fuse_qkv"],
                        dtype=getattr(torch, recipe.model.dtype), seed=recipe.train.seed)
    model.set_activation_checkpointing(recipe.train.activation_checkpointing)
    return model


def prepare_output(recipe: Recipe, backend, model, precompile: bool, say) -> None:
    """Remove crash litter of earlier runs; refuse a run whose checkpoints and saves cannot fit the disk."""
    cfg, out = recipe.train, Path(recipe.train.output_dir)
    if backend.rank == 0:
        for directory in (out / "checkpoints", out / "final"):
            sweep_stale(directory, say)
    if not precompile:
        periodic = cfg.max_steps // cfg.save_every if cfg.save_every else 0
        require_free_space(out, planned_save_bytes(model, cfg.tp, cfg.save_modes, periodic),
                           f"this run's {periodic} checkpoint(s) and final saves {cfg.save_modes}")


def resume(recipe: Recipe, backend, model, manifest: dict, say) -> tuple[int, tuple[dict, dict] | None]:
    """(start step, (optimizer, scheduler) states) from ``train.resume``: 'auto' (the newest complete
    resumable tag under ``<output_dir>/checkpoints``), a tag directory, or none. Loads the adapter
    into ``model`` and restores the RNG."""
    cfg = recipe.train
    if cfg.resume == "auto":
        tag = newest_training_tag(Path(cfg.output_dir) / "checkpoints")
    else:
        tag = Path(cfg.resume) if cfg.resume not in ("none", "") else None
    if tag is None:
        return 0, None
    resumed = check_manifest(tag, tp=cfg.tp, kind="lora", kv_layout=manifest["kv_layout"])
    if resumed["lora"] != json.loads(json.dumps(recipe.to_dict()["lora"])):
        raise ValueError(f"{tag}: LoRA settings differ from this recipe's: {resumed['lora']}")
    load_lora_state_dict(model, load_verified(tag, backend.tp_rank, resumed), str(tag))
    optim = Path("optim") / rank_path(tag, backend.tp_rank).name
    if str(optim) in resumed["files"]:  # listed since the manifest covers optimizer files
        require_verified(tag, resumed, [str(optim)])
    user = load_tensors(tag / "user_content.pt")
    torch.set_rng_state(user["torch_rng"])
    say(f"resumed from {tag} at step {int(user['step'])}")
    return int(user["step"]), (load_tensors(tag / optim), load_tensors(tag / "scheduler.pt"))


def trainer(recipe: Recipe, backend, steps: int, callbacks: list) -> L.Trainer:
    """Lightning's loop on this rank's device, with this run's loggers (rank 0) and callbacks."""
    cfg, out = recipe.train, Path(recipe.train.output_dir)
    loggers = []
    if backend.rank == 0:
        loggers += [CSVLogger(out, name="logs")] if "csv" in cfg.loggers else []
        loggers += [TensorBoardLogger(out, name="tensorboard")] if "tensorboard" in cfg.loggers else []
    accelerator = {"cpu": "cpu", "cuda": "gpu"}.get(backend.device.type) or _AnyDeviceAccelerator()
    dtype = autocast_dtype(cfg, backend)
    precision = [MixedPrecision("bf16-mixed", device=backend.device.type)] if dtype is not None else []
    return L.Trainer(
        accelerator=accelerator, devices=1, strategy=_StayOnDeviceStrategy(backend.device), max_steps=steps,
        logger=loggers or False, callbacks=callbacks, plugins=precision,
        enable_progress_bar=backend.rank == 0 and os.environ.get("NXD_LORA_NO_BAR") != "1",
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=max(1, cfg.log_every),
    )


class _StayOnDeviceStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy, except that ``teardown`` leaves the model and the
    optimizer state on the device: validation, ROUGE and the final saves run there after
    ``fit`` (Lightning would move everything to the host, at the cost of a 70B model's weights)."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


class _AnyDeviceAccelerator(CPUAccelerator):
    """Lightning's CPU accelerator without its device-type check, for torch-xla on the CPU."""

    def setup_device(self, device: torch.device) -> None:
        pass


AUTOCAST = {"none": None, "bfloat16": torch.bfloat16}


def autocast_dtype(cfg, backend) -> torch.dtype | None:
    """``train.autocast`` for this backend: ``auto`` is the backend's default (bf16 on torchneuron)."""
    return backend.autocast_dtype if cfg.autocast == "auto" else AUTOCAST[cfg.autocast]


def compile_backend(cfg, backend) -> str | None:
    """torch.compile's backend when ``train.compile`` is on; refused where the backend compiles graphs itself."""
    if not cfg.compile:
        return None
    if backend.compile_backend is None:
        raise ValueError(f"train.compile: backend {backend.name!r} runs XLA, which compiles each step's graph "
                         "already; set train.compile=false")
    return backend.compile_backend


def check_save_modes(modes: list[str]) -> None:
    bad = [m for m in modes if m not in SAVE_MODES]
    if bad:
        raise ValueError(f"train.save_modes {bad} unknown; choose from {list(SAVE_MODES)}")
