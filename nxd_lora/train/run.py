"""``nxd-lora train``: set up the backend, build the model and data, fit with Lightning, save, export."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

from checkpoint_tools.atomic_io import load_tensors
from checkpoint_tools.export import export_peft
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
from nxd_lora.checkpointing import SAVE_MODES, planned_save_bytes, save_lora_checkpoint
from nxd_lora.doctor import check_stack, neuron_platform
from nxd_lora.lora.model import describe_trainable, load_lora_state_dict
from nxd_lora.model.builder import build_model
from nxd_lora.plan import check_job
from nxd_lora.tokenizer import load_tokenizer
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


@torch.no_grad()
def evaluate(model, rows: list[dict[str, torch.Tensor]], device) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``rows`` (one row at a time)."""
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for row in rows:
        batch = {k: v[None].to(device) for k, v in row.items()}
        _, loss = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        document_ids=batch["document_ids"], reduction="sum", return_logits=False)
        total += loss.item()
        tokens += int((row["labels"][1:] != -100).sum())
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"val/loss": mean, "val/perplexity": math.exp(min(mean, 50.0))}


PRECOMPILE_STEPS = 3  # under neuron_parallel_compile: enough to trace warm-up and steady-state graphs


def precompiling() -> bool:
    """True under ``neuron_parallel_compile``, which runs the job only to collect its graphs
    (every tensor it computes is zeros): a few steps, no checkpoints, no exports."""
    return os.environ.get("NEURON_EXTRACT_GRAPHS_ONLY", "") not in ("", "0")


def check_before_start(recipe: Recipe) -> tuple[Path, dict]:
    """Everything that can be refused before a process group or a model exists: save modes, the
    software stack, the base checkpoint's manifest, the architecture, TP x DP, the memory plan.
    Returns the base tag directory and its manifest."""
    cfg = recipe.train
    check_save_modes(cfg.save_modes)
    check_stack(cfg.backend, warn=lambda message: print(message, file=sys.stderr) if _local_rank() == 0 else None)
    if not recipe.model.checkpoint:
        raise ValueError("model.checkpoint is required (a directory written by 'nxd-lora convert')")
    base_tag = Path(recipe.model.checkpoint) / BASE_TAG
    manifest = check_manifest(base_tag, tp=cfg.tp)
    if recipe.model.kv_layout:
        check_layout_matches(manifest["kv_layout"], recipe.model.kv_layout, cfg.tp, manifest["kv_size_multiplier"],
                             f"{base_tag} (the recipe's model.kv_layout is {recipe.model.kv_layout})")
    check_job(recipe, manifest_config(manifest, base_tag), int(os.environ.get("WORLD_SIZE", "1")), str(base_tag),
              device=neuron_platform() if cfg.backend == "neuron" else None)
    return base_tag, manifest


def train(recipe: Recipe) -> dict:
    """Run one training job on this rank (under torchrun, every rank calls it). Returns a summary."""
    cfg = recipe.train
    base_tag, manifest = check_before_start(recipe)
    config = manifest_config(manifest, base_tag)
    out = Path(cfg.output_dir)
    precompile = precompiling()
    backend = get_backend(cfg.backend)
    backend.setup(cfg.tp, manifest["kv_size_multiplier"], manifest["kv_layout"])
    try:
        L.seed_everything(cfg.seed, workers=False, verbose=False)
        tok = load_tokenizer(recipe.model.tokenizer or recipe.model.checkpoint)
        if tok.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
        rows = build_rows(recipe.data, tok, cfg.seed)
        _say(backend, f"data: {json.dumps(rows.report)}")
        dtype = getattr(torch, recipe.model.dtype)
        base = load_verified(base_tag, backend.tp_rank, manifest)
        model = build_model(config, backend, base, recipe.lora, fuse_qkv=manifest["fuse_qkv"], dtype=dtype,
                            seed=cfg.seed)
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        del base
        _say(backend, f"backend={backend.name} world={backend.world_size} tp={cfg.tp} "
                      f"kv_size_multiplier={model.kv_size_multiplier}; {describe_trainable(model)}")

        checkpoints = out / "checkpoints"
        if backend.rank == 0:
            for directory in (checkpoints, out / "final"):
                sweep_stale(directory, lambda message: _say(backend, message))
        if not precompile:
            periodic = cfg.max_steps // cfg.save_every if cfg.save_every else 0
            require_free_space(out, planned_save_bytes(model, cfg.tp, cfg.save_modes, periodic),
                               f"this run's {periodic} checkpoint(s) and final saves {cfg.save_modes}")
        start_step, resume_tag = 0, None
        if cfg.resume == "auto":
            resume_tag = newest_training_tag(checkpoints)
        elif cfg.resume not in ("none", ""):
            resume_tag = Path(cfg.resume)
        optimizer_state = scheduler_state = None
        if resume_tag is not None:
            resumed = check_manifest(resume_tag, tp=cfg.tp, kind="lora", kv_layout=manifest["kv_layout"])
            if resumed["lora"] != json.loads(json.dumps(recipe.to_dict()["lora"])):
                raise ValueError(f"{resume_tag}: LoRA settings differ from this recipe's: {resumed['lora']}")
            load_lora_state_dict(model, load_verified(resume_tag, backend.tp_rank, resumed), str(resume_tag))
            optim = Path("optim") / rank_path(resume_tag, backend.tp_rank).name
            if str(optim) in resumed["files"]:  # listed since the manifest covers optimizer files
                require_verified(resume_tag, resumed, [str(optim)])
            optimizer_state = load_tensors(resume_tag / optim)
            scheduler_state = load_tensors(resume_tag / "scheduler.pt")
            user = load_tensors(resume_tag / "user_content.pt")
            start_step = int(user["step"])
            torch.set_rng_state(user["torch_rng"])
            _say(backend, f"resumed from {resume_tag} at step {start_step}")

        def save(module: LoraModule, tag: str, mode: str, resumable: bool) -> Path:
            optimizer = module.optimizers().optimizer if resumable else None
            scheduler = module.lr_schedulers() if resumable else None
            root = checkpoints if resumable else out / "final"
            return save_lora_checkpoint(
                module.model, backend, root, tag, mode, recipe.lora,
                extra={"recipe": recipe.to_dict()},
                optimizer=optimizer.state_dict() if optimizer else None,
                scheduler=scheduler.state_dict() if scheduler else None,
                user_content={"step": module.step_count, "torch_rng": torch.get_rng_state()} if resumable else None,
                log=lambda message: _say(backend, message),
            )

        def on_step_end(module: LoraModule) -> None:
            if cfg.save_every and module.step_count % cfg.save_every == 0 and not precompile:
                save(module, f"step_{module.step_count}", "adapter", resumable=True)
            if cfg.val_every and module.step_count % cfg.val_every == 0:
                metrics = evaluate(module.model, rows.val, backend.device)
                for logger in module.loggers:
                    logger.log_metrics(metrics, step=module.step_count)

        module = LoraModule(model, cfg, start_step, on_step_end,
                            (optimizer_state, scheduler_state) if optimizer_state is not None else None,
                            sync=backend.step_end)
        loggers = []
        if backend.rank == 0:
            loggers += [CSVLogger(out, name="logs")] if "csv" in cfg.loggers else []
            loggers += [TensorBoardLogger(out, name="tensorboard")] if "tensorboard" in cfg.loggers else []
        parallel_state = model.parallel_state
        batches = StepBatches(rows.train, cfg.micro_batch_size * cfg.grad_accum,
                              parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank(),
                              cfg.seed, start_step, cfg.max_steps)
        steps_this_run = max(cfg.max_steps - start_step, 0)
        if precompile:
            steps_this_run = min(steps_this_run, PRECOMPILE_STEPS)
            _say(backend, f"neuron_parallel_compile: collecting graphs over {steps_this_run} steps; nothing is saved")
        accelerator = {"cpu": "cpu", "cuda": "gpu"}.get(backend.device.type) or _AnyDeviceAccelerator()
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, strategy=_StayOnDeviceStrategy(backend.device),
            max_steps=steps_this_run,
            logger=loggers or False, enable_progress_bar=backend.rank == 0 and os.environ.get("NXD_LORA_NO_BAR") != "1",
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            log_every_n_steps=max(1, cfg.log_every),
        )
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
        metrics = evaluate(model, rows.val, backend.device)

        def summary(saved: dict) -> dict:
            ends = module.step_ends
            return {"losses": module.history, "val": metrics, "saved": saved, "steps": module.step_count,
                    "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
                    "data": rows.report, "step_stats": getattr(backend, "step_stats", [])}

        if precompile:
            return summary({})
        if cfg.rouge and rows.val_examples:
            from nxd_lora.train.rouge import rouge_on_examples

            metrics.update(rouge_on_examples(model, rows.val_examples, tok, backend.device, cfg.rouge_max_new_tokens))
        for logger in loggers:
            logger.log_metrics(metrics, step=module.step_count)
            logger.save()
        saved = {mode: str(save(module, mode.replace("+", "_"), mode, resumable=False)) for mode in cfg.save_modes}
        peft_mode = next((m for m in ("adapter", "base+adapter") if m in saved), None)
        if peft_mode and backend.rank == 0:  # the ecosystem copy: loads in PEFT, transformers, vLLM
            export_peft(saved[peft_mode], out / "final" / "peft", base_model=recipe.model.checkpoint, overwrite=True,
                        log=lambda message: _say(backend, message))
            saved["peft"] = str(out / "final" / "peft")
        _say(backend, f"done at step {module.step_count}; {json.dumps(metrics)}; saved {saved}")
        return summary(saved)
    finally:
        backend.teardown()


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


def check_save_modes(modes: list[str]) -> None:
    bad = [m for m in modes if m not in SAVE_MODES]
    if bad:
        raise ValueError(f"train.save_modes {bad} unknown; choose from {list(SAVE_MODES)}")
