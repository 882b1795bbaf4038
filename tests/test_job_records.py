"""Records under an output: one per run, never overwritten by another run, and `_manifest.json`
their summary; what `status` makes of records (failures for good, ETA, cost)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from batchjob.job_records import job_status, misfit, run_key, summarize_runs
from batchjob.record_store import publish_run, read_records, record_keys
from batchjob.storage import Storage
from tests.conftest import invoke, make_texts, run_job, write_jsonl


def run_record(run_id: str, finished: float, **shards: list[Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "started": finished - 10,
        "finished": finished,
        "model": f"model-of-{run_id}",
        "shards": {"done": [], "skipped": [], "failed": [], **shards},
        "counts": {"documents": 10 * len(shards.get("done", [])), "errors": 1},
        "timings": {"seconds": 10.0, "pipeline_seconds": 8.0, "documents_per_second": 1.0},
    }


def test_the_summary_of_one_run_is_its_record() -> None:
    record = run_record("r1", 100, done=["a.jsonl"], skipped=["b.jsonl"])
    summary = summarize_runs([record])
    assert {k: v for k, v in summary.items() if k != "runs"} == record
    assert summary["runs"] == [
        {
            "run_id": "r1",
            "record": run_key("r1"),
            "started": 90,
            "finished": 100,
            "documents": 10,
            "shards_done": 1,
            "shards_failed": 0,
        }
    ]


def test_the_summary_of_several_runs_is_the_latest_with_every_run_listed() -> None:
    first = run_record("r1", 100, done=["a.jsonl"], failed=[{"shard": "b.jsonl", "error": "x"}])
    second = run_record("r2", 200, done=["b.jsonl"], skipped=["a.jsonl"])
    for order in ([first, second], [second, first]):  # whoever lists them in whatever order
        summary = summarize_runs(order)
        assert {k: v for k, v in summary.items() if k != "runs"} == second
        assert [(r["run_id"], r["shards_done"], r["shards_failed"]) for r in summary["runs"]] == [
            ("r1", 1, 1),
            ("r2", 1, 0),
        ]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_finishing_together_keep_every_record_and_the_summary_lists_them_all(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        output = request.getfixturevalue("bucket").uri("out/")
    else:
        output = str(tmp_path / "out")
    records = [run_record(f"r{i}", 100 + i, done=[f"s{i}.jsonl"]) for i in range(5)]

    async def main() -> tuple[list[str], dict[str, Any]]:
        async with Storage() as storage:
            await asyncio.gather(*(publish_run(storage, output, r) for r in records))
            keys = await record_keys(storage, output, "_batchjob/runs/")
            assert len(await read_records(storage, output, keys)) == 5
            manifest = await storage.earlier_manifest(output)
            assert manifest is not None
            return keys, manifest

    keys, manifest = asyncio.run(main())
    assert keys == sorted(run_key(f"r{i}") for i in range(5))
    assert [r["run_id"] for r in manifest["runs"]] == [f"r{i}" for i in range(5)]
    assert manifest["shards"]["done"] == ["s4.jsonl"]  # the latest run's


def test_two_runs_on_one_output_keep_both_records_and_the_cost(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    out_dir = str(out)
    write_jsonl(inp / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(make_texts(9))])
    assert run_job(artifact, inp, out, price_per_hour=0.5) == 0
    first = capsys.readouterr().out
    assert "; cost $" in first
    assert "per million documents, $" in first
    write_jsonl(
        inp / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(make_texts(4, 1))]
    )
    assert run_job(artifact, inp, out, resume=True, instance_type="inf2.xlarge") == 0
    assert "; cost $" in capsys.readouterr().out
    runs = sorted((out / "_batchjob" / "runs").iterdir())
    assert len(runs) == 2
    records = [json.loads(p.read_text()) for p in runs]
    assert records[0]["cost"]["usd_per_hour"] == 0.5
    assert records[1]["cost"]["instance_type"] == "inf2.xlarge"
    assert records[0]["cost"]["usd_per_million_documents"] > 0
    assert records[0]["cost"]["usd_per_million_tokens"] > 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [r["run_id"] for r in records]
    assert manifest["shards"] == {"done": ["b.jsonl"], "skipped": ["a.jsonl"], "failed": []}
    assert manifest["counts"]["documents"] == 4
    # `status` reads a local output's run records as well.
    code, out, err = invoke(["status", "--output", str(out), "--price-per-hour", "1"], capsys)
    assert code == 0, err
    assert out.startswith(
        f"{out_dir}: complete: 2/2 shards done, 0 remaining, 0 failed\n13 documents"
    )


def test_status_of_runs_and_a_job_with_eta_and_cost() -> None:
    submission = {"submitted": 0.0, "shards": ["a", "b", "c", "d"], "sent": ["a", "b", "c", "d"]}
    totals = {"busy_seconds": 100.0, "documents": 40, "real_tokens": 4000}

    def message(rel: str, started: float, finished: float, worker: str) -> dict[str, Any]:
        done = {rel: {"written": True, "documents": 10, "errors": 1}}
        return {"started": started, "finished": finished, "worker": worker, "shards": done,
                "failed": {}, "worker_totals": totals}  # fmt: skip

    # Two shards in 20 s (from the first start to the last end): two more take 20 s.
    messages = [message("a", 10, 20, "w1"), message("b", 15, 30, "w2")]
    status = job_status([submission], messages, [], {"a.parquet", "b.parquet"}, 3.6)
    assert (status.expected, status.done, status.remaining, status.exit_code) == (4, 2, 2, 3)
    assert (status.documents, status.errors) == (20, 2)
    assert status.seconds == 20
    assert status.eta_seconds == 20
    # Each worker did 40 documents in 100 busy seconds, 10 of them this job's: a quarter.
    assert status.machine_seconds == 50
    assert status.tokens == 2000
    assert status.cost is not None
    assert status.cost.usd == pytest.approx(0.05)
    assert status.cost.per_million_documents == pytest.approx(2500)
    assert status.cost.per_million_tokens == pytest.approx(25)
    # A run's failed shard without an output is failed for good; with one, done.
    run = run_record("r", 50, done=["x.jsonl"], failed=[{"shard": "y.jsonl", "error": "bad"}])
    alone = job_status([], [], [run], {"x.parquet"})
    assert (alone.done, alone.failed, alone.exit_code) == (1, {"y.jsonl": "bad"}, 1)
    assert job_status([], [], [run], {"x.parquet", "y.parquet"}).exit_code == 0


def test_a_tampered_record_is_skipped_not_a_traceback(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records are read back by every run (the summary) and by `status`: one edited by hand,
    or written by someone who shouldn't, is skipped with a warning naming the field."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_jsonl(inp / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(make_texts(3))])
    assert run_job(artifact, inp, out) == 0
    capsys.readouterr()
    [real] = (out / "_batchjob" / "runs").iterdir()
    assert misfit(f"_batchjob/runs/{real.name}", json.loads(real.read_text())) is None
    tampered = {"run_id": 5, "shards": 5, "counts": "x", "finished": "soon"}
    (out / "_batchjob" / "runs" / "x.json").write_text(json.dumps(tampered))
    assert misfit("_batchjob/runs/x.json", tampered) == "run_id has the wrong type (int)"
    bad_message = {"shards": {"a.jsonl": {"written": True, "documents": "3"}}}
    assert misfit("_batchjob/jobs/j/messages/m.json", bad_message) == (
        "shards['a.jsonl'].documents has the wrong type (str)"
    )
    assert misfit("_batchjob/runs/y.json", {"shards": {"failed": [{"shard": "a"}]}}) == (
        "shards.failed[0] lacks error"
    )
    code, stdout, err = invoke(["status", "--output", str(out)], capsys)
    assert code == 0, err  # the real run's record still says the job is complete
    assert stdout.startswith(f"{out}: complete: 1/1 shards done")
    assert "Traceback" not in err
    assert run_job(artifact, inp, out, resume=True) == 0  # the next run's summary skips it too
    assert len(json.loads((out / "_manifest.json").read_text())["runs"]) == 2
