"""Print where a `batchjob run` wrote its results, and a few rows of each shard.

    python examples/show.py OUT [INPUT_DIR]

With INPUT_DIR (JSON Lines), the rows of a `--long-documents chunk` run also show the text of
their window: `text[char_start:char_end]`.
"""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

out = Path(sys.argv[1])
texts = {}
if len(sys.argv) > 2:
    for path in Path(sys.argv[2]).rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            texts[record["id"]] = record["text"]
manifest = json.loads((out / "_manifest.json").read_text())
counts = manifest["counts"]
print(f"\nResults in {out.resolve()}/  ({counts['documents']} documents, "
      f"{counts['errors']} errors, {manifest['timings']['seconds']} s)")
for path in sorted(out.rglob("*.parquet")):
    table = pq.read_table(path)
    print(f"\n{path.relative_to(out)}: {table.num_rows} rows, columns {table.column_names}")
    windows = "chunk" in table.column_names
    for row in table.slice(0, 6 if windows else 3).to_pylist():
        if row.get("embedding") is not None:
            row["embedding"] = f"[{', '.join(f'{x:.3f}' for x in row['embedding'][:4])}, ...]"
        print(f"  {row}")
        if windows and row["id"] in texts:
            window = texts[row["id"]][row["char_start"] : row["char_end"]]
            print(f"      window text: {window[:60]!r} ... {window[-30:]!r}")
    errors = [r for r in table.to_pylist() if r["error"]]
    for row in errors[:1]:
        print(f"  error row: {row['id']}: {row['error']}")
