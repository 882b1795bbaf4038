"""Opening an engine: the artifact (verified, or compiled into the cache) and where its
replicas run, then the replicas started with the tokenizer loaded meanwhile: what `run`,
`worker` and `serve` do before their first record."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

from batchjob.artifact import Artifact, ArtifactLoader, is_artifact, load_artifact
from batchjob.backends import backend_device
from batchjob.config import CompileSpec
from batchjob.cores import Placement, plan_placements
from batchjob.engine import Engine
from batchjob.errors import UsageError
from batchjob.model_location import local_compile_spec
from batchjob.replicas import ReplicaPool
from batchjob.startup import mark
from batchjob.tasks import Head
from batchjob.tokens import RecordTokenizer


class EngineSpec(Protocol):
    """What opening an engine needs of a RunSpec, WorkerSpec or ServeSpec."""

    @property
    def compile(self) -> CompileSpec: ...
    @property
    def cache_dir(self) -> str: ...
    @property
    def replicas(self) -> int | None: ...
    @property
    def cores_per_replica(self) -> int: ...


def open_artifact(spec: EngineSpec) -> tuple[Artifact, list[Placement]]:
    """The artifact (verified, or compiled first into the cache), checked against `--task`,
    and where its replicas run. Blocking (a compile takes a while). UsageError: nothing ran.
    An artifact is opened without importing torch or transformers; a plain model compiles
    with both. An s3:// model is fetched into the cache first (model_location.py)."""
    owner = getattr(spec, "expected_bucket_owner", None)  # run and worker have one
    compile = local_compile_spec(spec.compile, spec.cache_dir, expected_bucket_owner=owner)
    artifact = resolve_artifact(compile, spec.cache_dir)
    device = backend_device(artifact.backend)
    return artifact, plan_placements(spec.replicas, spec.cores_per_replica, device)


def resolve_artifact(spec: CompileSpec, cache_dir: str) -> Artifact:
    """The artifact of `spec.model` (verified, or compiled first into the cache), checked
    against `spec.task`: `open_artifact` without the placements (a Ray Data actor is one
    replica, placed by Ray). `spec.model` is local here."""
    if is_artifact(spec.model):
        artifact = load_artifact(spec.model)
    else:
        from batchjob.compile import ensure_artifact

        artifact = ensure_artifact(spec, cache_dir)
    if spec.task is not None and artifact.task != spec.task:
        raise UsageError(
            f"--task is {spec.task} but the artifact {artifact.path} was compiled for "
            f"{artifact.task}"
        )
    return artifact


async def start_engine(
    stack: contextlib.AsyncExitStack,
    artifact: Artifact,
    placements: Sequence[Placement],
    *,
    start_timeout: float,
    max_batch_delay: float,
    sort_window: int = 4096,
    wait_for_replicas: bool = True,
    head: Head | None = None,
) -> tuple[Engine, ReplicaPool]:
    """The replicas started, the tokenizer loaded meanwhile (in a thread), and an engine over
    them; `stack` closes both (the engine first). Returns once a replica is ready (the others
    join as they come up); with `wait_for_replicas=False`, once the replicas' processes run:
    the engine takes records while they load the model, and the caller awaits `pool.start()`
    (a replica that never comes up raises there, and the batches waiting for one fail)."""
    pool = ReplicaPool(ArtifactLoader(artifact), placements, start_timeout=start_timeout)
    stack.push_async_callback(pool.close)
    pool.launch()  # in the background: loading a replica takes longer than anything here
    tokenizer = asyncio.create_task(
        asyncio.to_thread(_load_tokenizer, artifact.tokenizer_path, artifact.max_length)
    )
    try:
        if wait_for_replicas:
            await pool.start()
        else:
            # Not before: reading and tokenizing would slow the fork server's torch import,
            # the longest step, on a machine of few cores.
            await pool.launched()
    finally:
        if not tokenizer.done():
            await asyncio.wait([tokenizer])
    engine = Engine(
        artifact,
        pool,
        max_batch_delay=max_batch_delay,
        sort_window=sort_window,
        tokenizer=tokenizer.result(),
        head=head,
    )
    await stack.enter_async_context(engine)
    return engine, pool


def _load_tokenizer(path: str, max_length: int) -> RecordTokenizer:
    tokenizer = RecordTokenizer(path, max_length)
    mark("tokenizer loaded")
    return tokenizer
