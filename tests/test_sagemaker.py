"""SageMaker jobs: the request we send (to a moto server on localhost, over real HTTP with boto3),
the checks that stop a job that would fail, error messages, log following, and the entry point."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# moto's request recorder writes to this file (read when moto is first imported), not into the checkout
os.environ.setdefault("MOTO_RECORDER_FILEPATH", os.path.join(tempfile.gettempdir(), f"nxd-lora-moto-{os.getpid()}"))
boto3 = pytest.importorskip("boto3", reason="needs boto3 (pip install 'nxd-lora[dev]')")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'nxd-lora[dev]')")
from botocore.stub import Stubber  # noqa: E402

from checkpoint_tools.convert import convert_to_nxd  # noqa: E402
from nxd_lora.demo import write_tiny_hf_model  # noqa: E402
from nxd_lora.sagemaker import entry  # noqa: E402
from nxd_lora.sagemaker.spec import JobSpec, JobSpecError, neuron_training_image, training_job_request  # noqa: E402
from nxd_lora.sagemaker.submit import SubmitError, Submitter, submit  # noqa: E402

REGION = "us-west-2"
ACCOUNT = "123456789012"  # moto's account
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerTrn"
SECRET = "not-a-real-secret-key-0123456789"
HF_TOKEN = "hf_not_a_real_token_abcdef"
TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"},
                                                 "Action": "sts:AssumeRole"}]}


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _post(endpoint: str, path: str) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(endpoint + path, data=b"", method="POST")) as response:
        return response.read()


@pytest.fixture
def aws(endpoint, monkeypatch, tmp_path_factory):
    """A fresh account on the moto server: role, buckets, a converted tiny checkpoint, tokenizer and data."""
    _post(endpoint, "/moto-api/reset")
    for key, value in dict(AWS_ACCESS_KEY_ID="AKIATESTTESTTESTTEST", AWS_SECRET_ACCESS_KEY=SECRET,
                           AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
                           HF_TOKEN=HF_TOKEN).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    iam, s3 = boto3.client("iam"), boto3.client("s3", region_name=REGION)
    iam.create_role(RoleName="SageMakerTrn", AssumeRolePolicyDocument=json.dumps(TRUST))
    iam.create_role(RoleName="Ec2Only", AssumeRolePolicyDocument=json.dumps(
        dict(TRUST, Statement=[dict(TRUST["Statement"][0], Principal={"Service": "ec2.amazonaws.com"})])))
    for bucket in ("nxd-data", "nxd-runs"):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    work = tmp_path_factory.mktemp("sm")
    hf = write_tiny_hf_model(work / "hf")
    convert_to_nxd(hf, work / "tp2", 2, log=lambda m: None)
    manifest = work / "tp2" / "pretrained_weight" / "nxd_lora_manifest.json"
    s3.upload_file(str(manifest), "nxd-data", "ckpt/tiny-tp2/pretrained_weight/nxd_lora_manifest.json")
    s3.upload_file(str(hf / "original" / "tokenizer.model"), "nxd-data", "tokenizers/tiny/tokenizer.model")
    s3.put_object(Bucket="nxd-data", Key="data/train.jsonl", Body=b'{"instruction": "hi", "response": "hello"}\n')
    recipe = work / "tiny-trn1.yaml"
    recipe.write_text("model:\n  dtype: bfloat16\ntrain:\n  backend: neuron\n  tp: 2\n  max_steps: 10\n")
    return {"recipe": recipe, "s3": s3, "endpoint": endpoint}


def _spec(**changes) -> JobSpec:
    values = dict(job_name="nxd-lora-test-1", role_arn=ROLE, region=REGION, recipe_name="tiny-trn1.yaml",
                  checkpoint="s3://nxd-data/ckpt/tiny-tp2", tokenizer="s3://nxd-data/tokenizers/tiny",
                  data="s3://nxd-data/data", output="s3://nxd-runs/jobs", instance_count=2, spot=True)
    values.update(changes)
    return JobSpec(**values)


def _recorded_create_requests(endpoint: str) -> list[dict]:
    lines = urllib.request.urlopen(endpoint + "/moto-api/recorder/download-recording").read().decode().splitlines()
    out = []
    for line in filter(None, lines):
        entry_ = json.loads(line)
        if entry_.get("headers", {}).get("X-Amz-Target") == "SageMaker.CreateTrainingJob":
            body = entry_["body"]
            out.append(json.loads(base64.b64decode(body) if entry_.get("body_encoded") else body))
    return out


@pytest.mark.smoke
def test_submit_sends_the_job_sagemaker_requires_and_follows_its_logs(aws):
    logs = boto3.client("logs", region_name=REGION)
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    now_ms = int(time.time() * 1000)  # CloudWatch drops events older than 14 days
    for host in (1, 2):
        stream = f"nxd-lora-test-1/algo-{host}-1700000000"
        logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
        logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream, logEvents=[
            {"timestamp": now_ms + i, "message": f"host {host} step {i}"} for i in range(3)])
    _post(aws["endpoint"], "/moto-api/recorder/reset-recording")
    _post(aws["endpoint"], "/moto-api/recorder/start-recording")
    lines: list[str] = []
    result = submit(_spec(), aws["recipe"], follow=True, poll_seconds=0.01, log=lines.append)
    _post(aws["endpoint"], "/moto-api/recorder/stop-recording")

    (sent,) = _recorded_create_requests(aws["endpoint"])
    assert sent == result["request"]
    assert sent["AlgorithmSpecification"] == {
        "TrainingImage": "763104351884.dkr.ecr.us-west-2.amazonaws.com/pytorch-training-neuronx:"
                         "2.9.0-neuronx-py312-sdk2.28.0-ubuntu24.04", "TrainingInputMode": "File"}
    assert sent["ResourceConfig"] == {"InstanceType": "ml.trn1.32xlarge", "InstanceCount": 2, "VolumeSizeInGB": 512}
    hp = {k: json.loads(v) for k, v in sent["HyperParameters"].items()}
    assert hp["sagemaker_program"] == "sagemaker_entry.py" and hp["sagemaker_torch_distributed_enabled"] is True
    assert hp["sagemaker_submit_directory"] == "s3://nxd-runs/jobs/nxd-lora-test-1/source/sourcedir.tar.gz"
    assert hp["config"] == "tiny-trn1.yaml" and json.loads(hp["overrides"]) == []
    assert {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in sent["InputDataConfig"]} == {
        "checkpoint": "s3://nxd-data/ckpt/tiny-tp2/", "tokenizer": "s3://nxd-data/tokenizers/tiny/",
        "train": "s3://nxd-data/data/"}
    assert sent["CheckpointConfig"] == {"S3Uri": "s3://nxd-runs/jobs/nxd-lora-test-1/checkpoints",
                                        "LocalPath": "/opt/ml/checkpoints"}
    assert sent["EnableManagedSpotTraining"] is True
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 172800}
    assert sent["Environment"]["NEURON_COMPILE_CACHE_URL"] == "s3://nxd-runs/jobs/neuron-compile-cache"
    text = json.dumps(sent)
    assert SECRET not in text and HF_TOKEN not in text and "AKIATEST" not in text  # no secrets leave the machine

    archive = aws["s3"].get_object(Bucket="nxd-runs", Key="jobs/nxd-lora-test-1/source/sourcedir.tar.gz")["Body"]
    with tarfile.open(fileobj=io.BytesIO(archive.read()), mode="r:gz") as tar:
        names = set(tar.getnames())
    assert {"sagemaker_entry.py", "tiny-trn1.yaml", "requirements.txt", "nxd_lora/cli.py",
            "checkpoint_tools/convert.py", "nxd_lora/sagemaker/entry.py"} <= names
    assert not any("__pycache__" in n for n in names)

    assert result["job"]["TrainingJobStatus"] == "Completed"
    assert "[algo-1-1700000000] host 1 step 0" in lines and "[algo-2-1700000000] host 2 step 2" in lines
    assert sum("step" in line for line in lines) == 6  # every event once
    assert any("could not read the quota 'ml.trn1.32xlarge for spot training job usage'" in m for m in lines)


@pytest.mark.parametrize("change, message", [
    (dict(role_arn=f"arn:aws:iam::{ACCOUNT}:role/Missing"), "role arn:aws:iam::123456789012:role/Missing does not exist"),
    (dict(role_arn=f"arn:aws:iam::{ACCOUNT}:role/Ec2Only"), "does not let SageMaker assume it"),
    (dict(output="s3://no-such-bucket/jobs"), "output s3://no-such-bucket/jobs: bucket 'no-such-bucket' does not exist"),
    (dict(checkpoint="s3://nxd-data/ckpt/elsewhere"),
     "no s3://nxd-data/ckpt/elsewhere/pretrained_weight/nxd_lora_manifest.json"),
])
def test_what_would_fail_later_is_refused_before_anything_is_created(aws, change, message):
    with pytest.raises(SubmitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        submit(_spec(**change), aws["recipe"], follow=False, log=lambda m: None)
    assert boto3.client("sagemaker", region_name=REGION).list_training_jobs()["TrainingJobSummaries"] == []
    assert "Contents" not in aws["s3"].list_objects_v2(Bucket="nxd-runs")  # nothing uploaded


def test_recipe_and_checkpoint_must_agree(aws):
    with pytest.raises(SubmitError, match="converted for tp=2, the recipe trains with train.tp=4"):
        submit(_spec(overrides=["train.tp=4"]), aws["recipe"], follow=False, log=lambda m: None)
    with pytest.raises(ValueError, match="the checkpoint is a different model"):
        submit(_spec(overrides=["model.architecture=llama3-8b"]), aws["recipe"], follow=False, log=lambda m: None)
    with pytest.raises(ValueError, match="more than the 16 GiB"):
        submit(_spec(overrides=["data.seq_len=100000", "train.micro_batch_size=64"]), aws["recipe"], follow=False, log=lambda m: None)


def test_quota_below_the_instance_count_is_named(aws):
    submitter = Submitter(REGION, log=lambda m: None)
    with Stubber(submitter.clients["service-quotas"]) as stub:
        stub.add_response("list_service_quotas", {"Quotas": [
            {"QuotaName": "ml.trn1.32xlarge for training job usage", "Value": 1.0, "QuotaCode": "L-TEST"}]},
            {"ServiceCode": "sagemaker"})
        with pytest.raises(SubmitError, match=r"'ml.trn1.32xlarge for training job usage' in us-west-2 is 1, "
                                              r"the job needs 2: request an increase"):
            submitter.check_quota("ml.trn1.32xlarge", 2, spot=False)


@pytest.mark.parametrize("code, message, expected", [
    ("ResourceLimitExceeded", "The account-level service limit 'ml.trn1.32xlarge for spot training job usage' is 0",
     "Request an increase of 'ml.trn1.32xlarge for spot training job usage' (x2)"),
    ("ValidationException", "Could not assume role arn:aws:iam::123456789012:role/SageMakerTrn.",
     "SageMaker cannot assume the role"),
    ("ResourceInUse", "Training job names must be unique", "already exists: pass another --job-name"),
    ("AccessDeniedException", "not authorized to perform: iam:PassRole", "need sagemaker:CreateTrainingJob and iam:PassRole"),
])
def test_service_errors_say_what_to_do(aws, code, message, expected):
    request = training_job_request(_spec())
    submitter = Submitter(REGION, log=lambda m: None)
    with Stubber(submitter.clients["sagemaker"]) as stub:
        stub.add_client_error("create_training_job", service_error_code=code, service_message=message)
        with pytest.raises(SubmitError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            submitter.create(request)


def test_a_failed_job_reports_its_reason(aws, capsys):
    submitter = Submitter(REGION, log=lambda m: None)
    with Stubber(submitter.clients["sagemaker"]) as sm, Stubber(submitter.clients["logs"]) as logs:
        sm.add_response("describe_training_job", {
            "TrainingJobName": "j", "TrainingJobArn": "arn:aws:sagemaker:us-west-2:123456789012:training-job/j",
            "TrainingJobStatus": "Failed", "SecondaryStatus": "Failed", "FailureReason": "AlgorithmError: rank 3 died",
            "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ModelArtifacts": {"S3ModelArtifacts": "s3://b/k"},
            "ResourceConfig": {"InstanceType": "ml.trn1.32xlarge", "InstanceCount": 1, "VolumeSizeInGB": 1},
            "StoppingCondition": {}, "CreationTime": 0})
        for _ in range(2):
            logs.add_client_error("describe_log_streams", service_error_code="ResourceNotFoundException")
        job = submitter.follow("j", poll_seconds=0)
    assert job["FailureReason"] == "AlgorithmError: rank 3 died"
    assert "j: Failed (Failed)" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (dict(job_name="bad_name"), "job name 'bad_name'"),
    (dict(role_arn="SageMakerTrn"), "is not an IAM role ARN"),
    (dict(instance_type="ml.p5.48xlarge"), "nxd-lora trains on"),
    (dict(max_wait_hours=1.0), "spot max wait 1.0 h must be >= max run 24.0 h"),
    (dict(spot=False, max_wait_hours=30.0), "max wait applies to spot jobs only"),
    (dict(data="bucket/data"), "data='bucket/data' is not an s3://bucket/prefix URI"),
    (dict(overrides=[f"train.output_dir={'x' * 3000}"]), r"hyperparameters \['overrides'\] exceed SageMaker's 2500"),
])
def test_job_spec_errors_name_the_field(change, message):
    with pytest.raises(JobSpecError, match=message.replace("(", r"\(")):
        training_job_request(_spec(**change))


def test_images_per_region():
    assert neuron_training_image("eu-south-1").startswith("692866216735.dkr.ecr.eu-south-1.amazonaws.com/")
    assert neuron_training_image("cn-north-1").startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    trn2 = training_job_request(_spec(instance_type="ml.trn2.48xlarge"))
    assert trn2["Environment"]["NEURON_CC_FLAGS"].endswith("--target=trn2")
    assert "RUN_NEURON_PARALLEL_COMPILE" in training_job_request(_spec(precompile=True))["Environment"]


def test_entry_maps_sagemakers_directories_onto_the_recipe(tmp_path, monkeypatch):
    """Inside the container: channels -> recipe paths, /opt/ml/checkpoints for resume, final/ -> model dir.
    Run for real here on one CPU rank with the tiny model."""
    hf = write_tiny_hf_model(tmp_path / "hf")
    convert_to_nxd(hf, tmp_path / "ckpt", 1, log=lambda m: None)
    (tmp_path / "data" / "sub").mkdir(parents=True)
    rows = "".join(json.dumps({"instruction": f"say {i}", "response": f"{i} " * 5}) + "\n" for i in range(12))
    (tmp_path / "data" / "sub" / "a.jsonl").write_text(rows)
    (tmp_path / "data" / "README").write_text("not data")
    monkeypatch.setenv("SM_CHANNEL_CHECKPOINT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("SM_CHANNEL_TOKENIZER", str(hf))
    monkeypatch.setenv("SM_CHANNEL_TRAIN", str(tmp_path / "data"))
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("NXD_LORA_NO_BAR", "1")
    args = entry.train_arguments("recipe.yaml", ["train.max_steps=2"])
    assert args[:3] == ["train", "--config", "recipe.yaml"]
    assert f"data.train_files=[{tmp_path / 'data' / 'sub' / 'a.jsonl'}]" in args
    assert "train.output_dir=/opt/ml/checkpoints" in args and "train.resume=auto" in args
    assert args.index("train.backend=neuron") < args.index("train.max_steps=2")  # the user's overrides win

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  seq_len: 128\n  val_fraction: 0\ntrain:\n  loggers: [csv]\n")
    monkeypatch.setattr(entry, "__file__", str(tmp_path / "sagemaker_entry.py"))  # the recipe sits beside it
    overrides = ["train.backend=cpu", "train.max_steps=2", f"train.output_dir={tmp_path / 'opt-ml-checkpoints'}"]
    assert entry.main(["--config", "recipe.yaml", "--overrides", json.dumps(overrides)]) == 0
    assert (tmp_path / "model" / "final" / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "opt-ml-checkpoints" / "final" / "adapter" / "done").is_file()


def test_entry_needs_its_channels(monkeypatch):
    for name in ("CHECKPOINT", "TOKENIZER", "TRAIN"):
        monkeypatch.delenv(f"SM_CHANNEL_{name}", raising=False)
    with pytest.raises(SystemExit, match="needs the 'checkpoint' and 'tokenizer' input channels"):
        entry.train_arguments("r.yaml", [])


def test_cli_reaches_the_submitter(monkeypatch, tmp_path):
    import nxd_lora.sagemaker.submit as submit_module
    from nxd_lora.cli import main

    seen = {}
    monkeypatch.setattr(submit_module, "submit", lambda spec, recipe, follow: seen.update(spec=spec, follow=follow))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  tp: 2\n")
    code = main(["sagemaker", "submit", "--config", str(recipe), "--role", ROLE, "--checkpoint", "s3://a/b",
                 "--tokenizer", "s3://a/t", "--output", "s3://a/o", "--region", REGION, "--no-follow",
                 "train.max_steps=5"])
    assert code == 0 and seen["follow"] is False
    assert seen["spec"].overrides == ["train.max_steps=5"] and seen["spec"].job_name.startswith("nxd-lora-r-")
