"""The CLI contract: bad invocations are one line on stderr, exit 2, nothing written; `compile`
and `run` happy paths print one line on stdout; a plain model is compiled once into the cache."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import CompileFn, assert_usage_error, invoke, make_texts, write_jsonl

SUMMARY = re.compile(
    r"batchjob run: (\d+) documents, (\d+) errors, \d+ shards done, \d+ failed, "
    r"\d+ skipped, [\d.]+s, [\d.]+ documents/s\n"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # A path that isn't a model must fail here, not after a trip to the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Ctx:
    tmp: Path
    artifact: str
    input: Path  # a directory holding one good jsonl shard
    output: Path  # must never be created by a bad invocation
    cache: Path

    def run(self, *extra: str) -> list[str]:
        """`run` with everything valid; `extra` flags come last and override."""
        return [
            "run",
            "--model",
            self.artifact,
            "--input",
            str(self.input),
            "--output",
            str(self.output),
            "--cache-dir",
            str(self.cache),
            "--replicas",
            "1",
            "--progress",
            "none",
            *extra,
        ]


@pytest.fixture
def ctx(classifier_dir: Path, compiled: CompileFn, tmp_path: Path) -> Ctx:
    artifact = compiled(classifier_dir)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "a1", "text": "fine"}])
    return Ctx(tmp_path, artifact.path, tmp_path / "in", tmp_path / "out", tmp_path / "cache")


def _job_file(c: Ctx, text: str) -> str:
    path = c.tmp / "job.yaml"
    path.write_text(text)
    return str(path)


def _pair_with_txt(c: Ctx) -> list[str]:
    (c.tmp / "txt").mkdir()
    (c.tmp / "txt" / "lines.txt").write_text("one\ntwo\n")
    return c.run("--input", str(c.tmp / "txt"), "--text-pair-field", "p")


def _unknown_extension(c: Ctx) -> list[str]:
    (c.tmp / "data.xml").write_text("<a/>\n")
    return c.run("--input", str(c.tmp / "data.xml"))


def _empty_input(c: Ctx) -> list[str]:
    (c.tmp / "empty").mkdir()
    return c.run("--input", str(c.tmp / "empty"))


def _empty_model_dir(c: Ctx) -> list[str]:
    (c.tmp / "nomodel").mkdir()
    return c.run("--model", str(c.tmp / "nomodel"))


Case = tuple[Callable[[Ctx], list[str]], tuple[str, ...]]
BAD_INVOCATIONS: dict[str, Case] = {
    "missing-input": (
        lambda c: c.run("--input", str(c.tmp / "nope")),
        ("--input", "nope", "no such file"),
    ),
    "no-input-flag": (
        lambda c: [a for a in c.run() if a not in ("--input", str(c.input))],
        ("--input is required",),
    ),
    "empty-input": (_empty_input, ("--input", "no shards")),
    "unknown-extension": (_unknown_extension, ("data.xml", "format")),
    "unknown-format": (lambda c: c.run("--format", "bogus"), ("--format", "'bogus'")),
    "no-model-flag": (
        lambda c: [a for a in c.run() if a not in ("--model", c.artifact)],
        ("--model is required",),
    ),
    "model-not-found": (
        lambda c: c.run("--model", str(c.tmp / "no-such-model")),
        ("--model", "no-such-model"),
    ),
    "model-dir-empty": (_empty_model_dir, ("--model", "nomodel")),
    "unsorted-buckets-in-job-file": (
        lambda c: c.run("--job", _job_file(c, "buckets: 32,16\n")),
        ("--buckets", "strictly increasing", "32,16"),
    ),
    "batch-size-0": (lambda c: c.run("--batch-size", "0"), ("--batch-size must be ≥ 1, got 0",)),
    "batch-size-not-int": (
        lambda c: c.run("--batch-size", "six"),
        ("--batch-size", "expected an integer", "'six'"),
    ),
    "unknown-task": (lambda c: c.run("--task", "summarize"), ("--task", "'summarize'")),
    "replicas-0": (lambda c: c.run("--replicas", "0"), ("--replicas must be ≥ 1, got 0",)),
    "job-unknown-field": (
        lambda c: c.run("--job", _job_file(c, "colour: blue\nreplicas: 1\n")),
        ("--job", "unknown field", "colour"),
    ),
    # Values of the wrong type are refused, never coerced (8.7 is not 8) nor a TypeError.
    "job-batch-size-string": (
        lambda c: c.run("--job", _job_file(c, 'batch_size: "8"\n')),
        ("--job", "batch_size must be an integer, got '8'"),
    ),
    "job-batch-size-float": (
        lambda c: c.run("--job", _job_file(c, "batch-size: 8.7\n")),
        ("--job", "batch_size must be an integer, got 8.7"),
    ),
    "job-sort-window-word": (
        lambda c: c.run("--job", _job_file(c, "sort-window: big\n")),
        ("--job", "sort_window must be an integer, got 'big'"),
    ),
    "job-resume-string": (
        lambda c: c.run("--job", _job_file(c, "resume: 'yes'\n")),
        ("--job", "resume must be true or false, got 'yes'"),
    ),
    "job-not-found": (
        lambda c: c.run("--job", str(c.tmp / "nojob.yaml")),
        ("--job", "nojob.yaml"),
    ),
    "txt-with-text-pair-field": (_pair_with_txt, ("--text-pair-field", ".txt")),
    "unknown-flag": (lambda c: c.run("--bogus", "1"), ("unrecognized arguments: --bogus 1",)),
    "no-subcommand": (lambda c: [], ("required", "command")),
    "unknown-subcommand": (lambda c: ["frobnicate"], ("invalid choice", "'frobnicate'")),
    "compiler-args-on-cpu": (
        lambda c: c.run("--compiler-args=--fast"),
        ("--compiler-args", "neuron"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_bad_invocation_is_one_line_exit_2_nothing_written(
    case: str, ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    build, needles = BAD_INVOCATIONS[case]
    argv = build(ctx)
    code, out, err = invoke(argv, capsys)
    assert_usage_error(code, out, err, needles)
    assert not ctx.output.exists()
    assert not ctx.cache.exists() or not any(ctx.cache.rglob("*"))


SUBPROCESS_CASES = ["missing-input", "model-dir-empty", "unknown-task", "replicas-0"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "batchjob", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_invocation_in_a_real_process(case: str, ctx: Ctx) -> None:
    build, needles = BAD_INVOCATIONS[case]
    done = run_cli(build(ctx), ctx.tmp)
    assert_usage_error(done.returncode, done.stdout, done.stderr, needles)
    assert not ctx.output.exists()


def test_help_exits_0(tmp_path: Path) -> None:
    done = run_cli(["--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "compile" in done.stdout
    assert "run" in done.stdout


def test_unsorted_buckets_flag(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = invoke(ctx.run("--buckets", "32,16"), capsys)
    assert_usage_error(code, out, err, ("--buckets", "strictly increasing"))
    assert not ctx.output.exists()


def test_bad_log_level_in_a_real_process(ctx: Ctx) -> None:
    done = run_cli(["--log-level", "loud", *ctx.run()], ctx.tmp)
    assert_usage_error(done.returncode, done.stdout, done.stderr, ("--log-level", "loud"))
    assert not ctx.output.exists()


def test_model_with_corrupt_weights(
    classifier_dir: Path, ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = ctx.tmp / "broken-model"
    broken.mkdir()
    for f in classifier_dir.iterdir():
        if f.is_file():
            data = f.read_bytes()
            (broken / f.name).write_bytes(data[:1000] if f.suffix == ".safetensors" else data)
    code, out, err = invoke(ctx.run("--model", str(broken)), capsys)
    assert_usage_error(code, out, err, ("--model", "broken-model"))
    assert not ctx.output.exists()


def test_output_is_a_file(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    ctx.output.write_text("not a directory\n")
    code, out, err = invoke(ctx.run(), capsys)
    assert_usage_error(code, out, err, ("--output", str(ctx.output)))
    assert ctx.output.read_text() == "not a directory\n"


def test_compile_writes_an_artifact(
    classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "models" / "clf"
    argv = ["compile", "--model", str(classifier_dir), "--output", str(target)]
    code, out, err = invoke([*argv, "--batch-size", "2", "--sequence-length", "16"], capsys)
    assert code == 0, err
    assert out == f"batchjob compile: artifact written to {target}\n"
    meta = json.loads((target / "batchjob.json").read_text())
    assert meta["task"] == "text-classification"
    assert [(s["batch_size"], s["seq_len"]) for s in meta["shapes"]] == [(2, 16)]
    assert (target / "graph_16.pt").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["clf"], "no staging dir left"


def test_compile_refuses_a_non_empty_output(
    classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    code, out, err = invoke(
        ["compile", "--model", str(classifier_dir), "--output", str(target)], capsys
    )
    assert_usage_error(code, out, err, ("--output", str(target), "exists"))
    assert err.startswith("batchjob compile: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("mode", ["log", "bar"])
def test_run_progress_and_summary(
    mode: str, ctx: Ctx, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batchjob")
    texts = make_texts(50, seed=2)
    write_jsonl(ctx.input / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(texts)])
    with (ctx.input / "a.jsonl").open("a") as f:
        f.write("not json\n")
    code, out, err = invoke(ctx.run("--progress", mode), capsys)
    assert code == 0, err
    summary = SUMMARY.fullmatch(out)
    assert summary, out
    assert (int(summary[1]), int(summary[2])) == (2 + 50, 1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if mode == "bar":
        assert "doc" in err  # tqdm's unit, drawn on stderr
    else:
        assert err == ""  # log mode: log records only, never a bar
    assert len(pq.read_table(ctx.output / "b.parquet")) == 50
    assert [r["error"] is None for r in pq.read_table(ctx.output / "a.parquet").to_pylist()] == [
        True,
        False,
    ]


def test_plain_model_is_compiled_once_into_the_cache(
    classifier_dir: Path,
    ctx: Ctx,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="batchjob")
    plain = ["--model", str(classifier_dir), "--task", "text-classification"]
    shape = ["--batch-size", "4", "--sequence-length", "32", "--dtype", "fp32"]

    code, out, err = invoke(ctx.run(*plain, *shape), capsys)
    assert code == 0, err
    assert SUMMARY.fullmatch(out), out
    assert any("traced" in r.getMessage() for r in caplog.records)
    artifacts = list((ctx.cache / "artifacts").iterdir())
    assert len(artifacts) == 1
    assert (artifacts[0] / "batchjob.json").is_file()
    first = pq.read_table(ctx.output / "a.parquet").to_pylist()

    caplog.clear()
    again = ctx.tmp / "out2"
    code, out, err = invoke(ctx.run(*plain, *shape, "--output", str(again)), capsys)
    assert code == 0, err
    assert SUMMARY.fullmatch(out), out
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "traced" in m], messages
    assert any("using the cached compile" in m for m in messages), messages
    assert list((ctx.cache / "artifacts").iterdir()) == artifacts
    assert pq.read_table(again / "a.parquet").to_pylist() == first


def test_run_of_an_artifact_imports_neither_torch_nor_transformers(ctx: Ctx) -> None:
    """Its own process needs the tokenizers library only (each costs a second of start-up):
    torch is imported by the replicas' fork server, transformers nowhere."""
    program = (
        "import sys\n"
        "from batchjob.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(code, sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", program, *ctx.run()],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stderr
    assert len(pq.read_table(ctx.output / "a.parquet")) == 1


def test_ctrl_c_before_a_command_takes_over_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Interrupted while importing or checking (before `run` handles signals itself)."""
    from batchjob import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["run", "--model", "m", "--input", "i", "--output", "o"]) == 130
    assert capsys.readouterr().err == "batchjob: interrupted\n"
