# Sourced by the training benchmarks (bench-dist.sh, bench-ablate.sh): builds the release
# binary and, once, their store in $work: 3 generated 80 m RTT scenes of 1200 x 1300, ingested
# at the default levels. Sets $bin and $store; the store is kept between runs. Defines
# `median RUN/metrics.parquet`: the median images/s after the first 3 steps and the last loss.
bin=target/release/icefm
cargo build --release -q -p icefm
mkdir -p "$work"
store=$work/store.zarr
new_store=false
if [ ! -d "$store" ]; then
  new_store=true
  "$bin" synth --out "$work/scenes" --count 3 --kind rtt --size 1200x1300 --seed 3 >/dev/null 2>&1
  "$bin" ingest --store "$store" "$work/scenes" >"$work/ingest.log" 2>&1 || { cat "$work/ingest.log"; exit 1; }
fi
median() {
  python3 - "$1" <<'EOF'
import sys, pyarrow.parquet as pq, statistics
t = pq.read_table(sys.argv[1]).to_pydict()
ips = t["images_per_s"][3:] or t["images_per_s"]
print(f"{statistics.median(ips):7.1f} img/s  last loss {t['loss'][-1]:.5f}")
EOF
}
