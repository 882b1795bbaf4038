"""Ray Data: `Predictor`, a callable class for `Dataset.map_batches`. One actor is one replica.

    import ray
    from batchjob.ray import Predictor

    ds = ray.data.read_parquet("s3://bucket/docs/")
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": "s3-synced/artifact", "text_field": "body"},
        batch_format="pyarrow",  # or "pandas"
        concurrency=4,           # actors: replicas
        num_cpus=1,              # each actor's torch threads; on Inferentia
    )                            # resources={"neuron_cores": 1} instead
    ds.write_parquet("s3://bucket/predictions/")

The actor loads the artifact's graphs once and runs them in its own process (no replica
processes beside Ray's actors), fed by the engine `batchjob run` uses (`local_engine`): each
Ray batch is tokenized and packed into the compiled fixed shapes, as many graph calls as it
takes. The constructor's keyword arguments are `run`'s flags of the same names; the batch
comes back with every input column as it was, and `run`'s columns added with their Arrow
types (`label`, `score`, `scores` [, `labels`] or `embedding`; `chunk`, `char_start`,
`char_end` with `long_documents="chunk"`, a row per window; `truncated`, `error`). There is
no `id` column: the input's own columns say which row is which. A record without a usable
text (null, not a string) is an error row, as in `run`; it never fails the Ray task.

Ray itself is imported only here, and only to read the actor's CPUs: `import batchjob`
needs no Ray.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import pyarrow as pa

from batchjob.artifact import ArtifactLoader
from batchjob.config import DEFAULT_CHUNK_OVERLAP, CompileSpec, default_cache_dir, require
from batchjob.engine_start import resolve_artifact
from batchjob.errors import UsageError
from batchjob.local_engine import LocalEngine
from batchjob.output_format import make_head, output_format
from batchjob.pipeline import result_rows
from batchjob.prompts import resolve_text_options
from batchjob.records import Fields, Record, row_record
from batchjob.sinks import output_schema, row_columns, task_names
from batchjob.tokens import RecordTokenizer

if TYPE_CHECKING:
    import pandas as pd

    Batch: TypeAlias = pa.Table | pd.DataFrame

log = logging.getLogger("batchjob.ray")

# What error messages name a record by: a Ray batch's rows have no file and line.
ROW = "this row"
TEXT_OPTION_NAMES = ("long_documents", "chunk_overlap", "prompt", "prompt_name")


class Predictor:
    """`Dataset.map_batches(Predictor, fn_constructor_kwargs={"model": ...}, ...)`: the
    artifact's graphs loaded once per actor, then called per batch (pyarrow or pandas)."""

    def __init__(
        self,
        model: str,
        *,
        task: str | None = None,
        text_field: str = "text",
        text_pair_field: str | None = None,
        long_documents: str = "truncate",
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
        prompt: str | None = None,
        prompt_name: str | None = None,
        embedding_type: str = "fixed",
        embedding_dim: int | None = None,
        embedding_precision: str = "float32",
        embedding_ranges: str | None = None,
        multi_label: bool = False,
        threshold: float | None = None,
        sort_window: int = 4096,
        cores_per_replica: int | None = None,
        cache_dir: str = "",
        **unknown: object,
    ) -> None:
        if unknown:
            raise UsageError(
                f"Predictor: unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(sorted(unknown))}; it takes {', '.join(option_names())} "
                "(batchjob run's flags of the same names)"
            )
        require(
            isinstance(model, str) and bool(model),
            f"Predictor: model must be a path, got {model!r}",
        )
        require(
            isinstance(text_field, str) and bool(text_field),
            f"Predictor: text_field must be a column name, got {text_field!r}",
        )
        require(sort_window >= 1, f"Predictor: sort_window must be ≥ 1, got {sort_window}")
        require(
            cores_per_replica is None or cores_per_replica >= 1,
            f"Predictor: cores_per_replica must be ≥ 1, got {cores_per_replica}",
        )
        spec = CompileSpec(model=model, task=task)
        artifact = resolve_artifact(spec, cache_dir or default_cache_dir())
        fmt = output_format(
            {
                "embedding_type": embedding_type,
                "embedding_dim": embedding_dim,
                "embedding_precision": embedding_precision,
                "embedding_ranges": embedding_ranges,
                "multi_label": multi_label,
                "threshold": threshold,
            }
        )
        # Each actor is a process: int8 ranges from each one's first batch would not compare.
        head = make_head(artifact, fmt, calibrate=False)
        tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
        self.options = resolve_text_options(
            artifact,
            tokenizer,
            long_documents=long_documents,
            chunk_overlap=chunk_overlap,
            prompt=prompt,
            prompt_name=prompt_name,
            error=UsageError,
            names=TEXT_OPTION_NAMES,
        )
        self.fields = Fields(text_field, text_pair_field)
        self.chunked = self.options.long_documents == "chunk"
        self.task_names = task_names(head)
        # `run`'s columns and types, but `id`: the input's columns pass through instead.
        schema = output_schema(head.fields(), chunked=self.chunked)
        self.output_fields = [f for f in schema if f.name != "id"]
        self.threads = cores_per_replica or actor_cpus() or 1
        set_torch_threads(self.threads)
        predict = ArtifactLoader(artifact)()
        self.engine = LocalEngine(
            artifact, predict, tokenizer=tokenizer, head=head, sort_window=sort_window
        )
        log.info(
            "Predictor ready: %s (%s, %s) on %d torch thread(s)%s",
            artifact.path,
            artifact.task,
            artifact.backend,
            self.threads,
            f", NeuronCores {os.environ['NEURON_RT_VISIBLE_CORES']}"
            if artifact.backend != "cpu" and "NEURON_RT_VISIBLE_CORES" in os.environ
            else "",
        )

    def __call__(self, batch: Batch) -> Batch:
        """The batch with the task's columns added (a row per window with chunk)."""
        frame = _pandas_frame(batch)
        names = list(batch.column_names if frame is None else map(str, frame.columns))
        self._check_names(names)
        records = self._records(batch, names)
        results = self.engine.infer(records, self.options)
        rows = [row for r in zip(records, results, strict=True) for row in result_rows(*r)]
        columns = row_columns(self.task_names, rows, self.chunked)
        arrays = {f.name: pa.array(columns[f.name], f.type) for f in self.output_fields}
        # Each output row's input row: the record's `kept` holds its position in the batch.
        positions = [_position(row.kept) for row in rows] if self.chunked else None
        if frame is None:
            table: pa.Table = batch
            if positions is not None:
                table = table.take(pa.array(positions, pa.int64()))
            for name, array in arrays.items():
                table = table.append_column(pa.field(name, array.type), array)
            return table
        return _with_pandas_columns(frame, arrays, positions)

    def close(self) -> None:
        """Stop the engine's threads (an actor's process ends with them anyway)."""
        self.engine.close()

    def _check_names(self, names: list[str]) -> None:
        taken = [f.name for f in self.output_fields]
        clash = [name for name in names if name in taken]
        if clash:
            raise UsageError(
                f"Predictor: the batch's column {clash[0]!r} has the name of an output column "
                f"({', '.join(taken)}); rename it first (Dataset.rename_columns)"
            )

    def _records(self, batch: Batch, names: list[str]) -> list[Record]:
        wanted = [n for n in (self.fields.text, self.fields.text_pair) if n is not None]
        missing = [n for n in wanted if n not in names]
        n = len(batch)
        if missing:  # as `run` does a Parquet file without it: every row an error row
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            error = f"missing column {missing[0]!r} (columns: {shown})"
            return [Record(ROW, None, error=error, kept=(i,)) for i in range(n)]
        values: dict[str, list[object]] = {}
        types: dict[str, str] = {}
        for name in wanted:
            values[name], kind = _column(batch, name)
            if kind is not None:
                types[name] = kind
        return [
            row_record({k: v[i] for k, v in values.items()}, self.fields, ROW, types, (i,))
            for i in range(n)
        ]


def option_names() -> list[str]:
    """The keyword arguments Predictor takes (its signature's)."""
    parameters = inspect.signature(Predictor.__init__).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]


def actor_cpus() -> int | None:
    """The CPUs Ray reserved for this actor (`num_cpus`, rounded up), or None: not in a Ray
    worker, or it holds none (a Neuron actor may hold only `neuron_cores`)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except AssertionError:  # the driver, not a worker
        return None
    return max(1, math.ceil(cpus - 1e-6)) if cpus else None


def set_torch_threads(threads: int) -> None:
    """One replica's threads, as a replica process sets them (replica_process.py)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable only before inter-op work starts
        torch.set_num_interop_threads(1)


def _position(kept: tuple[Any, ...] | None) -> int:
    assert kept is not None  # every record of a batch is made with its position
    position: int = kept[0]
    return position


def _pandas_frame(batch: object) -> pd.DataFrame | None:
    """The batch as a DataFrame, None for a pyarrow Table; UsageError for anything else."""
    if isinstance(batch, pa.Table):
        return None
    import pandas as pd

    if isinstance(batch, pd.DataFrame):
        return batch
    raise UsageError(
        f"Predictor takes pyarrow or pandas batches, got {type(batch).__name__}: pass "
        "batch_format='pyarrow' (or 'pandas') to map_batches"
    )


def _column(batch: Batch, name: str) -> tuple[list[object], str | None]:
    """A column's values as Python objects (null as None) and its Arrow type, where it has
    one (a pandas object column of mixed values has none: each value says what it is)."""
    if isinstance(batch, pa.Table):
        column = batch.column(name)
        return column.to_pylist(), str(column.type)
    series = batch[name]
    try:
        array = pa.array(series, from_pandas=True)  # NaN and None are null
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        values: list[object] = series.tolist()
        return [None if isinstance(v, float) and math.isnan(v) else v for v in values], None
    return array.to_pylist(), str(array.type)


def _with_pandas_columns(
    frame: pd.DataFrame, arrays: Mapping[str, pa.Array[Any]], positions: list[int] | None
) -> pd.DataFrame:
    """The frame (its rows repeated per window with chunk) with the columns added as pandas'
    Arrow-backed columns: converted back to Arrow, they have exactly `run`'s types."""
    import pandas as pd

    if positions is not None:
        frame = frame.iloc[positions].reset_index(drop=True)
    added = {
        name: pd.Series(pd.arrays.ArrowExtensionArray(array), index=frame.index)
        for name, array in arrays.items()
    }
    return frame.assign(**added)
