#!/usr/bin/env python3
"""Summarise an Nsight Compute raw CSV (`--csv --page raw` with the SpeedOfLight, WarpStateStats
and ComputeWorkloadAnalysis sections) per kernel name: launches, mean duration, compute and
memory speed-of-light, the three largest stall reasons (warps stalled per issued instruction)
and the three busiest pipes. Columns that a version of ncu does not write are left out.

    python3 scripts/ncu_stalls.py ncu-stalls.csv
"""
import collections
import csv
import re
import sys

STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")
PIPE = re.compile(r"^sm__(?:inst_executed_pipe|pipe)_(\w+?)(?:_cycles_active)?\.avg\.pct_of_peak_sustained_active$")
DURATION = "gpu__time_duration.sum"
SOL = {
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "memory %",
}


def number(v):
    try:
        return float(v.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summarise(path):
    rows = list(csv.reader(open(path)))
    try:
        head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    except StopIteration:
        return "no kernels in " + path
    cols = rows[head]
    units = rows[head + 1] if len(rows) > head + 1 else []
    name_at = cols.index("Kernel Name")
    sums = collections.defaultdict(lambda: collections.defaultdict(float))
    count = collections.Counter()
    for r in rows[head + 2:]:
        if len(r) != len(cols):
            continue
        name = r[name_at].split("(")[0][:40]
        count[name] += 1
        for c, v in zip(cols, r):
            x = number(v)
            if x is not None:
                sums[name][c] += x
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
    dur_unit = units[cols.index(DURATION)] if DURATION in cols and units else "nsecond"
    out = ["| kernel | launches | µs each | " + " | ".join(SOL.values()) +
           " | largest stalls (warps per issue) | busiest pipes (% of peak) |",
           "|---|---|---|" + "---|" * len(SOL) + "---|---|"]
    for name in sorted(count, key=lambda n: -sums[n].get(DURATION, 0.0)):
        n = count[name]
        mean = {c: v / n for c, v in sums[name].items()}
        us = mean.get(DURATION, 0.0) * scale.get(dur_unit, 1e-3)
        sol = [f"{mean[c]:.0f}" if c in mean else "" for c in SOL]
        stalls = sorted(((STALL.match(c).group(1), v) for c, v in mean.items() if STALL.match(c)),
                        key=lambda x: -x[1])[:3]
        pipes = sorted(((PIPE.match(c).group(1), v) for c, v in mean.items() if PIPE.match(c)),
                       key=lambda x: -x[1])[:3]
        out.append(f"| {name} | {n} | {us:.1f} | " + " | ".join(sol) + " | " +
                   ", ".join(f"{s} {v:.2f}" for s, v in stalls) + " | " +
                   ", ".join(f"{p} {v:.0f}" for p, v in pipes) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1]))
