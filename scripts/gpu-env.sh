# Environment of the GPU scripts (sourced): unpack .gpu/bundle.tar.xz (made by
# scripts/build-gpu-check.sh) and put PyTorch's cuBLAS, cuRAND, NVRTC and CUDA runtime (the
# sonames icefm links) on the library path.
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
