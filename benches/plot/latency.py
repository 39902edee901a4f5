#!/usr/bin/env python3
"""Latency percentiles of record -> ledger committed against offered load, from the JSON the
load generator writes (`--json`), as a PNG.

    python3 benches/plot/latency.py load.json docs/perf/latency-vs-load.png

Installs matplotlib with pip when it is missing.
"""
import json
import subprocess
import sys

try:
    import matplotlib
except ImportError:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"])
    import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
r = json.load(open(src))
points = sorted(r["sweep"] + [r["in_process"]], key=lambda p: p["to_ledger_per_s"])
x = [p["to_ledger_per_s"] / 1e3 for p in points]
fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
for key, label in [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")]:
    ax.plot(x, [p["record_to_ledger_ms"][key] for p in points], marker="o", label=label)
ax.axhline(r["flush_ms"] + 100, color="grey", linestyle="--", linewidth=1,
           label=f"SPEC §9 p99 target: flush ({r['flush_ms']} ms) + 100 ms")
ax.set_xlabel("events/s through to the ledger (thousands)")
ax.set_ylabel("record → ledger committed (ms)")
m = r["machine"]
w = r["workload"]
ax.set_title(f"{w['customers']} customers × {w['meters']} meters × {w['dimensions']} dims; "
             f"{m['cores']} cores, fdatasync p50 {m['fdatasync_us'][0]} µs", fontsize=9)
ax.set_ylim(bottom=0)
ax.grid(True, alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(out)
print(f"wrote {out}")
