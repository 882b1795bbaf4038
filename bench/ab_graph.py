"""A/B of graph variants end to end: `batchjob run` on the bench's corpus and model, the
variants' runs alternating, medians compared.

    python bench/ab_graph.py [--docs 1200] [--repeats 3] [--attention sdpa,bmm]
                             [--variant NAME='--compile flags'] ...

Each `--attention` value compiles the default artifact with that attention implementation
(attention.ATTENTIONS, forced past compile.plan's own choice); each `--variant` compiles with
the given flags (the default attention). Every artifact is compiled once into the bench
cache, then `batchjob run` (start-up included) runs each in turn, `--repeats` rounds. Each
`--code NAME=DIR` runs the default artifact with the batchjob package found under DIR (e.g.
`git archive HEAD batchjob | tar -x -C DIR`): a runtime change against the code before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import fixtures
import measure
from context import REPO, SHARDS, describe_artifact, say


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=1200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention", default="", help="comma-separated: sdpa,bmm")
    p.add_argument("--variant", action="append", default=[], help="NAME='--flags ...'")
    p.add_argument(
        "--code",
        action="append",
        default=[],
        help="NAME=DIR: the default artifact, run by the batchjob package under DIR",
    )
    p.add_argument("--json", type=Path)
    return p.parse_args()


def compile_with_attention(root: Path, model: Path, attention: str) -> Path:
    """The default artifact, its graphs computing attention the `attention` way."""
    from batchjob import compile as compiling
    from batchjob.compile_plan import Plan
    from batchjob.config import CompileSpec
    from batchjob.models import LoadedModel

    path = root / "artifacts" / f"attention-{attention}-{fixtures.artifact_key([attention])}"
    if (path / "batchjob.json").exists():
        return path
    chosen = compiling.plan

    def forced(spec: CompileSpec, loaded: LoadedModel) -> Plan:
        return dataclasses.replace(chosen(spec, loaded), attention=attention)

    compiling.plan = forced  # type: ignore[assignment]
    try:
        compiling.compile_artifact(CompileSpec(model=str(model)), str(path))
    finally:
        compiling.plan = chosen  # type: ignore[assignment]
    return path


def main() -> int:
    args = parse_args()
    root = fixtures.cache_root(REPO)
    model = fixtures.ensure_model(root)
    artifacts: dict[str, Path] = {}
    for attention in filter(None, args.attention.split(",")):
        artifacts[f"attention {attention}"] = compile_with_attention(root, model, attention)
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        artifacts[name], _ = fixtures.ensure_artifact(root, model, name, shlex.split(flags))
    code: dict[str, str] = {}
    for spec in args.code:
        name, _, directory = spec.partition("=")
        artifacts[name], _ = fixtures.ensure_artifact(root, model, "default", [])
        code[name] = str(Path(directory).resolve())
    for name, path in artifacts.items():
        say(f"{name}: {describe_artifact(path)}: {path}")
    pythonpath = os.environ.get("PYTHONPATH", "")
    corpus = fixtures.make_corpus(args.docs)
    family = fixtures.cpu_info().get("cpu family", "?")
    times: dict[str, list[float]] = {name: [] for name in artifacts}
    with tempfile.TemporaryDirectory(prefix="batchjob-ab-") as tmp:
        corpus_dir = Path(tmp) / "corpus"
        corpus.write(corpus_dir, SHARDS)
        for i in range(args.repeats):
            for name, path in artifacts.items():
                out = Path(tmp) / f"out-{i}-{name.replace(' ', '_')}"
                os.environ["PYTHONPATH"] = code.get(name, pythonpath)  # `batchjob run` imports
                with measure.OtherLoad() as others:
                    result = measure.batchjob_run(path, corpus_dir, out)
                times[name].append(result.wall_seconds)
                say(
                    f"{name}: wall {result.wall_seconds:.1f}s (pipeline "
                    f"{result.pipeline_seconds:.1f}s), others {others.share:.0%}"
                )
    first = next(iter(times))
    base = statistics.median(times[first])
    print(f"\ncpu family {family}; {args.docs} docs; medians of {args.repeats} runs, end to end")
    print("| variant | wall (median) | docs/s | vs first |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in times.items():
        m = statistics.median(seconds)
        print(f"| {name} | {m:.1f} s | {args.docs / m:.0f} | {base / m:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu_family": family, "times": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
