# Environment of the GPU scripts (sourced): unpack .gpu/bundle.tar.xz (made by
# scripts/build-gpu-check.sh) and put PyTorch's cuBLAS, cuRAND, NVRTC and CUDA runtime (the
# sonames icefm links) on the library path, and its NCCL (libnccl.so.2, loaded at run time by
# data-parallel training on GPUs).
py=python3
if [ -f .gpu/bundle.tar.xz ] && [ ! -x .gpu/gpu_check ]; then
    tar -C .gpu -xJf .gpu/bundle.tar.xz || exit 1
fi
libs=$($py -c 'import nvidia, os
for p in nvidia.__path__:
    for sub in ("cu13/lib", "cublas/lib", "curand/lib", "cuda_nvrtc/lib"):
        d = os.path.join(p, sub)
        if os.path.isdir(d): print(d)' 2>/dev/null | paste -sd:)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/nvidia/lib64:/usr/local/cuda/lib64"
nccl=$($py -c 'import nvidia, glob, os
for p in nvidia.__path__:
    for f in glob.glob(os.path.join(p, "*", "lib", "libnccl.so.2")):
        print(os.path.dirname(f))' 2>/dev/null | head -1)
if [ -n "$nccl" ]; then
    export LD_LIBRARY_PATH="$nccl:$LD_LIBRARY_PATH"
fi
