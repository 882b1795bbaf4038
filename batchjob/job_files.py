"""Job files (`--job FILE.yaml`): the same fields as the flags, with dashes or underscores,
each checked against the type of its spec field, so `batch_size: "8"` or `8.7` is refused
(never coerced) with a message naming the field.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from batchjob.config import CompileSpec, RunSpec, WorkerSpec, require
from batchjob.errors import UsageError
from batchjob.output_format import OUTPUT_FIELD_TYPES

# Job-file fields that are not spec fields: the shape flags, whose values become `shapes`.
_SHAPE_TYPES: dict[str, Any] = {
    "batch_size": int,
    "sequence_length": int,
    "max_batch_tokens": int,
    "buckets": str | int | list[int],
}
_NOT_JOB_FIELDS = {"compile", "shapes", "visibility_ceiling", "output_format"}


def _field_types(*specs: type) -> dict[str, Any]:
    types_: dict[str, Any] = {**_SHAPE_TYPES, **OUTPUT_FIELD_TYPES}
    for spec in specs:
        types_.update(typing.get_type_hints(spec))
    types_["compiler_args"] = str | list[str]  # a job file gives a string or a list
    for name in _NOT_JOB_FIELDS:
        types_.pop(name, None)
    return types_


def _matches(value: object, expected: Any) -> bool:
    """isinstance for the annotations specs use: bool is not an int, an int is a float."""
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, t) for t in typing.get_args(expected))
    if origin in (tuple, list):
        inner = typing.get_args(expected)[0]
        return isinstance(value, list | tuple) and all(_matches(v, inner) for v in value)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(t) for t in typing.get_args(expected))
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(expected)[0]).split(' ', 1)[1]}s"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return "null" if expected is type(None) else names.get(expected, str(expected))


def load_job_file(path: str, command: str = "run") -> dict[str, Any]:
    """A job file's fields, keys normalised to underscores, each checked against the type of
    its spec field (so `batch_size: "8"` is refused, not coerced)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--job {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--job {path}: not valid YAML: {e}".replace("\n", " ")) from None
    require(isinstance(data, dict), f"--job {path}: expected a mapping of fields, got {data!r}")
    fields = {str(k).replace("-", "_"): v for k, v in data.items()}
    spec = WorkerSpec if command == "worker" else RunSpec
    known = _field_types(spec, CompileSpec)
    if command == "run":
        known["partitions"] = int  # not a spec field: resolved into `partition`
    unknown = sorted(set(fields) - set(known))
    require(not unknown, f"--job {path}: unknown field(s) {', '.join(unknown)}")
    for name in ("allow_input",):  # one prefix may be written without a list
        if isinstance(fields.get(name), str):
            fields[name] = [fields[name]]
    for name, value in fields.items():
        require(
            _matches(value, known[name]),
            f"--job {path}: {name} must be {_describe(known[name])}, got {value!r}",
        )
    if "allow_input" in fields:
        fields["allow_input"] = tuple(fields["allow_input"])
    return fields
