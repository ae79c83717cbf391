#!/usr/bin/env bash
# Data-parallel training on this machine's CPUs: one process with all cores against ranks of
# `--dist` sharing the cores, the same configuration and whole batch. Prints one line per run:
# wall s for the steps, images/s (median over the steps after the first 3, from rank 0's
# metrics.parquet), and the last step's loss. Then micro-batches (`train.accumulate`): MAE
# ViT-B/16 at 384 px, batch 8, 2 steps, whole and in 4 parts, with the process's peak memory
# (needs GNU time at /usr/bin/time). MAE ViT-tiny at 96 px, batch 16, levels 80 and
# 160 m, on 3 generated 80 m scenes of 1200 x 1300.
# Usage: scripts/bench-dist.sh [STEPS] [WORKDIR]   (the ViT-B rows take about 2 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
work=${2:-target/bench-dist}
. scripts/bench-store.sh
cores=$(nproc)
common=(--store "$store" --config configs/mae_vit_tiny.toml --set "train.steps=$steps"
  --set train.checkpoint_every=1000000 --set train.panel_every=0 --set data.threads=1
  --set data.levels=80,160)
run() {
  local name=$1 ranks=$2 mode=${3:-by-hand}
  local out=$work/run-$ranks-$mode
  rm -rf "$out"
  local start end port=$((29600 + RANDOM % 1000))
  start=$(date +%s.%N)
  if [ "$ranks" = 1 ]; then
    RAYON_NUM_THREADS=$cores "$bin" train "${common[@]}" --out "$out" >"$out.log" 2>&1 ||
      { cat "$out.log"; exit 1; }
  elif [ "$mode" = local ]; then
    # icefm starts the ranks itself, cores / ranks compute threads each.
    "$bin" train "${common[@]}" --out "$out" --dist "local:$ranks" >"$out.log" 2>&1 ||
      { cat "$out.log"; exit 1; }
  else
    local pids=()
    for ((r = ranks - 1; r >= 0; r--)); do
      RAYON_NUM_THREADS=$((cores / ranks > 0 ? cores / ranks : 1)) "$bin" train "${common[@]}" \
        --out "$out" --dist "$r/$ranks@127.0.0.1:$port" >"$out.$r.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do
      wait "$p" || { cat "$out".*.log; exit 1; }
    done
  fi
  end=$(date +%s.%N)
  printf '%-34s wall %6.1f s  %s\n' "$name" "$(echo "$end - $start" | bc)" \
    "$(median "$out/metrics.parquet")"
}
echo "MAE ViT-tiny 96 px, batch 16, $steps steps, $cores cores"
run "1 process, $cores threads" 1
run "2 ranks, $((cores / 2 > 0 ? cores / 2 : 1)) thread(s) each" 2
run "2 ranks by --dist local:2" 2 local
accum() {
  local k=$1
  local out=$work/accum-$k
  rm -rf "$out"
  /usr/bin/time -f "%e %M" -o "$work/time.txt" "$bin" train --store "$store" \
    --config configs/mae_vit_b.toml --out "$out" --set train.steps=2 --set data.batch_size=8 \
    --set train.checkpoint_every=1000000 --set train.panel_every=0 --set data.levels=80,160 \
    --set data.min_valid=0.5 \
    --set "train.accumulate=$k" >"$out.log" 2>&1 || { cat "$out.log"; exit 1; }
  local wall rss
  read -r wall rss < "$work/time.txt"
  printf '%-34s wall %6.1f s  %s  max RSS %5d MB\n' "accumulate $k (batch 8 in $k parts)" \
    "$wall" "$(median "$out/metrics.parquet")" "$((rss / 1024))"
}
echo "MAE ViT-B/16 384 px, batch 8, 2 steps, 1 process"
accum 1
accum 4
