"""How well a structured latency table predicts the profiles a search picks (not random ones), raw and smoothed.

The DP exploits a table's errors: a level whose saving was measured too large by timing noise is the level it
picks. Random profiles (the table's own `profile_check`) do not show this. This script solves the DP for several
aims with the database's measured errors as costs (the search's prior), on the table as measured and on the same
table smoothed (`spdy_hf.latency.structured.smooth_times`), and times each chosen profile end to end in its
deployed form against the dense model.

    python benchmarks/table_accuracy.py --cache-dir CACHE [--aims 1.3,1.5,1.7]   # CACHE: a SmolLM2 job's cache
"""

import argparse
import datetime
import sys

import numpy as np
from heldout import smollm2_structured_job

from spdy_hf.latency.environment import environment_info
from spdy_hf.latency.structured import smooth_times
from spdy_hf.modeling.groups import group_name
from spdy_hf.search import compute_budget, solve_dp
from spdy_hf.utils.io import atomic_write_json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache-dir", required=True, help="The cache of a default SmolLM2 job (its table and database).")
parser.add_argument("--aims", default="1.3,1.5,1.7")
parser.add_argument("--output", default="benchmarks/out/table_accuracy.json")
args = parser.parse_args()

_, _, config, family, plan, databases, _ = smollm2_structured_job(args.cache_dir)
layout = plan.layout
# the table's monotone measured times (a table from before smoothing has only those, as `times_ms`) and smoothed
structured = plan.table.structured
raw, smoothed = np.full_like(plan.times, np.inf), np.full_like(plan.times, np.inf)
for i, g in enumerate(layout.groups):
    entry = structured["signatures"][structured["groups"][group_name(g)]]
    measured = entry.get("measured_ms", entry["times_ms"])
    raw[i, :len(measured)] = measured
    smoothed[i, :len(measured)] = smooth_times(layout.counts[i], measured)
prior = family.prior(plan, databases)
rows = []
for aim in [float(a) for a in args.aims.split(",")]:
    for name, times in (("raw", raw), ("smoothed", smoothed)):
        b = compute_budget(times, plan.base_ms, aim, reference_ms=plan.reference_ms)
        profile = solve_dp(prior, times, b.budget_ms, config.search.dp_buckets)
        idx = np.arange(len(profile))
        m = family.measure(plan, databases, profile)
        row = {"aim": aim, "dp_on": name, "predicted_raw": b.predicted_speedup(raw[idx, profile]),
               "predicted_smoothed": b.predicted_speedup(smoothed[idx, profile]), "measured": m.speedup,
               "dense_ms": m.dense_ms, "pruned_ms": m.pruned_ms, "profile": [int(a) for a in profile]}
        rows.append(row)
        print(f"aim {aim:.2f} DP on {name:8s}: predicted raw {row['predicted_raw']:.3f}x, smoothed "
              f"{row['predicted_smoothed']:.3f}x, measured {m.speedup:.3f}x", flush=True)
atomic_write_json(args.output, {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                "environment": environment_info(), "command": sys.argv, "rows": rows,
                                "table": structured})
