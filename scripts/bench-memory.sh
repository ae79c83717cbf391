#!/usr/bin/env bash
# Peak memory and CPU use of `icefm ingest` on full-size synthetic scenes (issue: < 4 GiB with
# --jobs 2; both cores busy). Prints one line per run: wall s, CPU %, max RSS MB, store MB.
# The sharded rows run two `--shard K/2 --jobs 1` processes at once into one store: wall is the
# pair's, max RSS the sum of the two processes' peaks.
# Usage: scripts/bench-memory.sh [WORKDIR]   (needs GNU time at /usr/bin/time)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/bench-memory}
bin=target/release/icefm
cargo build --release -q -p icefm
mkdir -p "$work"
if [ ! -d "$work/raw" ]; then
  "$bin" synth --out "$work/raw" --count 2 --size 10000x10400 --seed 42
  "$bin" synth --out "$work/rtt" --count 2 --kind rtt --size 5000x5200 --seed 7
fi
run() {
  local name=$1; shift
  rm -rf "$work/store.zarr"
  /usr/bin/time -f "%e %P %M" -o "$work/time.txt" "$bin" ingest --store "$work/store.zarr" "$@" >/dev/null 2>&1
  read -r wall cpu rss < "$work/time.txt"
  printf '%-28s wall %6.1f s  cpu %5s  max RSS %6.0f MB  store %5s MB\n' \
    "$name" "$wall" "$cpu" "$((rss / 1024))" "$(du -sm "$work/store.zarr" | cut -f1)"
}
run_sharded() {
  local name=$1; shift
  rm -rf "$work/store.zarr"
  local start end
  start=$(date +%s.%N)
  for k in 0 1; do
    /usr/bin/time -f "%e %P %M" -o "$work/time$k.txt" "$bin" ingest --store "$work/store.zarr" \
      --jobs 1 --shard "$k/2" "$@" >/dev/null 2>&1 &
  done
  wait
  end=$(date +%s.%N)
  local r0 r1 c0 c1
  read -r _ c0 r0 < "$work/time0.txt"
  read -r _ c1 r1 < "$work/time1.txt"
  printf '%-28s wall %6.1f s  cpu %5s  max RSS %6.0f MB  store %5s MB\n' \
    "$name" "$(echo "$end - $start" | bc)" "$((${c0%\%} + ${c1%\%}))%" "$(((r0 + r1) / 1024))" \
    "$(du -sm "$work/store.zarr" | cut -f1)"
}
one_raw=$(ls "$work"/raw/*.nc | head -1)
one_rtt=$(ls "$work"/rtt/*.nc | head -1)
run "1 raw scene, --jobs 1" --jobs 1 "$one_raw"
run "2 raw scenes, --jobs 2" --jobs 2 "$work/raw"
run_sharded "2 raw scenes, 2 shards" "$work/raw"
run "1 RTT scene, --jobs 1" --jobs 1 "$one_rtt"
run "2 RTT scenes, --jobs 2" --jobs 2 "$work/rtt"
run_sharded "2 RTT scenes, 2 shards" "$work/rtt"
