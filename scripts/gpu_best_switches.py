#!/usr/bin/env python3
"""The on-by-default switches that a GPU check run says to turn off: each one whose CUDA tests
failed, or whose step with it off beat the default step by more than 1 %. Prints them as
`VAR=0` words for `env` (nothing if none), reading the phase logs in OUT.

    python3 scripts/gpu_best_switches.py /tmp/gpu-check
"""
import json
import os
import re
import sys

# (switch, its step phase, the phase it is compared with, the CUDA tests that cover it)
RULES = [
    ("ICEFM_FLASH_BWD", "step_no_flashbwd", "step",
     ["the_flash_attention_backward_kernels_match_the_cpu_reference"]),
    ("ICEFM_BIAS_GELU_CUDA", "step_no_biasgelu", "step",
     ["bias_add_gelu_and_column_sums_match_the_cpu_reference"]),
    ("ICEFM_LT_BIAS", "step_no_ltbias", "step",
     ["the_cublaslt_bias_epilogue_matches_the_cpu_reference"]),
    ("ICEFM_LN_V8", "step_no_lnv8", "step", ["layer_norm_kernels_match_the_cpu_reference"]),
    ("ICEFM_FLASH_PREFETCH", "step_no_prefetch", "step",
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
    # Test names without their module (`kernels::…`).
    failed = {t.split("::")[-1] for t in re.findall(r"^test (\S+) \.\.\. FAILED", tests, re.M)}
    passed = {t.split("::")[-1] for t in re.findall(r"^test (\S+) \.\.\. ok", tests, re.M)}
    chosen = []
    for var, phase, base, covering in RULES:
        off, default = images_per_s(out, phase), images_per_s(out, base)
        broken = any(t in failed or t not in passed for t in covering)
        if broken or (off and default and off > 1.01 * default):
            chosen.append(f"{var}=0")
    return chosen


if __name__ == "__main__":
    print(" ".join(winners(sys.argv[1])))
