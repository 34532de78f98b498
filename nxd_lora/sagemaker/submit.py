"""Submit an nxd-lora job to SageMaker with boto3, and follow its status and logs.

Before anything is created, the things that would otherwise fail minutes later (or bill an
instance first) are checked against the account, each failure naming what to fix:

* the role exists and SageMaker may assume it (its trust policy names sagemaker.amazonaws.com);
* every bucket exists and is reachable; the checkpoint prefix holds a converted checkpoint
  whose manifest matches the recipe (tp, architecture) and the plan fits a NeuronCore;
* the account's quota for the instance type covers ``instance_count`` (best effort: where
  Service Quotas cannot be read, a warning, and the service's own answer decides).

Then the source (``nxd_lora``, ``checkpoint_tools``, the recipe and the entry script) goes to
S3 as ``sourcedir.tar.gz`` and the job is created. Credentials come from boto3's usual chain;
none are logged, written or passed to the job.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Callable

from nxd_lora.sagemaker.spec import ENTRY_POINT, JobSpec, JobSpecError, split_s3_uri, training_job_request

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")
PACKAGES = ("nxd_lora", "checkpoint_tools")
# What the container needs beyond the Neuron DLC's own torch, torch-neuronx and NxD.
CONTAINER_REQUIREMENTS = ["safetensors>=0.4", "tokenizers>=0.19", "sentencepiece>=0.2", "tiktoken>=0.7",
                          "pyyaml>=6", "lightning>=2.4,<3", "tensorboard>=2.15", "datasets>=2.18"]


class SubmitError(RuntimeError):
    """The account, role, buckets or inputs are not ready for the job; the message says what to fix."""


def _boto3():
    try:
        import boto3
    except ImportError:
        raise SubmitError("SageMaker jobs need boto3: pip install 'nxd-lora[sagemaker]'") from None
    return boto3


def _code(err) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _message(err) -> str:
    return str(err.response.get("Error", {}).get("Message", err))


class Submitter:
    """One region's clients, and the checks and calls of a submission."""

    def __init__(self, region: str, session=None, log: Callable[[str], None] = print):
        boto3 = _boto3()
        from botocore.config import Config
        from botocore.exceptions import ClientError

        self.ClientError = ClientError
        self.session = session or boto3.Session(region_name=region)
        config = Config(retries={"max_attempts": 3, "mode": "standard"})
        self.region = region
        self.clients = {name: self.session.client(name, region_name=region, config=config)
                        for name in ("sagemaker", "s3", "iam", "sts", "logs", "service-quotas")}
        self.log = log

    # --- checks -----------------------------------------------------------------------------
    def check_role(self, role_arn: str) -> None:
        account, name = role_arn.split(":")[4], role_arn.split("/")[-1]
        try:
            caller = self.clients["sts"].get_caller_identity()["Account"]
        except self.ClientError as err:
            raise SubmitError(f"cannot identify the AWS account of these credentials: {_message(err)}") from None
        if caller != account:
            self.log(f"[sagemaker] role {role_arn} is in account {account}, not yours ({caller}): not checked")
            return
        try:
            role = self.clients["iam"].get_role(RoleName=name)["Role"]
        except self.ClientError as err:
            if _code(err) == "NoSuchEntity":
                raise SubmitError(f"role {role_arn} does not exist in account {account}: create a SageMaker "
                                  "execution role (trusting sagemaker.amazonaws.com) and pass its ARN") from None
            self.log(f"[sagemaker] cannot read role {name} ({_code(err)}): not checked")
            return
        trust = role.get("AssumeRolePolicyDocument") or {}
        if isinstance(trust, str):
            trust = json.loads(trust)
        principals = json.dumps([s.get("Principal") for s in trust.get("Statement", [])])
        if "sagemaker.amazonaws.com" not in principals:
            raise SubmitError(f"role {role_arn} does not let SageMaker assume it: add sagemaker.amazonaws.com "
                              "as a trusted principal")

    def check_bucket(self, uri: str, what: str) -> None:
        bucket, _ = split_s3_uri(uri, what)
        try:
            self.clients["s3"].head_bucket(Bucket=bucket)
        except self.ClientError as err:
            code = _code(err)
            if code in ("404", "NoSuchBucket"):
                raise SubmitError(f"{what} {uri}: bucket {bucket!r} does not exist") from None
            if code in ("403", "AccessDenied"):
                raise SubmitError(f"{what} {uri}: no access to bucket {bucket!r} with these credentials") from None
            raise SubmitError(f"{what} {uri}: bucket {bucket!r}: {code} {_message(err)}") from None

    def read_manifest(self, checkpoint: str) -> dict:
        """The converted checkpoint's manifest (``<prefix>/pretrained_weight/nxd_lora_manifest.json``)."""
        bucket, prefix = split_s3_uri(checkpoint, "checkpoint")
        key = f"{prefix.rstrip('/')}/pretrained_weight/nxd_lora_manifest.json".lstrip("/")
        try:
            body = self.clients["s3"].get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.ClientError as err:
            if _code(err) in ("NoSuchKey", "404"):
                raise SubmitError(f"checkpoint {checkpoint}: no s3://{bucket}/{key}; upload a directory written "
                                  "by 'nxd-lora convert' (aws s3 sync ckpt/<name> s3://...)") from None
            raise SubmitError(f"checkpoint {checkpoint}: cannot read s3://{bucket}/{key}: {_message(err)}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise SubmitError(f"checkpoint {checkpoint}: s3://{bucket}/{key} is not JSON") from None

    def check_quota(self, instance_type: str, count: int, spot: bool) -> None:
        name = f"{instance_type} for {'spot ' if spot else ''}training job usage"
        try:
            pages = self.clients["service-quotas"].get_paginator("list_service_quotas").paginate(ServiceCode="sagemaker")
            quota = next((q for page in pages for q in page["Quotas"] if q.get("QuotaName") == name), None)
        except self.ClientError as err:
            self.log(f"[sagemaker] could not read the quota '{name}' ({_code(err) or 'error'}): not checked")
            return
        if quota is None:
            self.log(f"[sagemaker] no quota named '{name}' in this region: not checked")
            return
        if quota["Value"] < count:
            raise SubmitError(f"the quota '{name}' in {self.region} is {quota['Value']:g}, the job needs {count}: "
                              "request an increase in Service Quotas (service SageMaker)")

    # --- upload, create, follow ----------------------------------------------------------------
    def upload_source(self, spec: JobSpec, recipe: Path) -> None:
        bucket, key = split_s3_uri(spec.source_uri(), "output")
        self.clients["s3"].put_object(Bucket=bucket, Key=key, Body=source_archive(recipe, spec.recipe_name),
                                      ServerSideEncryption="aws:kms")

    def create(self, request: dict) -> str:
        try:
            return self.clients["sagemaker"].create_training_job(**request)["TrainingJobArn"]
        except self.ClientError as err:
            raise SubmitError(explain_create_error(err, request)) from None

    def follow(self, job_name: str, poll_seconds: float = 10.0, out: Callable[[str], None] = print) -> dict:
        """Print status changes and every instance's log lines until the job ends; return its description."""
        positions: dict[str, str] = {}  # stream -> next token
        last_status = None
        while True:
            job = self.clients["sagemaker"].describe_training_job(TrainingJobName=job_name)
            status = (job["TrainingJobStatus"], job.get("SecondaryStatus"))
            if status != last_status:
                out(f"[sagemaker] {job_name}: {status[0]} ({status[1]})")
                last_status = status
            self._print_new_log_events(job_name, positions, out)
            if job["TrainingJobStatus"] in TERMINAL:
                self._print_new_log_events(job_name, positions, out)
                return job
            time.sleep(poll_seconds)

    def _print_new_log_events(self, job_name: str, positions: dict[str, str], out) -> None:
        logs = self.clients["logs"]
        streams, token = [], None
        try:
            while True:
                page = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{job_name}/",
                                                 orderBy="LogStreamName", **({"nextToken": token} if token else {}))
                streams += [s["logStreamName"] for s in page.get("logStreams", [])]
                token = page.get("nextToken")
                if not token:
                    break
        except self.ClientError as err:
            if _code(err) == "ResourceNotFoundException":  # no log group until the first job writes
                return
            raise
        for stream in streams:
            while True:
                kwargs = {"nextToken": positions[stream]} if stream in positions else {"startFromHead": True}
                page = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, **kwargs)
                for event in page.get("events", []):
                    out(f"[{stream.split('/', 1)[-1]}] {event['message']}")
                unchanged = page.get("nextForwardToken") == positions.get(stream)
                positions[stream] = page.get("nextForwardToken")
                if unchanged or not page.get("events"):
                    break


def explain_create_error(err, request: dict) -> str:
    """CreateTrainingJob's error, with what to do about it."""
    code, message = _code(err), _message(err)
    instance = request["ResourceConfig"]["InstanceType"]
    if code == "ResourceLimitExceeded":
        kind = "spot training job usage" if request.get("EnableManagedSpotTraining") else "training job usage"
        return (f"quota: {message} Request an increase of '{instance} for {kind}' "
                f"(x{request['ResourceConfig']['InstanceCount']}) in Service Quotas.")
    if code == "ResourceInUse":
        return f"a training job named {request['TrainingJobName']!r} already exists: pass another --job-name"
    if code in ("AccessDeniedException", "AccessDenied"):
        return f"these credentials may not create the job ({message}): they need sagemaker:CreateTrainingJob " \
               f"and iam:PassRole on {request['RoleArn']}"
    if code == "ValidationException" and "assume role" in message.lower():
        return f"SageMaker cannot assume the role {request['RoleArn']}: {message}"
    return f"CreateTrainingJob failed: {code}: {message}"


def source_archive(recipe: Path, recipe_name: str) -> bytes:
    """``sourcedir.tar.gz``: our two packages, the recipe, the entry script and the container's requirements."""
    root = Path(__file__).resolve().parents[2]
    buffer = io.BytesIO()

    def skip(info: tarfile.TarInfo):
        return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for package in PACKAGES:
            tar.add(root / package, arcname=package, filter=skip)
        tar.add(Path(__file__).with_name("entry.py"), arcname=ENTRY_POINT)
        tar.add(recipe, arcname=recipe_name)
        add_bytes(tar, "requirements.txt", ("\n".join(CONTAINER_REQUIREMENTS) + "\n").encode())
    return buffer.getvalue()


def check_inputs(submitter: Submitter, spec: JobSpec, recipe) -> dict:
    """Every check before anything is created; returns the checkpoint's manifest."""
    from checkpoint_tools.llama_config import LlamaConfig
    from nxd_lora.plan import check_job

    submitter.check_role(spec.role_arn)
    uris = {"checkpoint": spec.checkpoint, "tokenizer": spec.tokenizer, "output": spec.output, "data": spec.data,
            "compile cache": spec.compile_cache}
    for bucket_uri, what in {u: w for w, u in uris.items() if u}.items():
        submitter.check_bucket(bucket_uri, what)
    manifest = submitter.read_manifest(spec.checkpoint)
    train = recipe.train
    if manifest.get("tp") != train.tp:
        raise SubmitError(f"checkpoint {spec.checkpoint} was converted for tp={manifest.get('tp')}, "
                          f"the recipe trains with train.tp={train.tp}")
    config = LlamaConfig.from_dict(manifest["config"], source=f"{spec.checkpoint} manifest")
    check_job(recipe, config, spec.ranks, f"{spec.checkpoint} on {spec.instance_count} x {spec.instance_type}",
              device="trn2" if spec.instance_type.startswith("ml.trn2") else "trn1")
    submitter.check_quota(spec.instance_type, spec.instance_count, spec.spot)
    return manifest


def submit(spec: JobSpec, recipe_path: str | Path, follow: bool = True, poll_seconds: float = 10.0,
           log: Callable[[str], None] = print, session=None) -> dict:
    """Check, upload, create and (optionally) follow the job. Returns ``{"arn", "request", "job"}``."""
    from nxd_lora.train.config import load_recipe

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, spec.overrides)
    request = training_job_request(spec)
    submitter = Submitter(spec.region, session=session, log=log)
    check_inputs(submitter, spec, recipe)
    submitter.upload_source(spec, recipe_path)
    arn = submitter.create(request)
    log(f"[sagemaker] created {arn}: {spec.instance_count} x {spec.instance_type} ({spec.ranks} ranks), "
        f"checkpoints {spec.checkpoint_uri()}, model {spec.output_prefix()}/{spec.job_name}/output/")
    result = {"arn": arn, "request": request, "job": None}
    if follow:
        job = submitter.follow(spec.job_name, poll_seconds, out=log)
        result["job"] = job
        if job["TrainingJobStatus"] != "Completed":
            raise SubmitError(f"job {spec.job_name} {job['TrainingJobStatus']}: "
                              f"{job.get('FailureReason', 'no reason given')}")
    return result


__all__ = ["JobSpec", "JobSpecError", "SubmitError", "Submitter", "submit", "source_archive"]
