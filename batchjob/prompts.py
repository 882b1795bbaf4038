"""Prompts (`--prompt`, `--prompt-name`) and the long-document options, resolved against an
artifact into the `TextOptions` the engine runs with.

A model's prompts are those sentence-transformers keeps in `config_sentence_transformers.json`
(`prompts`, `default_prompt_name`); its Pooling module's `include_prompt` says whether the
prompt's tokens are pooled. Compiling copies them into the artifact's `prompts.json` (an
artifact without it has no prompts). Resolution is `SentenceTransformer.encode`'s: a prompt
given is used as it is; a prompt name must be one of the model's; with neither, the model's
default prompt (if it names one), else none. sentence-transformers models always have the
names `query` and `document` (empty unless the model sets them).

A model whose pooling leaves the prompt out (`include_prompt: false`, INSTRUCTOR's) is refused
with a prompt: the compiled graphs pool every token of a window, prompt included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchjob.artifact import Artifact
from batchjob.long_documents import LONG_DOCUMENTS, TextOptions, window_budget
from batchjob.tokens import RecordTokenizer

PROMPTS_FILE = "prompts.json"


@dataclass(frozen=True)
class ModelPrompts:
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True


def read_model_prompts(model: str) -> ModelPrompts:
    """A model directory's prompts, as sentence-transformers loads them (none elsewhere)."""
    if not os.path.isdir(model):
        return ModelPrompts()
    prompts: dict[str, str] = {}
    default = None
    if os.path.exists(os.path.join(model, "modules.json")):  # a sentence-transformers model
        prompts = {"query": "", "document": ""}
    config = config_json(os.path.join(model, "config_sentence_transformers.json"))
    if isinstance(config.get("prompts"), dict):
        prompts |= {str(k): str(v or "") for k, v in config["prompts"].items()}
    if isinstance(config.get("default_prompt_name"), str):
        default = config["default_prompt_name"]
    pooling = config_json(os.path.join(model, "1_Pooling", "config.json"))
    return ModelPrompts(prompts, default, bool(pooling.get("include_prompt", True)))


def write_prompts(model: str, artifact_dir: str) -> None:
    found = read_model_prompts(model)
    data = {
        "prompts": found.prompts,
        "default_prompt_name": found.default_prompt_name,
        "include_prompt": found.include_prompt,
    }
    with open(os.path.join(artifact_dir, PROMPTS_FILE), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def artifact_prompts(artifact: Artifact) -> ModelPrompts:
    data = config_json(os.path.join(artifact.path, PROMPTS_FILE))
    prompts = data.get("prompts")
    default = data.get("default_prompt_name")
    return ModelPrompts(
        {str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {},
        default if isinstance(default, str) else None,
        data.get("include_prompt", True) is not False,
    )


def config_json(path: str) -> dict[str, Any]:
    """A model's optional JSON config file: {} when absent, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def spec_text_options(artifact: Artifact, spec: TextFlags, error: type[Exception]) -> TextOptions:
    """The flags of a RunSpec, WorkerSpec or ServeSpec, resolved (loads the tokenizer)."""
    tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
    return resolve_text_options(
        artifact,
        tokenizer,
        long_documents=spec.long_documents,
        chunk_overlap=spec.chunk_overlap,
        prompt=spec.prompt,
        prompt_name=spec.prompt_name,
        error=error,
    )


class TextFlags(Protocol):
    @property
    def long_documents(self) -> str: ...
    @property
    def chunk_overlap(self) -> int: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def prompt_name(self) -> str | None: ...


def resolve_text_options(
    artifact: Artifact,
    tokenizer: RecordTokenizer,
    *,
    long_documents: str = "truncate",
    chunk_overlap: int = 32,
    prompt: str | None = None,
    prompt_name: str | None = None,
    error: type[Exception] = ValueError,
    names: tuple[str, str, str, str] = (
        "--long-documents",
        "--chunk-overlap",
        "--prompt",
        "--prompt-name",
    ),
) -> TextOptions:
    """The options the engine runs with, or `error` naming the problem (the flags, or the
    fields of a job message, as `names` says)."""
    mode_name, overlap_name, prompt_flag, name_flag = names
    if long_documents not in LONG_DOCUMENTS:
        choices = ", ".join(LONG_DOCUMENTS)
        raise error(f"{mode_name} must be one of {choices}, got {long_documents!r}")
    if prompt is not None and prompt_name is not None:
        raise error(f"{prompt_flag} and {name_flag} exclude each other")
    if artifact.task == "token-classification":
        if prompt or prompt_name:  # entities' offsets are into the text, not a prompt's
            raise error(f"{prompt_flag}: token-classification takes no prompt")
        if long_documents == "mean":
            raise error(
                f"{mode_name} mean does not apply to token-classification (a mean of entities "
                "means nothing): use chunk, which merges the windows' entities"
            )
    model = artifact_prompts(artifact)
    name = prompt_name
    if prompt is None:
        if name is None:
            name = model.default_prompt_name
        if name is not None and name not in model.prompts:
            known = ", ".join(sorted(model.prompts)) or "none"
            raise error(f"{name_flag} {name!r}: the model has no such prompt (it has: {known})")
        prompt = model.prompts[name] if name is not None else ""
    if prompt and not model.include_prompt:
        raise error(
            f"{prompt_flag if prompt_name is None else name_flag}: this model leaves the prompt "
            "out of its pooling (Pooling include_prompt: false), which batchjob's graphs don't do"
        )
    options = TextOptions(long_documents, chunk_overlap, prompt, name)
    if options.windowed:
        budget = window_budget(tokenizer, prompt)
        where = f"the compiled length {tokenizer.max_length} less the special tokens" + (
            " and the prompt's" if prompt else ""
        )
        if budget < 2:
            raise error(f"{mode_name} {long_documents}: no room for text in a window ({where})")
        if not 0 <= chunk_overlap < budget:
            raise error(
                f"{overlap_name} must be ≥ 0 and less than a window's {budget} tokens ({where}), "
                f"got {chunk_overlap}"
            )
    return options
