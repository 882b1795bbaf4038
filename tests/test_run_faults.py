"""`batchjob run` attacked as a careless or hostile user would: outputs that would destroy or
shadow the input, outputs that can't be written (before and during the run), file names and
S3 keys that are odd, and temp files left behind. Every run that starts lists every shard in
its manifest exactly once; every refusal is one line, exit 2, and writes nothing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjob.cli import main
from tests.conftest import make_texts, write_jsonl
from tests.s3_server import (
    Bucket,
    Fault,
    FaultProxy,
)


def cli(artifact: str, inp: str, out: str, *extra: str) -> list[str]:
    return ["run", "--model", artifact, "--input", inp, "--output", out,
            "--replicas", "1", "--progress", "none", *extra]  # fmt: skip


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("batchjob run: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def every_shard_once(manifest: dict[str, Any], expected: set[str]) -> dict[str, str]:
    """The manifest lists each of `expected` exactly once; the failed ones' reasons."""
    shards = manifest["shards"]
    failed = {f["shard"]: f["error"] for f in shards["failed"]}
    listed = [*shards["done"], *shards["skipped"], *(f["shard"] for f in shards["failed"])]
    assert sorted(listed) == sorted(expected), listed
    return failed


def rows(n: int, prefix: str = "r", seed: int = 0) -> list[dict[str, object]]:
    return [{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(make_texts(n, seed=seed))]


# -- 1. output never destroys or shadows the input ---------------------------------------------


def test_output_equal_to_a_parquet_input_is_refused_and_the_input_kept(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), pq_dir / "docs.parquet")
    before = tree_bytes(pq_dir)
    code, out, err = invoke(cli(artifact, str(pq_dir), str(pq_dir)), capsys)
    refused(code, err, f"--output {pq_dir}", "is the input itself", "overwrite or shadow")
    assert out == ""
    assert tree_bytes(pq_dir) == before, "the input must be untouched, no manifest written"
    # The same through a symlink to it, and one level up (the input inside the output).
    (tmp_path / "alias").symlink_to(pq_dir)
    code, _, err = invoke(cli(artifact, str(pq_dir), str(tmp_path / "alias")), capsys)
    refused(code, err, "is the input itself")
    code, _, err = invoke(cli(artifact, str(pq_dir), str(tmp_path)), capsys)
    refused(code, err, f"--input {pq_dir} lies inside --output {tmp_path}")
    assert tree_bytes(pq_dir) == before


def test_manifest_shard_whose_output_is_another_input_is_refused(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "a" / "docs.jsonl", rows(3))
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "b" / "docs.parquet")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a' / 'docs.jsonl'}\n{tmp_path / 'b' / 'docs.parquet'}\n")
    before = tree_bytes(tmp_path)
    argv = cli(artifact, "", str(tmp_path / "b"))
    argv[argv.index("--input") : argv.index("--input") + 2] = ["--input-manifest", str(listing)]
    code, _, err = invoke(argv, capsys)
    refused(code, err, "input shard", str(tmp_path / "b" / "docs.parquet"))
    assert tree_bytes(tmp_path) == before


def test_an_earlier_output_inside_the_input_is_never_read_again(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nest = tmp_path / "nest"
    write_jsonl(nest / "docs.jsonl", rows(5))
    code, _, err = invoke(cli(artifact, str(nest), str(nest / "out")), capsys)
    assert code == 0, err
    earlier = tree_bytes(nest / "out")
    # The observed case: the input as its own output, after that run.
    code, _, err = invoke(cli(artifact, str(nest), str(nest)), capsys)
    refused(code, err, "is the input itself")
    # Another output inside the input: the earlier results are not shards of this run.
    code, _, err = invoke(cli(artifact, str(nest), str(nest / "again")), capsys)
    assert code == 0, err
    manifest = json.loads((nest / "again" / "_manifest.json").read_text())
    assert every_shard_once(manifest, {"docs.jsonl"}) == {}
    assert tree_bytes(nest / "out") == earlier
    assert sorted(p.name for p in (nest / "again").iterdir()) == [
        "_batchjob",
        "_manifest.json",
        "docs.parquet",
    ]


def test_a_file_at_a_shards_output_path_is_never_replaced(
    artifact: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The observed case: --output a directory inside the input that held data of its own
    (not read: the output is never input), whose x.parquet a shard x.jsonl would write."""
    write_jsonl(tmp_path / "in" / "x.jsonl", rows(3))
    write_jsonl(tmp_path / "in" / "y.jsonl", rows(2))
    precious = tmp_path / "in" / "sub" / "x.parquet"
    precious.parent.mkdir()
    pq.write_table(pa.table({"id": ["p"], "text": ["precious data"]}), precious)
    before = precious.read_bytes()
    with caplog.at_level(logging.WARNING, logger="batchjob"):
        code, _, err = invoke(cli(artifact, str(tmp_path / "in"), str(precious.parent)), capsys)
    assert code == 0, err
    assert precious.read_bytes() == before
    assert "shard x.jsonl: its output x.parquet exists already: kept, not replaced" in caplog.text
    assert pq.read_table(precious.parent / "y.parquet").num_rows == 2


def test_lone_surrogates_spoil_their_record_alone(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The observed case: one "\\ud800" escape failed every shard of the run (a traceback
    from the tokenizer, or from Parquet for an id or a kept column)."""
    lines = [
        '{"id": "good", "text": "fine", "k": "x"}',
        '{"id": "text", "text": "a\\ud800b", "k": "x"}',
        '{"id": "id\\udc00", "text": "fine", "k": "x"}',
        '{"id": "kept", "text": "fine", "k": "y\\ud800"}',
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(tmp_path / "in" / "b.jsonl", rows(2))
    argv = cli(artifact, str(tmp_path / "in"), str(tmp_path / "out"), "--keep-columns", "k")
    code, _, err = invoke(argv, capsys)
    assert code == 0, err
    got = pq.read_table(tmp_path / "out" / "a.parquet").to_pylist()
    assert [(r["id"], r["k"]) for r in got] == [
        ("good", "x"),
        ("text", "x"),
        ("id\ufffd", "x"),
        ("kept", "y\ufffd"),
    ]
    assert [r["error"] for r in got] == [
        None,
        "a.jsonl line 2 (id text): text holds a lone UTF-16 surrogate U+D800 at character 1: "
        "not valid Unicode",
        "a.jsonl line 3 (id id\ufffd): id holds a lone UTF-16 surrogate U+DC00 at character 2: "
        "not valid Unicode",
        None,
    ]
    assert pq.read_table(tmp_path / "out" / "b.parquet").num_rows == 2


def test_resume_with_options_that_change_the_outputs_is_refused(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The observed case: --resume --multi-label --keep-columns k after a default run wrote
    outputs of two formats into one dataset, and a manifest describing only the second."""
    write_jsonl(tmp_path / "in" / "a.jsonl", [{**r, "k": "x"} for r in rows(2)])
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    assert invoke(cli(artifact, inp, out), capsys)[0] == 0
    write_jsonl(tmp_path / "in" / "b.jsonl", [{**r, "k": "y"} for r in rows(2, "b")])
    before = tree_bytes(tmp_path / "out")
    argv = cli(artifact, inp, out, "--resume", "--multi-label", "--keep-columns", "k")
    code, _, err = invoke(argv, capsys)
    refused(
        code,
        err,
        "--resume:",
        "holds outputs written with other options",
        "keep_columns [] then, ['k'] now",
    )
    assert "multi_label False then, True now" in err
    assert tree_bytes(tmp_path / "out") == before
    code, _, err = invoke(cli(artifact, inp, out, "--resume"), capsys)  # the same options
    assert code == 0, err
    assert pq.read_table(tmp_path / "out" / "b.parquet").num_rows == 2


def test_a_fifo_or_other_special_file_in_the_input_is_not_a_shard(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Opening a FIFO blocks until a writer comes: the run would hang, deaf to signals."""
    write_jsonl(tmp_path / "in" / "a.jsonl", rows(2))
    os.mkfifo(tmp_path / "in" / "fifo.jsonl")
    code, _, err = invoke(cli(artifact, str(tmp_path / "in"), str(tmp_path / "out")), capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["shards"]["done"] == ["a.jsonl"]


def test_s3_output_equal_to_the_input_prefix_is_refused(
    artifact: str, bucket: Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket.put("pq/docs.jsonl", b'{"text": "hello"}\n')
    code, _, err = invoke(cli(artifact, bucket.uri("pq/"), bucket.uri("pq/")), capsys)
    refused(code, err, f"--output {bucket.uri('pq/')} is the input itself")
    code, _, err = invoke(cli(artifact, bucket.uri("pq/"), bucket.uri()), capsys)
    refused(code, err, "lies inside --output")
    assert bucket.keys(internal=True) == ["pq/docs.jsonl"]


def test_s3_output_inside_the_whole_bucket_input_is_not_read(
    artifact: str, bucket: Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket.put_many({"a.jsonl": b'{"text": "one"}\n', "d/b.jsonl": b'{"text": "two"}\n'})
    for _ in range(2):  # the second run sees the first one's results under results/
        code, _, err = invoke(cli(artifact, bucket.uri(), bucket.uri("results/")), capsys)
        assert code == 0, err
        manifest = json.loads(bucket.get("results/_manifest.json"))
        assert every_shard_once(manifest, {"a.jsonl", "d/b.jsonl"}) == {}
    # An earlier run's output elsewhere under the input is skipped too.
    code, _, err = invoke(cli(artifact, bucket.uri(), bucket.uri("results2/")), capsys)
    assert code == 0, err
    manifest = json.loads(bucket.get("results2/_manifest.json"))
    assert every_shard_once(manifest, {"a.jsonl", "d/b.jsonl"}) == {}


# -- 5. outputs that can't be written ----------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real file system of our own (tmpfs): read-only, or small enough to fill up."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("case", ["read-only", "file-in-the-way", "no-such-bucket", "denied"])
def test_an_output_that_cant_be_written_is_refused_before_any_work(
    case: str,
    artifact: str,
    tmp_path: Path,
    bucket: Bucket,
    proxy: FaultProxy,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_jsonl(tmp_path / "in" / "docs.jsonl", rows(3))
    with contextlib.ExitStack() as stack:
        if case == "read-only":
            output = str(stack.enter_context(mounted_tmpfs(tmp_path / "ro", "ro,size=1m")))
            needles: tuple[str, ...] = ("Read-only file system",)
        elif case == "file-in-the-way":
            (tmp_path / "file").write_text("x\n")
            output, needles = str(tmp_path / "file" / "out"), ("Not a directory",)
        elif case == "no-such-bucket":
            output, needles = "s3://no-such-bucket-here/out/", ("NoSuchBucket",)
        else:
            proxy.faults.append(Fault("PUT", "/out/", status=403, code="AccessDenied"))
            output, needles = bucket.uri("out/"), ("AccessDenied",)
        caplog.set_level(logging.INFO, logger="batchjob")
        code, _, err = invoke(cli(artifact, str(tmp_path / "in"), output), capsys)
        refused(code, err, f"--output {output}: can't be written", *needles)
        started = [r for r in caplog.records if "ready" in r.getMessage()]
        assert not started, "no replica may start"
        if case == "read-only":
            assert os.listdir(output) == []
    assert bucket.keys(internal=True) == []


def test_a_disk_that_fills_up_fails_that_shard_only(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in"
    write_jsonl(inp / "small1.jsonl", rows(2, "a"))
    write_jsonl(inp / "small2.jsonl", rows(2, "b"))
    # Many long ids: its Parquet file is far larger than the disk.
    big = [{"id": f"{i:06d}-" + os.urandom(200).hex(), "text": "x"} for i in range(3000)]
    write_jsonl(inp / "big.jsonl", big)
    with mounted_tmpfs(tmp_path / "disk", "size=256k") as disk:
        code, _, err = invoke(cli(str(artifact), str(inp), str(disk)), capsys)
        assert code == 1, err
        assert "Traceback" not in err
        manifest = json.loads((disk / "_manifest.json").read_text())
        failed = every_shard_once(manifest, {"small1.jsonl", "small2.jsonl", "big.jsonl"})
        assert list(failed) == ["big.jsonl"]
        assert "No space left on device" in failed["big.jsonl"], failed
        names = sorted(p.name for p in disk.iterdir())
        expected = ["_batchjob", "_manifest.json", "small1.parquet", "small2.parquet"]
        assert names == expected, "no temp left"
        assert pq.read_table(disk / "small2.parquet").column("id").to_pylist() == ["b0", "b1"]


# -- 5. names and keys -------------------------------------------------------------------------


def test_file_names_that_are_not_utf8_are_processed(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    bad = os.fsencode(inp) + b"/caf\xe9.txt"
    with open(bad, "wb") as f:
        f.write(b"first line\nsecond line\n")
    write_jsonl(inp / "fine.jsonl", rows(2))
    code, _, err = invoke(cli(artifact, str(inp), str(tmp_path / "out")), capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert every_shard_once(manifest, {"caf\\xe9.txt", "fine.jsonl"}) == {}
    table = pq.read_table(tmp_path / "out" / "caf\\xe9.parquet")
    assert table.column("id").to_pylist() == ["caf\\xe9.txt:1", "caf\\xe9.txt:2"]


@pytest.mark.parametrize("output_kind", ["local", "s3"])
def test_s3_keys_are_opaque_and_local_outputs_stay_inside(
    output_kind: str,
    artifact: str,
    bucket: Bucket,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket.put_many(
        {
            "in/p1//double.jsonl": b'{"id": "dd", "text": "double slash"}\n',
            "in/p1/double.jsonl": b'{"id": "d", "text": "single slash"}\n',
            "in/../up.jsonl": b'{"id": "up", "text": "dot dot"}\n',
            "in/fine.jsonl": b'{"id": "f", "text": "fine"}\n',
            "in/folder/": b"",  # a "folder" marker: not a shard
        }
    )
    output = str(tmp_path / "out") if output_kind == "local" else bucket.uri("out/")
    code, _, err = invoke(cli(artifact, bucket.uri("in/"), output), capsys)
    every = {"p1//double.jsonl", "p1/double.jsonl", "../up.jsonl", "fine.jsonl"}
    if output_kind == "s3":
        assert code == 0, err
        manifest = json.loads(bucket.get("out/_manifest.json"))
        assert every_shard_once(manifest, every) == {}
        assert sorted(k for k in bucket.keys("out/") if k.endswith(".parquet")) == [
            "out/../up.parquet",
            "out/fine.parquet",
            "out/p1//double.parquet",
            "out/p1/double.parquet",
        ]
        assert pq.read_table(pa.BufferReader(bucket.get("out/p1//double.parquet"))).column(
            "id"
        ).to_pylist() == ["dd"]
        return
    assert code == 1, err
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    failed = every_shard_once(manifest, every)
    assert sorted(failed) == ["../up.jsonl", "p1//double.jsonl", "p1/double.jsonl"]
    assert "would leave --output" in failed["../up.jsonl"]
    assert "would also be that of p1/double.jsonl" in failed["p1//double.jsonl"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet")) == [
        "out/fine.parquet"
    ]


# -- 5. temp files -----------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_removes_the_temp_files_of_runs_that_are_gone(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    write_jsonl(inp / "a.jsonl", rows(2))
    host = socket.gethostname()
    (out / "sub").mkdir(parents=True)
    gone = out / "sub" / f".x.parquet.{host}-{dead_pid()}.tmp"
    alive = out / f".zz.parquet.{host}-{os.getpid()}.tmp"  # a run still going: ours
    other_host = out / f".b.parquet.elsewhere-{dead_pid()}.tmp"  # on a shared disk
    for path in (gone, alive, other_host):
        path.write_bytes(b"partial")
    code, _, err = invoke(cli(artifact, str(inp), str(out), "--resume"), capsys)
    assert code == 0, err
    assert not gone.exists()
    assert alive.exists()
    assert other_host.exists()


def test_s3_run_removes_its_temp_files_on_sigterm(
    artifact: str, bucket: Bucket, tmp_path: Path
) -> None:
    objects = {
        f"in/s{k:02d}.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in rows(200, f"s{k}-"))
        for k in range(30)
    }
    bucket.put_many(objects)
    staging = tmp_path / "tmp"
    staging.mkdir()
    env = {**os.environ, "TMPDIR": str(staging), "HF_HUB_OFFLINE": "1"}
    run = cli(artifact, bucket.uri("in/"), bucket.uri("out/"), "--max-shards-in-flight", "4")
    argv = [sys.executable, "-m", "batchjob", *run]
    log = tmp_path / "run.err"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not [k for k in bucket.keys("out/") if k.endswith(".parquet")]:
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "no shard done in time"
                time.sleep(0.05)
            proc.terminate()
            assert proc.wait(timeout=180) == 1  # generous: a loaded machine is slow to stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert list(staging.iterdir()) == []
    manifest = json.loads(bucket.get("out/_manifest.json"))
    failed = every_shard_once(manifest, {k.removeprefix("in/") for k in objects})
    assert failed, "the run was stopped before every shard was done"
    assert all("interrupted" in why for why in failed.values()), failed
