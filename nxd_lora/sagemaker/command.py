"""``nxd-lora sagemaker submit|logs`` (also ``python launch/sagemaker.py ...``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sagemaker_command", required=True)
    submit = sub.add_parser("submit", help="check the inputs, upload the source and create the training job")
    submit.add_argument("--config", required=True, help="YAML recipe (configs/*trn1*.yaml)")
    submit.add_argument("--role", required=True, help="SageMaker execution role ARN")
    submit.add_argument("--checkpoint", required=True, help="s3:// prefix of a converted checkpoint (nxd-lora convert)")
    submit.add_argument("--tokenizer", required=True, help="s3:// prefix holding tokenizer.json or tokenizer.model")
    submit.add_argument("--output", required=True, help="s3:// prefix for the source, checkpoints and the model")
    submit.add_argument("--data", default="", help="s3:// prefix of JSONL/JSON/CSV files (default: the recipe's data)")
    submit.add_argument("--region", help="AWS region (default: the session's)")
    submit.add_argument("--job-name", help="default: nxd-lora-<recipe>-<UTC time>")
    submit.add_argument("--instance-type", default="ml.trn1.32xlarge")
    submit.add_argument("--instance-count", type=int, default=1)
    submit.add_argument("--volume-gb", type=int, default=512)
    submit.add_argument("--max-run-hours", type=float, default=24.0)
    submit.add_argument("--spot", action="store_true", help="managed spot training (resumes from checkpoints)")
    submit.add_argument("--max-wait-hours", type=float, default=0.0, help="spot: default twice --max-run-hours")
    submit.add_argument("--image", default="", help="training image URI (default: the Neuron SDK 2.28 PyTorch DLC)")
    submit.add_argument("--compile-cache", default="", help="s3:// Neuron compile cache (default <output>/neuron-compile-cache)")
    submit.add_argument("--precompile", action="store_true",
                        help="run under neuron_parallel_compile: fills the compile cache, trains nothing")
    submit.add_argument("--no-follow", action="store_true", help="return once the job is created")
    submit.add_argument("overrides", nargs="*", help="recipe overrides, section.key=value")
    logs = sub.add_parser("logs", help="follow a job's status and logs until it ends")
    logs.add_argument("job_name")
    logs.add_argument("--region")


def default_job_name(recipe: str) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in Path(recipe).stem).strip("-")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"nxd-lora-{stem}"[: 63 - len(stamp) - 1].rstrip("-") + f"-{stamp}"


def _region(region: str | None) -> str:
    if region:
        return region
    from nxd_lora.sagemaker.submit import SubmitError, _boto3

    found = _boto3().Session().region_name
    if not found:
        raise SubmitError("no AWS region: pass --region or set AWS_REGION")
    return found


def run(args: argparse.Namespace) -> int:
    from nxd_lora.sagemaker.spec import JobSpec
    from nxd_lora.sagemaker.submit import Submitter, submit

    region = _region(args.region)
    if args.sagemaker_command == "logs":
        job = Submitter(region).follow(args.job_name)
        return 0 if job["TrainingJobStatus"] == "Completed" else 1
    spec = JobSpec(
        job_name=args.job_name or default_job_name(args.config), role_arn=args.role, region=region,
        recipe_name=Path(args.config).name, checkpoint=args.checkpoint, tokenizer=args.tokenizer, output=args.output,
        data=args.data, overrides=list(args.overrides), instance_type=args.instance_type,
        instance_count=args.instance_count, volume_gb=args.volume_gb, max_run_hours=args.max_run_hours,
        spot=args.spot, max_wait_hours=args.max_wait_hours, image=args.image, compile_cache=args.compile_cache,
        precompile=args.precompile,
    )
    submit(spec, args.config, follow=not args.no_follow)
    return 0


def main(argv: list[str] | None = None) -> int:
    from nxd_lora.cli_args import parse_args
    from nxd_lora.sagemaker.submit import SubmitError

    parser = argparse.ArgumentParser(prog="launch/sagemaker.py", description="nxd-lora training jobs on SageMaker")
    add_commands(parser)
    args = parse_args(parser, argv)
    try:
        return run(args)
    except (SubmitError, ValueError, FileNotFoundError) as err:
        print(f"sagemaker: error: {err}", file=sys.stderr)
        return 2
