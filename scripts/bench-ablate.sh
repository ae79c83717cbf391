#!/usr/bin/env bash
# Several `icefm ablate` workers on one grid against one worker with all cores: a 4-cell grid
# (2 regimes x 2 level sets, from scratch) of ViT-tiny + FCN fine-tuning on 3 generated 80 m
# scenes of 1200 x 1300, scored on one. Prints one line per set-up: wall s for the whole
# grid, cells each worker trained, and whether the table's scores equal the one worker's.
# Usage: scripts/bench-ablate.sh [STEPS] [WORKDIR]   (about 4 minutes at 60 steps on 2 cores)
# The second line, one worker with half the cores, shows how much of the gain is the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-60}
work=${2:-target/bench-ablate}
. scripts/bench-store.sh
if $new_store; then
  "$bin" regime --store "$store" --name test --rule fraction --percent 34 --seed 1 --role test >/dev/null
  "$bin" regime --store "$store" --name ft --rule fraction --ladder 34,67 --exclude test --seed 1 >/dev/null
fi
cores=$(nproc)
cat >"$work/grid.toml" <<GRID
base = "$PWD/configs/seg_vit_tiny.toml"
test_regime = "test"
set = ["train.steps=$steps", "train.checkpoint_every=1000000", "data.threads=1", "data.batch_size=4"]
[grid]
regimes = ["ft_34", "ft_67"]
init = ["scratch"]
levels = ["80", "80,160"]
GRID
scores() {
  python3 - "$1" <<'PY'
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1]).to_pydict()
print(" ".join(f"{k}={c:.4f}" for k, c in zip(t["key"], t["combined"])))
PY
}
run() {
  local workers=$1 threads=$2 out=$work/out-$1x$2
  rm -rf "$out"
  local start end pids=()
  start=$(date +%s.%N)
  for ((w = 0; w < workers; w++)); do
    RAYON_NUM_THREADS=$threads "$bin" ablate --store "$store" --grid "$work/grid.toml" \
      --out "$out" >"$out.$w.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do
    wait "$p" || { cat "$out".*.log; exit 1; }
  done
  end=$(date +%s.%N)
  local per=""
  for ((w = 0; w < workers; w++)); do
    per+=" $(grep -c ': finished' "$out.$w.log")"
  done
  printf '%d worker(s) x %d thread(s)  wall %6.1f s  cells trained per worker:%s\n' \
    "$workers" "$threads" "$(echo "$end - $start" | bc)" "$per"
  scores "$out/ablation.parquet" >"$out.scores"
}
echo "icefm ablate, 4 cells of ViT-tiny + FCN, $steps steps each, batch 4, $cores cores"
half=$((cores / 2 > 0 ? cores / 2 : 1))
run 1 "$cores"
run 1 "$half"
run 2 "$half"
if cmp -s "$work/out-1x$cores.scores" "$work/out-2x$half.scores"; then
  echo "the tables' combined scores are equal: $(cat "$work/out-1x$cores.scores")"
else
  echo "the tables differ:"; cat "$work/out-1x$cores.scores" "$work/out-2x$half.scores"
fi
