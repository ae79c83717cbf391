#!/usr/bin/env bash
# Data-parallel gradient sums over an emulated cluster network: each rank runs in its own
# network namespace (an emulated node) behind a link limited to RATE each way (tc tbf), all
# joined by a bridge (a non-blocking switch). It times both sum paths, the chain and the star
# through rank 0 (docs/training.md), for each world size, with model/examples/dist_sum.rs.
# Results: docs/benchmarks.md. Needs root, ip and tc (iproute2); the namespaces are removed
# on exit.
#
#   scripts/bench-dist-net.sh [RATE]        # default 1gbit; e.g. 10gbit, 500mbit
#   WORLDS="2 4 8" VALUES=112000000 REPEAT=3 scripts/bench-dist-net.sh 10gbit
set -euo pipefail
RATE=${1:-1gbit}
WORLDS=${WORLDS:-"2 3 4"}
VALUES=${VALUES:-6000000}
REPEAT=${REPEAT:-5}
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
