"""What a training run does around its steps, as Lightning callbacks.

The LightningModule (``module.py``) only steps. Everything that reads results back or writes
files is here, in the hooks Lightning calls in list order: after each step, ``LossWatch``
reads the loss (only at logging and saving steps, so lazy devices see no other host
transfer), stops on NaN/inf before that step's checkpoint can be written, and logs;
``PeriodicCheckpoint`` saves a resumable tag; ``PeriodicValidation`` evaluates. At the end of
``fit`` (``on_fit_end``, which Lightning calls even when a resumed run has no step left),
``FinalEvaluation`` computes validation metrics and ROUGE and ``FinalSaves`` writes the save
modes and the PEFT export.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from checkpoint_tools.export import export_peft
from checkpoint_tools.source_base import CheckpointError
from nxd_lora.backends.base import Backend
from nxd_lora.checkpointing import save_lora_checkpoint
from nxd_lora.train.config import Recipe
from nxd_lora.train.module import LoraModule, NonFiniteLoss


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


class TagWriter:
    """Writes this run's NxD tags: resumable ones under ``<out>/checkpoints``, save modes under ``<out>/final``."""

    def __init__(self, backend: Backend, recipe: Recipe, say: Callable[[str], None]):
        self.backend, self.recipe, self.say = backend, recipe, say
        self.out = Path(recipe.train.output_dir)

    def save(self, module: LoraModule, tag: str, mode: str, resumable: bool) -> Path:
        optimizer = module.optimizers().optimizer if resumable else None
        scheduler = module.lr_schedulers() if resumable else None
        return save_lora_checkpoint(
            module.model, self.backend, self.out / ("checkpoints" if resumable else "final"), tag, mode,
            self.recipe.lora, extra={"recipe": self.recipe.to_dict()},
            optimizer=optimizer.state_dict() if optimizer else None,
            scheduler=scheduler.state_dict() if scheduler else None,
            user_content={"step": module.step_count, "torch_rng": torch.get_rng_state()} if resumable else None,
            log=self.say,
        )


class LossWatch(L.Callback):
    """Reads the step's loss at logging and saving steps; stops on a non-finite one; logs metrics."""

    def __init__(self, log_every: int, save_every: int):
        self.log_every, self.save_every = max(1, log_every), save_every
        self.history: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: LoraModule, outputs, batch, batch_idx: int) -> None:
        step = module.step_count
        log_now = step % self.log_every == 0
        if not (log_now or (self.save_every and step % self.save_every == 0)):
            return
        value = outputs["mean_loss"].item()
        if not math.isfinite(value):  # raised before this step's save: the last good checkpoint stays
            raise NonFiniteLoss(f"loss is {value} at step {step}; stopping (last good checkpoint kept)")
        self.history.append(value)
        if log_now:
            metrics = {"train/loss": value, "train/grad_norm": outputs["grad_norm"].item(),
                       "train/tokens": outputs["tokens"].item(), "lr": outputs["lr"]}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            if outputs["grad_norm"].device.type != "xla":
                # Lightning keeps logged values as device tensors and reads them back at every later
                # step; on a lazy device that is a host transfer per metric per step, so the
                # progress bar only shows them on eager devices.
                module.log_dict(metrics, prog_bar=True, logger=False, on_step=True)


class PeriodicCheckpoint(L.Callback):
    """A resumable ``step_N`` tag (adapter, optimizer, scheduler, step and RNG) every ``every`` steps."""

    def __init__(self, writer: TagWriter, every: int):
        self.writer, self.every = writer, every

    def on_train_batch_end(self, trainer: L.Trainer, module: LoraModule, outputs, batch, batch_idx: int) -> None:
        if self.every and module.step_count % self.every == 0:
            self.writer.save(module, f"step_{module.step_count}", "adapter", resumable=True)


class PeriodicValidation(L.Callback):
    def __init__(self, rows: list[dict[str, torch.Tensor]], every: int, device):
        self.rows, self.every, self.device = rows, every, device

    def on_train_batch_end(self, trainer: L.Trainer, module: LoraModule, outputs, batch, batch_idx: int) -> None:
        if self.every and module.step_count % self.every == 0:
            with trainer.precision_plugin.forward_context():  # the training step's autocast, if any
                metrics = evaluate(module.model, self.rows, self.device)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=module.step_count)


class FinalEvaluation(L.Callback):
    """Validation loss/perplexity (and ROUGE when asked) of the trained model, logged and kept in ``metrics``."""

    def __init__(self, rows, recipe: Recipe, tokenizer, device, rouge: bool):
        self.rows, self.recipe, self.tokenizer, self.device, self.rouge = rows, recipe, tokenizer, device, rouge
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: L.Trainer, module: LoraModule) -> None:
        with trainer.precision_plugin.forward_context():  # the training step's autocast, if any
            self.metrics = evaluate(module.model, self.rows.val, self.device)
            if self.rouge and self.rows.val_examples:
                from nxd_lora.train.rouge import rouge_on_examples

                self.metrics.update(rouge_on_examples(module.model, self.rows.val_examples, self.tokenizer,
                                                      self.device, self.recipe.train.rouge_max_new_tokens))
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=module.step_count)
            logger.save()


class FinalSaves(L.Callback):
    """One tag per save mode under ``final/``, then (rank 0) a PEFT export of the adapter."""

    def __init__(self, writer: TagWriter, modes: list[str]):
        self.writer, self.modes = writer, modes
        self.saved: dict[str, str] = {}

    def on_fit_end(self, trainer: L.Trainer, module: LoraModule) -> None:
        writer = self.writer
        self.saved = {mode: str(writer.save(module, mode.replace("+", "_"), mode, resumable=False))
                      for mode in self.modes}
        peft_mode = next((m for m in ("adapter", "base+adapter") if m in self.saved), None)
        if peft_mode and writer.backend.rank == 0:  # the ecosystem copy: loads in PEFT, transformers, vLLM
            peft_dir = writer.out / "final" / "peft"
            try:
                export_peft(self.saved[peft_mode], peft_dir, overwrite=True, log=writer.say)
                self.saved["peft"] = str(peft_dir)
            except CheckpointError as err:  # the training and its checkpoints are complete; only this copy is not
                writer.say(f"final/peft not written: {err}; export it with: nxd-lora export "
                           f"{self.saved[peft_mode]} PEFT_DIR --base-model HUB_ID_OR_HF_DIR")
