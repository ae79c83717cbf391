#!/usr/bin/env python3
"""The off-by-default switches that earned their place in a GPU check run: each one whose CUDA
tests passed and whose step phase beat the step it is compared with by more than 1 %. Prints
them as `VAR=1` words for `env` (nothing if none), reading the phase logs in OUT.

    python3 scripts/gpu_best_switches.py /tmp/gpu-check
"""
import json
import os
import re
import sys

# (switch, its step phase, the phase it is compared with, the CUDA tests that cover it)
RULES = [
    ("ICEFM_FLASH_BWD", "step_flashbwd", "step",
     ["the_flash_attention_backward_kernels_match_the_cpu_reference"]),
    ("ICEFM_BIAS_GELU_CUDA", "step_biasgelu", "step",
     ["bias_add_gelu_and_column_sums_match_the_cpu_reference"]),
    ("ICEFM_LT_BIAS", "step_ltbias", "step",
     ["the_cublaslt_bias_epilogue_matches_the_cpu_reference"]),
    ("ICEFM_LN_V8", "step_lnv8", "step", ["layer_norm_kernels_match_the_cpu_reference"]),
    ("ICEFM_FLASH_PREFETCH", "step_newpf", "step_new",
     ["the_flash_attention_kernel_matches_the_cpu_reference",
      "the_flash_attention_backward_kernels_match_the_cpu_reference"]),
]


def images_per_s(out, phase):
    try:
        for line in open(os.path.join(out, phase + ".log")):
            if line.startswith('{"kind":"step"'):
                return json.loads(line)["images_per_s"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def winners(out):
    try:
        tests = open(os.path.join(out, "tests.log")).read()
    except OSError:
        return []
    if "test result:" not in tests:
        return []  # the tests did not run to the end: nothing is trusted
    failed = set(re.findall(r"^test (\S+) \.\.\. FAILED", tests, re.M))
    passed = set(re.findall(r"^test (\S+) \.\.\. ok", tests, re.M))
    chosen = []
    for var, phase, base, covering in RULES:
        a, b = images_per_s(out, phase), images_per_s(out, base)
        if a and b and a > 1.01 * b and all(t in passed and t not in failed for t in covering):
            chosen.append(f"{var}=1")
    return chosen


if __name__ == "__main__":
    print(" ".join(winners(sys.argv[1])))
