"""The rows benchmarks/transfer.py appended to a JSON lines file, as a markdown table (the latest row of each label).

    python benchmarks/transfer_table.py benchmarks/out/transfer-minilm.jsonl
"""

import argparse
import json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("files", nargs="+")
parser.add_argument("--all", action="store_true", help="Every row, not only the latest of each label.")
args = parser.parse_args()

rows = []
for path in args.files:
    with open(path, encoding="utf-8") as f:
        rows += [json.loads(line) for line in f if line.strip()]
for row in rows:  # rows written before the column was named for what it holds
    if "builtin" in row["quality"]:
        row["quality"] = {("docstrings" if k == "builtin" else k): v for k, v in row["quality"].items()}
if not args.all:
    latest = {}
    for row in rows:
        latest[(row["model"], row["label"])] = row
    rows = list(latest.values())

sets = []
for row in rows:
    sets += [k for k in row["quality"] if k not in sets]
others = [k for k in sets if k != "docstrings"]
ratio = rows and rows[0]["metric"] == "perplexity_ratio"
head = ["model", "row", "measured (predicted)", *sets, "worst other" + (" (x dense)" if ratio else ""), "job s",
        "peak GiB", "date (UTC)"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for row in rows:
    q = row["quality"]
    worst = (max if ratio else min)(q[k] for k in others if k in q) if others else float("nan")
    cells = [row["model"], row["label"], f"{row['measured_speedup']:.3f}× ({row['predicted_speedup']:.3f}×)",
             *[f"{q[k]:.3f}" if k in q else "–" for k in sets], f"**{worst:.3f}**", f"{row['job_s']:.0f}",
             f"{row['peak_rss_gib']:.2f}", row["date"][:16].replace("T", " ")]
    print("| " + " | ".join(cells) + " |")
