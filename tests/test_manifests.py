"""The deployable files: SageMaker requests checked against botocore's own SageMaker model,
Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline), KEDA's
custom resources structurally, every container command against the real CLI parser, and
the Dockerfiles and entrypoint as far as can be checked without a Docker engine."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import regex
import yaml

from batchjob.cli import build_parser
from batchjob.config import run_spec, worker_spec
from batchjob.job_files import load_job_file
from batchjob.serve_config import HF_TASKS, MAX_PAYLOAD_MB_LIMIT
from batchjob.serve_formats import REQUEST_TYPES, RESPONSE_TYPES
from batchjob.serving import max_concurrent_transforms

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
ENTRYPOINT_COMMANDS = ("serve", "run", "worker", "compile")
# Kubernetes versions the manifests must be valid for: an older supported one, the newest.
K8S_VERSIONS = ("1.29.0", None)


# -- SageMaker --------------------------------------------------------------------------------


def sagemaker_model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


def constraint_errors(value: Any, shape: Any, path: str) -> list[str]:
    """What botocore's ParamValidator leaves out: enums, patterns, maximums."""
    meta, errors = shape.metadata, []
    if shape.type_name == "structure":
        for name, item in value.items():
            if name in shape.members:
                errors += constraint_errors(item, shape.members[name], f"{path}.{name}")
    elif shape.type_name == "list":
        for i, item in enumerate(value):
            errors += constraint_errors(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "map":
        for key, item in value.items():
            errors += constraint_errors(key, shape.key, f"{path} key")
            errors += constraint_errors(item, shape.value, f"{path}.{key}")
    elif shape.type_name == "string":
        if shape.enum and value not in shape.enum:
            errors.append(f"{path}: {value!r} is not one of {shape.enum}")
        # `regex`, not `re`: the patterns use Java's \p{L}-style classes.
        if "pattern" in meta and not regex.fullmatch(meta["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {meta['pattern']}")
        if "max" in meta and len(value) > meta["max"]:
            errors.append(f"{path}: longer than {meta['max']}")
    elif shape.type_name in ("integer", "long") and "max" in meta and value > meta["max"]:
        errors.append(f"{path}: {value} > {meta['max']}")
    return errors


def validate_request(operation: str, path: Path) -> dict[str, Any]:
    from botocore.validate import ParamValidator

    params: dict[str, Any] = json.loads(path.read_text())
    shape = sagemaker_model().operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    assert constraint_errors(params, shape, operation) == []
    return params


def test_create_transform_job_is_a_valid_multirecord_jsonlines_request() -> None:
    job = validate_request("CreateTransformJob", MANIFESTS / "sagemaker/create-transform-job.json")
    assert job["BatchStrategy"] == "MultiRecord"
    assert job["TransformInput"]["SplitType"] == "Line"
    assert job["TransformOutput"]["AssembleWith"] == "Line"
    # What the container answers: see serve_formats.py.
    assert REQUEST_TYPES[job["TransformInput"]["ContentType"]] == "application/jsonlines"
    assert RESPONSE_TYPES[job["TransformOutput"]["Accept"]] == "application/jsonlines"
    assert set(job["ModelClientConfig"]) == {"InvocationsTimeoutInSeconds", "InvocationsMaxRetries"}
    # SageMaker: MaxConcurrentTransforms × MaxPayloadInMB ≤ 100 MB.
    assert job["MaxConcurrentTransforms"] * job["MaxPayloadInMB"] <= MAX_PAYLOAD_MB_LIMIT
    # One replica per Neuron device by default: as /execution-parameters would choose.
    assert job["MaxConcurrentTransforms"] == max_concurrent_transforms(1, job["MaxPayloadInMB"])
    instance = job["TransformResources"]["InstanceType"]
    assert instance.startswith(("ml.inf2.", "ml.trn1."))
    offered = sagemaker_model().shape_for("TransformInstanceType").enum
    assert instance in offered
    assert not [t for t in offered if t.startswith("ml.inf1.")]  # FACTS: Batch Transform


def test_create_model_points_the_container_at_the_toolkit_environment() -> None:
    model = validate_request("CreateModel", MANIFESTS / "sagemaker/create-model.json")
    job = json.loads((MANIFESTS / "sagemaker/create-transform-job.json").read_text())
    assert model["ModelName"] == job["ModelName"]
    container = model["PrimaryContainer"]
    assert container["Image"].endswith(":neuronx")  # the job runs on ml.inf2
    assert container["Environment"]["HF_TASK"] in HF_TASKS


def test_a_wrong_request_is_caught() -> None:
    """The checks above can fail: an inf1 instance, a bad name, a misspelt field."""
    params = json.loads((MANIFESTS / "sagemaker/create-transform-job.json").read_text())
    params["TransformResources"]["InstanceType"] = "ml.inf1.xlarge"
    params["TransformJobName"] = "not_valid!"
    params["TransformInput"]["SplitTipe"] = "Line"
    shape = sagemaker_model().operation_model("CreateTransformJob").input_shape
    from botocore.validate import ParamValidator

    assert "SplitTipe" in ParamValidator().validate(params, shape).generate_report()
    errors = " ".join(constraint_errors(params, shape, "job"))
    assert "ml.inf1.xlarge" in errors
    assert "not_valid!" in errors


# -- Kubernetes -------------------------------------------------------------------------------


def documents(name: str) -> list[dict[str, Any]]:
    with open(MANIFESTS / "kubernetes" / name, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", ["cronjob.yaml", "sqs-worker.yaml"])
def test_kubernetes_manifests_match_the_schemas(name: str) -> None:
    import kubernetes_validate

    checked = 0
    for doc in documents(name):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # custom resources: checked structurally below
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(
                doc, version or kubernetes_validate.latest_version(), strict=True
            )
        checked += 1
    assert checked >= 2


def test_the_schema_check_catches_a_typo() -> None:
    import kubernetes_validate

    [cronjob] = by_kind(documents("cronjob.yaml"), "CronJob")
    cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = "Sometimes"
    cronjob["spec"]["schedulle"] = cronjob["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, kubernetes_validate.latest_version(), strict=True)


def container_args(pod_spec: dict[str, Any]) -> list[str]:
    [container] = pod_spec["containers"]
    assert "command" not in container, "the image's entrypoint must stay in place"
    args: list[str] = container["args"]
    assert args[0] in ENTRYPOINT_COMMANDS
    return args


def parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"the CLI refuses: batchjob {shlex.join(argv)}") from None


def test_cronjob_runs_batchjob_run_over_an_s3_prefix() -> None:
    docs = documents("cronjob.yaml")
    [cronjob] = by_kind(docs, "CronJob")
    assert len(cronjob["spec"]["schedule"].split()) == 5
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] in [
        d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")
    ]
    args = container_args(pod)
    assert args[0] == "run"
    fields = vars(parse(args))
    assert fields["input"].startswith("s3://")
    assert fields["output"].startswith("s3://")
    assert fields["resume"] is True
    run_spec(fields)  # the values are valid too


def test_sqs_worker_deployment_args_grace_period_and_keda_scaling() -> None:
    docs = documents("sqs-worker.yaml")
    [deployment] = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    args = container_args(pod)
    assert args[0] == "worker"

    spec = worker_spec(vars(parse(args)))
    assert pod["terminationGracePeriodSeconds"] > spec.drain_seconds + 5  # room to exit after
    port = next(p["containerPort"] for p in pod["containers"][0]["ports"] if p["name"] == "metrics")
    assert spec.metrics_port == port

    [scaled] = by_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    scaling = scaled["spec"]
    assert scaling["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaling["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 0 <= scaling["minReplicaCount"] <= scaling["maxReplicaCount"]
    [trigger] = scaling["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    assert meta["queueURL"] == spec.queue
    assert int(meta["queueLength"]) >= 1
    region = re.fullmatch(
        r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com/\d{12}/[\w-]+", meta["queueURL"]
    )
    assert region is not None
    assert meta["awsRegion"] == region.group(1)
    [auth] = by_kind(docs, "TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"]["provider"] == "aws"


def test_the_worker_args_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="the CLI refuses"):
        parse(["worker", "--queue", "q", "--modle", "m", "--output", "s3://b/out/"])


@pytest.mark.parametrize(
    "path", sorted((MANIFESTS / "jobs").glob("*.yaml")), ids=lambda p: Path(p).name
)
def test_job_files_are_accepted_by_run(path: Path) -> None:
    fields = vars(parse(["run", "--job", str(path)]))
    spec = run_spec({**load_job_file(str(path)), **fields})
    assert spec.input
    assert spec.output


def test_there_are_job_files() -> None:
    assert len(list((MANIFESTS / "jobs").glob("*.yaml"))) >= 2


# -- Docker and the entrypoint -----------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def ignored(dockerfile: Path, source: str) -> bool:
    patterns = [
        p.strip()
        for p in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(source.rstrip("/"), p) for p in patterns)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.neuronx"])
def test_dockerfile_contract(name: str) -> None:
    dockerfile = REPO / "docker" / name
    steps = instructions(dockerfile)
    kinds = [k for k, _ in steps]
    assert kinds.count("FROM") == 1
    labels = " ".join(a for k, a in steps if k == "LABEL")
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels
    assert ("EXPOSE", "8080") in steps
    entrypoint = [json.loads(a) for k, a in steps if k == "ENTRYPOINT"]
    assert entrypoint == [["/app/entrypoint.sh"]]  # exec form: the process gets SIGTERM
    copies = [shlex.split(a) for k, a in steps if k == "COPY"]
    destinations = {}
    for copy in copies:
        *sources, destination = [c for c in copy if not c.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{name} copies {source}, which is not in the repo"
            assert not ignored(dockerfile, source), f"{name}.dockerignore drops {source}"
            destinations[source] = destination
    assert destinations["entrypoint.sh"] == "/app/entrypoint.sh"
    assert {"pyproject.toml", "batchjob"} <= set(destinations)
    installs = " ".join(a for k, a in steps if k == "RUN")
    # No HTTP health check inherited (the Neuron base image has one on :8080/ping): `run`
    # and `worker` containers answer no HTTP.
    assert [a for k, a in steps if k == "HEALTHCHECK"] == ["NONE"]
    assert kinds.index("HEALTHCHECK") > kinds.index("FROM")
    if name == "Dockerfile":
        assert steps[kinds.index("FROM")][1] == "python:3.11-slim"
        # The CPU build of torch from PyTorch's CPU index, pinned as the Makefile pins it,
        # then kept as a constraint when batchjob is installed (PyPI's torch is CUDA's).
        makefile_pin = re.search(r"torch==[\d.]+", (REPO / "Makefile").read_text())
        assert makefile_pin is not None
        assert ("ARG", "TORCH_INDEX_URL") in steps  # given at build time, required
        torch = f'pip install --index-url "$TORCH_INDEX_URL" {makefile_pin[0]}'
        assert torch in installs
        assert installs.index(torch) < installs.index("pip install -c /tmp/torch-pin.txt .")
        assert installs.count("index-url") == 1  # only torch comes from there
        users = [a for k, a in steps if k == "USER"]
        assert users
        assert users[-1] not in ("root", "0")
    else:
        base = next(a for k, a in steps if k == "ARG" and a.startswith("BASE_IMAGE="))
        assert re.fullmatch(
            r"BASE_IMAGE=public\.ecr\.aws/neuron/pytorch-inference-neuronx:"
            r"[\d.]+-neuronx-py3(1[1-9])-sdk[\d.]+-ubuntu[\d.]+",
            base,
        ), base  # torch-neuronx (Inf2/Trn1), Python ≥ 3.11 as pyproject.toml requires
        assert "pip install -c /tmp/neuron-pins.txt ." in installs  # the SDK's torch stays
        assert "index-url" not in installs  # the base image's Neuron torch, not another
        assert "BATCHJOB_BACKEND=neuronx" in " ".join(a for k, a in steps if k == "ENV")


def run_entrypoint(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(REPO / "entrypoint.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_entrypoint_dispatches_batchjob_commands_and_runs_anything_else() -> None:
    assert os.access(REPO / "entrypoint.sh", os.X_OK)
    done = run_entrypoint("echo", "any", "command")
    assert (done.returncode, done.stdout) == (0, "any command\n")
    done = run_entrypoint("serve", "--port", "eighty")  # reaches batchjob's own parser
    assert done.returncode == 2
    assert "batchjob serve: error: argument --port" in done.stderr
    done = run_entrypoint()
    assert done.returncode == 2
    assert "usage: entrypoint.sh serve|run|worker|compile" in done.stderr
