"""An artifact's `batchjob.json`, read and checked field by field before anything starts.

Types are JSON's, exactly: `true` is not an integer, `"8"` and `8.7` are not 8. Every field
of the format is required and no other is allowed. A bad field is one line,
`<path>/batchjob.json: field <name> must be ..., got <value>` (the value as JSON).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from batchjob.batching import Shape
from batchjob.config import BACKENDS, POOLING_MODES, TASKS
from batchjob.errors import UsageError

MANIFEST = "batchjob.json"
# 2: `files` records the SHA-256 of every file of the artifact (format 1 had no checksums).
# 3: the cpu backend's graphs leave their weights to one file, `weights` (format 2 graphs
# each held a copy). An older artifact is refused (compile it again), and the cache keys
# include this number.
FORMAT_VERSION = 3
WEIGHTS_FILE = "weights.pt"
DTYPES = ("fp32", "bf16")
STRATEGIES = ("buckets", "packing")
FUNCTIONS = ("softmax", "sigmoid", "none")
FIELDS = (
    "format_version",
    "task",
    "backend",
    "dtype",
    "strategy",
    "shapes",
    "max_segments",
    "position_offset",
    "labels",
    "function_to_apply",
    "pooling",
    "normalize",
    "source_model",
    "compiler_args",
    "versions",
    "max_abs_diff_vs_eager",
    "weights",
    "files",
)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
GRAPH_FILE = re.compile(r"graph_.*\.pt")


def graph_name(shape: Shape) -> str:
    return f"graph_{shape.seq_len}.pt"


@dataclass(frozen=True)
class Manifest:
    fields: dict[str, Any]  # the Artifact's keyword arguments (all but path), checked
    files: dict[str, str]  # every file of the artifact but batchjob.json (relative) → SHA-256


def read_manifest(root: str) -> Manifest:
    where = os.path.join(root, MANIFEST)
    try:
        with open(where, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_refuse_duplicates)
    except OSError as e:
        raise UsageError(f"{where}: not a readable artifact manifest: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, a duplicate key, bad UTF-8
        raise UsageError(f"{where}: not a readable artifact manifest: {e}") from None
    return _Checker(where).manifest(data)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"field {key} appears twice")
        seen[key] = value
    return seen


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is a subclass of int: not an integer here


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, expected: str, value: Any) -> NoReturn:
        raise UsageError(f"{self.where}: field {name} must be {expected}, got {_show(value)}")

    def integer(self, name: str, value: Any, low: int) -> int:
        if not _is_int(value) or value < low:
            self.fail(name, f"an integer ≥ {low}", value)
        result: int = value
        return result

    def choice(self, name: str, value: Any, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            self.fail(name, f"one of {', '.join(choices)}", value)
        return value

    def string(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            self.fail(name, "a string", value)
        return value

    def boolean(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)
        return value

    def strings(self, name: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(name, "a list of strings", value)
        return tuple(self.string(f"{name}[{i}]", v) for i, v in enumerate(value))

    def manifest(self, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise UsageError(f"{self.where}: must be a JSON object, got {_show(data)}")
        version = data.get("format_version")
        if not _is_int(version) or version != FORMAT_VERSION:
            raise UsageError(
                f"{self.where}: artifact format {_show(version)}, this batchjob reads "
                f"{FORMAT_VERSION} (one copy of the weights for all graphs); compile the "
                "model again"
            )
        for name in data:
            if name not in FIELDS:
                raise UsageError(f"{self.where}: unknown field {name}")
        for name in FIELDS:
            if name not in data:
                raise UsageError(f"{self.where}: field {name} is missing")
        task = self.choice("task", data["task"], TASKS)
        strategy = self.choice("strategy", data["strategy"], STRATEGIES)
        shapes = self.shapes(data["shapes"], strategy)
        backend = self.choice("backend", data["backend"], BACKENDS)
        weights = self.weights(data["weights"], backend)
        fields: dict[str, Any] = {
            "task": task,
            "backend": backend,
            "dtype": self.choice("dtype", data["dtype"], DTYPES),
            "strategy": strategy,
            "shapes": shapes,
            "max_segments": self.max_segments(data["max_segments"], strategy, shapes),
            "position_offset": self.position_offset(data["position_offset"], strategy),
            **self.head(data, task),
            "normalize": self.boolean("normalize", data["normalize"]),
            "source_model": self.string("source_model", data["source_model"]),
            "compiler_args": self.strings("compiler_args", data["compiler_args"]),
            "versions": self.versions(data["versions"]),
            "max_abs_diff_vs_eager": self.diff(data["max_abs_diff_vs_eager"]),
            "weights": weights,
        }
        return Manifest(fields, self.files(data["files"], data["shapes"], weights))

    def shapes(self, value: Any, strategy: str) -> tuple[Shape, ...]:
        if not isinstance(value, list) or not value:
            self.fail("shapes", "a non-empty list of {seq_len, batch_size, graph}", value)
        if strategy == "packing" and len(value) != 1:
            self.fail("shapes", "one shape for strategy packing", value)
        shapes: list[Shape] = []
        for i, item in enumerate(value):
            name = f"shapes[{i}]"
            if not isinstance(item, dict) or set(item) != {"seq_len", "batch_size", "graph"}:
                self.fail(name, "an object with exactly seq_len, batch_size and graph", item)
            shape = Shape(
                self.integer(f"{name}.seq_len", item["seq_len"], 2),
                self.integer(f"{name}.batch_size", item["batch_size"], 1),
            )
            if shapes and shape.seq_len <= shapes[-1].seq_len:
                self.fail(
                    f"{name}.seq_len",
                    f"greater than shapes[{i - 1}].seq_len {shapes[-1].seq_len} "
                    "(lengths strictly increasing)",
                    shape.seq_len,
                )
            if item["graph"] != graph_name(shape):
                self.fail(f"{name}.graph", _show(graph_name(shape)), item["graph"])
            shapes.append(shape)
        return tuple(shapes)

    def max_segments(self, value: Any, strategy: str, shapes: tuple[Shape, ...]) -> int:
        if strategy == "buckets":
            if not _is_int(value) or value != 1:
                self.fail("max_segments", "1 for strategy buckets", value)
            return 1
        limit = shapes[0].seq_len
        if not _is_int(value) or not 1 <= value <= limit:
            self.fail("max_segments", f"an integer from 1 to seq_len {limit}", value)
        result: int = value
        return result

    def position_offset(self, value: Any, strategy: str) -> int:
        if strategy == "buckets" and not (_is_int(value) and value == 0):
            self.fail("position_offset", "0 for strategy buckets", value)
        return self.integer("position_offset", value, 0)

    def head(self, data: dict[str, Any], task: str) -> dict[str, Any]:
        """labels, function_to_apply and pooling, which depend on the task."""
        labels = self.strings("labels", data["labels"])
        function = self.choice("function_to_apply", data["function_to_apply"], FUNCTIONS)
        pooling = data["pooling"]
        if task == "feature-extraction":
            if labels:
                self.fail("labels", "empty for task feature-extraction", data["labels"])
            if function != "none":
                self.fail("function_to_apply", '"none" for task feature-extraction', function)
            modes = pooling.split("+") if isinstance(pooling, str) else [None]
            if not all(mode in POOLING_MODES for mode in modes):
                self.fail(
                    "pooling", f"one of {', '.join(POOLING_MODES)} (or several, '+')", pooling
                )
        else:
            if function == "softmax" and len(labels) < 2:
                self.fail("labels", "at least 2 labels for function_to_apply softmax", labels)
            if not labels:
                self.fail("labels", f"at least 1 label for task {task}", labels)
            if pooling is not None:
                self.fail("pooling", f"null for task {task}", pooling)
        return {"labels": labels, "function_to_apply": function, "pooling": pooling}

    def versions(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            self.fail("versions", "an object of package → version", value)
        return {k: self.string(f"versions[{_show(k)}]", v) for k, v in value.items()}

    def weights(self, value: Any, backend: str) -> str | None:
        """The cpu backend's graphs map one weights file; a Neuron graph holds its own."""
        if backend == "cpu":
            if value != WEIGHTS_FILE:
                self.fail("weights", f"{_show(WEIGHTS_FILE)} for backend cpu", value)
            return WEIGHTS_FILE
        if value is not None:
            self.fail("weights", f"null for backend {backend}", value)
        return None

    def diff(self, value: Any) -> float | None:
        if value is None:
            return None
        number = isinstance(value, float) or _is_int(value)
        if not number or not math.isfinite(value) or value < 0:
            self.fail("max_abs_diff_vs_eager", "a number ≥ 0 or null", value)
        return float(value)

    def files(
        self, value: Any, shapes: list[dict[str, Any]], weights: str | None
    ) -> dict[str, str]:
        if not isinstance(value, dict) or not value:
            self.fail("files", "an object of relative path → SHA-256 (64 hex digits)", value)
        for rel, digest in value.items():
            name = f"files[{_show(rel)}]"
            safe = rel == posixpath.normpath(rel) and "\\" not in rel
            if not safe or rel.startswith(("/", "../")) or rel in ("..", ".", MANIFEST):
                raise UsageError(f"{self.where}: field {name}: not a path inside the artifact")
            if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
                self.fail(name, "a SHA-256 (64 lowercase hex digits)", digest)
        graphs = {item["graph"] for item in shapes}
        for graph in sorted(graphs - set(value)):
            raise UsageError(f"{self.where}: field files must list {graph}, a graph of shapes")
        if weights is not None and weights not in value:
            raise UsageError(f"{self.where}: field files must list {weights}, the weights file")
        for rel in sorted(value):
            if GRAPH_FILE.fullmatch(rel) and rel not in graphs:
                raise UsageError(f"{self.where}: field files lists {rel}, which no shape uses")
        files: dict[str, str] = value
        return files
