"""sentence-transformers models read as the library reads them, and the model's own length.

The models here are saved by the installed sentence-transformers itself (a tiny BERT or
MPNet Transformer, a Pooling of each mode, a Dense layer, Normalize), compiled by batchjob, and
compared with the library's own `encode` on the same texts: packed and unpacked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchjob.artifact import Artifact
from batchjob.batching import Batch, BucketBatcher, Item, PackingBatcher, Shape
from batchjob.compile import compile_artifact
from batchjob.compile_plan import model_length, plan
from batchjob.config import CompileSpec
from batchjob.errors import UsageError
from batchjob.models import load_model
from batchjob.records import Record
from batchjob.st_modules import read_pooling
from batchjob.tokens import RecordTokenizer
from tests.conftest import make_texts, minilm_path, outputs_by_key
from tests.family_models import save_tokenizer
from tests.tokenizer_families import MPNET_VOCAB

HIDDEN = 32
LENGTH = 64  # the tiny models' max_seq_length
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def encoder(root: Path, kind: str = "bert", positions: int = 512, **extra: Any) -> Path:
    """A tiny random Hugging Face encoder with its family's tokenizer (MiniLM's but for
    MPNet), saved at `root`."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        kind,
        vocab_size=MPNET_VOCAB if kind == "mpnet" else 30522,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=positions,
        **extra,
    )
    AutoModel.from_config(config).eval().save_pretrained(root)
    save_tokenizer(kind, root)
    return root


def st_model(
    root: Path, pooling: str | tuple[str, ...], dense: bool = True, kind: str = "bert"
) -> Path:
    """A sentence-transformers model saved by the library: Transformer (a `kind` encoder),
    Pooling, [Dense], Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    hf = encoder(root.parent / f"{root.name}-hf", kind)
    torch.manual_seed(1)
    transformer = Transformer(str(hf), max_seq_length=LENGTH)
    modules: list[Any] = [transformer, Pooling(HIDDEN, pooling_mode=pooling)]
    width = HIDDEN * (1 if isinstance(pooling, str) else len(pooling))
    if dense:
        modules.append(Dense(width, 16, activation_function=torch.nn.Tanh()))
    modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(root))
    return root


def encode(model: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model), device="cpu")
    out: np.ndarray = st.encode(texts, batch_size=8, convert_to_numpy=True)
    return out


def embed(artifact: Artifact, texts: list[str]) -> np.ndarray:
    """Embeddings per text, in order, through the real tokenizer, batcher and graphs."""
    tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
    encoded = tokenizer.encode([Record(str(i), t) for i, t in enumerate(texts)])
    items = [Item(i, e.ids, e.type_ids) for i, e in enumerate(encoded) if e is not None]
    batcher: BucketBatcher | PackingBatcher
    if artifact.strategy == "packing":
        batcher = PackingBatcher(
            artifact.shapes[0],
            max_segments=artifact.max_segments,
            position_offset=artifact.position_offset,
            pad_id=tokenizer.pad_id,
        )
    else:
        batcher = BucketBatcher(artifact.shapes, pad_id=tokenizer.pad_id)
    batches: list[Batch] = batcher.add(items) + batcher.flush()
    found = outputs_by_key(artifact, batches)
    return np.stack([found[i] for i in range(len(texts))])


def assert_same_embeddings(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    cosine = (got * expected).sum(-1) / (
        np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1)
    )
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# Short and long texts: some past the models' 64 tokens, so truncation is compared too.
TEXTS = make_texts(24, seed=3, max_words=80)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("pooling", [*MODES, ("cls", "mean")], ids=[*MODES, "cls+mean"])
@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_each_pooling_mode_equals_encode(
    kind: str, pooling: str | tuple[str, ...], packing: bool, tmp_path: Path
) -> None:
    model = st_model(tmp_path / "st", pooling, kind=kind)
    # Packed: the default shape, one row of the model's own length. Unpacked: two buckets
    # (the default's eight graphs cost time and show nothing more about pooling).
    shapes = () if packing else (Shape(32, 4), Shape(LENGTH, 2))
    spec = CompileSpec(model=str(model), dtype="fp32", packing=packing, shapes=shapes)
    artifact = compile_artifact(spec, str(tmp_path / "a"))
    assert artifact.strategy == ("packing" if packing else "buckets")
    assert artifact.pooling == (pooling if isinstance(pooling, str) else "+".join(pooling))
    assert artifact.max_length == LENGTH
    assert_same_embeddings(embed(artifact, TEXTS), encode(model, TEXTS))


def test_the_older_pooling_config_form_reads_the_same(tmp_path: Path) -> None:
    """`pooling_mode_*` flags and sentence-transformers' older module names, as models
    saved before version 6 have them."""
    model = st_model(tmp_path / "st", ("max", "weightedmean"))
    config = model / "1_Pooling" / "config.json"
    flags = {f"pooling_mode_{m}": False for m in ("cls_token", "mean_tokens", "max_tokens")}
    flags |= {"pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_lasttoken": False}
    flags |= {"pooling_mode_max_tokens": True, "pooling_mode_weightedmean_tokens": True}
    config.write_text(json.dumps({"word_embedding_dimension": HIDDEN, **flags}))
    # The encoder in a folder of its own, as the first versions of the library saved it.
    (model / "0_Transformer").mkdir()
    for file in model.iterdir():
        if file.is_file() and file.name not in (
            "modules.json",
            "config_sentence_transformers.json",
        ):
            file.rename(model / "0_Transformer" / file.name)
    listing = json.loads((model / "modules.json").read_text())
    listing[0]["path"] = "0_Transformer"
    for entry in listing:
        entry["type"] = "sentence_transformers.models." + entry["type"].rsplit(".", 1)[-1]
    (model / "modules.json").write_text(json.dumps(listing))

    artifact = compile_artifact(CompileSpec(model=str(model), dtype="fp32"), str(tmp_path / "a"))
    assert (artifact.strategy, artifact.pooling) == ("packing", "max+weightedmean")
    assert_same_embeddings(embed(artifact, TEXTS), encode(model, TEXTS))


def test_bf16_with_a_dense_layer(tmp_path: Path) -> None:
    model = st_model(tmp_path / "st", "weightedmean")
    artifact = compile_artifact(CompileSpec(model=str(model), dtype="bf16"), str(tmp_path / "a"))
    got, expected = embed(artifact, TEXTS), encode(model, TEXTS)
    cosine = (got * expected).sum(-1)  # both unit length
    assert cosine.min() >= 0.99, cosine.min()


def test_do_lower_case_lowercases_as_the_library_does(tmp_path: Path) -> None:
    """A Transformer config's do_lower_case over a tokenizer that keeps case."""
    model = st_model(tmp_path / "st", "mean", dense=False)
    tokenizer_file = model / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    tokenizer["normalizer"]["lowercase"] = False
    tokenizer_file.write_text(json.dumps(tokenizer))
    set_tokenizer_config(model, do_lower_case=False)  # transformers rebuilds from this too
    config_file = model / "sentence_bert_config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"do_lower_case": True})
    )
    texts = [t.upper() for t in TEXTS[:8]] + TEXTS[:8]

    artifact = compile_artifact(CompileSpec(model=str(model), dtype="fp32"), str(tmp_path / "a"))
    got = embed(artifact, texts)
    assert_same_embeddings(got, encode(model, texts))
    np.testing.assert_allclose(got[:8], got[8:], rtol=0, atol=1e-5)


def test_read_pooling_both_forms(tmp_path: Path) -> None:
    path = tmp_path / "config.json"

    def read(config: dict[str, object]) -> tuple[str, ...]:
        path.write_text(json.dumps(config))
        return read_pooling(str(path))

    assert read({"pooling_mode": "lasttoken"}) == ("lasttoken",)
    assert read({"pooling_mode": ["mean", "cls"]}) == ("mean", "cls")
    # The flags concatenate in the library's order, whatever the file's; none set is mean.
    assert read({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}) == (
        "cls",
        "mean",
    )
    assert read({"pooling_mode_mean_tokens": False}) == ("mean",)
    with pytest.raises(UsageError, match=r"config.json: pooling_mode \"sum\" is not supported"):
        read({"pooling_mode": "sum"})
    with pytest.raises(UsageError, match=r"config\.json: no pooling mode"):
        read({"word_embedding_dimension": 32})


def test_an_unsupported_module_is_exit_2_naming_it(tmp_path: Path) -> None:
    model = st_model(tmp_path / "st", "mean", dense=False)
    listing = json.loads((model / "modules.json").read_text())
    listing.insert(
        2, {"idx": 2, "name": "2", "path": "2_LSTM", "type": "sentence_transformers.models.LSTM"}
    )
    (model / "modules.json").write_text(json.dumps(listing))
    command = [sys.executable, "-m", "batchjob", "compile", "--model", str(model)]
    done = subprocess.run(
        [*command, "--output", str(tmp_path / "a")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "module sentence_transformers.models.LSTM (2_LSTM) is not supported" in lines[0]
    assert str(model / "modules.json") in lines[0]
    assert not (tmp_path / "a").exists()


def test_a_dense_layer_that_does_not_fit_the_pooling_is_refused(tmp_path: Path) -> None:
    model = st_model(tmp_path / "st", ("cls", "mean"))
    config = model / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"embedding_dimension": HIDDEN, "pooling_mode": "mean"}))
    with pytest.raises(UsageError, match="Dense layer takes 64 features but mean pooling gives 32"):
        load_model(str(model), "feature-extraction", torch.float32)


def loaded_length(path: Path) -> int:
    return model_length(load_model(str(path), "feature-extraction", torch.float32))


def set_tokenizer_config(path: Path, **values: object) -> None:
    config_file = path / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | values))


def set_tokenizer_length(path: Path, length: int | None) -> None:
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("model_max_length", None)
    if length is not None:
        config["model_max_length"] = length
    config_file.write_text(json.dumps(config))


def test_default_length_follows_the_model(tmp_path: Path) -> None:
    # sentence-transformers' max_seq_length first (MiniLM's tokenizer says 512 beside it).
    bert = encoder(tmp_path / "bert")
    (bert / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96}))
    assert loaded_length(bert) == 96
    # Then the tokenizer's model_max_length.
    (bert / "sentence_bert_config.json").unlink()
    set_tokenizer_length(bert, 200)
    assert loaded_length(bert) == 200
    # Then the positions the config has; capped at 512.
    set_tokenizer_length(bert, None)
    big = encoder(tmp_path / "big", positions=1024)
    set_tokenizer_length(big, None)
    assert loaded_length(big) == 512
    # RoBERTa-style positions start at padding_idx + 1: 130 positions hold 128 tokens.
    roberta = encoder(tmp_path / "roberta", kind="roberta", positions=130, pad_token_id=1)
    set_tokenizer_length(roberta, None)
    assert loaded_length(roberta) == 128
    # So do MPNet's, from its fixed padding_idx (1) whatever its config's pad_token_id.
    mpnet = encoder(tmp_path / "mpnet", kind="mpnet", positions=130, pad_token_id=7)
    set_tokenizer_length(mpnet, None)
    assert loaded_length(mpnet) == 128
    # Never past the positions, whatever the model's files say.
    (roberta / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 300}))
    assert loaded_length(roberta) == 128


def test_the_default_shapes_follow_the_model_length(tmp_path: Path) -> None:
    model = encoder(tmp_path / "bert")
    set_tokenizer_length(model, 256)
    loaded = load_model(str(model), "feature-extraction", torch.float32)
    # Packing: one row of the model's length, the 1024-token budget's worth of rows.
    assert plan(CompileSpec(model=str(model)), loaded).shapes == (Shape(256, 4),)
    # Buckets: the standard lengths up to it, each a budget's worth of rows.
    buckets = plan(CompileSpec(model=str(model), packing=False), loaded).shapes
    assert [s.seq_len for s in buckets] == [16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert all(s.batch_size == 1024 // s.seq_len for s in buckets)
    # A shape flag still decides.
    spec = CompileSpec(model=str(model), shapes=(Shape(128, 8),))
    assert plan(spec, loaded).shapes == (Shape(128, 8),)


def test_the_demo_model_at_256_equals_encode(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (max_seq_length 256 in sentence_bert_config.json, 512 in its
    tokenizer's config, the older pooling flags): a document of ~250 tokens, one past 256."""
    from transformers import AutoTokenizer

    model = minilm_path()
    artifact = compile_artifact(CompileSpec(model=str(model), dtype="fp32"), str(tmp_path / "a"))
    assert (artifact.strategy, artifact.shapes) == ("packing", (Shape(256, 4),))
    words = " ".join(make_texts(40, seed=5, max_words=40)).split()
    tokenizer = AutoTokenizer.from_pretrained(model)
    n = next(
        n for n in range(1, len(words)) if len(tokenizer(" ".join(words[:n]))["input_ids"]) >= 248
    )
    long_doc = " ".join(words[:n])
    assert 248 <= len(tokenizer(long_doc)["input_ids"]) <= 256
    texts = [long_doc, " ".join(words[: n + 100]), "a short one", *make_texts(5, seed=6)]
    assert_same_embeddings(embed(artifact, texts), encode(model, texts))
