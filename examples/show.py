"""Print where a `batchjob run` wrote its results, and a few rows of each shard."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

out = Path(sys.argv[1])
manifest = json.loads((out / "_manifest.json").read_text())
print(f"\nResults in {out.resolve()}/  ({manifest['counts']['documents']} documents, "
      f"{manifest['counts']['errors']} errors, {manifest['timings']['seconds']} s)")
for path in sorted(out.rglob("*.parquet")):
    table = pq.read_table(path)
    print(f"\n{path.relative_to(out)}: {table.num_rows} rows, columns {table.column_names}")
    for row in table.slice(0, 3).to_pylist():
        if row.get("embedding") is not None:
            row["embedding"] = f"[{', '.join(f'{x:.3f}' for x in row['embedding'][:4])}, ...]"
        print(f"  {row}")
    errors = [r for r in table.to_pylist() if r["error"]]
    for row in errors[:1]:
        print(f"  error row: {row['id']}: {row['error']}")
