#!/usr/bin/env bash
# Kernel-level profile of one ViT-B/16 MAE encoder block and one decoder block (batch 64,
# bf16), forward and backward, then the norm-pix loss, the token gather and scatter and the
# batch preparation at the step's shapes, with Nsight Compute's per-kernel durations, achieved
# occupancy and registers per thread (clocks not locked). Needs .gpu/bundle.tar.xz
# (scripts/build-gpu-check.sh) and ncu. The switches of docs/gpu.md apply, e.g.
#   ICEFM_FLASH_BWD=0 scripts/gpu-profile.sh
# Writes $OUT/ncu.csv and prints the kernels by total time; then, for icefm's flash attention,
# layer-norm, norm-pix, token and batch-preparation kernels only, a second pass with Nsight
# Compute's speed-of-light, warp-state and pipe sections ($OUT/ncu-stalls.csv): what bounds each
# (tensor pipe, the exp unit, shared or global memory latency, barriers, DRAM throughput).
# ICEFM_PROFILE_KERNELS (a regex) picks other kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-profile}"
mkdir -p "$out"
. scripts/gpu-env.sh
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
timeout 150 "$ncu" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread \
    --csv --page raw --log-file "$out/ncu.csv" .gpu/gpu_check profile-blocks
echo "ncu exit $?"
$py - "$out/ncu.csv" <<'PY'
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[head]
k, t = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
extra = [c for c in ("sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread") if c in cols]
unit = rows[head + 1][t]
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(unit, 1e-6)
tot = collections.defaultdict(float); cnt = collections.Counter()
ext = collections.defaultdict(lambda: collections.defaultdict(float))
def num(v):
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0
for r in rows[head + 2:]:
    if len(r) <= max(k, t) or not r[t]:
        continue
    name = r[k].split("(")[0][:70]
    tot[name] += num(r[t]) * scale
    cnt[name] += 1
    for c in extra:
        ext[name][c] += num(r[cols.index(c)])
all_ms = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {all_ms:.2f} ms in all (unit {unit})")
print("| kernel | launches | ms | share | occupancy % | registers |\n|---|---|---|---|---|---|")
for name, ms in sorted(tot.items(), key=lambda x: -x[1])[:30]:
    occ = ext[name].get("sm__warps_active.avg.pct_of_peak_sustained_active")
    regs = ext[name].get("launch__registers_per_thread")
    occ = f"{occ / cnt[name]:.0f}" if occ is not None else ""
    regs = f"{regs / cnt[name]:.0f}" if regs is not None else ""
    print(f"| {name} | {cnt[name]} | {ms:.3f} | {ms / all_ms:.1%} | {occ} | {regs} |")
PY

# What bounds the attention and layer-norm kernels: the top stall reasons per issued
# instruction and the busiest pipes, from sections (their metric names vary less than raw ones).
timeout 120 "$ncu" --profile-from-start off --clock-control none \
    --kernel-name "regex:${ICEFM_PROFILE_KERNELS:-flash|ln_|norm_pix|_tokens|normalise}" \
    --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
    --csv --page raw --log-file "$out/ncu-stalls.csv" .gpu/gpu_check profile-blocks
echo "ncu (stalls) exit $?"
$py scripts/ncu_stalls.py "$out/ncu-stalls.csv"
