"""The CreateTrainingJob request for an nxd-lora job on SageMaker, built and checked offline.

The job runs the Neuron PyTorch training container (``pytorch-training-neuronx``, PyTorch 2.9
on Neuron SDK 2.28) with SageMaker's ``torch_distributed`` launcher: on each instance the
container runs ``torchrun --nproc_per_node <NeuronCores>`` over our entry script, which it
finds through the same hyperparameters the SageMaker Python SDK writes (``sagemaker_program``,
``sagemaker_submit_directory``, JSON-encoded). Inputs arrive as channels under
``/opt/ml/input/data/<name>``; ``/opt/ml/checkpoints`` is synced to ``checkpoint_s3_uri``, so a
spot interruption resumes from the newest checkpoint.

Everything the service would reject late (or accept and then fail on) is checked here, with
the field named: names and ARNs against the service's patterns, instance types, spot limits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from nxd_lora.instances import INSTANCES

NEURON_SDK_VERSION = "2.28.0"
NEURON_IMAGE_REPOSITORY = "pytorch-training-neuronx"
NEURON_IMAGE_TAG = f"2.9.0-neuronx-py312-sdk{NEURON_SDK_VERSION}-ubuntu24.04"
# AWS Deep Learning Containers registries (account per region); 763104351884 elsewhere.
DLC_ACCOUNTS = {
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-east-2": "975050140332",
    "ap-south-2": "772153158452", "ap-southeast-3": "907027046896", "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462", "ap-southeast-6": "633930458069", "ap-southeast-7": "590183813437",
    "ap-northeast-3": "364406365360", "ca-west-1": "204538143572", "eu-central-2": "380420809688",
    "eu-south-1": "692866216735", "eu-south-2": "503227376785", "il-central-1": "780543022126",
    "mx-central-1": "637423239942", "me-south-1": "217643126080", "me-central-1": "914824155844",
    "cn-north-1": "727897471807", "cn-northwest-1": "727897471807",
    "us-gov-west-1": "442386744353", "us-gov-east-1": "446045086412",
}
DEFAULT_DLC_ACCOUNT = "763104351884"
# SageMaker's Trainium training instances; NeuronCores (ranks) per instance from nxd_lora.instances, at
# the default logical-core config, as the container's launcher counts them.
TRAINIUM_INSTANCES = {f"ml.{name}": INSTANCES[name].cores() for name in
                      ("trn1.2xlarge", "trn1.32xlarge", "trn1n.32xlarge", "trn2.48xlarge")}
ENTRY_POINT = "sagemaker_entry.py"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
MAX_HYPERPARAMETER_CHARS = 2500  # per value, the service's limit

JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(/.*)?$")
# Environment the job passes to every rank: the launcher's Neuron settings (see launch/run_trn1.sh).
NEURON_ENVIRONMENT = {
    "NEURON_CC_FLAGS": "--model-type transformer --retry_failed_compilation",
    "NEURON_FUSE_SOFTMAX": "1",
    "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "3",
    "MALLOC_ARENA_MAX": "64",
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",
    "FI_EFA_FORK_SAFE": "1",
}


class JobSpecError(ValueError):
    """The job cannot be submitted as specified."""


def neuron_training_image(region: str) -> str:
    """The Neuron PyTorch 2.9 training container (SDK 2.28) in ``region``'s DLC registry."""
    account = DLC_ACCOUNTS.get(region, DEFAULT_DLC_ACCOUNT)
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{NEURON_IMAGE_REPOSITORY}:{NEURON_IMAGE_TAG}"


def split_s3_uri(uri: str, what: str) -> tuple[str, str]:
    """(bucket, key prefix without leading slash) of an ``s3://`` URI, or a ``JobSpecError`` naming ``what``."""
    match = S3_URI.match(uri or "")
    if not match:
        raise JobSpecError(f"{what}={uri!r} is not an s3://bucket/prefix URI")
    return match.group(1), (match.group(2) or "/").lstrip("/")


@dataclass
class JobSpec:
    job_name: str
    role_arn: str
    region: str
    recipe_name: str                     # the recipe's file name inside the uploaded source
    checkpoint: str                      # s3:// prefix of a converted NxD checkpoint (has pretrained_weight/)
    tokenizer: str                       # s3:// prefix with tokenizer.json or tokenizer.model
    output: str                          # s3:// prefix: source upload, model artifacts, checkpoints
    data: str = ""                       # s3:// prefix of JSONL/JSON/CSV files; empty: the recipe's data
    overrides: list[str] = field(default_factory=list)
    instance_type: str = "ml.trn1.32xlarge"
    instance_count: int = 1
    volume_gb: int = 512
    max_run_hours: float = 24.0
    spot: bool = False
    max_wait_hours: float = 0.0          # spot only: >= max_run_hours (0: twice max_run_hours)
    image: str = ""                      # default: neuron_training_image(region)
    compile_cache: str = ""              # s3:// Neuron compile cache; default <output>/neuron-compile-cache
    precompile: bool = False             # run under neuron_parallel_compile (fills the cache, trains nothing)

    @property
    def ranks(self) -> int:
        return TRAINIUM_INSTANCES[self.instance_type] * self.instance_count

    def output_prefix(self) -> str:
        return self.output.rstrip("/")

    def source_uri(self) -> str:
        return f"{self.output_prefix()}/{self.job_name}/source/sourcedir.tar.gz"

    def checkpoint_uri(self) -> str:
        return f"{self.output_prefix()}/{self.job_name}/checkpoints"

    def validate(self) -> None:
        problems = []
        if not JOB_NAME.match(self.job_name):
            problems.append(f"job name {self.job_name!r}: 1-63 letters, digits and hyphens, starting with a "
                            "letter or digit")
        if not ROLE_ARN.match(self.role_arn):
            problems.append(f"role {self.role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
        if self.instance_type not in TRAINIUM_INSTANCES:
            problems.append(f"instance type {self.instance_type!r}: nxd-lora trains on {sorted(TRAINIUM_INSTANCES)}")
        if self.instance_count < 1:
            problems.append(f"instance count {self.instance_count} must be >= 1")
        if self.max_run_hours <= 0:
            problems.append(f"max run {self.max_run_hours} h must be > 0")
        if self.spot and self.max_wait_hours and self.max_wait_hours < self.max_run_hours:
            problems.append(f"spot max wait {self.max_wait_hours} h must be >= max run {self.max_run_hours} h")
        if not self.spot and self.max_wait_hours:
            problems.append("max wait applies to spot jobs only (add --spot)")
        for what in ("checkpoint", "tokenizer", "output") + (("data",) if self.data else ()) + \
                (("compile_cache",) if self.compile_cache else ()):
            try:
                split_s3_uri(getattr(self, what), what)
            except JobSpecError as err:
                problems.append(str(err))
        if problems:
            raise JobSpecError("cannot submit the SageMaker job: " + "; ".join(problems))


def _hyperparameter(value) -> str:
    """SageMaker's encoding: every value a JSON text (the container decodes each one)."""
    return json.dumps(value)


def training_job_request(spec: JobSpec) -> dict:
    """The CreateTrainingJob parameters for ``spec`` (validated)."""
    spec.validate()
    max_run = int(spec.max_run_hours * 3600)
    channels = {"checkpoint": spec.checkpoint, "tokenizer": spec.tokenizer, **({"train": spec.data} if spec.data else {})}
    environment = dict(NEURON_ENVIRONMENT, NEURON_COMPILE_CACHE_URL=spec.compile_cache
                       or f"{spec.output_prefix()}/neuron-compile-cache")
    if spec.precompile:
        environment["RUN_NEURON_PARALLEL_COMPILE"] = "1"  # the container's launcher adds neuron_parallel_compile
    if spec.instance_type.startswith("ml.trn2"):
        environment["NEURON_CC_FLAGS"] += " --target=trn2"
    request = {
        "TrainingJobName": spec.job_name,
        "RoleArn": spec.role_arn,
        "AlgorithmSpecification": {"TrainingImage": spec.image or neuron_training_image(spec.region),
                                   "TrainingInputMode": "File"},
        "HyperParameters": {
            "sagemaker_program": _hyperparameter(ENTRY_POINT),
            "sagemaker_submit_directory": _hyperparameter(spec.source_uri()),
            "sagemaker_region": _hyperparameter(spec.region),
            "sagemaker_container_log_level": _hyperparameter(20),
            "sagemaker_job_name": _hyperparameter(spec.job_name),
            "sagemaker_torch_distributed_enabled": _hyperparameter(True),
            "sagemaker_instance_type": _hyperparameter(spec.instance_type),
            "config": _hyperparameter(spec.recipe_name),
            "overrides": _hyperparameter(json.dumps(spec.overrides)),
        },
        "InputDataConfig": [
            {"ChannelName": name, "InputMode": "File",
             "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri.rstrip("/") + "/",
                                             "S3DataDistributionType": "FullyReplicated"}}}
            for name, uri in channels.items()
        ],
        "OutputDataConfig": {"S3OutputPath": spec.output_prefix() + "/"},
        "ResourceConfig": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count,
                           "VolumeSizeInGB": spec.volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_run},
        "CheckpointConfig": {"S3Uri": spec.checkpoint_uri(), "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Environment": environment,
        "EnableManagedSpotTraining": spec.spot,
    }
    too_long = [k for k, v in request["HyperParameters"].items() if len(v) > MAX_HYPERPARAMETER_CHARS]
    if too_long:
        raise JobSpecError(f"hyperparameters {too_long} exceed SageMaker's {MAX_HYPERPARAMETER_CHARS} characters: "
                           "put long settings in the recipe file instead of overrides")
    if spec.spot:
        wait = spec.max_wait_hours or 2 * spec.max_run_hours
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = int(wait * 3600)
    return request
