"""The partitioned deployments: the Kubernetes Indexed Job against the Kubernetes schemas, the
AWS Batch job definition and array submission against botocore's own Batch model, and each
one's command against the real CLI parser, with the part every index would run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchjob.config import RunSpec, run_spec
from batchjob.errors import UsageError
from batchjob.partitions import BATCH_INDEX, BATCH_SIZE, K8S_INDEX, Partition
from tests.test_manifests import (
    ENTRYPOINT_COMMANDS,
    K8S_VERSIONS,
    MANIFESTS,
    by_kind,
    constraint_errors,
    container_args,
    documents,
    parse,
)

# AWS Batch limits the API reference states and botocore's model does not carry.
ARRAY_SIZES = range(2, 10_001)  # ArrayProperties.size
RETRY_ATTEMPTS = range(1, 11)  # RetryStrategy.attempts
MAX_EVALUATE_ON_EXIT = 5


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# -- Kubernetes Indexed Job -----------------------------------------------------------------------


def indexed_job() -> dict[str, Any]:
    [job] = by_kind(documents("indexed-job.yaml"), "Job")
    return job


def test_indexed_job_matches_the_schemas() -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(
            indexed_job(), version or kubernetes_validate.latest_version(), strict=True
        )


def test_the_schema_knows_the_per_index_fields() -> None:
    """The check above can fail: these fields are in the schemas, a misspelling is not."""
    import kubernetes_validate

    job = indexed_job()
    job["spec"]["backoffLimitPerIndx"] = job["spec"].pop("backoffLimitPerIndex")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.29.0", strict=True)


def test_each_index_runs_its_own_part_and_reruns_it_with_resume() -> None:
    job = indexed_job()["spec"]
    assert job["completionMode"] == "Indexed"
    count = job["completions"]
    assert job["parallelism"] == count >= 2
    pod = job["template"]["spec"]
    accounts = by_kind(documents("cronjob.yaml"), "ServiceAccount")  # the one it shares
    assert pod["serviceAccountName"] in [a["metadata"]["name"] for a in accounts]
    args = container_args(pod)
    assert args[0] == "run"
    fields = vars(parse(args))
    assert fields["partitions"] == count
    assert fields["resume"] is True  # a rerun of an index skips what its last pod finished
    for index in range(count):
        spec = run_spec(dict(fields), {K8S_INDEX: str(index)})
        assert spec.part == Partition(index, count)
        assert spec.input.startswith("s3://")
        assert spec.output.startswith("s3://")
    with pytest.raises(UsageError, match="not below the number of parts"):
        run_spec(dict(fields), {K8S_INDEX: str(count)})
    # A killed pod is replaced by one with the same index; exit 2 (a bad invocation) is not.
    assert pod["restartPolicy"] == "Never"
    assert job["backoffLimitPerIndex"] >= 1
    assert "maxFailedIndexes" not in job, "a failed part must not stop the others"
    [fail_index] = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
    assert fail_index["onExitCodes"] == {
        "containerName": pod["containers"][0]["name"],
        "operator": "In",
        "values": [2],
    }


def test_indexed_job_requests_the_cpus_its_replicas_use() -> None:
    pod = indexed_job()["spec"]["template"]["spec"]
    spec = run_spec(vars(parse(container_args(pod))), {K8S_INDEX: "0"})
    assert spec.replicas is not None
    resources = pod["containers"][0]["resources"]
    wanted = spec.replicas * spec.cores_per_replica
    assert cpus(resources["requests"]["cpu"]) == cpus(resources["limits"]["cpu"]) == wanted
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


# -- AWS Batch array job --------------------------------------------------------------------------


def batch_request(operation: str, name: str) -> dict[str, Any]:
    import botocore.session
    from botocore.validate import ParamValidator

    params: dict[str, Any] = json.loads((MANIFESTS / "aws-batch" / name).read_text())
    model = botocore.session.get_session().get_service_model("batch")
    shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    assert constraint_errors(params, shape, operation) == []
    return params


def definition_spec(definition: dict[str, Any], env: dict[str, str]) -> RunSpec:
    command = definition["containerProperties"]["command"]
    assert command[0] in ENTRYPOINT_COMMANDS  # the image's entrypoint dispatches it
    return run_spec(vars(parse(command)), env)


def test_batch_job_definition_and_array_submission_are_valid_requests() -> None:
    definition = batch_request("RegisterJobDefinition", "job-definition.json")
    submit = batch_request("SubmitJob", "submit-job.json")
    assert definition["type"] == "container"
    assert submit["jobDefinition"] == definition["jobDefinitionName"]
    size = submit["arrayProperties"]["size"]
    assert size in ARRAY_SIZES
    for index in range(size):  # what AWS Batch sets in each child
        spec = definition_spec(definition, {BATCH_INDEX: str(index), BATCH_SIZE: str(size)})
        assert spec.part == Partition(index, size)
        assert spec.resume
        assert spec.input.startswith("s3://")
        assert spec.output.startswith("s3://")


def test_batch_retries_a_killed_child_but_not_a_refusal() -> None:
    definition = batch_request("RegisterJobDefinition", "job-definition.json")
    retry = definition["retryStrategy"]
    assert retry["attempts"] in RETRY_ATTEMPTS
    assert retry["attempts"] >= 2
    rules = retry["evaluateOnExit"]
    assert len(rules) <= MAX_EVALUATE_ON_EXIT
    # Rules are tried in order; a failure no rule matches is retried (the API reference).
    assert rules[0] == {"onExitCode": "2", "action": "EXIT"}
    assert all(r["action"] == "EXIT" for r in rules)  # everything else: RETRY
    command = definition["containerProperties"]["command"]
    assert "--resume" in command


def test_batch_job_asks_for_the_cpus_its_replicas_use() -> None:
    definition = batch_request("RegisterJobDefinition", "job-definition.json")
    spec = definition_spec(definition, {BATCH_INDEX: "0", BATCH_SIZE: "3"})
    assert spec.replicas is not None
    requirements = definition["containerProperties"]["resourceRequirements"]
    wanted = {r["type"]: r["value"] for r in requirements}
    assert float(wanted["VCPU"]) == spec.replicas * spec.cores_per_replica
    assert int(wanted["MEMORY"]) >= 1024


def test_a_wrong_batch_request_is_caught() -> None:
    """The checks above can fail: a misspelt field, a value outside the model's enums."""
    import botocore.session
    from botocore.validate import ParamValidator

    params = json.loads((MANIFESTS / "aws-batch/job-definition.json").read_text())
    params["containerProperties"]["resourceRequirements"][0]["type"] = "CPU"
    params["retryStrategy"]["evaluateOnExit"][0]["action"] = "STOP"
    params["containerProperties"]["comand"] = params["containerProperties"].pop("command")
    model = botocore.session.get_session().get_service_model("batch")
    shape = model.operation_model("RegisterJobDefinition").input_shape
    assert "comand" in ParamValidator().validate(params, shape).generate_report()
    errors = " ".join(constraint_errors(params, shape, "definition"))
    assert "'CPU'" in errors
    assert "'STOP'" in errors
