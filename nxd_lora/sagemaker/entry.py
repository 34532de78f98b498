"""What each rank runs inside the SageMaker training container (uploaded as ``sagemaker_entry.py``).

The container's ``torch_distributed`` launcher starts one process per NeuronCore with the job's
hyperparameters as ``--config <recipe> --overrides <json list>``. This maps SageMaker's
directories onto the recipe and runs ``nxd-lora train``:

* ``/opt/ml/input/data/checkpoint`` (channel): the converted base -> ``model.checkpoint``
* ``/opt/ml/input/data/tokenizer`` (channel) -> ``model.tokenizer``
* ``/opt/ml/input/data/train`` (channel, optional) -> ``data.train_files`` (every data file in it)
* ``/opt/ml/checkpoints`` (synced to S3) -> ``train.output_dir``, with ``train.resume=auto``, so a
  restarted spot job continues from its newest complete checkpoint;
* after training, rank 0 copies ``final/`` (the save modes and the PEFT export) to
  ``/opt/ml/model``, which SageMaker uploads as the job's model artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".csv")
CHECKPOINTS = "/opt/ml/checkpoints"  # synced to the job's CheckpointConfig S3 URI


def channel(name: str) -> Path | None:
    path = os.environ.get(f"SM_CHANNEL_{name.upper()}")
    return Path(path) if path else None


def train_arguments(config: str, overrides: list[str]) -> list[str]:
    """``nxd-lora train`` arguments: the recipe, SageMaker's paths, then the user's overrides."""
    checkpoint, tokenizer, data = channel("checkpoint"), channel("tokenizer"), channel("train")
    if checkpoint is None or tokenizer is None:
        raise SystemExit("sagemaker_entry: the job needs the 'checkpoint' and 'tokenizer' input channels")
    paths = [f"model.checkpoint={checkpoint}", f"model.tokenizer={tokenizer}", f"train.output_dir={CHECKPOINTS}",
             "train.resume=auto", "train.backend=neuron"]
    if data is not None:
        files = sorted(str(p) for p in data.rglob("*") if p.suffix in DATA_SUFFIXES)
        if not files:
            raise SystemExit(f"sagemaker_entry: channel 'train' ({data}) has no {'/'.join(DATA_SUFFIXES)} files")
        paths.append(f"data.train_files=[{','.join(files)}]")
    return ["train", "--config", config, *paths, *overrides]  # later overrides win


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nxd-lora inside a SageMaker training job")
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", default="[]", help="JSON list of section.key=value")
    args, _ = parser.parse_known_args(argv)
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))  # the uploaded source: nxd_lora/ and checkpoint_tools/ beside this file
    from nxd_lora.cli import main as cli_main

    arguments = train_arguments(str(here / args.config), json.loads(args.overrides))
    code = cli_main(arguments)
    model_dir = os.environ.get("SM_MODEL_DIR")
    output = Path([a for a in arguments if a.startswith("train.output_dir=")][-1].split("=", 1)[1])
    if code == 0 and model_dir and int(os.environ.get("RANK", "0")) == 0 and (output / "final").is_dir():
        shutil.copytree(output / "final", Path(model_dir) / "final", dirs_exist_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
