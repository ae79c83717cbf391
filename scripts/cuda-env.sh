# Source this: it puts a CUDA 13.0 toolchain from Python wheels on PATH for `--features cuda`
# builds on a machine with no CUDA installed (the GPU machines' driver is CUDA 13.0, so the
# toolchain is pinned to 13.0: newer PTX would not load there).
#   . scripts/cuda-env.sh            # installs into $ICEFM_CUDA_DIR (default .cuda/) once
#   cargo build --release --features cuda
# Links against a stub libcuda.so (the real driver library is loaded at run time), and against
# the wheels' cuBLAS / cuRAND / NVRTC; at run time those come from LD_LIBRARY_PATH (on the GPU
# machine: PyTorch's own copies, see scripts/gpu-check.sh).
_icefm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ICEFM_CUDA_DIR="${ICEFM_CUDA_DIR:-$_icefm_root/.cuda}"
_py="$ICEFM_CUDA_DIR/venv/bin/python"
if [ ! -x "$_py" ]; then
    python3 -m venv "$ICEFM_CUDA_DIR/venv" || return 1
    "$ICEFM_CUDA_DIR/venv/bin/pip" install -q \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*" || return 1
fi
_cu="$("$_py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
_stub="$ICEFM_CUDA_DIR/stub"
if [ ! -e "$_stub/libcuda.so" ]; then
    mkdir -p "$_stub"
    # Every driver entry point cudarc declares, as an empty function, under the real soname.
    _cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)"
    if [ -z "$_cudarc" ]; then
        (cd "$_icefm_root" && cargo fetch -q) || return 1
        _cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)"
    fi
    grep -ohE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$_cudarc/src/driver/sys/mod.rs" |
        sed -E 's/^\s+fn ([A-Za-z0-9_]+)\(/void \1(void){}/' | sort -u >"$_stub/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_stub/libcuda.so" "$_stub/libcuda_stub.c" || return 1
    for n in nvrtc cublas cublasLt cudart; do ln -sf "$_cu/lib/lib$n.so.13" "$_stub/lib$n.so"; done
    ln -sf "$_cu/lib/libcurand.so.10" "$_stub/libcurand.so"
fi
export PATH="$_cu/bin:$PATH"
export CUDA_HOME="$ICEFM_CUDA_DIR/home"
mkdir -p "$CUDA_HOME"
ln -sfn "$_cu/bin" "$CUDA_HOME/bin"
ln -sfn "$_cu/include" "$CUDA_HOME/include"
ln -sfn "$_stub" "$CUDA_HOME/lib64"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$_stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$_cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _icefm_root _py _cu _stub _cudarc
