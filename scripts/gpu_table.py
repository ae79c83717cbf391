#!/usr/bin/env python3
"""The GPU check's summary tables, from the results folder that scripts/gpu-check.sh fills
(gpu-check.jsonl, gpu.txt, tests.log, ceilings.json). gpu-check.sh prints them last; run it
here on the folder a device run brought back, when that run was cut short:

    python3 scripts/gpu_table.py /tmp/gpu-check
"""
import json
import os
import re
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-check"
log = os.path.join(out, "gpu-check.jsonl")
rows = [json.loads(l) for l in open(log) if l.startswith("{")]
try:
    card = open(os.path.join(out, "gpu.txt")).read().strip()
except OSError:
    card = "an unnamed GPU"
print("\n### icefm GPU check on", card)
print("| phase | exit | seconds |\n|---|---|---|")
for r in rows:
    if r["kind"] == "phase":
        print(f"| {r['name']} | {r['rc']} | {r['s']} |")
for l in open(log):
    if l.startswith("# "):
        print(l[2:].strip())
tests_log = os.path.join(out, "tests.log")
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
    # "of copy": against the 2 GiB copy; "of same-size copy": against copies moving as many
    # bytes as the kernel (a launch's start and last wave paid alike).
    print("\n| kernel | shape | fused ms | candle ms | speed-up | GB/s | of copy | of same-size copy |\n|---|---|---|---|---|---|---|---|")
    dash = lambda v: "–" if v is None else v
    for k in ks:
        if k["kind"] == "copy":
            print(f"| driver copy (2 GiB) | | | | | {k['gb_per_s']} | 1.00 | |")
        else:
            print(f"| {k['name']} | {k['shape']} | {k['fused_ms']} | {dash(k['composed_ms'])} | {dash(k['speedup'])} | {dash(k['gb_per_s'])} | {dash(k['of_copy'])} | {dash(k.get('of_same_size_copy'))} |")
ps = [r for r in rows if r["kind"] == "profile"]
if ps:
    print("\n| piece (ViT-B MAE, b64, bf16) | forward ms | forward+backward ms |\n|---|---|---|")
    for p in ps:
        print(f"| {p['name']} | {p['fwd_ms']} | {p['fwd_bwd_ms']} |")
try:
    c = json.load(open(os.path.join(out, "ceilings.json")))
    print(f"\nPyTorch ceilings: copy {c['copy_gb_per_s']:.0f} GB/s (read+write), bf16 matmul {c['matmul_n']}^3 {c['matmul_tflops']:.0f} TFLOP/s")
except Exception as e:
    print("no ceilings:", e)
