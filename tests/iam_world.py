"""The IAM policies of manifests/iam/ against a moto server that enforces IAM, and what the
code under test asked of AWS.

- `IamWorld`: a moto server of its own (never the shared one of tests/s3_server.py: other
  tests use that one without credentials) in which IAM is enforced once set up: the bucket,
  queue and users of the policies' example names, each user holding one policy.
- `aws_calls`: the requests a recording proxy saw, as IAM actions on resources (the map the
  AWS docs give: HeadObject → s3:GetObject, ListObjectsV2 → s3:ListBucket on the bucket, ...).
- `allowed_by`: which statements of a policy allow a call, conditions included. moto checks
  actions and resources but not conditions (it evaluates StringEquals on sts:ExternalId
  only), so the s3:prefix and s3:ResourceAccount conditions are checked here, on the calls
  the code really made.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import requests

from tests.s3_server import MotoServer, Request

POLICIES = Path(__file__).resolve().parent.parent / "manifests" / "iam"
# The example names every manifest uses; the moto server's account is the same.
ACCOUNT = "123456789012"
REGION = "us-east-1"
BUCKET = "my-bucket"
QUEUE = "batchjob-input"
QUEUE_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{QUEUE}"
INPUT = f"s3://{BUCKET}/incoming/"
OUTPUT = f"s3://{BUCKET}/embeddings/"
ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
# The batch forms of SQS calls need the single form's action (SQS API reference, AddPermission).
SQS_ACTIONS = {
    "ChangeMessageVisibilityBatch": "ChangeMessageVisibility",
    "DeleteMessageBatch": "DeleteMessage",
    "SendMessageBatch": "SendMessage",
}


def load_policy(name: str) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads((POLICIES / f"{name}.json").read_text())
    return policy


@dataclass(frozen=True)
class Keys:
    id: str
    secret: str


@dataclass
class IamWorld:
    """The moto server, set up: `users[name]` holds the policy manifests/iam/<name>.json."""

    server: MotoServer
    admin: Keys
    users: dict[str, Keys] = field(default_factory=dict)
    queue_url: str = ""
    dlq_url: str = ""

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, service: str, keys: Keys | None = None) -> Any:
        keys = keys or self.admin
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=keys.id,
            aws_secret_access_key=keys.secret,
        )

    def set_up(
        self,
        objects: dict[str, bytes],
        policies: tuple[str, ...] = ("run", "worker", "serve", "submit"),
    ) -> None:
        """Everything anew, with IAM not enforced; then enforced from the next request on."""
        self._enforce(False)
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
        root = Keys("testing", "testing")  # any key works while IAM is not enforced
        s3, sqs, iam = (self.client(s, root) for s in ("s3", "sqs", "iam"))
        for bucket in (BUCKET, "other-bucket"):
            s3.create_bucket(Bucket=bucket)
        for key, data in objects.items():
            bucket, _, key = key.partition("/")
            s3.put_object(Bucket=bucket, Key=key, Body=data)
        self.dlq_url = sqs.create_queue(QueueName=f"{QUEUE}-dlq")["QueueUrl"]
        dlq_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{QUEUE}-dlq"
        redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"})
        attributes = {"VisibilityTimeout": "30", "RedrivePolicy": redrive}
        self.queue_url = sqs.create_queue(QueueName=QUEUE, Attributes=attributes)["QueueUrl"]
        sqs.create_queue(QueueName="another-queue")
        self.admin = _user(iam, "admin", json.dumps(ADMIN_POLICY))
        # create_policy validates the document's grammar, as IAM does.
        self.users = {
            name: _user(iam, name, json.dumps(for_moto(load_policy(name)))) for name in policies
        }
        self._enforce(True)

    def _enforce(self, on: bool) -> None:
        # moto enforces IAM after INITIAL_NO_AUTH_ACTION_COUNT requests; 0: from now on.
        body = b"0" if on else b"inf"
        requests.post(f"{self.url}/moto-api/reset-auth", data=body, timeout=10).raise_for_status()


def for_moto(policy: dict[str, Any]) -> dict[str, Any]:
    """`policy` as moto needs it: moto checks the batch forms of SQS calls against actions of
    their own name (sqs:DeleteMessageBatch), which IAM doesn't have: AWS checks them against
    the single form's action. Added beside it, so that moto checks the rest as AWS would."""
    policy = json.loads(json.dumps(policy))
    batch_of = {f"sqs:{single}": f"sqs:{batch}" for batch, single in SQS_ACTIONS.items()}
    for statement in policy["Statement"]:
        actions = _listed(statement["Action"])
        statement["Action"] = actions + [batch_of[a] for a in actions if a in batch_of]
    return policy


def _user(iam: Any, name: str, document: str) -> Keys:
    iam.create_user(UserName=name)
    arn = iam.create_policy(PolicyName=name, PolicyDocument=document)["Policy"]["Arn"]
    iam.attach_user_policy(UserName=name, PolicyArn=arn)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return Keys(key["AccessKeyId"], key["SecretAccessKey"])


# -- what the code asked for -----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    action: str
    resource: str
    prefix: str | None = None  # ListObjectsV2's Prefix: the s3:prefix condition key
    owner: str = ACCOUNT  # the bucket's owner (moto's one account): s3:ResourceAccount

    def context(self) -> dict[str, str]:
        """The condition keys of the request, as far as the policies use them."""
        if not self.action.startswith("s3:"):
            return {}
        keys = {"s3:ResourceAccount": self.owner}
        if self.prefix is not None:
            keys["s3:prefix"] = self.prefix
        return keys


def aws_calls(seen: list[Request]) -> Iterator[Call]:
    """Each request as the IAM action it needs; a request of a kind not mapped here fails
    the test (a new call in the code: see whether the policies still fit it)."""
    for request in seen:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if target := headers.get("x-amz-target"):
            operation = target.rpartition(".")[2]
            # The queue is in the body, which the proxy doesn't keep: moto itself checked
            # that the queue ARN is the resource allowed.
            yield Call("sqs:" + SQS_ACTIONS.get(operation, operation), QUEUE_ARN)
            continue
        yield _s3_call(request)


def _s3_call(request: Request) -> Call:
    url = urllib.parse.urlsplit(request.path)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    query.pop("x-id", None)  # botocore's name of the operation, where it adds one
    bucket, _, key = url.path.lstrip("/").partition("/")
    method = request.method
    if not key and method == "GET" and query.get("list-type") == ["2"]:
        return Call("s3:ListBucket", f"arn:aws:s3:::{bucket}", query.get("prefix", [None])[0])
    resource = f"arn:aws:s3:::{bucket}/{key}"
    if key and method in ("GET", "HEAD") and not query.keys() - {"partNumber"}:
        return Call("s3:GetObject", resource)
    # PutObject, UploadPart; CreateMultipartUpload, CompleteMultipartUpload
    if key and method == "PUT" and not query.keys() - {"partNumber", "uploadId"}:
        return Call("s3:PutObject", resource)
    if key and method == "POST" and set(query) in ({"uploads"}, {"uploadId"}):
        return Call("s3:PutObject", resource)
    if key and method == "DELETE" and set(query) == {"uploadId"}:
        return Call("s3:AbortMultipartUpload", resource)
    raise AssertionError(f"a request the IAM map here doesn't know: {method} {request.path}")


# -- which statements allow a call ------------------------------------------------------------


def _like(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    """IAM's wildcards: * any run of characters (also / and :), ? one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE if ignore_case else 0) is not None


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _conditions_hold(conditions: dict[str, dict[str, Any]], context: dict[str, str]) -> bool:
    for operator, tests in conditions.items():
        for key, expected in tests.items():
            actual = context.get(key)
            if actual is None:  # a key the request doesn't have: the condition is false
                return False
            if operator == "StringEquals":
                ok = actual in _listed(expected)
            elif operator == "StringLike":
                ok = any(_like(pattern, actual) for pattern in _listed(expected))
            else:
                raise AssertionError(f"condition operator {operator} is not evaluated here")
            if not ok:
                return False
    return True


def allowed_by(policy: dict[str, Any], call: Call) -> list[tuple[str, str]]:
    """(Sid, action) of each Allow statement that allows `call`; [] when none does."""
    found = []
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow", "a Deny statement: not evaluated here"
        actions = [
            a for a in _listed(statement["Action"]) if _like(a, call.action, ignore_case=True)
        ]
        if not actions or not any(_like(r, call.resource) for r in _listed(statement["Resource"])):
            continue
        if _conditions_hold(statement.get("Condition", {}), call.context()):
            found += [(statement["Sid"], action) for action in actions]
    return found


def granted(policy: dict[str, Any]) -> set[tuple[str, str]]:
    """Every (Sid, action) the policy grants."""
    return {(s["Sid"], a) for s in policy["Statement"] for a in _listed(s["Action"])}
