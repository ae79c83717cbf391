#!/usr/bin/env bash
# Data-parallel gradient sums over an emulated cluster network: each rank runs in its own
# network namespace (an emulated node) behind a link limited to RATE each way (tc tbf), all
# joined by a bridge (a non-blocking switch). It times both sum paths, the chain and the star
# through rank 0 (docs/training.md), for each world size, with model/examples/dist_sum.rs.
# Results: docs/benchmarks.md. Needs root, ip and tc (iproute2); the namespaces are removed
# on exit.
#
# With TRAIN_STEPS=N it then trains ViT-tiny's MAE (96 px, batch 16, the store of
# bench-dist.sh) for N steps with `icefm train --dist`, one rank per emulated node, by both
# paths: wall time, median images/s and the last loss (the same bits either way).
#
#   scripts/bench-dist-net.sh [RATE]        # default 1gbit; e.g. 10gbit, 500mbit
#   WORLDS="2 4 8" VALUES=112000000 REPEAT=3 scripts/bench-dist-net.sh 10gbit
#   TRAIN_STEPS=20 WORLDS="2 4" scripts/bench-dist-net.sh
set -euo pipefail
RATE=${1:-1gbit}
WORLDS=${WORLDS:-"2 3 4"}
VALUES=${VALUES:-6000000}
REPEAT=${REPEAT:-5}
TRAIN_STEPS=${TRAIN_STEPS:-0}
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "bench-dist-net: needs root (it makes network namespaces and rate limits)" >&2
  exit 1
fi
for tool in ip tc; do
  command -v "$tool" >/dev/null || { echo "bench-dist-net: needs $tool (iproute2)" >&2; exit 1; }
done
cargo build --release -q -p icefm-model --example dist_sum
BIN=$PWD/target/release/examples/dist_sum

MAXW=0
for w in $WORLDS; do [ "$w" -gt "$MAXW" ] && MAXW=$w; done
cleanup() {
  for k in $(seq 0 $((MAXW - 1))); do
    ip netns del "icefm-n$k" 2>/dev/null || true
    ip link del "icefm-v$k" 2>/dev/null || true
  done
  ip link del icefm-br 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip link add icefm-br type bridge
ip link set icefm-br up
for k in $(seq 0 $((MAXW - 1))); do
  ns=icefm-n$k
  ip netns add "$ns"
  ip link add "icefm-v$k" type veth peer name eth0 netns "$ns"
  ip link set "icefm-v$k" master icefm-br up
  ip -n "$ns" addr add "10.77.0.$((k + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  # RATE out of the node (its eth0) and into it (its port on the bridge).
  tc -n "$ns" qdisc add dev eth0 root tbf rate "$RATE" burst 512kb latency 200ms
  tc qdisc add dev "icefm-v$k" root tbf rate "$RATE" burst 512kb latency 200ms
done

echo "links: $RATE each way per node; $VALUES f32 per sum; $REPEAT timed sums after one"
port=29600
for w in $WORLDS; do
  for sum in chain star; do
    port=$((port + 1))
    pids=()
    for k in $(seq 1 $((w - 1))); do
      ip netns exec "icefm-n$k" "$BIN" "$k/$w@10.77.0.1:$port" \
        --values "$VALUES" --sum "$sum" --repeat "$REPEAT" &
      pids+=($!)
    done
    ip netns exec icefm-n0 "$BIN" "0/$w@10.77.0.1:$port" \
      --values "$VALUES" --sum "$sum" --repeat "$REPEAT"
    for p in "${pids[@]}"; do wait "$p"; done
  done
done

[ "$TRAIN_STEPS" -gt 0 ] || exit 0
work=target/bench-dist
. scripts/bench-store.sh
echo "icefm train --dist: MAE ViT-tiny 96 px, batch 16, $TRAIN_STEPS steps, one rank per node"
for w in $WORLDS; do
  for sum in chain star; do
    port=$((port + 1))
    out=$PWD/$work/net-$w-$sum
    rm -rf "$out"
    start=$(date +%s.%N)
    pids=()
    for k in $(seq 0 $((w - 1))); do
      ICEFM_DIST_SUM=$sum RAYON_NUM_THREADS=1 ip netns exec "icefm-n$k" "$PWD/$bin" train \
        --store "$PWD/$store" --config configs/mae_vit_tiny.toml --set "train.steps=$TRAIN_STEPS" \
        --set train.checkpoint_every=1000000 --set train.panel_every=0 --set data.threads=1 \
        --set data.levels=80,160 --out "$out" --dist "$k/$w@10.77.0.1:$port" >"$out.$k.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || { cat "$out".*.log; exit 1; }; done
    end=$(date +%s.%N)
    printf '%-5s %d ranks  wall %6.1f s  %s\n' "$sum" "$w" "$(echo "$end - $start" | bc)" \
      "$(median "$out/metrics.parquet")"
  done
done
