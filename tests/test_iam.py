"""manifests/iam/*.json: valid policy documents, consistent with the other manifests, enough
for the real `batchjob run`, `worker`, `submit` and `status` against a moto server that
enforces IAM, every permission they grant used, and what they must not allow refused.

What moto can't show: it evaluates actions and resources but not conditions, so the
s3:prefix and s3:ResourceAccount conditions are checked on the calls the code made (tests
here evaluate them, see tests/iam_world.py); serve.json (SageMaker's execution role) is
checked for grammar and against the SageMaker manifests only: no SageMaker here.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from botocore.exceptions import ClientError

from tests.conftest import assert_usage_error, batchjob_run, invoke, make_texts
from tests.iam_world import (
    ACCOUNT,
    BUCKET,
    INPUT,
    OUTPUT,
    POLICIES,
    QUEUE_ARN,
    Call,
    IamWorld,
    Keys,
    allowed_by,
    aws_calls,
    granted,
    load_policy,
)
from tests.s3_server import FaultProxy, MotoServer, aws_environment
from tests.sqs_queues import Queue, worker_process

NAMES = ("run", "worker", "serve", "submit")
STARTUP = 120.0  # seconds: bound on imports + replica start of a command on a busy machine
MANIFESTS = POLICIES.parent
# Granted, but needed only where these tests can't go: an abort follows a failed multipart
# upload (outputs over 64 MiB); GetQueueUrl, a --queue given by name (moto, unlike SQS,
# checks GetQueueUrl against "*" instead of the queue's ARN, and so refuses it).
NOT_EXERCISED = {"s3:AbortMultipartUpload", "sqs:GetQueueUrl"}


def tar_gz_of(folder: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue()


def jsonl(prefix: str, n: int, seed: int) -> bytes:
    rows = [
        json.dumps({"id": f"{prefix}{i}", "text": t}) for i, t in enumerate(make_texts(n, seed))
    ]
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture(scope="module", name="iam_server")
def iam_server_fixture() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="world")
def world_fixture(iam_server: MotoServer) -> IamWorld:
    world = IamWorld(iam_server, Keys("", ""))
    world.set_up(
        {
            f"{BUCKET}/incoming/a.jsonl": jsonl("a", 12, 1),
            f"{BUCKET}/incoming/sub/b.jsonl": jsonl("b", 9, 2),
            f"{BUCKET}/private/secret.jsonl": jsonl("s", 3, 3),
            "other-bucket/incoming/a.jsonl": jsonl("o", 3, 4),
        }
    )
    return world


@pytest.fixture(name="recorder")
def recorder_fixture(world: IamWorld) -> Iterator[FaultProxy]:
    """A proxy in front of moto that keeps every request the code under test makes."""
    proxy = FaultProxy(world.url)
    try:
        yield proxy
    finally:
        proxy.stop()


def act_as(
    world: IamWorld, who: str, endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> None:
    """The standard AWS environment (inherited by subprocesses) with `who`'s keys."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)
    keys = world.users[who]
    env = {**aws_environment(endpoint, tmp), "AWS_ACCESS_KEY_ID": keys.id}
    env["AWS_SECRET_ACCESS_KEY"] = keys.secret
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def ids(world: IamWorld, key: str) -> list[str]:
    data = world.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return [str(i) for i in pq.read_table(io.BytesIO(data)).column("id").to_pylist()]


def keys_under(world: IamWorld, prefix: str) -> list[str]:
    listing = world.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", ())]


def assert_enough_and_all_used(policy_name: str, proxy: FaultProxy) -> list[Call]:
    """Every call the code made is allowed by the policy, conditions included, and every
    (statement, action) the policy grants was needed by some call."""
    policy, calls = load_policy(policy_name), list(aws_calls(proxy.requests))
    assert calls
    refused = [call for call in calls if not allowed_by(policy, call)]
    assert not refused, f"{policy_name}.json doesn't allow: {refused}"
    used = {grant for call in calls for grant in allowed_by(policy, call)}
    unused = {g for g in granted(policy) - used if g[1] not in NOT_EXERCISED}
    assert not unused, f"{policy_name}.json grants what no call needed: {unused}"
    return calls


# -- the documents ----------------------------------------------------------------------------


def lint_findings(documents: dict[str, Any]) -> list[str]:
    """cfn-lint's IAM rules (schema, known actions, resources that fit them), offline."""
    from cfnlint.api import ManualArgs, lint

    resources = {
        f"Policy{i}": {"Type": "AWS::IAM::ManagedPolicy", "Properties": {"PolicyDocument": d}}
        for i, d in enumerate(documents.values())
    }
    template = {"AWSTemplateFormatVersion": "2010-09-09", "Resources": resources}
    config = ManualArgs(regions=["us-east-1"], include_checks=["I"])
    return [str(m) for m in lint(json.dumps(template), config=config)]


def test_documents_are_valid_for_iam_and_cfn_lint(world: IamWorld) -> None:
    policies = {name: load_policy(name) for name in NAMES}
    assert sorted(p.stem for p in POLICIES.glob("*.json")) == sorted(NAMES)
    for policy in policies.values():
        assert policy["Version"] == "2012-10-17"
        sids = [s["Sid"] for s in policy["Statement"]]
        assert len(set(sids)) == len(sids)
    # IAM's grammar as moto's create_policy checks it, and cfn-lint's IAM rules.
    iam = world.client("iam")
    for name, policy in policies.items():
        iam.create_policy(PolicyName=f"as-written-{name}", PolicyDocument=json.dumps(policy))
    assert lint_findings(policies) == []
    # Both validators do catch mistakes: an API name for an action, a malformed ARN.
    wrong = json.loads(json.dumps(policies["run"]))
    wrong["Statement"][0]["Action"] = "s3:ListObjectsV2"
    assert any("W3037" in finding for finding in lint_findings({"run": wrong}))
    wrong["Statement"][0]["Resource"] = "arn:aws:s3:my-bucket"
    with pytest.raises(ClientError, match="MalformedPolicyDocument"):
        world.client("iam").create_policy(PolicyName="wrong", PolicyDocument=json.dumps(wrong))


def test_no_wildcard_actions_and_star_resources_only_where_iam_needs_them() -> None:
    from cfnlint.data import AdditionalSpecs
    from cfnlint.helpers import load_resource

    service_map = load_resource(AdditionalSpecs, "Policies.json")  # the IAM service reference
    on_star: dict[str, Any] = {}  # action → the statement's Condition
    for name in NAMES:
        for statement in load_policy(name)["Statement"]:
            actions, resources = statement["Action"], statement["Resource"]
            actions = [actions] if isinstance(actions, str) else actions
            assert all("*" not in a and "?" not in a for a in actions), (name, actions)
            if resources == "*":
                on_star |= {a: statement.get("Condition") for a in actions}
            elif any(a.startswith("s3:") for a in actions):
                account = statement["Condition"]["StringEquals"]["s3:ResourceAccount"]
                assert account == ACCOUNT, (name, statement["Sid"])
    # ecr:GetAuthorizationToken has no resource types; PutMetricData is scoped by namespace
    # (CloudWatch's docs: Resource "*" with cloudwatch:namespace).
    assert set(on_star) == {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"}
    assert "Resources" not in service_map["ecr"]["Actions"]["getauthorizationtoken"]
    assert on_star["cloudwatch:PutMetricData"] == {
        "StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}
    }


def container_args(path: str) -> list[str]:
    for document in yaml.safe_load_all((MANIFESTS / "kubernetes" / path).read_text()):
        if document["kind"] in ("CronJob", "Deployment"):
            spec = document["spec"]
            pod = spec.get("jobTemplate", {}).get("spec", spec)["template"]["spec"]
            args: list[str] = pod["containers"][0]["args"]
            return args
    raise AssertionError(f"no workload in {path}")


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def s3_arn(uri: str, rest: str = "") -> str:
    return "arn:aws:s3:::" + uri.removeprefix("s3://") + rest


def test_policies_fit_the_other_manifests() -> None:
    """The names in the policies are the ones the deployable manifests use."""
    run, worker, serve = (load_policy(name) for name in ("run", "worker", "serve"))
    cron = container_args("cronjob.yaml")
    inp, out = flag(cron, "--input"), flag(cron, "--output")
    bucket = f"arn:aws:s3:::{BUCKET}"
    needs = [
        Call("s3:ListBucket", bucket, inp.split("/", 3)[3]),
        Call("s3:GetObject", s3_arn(inp, "a/b.jsonl")),
        Call("s3:ListBucket", bucket, out.split("/", 3)[3]),  # --resume
        Call("s3:PutObject", s3_arn(out, "a/b.parquet")),
    ]
    assert all(allowed_by(run, call) for call in needs), needs
    assert flag(cron, "--expected-bucket-owner") == ACCOUNT
    for manifest in ("sqs-worker.yaml", "sqs-worker-neuron.yaml"):
        deployment = container_args(manifest)
        url = flag(deployment, "--queue")  # https://sqs.REGION.amazonaws.com/ACCOUNT/NAME
        region, account, name = url.split(".")[1], url.split("/")[3], url.split("/")[4]
        assert f"arn:aws:sqs:{region}:{account}:{name}" == QUEUE_ARN
        allowed_input, out = flag(deployment, "--allow-input"), flag(deployment, "--output")
        needs = [Call(f"sqs:{a}", QUEUE_ARN) for a in ("ReceiveMessage", "DeleteMessage")]
        needs += [
            Call("s3:GetObject", s3_arn(flag(deployment, "--model"))),  # the HEAD, the GET
            Call("s3:GetObject", s3_arn(allowed_input, "x.jsonl")),
            Call("s3:GetObject", s3_arn(out, "x.parquet")),  # the HEAD of a finished output
            Call("s3:PutObject", s3_arn(out, "x.parquet")),
        ]
        assert all(allowed_by(worker, call) for call in needs), (manifest, needs)
        # The model is read by the worker, never by what messages ask for.
        assert not flag(deployment, "--model").startswith(allowed_input)
    model = json.loads((MANIFESTS / "sagemaker" / "create-model.json").read_text())
    job = json.loads((MANIFESTS / "sagemaker" / "create-transform-job.json").read_text())
    image = model["PrimaryContainer"]["Image"]  # ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG
    registry, _, repository = image.partition("/")
    repository_arn = (
        f"arn:aws:ecr:{registry.split('.')[3]}:{registry.split('.')[0]}:"
        f"repository/{repository.partition(':')[0]}"
    )
    source = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
    output = job["TransformOutput"]["S3OutputPath"]
    needs = [
        Call("s3:GetObject", s3_arn(model["PrimaryContainer"]["ModelDataUrl"])),
        Call("s3:ListBucket", bucket, source.split("/", 3)[3]),
        Call("s3:GetObject", s3_arn(source, "part-0.jsonl")),
        Call("s3:PutObject", s3_arn(output, "part-0.jsonl.out")),
        Call("ecr:BatchGetImage", repository_arn),
        Call("ecr:GetDownloadUrlForLayer", repository_arn),
    ]
    assert all(allowed_by(serve, call) for call in needs), needs
    assert not allowed_by(serve, Call("s3:PutObject", s3_arn(source, "x")))  # input read-only


# -- enough: the real commands under each policy --------------------------------------------------


def test_run_then_resume_under_the_run_policy(
    artifact: str,
    world: IamWorld,
    recorder: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    act_as(world, "run", recorder.url, monkeypatch, tmp_path)
    out, err = tmp_path / "out", tmp_path / "err"
    owner = ("--expected-bucket-owner", ACCOUNT)  # as the CronJob runs it
    with batchjob_run(artifact, INPUT, OUTPUT, out, err, *owner) as proc:
        assert proc.wait(timeout=STARTUP) == 0, err.read_text()
    assert ids(world, "embeddings/a.parquet") == [f"a{i}" for i in range(12)]
    assert ids(world, "embeddings/sub/b.parquet") == [f"b{i}" for i in range(9)]
    # A new input object, then --resume: only it is done.
    world.client("s3").put_object(Bucket=BUCKET, Key="incoming/c.jsonl", Body=jsonl("c", 5, 5))
    with batchjob_run(artifact, INPUT, OUTPUT, out, err, *owner, "--resume") as proc:
        assert proc.wait(timeout=STARTUP) == 0, err.read_text()
    assert "1 shards done, 0 failed, 2 skipped" in out.read_text()
    assert ids(world, "embeddings/c.parquet") == [f"c{i}" for i in range(5)]
    calls = assert_enough_and_all_used("run", recorder)
    # The listings: the input, (--resume) the output, and the run records _manifest.json
    # sums up; never the bucket's root.
    assert {c.prefix for c in calls if c.action == "s3:ListBucket"} == {
        "incoming/",
        "embeddings/",
        "embeddings/_batchjob/runs/",
    }


def test_worker_under_the_worker_policy(
    artifact: str,
    world: IamWorld,
    recorder: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    sqs = world.client("sqs")
    queue = Queue(world.queue_url, QUEUE_ARN, sqs)
    queue.send({"input": f"{INPUT}sub/"})  # a job: a prefix
    for key in ("incoming/a.jsonl", "private/secret.jsonl"):  # the second: not --allow-input
        s3 = {"bucket": {"name": BUCKET}, "object": {"key": key}}
        queue.send({"Records": [{"eventName": "ObjectCreated:Put", "s3": s3}]})
    # The model from S3, as the Deployment has it: an artifact tarred as model.tar.gz.
    model = "models/minilm/model.tar.gz"
    world.client("s3").put_object(Bucket=BUCKET, Key=model, Body=tar_gz_of(artifact))
    act_as(world, "worker", recorder.url, monkeypatch, tmp_path)
    flags = ("--allow-input", INPUT, "--expected-bucket-owner", ACCOUNT, "--exit-when-idle", "2")
    flags += ("--cache-dir", str(tmp_path / "cache"))
    with worker_process(f"s3://{BUCKET}/{model}", queue, OUTPUT, tmp_path, *flags) as worker:
        assert worker.finish() == 0, worker.log()
    assert len(worker.messages("done")) == 2, worker.log()
    assert "private/secret.jsonl is not under --allow-input" in worker.log()
    assert ids(world, "embeddings/b.parquet") == [f"b{i}" for i in range(9)]  # run's layout
    assert ids(world, "embeddings/incoming/a.parquet") == [f"a{i}" for i in range(12)]
    assert queue.depth() == 0, worker.log()
    assert Queue(world.dlq_url, "", sqs).depth() == 1  # the refused one, after one failure
    calls = assert_enough_and_all_used("worker", recorder)
    assert {c.prefix for c in calls if c.action == "s3:ListBucket"} == {
        "incoming/sub/",
        "embeddings/",
    }


def test_submit_and_status_under_the_submit_policy(
    world: IamWorld,
    recorder: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    act_as(world, "submit", recorder.url, monkeypatch, tmp_path)
    base = ["submit", "--queue", world.queue_url, "--output", OUTPUT]
    owner = ("--expected-bucket-owner", ACCOUNT)
    code, out, err = invoke([*base, "--input", INPUT, "--job-id", "all", *owner], capsys)
    assert (code, out) == (
        0,
        "batchjob submit: job all: 2 shards, 0 done already, 2 sent in 2 messages\n",
    ), err
    # One object (a HEAD tells it from a prefix), as its own job.
    code, out, err = invoke([*base, "--input", f"{INPUT}a.jsonl", "--job-id", "one"], capsys)
    assert code == 0, err
    code, out, err = invoke(["status", "--output", OUTPUT, *owner], capsys)
    assert code == 3, err
    # Both jobs name a.jsonl: one output, one shard to the output's status.
    assert out.startswith(f"{OUTPUT}: in progress: 0/2 shards done, 2 remaining"), out
    assert Queue(world.queue_url, QUEUE_ARN, world.client("sqs")).depth() == 3
    calls = assert_enough_and_all_used("submit", recorder)
    assert {c.prefix for c in calls if c.action == "s3:ListBucket"} == {
        "incoming/",
        "embeddings/",
        "embeddings/_batchjob/jobs/",
        "embeddings/_batchjob/jobs/all/",
        "embeddings/_batchjob/jobs/one/",
        "embeddings/_batchjob/runs/",
    }


# -- no more ------------------------------------------------------------------------------------


def forbidden_calls(world: IamWorld, who: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """What `who` must not do: (service, method, parameters) by what it would mean."""
    another_queue = world.queue_url.replace("batchjob-input", "another-queue")
    calls: dict[str, tuple[str, str, dict[str, Any]]] = {
        "read another prefix": ("s3", "get_object", {"Key": "private/secret.jsonl"}),
        "read another bucket": (
            "s3", "get_object", {"Bucket": "other-bucket", "Key": "incoming/a.jsonl"}
        ),
        "list another bucket": (
            "s3", "list_objects_v2", {"Bucket": "other-bucket", "Prefix": "incoming/"}
        ),
        "write the input": ("s3", "put_object", {"Key": "incoming/x.jsonl", "Body": b""}),
        "write elsewhere": ("s3", "put_object", {"Key": "private/x", "Body": b""}),
        "start an upload elsewhere": ("s3", "create_multipart_upload", {"Key": "x"}),
        "delete an output": ("s3", "delete_object", {"Key": "embeddings/x.parquet"}),
        "send to the queue": (
            "sqs", "send_message", {"QueueUrl": world.queue_url, "MessageBody": "x"}
        ),
        "purge the queue": ("sqs", "purge_queue", {"QueueUrl": world.queue_url}),
        "read another queue": ("sqs", "receive_message", {"QueueUrl": another_queue}),
    }  # fmt: skip
    if who == "run":  # run neither reads its outputs nor touches SQS
        calls["read an output"] = ("s3", "get_object", {"Key": "embeddings/x.parquet"})
        calls["receive"] = ("sqs", "receive_message", {"QueueUrl": world.queue_url})
    return calls


def denied(client: Any, method: str, parameters: dict[str, Any]) -> bool:
    if client.meta.service_model.service_name == "s3":
        parameters = {"Bucket": BUCKET, **parameters}
    try:
        getattr(client, method)(**parameters)
    except ClientError as e:
        # moto answers SQS's JSON protocol with an XML error: botocore's code is then "403".
        status = e.response["ResponseMetadata"]["HTTPStatusCode"]
        return status == 403 and "AccessDenied" in str(e.response["Error"])
    return False


@pytest.mark.parametrize("who", ["run", "worker"])
def test_what_the_run_and_worker_policies_refuse(world: IamWorld, who: str) -> None:
    clients = {service: world.client(service, world.users[who]) for service in ("s3", "sqs")}
    allowed = [
        what
        for what, (service, method, parameters) in forbidden_calls(world, who).items()
        if not denied(clients[service], method, parameters)
    ]
    assert not allowed, f"{who}.json allows: {allowed}"
    # What it may do with an upload of its own: start it, and abort it.
    s3, key = clients["s3"], "embeddings/big.parquet"
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)
    s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"])


@pytest.mark.parametrize("name", ["run", "worker", "submit"])
def test_conditions_moto_cannot_check_refuse_what_they_should(name: str) -> None:
    """Evaluated here (moto ignores conditions): no listing outside the two prefixes, and no
    bucket of that name owned by another account (taken over after ours was deleted)."""
    policy, bucket = load_policy(name), f"arn:aws:s3:::{BUCKET}"
    for prefix in (None, "", "private/", "incomingx/", "embedding"):
        assert not allowed_by(policy, Call("s3:ListBucket", bucket, prefix)), prefix
    for prefix in ("incoming/", "incoming/sub/", "embeddings/"):
        assert allowed_by(policy, Call("s3:ListBucket", bucket, prefix)), prefix
    taken_over = Call("s3:GetObject", f"{bucket}/incoming/a.jsonl", owner="999999999999")
    assert not allowed_by(policy, taken_over)
    assert allowed_by(policy, Call("s3:GetObject", f"{bucket}/incoming/a.jsonl"))


def test_commands_outside_their_policy_are_refused_in_one_line(
    artifact: str, world: IamWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    act_as(world, "run", world.url, monkeypatch, tmp_path)
    base = ["run", "--model", artifact, "--replicas", "1", "--progress", "none"]
    code, out, err = invoke(
        [*base, "--input", "s3://other-bucket/incoming/", "--output", OUTPUT], capsys
    )
    assert_usage_error(code, out, err, ("--input s3://other-bucket/incoming/", "AccessDenied"))
    elsewhere = f"s3://{BUCKET}/private-out/"
    code, out, err = invoke([*base, "--input", INPUT, "--output", elsewhere], capsys)
    assert_usage_error(code, out, err, (f"--output {elsewhere}: can't be written", "AccessDenied"))
    argv = ["worker", "--model", artifact, "--queue", world.queue_url, "--output", OUTPUT]
    code, out, err = invoke([*argv, "--allow-input", INPUT], capsys)  # the run role: no SQS
    # One line on SQS; moto answers the JSON protocol with an XML error, whose lines show.
    assert (code, out) == (2, ""), err
    assert err.startswith(f"batchjob worker: error: --queue {world.queue_url}: GetQueueAttributes")
    assert "AccessDenied" in err
    assert keys_under(world, "private-out/") == []
    assert keys_under(world, "embeddings/") == []
