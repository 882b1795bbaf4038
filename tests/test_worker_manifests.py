"""The queue workers' manifests, CPU (sqs-worker.yaml) and Neuron (sqs-worker-neuron.yaml):
valid Kubernetes objects, KEDA's custom resources checked field by field (kubernetes-validate
has no schemas for them), and sized as the worker they run: the KEDA queueLength equal to
the worker's --max-messages-in-flight, CPU or NeuronCore requests equal to the replicas it
starts, memory for them, the model fetched from S3 into a mounted cache."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from batchjob.config import worker_spec
from tests.test_manifests import K8S_VERSIONS, by_kind, container_args, documents, parse

WORKERS = ("sqs-worker.yaml", "sqs-worker-neuron.yaml")
NEURONCORE = "aws.amazon.com/neuroncore"
GIB = 1 << 30
# The sizing rule the manifests state: about 1 GiB per replica plus 1 GiB for the parent.
MEMORY_PER_REPLICA = GIB
PARENT_MEMORY = GIB
_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6,
          "G": 10**9, "m": 1e-3, "": 1}  # fmt: skip


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("4", "500m", "5Gi") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match is not None, value
    assert match.group(2) in _UNITS, value
    return float(match.group(1)) * _UNITS[match.group(2)]


@pytest.mark.parametrize("name", WORKERS)
def test_worker_manifests_match_the_kubernetes_schemas(name: str) -> None:
    import kubernetes_validate

    kinds = []
    for doc in documents(name):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(
                doc, version or kubernetes_validate.latest_version(), strict=True
            )
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Deployment", "ServiceAccount"]


def check_worker(docs: list[dict[str, Any]]) -> str:
    """Every rule the worker manifests follow (AssertionError naming the broken one);
    returns the kind of compute: "cpu" or "neuron"."""
    [deployment] = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    args = container_args(pod)
    assert args[0] == "worker"
    fields = vars(parse(args))
    spec = worker_spec(fields)
    [container] = pod["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "requests = limits"
    requests = resources["requests"]

    # Sized as the replicas it starts, which it names outright.
    assert spec.replicas is not None, "--replicas, said outright"
    cores = spec.replicas * spec.cores_per_replica
    neuron = NEURONCORE in requests
    if neuron:
        assert quantity(requests[NEURONCORE]) == cores, "a NeuronCore per replica core"
        assert container["image"].endswith(":neuronx")
        assert "runAsNonRoot" not in pod.get("securityContext", {})  # the devices need root
    else:
        assert quantity(requests["cpu"]) == cores, "a CPU per replica core"
        assert container["image"].endswith(":cpu")
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert quantity(requests["memory"]) >= spec.replicas * MEMORY_PER_REPLICA + PARENT_MEMORY

    # The model: fetched from S3 into a cache directory that is a mounted volume.
    assert fields["model"].startswith("s3://")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[fields["cache_dir"]]
    [cache] = [v for v in pod["volumes"] if v["name"] == volume]
    assert quantity(cache["emptyDir"]["sizeLimit"]) <= quantity(requests["ephemeral-storage"])

    # KEDA: one pod's share of the queue is what one pod holds.
    [scaled] = by_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    assert set(meta) <= {
        "queueURL", "awsRegion", "queueLength", "activationQueueLength", "scaleOnInFlight",
        "scaleOnDelayed", "awsEndpoint",
    }, "an unknown aws-sqs-queue parameter"  # fmt: skip
    assert meta["queueURL"] == spec.queue
    assert int(meta["queueLength"]) == spec.max_messages_in_flight, "queueLength = in flight"
    assert int(meta["activationQueueLength"]) == 0
    assert meta["scaleOnInFlight"] == "true"  # busy pods are counted, not scaled away
    # KEDA reads the queue as the worker's own role: the ServiceAccount carries it (IRSA).
    [auth] = by_kind(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    identity = auth["spec"]["podIdentity"]
    assert identity == {"provider": "aws", "identityOwner": "workload"}, "the workload's identity"
    accounts = {a["metadata"]["name"]: a for a in by_kind(docs, "ServiceAccount")}
    account = accounts[pod["serviceAccountName"]]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
    )
    return "neuron" if neuron else "cpu"


def test_the_cpu_and_neuron_workers_follow_the_rules() -> None:
    assert [check_worker(documents(name)) for name in WORKERS] == ["cpu", "neuron"]


def test_the_variants_share_the_queue_role_and_keda_identity() -> None:
    cpu, neuron = (documents(name) for name in WORKERS)
    for kind in ("ServiceAccount", "TriggerAuthentication"):
        assert by_kind(cpu, kind) == by_kind(neuron, kind)
    queues = [by_kind(d, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["queueURL"]
              for d in (cpu, neuron)]  # fmt: skip
    assert queues[0] == queues[1]


def edit_args(docs: list[dict[str, Any]], flag: str, value: str) -> None:
    [deployment] = by_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index(flag) + 1] = value


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: edit_args(d, "--max-messages-in-flight", "16"), "queueLength = in flight"),
        (lambda d: edit_args(d, "--replicas", "3"), "per replica core"),
        (lambda d: by_kind(d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
         ["resources"]["limits"].update(memory="9Gi"), "requests = limits"),
        (lambda d: by_kind(d, "TriggerAuthentication")[0]["spec"]["podIdentity"]
         .update(roleArn="arn:aws:iam::123456789012:role/x"), "the workload's identity"),
        (lambda d: by_kind(d, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
         .update(queueLenght="8"), "unknown aws-sqs-queue parameter"),
    ],
    ids=["in-flight", "replicas", "requests-limits", "role-arn", "typo"],
)  # fmt: skip
@pytest.mark.parametrize("name", WORKERS)
def test_the_rules_catch_a_broken_manifest(name: str, edit: Any, needle: str) -> None:
    docs = copy.deepcopy(documents(name))
    edit(docs)
    with pytest.raises(AssertionError, match=needle):
        check_worker(docs)
