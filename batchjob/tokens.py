"""Records → token ids with the artifact's fast tokenizer, truncated to the largest shape."""

from __future__ import annotations

from dataclasses import dataclass

from batchjob.records import Record


@dataclass(frozen=True, slots=True)
class Encoded:
    ids: list[int]
    type_ids: list[int]
    truncated: bool


class RecordTokenizer:
    """The Rust tokenizer behind the HF one: it releases the GIL, so it runs in a thread."""

    def __init__(self, tokenizer_path: str, max_length: int) -> None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(tokenizer_path)
        self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else 0
        self._tokenizer = hf.backend_tokenizer
        # Same truncation as `tokenizer(text, truncation=True, max_length=...)` (longest_first).
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.no_padding()

    def encode(self, records: list[Record]) -> list[Encoded | None]:
        """One entry per record, None where the record is an error."""
        good = [r for r in records if r.error is None]
        inputs = [r.text if r.text_pair is None else (r.text, r.text_pair) for r in good]
        encodings = iter(self._tokenizer.encode_batch(inputs) if inputs else [])
        out: list[Encoded | None] = []
        for record in records:
            if record.error is not None:
                out.append(None)
                continue
            e = next(encodings)
            out.append(Encoded(e.ids, e.type_ids, bool(e.overflowing)))
        return out
