#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU, CUDA 13 and PyTorch (no Rust
# needed): run scripts/build-gpu-check.sh on the build machine first and bring .gpu/ along.
#   1. the CUDA tests (kernels against their CPU references, gradients of a micro MAE on the
#      GPU against the CPU, the fused AdamW against the composed one);
#   2. the ViT-B/16 MAE step (384 px, mask 0.75, batch 64, bf16): icefm's default step and
#      PyTorch eager (+ SDPA), the goal's two figures; then icefm with each of the five changes
#      that are on by default since they ran here turned off alone (the flash attention
#      backward, the fused bias + GELU, the cuBLASLt bias epilogue, the wide-load layer norm,
#      the flash kernels' prefetching); then with the ones whose tests failed or that no longer
#      pay turned off (gpu_best_switches.py), timed as the default step is;
#   3. the copy and matmul ceilings, and each kernel against the candle composition it
#      replaces and against the measured copy bandwidth;
#   4. the rest, least important last: the step reading each loss and gradient norm as it is
#      made (as the loop did before), a resumed training run against an uninterrupted one, a
#      ViT-B/16 + UPerNet fine-tuning step (b16), end-to-end training from a store, all
#      five switches off, a profile of the step's pieces, the step without the flash forward,
#      pageable uploads, candle's compositions;
#   5. one table, last (scripts/gpu_table.py, which also rebuilds it from a run cut short).
# Results land in $OUT (or /tmp/gpu-check); the whole run stays under 8 minutes (its budget,
# below, skips what would not fit).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
log="$out/gpu-check.jsonl"
: >"$log"
. scripts/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
# The commit the binaries were built from (scripts/gpu-bundle-status.sh checks it beforehand).
if [ -f .gpu/bundle.rev ]; then
    cp .gpu/bundle.rev "$out/bundle.rev"
    echo "bundle built from $(head -1 .gpu/bundle.rev)$(grep -q '^uncommitted' .gpu/bundle.rev && echo ' with uncommitted changes')"
fi

# The whole run has a budget (GPU_CHECK_BUDGET seconds, default 450: a device call is cut at
# 600): each phase gets its own limit or what is left of the budget, whichever is less, and a
# phase that would get under 20 seconds is skipped and says so. The phases run most important
# first, so a slow machine loses the least useful ones.
budget=${GPU_CHECK_BUDGET:-450}
phase() { # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left} s of the budget left" >&2
        echo "{\"kind\":\"phase\",\"name\":\"$name\",\"rc\":\"skipped\",\"s\":0}" >>"$log"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    echo "== $name" >&2
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "{\"kind\":\"phase\",\"name\":\"$name\",\"rc\":$rc,\"s\":$((SECONDS - t0))}" >>"$log"
    grep -h '^{"kind"' "$out/$name.log" >>"$log" || true
}
step=".gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16"

phase tests 150 .gpu/cuda_tests --test-threads=1
grep -E "^test result" "$out/tests.log" | sed 's/^/# /' >>"$log"
# The flash forward is on by default: if its test failed, measure everything else without it
# rather than measure a broken kernel.
if grep -q "^test the_flash_attention_kernel_matches_the_cpu_reference \.\.\. FAILED" "$out/tests.log"; then
    export ICEFM_FLASH=0
    echo "# the flash forward failed its test: the phases below ran with ICEFM_FLASH=0" | tee -a "$log" >&2
fi
# The goal's two figures first: icefm's default step and PyTorch's.
phase step 90 $step --steps 10 --warmup 3
phase torch 90 $py scripts/torch_mae_bench.py --device cuda --preset base --size 384 --batch 64 --mask 0.75 --dtype bf16 --steps 10 --warmup 3 --json "$out/torch.json"
if [ -f "$out/torch.json" ]; then
    $py -c 'import json,sys; r=json.load(open(sys.argv[1])); r["kind"]="step"; r["impl"]="pytorch-eager"; print(json.dumps(r))' "$out/torch.json" >>"$log"
fi
# The five changes that are on by default since they ran here (2026-11-28), each turned off
# alone: a phase faster than the default says that change no longer pays.
phase step_no_flashbwd 60 env ICEFM_FLASH_BWD=0 $step --steps 5 --warmup 2
phase step_no_biasgelu 60 env ICEFM_BIAS_GELU_CUDA=0 $step --steps 5 --warmup 2
phase step_no_ltbias 60 env ICEFM_LT_BIAS=0 $step --steps 5 --warmup 2
phase step_no_lnv8 60 env ICEFM_LN_V8=0 $step --steps 5 --warmup 2
phase step_no_prefetch 60 env ICEFM_FLASH_PREFETCH=0 $step --steps 5 --warmup 2
# The switches to turn off: a change whose CUDA tests failed, or whose step is faster without
# it; then the step with those off, timed as the default step is.
worse=$($py scripts/gpu_best_switches.py "$out")
echo "# switches to turn off (failed tests, or faster off): ${worse:-none}" | tee -a "$log" >&2
if [ -n "$worse" ]; then
    phase step_best 90 env $worse $step --steps 10 --warmup 3
fi
phase ceilings 60 $py scripts/torch_mae_bench.py --device cuda --copy-bandwidth --json "$out/ceilings.json"
phase kernels 150 .gpu/gpu_check kernels
phase step_sync 60 env ICEFM_STEP_SYNC=1 $step --steps 5 --warmup 2
phase resume 60 .gpu/gpu_check resume --store .gpu/store
phase seg 90 .gpu/gpu_check seg --preset base --size 384 --batch 16 --precision bf16 --steps 8 --warmup 2
phase train 120 .gpu/gpu_check train --store .gpu/store384 --steps 12
phase step_none 60 env ICEFM_FLASH_BWD=0 ICEFM_BIAS_GELU_CUDA=0 ICEFM_FLASH_PREFETCH=0 ICEFM_LT_BIAS=0 ICEFM_LN_V8=0 $step --steps 5 --warmup 2
phase profile 60 .gpu/gpu_check profile
phase step_noflash 60 env ICEFM_FLASH=0 $step --steps 5 --warmup 2
phase train_pageable 120 env ICEFM_UPLOAD=pageable .gpu/gpu_check train --store .gpu/store384 --steps 12
phase step_composed 60 $step --steps 5 --warmup 2 --composed

$py scripts/gpu_table.py "$out"
