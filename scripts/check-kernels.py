#!/usr/bin/env python3
"""Compile icefm's CUDA kernels (model/src/kernels.cu) with NVRTC as the program does at
run time, then assemble them with ptxas for a GPU architecture and print each kernel's
registers, spills and shared memory: a check of the kernels on a machine without a GPU.

    . scripts/cuda-env.sh                       # once: NVRTC and ptxas 13.0 in .cuda/ (docs/gpu.md)
    python3 scripts/check-kernels.py            # every kernel, sm_90
    python3 scripts/check-kernels.py flash ln_  # kernels whose names contain a word
    python3 scripts/check-kernels.py --arch 80  # another architecture

Exits non-zero when NVRTC or ptxas fails, or when a kernel spills registers.
"""
import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_lib_dir():
    """The cu13 folder of the wheels that scripts/cuda-env.sh installs."""
    found = glob.glob(os.path.join(ROOT, ".cuda/venv/lib/python3*/site-packages/nvidia/cu13"))
    if not found:
        sys.exit("no CUDA toolchain in .cuda/: run `. scripts/cuda-env.sh` first")
    return found[0]


def nvrtc_ptx(source, arch, cu):
    # NVRTC dlopens its builtins by soname: load them first, so that no LD_LIBRARY_PATH is needed.
    for b in glob.glob(os.path.join(cu, "lib", "libnvrtc-builtins.so.*")):
        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(os.path.join(cu, "lib", "libnvrtc.so.13"))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"icefm.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture=compute_{arch}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"NVRTC failed ({rc}):\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("words", nargs="*", help="only kernels whose names contain one of these")
    ap.add_argument("--arch", default="90", help="compute capability without the dot (90)")
    args = ap.parse_args()
    source = open(os.path.join(ROOT, "model/src/kernels.cu")).read()
    cu = cuda_lib_dir()
    ptx = nvrtc_ptx(source, args.arch, cu)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "icefm.ptx")
        open(path, "w").write(ptx)
        r = subprocess.run([os.path.join(cu, "bin", "ptxas"), f"-arch=sm_{args.arch}", "-v", path,
                            "-o", os.path.join(tmp, "icefm.cubin")], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ptxas failed:\n{r.stderr}")
    rows, name = [], None
    for line in r.stderr.splitlines():
        if (k := re.search(r"Compiling entry function '(\w+)'", line)):
            name, spill = k.group(1), 0
        elif name and (k := re.search(r"(\d+) bytes spill stores", line)):
            spill = int(k.group(1))
        elif name and (k := re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)):
            rows.append((name, int(k.group(1)), spill, int(k.group(2))))
            name = None
        elif name and (k := re.search(r"Used (\d+) registers", line)):
            rows.append((name, int(k.group(1)), spill, 0))
            name = None
    rows = [r for r in rows if not args.words or any(w in r[0] for w in args.words)]
    print(f"| kernel (sm_{args.arch}) | registers | spill bytes | shared bytes |\n|---|---|---|---|")
    for n, regs, spill, smem in sorted(rows):
        print(f"| {n} | {regs} | {spill} | {smem} |")
    spilled = [r[0] for r in rows if r[2]]
    print(f"\n{len(rows)} kernels, {ptx.count('mma.sync')} mma.sync in the PTX; spills: "
          + (", ".join(spilled) if spilled else "none"))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
