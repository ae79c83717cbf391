#!/usr/bin/env python3
"""Compile icefm's CUDA kernels (model/src/kernels.cu) with NVRTC as the program does at
run time, then assemble them with ptxas for a GPU architecture and print each kernel's
registers, spills and shared memory: a check of the kernels on a machine without a GPU.

    . scripts/cuda-env.sh                       # once: NVRTC and ptxas 13.0 in .cuda/ (docs/gpu.md)
    python3 scripts/check-kernels.py            # every kernel, sm_90
    python3 scripts/check-kernels.py flash ln_  # kernels whose names contain a word
    python3 scripts/check-kernels.py --arch 80  # another architecture
    python3 scripts/check-kernels.py --sass flash  # + each kernel's SASS instruction mix

`--sass` disassembles the cubin (nvdisasm, from the nvidia-cuda-nvdisasm wheel, installed into
.cuda/ on first use) and counts each kernel's machine instructions: in all, and in its largest
loop (the span of its longest backward branch: for the flash kernels, one 64-token tile),
by kind. Static counts, not timings: a proxy for instruction-issue cost that needs no GPU.

Exits non-zero when NVRTC or ptxas fails, or when a kernel spills registers inside a loop: a
kernel that spills is disassembled, and spills before and after its loops only (a value saved
across the whole kernel) are reported but pass.
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


KINDS = [  # SASS opcode (before the first dot) -> column
    ("tensor", {"HMMA", "HGMMA", "IMMA"}),
    ("exp/log (MUFU)", {"MUFU"}),
    ("shared ld/st", {"LDS", "STS", "LDSM"}),
    ("global ld/st", {"LDG", "STG"}),
    ("fp32", {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "F2FP", "FRND"}),
]


def nvdisasm():
    """nvdisasm from the nvidia-cuda-nvdisasm wheel in .cuda/ (13.2: the oldest cu13 one)."""
    found = glob.glob(os.path.join(ROOT, ".cuda/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvdisasm"))
    if not found:
        pip = os.path.join(ROOT, ".cuda/venv/bin/pip")
        subprocess.run([pip, "install", "-q", "nvidia-cuda-nvdisasm==13.2.*"], check=True)
        found = glob.glob(os.path.join(ROOT, ".cuda/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvdisasm"))
    return found[0]


def sass_mix(cubin):
    """Per kernel: (total, loop, local memory accesses inside any loop) instruction counts; the
    first two are dicts opcode kind -> count."""
    text = subprocess.run([nvdisasm(), cubin], capture_output=True, text=True, check=True).stdout
    out = {}
    for m in re.finditer(r"^\s*\.text\.(\w+):\n(.*?)(?=^\s*\.section|\Z)", text, re.M | re.S):
        labels, code = {}, []  # label -> address; (address, opcode, branch target)
        for line in m.group(2).splitlines():
            if (k := re.match(r"^\s*(\.L_\w+):", line)):
                labels[k.group(1)] = None
                pending = k.group(1)
                continue
            k = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
            if not k:
                continue
            addr, op = int(k.group(1), 16), k.group(2).split(".")[0]
            for name, at in labels.items():
                if at is None:
                    labels[name] = addr
            target = re.search(r"`\((\.L_\w+)\)", k.group(3)) if op == "BRA" else None
            code.append((addr, op, target.group(1) if target else None))
        loop, loops = (0, 0), []
        for addr, op, target in code:
            if target and labels.get(target) is not None and labels[target] < addr:
                loops.append((labels[target], addr))
                if addr - labels[target] > loop[1] - loop[0]:
                    loop = (labels[target], addr)
        local_in_loops = sum(1 for a, o, _ in code if o in ("LDL", "STL")
                             and any(lo <= a <= hi for lo, hi in loops))
        def mix(ops):
            d = {"all": len(ops)}
            for kind, names in KINDS:
                d[kind] = sum(1 for o in ops if o in names)
            return d
        out[m.group(1)] = (mix([o for _, o, _ in code if o not in ("NOP",)]),
                           mix([o for a, o, _ in code if loop[0] <= a <= loop[1] and o != "NOP"]) if loop[1] else None,
                           local_in_loops)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("words", nargs="*", help="only kernels whose names contain one of these")
    ap.add_argument("--arch", default="90", help="compute capability without the dot (90)")
    ap.add_argument("--sass", action="store_true", help="also count SASS instructions per kernel")
    args = ap.parse_args()
    source = open(os.path.join(ROOT, "model/src/kernels.cu")).read()
    cu = cuda_lib_dir()
    ptx = nvrtc_ptx(source, args.arch, cu)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "icefm.ptx")
        open(path, "w").write(ptx)
        r = subprocess.run([os.path.join(cu, "bin", "ptxas"), f"-arch=sm_{args.arch}", "-v", path,
                            "-o", os.path.join(tmp, "icefm.cubin")], capture_output=True, text=True)
        spills = r.returncode == 0 and re.search(r"[1-9]\d* bytes spill stores", r.stderr)
        mix = sass_mix(os.path.join(tmp, "icefm.cubin")) if (args.sass or spills) and r.returncode == 0 else {}
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
    if mix and args.sass:
        cols = ["all"] + [k for k, _ in KINDS]
        print(f"\n| kernel: SASS instructions, in all / in its largest loop | " + " | ".join(cols)
              + " |\n|---|" + "---|" * len(cols))
        for n, *_ in sorted(rows):
            total, loop, _ = mix.get(n, ({}, None, 0))
            cell = lambda k: f"{total.get(k, 0)}" + (f" / {loop[k]}" if loop else "")
            print(f"| {n} | " + " | ".join(cell(k) for k in cols) + " |")
    spilled = [r[0] for r in rows if r[2]]
    in_loops = [n for n in spilled if mix.get(n, (None, None, 1))[2]]
    print(f"\n{len(rows)} kernels, {ptx.count('mma.sync')} mma.sync in the PTX; spills: "
          + (", ".join(f"{n} ({'inside a loop' if n in in_loops else 'outside its loops'})"
                       for n in spilled) if spilled else "none"))
    return 1 if in_loops else 0


if __name__ == "__main__":
    sys.exit(main())
