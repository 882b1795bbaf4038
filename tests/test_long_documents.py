"""--long-documents chunk and mean: windows at word starts that cover the document, each the
exact tokenization of its slice (with the prompt), and results equal to sentence-transformers'
`encode` of each slice (chunk) or their token-weighted mean (mean)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchjob.batching import Shape
from batchjob.long_documents import TextOptions, Unit, Windows, plan_units, window_budget
from batchjob.records import Record
from batchjob.tokens import RecordTokenizer
from tests.conftest import (
    CompileFn,
    assert_usage_error,
    invoke,
    long_text,
    minilm_path,
    run_job,
    write_jsonl,
)
from tests.tokenizer_families import Counting


def check_windows(
    tokenizer: RecordTokenizer, text: str, prompt: str, overlap: int, strict: bool = True
) -> list[Unit]:
    """Every property a document's windows must have; returns them. `strict`: every pair
    of windows shares `overlap` tokens (words longer than a window may break that)."""
    options = TextOptions("chunk", overlap, prompt)
    units = [u for u in plan_units(tokenizer, [Record("d", text)], options) if isinstance(u, Unit)]
    assert units[0].char_start == 0
    assert units[-1].char_end == len(text)
    assert [u.chunk for u in units] == list(range(len(units)))
    whole = tokenizer.raw.encode(text, add_special_tokens=False)
    starts: dict[int, int] = {}  # where tokens start → the first token that starts there
    for i, (a, _) in enumerate(whole.offsets):
        starts.setdefault(a, i)
    short_overlaps = 0
    for unit, after in zip(units, [*units[1:], None], strict=True):
        # What runs is the slice's own tokenization, prompt first, whole (not truncated).
        (alone,) = tokenizer.encode([Record("", prompt + text[unit.char_start : unit.char_end])])
        assert alone is not None
        assert (alone.ids, alone.truncated) == (unit.encoded.ids, False)
        assert len(unit.encoded.ids) <= tokenizer.max_length
        if unit.char_start and strict:
            # A window starts where a word of the whole text starts.
            i = starts[unit.char_start]
            assert i == 0 or whole.word_ids[i] != whole.word_ids[i - 1], unit
        if after is not None:
            assert unit.char_start < after.char_start <= unit.char_end  # forward, no gap
            assert after.char_start < unit.char_end or not strict  # overlapping
            shared = tokenizer.raw.encode(
                text[after.char_start : unit.char_end], add_special_tokens=False
            )
            short_overlaps += len(shared.ids) < overlap
    assert short_overlaps <= (0 if strict else len(units) // 4), short_overlaps
    return units


SHORT_WORDS = ["hello", "wörld", "naïve", "東京", "résumé", "a,b", "🙂", "don't", "3.14", "Ünï"]


@pytest.mark.parametrize("prompt", ["", "query: "])
def test_windows_of_every_family_start_at_words_and_cover_the_text(
    artifact_tokenizer: Path,
    prompt: str,
) -> None:
    tokenizer = RecordTokenizer(str(artifact_tokenizer), 48)
    rng = random.Random(5)
    plain = " ".join(rng.choices(SHORT_WORDS, k=400))
    assert len(check_windows(tokenizer, plain, prompt, overlap=8)) > 5
    for seed in range(3):  # with words longer than a window
        units = check_windows(tokenizer, long_text(300, seed), prompt, overlap=8, strict=False)
        assert len(units) > 5


def test_a_text_that_fits_is_one_window_spanning_it() -> None:
    tokenizer = RecordTokenizer(str(minilm_path()), 48)
    text = "  a short text  "
    (unit,) = plan_units(tokenizer, [Record("d", text)], TextOptions("chunk", 8))
    assert isinstance(unit, Unit)
    assert (unit.chunk, unit.char_start, unit.char_end) == (0, 0, len(text))


def test_a_word_longer_than_a_window_is_cut_at_tokens(bytelevel_dir: Path) -> None:
    """A 3,000-letter word is hundreds of byte-level BPE pieces: cut inside, still exact. (To
    WordPiece it is one [UNK]: more than 100 letters.)"""
    text = "start " + "ab" * 1500 + " end"
    tokenizer = RecordTokenizer(str(bytelevel_dir), 32)
    assert len(check_windows(tokenizer, text, "", 4, strict=False)) > 3
    wordpiece = RecordTokenizer(str(minilm_path()), 32)
    assert len(check_windows(wordpiece, text, "", 4)) == 1


def test_long_pairs_are_error_rows_and_errors_keep_their_place() -> None:
    tokenizer = RecordTokenizer(str(minilm_path()), 32)
    records = [
        Record("bad", None, error="bad: not JSON"),
        Record("pair", long_text(100), "second"),
        Record("ok", "fine"),
    ]
    out = list(plan_units(tokenizer, records, TextOptions("mean", 4)))
    assert [(type(u).__name__, u.record) for u in out] == [
        ("Failed", 0),
        ("Failed", 1),
        ("Unit", 2),
    ]
    assert "can't be split into windows" in getattr(out[1], "error", "")


def test_a_document_of_megabytes_is_tokenized_a_piece_at_a_time() -> None:
    tokenizer = RecordTokenizer(str(minilm_path()), 64)
    counting = Counting(tokenizer._raw)
    tokenizer._raw = counting  # type: ignore[assignment]
    text = long_text(400_000)  # ~4 MB
    budget = window_budget(tokenizer, "")
    windows = iter(Windows(tokenizer, text, "", budget, 16))
    for _ in range(20):
        _start, _end, enc = next(windows)
        assert len(enc.ids) <= 64
    assert counting.largest < 64 * 1024  # pieces of a few windows, never the document


# -- end to end, against sentence-transformers ----------------------------------------------


def _cos(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _rows(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "docs.parquet").to_pylist()


@pytest.fixture(scope="module")
def st_embedder(embedder_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_dir), device="cpu")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return ["short one", long_text(120, 1), "", long_text(40, 2), long_text(200, 3)]


def _write_corpus(tmp_path: Path, texts: list[str]) -> Path:
    return write_jsonl(
        tmp_path / "in" / "docs.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    )


@pytest.mark.parametrize("packing", [False, True])
def test_chunk_rows_equal_sentence_transformers_on_each_slice(
    tmp_path: Path,
    compiled: CompileFn,
    embedder_dir: Path,
    st_embedder: Any,
    corpus: list[str],
    packing: bool,
) -> None:
    artifact = compiled(embedder_dir, shapes=(Shape(32, 4),), packing=packing).path
    _write_corpus(tmp_path, corpus)
    out = tmp_path / "out"
    assert run_job(artifact, tmp_path / "in", out, long_documents="chunk", chunk_overlap=6) == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), key=int)  # input order
    by_doc: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_doc.setdefault(int(row["id"]), []).append(row)
    assert sorted(by_doc) == list(range(len(corpus)))
    for i, doc_rows in by_doc.items():
        assert [r["chunk"] for r in doc_rows] == list(range(len(doc_rows)))
        assert doc_rows[0]["char_start"] == 0
        assert doc_rows[-1]["char_end"] == len(corpus[i])
        slices = [corpus[i][r["char_start"] : r["char_end"]] for r in doc_rows]
        expected = st_embedder.encode(slices)
        for row, ref in zip(doc_rows, expected, strict=True):
            assert _cos(row["embedding"], ref) >= 0.9999
            assert row["error"] is None
            assert row["truncated"] is False
    assert len(by_doc[1]) > 1
    assert len(by_doc[0]) == 1
    manifest = json.loads((out / "_manifest.json").read_text())
    counts = manifest["counts"]
    split = sum(len(v) > 1 for v in by_doc.values())
    assert (counts["documents"], counts["windows"], counts["documents_split"]) == (
        len(corpus),
        len(rows),
        split,
    )
    assert manifest["long_documents"] == "chunk"
    assert manifest["chunk_overlap"] == 6


def test_mean_rows_are_the_token_weighted_mean_of_the_windows(
    tmp_path: Path,
    compiled: CompileFn,
    embedder_dir: Path,
    st_embedder: Any,
    corpus: list[str],
) -> None:
    artifact = compiled(embedder_dir, shapes=(Shape(32, 4),)).path
    _write_corpus(tmp_path, corpus)
    chunks, means = tmp_path / "chunks", tmp_path / "means"
    assert (
        run_job(
            artifact, tmp_path / "in", chunks, long_documents="chunk", prompt="q: ", chunk_overlap=6
        )
        == 0
    )
    assert (
        run_job(
            artifact, tmp_path / "in", means, long_documents="mean", prompt="q: ", chunk_overlap=6
        )
        == 0
    )
    mean_rows = _rows(means)
    assert [r["id"] for r in mean_rows] == [str(i) for i in range(len(corpus))]
    tokenizer = st_embedder.tokenizer
    for i, row in enumerate(mean_rows):
        windows = [r for r in _rows(chunks) if r["id"] == str(i)]
        slices = ["q: " + corpus[i][r["char_start"] : r["char_end"]] for r in windows]
        embeddings = st_embedder.encode(slices)
        weights = np.array([len(tokenizer(s)["input_ids"]) for s in slices], dtype=np.float64)
        expected = weights @ embeddings / weights.sum()
        assert _cos(row["embedding"], expected) >= 0.9999
        assert abs(np.linalg.norm(row["embedding"]) - 1.0) < 1e-5  # normalised as the model's


def test_mean_of_a_classifier_is_the_activation_of_the_mean_logits(
    tmp_path: Path, compiled: CompileFn, classifier_dir: Path, corpus: list[str]
) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    artifact = compiled(classifier_dir, shapes=(Shape(32, 4),)).path
    _write_corpus(tmp_path, corpus)
    chunks, means = tmp_path / "chunks", tmp_path / "means"
    assert run_job(artifact, tmp_path / "in", chunks, long_documents="chunk", chunk_overlap=6) == 0
    assert run_job(artifact, tmp_path / "in", means, long_documents="mean", chunk_overlap=6) == 0
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    chunk_rows = _rows(chunks)
    for i, row in enumerate(_rows(means)):
        slices = [
            corpus[i][r["char_start"] : r["char_end"]] for r in chunk_rows if r["id"] == str(i)
        ]
        with torch.no_grad():
            logits = model(**hf_tokenizer(slices, padding=True, return_tensors="pt")).logits
        expected = torch.softmax(logits.mean(dim=0), dim=-1).numpy()
        np.testing.assert_allclose(row["scores"], expected, atol=1e-4)
        assert row["label"] == model.config.id2label[int(expected.argmax())]


def test_the_demo_model_matches_sentence_transformers_window_by_window(
    tmp_path: Path, compiled: CompileFn
) -> None:
    """all-MiniLM-L6-v2 for real: chunk rows with a prompt equal `encode(slice, prompt=...)`."""
    from sentence_transformers import SentenceTransformer

    artifact = compiled(minilm_path(), shapes=(Shape(64, 8),)).path
    texts = [long_text(150, 7), "Ünïcødé 🙂 short"]
    _write_corpus(tmp_path, texts)
    out = tmp_path / "out"
    prompt = "passage: "
    assert run_job(artifact, tmp_path / "in", out, long_documents="chunk", prompt=prompt) == 0
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    rows = _rows(out)
    assert len(rows) > 3
    for row in rows:
        text = texts[int(row["id"])][row["char_start"] : row["char_end"]]
        assert _cos(row["embedding"], model.encode(text, prompt=prompt)) >= 0.9999


def test_an_overlap_as_large_as_a_window_is_refused_on_one_line(
    tmp_path: Path, compiled: CompileFn, embedder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = compiled(embedder_dir, shapes=(Shape(32, 4),)).path
    _write_corpus(tmp_path, ["text"])
    argv = ["run", "--model", artifact, "--input", str(tmp_path / "in")]
    argv += ["--output", str(tmp_path / "out"), "--long-documents", "chunk"]
    code, out, err = invoke([*argv, "--chunk-overlap", "30"], capsys)
    assert_usage_error(code, out, err, ("--chunk-overlap", "less than a window's 30 tokens", "30"))
    assert not (tmp_path / "out").exists()


# -- serve ----------------------------------------------------------------------------------


def test_serve_takes_long_documents_and_the_prompt_from_its_environment(
    tmp_path: Path, compiled: CompileFn, embedder_dir: Path, st_embedder: Any
) -> None:
    """SageMaker sets no flags: BATCHJOB_LONG_DOCUMENTS, BATCHJOB_CHUNK_OVERLAP and
    BATCHJOB_PROMPT do. Each record answers with its windows, in input order."""
    from tests.serve_process import JSONLINES, Server, jsonlines

    artifact = compiled(embedder_dir, shapes=(Shape(32, 4),)).path
    env = {"BATCHJOB_LONG_DOCUMENTS": "chunk", "BATCHJOB_CHUNK_OVERLAP": "4"}
    server = Server(
        ["--model", artifact, "--port", "0"], env | {"BATCHJOB_PROMPT": "q: "}, tmp_path
    )
    try:
        server.wait_ready()
        texts = [long_text(80, 9), "short"]
        answers = server.post(jsonlines([{"inputs": t} for t in texts]), JSONLINES)
        toolkit = server.post(json.dumps({"inputs": texts}).encode(), "application/json")
    finally:
        assert server.stop() == 0
    assert [len(a["chunks"]) > 1 for a in answers] == [True, False]
    for text, answer, windows in zip(texts, answers, toolkit, strict=True):
        slices = [text[c["char_start"] : c["char_end"]] for c in answer["chunks"]]
        expected = st_embedder.encode(slices, prompt="q: ")
        for chunk, embedding, ref in zip(answer["chunks"], windows, expected, strict=True):
            assert _cos(chunk["embedding"], ref) >= 0.9999
            assert _cos(embedding, ref) >= 0.9999


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BATCHJOB_LONG_DOCUMENTS": "all"}, "BATCHJOB_LONG_DOCUMENTS must be one of truncate"),
        ({"BATCHJOB_CHUNK_OVERLAP": "-3"}, "BATCHJOB_CHUNK_OVERLAP must be ≥ 0, got -3"),
        ({"BATCHJOB_CHUNK_OVERLAP": "many"}, "BATCHJOB_CHUNK_OVERLAP must be an integer"),
        (
            {"BATCHJOB_PROMPT": "q: ", "BATCHJOB_PROMPT_NAME": "query"},
            "BATCHJOB_PROMPT and BATCHJOB_PROMPT_NAME exclude each other",
        ),
    ],
)
def test_serve_refuses_bad_text_settings_in_its_environment(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    from batchjob.errors import UsageError
    from batchjob.serve_config import serve_spec

    with pytest.raises(UsageError, match=message):
        serve_spec({"model": str(tmp_path)}, env)


def test_serve_flags_win_over_its_environment(tmp_path: Path) -> None:
    from batchjob.serve_config import serve_spec

    env = {"BATCHJOB_LONG_DOCUMENTS": "chunk", "BATCHJOB_PROMPT": "q: "}
    spec = serve_spec({"model": str(tmp_path), "long_documents": "mean", "prompt_name": "x"}, env)
    assert (spec.long_documents, spec.prompt, spec.prompt_name) == ("mean", None, "x")
    spec = serve_spec({"model": str(tmp_path)}, env | {"BATCHJOB_CHUNK_OVERLAP": "7"})
    assert (spec.long_documents, spec.chunk_overlap, spec.prompt) == ("chunk", 7, "q: ")


# -- other families, as sentence-transformers saves them ------------------------------------

FAMILY_MODELS = {"roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}


@pytest.fixture(scope="module", params=sorted(FAMILY_MODELS))
def st_family(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bytelevel_dir: Path,
    unigram_dir: Path,
) -> tuple[Path, Any]:
    """A tiny RoBERTa (byte-level BPE) or XLM-R (Unigram) embedder, saved by sentence-
    transformers itself (Transformer, mean Pooling, Normalize); and the model as it loads it."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    from tests.tokenizer_families import hub_directory

    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    hub = hub_directory(family, tmp / "hub", bytelevel_dir, unigram_dir)
    model_cls = getattr(transformers, FAMILY_MODELS[family])
    config_cls = getattr(transformers, FAMILY_MODELS[family].replace("Model", "Config"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(hub)
    torch.manual_seed(2)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = tmp / "base"
    model_cls(config).eval().save_pretrained(base)
    tokenizer.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=32)
    st = SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()], device="cpu")
    st.save(str(tmp / "st"))
    # sentence-transformers 6 writes {"pooling_mode": "mean"}, which batchjob's compile does not
    # read yet (that is the pooling modes' piece of the issue): the older form says the same.
    legacy = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (tmp / "st" / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    return tmp / "st", SentenceTransformer(str(tmp / "st"), device="cpu")


def test_windows_of_other_families_equal_sentence_transformers(
    tmp_path: Path, compiled: CompileFn, st_family: tuple[Path, Any]
) -> None:
    model_dir, model = st_family
    artifact = compiled(model_dir, shapes=(Shape(32, 4),)).path
    texts = [long_text(60, 11), "Ünïcødé 🙂 東京 short"]
    _write_corpus(tmp_path, texts)
    out = tmp_path / "out"
    options = {"long_documents": "chunk", "chunk_overlap": 5, "prompt": "query: "}
    assert run_job(artifact, tmp_path / "in", out, **options) == 0
    rows = _rows(out)
    assert len(rows) > 3
    for row in rows:
        text = texts[int(row["id"])][row["char_start"] : row["char_end"]]
        assert _cos(row["embedding"], model.encode(text, prompt="query: ")) >= 0.9999


# -- the engine, over a stand-in pool -------------------------------------------------------


def _engine_run(artifact: str, scenario: Any, fail: Exception | None = None) -> None:
    import asyncio

    from batchjob.artifact import load_artifact
    from batchjob.engine import Engine
    from tests.replica_fakes import StandInPool

    async def main() -> None:
        pool = StandInPool(None, fail)
        async with Engine(load_artifact(artifact), pool, max_batch_delay=0.001) as engine:
            await asyncio.wait_for(scenario(engine, pool), 30)

    asyncio.run(main())


def test_a_failed_window_fails_its_call_and_the_engine_goes_on(artifact: str) -> None:
    from batchjob.errors import ReplicaError

    chunk = TextOptions("chunk", 4)
    records = [Record("a", long_text(400, 5)), Record("b", "short")]

    async def scenario(engine: Any, pool: Any) -> None:
        with pytest.raises(ReplicaError, match="replica 0 died"):
            await engine.infer(records, chunk)
        pool.fail = None
        results = await engine.infer([Record("bad", None, error="bad: no text"), *records], chunk)
        assert [r.error for r in results] == ["bad: no text", None, None]
        assert [len(r.chunks) for r in results[1:]] == [results[1].windows, 1]
        assert results[1].windows > 10
        means = await engine.infer(records, TextOptions("mean", 4))
        assert [r.windows for r in means] == [results[1].windows, 1]
        assert means[0].values is not None
        assert means[0].chunks == ()

    _engine_run(artifact, scenario, fail=ReplicaError("replica 0 died"))
