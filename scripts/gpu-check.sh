#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU, CUDA 13 and PyTorch (no Rust
# needed): run scripts/build-gpu-check.sh on the build machine first and bring .gpu/ along.
#   1. the CUDA tests (kernels against their CPU references, gradients of a micro MAE on the
#      GPU against the CPU, the fused AdamW against the composed one), then a resumed training
#      run on the GPU against an uninterrupted one;
#   2. the ViT-B/16 MAE step (384 px, mask 0.75, batch 64, bf16): icefm with its kernels;
#      with each change that is off by default until verified here (the flash attention
#      backward, the fused bias + GELU, the cuBLASLt bias epilogue, the wide-load layer norm),
#      with the first two, with them and the flash kernels' prefetching, and with all; then
#      with the switches that passed their tests and sped the step up (gpu_best_switches.py),
#      timed as the default step is: the candidate new default;
#      reading each loss and gradient norm as they are made (as the loop did before);
#      without the flash attention forward; with candle's compositions; and PyTorch eager
#      (+ SDPA), in the same run;
#      end-to-end training from a store with page-locked and with pageable uploads; a
#      ViT-B/16 + UPerNet fine-tuning step (b16);
#   3. each kernel against the candle composition it replaces, and its bandwidth against the
#      measured copy bandwidth;
#   4. one table, last.
# Results land in $OUT (or /tmp/gpu-check); the whole run stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
log="$out/gpu-check.jsonl"
: >"$log"
. scripts/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"

phase() { # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name" >&2
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "{\"kind\":\"phase\",\"name\":\"$name\",\"rc\":$rc,\"s\":$((SECONDS - t0))}" >>"$log"
    grep -h '^{"kind"' "$out/$name.log" >>"$log" || true
}

phase tests 150 .gpu/cuda_tests --test-threads=1
grep -E "^test result" "$out/tests.log" | sed 's/^/# /' >>"$log"
# The flash forward is on by default: if its test failed, measure everything else without it
# rather than measure a broken kernel.
if grep -q "^test the_flash_attention_kernel_matches_the_cpu_reference \.\.\. FAILED" "$out/tests.log"; then
    export ICEFM_FLASH=0
    echo "# the flash forward failed its test: the phases below ran with ICEFM_FLASH=0" | tee -a "$log" >&2
fi
phase resume 60 .gpu/gpu_check resume --store .gpu/store
phase kernels 150 .gpu/gpu_check kernels
phase step 90 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 10 --warmup 3
phase step_flashbwd 60 env ICEFM_FLASH_BWD=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_biasgelu 60 env ICEFM_BIAS_GELU_CUDA=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_ltbias 60 env ICEFM_LT_BIAS=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_lnv8 60 env ICEFM_LN_V8=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_new 60 env ICEFM_FLASH_BWD=1 ICEFM_BIAS_GELU_CUDA=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_newpf 60 env ICEFM_FLASH_BWD=1 ICEFM_BIAS_GELU_CUDA=1 ICEFM_FLASH_PREFETCH=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_all 60 env ICEFM_FLASH_BWD=1 ICEFM_BIAS_GELU_CUDA=1 ICEFM_FLASH_PREFETCH=1 ICEFM_LT_BIAS=1 ICEFM_LN_V8=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_sync 60 env ICEFM_STEP_SYNC=1 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_noflash 60 env ICEFM_FLASH=0 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2
phase step_composed 60 .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 5 --warmup 2 --composed
# The switches whose CUDA tests passed and whose own phase beat the step they change, together,
# timed like the default step: the step the defaults would give if those switches were flipped.
best=$($py scripts/gpu_best_switches.py "$out")
echo "# switches that passed their tests and sped up the step: ${best:-none}" | tee -a "$log" >&2
if [ -n "$best" ]; then
    phase step_best 90 env $best .gpu/gpu_check step --preset base --size 384 --batch 64 --mask 0.75 --precision bf16 --steps 10 --warmup 3
fi
phase profile 60 .gpu/gpu_check profile
phase train 120 .gpu/gpu_check train --store .gpu/store384 --steps 12
phase train_pageable 120 env ICEFM_UPLOAD=pageable .gpu/gpu_check train --store .gpu/store384 --steps 12
phase seg 90 .gpu/gpu_check seg --preset base --size 384 --batch 16 --precision bf16 --steps 8 --warmup 2
phase torch 90 $py scripts/torch_mae_bench.py --device cuda --preset base --size 384 --batch 64 --mask 0.75 --dtype bf16 --steps 10 --warmup 3 --json "$out/torch.json"
if [ -f "$out/torch.json" ]; then
    $py -c 'import json,sys; r=json.load(open(sys.argv[1])); r["kind"]="step"; r["impl"]="pytorch-eager"; print(json.dumps(r))' "$out/torch.json" >>"$log"
fi
phase ceilings 60 $py scripts/torch_mae_bench.py --device cuda --copy-bandwidth --json "$out/ceilings.json"

$py - "$log" "$out/gpu.txt" "$out/ceilings.json" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("\n### icefm GPU check on", open(sys.argv[2]).read().strip())
print("| phase | exit | seconds |\n|---|---|---|")
for r in rows:
    if r["kind"] == "phase":
        print(f"| {r['name']} | {r['rc']} | {r['s']} |")
for l in open(sys.argv[1]):
    if l.startswith("# "):
        print(l[2:].strip())
import os, re
tests_log = os.path.join(os.path.dirname(sys.argv[1]), "tests.log")
if os.path.exists(tests_log):
    failed = sorted(set(re.findall(r"^test (\S+) \.\.\. FAILED", open(tests_log).read(), re.M)))
    print("failed CUDA tests:", ", ".join(failed) if failed else "none")
for r in rows:
    if r["kind"] == "resume":
        print(f"resumed run: ok={r['ok']} max rel. loss diff {r['max_rel_diff']}")
steps = [r for r in rows if r["kind"] == "step"]
if steps:
    print("\n| MAE step (ViT-B/16, 384 px, b64, bf16) | ms/step | img/s | x default icefm | TFLOP/s | peak GiB |\n|---|---|---|---|---|---|")
    ref = next((s for s in steps if s.get("impl") == "pytorch-eager"), None)
    base = next((s for s in steps if s.get("impl") == "icefm"), None)
    for s in steps:
        peak = s.get("peak_mem_gib")
        if peak is None and s.get("peak_mem_bytes"):
            peak = s["peak_mem_bytes"] / 2**30
        ratio = f" ({s['images_per_s'] / ref['images_per_s']:.2f}x torch)" if ref and s is not ref else ""
        vs = f"{s['images_per_s'] / base['images_per_s']:.2f}" if base else ""
        tf = s.get("tflops", s.get("achieved_tflops"))
        print(f"| {s['impl']} | {s.get('ms_per_step', 0):.1f} | {s['images_per_s']:.1f}{ratio} | {vs} | {tf if tf is None else round(tf, 1)} | {peak if peak is None else round(peak, 2)} |")
        if "host_ms" in s:
            # The host's time to queue a step: near ms/step, the host is the limit.
            print(f"|   (host queues a step in, ms) | {s['host_ms']} | | | | |")
        if "forward_ms" in s:
            print(f"|   (forward / backward / AdamW, ms) | {s['forward_ms']} / {s['backward_ms']} / {s['optimizer_ms']} | | | | |")
        if "bound_ms" in s:
            # docs/gpu.md, "Counting a step's work": forward + backward against their bound.
            print(f"|   (census: launches, GB, bound ms, of bound) | {s['launches']:.0f}, {s['census_gb']}, {s['bound_ms']}, {s['of_bound']:.2f} | | | | |")
for s in (r for r in rows if r["kind"] == "train"):
    print(f"training from the store (ViT-B/16 MAE, 384 px, b{s['batch']}, bf16, {s['upload']} uploads): {s['images_per_s']:.1f} img/s over steps 3-{s['steps']}, {s['wall_s']:.0f} s in all")
for s in (r for r in rows if r["kind"] == "seg_step"):
    print(f"\nfine-tuning step, {s['impl']}, {s['size']} px, b{s['batch']}, {s['precision']}: {s['ms_per_step']:.1f} ms/step, {s['images_per_s']:.1f} img/s, peak {s['peak_mem_gib']:.2f} GiB, loss falls: {s['loss_falls']}; forward+loss / backward / AdamW {s.get('forward_ms')} / {s.get('backward_ms')} / {s.get('optimizer_ms')} ms")
    if "bound_ms" in s:
        print(f"  census: {s['launches']:.0f} launches, {s['census_gb']} GB, bound {s['bound_ms']} ms; forward + backward at {s['of_bound']:.2f} of it")
ks = [r for r in rows if r["kind"] in ("kernel", "copy")]
if ks:
    print("\n| kernel | shape | fused ms | candle ms | speed-up | GB/s | of copy |\n|---|---|---|---|---|---|---|")
    for k in ks:
        if k["kind"] == "copy":
            print(f"| driver copy (2 GiB) | | | | | {k['gb_per_s']} | 1.00 |")
        else:
            print(f"| {k['name']} | {k['shape']} | {k['fused_ms']} | {k['composed_ms']} | {k['speedup']} | {k['gb_per_s'] or '–'} | {k['of_copy'] or '–'} |")
ps = [r for r in rows if r["kind"] == "profile"]
if ps:
    print("\n| piece (ViT-B MAE, b64, bf16) | forward ms | forward+backward ms |\n|---|---|---|")
    for p in ps:
        print(f"| {p['name']} | {p['fwd_ms']} | {p['fwd_bwd_ms']} |")
try:
    c = json.load(open(sys.argv[3]))
    print(f"\nPyTorch ceilings: copy {c['copy_gb_per_s']:.0f} GB/s (read+write), bf16 matmul {c['matmul_n']}^3 {c['matmul_tflops']:.0f} TFLOP/s")
except Exception as e:
    print("no ceilings:", e)
EOF
