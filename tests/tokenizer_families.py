"""Tokenizers of the encoder families batchjob runs, as their hub repositories have them,
built here (nothing downloaded) from the vocabularies at hand: all-MiniLM's WordPiece, and
a byte-level BPE and a Unigram trained here (session fixtures, which conftest.py's
pytest_plugins registers for every test module). Each directory holds a
tokenizer.json, a tokenizer_config.json naming the class the hub names, and a config.json
with the model type, as a model directory does.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WORDS, minilm_path

FAMILIES = ("bert", "distilbert", "electra", "mpnet", "roberta", "xlm-roberta", "modernbert")
# mpnet_directory's tokenizer: MiniLM's 30,522 tokens, then <s>, <pad>, </s>, <unk>, <mask>.
MPNET_VOCAB = 30527
MPNET_PAD_ID = 30523


def _write(target: Path, tokenizer: object, model_type: str, config: dict[str, object]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(target / "tokenizer.json"))  # type: ignore[attr-defined]
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "config.json").write_text(json.dumps({"model_type": model_type}))
    return target


def _wordpiece_specials(target: Path, model_type: str, config: dict[str, object]) -> Path:
    """MiniLM's BERT tokenizer under another family's name (DistilBERT, ELECTRA: the same)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    return _write(target, tokenizer, model_type, config)


def mpnet_directory(target: Path) -> Path:
    """all-mpnet-base-v2's shape: BERT's normalizer and WordPiece, RoBERTa's specials."""
    from tokenizers import AddedToken, Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    s, e = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", e), ("<s>", s))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    config = {"tokenizer_class": "MPNetTokenizer", "do_lower_case": True, "unk_token": "[UNK]"}
    return _write(target, tokenizer, "mpnet", config)


def _modernbert(target: Path, bytelevel: Path) -> Path:
    """ModernBERT's shape: a byte-level BPE with BERT's [CLS]/[SEP] template, the generic class."""
    from tokenizers import AddedToken, Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(bytelevel / "tokenizer.json"))
    tokenizer.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    tokenizer.add_special_tokens([AddedToken("[MASK]", lstrip=True, special=True)])
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
    specials |= {"mask_token": "[MASK]", "unk_token": "[UNK]"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    return _write(target, tokenizer, "modernbert", config)


def _renamed(target: Path, source: Path, model_type: str, tokenizer_class: str) -> Path:
    """A saved tokenizer (test_tokens's byte-level BPE or Unigram) under a family's class."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = tokenizer_class
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "config.json").write_text(json.dumps({"model_type": model_type}))
    return target


def hub_directory(family: str, target: Path, bytelevel: Path, unigram: Path) -> Path:
    """`family`'s tokenizer in `target`, as its hub repository has it."""
    if family == "bert":
        return minilm_path()
    if family == "distilbert":
        config = {"do_lower_case": True, "model_max_length": 512}  # distilbert-base-uncased's
        return _wordpiece_specials(target, "distilbert", config)
    if family == "electra":
        config = {"tokenizer_class": "ElectraTokenizer", "do_lower_case": True}
        return _wordpiece_specials(target, "electra", config)
    if family == "mpnet":
        return mpnet_directory(target)
    if family == "roberta":
        return _renamed(target, bytelevel, "roberta", "RobertaTokenizer")
    if family == "xlm-roberta":
        return _renamed(target, unigram, "xlm-roberta", "XLMRobertaTokenizer")
    if family == "modernbert":
        return _modernbert(target, bytelevel)
    raise ValueError(family)


def compiled_tokenizer(source: Path, target: Path) -> Path:
    """The tokenizer/ directory `batchjob compile` writes for a model at `source`: transformers
    loads it (AutoTokenizer) and saves it (save_pretrained)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


# Trained here: a RoBERTa-like byte-level BPE and an XLM-R-like Unigram (session fixtures,
# registered by conftest.py's pytest_plugins).


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = [*WORDS, "hello", "world", "aaaa", "abab", "==", "1234", "中文", "😀", "  ", "\n"]
    return [" ".join(rng.choices(words, k=rng.randint(3, 20))) for _ in range(300)]


def _save(tokenizer: Any, target: Path) -> Path:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    fast.save_pretrained(target)
    return target


SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@pytest.fixture(scope="session")
def bytelevel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RoBERTa-like byte-level BPE, saved and loaded through AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return _save(tokenizer, tmp_path_factory.mktemp("bytelevel"))


@pytest.fixture(scope="session")
def unigram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An XLM-R-like Unigram: NFKC, runs of spaces collapsed, Metaspace."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=SPECIALS, unk_token="<unk>")
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return _save(tokenizer, tmp_path_factory.mktemp("unigram"))


@pytest.fixture(scope="session", params=FAMILIES)
def artifact_tokenizer(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bytelevel_dir: Path,
    unigram_dir: Path,
) -> Path:
    """A family's tokenizer/ directory as `batchjob compile` writes it into an artifact."""
    tmp = tmp_path_factory.mktemp(request.param)
    source = hub_directory(request.param, tmp / "hub", bytelevel_dir, unigram_dir)
    return compiled_tokenizer(source, tmp / "tokenizer")


class Counting:
    """The window tokenizer, counting what it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.chars = 0
        self.largest = 0
        self.calls = 0
        self.holding_the_gil = 0  # texts given to `encode`, which (unlike encode_batch) holds it

    def encode(self, text: str | list[str], **kwargs: Any) -> Any:
        if isinstance(text, str):  # not a placeholder for the post-processor
            self._count([text])
            self.holding_the_gil += 1
        return self.inner.encode(text, **kwargs)

    def encode_batch(self, inputs: list[Any], **kwargs: Any) -> Any:
        self._count([text for text in inputs if isinstance(text, str)])
        return self.inner.encode_batch(inputs, **kwargs)

    def _count(self, texts: list[str]) -> None:
        self.calls += 1
        self.chars += sum(map(len, texts))
        self.largest = max([self.largest, *map(len, texts)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
