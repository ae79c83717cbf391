#!/usr/bin/env bash
# Build, on this (CPU) machine, everything scripts/gpu-check.sh runs on a GPU machine that has
# CUDA 13 and PyTorch but no Rust: the CUDA test binary, examples/gpu_check and a small store,
# packed into .gpu/bundle.tar.xz (ignored; name that file in the device run's `carry`).
#   scripts/build-gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cuda-env.sh
export CARGO_TARGET_DIR=target/cuda
mkdir -p .gpu
cargo build --release -p icefm-model --features cuda --example gpu_check
cp target/cuda/release/examples/gpu_check .gpu/gpu_check
test_bin=$(cargo test --release -p icefm-model --features cuda --test cuda --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
cp "$test_bin" .gpu/cuda_tests
strip .gpu/gpu_check .gpu/cuda_tests
# A small store for the resumed-training check (built with the default CPU binary).
if [ ! -d .gpu/store ]; then
    unset CARGO_TARGET_DIR
    rm -rf .gpu/scenes
    cargo run --release -q -- synth --out .gpu/scenes --count 2 --kind rtt --size 512x512
    cargo run --release -q -- ingest .gpu/scenes --store .gpu/store --levels 80,160 --patch 64
    rm -rf .gpu/scenes
fi
# A store of 384-px patches for the end-to-end training benchmark.
if [ ! -d .gpu/store384 ]; then
    unset CARGO_TARGET_DIR
    rm -rf .gpu/scenes
    cargo run --release -q -- synth --out .gpu/scenes --count 2 --kind rtt --size 1536x1536
    cargo run --release -q -- ingest .gpu/scenes --store .gpu/store384 --levels 80 --patch 384
    rm -rf .gpu/scenes
fi
for b in .gpu/gpu_check .gpu/cuda_tests; do
    if ldd "$b" | grep -q netcdf; then echo "$b links netCDF: it would not run there" >&2; exit 1; fi
done
# What the binaries were built from (scripts/gpu-bundle-status.sh compares it with the tree):
# the commit, then each file of the bundle's sources that differed from it.
{
    git rev-parse HEAD
    git status --porcelain -- $(scripts/gpu-bundle-status.sh --sources) | sed 's/^/uncommitted: /'
} >.gpu/bundle.rev
# One compressed bundle (the candle kernels' PTX makes the binaries large; it packs about 6:1).
tar -C .gpu -cf - gpu_check cuda_tests store store384 bundle.rev | xz -T0 -6 >.gpu/bundle.tar.xz
du -sh .gpu/*
echo "carry .gpu/bundle.tar.xz; on the GPU machine: scripts/gpu-check.sh"
