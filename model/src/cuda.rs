//! icefm's own CUDA kernels (feature `cuda`): fused layer norm, softmax and their backward
//! passes, and a fused AdamW step over all parameters in one launch.
//!
//! The kernels are CUDA C compiled at run time by NVRTC for the device at hand (no toolkit is
//! needed to build icefm, only the NVRTC library at run time), once per process. They take
//! float or bf16 tensors (bf16 as raw 16-bit words, so no CUDA header is needed) and compute
//! in f32. Each has a CPU reference ([`crate::fused`], [`crate::optim`]); the tests in
//! `model/tests/cuda.rs` compare the two on random inputs.
#![allow(unsafe_code)] // kernel launches and raw device pointers, each commented

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::CudaBlasLT;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Tensor};

/// The kernels' source.
pub const SOURCE: &str = r#"
typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (bf16_t)(u >> 16);
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One warp per row: mean, then the variance of the centred values (two passes, as the
// reference), then the output.
template <typename T>
__device__ void ln_fwd(const T* x, const float* w, const float* b, T* y, int rows, int d,
                       float eps) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (long)row * d;
    T* yr = y + (long)row * d;
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += ld(xr, i);
    float mean = warp_sum(s) / d;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float c = ld(xr, i) - mean; ss += c * c; }
    float rstd = rsqrtf(warp_sum(ss) / d + eps);
    for (int i = lane; i < d; i += 32) st(yr, i, (ld(xr, i) - mean) * rstd * w[i] + b[i]);
}

// dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)), g = dy · w.
template <typename T>
__device__ void ln_grad_x(const T* x, const float* w, const T* dy, T* dx, int rows, int d,
                          float eps) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (long)row * d;
    const T* gr = dy + (long)row * d;
    T* o = dx + (long)row * d;
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += ld(xr, i);
    float mean = warp_sum(s) / d;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float c = ld(xr, i) - mean; ss += c * c; }
    float rstd = rsqrtf(warp_sum(ss) / d + eps);
    float a = 0.f, bs = 0.f;
    for (int i = lane; i < d; i += 32) {
        float g = ld(gr, i) * w[i];
        a += g;
        bs += g * (ld(xr, i) - mean) * rstd;
    }
    a = warp_sum(a) / d;
    bs = warp_sum(bs) / d;
    for (int i = lane; i < d; i += 32) {
        float xh = (ld(xr, i) - mean) * rstd;
        st(o, i, rstd * (ld(gr, i) * w[i] - a - xh * bs));
    }
}

// Partial sums of dy·x̂ and dy over a block of rows: out[0][blockIdx][:], out[1][blockIdx][:].
// Each warp takes rows of the block's range in turn; shared-memory accumulators.
template <typename T>
__device__ void ln_grad_wb(const T* x, const T* dy, float* out, int rows, int d, float eps,
                           int rows_per_block) {
    extern __shared__ float acc[];  // [2][d]
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    int r0 = blockIdx.x * rows_per_block;
    int r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
    for (int row = r0 + warp; row < r1; row += warps) {
        const T* xr = x + (long)row * d;
        const T* gr = dy + (long)row * d;
        float s = 0.f;
        for (int i = lane; i < d; i += 32) s += ld(xr, i);
        float mean = warp_sum(s) / d;
        float ss = 0.f;
        for (int i = lane; i < d; i += 32) { float c = ld(xr, i) - mean; ss += c * c; }
        float rstd = rsqrtf(warp_sum(ss) / d + eps);
        for (int i = lane; i < d; i += 32) {
            float g = ld(gr, i);
            atomicAdd(&acc[i], g * (ld(xr, i) - mean) * rstd);
            atomicAdd(&acc[d + i], g);
        }
    }
    __syncthreads();
    long p = gridDim.x;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        out[(long)blockIdx.x * d + i] = acc[i];
        out[(p + blockIdx.x) * d + i] = acc[d + i];
    }
}

// Softmax over the first `valid` values of each row (the rest are padding: probability 0).
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int rows, int d, int valid) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (long)row * d;
    T* yr = y + (long)row * d;
    float m = -__int_as_float(0x7f800000);
    for (int i = lane; i < valid; i += 32) m = fmaxf(m, ld(xr, i));
    m = warp_max(m);
    float s = 0.f;
    for (int i = lane; i < valid; i += 32) s += __expf(ld(xr, i) - m);
    float inv = 1.f / warp_sum(s);
    for (int i = lane; i < d; i += 32) st(yr, i, i < valid ? __expf(ld(xr, i) - m) * inv : 0.f);
}

template <typename T>
__device__ void softmax_grad(const T* y, const T* dy, T* dx, int rows, int d) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* yr = y + (long)row * d;
    const T* gr = dy + (long)row * d;
    T* o = dx + (long)row * d;
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += ld(yr, i) * ld(gr, i);
    s = warp_sum(s);
    for (int i = lane; i < d; i += 32) st(o, i, ld(yr, i) * (ld(gr, i) - s));
}

#define INSTANCES(T, SUF)                                                                     \
extern "C" __global__ void ln_fwd_##SUF(const T* x, const float* w, const float* b, T* y,    \
        int rows, int d, float eps) { ln_fwd<T>(x, w, b, y, rows, d, eps); }                  \
extern "C" __global__ void ln_grad_x_##SUF(const T* x, const float* w, const T* dy, T* dx,   \
        int rows, int d, float eps) { ln_grad_x<T>(x, w, dy, dx, rows, d, eps); }             \
extern "C" __global__ void ln_grad_wb_##SUF(const T* x, const T* dy, float* out, int rows,   \
        int d, float eps, int rpb) { ln_grad_wb<T>(x, dy, out, rows, d, eps, rpb); }           \
extern "C" __global__ void softmax_fwd_##SUF(const T* x, T* y, int rows, int d, int valid) {  \
        softmax_fwd<T>(x, y, rows, d, valid); }                                                      \
extern "C" __global__ void softmax_grad_##SUF(const T* y, const T* dy, T* dx, int rows,      \
        int d) { softmax_grad<T>(y, dy, dx, rows, d); }

INSTANCES(float, f32)
INSTANCES(bf16_t, bf16)

// ---- Register-resident variants: each lane holds its share of the row in registers, loaded
// two values at a time (8-byte float2 / 4-byte bf16 pairs), so every load of a row is issued
// before the first reduction. P = pairs per lane = d / 64.
__device__ __forceinline__ void ld2(const float* p, int pair, float& a, float& b) {
    float2 v = reinterpret_cast<const float2*>(p)[pair]; a = v.x; b = v.y;
}
__device__ __forceinline__ void ld2(const bf16_t* p, int pair, float& a, float& b) {
    unsigned int u = reinterpret_cast<const unsigned int*>(p)[pair];
    a = __uint_as_float(u << 16); b = __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ unsigned int bf16_bits(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ void st2(float* p, int pair, float a, float b) {
    reinterpret_cast<float2*>(p)[pair] = make_float2(a, b);
}
__device__ __forceinline__ void st2(bf16_t* p, int pair, float a, float b) {
    reinterpret_cast<unsigned int*>(p)[pair] = bf16_bits(a) | (bf16_bits(b) << 16);
}

template <typename T, int P>
__device__ __forceinline__ void row_stats_reg(const float (&v)[2 * P], int d, float eps,
                                              float& mean, float& rstd) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 2 * P; ++k) s += v[k];
    mean = warp_sum(s) / d;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 2 * P; ++k) { float c = v[k] - mean; ss += c * c; }
    rstd = rsqrtf(warp_sum(ss) / d + eps);
}

template <typename T, int P>
__device__ void ln_fwd_reg(const T* x, const float* w, const float* b, T* y, int rows, float eps) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int d = 64 * P;
    const T* xr = x + (long)row * d;
    float v[2 * P];
#pragma unroll
    for (int k = 0; k < P; ++k) ld2(xr, lane + 32 * k, v[2 * k], v[2 * k + 1]);
    float mean, rstd;
    row_stats_reg<T, P>(v, d, eps, mean, rstd);
    T* yr = y + (long)row * d;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        int q = lane + 32 * k;
        float2 wv = reinterpret_cast<const float2*>(w)[q];
        float2 bv = reinterpret_cast<const float2*>(b)[q];
        st2(yr, q, (v[2 * k] - mean) * rstd * wv.x + bv.x, (v[2 * k + 1] - mean) * rstd * wv.y + bv.y);
    }
}

template <typename T, int P>
__device__ void ln_grad_x_reg(const T* x, const float* w, const T* dy, T* dx, int rows, float eps) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int d = 64 * P;
    const T* xr = x + (long)row * d;
    const T* gr = dy + (long)row * d;
    float v[2 * P], g[2 * P];
#pragma unroll
    for (int k = 0; k < P; ++k) {
        ld2(xr, lane + 32 * k, v[2 * k], v[2 * k + 1]);
        ld2(gr, lane + 32 * k, g[2 * k], g[2 * k + 1]);
    }
    float mean, rstd;
    row_stats_reg<T, P>(v, d, eps, mean, rstd);
    float a = 0.f, bs = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        float2 wv = reinterpret_cast<const float2*>(w)[lane + 32 * k];
        g[2 * k] *= wv.x;
        g[2 * k + 1] *= wv.y;
        v[2 * k] = (v[2 * k] - mean) * rstd;
        v[2 * k + 1] = (v[2 * k + 1] - mean) * rstd;
        a += g[2 * k] + g[2 * k + 1];
        bs += g[2 * k] * v[2 * k] + g[2 * k + 1] * v[2 * k + 1];
    }
    a = warp_sum(a) / d;
    bs = warp_sum(bs) / d;
    T* o = dx + (long)row * d;
#pragma unroll
    for (int k = 0; k < P; ++k)
        st2(o, lane + 32 * k, rstd * (g[2 * k] - a - v[2 * k] * bs),
            rstd * (g[2 * k + 1] - a - v[2 * k + 1] * bs));
}

// Each warp accumulates its rows' dy·x̂ and dy in registers; the block's warps then add
// theirs in shared memory once, and the block writes its partial sums.
template <typename T, int P>
__device__ void ln_grad_wb_reg(const T* x, const T* dy, float* out, int rows, float eps,
                               int rows_per_block) {
    const int d = 64 * P;
    extern __shared__ float acc[];  // [2][d]
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    int r0 = blockIdx.x * rows_per_block;
    int r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
    float dw[2 * P], db[2 * P];
#pragma unroll
    for (int k = 0; k < 2 * P; ++k) { dw[k] = 0.f; db[k] = 0.f; }
    for (int row = r0 + warp; row < r1; row += warps) {
        const T* xr = x + (long)row * d;
        const T* gr = dy + (long)row * d;
        float v[2 * P], g[2 * P];
#pragma unroll
        for (int k = 0; k < P; ++k) {
            ld2(xr, lane + 32 * k, v[2 * k], v[2 * k + 1]);
            ld2(gr, lane + 32 * k, g[2 * k], g[2 * k + 1]);
        }
        float mean, rstd;
        row_stats_reg<T, P>(v, d, eps, mean, rstd);
#pragma unroll
        for (int k = 0; k < 2 * P; ++k) {
            dw[k] += g[k] * (v[k] - mean) * rstd;
            db[k] += g[k];
        }
    }
#pragma unroll
    for (int k = 0; k < P; ++k) {
        int i = 2 * (lane + 32 * k);
        atomicAdd(&acc[i], dw[2 * k]);
        atomicAdd(&acc[i + 1], dw[2 * k + 1]);
        atomicAdd(&acc[d + i], db[2 * k]);
        atomicAdd(&acc[d + i + 1], db[2 * k + 1]);
    }
    __syncthreads();
    long p = gridDim.x;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        out[(long)blockIdx.x * d + i] = acc[i];
        out[(p + blockIdx.x) * d + i] = acc[d + i];
    }
}

// Softmax with the row in registers: V values per lane (V ≥ ceil(d / 32)), bounds-checked.
template <typename T, int V>
__device__ void softmax_fwd_reg(const T* x, T* y, int rows, int d, int valid) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (long)row * d;
    float v[V];
    float m = -__int_as_float(0x7f800000);
#pragma unroll
    for (int k = 0; k < V; ++k) {
        int i = lane + 32 * k;
        v[k] = i < valid ? ld(xr, i) : -__int_as_float(0x7f800000);
        m = fmaxf(m, v[k]);
    }
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) { v[k] = __expf(v[k] - m); s += v[k]; }
    float inv = 1.f / warp_sum(s);
    T* yr = y + (long)row * d;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        int i = lane + 32 * k;
        if (i < d) st(yr, i, v[k] * inv);
    }
}

template <typename T, int V>
__device__ void softmax_grad_reg(const T* y, const T* dy, T* dx, int rows, int d) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* yr = y + (long)row * d;
    const T* gr = dy + (long)row * d;
    float a[V], g[V];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        int i = lane + 32 * k;
        a[k] = i < d ? ld(yr, i) : 0.f;
        g[k] = i < d ? ld(gr, i) : 0.f;
        s += a[k] * g[k];
    }
    s = warp_sum(s);
    T* o = dx + (long)row * d;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        int i = lane + 32 * k;
        if (i < d) st(o, i, a[k] * (g[k] - s));
    }
}

#define LN_REG(T, SUF, P)                                                                     \
extern "C" __global__ void ln_fwd_##SUF##_p##P(const T* x, const float* w, const float* b,   \
        T* y, int rows, int d, float eps) { ln_fwd_reg<T, P>(x, w, b, y, rows, eps); }         \
extern "C" __global__ void ln_grad_x_##SUF##_p##P(const T* x, const float* w, const T* dy,   \
        T* dx, int rows, int d, float eps) { ln_grad_x_reg<T, P>(x, w, dy, dx, rows, eps); }   \
extern "C" __global__ void ln_grad_wb_##SUF##_p##P(const T* x, const T* dy, float* out,      \
        int rows, int d, float eps, int rpb) { ln_grad_wb_reg<T, P>(x, dy, out, rows, eps, rpb); }
#define SM_REG(T, SUF, V)                                                                     \
extern "C" __global__ void softmax_fwd_##SUF##_v##V(const T* x, T* y, int rows, int d,       \
        int valid) { softmax_fwd_reg<T, V>(x, y, rows, d, valid); }                                               \
extern "C" __global__ void softmax_grad_##SUF##_v##V(const T* y, const T* dy, T* dx,         \
        int rows, int d) { softmax_grad_reg<T, V>(y, dy, dx, rows, d); }
#define REG_ALL(T, SUF)                                                                       \
    LN_REG(T, SUF, 3) LN_REG(T, SUF, 4) LN_REG(T, SUF, 6) LN_REG(T, SUF, 8)                   \
    LN_REG(T, SUF, 12) LN_REG(T, SUF, 16) LN_REG(T, SUF, 20)                                  \
    SM_REG(T, SUF, 1) SM_REG(T, SUF, 2) SM_REG(T, SUF, 4) SM_REG(T, SUF, 5) SM_REG(T, SUF, 8)  \
    SM_REG(T, SUF, 12) SM_REG(T, SUF, 16) SM_REG(T, SUF, 19) SM_REG(T, SUF, 20)               \
    SM_REG(T, SUF, 24) SM_REG(T, SUF, 32)
REG_ALL(float, f32)
REG_ALL(bf16_t, bf16)

// ---- bf16 layer norm with 16-byte accesses (8 values per load) and persistent warps: a warp
// takes rows row, row + warps, ... (as many blocks as fit on the device at once) and issues the
// next row's loads before it reduces the current one, so loads stay in flight between rows.
// Q = 16-byte loads per lane and row = d / 256. w and b: f32, 16-byte aligned.
__device__ __forceinline__ void bf8_unpack(uint4 u, float* f) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ uint4 bf8_pack(const float* f) {
    return make_uint4(bf16_bits(f[0]) | (bf16_bits(f[1]) << 16), bf16_bits(f[2]) | (bf16_bits(f[3]) << 16),
                      bf16_bits(f[4]) | (bf16_bits(f[5]) << 16), bf16_bits(f[6]) | (bf16_bits(f[7]) << 16));
}
// A row's Q 16-byte pieces of this lane: elements (lane + 32·q)·8 .. + 8.
template <int Q>
__device__ __forceinline__ void ld_row8(const bf16_t* p, int lane, uint4 (&u)[Q]) {
#pragma unroll
    for (int q = 0; q < Q; ++q) u[q] = reinterpret_cast<const uint4*>(p)[lane + 32 * q];
}
// Eight consecutive f32 values from element e (a multiple of 8).
__device__ __forceinline__ void ld_f8(const float* p, int e, float* f) {
    const float4 a = reinterpret_cast<const float4*>(p + e)[0];
    const float4 b = reinterpret_cast<const float4*>(p + e)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

template <int Q>
__device__ void ln_fwd_v8(const bf16_t* x, const float* w, const float* b, bf16_t* y, int rows,
                          float eps) {
    const int lane = threadIdx.x & 31, warps = (gridDim.x * blockDim.x) >> 5;
    const int d = 256 * Q;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    uint4 cur[Q];
    if (row < rows) ld_row8<Q>(x + (long)row * d, lane, cur);
    for (; row < rows; row += warps) {
        const int next = row + warps;
        uint4 nxt[Q];
        if (next < rows) ld_row8<Q>(x + (long)next * d, lane, nxt);
        float v[8 * Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) bf8_unpack(cur[q], v + 8 * q);
        float mean, rstd;
        row_stats_reg<bf16_t, 4 * Q>(v, d, eps, mean, rstd);
        uint4* yr = reinterpret_cast<uint4*>(y + (long)row * d);
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const int e = (lane + 32 * q) * 8;
            float wv[8], bv[8], o[8];
            ld_f8(w, e, wv);
            ld_f8(b, e, bv);
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = (v[8 * q + i] - mean) * rstd * wv[i] + bv[i];
            yr[lane + 32 * q] = bf8_pack(o);
        }
        if (next < rows) {
#pragma unroll
            for (int q = 0; q < Q; ++q) cur[q] = nxt[q];
        }
    }
}

template <int Q>
__device__ void ln_grad_x_v8(const bf16_t* x, const float* w, const bf16_t* dy, bf16_t* dx,
                             int rows, float eps) {
    const int lane = threadIdx.x & 31, warps = (gridDim.x * blockDim.x) >> 5;
    const int d = 256 * Q;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    uint4 cx[Q], cg[Q];
    if (row < rows) {
        ld_row8<Q>(x + (long)row * d, lane, cx);
        ld_row8<Q>(dy + (long)row * d, lane, cg);
    }
    for (; row < rows; row += warps) {
        const int next = row + warps;
        uint4 nx[Q], ng[Q];
        if (next < rows) {
            ld_row8<Q>(x + (long)next * d, lane, nx);
            ld_row8<Q>(dy + (long)next * d, lane, ng);
        }
        float v[8 * Q], g[8 * Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            bf8_unpack(cx[q], v + 8 * q);
            bf8_unpack(cg[q], g + 8 * q);
        }
        float mean, rstd;
        row_stats_reg<bf16_t, 4 * Q>(v, d, eps, mean, rstd);
        float a = 0.f, bs = 0.f;
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            float wv[8];
            ld_f8(w, (lane + 32 * q) * 8, wv);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int k = 8 * q + i;
                g[k] *= wv[i];
                v[k] = (v[k] - mean) * rstd;
                a += g[k];
                bs += g[k] * v[k];
            }
        }
        a = warp_sum(a) / d;
        bs = warp_sum(bs) / d;
        uint4* o = reinterpret_cast<uint4*>(dx + (long)row * d);
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            float r[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) r[i] = rstd * (g[8 * q + i] - a - v[8 * q + i] * bs);
            o[lane + 32 * q] = bf8_pack(r);
        }
        if (next < rows) {
#pragma unroll
            for (int q = 0; q < Q; ++q) {
                cx[q] = nx[q];
                cg[q] = ng[q];
            }
        }
    }
}
#define LN_V8(Q)                                                                              \
extern "C" __global__ void ln_fwd_bf16_q##Q(const bf16_t* x, const float* w, const float* b,  \
        bf16_t* y, int rows, int d, float eps) { ln_fwd_v8<Q>(x, w, b, y, rows, eps); }        \
extern "C" __global__ void ln_grad_x_bf16_q##Q(const bf16_t* x, const float* w,               \
        const bf16_t* dy, bf16_t* dx, int rows, int d, float eps) {                            \
    ln_grad_x_v8<Q>(x, w, dy, dx, rows, eps); }
LN_V8(2)
LN_V8(3)
LN_V8(4)
LN_V8(5)


// ---- Bias add, column sums, GELU, gradient norm.
template <typename T>
__device__ void bias_add_k(const T* x, const float* b, T* y, long n, int c) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(y, i, ld(x, i) + b[i % c]);
}

// Partial column sums: block (tile, chunk) sums 32 columns over a chunk of rows; its 8 warps
// take rows in turn and meet in shared memory.
template <typename T>
__device__ void column_sums_k(const T* x, float* out, int rows, int c, int rows_per_block) {
    __shared__ float acc[8][33];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int col = blockIdx.x * 32 + lane;
    int r0 = blockIdx.y * rows_per_block;
    int r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
    float s = 0.f;
    if (col < c)
        for (int r = r0 + warp; r < r1; r += 8) s += ld(x, (long)r * c + col);
    acc[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && col < c) {
        float t = 0.f;
        for (int w = 0; w < 8; ++w) t += acc[w][lane];
        out[(long)blockIdx.y * c + col] = t;
    }
}

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_d(float x) {
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * __expf(-0.5f * x * x);
}
template <typename T>
__device__ void gelu_fwd_k(const T* x, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(y, i, gelu_f(ld(x, i)));
}
template <typename T>
__device__ void gelu_grad_k(const T* x, const T* g, T* dx, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(dx, i, ld(g, i) * gelu_d(ld(x, i)));
}

// gelu(x + b) and its backward over rows of c: blocks take rows in turn, threads the columns
// (no 64-bit modulo per element); the pre-activation stays in a register, in f32. With
// `pairs` (c even, inputs starting at even elements: the host checks) each thread moves two
// values per load and store (ld2/st2, as the register-resident row kernels).
template <typename T>
__device__ void bias_gelu_fwd_k(const T* x, const float* b, T* y, int rows, int c, int pairs) {
    int step = gridDim.x * blockDim.x, j0 = blockIdx.x * blockDim.x + threadIdx.x;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* xr = x + (long)r * c;
        T* yr = y + (long)r * c;
        if (pairs) {
            for (int j = j0; j < (c >> 1); j += step) {
                float a, e;
                ld2(xr, j, a, e);
                st2(yr, j, gelu_f(a + b[2 * j]), gelu_f(e + b[2 * j + 1]));
            }
        } else {
            for (int j = j0; j < c; j += step) st(yr, j, gelu_f(ld(xr, j) + b[j]));
        }
    }
}
template <typename T>
__device__ void bias_gelu_grad_k(const T* x, const float* b, const T* g, T* dx, int rows, int c,
                                 int pairs) {
    int step = gridDim.x * blockDim.x, j0 = blockIdx.x * blockDim.x + threadIdx.x;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* xr = x + (long)r * c;
        const T* gr = g + (long)r * c;
        T* dr = dx + (long)r * c;
        if (pairs) {
            for (int j = j0; j < (c >> 1); j += step) {
                float a, e, ga, ge;
                ld2(xr, j, a, e);
                ld2(gr, j, ga, ge);
                st2(dr, j, ga * gelu_d(a + b[2 * j]), ge * gelu_d(e + b[2 * j + 1]));
            }
        } else {
            for (int j = j0; j < c; j += step) st(dr, j, ld(gr, j) * gelu_d(ld(xr, j) + b[j]));
        }
    }
}

#define ELEM_INSTANCES(T, SUF)                                                                \
extern "C" __global__ void bias_add_##SUF(const T* x, const float* b, T* y, long n, int c) {  \
        bias_add_k<T>(x, b, y, n, c); }                                                       \
extern "C" __global__ void column_sums_##SUF(const T* x, float* out, int rows, int c,        \
        int rpb) { column_sums_k<T>(x, out, rows, c, rpb); }                                   \
extern "C" __global__ void gelu_fwd_##SUF(const T* x, T* y, long n) { gelu_fwd_k<T>(x, y, n); } \
extern "C" __global__ void gelu_grad_##SUF(const T* x, const T* g, T* dx, long n) {           \
        gelu_grad_k<T>(x, g, dx, n); }                                                        \
extern "C" __global__ void bias_gelu_fwd_##SUF(const T* x, const float* b, T* y, int rows,   \
        int c, int pairs) { bias_gelu_fwd_k<T>(x, b, y, rows, c, pairs); }                     \
extern "C" __global__ void bias_gelu_grad_##SUF(const T* x, const float* b, const T* g,      \
        T* dx, int rows, int c, int pairs) { bias_gelu_grad_k<T>(x, b, g, dx, rows, c, pairs); }
ELEM_INSTANCES(float, f32)
ELEM_INSTANCES(bf16_t, bf16)

// Sum of squares of many f32 tensors, table[t] = {ptr, n}; blockIdx.y = tensor. Each block
// reduces its share and adds it to out[0] (double).
extern "C" __global__ void sum_squares_multi(const unsigned long long* table, double* out) {
    const float* g = (const float*)table[2 * blockIdx.y];
    long n = (long)table[2 * blockIdx.y + 1];
    float s = 0.f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += g[i] * g[i];
    s = warp_sum(s);
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) atomicAdd(out, (double)t);
    }
}


// ---- MAE's masked norm-pix loss: one warp per patch row of p values; w = valid · masked.
template <typename T>
__device__ bool npx_stats(const T* t, const T* w, int p, int lane, float& mean, float& rstd,
                          float& cnt) {
    float c = 0.f, s = 0.f;
    for (int i = lane; i < p; i += 32) { float wi = ld(w, i); c += wi; s += wi * ld(t, i); }
    c = warp_sum(c);
    s = warp_sum(s);
    if (c < 2.f) return false;
    mean = s / c;
    float v = 0.f;
    for (int i = lane; i < p; i += 32) { float d = (ld(t, i) - mean) * ld(w, i); v += d * d; }
    v = warp_sum(v) / (c - 1.f);
    rstd = rsqrtf(v + 1e-6f);
    cnt = c;
    return true;
}
template <typename T>
__device__ void npx_loss(const T* pred, const T* t, const T* w, T* out, int rows, int p) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    long o = (long)row * p;
    float mean, rstd, cnt;
    if (!npx_stats(t + o, w + o, p, lane, mean, rstd, cnt)) { if (lane == 0) st(out, row, 0.f); return; }
    float se = 0.f;
    for (int i = lane; i < p; i += 32) {
        float e = ld(pred + o, i) - (ld(t + o, i) - mean) * rstd;
        se += e * e * ld(w + o, i);
    }
    se = warp_sum(se);
    if (lane == 0) st(out, row, se / cnt);
}
// wg rows hold p weights, then the patch's incoming gradient.
template <typename T>
__device__ void npx_grad(const T* pred, const T* t, const T* wg, T* dp, int rows, int p) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    long o = (long)row * p;
    const T* w = wg + (long)row * (p + 1);
    float mean, rstd, cnt;
    if (!npx_stats(t + o, w, p, lane, mean, rstd, cnt)) {
        for (int i = lane; i < p; i += 32) st(dp + o, i, 0.f);
        return;
    }
    float g = ld(w, p);
    for (int i = lane; i < p; i += 32) {
        float e = ld(pred + o, i) - (ld(t + o, i) - mean) * rstd;
        st(dp + o, i, 2.f * e * ld(w, i) * g / cnt);
    }
}
#define NPX_INSTANCES(T, SUF)                                                                 \
extern "C" __global__ void norm_pix_loss_##SUF(const T* pred, const T* t, const T* w, T* out, \
        int rows, int p) { npx_loss<T>(pred, t, w, out, rows, p); }                           \
extern "C" __global__ void norm_pix_loss_grad_##SUF(const T* pred, const T* t, const T* wg,  \
        T* dp, int rows, int p) { npx_grad<T>(pred, t, wg, dp, rows, p); }
NPX_INSTANCES(float, f32)
NPX_INSTANCES(bf16_t, bf16)


// ---- Token gather / scatter: out[b, dst][:] = in[b, src][:] for each index j of a sample;
// gather: src = ids[j], dst = j; scatter: src = j, dst = ids[j] (distinct ids: no atomics).
// One block per (sample, j); out is zero-filled first for a scatter.
template <typename T>
__device__ void move_tokens_k(const T* in, const unsigned int* ids, T* out, int k, int n, int d,
                              int scatter) {
    int b = blockIdx.y, j = blockIdx.x;
    int t = (int)ids[(long)b * k + j];
    int rows_in = scatter ? k : n, rows_out = scatter ? n : k;
    int src = scatter ? j : t, dst = scatter ? t : j;
    const T* f = in + ((long)b * rows_in + src) * d;
    T* o = out + ((long)b * rows_out + dst) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = f[i];
}
#define MOVE_INSTANCES(T, SUF)                                                                \
extern "C" __global__ void move_tokens_##SUF(const T* in, const unsigned int* ids, T* out,   \
        int k, int n, int d, int scatter) { move_tokens_k<T>(in, ids, out, k, n, d, scatter); }
MOVE_INSTANCES(float, f32)
MOVE_INSTANCES(bf16_t, bf16)

// AdamW over many tensors in one launch: table[t] = {w, m, v, g, n, decay} (6 words),
// blockIdx.y = tensor. Same arithmetic, in the same order, as icefm_model::optim::AdamW.
extern "C" __global__ void adamw_multi(const unsigned long long* table, float lr, float b1,
        float b2, float c1, float c2, float eps, float wd, float gscale) {
    const unsigned long long* e = table + 6 * blockIdx.y;
    float* w = (float*)e[0];
    float* m = (float*)e[1];
    float* v = (float*)e[2];
    const float* g = (const float*)e[3];
    long n = (long)e[4];
    bool decay = e[5] != 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        float gi = g[i] * gscale;
        float mi = m[i] * b1 + gi * (1.f - b1);
        float vi = v[i] * b2 + gi * gi * (1.f - b2);
        m[i] = mi;
        v[i] = vi;
        float u = (mi / c1) / (sqrtf(vi / c2) + eps);
        if (decay) u += w[i] * wd;
        w[i] = w[i] - u * lr;
    }
}

// The loader's batch preparation on the device (icefm_model::fused::NormaliseAugment):
// raw [B, C, n, n] (NaN invalid) and prm = {mean[C], inv_std[C], code[B]} → out [B, C+1, n, n],
// inputs normalised (0 where invalid), each sample turned by its transform code (bit 0
// transpose, 1 flip rows, 2 flip columns), channel C the validity mask. One thread per output
// pixel (grid-stride); `v - v == 0` is false exactly for NaN and infinities.
extern "C" __global__ void normalise_augment(const float* raw, const float* prm, float* out,
        int B, int C, int n) {
    long plane = (long)n * n;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < B * plane;
         idx += (long)gridDim.x * blockDim.x) {
        int b = (int)(idx / plane);
        long p = idx % plane;
        int i = (int)(p / n), j = (int)(p % n);
        int code = (int)prm[2 * C + b];
        int a = (code & 1) ? j : i, c2 = (code & 1) ? i : j;
        int y = (code & 2) ? n - 1 - a : a, x = (code & 4) ? n - 1 - c2 : c2;
        float ok = 1.f;
        for (int c = 0; c < C; ++c) {
            float v = raw[((long)b * C + c) * plane + (long)y * n + x];
            bool finite = (v - v) == 0.f;
            out[((long)b * (C + 1) + c) * plane + p] = finite ? (v - prm[c]) * prm[C + c] : 0.f;
            if (!finite) ok = 0.f;
        }
        out[((long)b * (C + 1) + C) * plane + p] = ok;
    }
}
// Flash attention forward (icefm_model::fused::FlashAttention): bf16 in and out, f32
// arithmetic on tensor cores (mma.sync m16n8k16, sm_80+). qkv [B, N, 3, H, HD] (the qkv
// projection's layout: queries, keys, values, heads interleaved) → out [B, N, H·HD], heads
// merged, softmax(q·kᵀ·scale)·v with no N × N matrix in memory. One block of 4 warps per 64
// queries of one (sample, head); each warp keeps 16 queries' scores and outputs in registers
// (online softmax in the log2 domain) while keys and values pass through shared memory 64 at
// a time (values transposed); keys past N are masked, queries past N not written.
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}
// Two f32 as a bf16 pair (round to nearest even): one cvt on sm_80+ (a in the upper half), in
// place of two software roundings, which were most of the flash kernels' non-mma instructions.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
#endif
}
// Two consecutive bf16 values (an even element index: 4-byte aligned).
__device__ __forceinline__ unsigned ld_pair(const bf16_t* p) { return *(const unsigned*)p; }

#define FA_KT 64
#define FA_NEG_INF (-__int_as_float(0x7f800000))
// Shared-memory tiles of FA_KT tokens: rows with head-width values in pairs (padded: no bank
// conflicts), and transposed, head-width rows with tokens in pairs.
template <int HD> using fa_rows = unsigned[FA_KT][HD / 2 + 4];
template <int HD> using fa_cols = unsigned[HD][FA_KT / 2 + 4];

// Sum and maximum over the four lanes that hold one row of an mma fragment.
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Tile loading in two steps, so that all of a thread's global loads for a tile are in flight at
// once (and, with the next tile fetched before this one's products, hidden behind them):
// fa_fetch reads tokens j0 .. j0 + FA_KT of one head (`src`: token 0's first value, `stride`
// between tokens) into registers, one unit being the same pair of head-width columns of two
// consecutive tokens (a: even, b: odd; tokens past N read as 0); fa_put_rows writes a stage as a
// row tile, fa_put_cols as a transposed tile. All FA_THREADS threads of the block.
#define FA_THREADS 128
template <int HD> struct fa_stage {
    static constexpr int U = FA_KT / 2 * (HD / 2) / FA_THREADS;  // units per thread
    static constexpr int KPI = FA_THREADS / (HD / 2);              // token pairs per round
    unsigned a[U], b[U];
};
// Unit threadIdx.x + it · FA_THREADS: token pair threadIdx.x / (HD/2) + it · KPI, column pair
// threadIdx.x % (HD/2) (addresses stepped from one base, not one register pair per unit).
template <int HD>
__device__ __forceinline__ void fa_fetch(fa_stage<HD>& st, const bf16_t* src, long stride, int j0,
                                         int N) {
    constexpr int KPI = fa_stage<HD>::KPI;
    int row = j0 + 2 * (threadIdx.x / (HD / 2));
    const bf16_t* p = src + row * stride + (threadIdx.x % (HD / 2)) * 2;
    const long step = 2L * KPI * stride;
#pragma unroll
    for (int it = 0; it < fa_stage<HD>::U; ++it, row += 2 * KPI, p += step) {
        st.a[it] = row < N ? ld_pair(p) : 0u;
        st.b[it] = row + 1 < N ? ld_pair(p + stride) : 0u;
    }
}
template <int HD>
__device__ __forceinline__ void fa_put_rows(fa_rows<HD>& dst, const fa_stage<HD>& st) {
    constexpr int KPI = fa_stage<HD>::KPI;
    const int kp = threadIdx.x / (HD / 2), dp = threadIdx.x % (HD / 2);
#pragma unroll
    for (int it = 0; it < fa_stage<HD>::U; ++it) {
        dst[2 * (kp + it * KPI)][dp] = st.a[it];
        dst[2 * (kp + it * KPI) + 1][dp] = st.b[it];
    }
}
template <int HD>
__device__ __forceinline__ void fa_put_cols(fa_cols<HD>& dst, const fa_stage<HD>& st) {
    constexpr int KPI = fa_stage<HD>::KPI;
    const int kp = threadIdx.x / (HD / 2), dp = threadIdx.x % (HD / 2);
#pragma unroll
    for (int it = 0; it < fa_stage<HD>::U; ++it) {
        // low halves: head-width column 2·dp; high halves: column 2·dp + 1
        dst[2 * dp][kp + it * KPI] = __byte_perm(st.a[it], st.b[it], 0x5410);
        dst[2 * dp + 1][kp + it * KPI] = __byte_perm(st.a[it], st.b[it], 0x7632);
    }
}

// A warp's 16 rows (fragments `a`) against the FA_KT rows of a tile: c[nt] = a·tileᵀ.
template <int HD>
__device__ __forceinline__ void fa_products(float (&c)[FA_KT / 8][4], const unsigned (&a)[HD / 16][4],
                                            const fa_rows<HD>& tile, int g, int t) {
    for (int nt = 0; nt < FA_KT / 8; ++nt) {
        c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
        for (int kk = 0; kk < HD / 16; ++kk)
            mma_bf16(c[nt], a[kk], tile[nt * 8 + g][kk * 8 + t], tile[nt * 8 + g][kk * 8 + 4 + t]);
    }
}

// Scores in the log2 domain, keys (columns) past N masked to -inf (only the last tile has any:
// the forward scales the others with fa_scale; in the backward kernels that branch cost 40-50
// registers, by ptxas).
__device__ __forceinline__ void fa_scale(float (&s)[FA_KT / 8][4], float scale_log2) {
    for (int nt = 0; nt < FA_KT / 8; ++nt)
        for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
}
__device__ __forceinline__ void fa_scale_mask(float (&s)[FA_KT / 8][4], int j0, int N, int t,
                                              float scale_log2) {
    for (int nt = 0; nt < FA_KT / 8; ++nt)
        for (int e = 0; e < 4; ++e) {
            int key = j0 + nt * 8 + t * 2 + (e & 1);
            s[nt][e] = key < N ? s[nt][e] * scale_log2 : FA_NEG_INF;
        }
}

// The maxima of a warp's two rows (at least mx0, mx1 on entry) over the whole row.
__device__ __forceinline__ void fa_row_max(const float (&s)[FA_KT / 8][4], float& mx0, float& mx1) {
    for (int nt = 0; nt < FA_KT / 8; ++nt) {
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = quad_max(mx0);
    mx1 = quad_max(mx1);
}

// Columns 16·kstep .. 16·kstep + 16 of an accumulator as the A operand of the next product.
__device__ __forceinline__ void fa_as_a(const float (&c)[FA_KT / 8][4], int kstep, unsigned (&a)[4]) {
    a[0] = pack_bf16(c[2 * kstep][0], c[2 * kstep][1]);
    a[1] = pack_bf16(c[2 * kstep][2], c[2 * kstep][3]);
    a[2] = pack_bf16(c[2 * kstep + 1][0], c[2 * kstep + 1][1]);
    a[3] = pack_bf16(c[2 * kstep + 1][2], c[2 * kstep + 1][3]);
}

// acc[u] += A·tile for the u-th 8 head-width columns, over the tile's FA_KT tokens.
template <int HD>
__device__ __forceinline__ void fa_accumulate(float (&acc)[HD / 8][4], const float (&c)[FA_KT / 8][4],
                                              const fa_cols<HD>& tile, int g, int t) {
    for (int kstep = 0; kstep < FA_KT / 16; ++kstep) {
        unsigned a[4];
        fa_as_a(c, kstep, a);
        for (int u = 0; u < HD / 8; ++u)
            mma_bf16(acc[u], a, tile[u * 8 + g][kstep * 8 + t], tile[u * 8 + g][kstep * 8 + 4 + t]);
    }
}

// A warp's 16 rows r0 = first + g, r1 = r0 + 8 of one head as A fragments (rows past N: 0).
template <int HD>
__device__ __forceinline__ void fa_load_a(unsigned (&a)[HD / 16][4], const bf16_t* src, long stride,
                                          int r0, int r1, int N, int t) {
    for (int kk = 0; kk < HD / 16; ++kk) {
        int c = kk * 16 + t * 2;
        a[kk][0] = r0 < N ? ld_pair(src + r0 * stride + c) : 0u;
        a[kk][1] = r1 < N ? ld_pair(src + r1 * stride + c) : 0u;
        a[kk][2] = r0 < N ? ld_pair(src + r0 * stride + c + 8) : 0u;
        a[kk][3] = r1 < N ? ld_pair(src + r1 * stride + c + 8) : 0u;
    }
}

// An accumulator's rows r0, r1 (those below N) times `scale`, into a head's columns.
template <int HD>
__device__ __forceinline__ void fa_store(bf16_t* dst, long stride, const float (&acc)[HD / 8][4],
                                         int r0, int r1, int N, int t, float s0, float s1) {
    for (int u = 0; u < HD / 8; ++u) {
        int c = u * 8 + t * 2;
        if (r0 < N) *(unsigned*)(dst + r0 * stride + c) = pack_bf16(acc[u][0] * s0, acc[u][1] * s0);
        if (r1 < N) *(unsigned*)(dst + r1 * stride + c) = pack_bf16(acc[u][2] * s1, acc[u][3] * s1);
    }
}

// PF: fetch the next tile during this tile's products (more registers, fewer warps per SM);
// otherwise each tile's loads are all issued at once at the top of its step.
template <int HD, bool PF>
__device__ __forceinline__ void flash_fwd_k(const bf16_t* qkv, bf16_t* out, float* lse, int N,
                                            int H, float scale_log2) {
    __shared__ fa_rows<HD> ks;  // keys
    __shared__ fa_cols<HD> vt;  // values, transposed
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const long stride = 3L * H * HD;
    const bf16_t* base = qkv + (long)b * N * stride;
    const int r0 = blockIdx.x * 64 + warp * 16 + g, r1 = r0 + 8;
    unsigned qa[HD / 16][4];
    fa_load_a<HD>(qa, base + h * HD, stride, r0, r1, N, t);
    float m0 = FA_NEG_INF, m1 = m0, l0 = 0.f, l1 = 0.f;
    float o[HD / 8][4];
    for (int u = 0; u < HD / 8; ++u) o[u][0] = o[u][1] = o[u][2] = o[u][3] = 0.f;
    const bf16_t* kbase = base + (H + h) * HD;
    const bf16_t* vbase = base + (2 * H + h) * HD;
    fa_stage<HD> sk, sv;
    if (PF) {
        fa_fetch<HD>(sk, kbase, stride, 0, N);
        fa_fetch<HD>(sv, vbase, stride, 0, N);
    }
    for (int j0 = 0; j0 < N; j0 += FA_KT) {
        __syncthreads();
        if (!PF) {
            fa_fetch<HD>(sk, kbase, stride, j0, N);
            fa_fetch<HD>(sv, vbase, stride, j0, N);
        }
        fa_put_rows<HD>(ks, sk);
        fa_put_cols<HD>(vt, sv);
        __syncthreads();
        if (PF && j0 + FA_KT < N) {  // the next tile's loads, in flight during this tile's products
            fa_fetch<HD>(sk, kbase, stride, j0 + FA_KT, N);
            fa_fetch<HD>(sv, vbase, stride, j0 + FA_KT, N);
        }
        float s[FA_KT / 8][4];
        fa_products<HD>(s, qa, ks, g, t);
        float mx0 = m0, mx1 = m1;
        if (j0 + FA_KT <= N)
            fa_scale(s, scale_log2);
        else
            fa_scale_mask(s, j0, N, t, scale_log2);
        fa_row_max(s, mx0, mx1);
        float c0 = exp2f(m0 - mx0), c1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        float p0 = 0.f, p1 = 0.f;
        for (int nt = 0; nt < FA_KT / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - m0);
            s[nt][1] = exp2f(s[nt][1] - m0);
            s[nt][2] = exp2f(s[nt][2] - m1);
            s[nt][3] = exp2f(s[nt][3] - m1);
            p0 += s[nt][0] + s[nt][1];
            p1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + p0;
        l1 = l1 * c1 + p1;
        for (int u = 0; u < HD / 8; ++u) {
            o[u][0] *= c0;
            o[u][1] *= c0;
            o[u][2] *= c1;
            o[u][3] *= c1;
        }
        fa_accumulate<HD>(o, s, vt, g, t);
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    fa_store<HD>(out + (long)b * N * H * HD + h * HD, (long)H * HD, o, r0, r1, N, t, 1.f / l0, 1.f / l1);
    // Each query's log-sum-exp (log2 domain, [B, H, N]), for the backward's dq kernel.
    if (t == 0) {
        const long row_at = ((long)b * H + h) * N;
        if (r0 < N) lse[row_at + r0] = m0 + log2f(l0);
        if (r1 < N) lse[row_at + r1] = m1 + log2f(l1);
    }
}
// The launch bounds last: ptxas's own choice of registers for all but flash_fwd_32_pf, which
// spilled 8 bytes at the 96 it chose (with 4 blocks per SM asked: 121, no spill). Asking for 1
// block per SM is not the same as asking nothing: flash_fwd_32 then took 109 registers, not 80.
#define FLASH_FWD(NAME, HD, PF, ...)                                                           \
extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME(const bf16_t* qkv,              \
        bf16_t* out, float* lse, int N, int H, float scale_log2) {                             \
    flash_fwd_k<HD, PF>(qkv, out, lse, N, H, scale_log2); }
FLASH_FWD(flash_fwd_32, 32, false, FA_THREADS)
FLASH_FWD(flash_fwd_64, 64, false, FA_THREADS)
FLASH_FWD(flash_fwd_32_pf, 32, true, FA_THREADS, 4)
FLASH_FWD(flash_fwd_64_pf, 64, true, FA_THREADS)
// Flash attention backward (icefm_model::fused::FlashAttentionGrad): from qkv, the forward's
// output O and its gradient dO ([B, N, H·HD], bf16) to dqkv in qkv's own layout, with no N × N
// matrix in memory and no atomics, in two kernels on the forward's tiling:
//   flash_bwd_dq: per 64 queries (4 warps × 16 in registers): a first pass over the keys for
//     each query's log-sum-exp (log2 domain; written for the second kernel with D = Σ dO·O),
//     a second for dP = dO·vᵀ, dS = P ∘ (dP − D) and dq = scale · dS·k;
//   flash_bwd_dkv: per 64 keys (4 warps × 16 in registers), over all queries: Pᵀ from the
//     saved log-sum-exp, dv = Pᵀ·dO, dPᵀ = v·dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D), dk = scale · dSᵀ·q.
// Products on tensor cores (bf16 operands, f32 accumulators) with the C-to-A register reuse of
// the forward; the operands that enter as B go through shared memory, row-major when their
// pairs run along the head width and transposed when they run along the tokens.
__device__ __forceinline__ float2 unpack_bf16(unsigned u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

// LSE: the forward's log-sum-exp is in `lse` already, so pass 1 is skipped.
template <int HD, bool PF, bool LSE>
__device__ __forceinline__ void flash_bwd_dq_k(const bf16_t* qkv, const bf16_t* o, const bf16_t* dout,
        bf16_t* dqkv, float* lse, float* dvec, int N, int H, float scale_log2, float scale) {
    __shared__ fa_rows<HD> ks;  // keys
    __shared__ fa_rows<HD> vs;  // values
    __shared__ fa_cols<HD> kt;  // keys, transposed
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const long stride = 3L * H * HD, ostride = (long)H * HD;
    const bf16_t* base = qkv + (long)b * N * stride;
    const bf16_t* obase = o + (long)b * N * ostride + h * HD;
    const bf16_t* gbase = dout + (long)b * N * ostride + h * HD;
    const int r0 = blockIdx.x * 64 + warp * 16 + g, r1 = r0 + 8;
    unsigned qa[HD / 16][4], da[HD / 16][4], oa[HD / 16][4];
    fa_load_a<HD>(qa, base + h * HD, stride, r0, r1, N, t);
    fa_load_a<HD>(da, gbase, ostride, r0, r1, N, t);
    fa_load_a<HD>(oa, obase, ostride, r0, r1, N, t);
    // D = Σ dO·O of each row: the four lanes of a row hold all its values between them.
    float d0 = 0.f, d1 = 0.f;
    for (int kk = 0; kk < HD / 16; ++kk)
        for (int r = 0; r < 4; ++r) {
            float2 ov = unpack_bf16(oa[kk][r]), gv = unpack_bf16(da[kk][r]);
            if (r % 2 == 0) d0 += ov.x * gv.x + ov.y * gv.y; else d1 += ov.x * gv.x + ov.y * gv.y;
        }
    d0 = quad_sum(d0);
    d1 = quad_sum(d1);
    const bf16_t* kbase = base + (H + h) * HD;
    const bf16_t* vbase = base + (2 * H + h) * HD;
    fa_stage<HD> sk, sv;
    const long row_at = ((long)b * H + h) * N;
    float lse0, lse1;
    if (LSE) {
        lse0 = r0 < N ? lse[row_at + r0] : 0.f;
        lse1 = r1 < N ? lse[row_at + r1] : 0.f;
    } else {
        // Pass 1: each query's log-sum-exp of its scaled scores (log2 domain).
        if (PF) fa_fetch<HD>(sk, kbase, stride, 0, N);
        float m0 = FA_NEG_INF, m1 = m0, l0 = 0.f, l1 = 0.f;
        for (int j0 = 0; j0 < N; j0 += FA_KT) {
            __syncthreads();
            if (!PF) fa_fetch<HD>(sk, kbase, stride, j0, N);
            fa_put_rows<HD>(ks, sk);
            __syncthreads();
            if (PF && j0 + FA_KT < N) fa_fetch<HD>(sk, kbase, stride, j0 + FA_KT, N);
            float s[FA_KT / 8][4];
            fa_products<HD>(s, qa, ks, g, t);
            float mx0 = m0, mx1 = m1;
            fa_scale_mask(s, j0, N, t, scale_log2);
            fa_row_max(s, mx0, mx1);
            float p0 = 0.f, p1 = 0.f;
            for (int nt = 0; nt < FA_KT / 8; ++nt) {
                p0 += exp2f(s[nt][0] - mx0) + exp2f(s[nt][1] - mx0);
                p1 += exp2f(s[nt][2] - mx1) + exp2f(s[nt][3] - mx1);
            }
            l0 = l0 * exp2f(m0 - mx0) + p0;
            l1 = l1 * exp2f(m1 - mx1) + p1;
            m0 = mx0;
            m1 = mx1;
        }
        lse0 = m0 + log2f(quad_sum(l0));
        lse1 = m1 + log2f(quad_sum(l1));
    }
    if (t == 0) {
        if (r0 < N) {
            if (!LSE) lse[row_at + r0] = lse0;
            dvec[row_at + r0] = d0;
        }
        if (r1 < N) {
            if (!LSE) lse[row_at + r1] = lse1;
            dvec[row_at + r1] = d1;
        }
    }
    // Pass 2: dq = scale · Σ_keys P ∘ (dO·vᵀ − D) · k.
    float dq[HD / 8][4];
    for (int u = 0; u < HD / 8; ++u) dq[u][0] = dq[u][1] = dq[u][2] = dq[u][3] = 0.f;
    if (PF) {
        fa_fetch<HD>(sk, kbase, stride, 0, N);
        fa_fetch<HD>(sv, vbase, stride, 0, N);
    }
    for (int j0 = 0; j0 < N; j0 += FA_KT) {
        __syncthreads();
        if (!PF) {
            fa_fetch<HD>(sk, kbase, stride, j0, N);
            fa_fetch<HD>(sv, vbase, stride, j0, N);
        }
        fa_put_rows<HD>(ks, sk);
        fa_put_cols<HD>(kt, sk);
        fa_put_rows<HD>(vs, sv);
        __syncthreads();
        if (PF && j0 + FA_KT < N) {
            fa_fetch<HD>(sk, kbase, stride, j0 + FA_KT, N);
            fa_fetch<HD>(sv, vbase, stride, j0 + FA_KT, N);
        }
        float s[FA_KT / 8][4], dp[FA_KT / 8][4];
        fa_products<HD>(s, qa, ks, g, t);
        fa_products<HD>(dp, da, vs, g, t);
        fa_scale_mask(s, j0, N, t, scale_log2);
        for (int nt = 0; nt < FA_KT / 8; ++nt)
            for (int e = 0; e < 4; ++e)  // dS; masked keys have P = exp2(-inf) = 0
                s[nt][e] = exp2f(s[nt][e] - (e < 2 ? lse0 : lse1)) * (dp[nt][e] - (e < 2 ? d0 : d1));
        fa_accumulate<HD>(dq, s, kt, g, t);
    }
    fa_store<HD>(dqkv + (long)b * N * stride + h * HD, stride, dq, r0, r1, N, t, scale, scale);
}

// The forward's log-sum-exp and D of query q0 + threadIdx.x (threads below FA_KT; a query past N
// gets an infinite log-sum-exp, so that its P is 0).
__device__ __forceinline__ void fa_fetch_stats(float& l, float& d, const float* lse,
                                               const float* dvec, long row_at, int q0, int N) {
    if (threadIdx.x < FA_KT) {
        bool ok = q0 + (int)threadIdx.x < N;
        l = ok ? lse[row_at + q0 + threadIdx.x] : __int_as_float(0x7f800000);
        d = ok ? dvec[row_at + q0 + threadIdx.x] : 0.f;
    }
}

template <int HD, bool PF>
__device__ __forceinline__ void flash_bwd_dkv_k(const bf16_t* qkv, const bf16_t* dout,
        const float* lse, const float* dvec, bf16_t* dqkv, int N, int H, float scale_log2,
        float scale) {
    __shared__ fa_rows<HD> qs;  // queries
    __shared__ fa_cols<HD> qt;  // queries, transposed
    __shared__ fa_rows<HD> gs;  // dO
    __shared__ fa_cols<HD> gt;  // dO, transposed
    __shared__ float ls[FA_KT], dl[FA_KT];
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const long stride = 3L * H * HD, ostride = (long)H * HD;
    const bf16_t* base = qkv + (long)b * N * stride;
    const bf16_t* gbase = dout + (long)b * N * ostride + h * HD;
    const long row_at = ((long)b * H + h) * N;
    const int k0 = blockIdx.x * 64 + warp * 16 + g, k1 = k0 + 8;
    unsigned ka[HD / 16][4], va[HD / 16][4];
    fa_load_a<HD>(ka, base + (H + h) * HD, stride, k0, k1, N, t);
    fa_load_a<HD>(va, base + (2 * H + h) * HD, stride, k0, k1, N, t);
    float dk[HD / 8][4], dv[HD / 8][4];
    for (int u = 0; u < HD / 8; ++u)
        for (int e = 0; e < 4; ++e) dk[u][e] = dv[u][e] = 0.f;
    const bf16_t* qbase = base + h * HD;
    fa_stage<HD> sq, sg;
    float lnext = 0.f, dnext = 0.f;  // this thread's entry of the next tile's statistics
    if (PF) {
        fa_fetch<HD>(sq, qbase, stride, 0, N);
        fa_fetch<HD>(sg, gbase, ostride, 0, N);
        fa_fetch_stats(lnext, dnext, lse, dvec, row_at, 0, N);
    }
    for (int q0 = 0; q0 < N; q0 += FA_KT) {
        __syncthreads();
        if (!PF) {
            fa_fetch<HD>(sq, qbase, stride, q0, N);
            fa_fetch<HD>(sg, gbase, ostride, q0, N);
            fa_fetch_stats(lnext, dnext, lse, dvec, row_at, q0, N);
        }
        fa_put_rows<HD>(qs, sq);
        fa_put_cols<HD>(qt, sq);
        fa_put_rows<HD>(gs, sg);
        fa_put_cols<HD>(gt, sg);
        if (threadIdx.x < FA_KT) {
            ls[threadIdx.x] = lnext;
            dl[threadIdx.x] = dnext;
        }
        __syncthreads();
        if (PF && q0 + FA_KT < N) {
            fa_fetch<HD>(sq, qbase, stride, q0 + FA_KT, N);
            fa_fetch<HD>(sg, gbase, ostride, q0 + FA_KT, N);
            fa_fetch_stats(lnext, dnext, lse, dvec, row_at, q0 + FA_KT, N);
        }
        float p[FA_KT / 8][4], ds[FA_KT / 8][4];
        fa_products<HD>(p, ka, qs, g, t);
        fa_products<HD>(ds, va, gs, g, t);
        for (int nt = 0; nt < FA_KT / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                int q = nt * 8 + t * 2 + (e & 1);
                p[nt][e] = exp2f(p[nt][e] * scale_log2 - ls[q]);  // Pᵀ; 0 past N (ls = inf)
                ds[nt][e] = p[nt][e] * (ds[nt][e] - dl[q]);       // dSᵀ
            }
        fa_accumulate<HD>(dv, p, gt, g, t);
        fa_accumulate<HD>(dk, ds, qt, g, t);
    }
    bf16_t* dbase = dqkv + (long)b * N * stride;
    fa_store<HD>(dbase + (H + h) * HD, stride, dk, k0, k1, N, t, scale, scale);
    fa_store<HD>(dbase + (2 * H + h) * HD, stride, dv, k0, k1, N, t, 1.f, 1.f);
}
#define FLASH_BWD_DQ(SUFFIX, HD, PF, LSE)                                                     \
extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_bwd_dq_##SUFFIX(                \
        const bf16_t* qkv, const bf16_t* o, const bf16_t* dout, bf16_t* dqkv, float* lse,      \
        float* dvec, int N, int H, float scale_log2, float scale) {                            \
    flash_bwd_dq_k<HD, PF, LSE>(qkv, o, dout, dqkv, lse, dvec, N, H, scale_log2, scale); }
#define FLASH_BWD(SUFFIX, HD, PF)                                                             \
FLASH_BWD_DQ(SUFFIX, HD, PF, false)                                                           \
FLASH_BWD_DQ(lse_##SUFFIX, HD, PF, true)                                                      \
extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_bwd_dkv_##SUFFIX(               \
        const bf16_t* qkv, const bf16_t* dout, const float* lse, const float* dvec,            \
        bf16_t* dqkv, int N, int H, float scale_log2, float scale) {                           \
    flash_bwd_dkv_k<HD, PF>(qkv, dout, lse, dvec, dqkv, N, H, scale_log2, scale); }
FLASH_BWD(32, 32, false)
FLASH_BWD(64, 64, false)
FLASH_BWD(32_pf, 32, true)
FLASH_BWD(64_pf, 64, true)
// 3 x 3 im2col on channels-last maps (icefm_model::seg::Im2col3): x [B, H, W, C] →
// cols [B, H, W, 9·C], cols[.., (dy·3 + dx)·C + c] = x[b, y + dy − 1, x + dx − 1, c] (0 outside),
// and its adjoint: each input value the sum of the nine places it was copied to. One thread
// per output value (grid-stride), consecutive threads on consecutive channels.
template <typename T>
__device__ void im2col3_k(const T* x, T* cols, int B, int H, int W, int C) {
    long total = (long)B * H * W * 9 * C;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        int c = (int)(i % C);
        long r = i / C;
        int tap = (int)(r % 9);
        long p = r / 9;
        int px = (int)(p % W), py = (int)((p / W) % H);
        long b = p / ((long)W * H);
        int sy = py + tap / 3 - 1, sx = px + tap % 3 - 1;
        float v = (sy >= 0 && sy < H && sx >= 0 && sx < W) ? ld(x, ((b * H + sy) * W + sx) * C + c) : 0.f;
        st(cols, i, v);
    }
}
template <typename T>
__device__ void col2im3_k(const T* g, T* dx, int B, int H, int W, int C) {
    long total = (long)B * H * W * C;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        int c = (int)(i % C);
        long p = i / C;
        int px = (int)(p % W), py = (int)((p / W) % H);
        long b = p / ((long)W * H);
        float acc = 0.f;
        for (int tap = 0; tap < 9; ++tap) {
            int ty = py - tap / 3 + 1, tx = px - tap % 3 + 1;
            if (ty >= 0 && ty < H && tx >= 0 && tx < W)
                acc += ld(g, (((b * H + ty) * W + tx) * 9 + tap) * C + c);
        }
        st(dx, i, acc);
    }
}
extern "C" __global__ void im2col3_f32(const float* x, float* y, int B, int H, int W, int C) {
    im2col3_k<float>(x, y, B, H, W, C);
}
extern "C" __global__ void im2col3_bf16(const bf16_t* x, bf16_t* y, int B, int H, int W, int C) {
    im2col3_k<bf16_t>(x, y, B, H, W, C);
}
extern "C" __global__ void col2im3_f32(const float* g, float* y, int B, int H, int W, int C) {
    col2im3_k<float>(g, y, B, H, W, C);
}
extern "C" __global__ void col2im3_bf16(const bf16_t* g, bf16_t* y, int B, int H, int W, int C) {
    col2im3_k<bf16_t>(g, y, B, H, W, C);
}
"#;

/// Values made on first use and kept for the process, by key (a device, a kernel).
struct Memo<K, V>(OnceLock<std::sync::Mutex<Vec<(K, V)>>>);

impl<K: PartialEq, V: Clone> Memo<K, V> {
    const fn new() -> Self {
        Self(OnceLock::new())
    }

    /// The value for `key`, made by `make` the first time (an error is returned, not kept).
    fn get_or_make(&self, key: K, make: impl FnOnce() -> Result<V>) -> Result<V> {
        let mut memo = self
            .0
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| candle_core::Error::Msg("icefm kernels: a thread panicked".into()))?;
        if let Some((_, v)) = memo.iter().find(|(k, _)| *k == key) {
            return Ok(v.clone());
        }
        let v = make()?;
        memo.push((key, v.clone()));
        Ok(v)
    }
}

/// The PTX for this process's device, compiled once.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let r = PTX.get_or_init(|| {
        let (major, minor) = dev
            .cuda_stream()
            .context()
            .compute_capability()
            .map_err(|e| e.to_string())?;
        let arch = match (major, minor) {
            (9, 0) => "compute_90",
            (8, 9) => "compute_89",
            (8, 6) => "compute_86",
            (8, 0) => "compute_80",
            (10, 0) => "compute_100",
            (12, 0) => "compute_120",
            _ => "compute_80",
        };
        let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ..Default::default()
        };
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling icefm's CUDA kernels: {e}"))
    });
    r.as_deref().map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, "icefm_kernels", ptx(dev)?)?
        .into_cuda_function())
}

/// The contiguous part of `s` that `l` describes.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("icefm kernels need contiguous input".into()))?;
    Ok(s.slice(a..b))
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(v) => view(v, l),
        _ => candle_core::bail!("{what} must be f32, got {:?}", s.dtype()),
    }
}

/// Pairs per lane of the register-resident layer-norm kernels for rows of `d` values starting
/// at element `offset` (`None`: the general kernel).
fn ln_pairs(d: usize, offset: usize) -> Option<usize> {
    let p = d / 64;
    (d.is_multiple_of(64) && offset.is_multiple_of(2) && [3, 4, 6, 8, 12, 16, 20].contains(&p))
        .then_some(p)
}

/// 16-byte loads per lane of the bf16 layer-norm kernels with wide accesses (`ln_*_bf16_q{Q}`),
/// where they are switched on (`fused::ln_v8`) and apply: bf16 rows of 512 to 1280 values in
/// steps of 256, the bf16 operands (`halves`) at multiples of 8 elements, the f32 ones
/// (`floats`) at multiples of 4.
fn ln_quads<T: Elem>(d: usize, halves: &[&Layout], floats: &[&Layout]) -> Option<usize> {
    let q = d / 256;
    (crate::fused::ln_v8()
        && T::SUFFIX == "bf16"
        && d.is_multiple_of(256)
        && (2..=5).contains(&q)
        && halves.iter().all(|l| l.start_offset().is_multiple_of(8))
        && floats.iter().all(|l| l.start_offset().is_multiple_of(4)))
    .then_some(q)
}

/// A layer-norm kernel `base` and its launch: the wide-access one where [`ln_quads`] allows,
/// else the register-resident one (`pairs`) or the general one, a warp per row.
fn ln_kernel<T: Elem>(
    dev: &CudaDevice,
    base: &str,
    pairs: Option<String>,
    (rows, d): (usize, usize),
    halves: &[&Layout],
    floats: &[&Layout],
) -> Result<(CudaFunction, LaunchConfig)> {
    Ok(match ln_quads::<T>(d, halves, floats) {
        Some(q) => {
            let name = format!("{base}_bf16_q{q}");
            let f = func(dev, &name)?;
            let cfg = persistent_row_cfg(dev, &f, &name, rows)?;
            (f, cfg)
        }
        None => (
            func(dev, &kernel_name(base, T::SUFFIX, pairs))?,
            row_cfg(rows),
        ),
    })
}

/// Blocks of 256 threads (8 warps) for kernel `name` (`f`), whose warps stride over `rows`
/// rows: as many as are resident on the device at once (asked of the driver once per kernel
/// and device), and no more than the rows need.
fn persistent_row_cfg(
    dev: &CudaDevice,
    f: &CudaFunction,
    name: &str,
    rows: usize,
) -> Result<LaunchConfig> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    static RESIDENT: Memo<(DeviceId, String), usize> = Memo::new();
    let resident = RESIDENT.get_or_make((dev.id(), name.to_string()), || {
        let sms = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
            .w()?;
        Ok(sms.max(1) as usize * per_sm.max(1) as usize)
    })?;
    let blocks = resident.min(rows.div_ceil(8).max(1));
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Values per lane of the register-resident softmax kernels (`None`: the general kernel).
fn softmax_values(d: usize) -> Option<usize> {
    let need = d.div_ceil(32);
    [1, 2, 4, 5, 8, 12, 16, 19, 20, 24, 32]
        .into_iter()
        .find(|&v| v >= need)
}

/// `base_SUFFIX`, or its register-resident variant `base_SUFFIX_{tag}`.
fn kernel_name(base: &str, suffix: &str, variant: Option<String>) -> String {
    match variant {
        Some(v) => format!("{base}_{suffix}_{v}"),
        None => format!("{base}_{suffix}"),
    }
}

/// One warp per row, 8 rows per block.
fn row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dims(rows: usize, d: usize) -> Result<(i32, i32)> {
    let r = i32::try_from(rows).map_err(|_| candle_core::Error::Msg("too many rows".into()))?;
    let c = i32::try_from(d).map_err(|_| candle_core::Error::Msg("rows too long".into()))?;
    Ok((r, c))
}

/// Output storage of a dtype-generic row kernel.
fn wrap(dev: &CudaDevice, slice: CudaStorageSlice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

/// Typed access to a storage slice.
trait Elem: DeviceRepr + ValidAsZeroBits + Sized {
    const SUFFIX: &'static str;
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<Self>>;
    fn wrap(s: CudaSlice<Self>) -> CudaStorageSlice;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<f32>> {
        match s {
            CudaStorageSlice::F32(v) => Ok(v),
            _ => candle_core::bail!("icefm kernels: operands' dtypes differ (expected f32)"),
        }
    }
    fn wrap(s: CudaSlice<f32>) -> CudaStorageSlice {
        CudaStorageSlice::F32(s)
    }
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<half::bf16>> {
        match s {
            CudaStorageSlice::BF16(v) => Ok(v),
            _ => candle_core::bail!("icefm kernels: operands' dtypes differ (expected bf16)"),
        }
    }
    fn wrap(s: CudaSlice<half::bf16>) -> CudaStorageSlice {
        CudaStorageSlice::BF16(s)
    }
}

/// Run `f` with the element type of `s` (f32 or bf16).
macro_rules! with_elem {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match &$s.slice {
            CudaStorageSlice::F32(_) => $f::<f32>($($arg),*),
            CudaStorageSlice::BF16(_) => $f::<half::bf16>($($arg),*),
            _ => Err(candle_core::Error::Msg(format!(
                "icefm kernels take f32 or bf16, got {:?}",
                $s.dtype()
            ))),
        }
    };
}

fn typed<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    view(T::slice(&s.slice)?, l)
}

/// Fused layer-norm forward.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let w = f32_view(s2, l2, "layer norm weight")?;
        let b = f32_view(s3, l3, "layer norm bias")?;
        let (r, c) = dims(rows, d)?;
        let aligned = l2.start_offset().is_multiple_of(2) && l3.start_offset().is_multiple_of(2);
        let pairs = ln_pairs(d, l1.start_offset())
            .filter(|_| aligned)
            .map(|p| format!("p{p}"));
        let (f, cfg) = ln_kernel::<T>(dev, "ln_fwd", pairs, (rows, d), &[l1], &[l2, l3])?;
        // SAFETY: every element is written by the kernel before it is read.
        let y = unsafe { dev.alloc::<T>(rows * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&w).arg(&b).arg(&y).arg(&r).arg(&c).arg(&eps);
        // SAFETY: arguments match the kernel's signature; sizes are rows × d.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, d, eps))?;
    Ok(wrap(&s1.device, slice))
}

/// Fused layer-norm backward for the input.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_grad_x(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let w = f32_view(s2, l2, "layer norm weight")?;
        let dy = typed::<T>(s3, l3)?;
        let (r, c) = dims(rows, d)?;
        let pairs = (ln_pairs(d, l1.start_offset()).is_some()
            && l2.start_offset().is_multiple_of(2)
            && l3.start_offset().is_multiple_of(2))
        .then(|| ln_pairs(d, 0))
        .flatten()
        .map(|p| format!("p{p}"));
        let (f, cfg) = ln_kernel::<T>(dev, "ln_grad_x", pairs, (rows, d), &[l1, l3], &[l2])?;
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(rows * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(&w)
            .arg(&dy)
            .arg(&dx)
            .arg(&r)
            .arg(&c)
            .arg(&eps);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(T::wrap(dx))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, d, eps))?;
    Ok(wrap(&s1.device, slice))
}

/// Fused layer-norm backward for scale and shift: `[2, P, d]` f32 partial sums and `P`.
pub fn layer_norm_grad_wb(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaStorage, usize)> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        rows: usize,
        d: usize,
        eps: f32,
        out: &CudaSlice<f32>,
        p: usize,
    ) -> Result<()> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let dy = typed::<T>(s2, l2)?;
        let (r, c) = dims(rows, d)?;
        let rpb =
            i32::try_from(rows.div_ceil(p)).map_err(|_| candle_core::Error::Msg("rows".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (p as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (2 * d * 4) as u32,
        };
        let pairs = (ln_pairs(d, l1.start_offset()).is_some()
            && l2.start_offset().is_multiple_of(2))
        .then(|| ln_pairs(d, 0))
        .flatten()
        .map(|p| format!("p{p}"));
        let f = func(dev, &kernel_name("ln_grad_wb", T::SUFFIX, pairs))?;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(&dy)
            .arg(out)
            .arg(&r)
            .arg(&c)
            .arg(&eps)
            .arg(&rpb);
        // SAFETY: arguments match the kernel's signature; shared memory is 2·d floats, under
        // 48 KiB for d ≤ 6144.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(())
    }
    if d > 6144 {
        candle_core::bail!("fused layer norm backward: rows of {d} values are over 6144");
    }
    let dev = &s1.device;
    // Enough blocks to fill the device, each over at least 32 rows.
    let p = rows.div_ceil(32).clamp(1, 1024);
    let p = rows.div_ceil(rows.div_ceil(p)).max(1);
    // SAFETY: every element is written by the kernel (each block writes its whole slice).
    let out = unsafe { dev.alloc::<f32>(2 * p * d)? };
    with_elem!(s1, go(s1, l1, s2, l2, rows, d, eps, &out, p))?;
    Ok((wrap(dev, CudaStorageSlice::F32(out)), p))
}

/// Fused softmax forward over rows.
/// Fused softmax forward over rows, over their first `valid` values (the rest get 0).
pub fn softmax_fwd(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    d: usize,
    valid: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s: &CudaStorage,
        l: &Layout,
        rows: usize,
        d: usize,
        valid: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let (r, c) = dims(rows, d)?;
        let v = i32::try_from(valid.clamp(1, d))
            .map_err(|_| candle_core::Error::Msg("rows too long".into()))?;
        let f = func(
            dev,
            &kernel_name(
                "softmax_fwd",
                T::SUFFIX,
                softmax_values(d).map(|v| format!("v{v}")),
            ),
        )?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(rows * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&y).arg(&r).arg(&c).arg(&v);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s, go(s, l, rows, d, valid))?;
    Ok(wrap(&s.device, slice))
}

/// Fused softmax backward: `(y, dy) → dx`.
pub fn softmax_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    d: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        rows: usize,
        d: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let y = typed::<T>(s1, l1)?;
        let dy = typed::<T>(s2, l2)?;
        let (r, c) = dims(rows, d)?;
        let f = func(
            dev,
            &kernel_name(
                "softmax_grad",
                T::SUFFIX,
                softmax_values(d).map(|v| format!("v{v}")),
            ),
        )?;
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(rows * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&y).arg(&dy).arg(&dx).arg(&r).arg(&c);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(dx))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, rows, d))?;
    Ok(wrap(&s1.device, slice))
}

/// Grid for an elementwise kernel over `n` values.
fn elem_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fused bias add over rows of `c`.
pub fn bias_add(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    c: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        rows: usize,
        c: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let b = f32_view(s2, l2, "bias")?;
        let n = rows * c;
        let (n_i, c_i) = (
            n as i64,
            i32::try_from(c).map_err(|_| candle_core::Error::Msg("rows too long".into()))?,
        );
        let f = func(dev, &format!("bias_add_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&b).arg(&y).arg(&n_i).arg(&c_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, rows, c))?;
    Ok(wrap(&s1.device, slice))
}

/// Partial column sums `[P, c]` (f32) of `[rows, c]`, and `P`.
pub fn column_sums(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    c: usize,
) -> Result<(CudaStorage, usize)> {
    fn go<T: Elem>(
        s: &CudaStorage,
        l: &Layout,
        rows: usize,
        c: usize,
        out: &CudaSlice<f32>,
        p: usize,
    ) -> Result<()> {
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let (r, c_i) = dims(rows, c)?;
        let rpb =
            i32::try_from(rows.div_ceil(p)).map_err(|_| candle_core::Error::Msg("rows".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(32) as u32, p as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = func(dev, &format!("column_sums_{}", T::SUFFIX))?;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(out).arg(&r).arg(&c_i).arg(&rpb);
        // SAFETY: arguments match the kernel's signature; the grid covers every (P, c) output.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(())
    }
    let dev = &s.device;
    // About 64 rows per block, at most 256 row blocks.
    let p = rows.div_ceil(64).clamp(1, 256);
    let p = rows.div_ceil(rows.div_ceil(p)).max(1);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(p * c)? };
    with_elem!(s, go(s, l, rows, c, &out, p))?;
    Ok((wrap(dev, CudaStorageSlice::F32(out)), p))
}

/// Fused exact GELU.
pub fn gelu_fwd(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    fn go<T: Elem>(s: &CudaStorage, l: &Layout) -> Result<CudaStorageSlice> {
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let n = l.shape().elem_count();
        let n_i = n as i64;
        let f = func(dev, &format!("gelu_fwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&y).arg(&n_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s, go(s, l))?;
    Ok(wrap(&s.device, slice))
}

/// Fused GELU backward: `(x, dy) → dx`.
pub fn gelu_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let g = typed::<T>(s2, l2)?;
        let n = l1.shape().elem_count();
        let n_i = n as i64;
        let f = func(dev, &format!("gelu_grad_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&g).arg(&dx).arg(&n_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(dx))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2))?;
    Ok(wrap(&s1.device, slice))
}

/// Grid of the row × column element kernels: 256 columns (or column pairs) per block, blocks
/// over rows in turn.
fn rowcol_cfg(rows: usize, c: usize, pairs: bool) -> LaunchConfig {
    let per_thread = if pairs { 2 } else { 1 };
    LaunchConfig {
        grid_dim: (
            c.div_ceil(256 * per_thread).clamp(1, 65535) as u32,
            rows.clamp(1, 8192) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fused `gelu(x + b)` over rows of `c` (`b` f32).
pub fn bias_gelu_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    c: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        rows: usize,
        c: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let b = f32_view(s2, l2, "bias")?;
        let (r, c_i) = dims(rows, c)?;
        let f = func(dev, &format!("bias_gelu_fwd_{}", T::SUFFIX))?;
        let pairs = c.is_multiple_of(2) && l1.start_offset().is_multiple_of(2);
        let pairs_i = i32::from(pairs);
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(rows * c)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&b).arg(&y).arg(&r).arg(&c_i).arg(&pairs_i);
        // SAFETY: arguments match the kernel's signature; the grid strides over every row;
        // pairs only where every row of x and y starts at an even element (8- or 4-byte
        // aligned: allocations are 256-byte aligned).
        unsafe { lb.launch(rowcol_cfg(rows, c, pairs)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, rows, c))?;
    Ok(wrap(&s1.device, slice))
}

/// Fused backward of `gelu(x + b)`: `(x, b, dy) → dx` (`b` f32, `dy` in `x`'s dtype).
#[allow(clippy::too_many_arguments)]
pub fn bias_gelu_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    c: usize,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        rows: usize,
        c: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let b = f32_view(s2, l2, "bias")?;
        let g = typed::<T>(s3, l3)?;
        let (r, c_i) = dims(rows, c)?;
        let f = func(dev, &format!("bias_gelu_grad_{}", T::SUFFIX))?;
        let pairs = c.is_multiple_of(2)
            && l1.start_offset().is_multiple_of(2)
            && l3.start_offset().is_multiple_of(2);
        let pairs_i = i32::from(pairs);
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(rows * c)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(&b)
            .arg(&g)
            .arg(&dx)
            .arg(&r)
            .arg(&c_i)
            .arg(&pairs_i);
        // SAFETY: as in `bias_gelu_fwd`, with `dy` checked as well.
        unsafe { lb.launch(rowcol_cfg(rows, c, pairs)) }.w()?;
        Ok(T::wrap(dx))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, c))?;
    Ok(wrap(&s1.device, slice))
}

/// Sum of squares of many contiguous f32 tensors on one CUDA device, in one launch (the
/// global gradient norm of clipping, with one read back).
pub fn sum_squares(tensors: &[&Tensor]) -> Result<f64> {
    let Some(first) = tensors.first() else {
        return Ok(0.0);
    };
    let dev = first.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    for t in tensors {
        if t.dtype() != candle_core::DType::F32 || !t.is_contiguous() {
            candle_core::bail!("sum_squares takes contiguous f32 tensors");
        }
    }
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut table = Vec::with_capacity(2 * tensors.len());
    let mut syncs = Vec::new();
    let mut largest = 0usize;
    for ((storage, layout), t) in guards.iter().zip(tensors) {
        let candle_core::Storage::Cuda(cs) = &**storage else {
            candle_core::bail!("sum_squares: a tensor is not on the CUDA device");
        };
        let (ptr, sync) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
        syncs.push(sync);
        table.push(ptr + (layout.start_offset() * 4) as u64);
        table.push(t.elem_count() as u64);
        largest = largest.max(t.elem_count());
    }
    let table_dev = dev.clone_htod(&table)?;
    let out = dev.alloc_zeros::<f64>(1)?;
    let cfg = LaunchConfig {
        grid_dim: (
            largest.div_ceil(256 * 8).clamp(1, 128) as u32,
            u32::try_from(tensors.len()).map_err(|_| candle_core::Error::Msg("tensors".into()))?,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = func(&dev, "sum_squares_multi")?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(&table_dev).arg(&out);
    // SAFETY: the table holds live device pointers (storages locked above) of `n` f32 each.
    unsafe { lb.launch(cfg) }.w()?;
    drop(syncs);
    drop(guards);
    let v = dev.clone_dtoh(&out)?;
    Ok(v.first().copied().unwrap_or(0.0))
}

/// Per-patch masked norm-pix loss `[rows]` of `[rows, p]` predictions, targets and weights.
#[allow(clippy::too_many_arguments)]
pub fn norm_pix_loss(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
) -> Result<CudaStorage> {
    npx_launch(s1, l1, s2, l2, s3, l3, rows, p, "norm_pix_loss", rows)
}

/// Gradient of [`norm_pix_loss`] for the predictions, `[rows, p]`; `s3` holds `[rows, p + 1]`
/// weights followed by each patch's incoming gradient.
#[allow(clippy::too_many_arguments)]
pub fn norm_pix_loss_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
) -> Result<CudaStorage> {
    npx_launch(
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        rows,
        p,
        "norm_pix_loss_grad",
        rows * p,
    )
}

#[allow(clippy::too_many_arguments)]
fn npx_launch(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
    kernel: &str,
    out_len: usize,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        rows: usize,
        p: usize,
        kernel: &str,
        out_len: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let pred = typed::<T>(s1, l1)?;
        let t = typed::<T>(s2, l2)?;
        let w = typed::<T>(s3, l3)?;
        let (r, c) = dims(rows, p)?;
        let f = func(dev, &format!("{kernel}_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&pred).arg(&t).arg(&w).arg(&out).arg(&r).arg(&c);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(out))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, p, kernel, out_len))?;
    Ok(wrap(&s1.device, slice))
}

/// Token gather (`scatter` false: `[B, N, D]` → `[B, K, D]`) or its backward scatter
/// (`[B, K, D]` → zero-filled `[B, N, D]`) by `ids` `[B, K]` (u32, distinct per sample).
pub fn move_tokens(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    (b, k, d): (usize, usize, usize),
    n: usize,
    scatter: bool,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        ids: &CudaView<'_, u32>,
        (b, k, d): (usize, usize, usize),
        n: usize,
        scatter: bool,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let out_len = b * if scatter { n } else { k } * d;
        // Zeros where no token lands (a scatter); a gather writes every element.
        let out = dev.alloc_zeros::<T>(out_len)?;
        let (k_i, n_i) = dims(k, n)?;
        let d_i = i32::try_from(d).map_err(|_| candle_core::Error::Msg("width".into()))?;
        let sc = i32::from(scatter);
        let f = func(dev, &format!("move_tokens_{}", T::SUFFIX))?;
        let cfg = LaunchConfig {
            grid_dim: (k as u32, b as u32, 1),
            block_dim: (d.next_power_of_two().clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(ids)
            .arg(&out)
            .arg(&k_i)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&sc);
        // SAFETY: arguments match the kernel's signature; the ids are below n (checked where
        // the index tensor is made).
        unsafe { lb.launch(cfg) }.w()?;
        Ok(T::wrap(out))
    }
    let ids = match &s2.slice {
        CudaStorageSlice::U32(v) => view(v, l2)?,
        _ => candle_core::bail!("token indices must be u32"),
    };
    if k == 0 || b == 0 {
        candle_core::bail!("move_tokens: no tokens");
    }
    let slice = with_elem!(s1, go(s1, l1, &ids, (b, k, d), n, scatter))?;
    Ok(wrap(&s1.device, slice))
}

/// One tensor of a fused AdamW step: weight, moments and gradient (all f32, contiguous, on
/// one CUDA device) and whether it is decayed.
pub struct AdamSlot<'a> {
    /// Weight, updated in place.
    pub w: &'a Tensor,
    /// First moment, updated in place.
    pub m: &'a Tensor,
    /// Second moment, updated in place.
    pub v: &'a Tensor,
    /// Gradient (read).
    pub g: &'a Tensor,
    /// Decoupled weight decay applies.
    pub decay: bool,
}

/// AdamW hyper-parameters of one step (`c1`, `c2` the bias corrections).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub b1: f32,
    /// Second-moment decay.
    pub b2: f32,
    /// `1 − b1^t`.
    pub c1: f32,
    /// `1 − b2^t`.
    pub c2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Weight decay.
    pub wd: f32,
    /// Gradient scale (clipping).
    pub gscale: f32,
}

/// Update every slot in place with one kernel launch.
pub fn adamw_step(slots: &[AdamSlot<'_>], h: AdamStep) -> Result<()> {
    let Some(first) = slots.first() else {
        return Ok(());
    };
    let dev = first.w.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    for s in slots {
        for t in [s.w, s.m, s.v, s.g] {
            if t.dtype() != candle_core::DType::F32 || !t.is_contiguous() {
                candle_core::bail!("fused AdamW takes contiguous f32 tensors");
            }
            if t.elem_count() != s.w.elem_count() {
                candle_core::bail!("fused AdamW: moment or gradient size differs from weight");
            }
        }
    }
    // Hold every storage's read lock while its raw pointer is in use.
    let guards: Vec<_> = slots
        .iter()
        .map(|s| [s.w, s.m, s.v, s.g].map(|t| t.storage_and_layout()))
        .collect();
    let mut table: Vec<u64> = Vec::with_capacity(6 * slots.len());
    let mut syncs = Vec::new();
    let mut largest = 0usize;
    for (s, g) in slots.iter().zip(&guards) {
        for (storage, layout) in g {
            let candle_core::Storage::Cuda(cs) = &**storage else {
                candle_core::bail!("fused AdamW: a tensor is not on the CUDA device");
            };
            let slice = cs.as_cuda_slice::<f32>()?;
            let (ptr, sync) = slice.device_ptr(&stream);
            syncs.push(sync);
            table.push(ptr + (layout.start_offset() * 4) as u64);
        }
        let n = s.w.elem_count();
        largest = largest.max(n);
        table.push(n as u64);
        table.push(u64::from(s.decay));
    }
    // In-place updates need a buffer of their own per weight and moment.
    let mut seen = std::collections::HashSet::new();
    for e in table.chunks(6) {
        for &ptr in &e[..3] {
            if !seen.insert(ptr) {
                candle_core::bail!("fused AdamW: two weights or moments share one buffer");
            }
        }
    }
    let table_dev = dev.clone_htod(&table)?;
    let tensors = u32::try_from(slots.len())
        .map_err(|_| candle_core::Error::Msg("too many tensors".into()))?;
    let blocks = largest.div_ceil(256 * 4).clamp(1, 256) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, tensors, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = func(&dev, "adamw_multi")?;
    let stream = dev.cuda_stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&table_dev)
        .arg(&h.lr)
        .arg(&h.b1)
        .arg(&h.b2)
        .arg(&h.c1)
        .arg(&h.c2)
        .arg(&h.eps)
        .arg(&h.wd)
        .arg(&h.gscale);
    // SAFETY: the table holds live device pointers (their storages are locked above) of `n`
    // f32 values each; weights and moments are owned by the optimizer and its variables and
    // are not read by anything else while this stream runs the update.
    unsafe { lb.launch(cfg) }.w()?;
    drop(syncs);
    drop(guards);
    Ok(())
}

/// Free and total device memory in bytes.
pub fn mem_info(dev: &CudaDevice) -> Result<(usize, usize)> {
    dev.cuda_stream().context().mem_get_info().w()
}

/// The device's default memory pool (where candle's stream-ordered allocations come from).
fn default_pool(
    dev: &CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("cuDeviceGetDefaultMemPool: {r:?}");
    }
    Ok(pool)
}

/// Reset the high-water mark of the device's memory pool (see [`pool_peak`]).
pub fn pool_peak_reset(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let mut zero: u64 = 0;
    // SAFETY: the attribute takes a u64 by pointer; `pool` is the device's default pool.
    let r = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("cuMemPoolSetAttribute: {r:?}");
    }
    Ok(())
}

/// The most memory of the device's pool in use at once since the last reset, in bytes (the
/// peak of candle's allocations; PyTorch's `max_memory_allocated` is the counterpart).
pub fn pool_peak(dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let mut v: u64 = 0;
    // SAFETY: the attribute is a u64 written through the pointer.
    let r = unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v as *mut u64).cast(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("cuMemPoolGetAttribute: {r:?}");
    }
    Ok(v)
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), copying `bytes` `reps`
/// times with the driver's copy: the ceiling memory-bound kernels are measured against.
pub fn copy_bandwidth(dev: &CudaDevice, bytes: usize, reps: usize) -> Result<f64> {
    let stream = dev.cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes).w()?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).w()?;
    stream.memcpy_dtod(&src, &mut dst).w()?;
    stream.synchronize().w()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        stream.memcpy_dtod(&src, &mut dst).w()?;
    }
    stream.synchronize().w()?;
    Ok(2.0 * (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// [`crate::fused::NormaliseAugment`] on the device: raw windows `[B, C, n, n]` and the
/// parameter vector → `[B, C + 1, n, n]`.
pub fn normalise_augment(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    (b, c, n): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let raw = f32_view(s1, l1, "raw windows")?;
    let prm = f32_view(s2, l2, "normalisation parameters")?;
    let total = b * (c + 1) * n * n;
    let int =
        |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg("batch too large".into()));
    let (b_i, c_i, n_i) = (int(b)?, int(c)?, int(n)?);
    let f = func(dev, "normalise_augment")?;
    // SAFETY: every element is written by the kernel (each pixel writes its C + 1 channels).
    let out = unsafe { dev.alloc::<f32>(total)? };
    let stream = dev.cuda_stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&raw)
        .arg(&prm)
        .arg(&out)
        .arg(&b_i)
        .arg(&c_i)
        .arg(&n_i);
    // SAFETY: arguments match the kernel's signature; sizes were checked by the caller.
    unsafe { lb.launch(elem_cfg(b * n * n)) }.w()?;
    Ok(wrap(dev, CudaStorageSlice::F32(out)))
}

/// CUDA device `ordinal` as icefm uses it: candle's device with cudarc's per-launch event
/// tracking turned off.
///
/// With tracking on (cudarc's default once a context has a stream of its own, as candle's
/// does), every kernel launch records and waits on two events per buffer argument, host-side
/// driver work that a step of thousands of small launches pays for nothing: candle queues all
/// its work, and icefm all its kernels, on the device's one stream, in order. The one other
/// stream icefm uses, [`Uploader`]'s, is ordered by explicit events. `ICEFM_CUDA_EVENT_TRACKING=1`
/// leaves tracking on (for comparisons).
pub fn device(ordinal: usize) -> Result<candle_core::Device> {
    let dev = candle_core::Device::new_cuda(ordinal)?;
    if !event_tracking_requested() {
        // SAFETY: all of candle's and icefm's kernels run on the device's single stream, in
        // order, so no buffer needs cross-stream events; the uploader's copy stream orders
        // its buffers with its own events.
        unsafe { dev.as_cuda_device()?.disable_event_tracking() };
    }
    Ok(dev)
}

/// Whether `ICEFM_CUDA_EVENT_TRACKING=1` asks [`device`] to leave cudarc's tracking on.
pub fn event_tracking_requested() -> bool {
    std::env::var("ICEFM_CUDA_EVENT_TRACKING").is_ok_and(|v| v == "1")
}

/// Host-to-device copies of training batches that overlap the step running on the device.
///
/// Each upload copies the host data into a page-locked buffer (a fast host copy), then queues
/// the transfer on a stream of the uploader's own into a device staging buffer, and on the
/// device's stream a wait for that transfer and a device-to-device copy into a fresh tensor.
/// It returns at once: issued while a step is queued, the transfer runs beside the step's
/// kernels. Two slots alternate, so the batch of step s + 1 is copied while step s still reads
/// its own; a slot is reused only after the device's copy out of it (an event) and the
/// transfer out of its page-locked buffer (cudarc's event on that buffer) are done.
pub struct Uploader {
    dev: CudaDevice,
    copy: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    slots: [Option<Slot>; 2],
    next: usize,
}

struct Slot {
    pinned: candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>,
    staging: CudaSlice<f32>,
    /// Recorded on the device's stream after its copy out of `staging`.
    released: candle_core::cuda_backend::cudarc::driver::CudaEvent,
}

impl Uploader {
    /// An uploader for `dev` (creates its copy stream).
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let copy = dev.cuda_stream().context().new_stream().w()?;
        Ok(Self {
            dev: dev.clone(),
            copy,
            slots: [None, None],
            next: 0,
        })
    }

    /// `data` as an f32 tensor of `shape` on the device; the copy is queued, not waited for
    /// (work queued on the device afterwards sees the data).
    pub fn upload(&mut self, data: &[f32], shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            candle_core::bail!(
                "upload: {} values for shape {shape:?} ({} elements)",
                data.len(),
                shape.elem_count()
            );
        }
        let n = data.len();
        let compute = self.dev.cuda_stream();
        let i = self.next;
        self.next = 1 - i;
        if self.slots[i].as_ref().is_none_or(|s| s.staging.len() != n) {
            // A batch of another size (a short last batch): new buffers for this slot, after
            // the old ones are out of use.
            if let Some(old) = self.slots[i].take() {
                old.released.synchronize().w()?;
            }
            let ctx = compute.context();
            // SAFETY: both buffers are written (the host copy below, then the transfer)
            // before anything reads them.
            let pinned = unsafe { ctx.alloc_pinned::<f32>(n) }.w()?;
            // SAFETY: as above.
            let staging = unsafe { self.copy.alloc::<f32>(n) }.w()?;
            let released = compute.record_event(None).w()?;
            self.slots[i] = Some(Slot {
                pinned,
                staging,
                released,
            });
        }
        let Some(slot) = self.slots[i].as_mut() else {
            candle_core::bail!("upload: slot {i} missing");
        };
        // Waits for this buffer's previous transfer (two uploads ago) before writing it.
        slot.pinned.as_mut_slice().w()?.copy_from_slice(data);
        // The staging buffer is free once the device has copied the previous batch out of it.
        self.copy.wait(&slot.released).w()?;
        self.copy.memcpy_htod(&slot.pinned, &mut slot.staging).w()?;
        let copied = self.copy.record_event(None).w()?;
        compute.wait(&copied).w()?;
        // SAFETY: the copy below writes all `n` values before any use.
        let mut out = unsafe { compute.alloc::<f32>(n) }.w()?;
        compute.memcpy_dtod(&slot.staging, &mut out).w()?;
        slot.released.record(&compute).w()?;
        let storage = CudaStorage::wrap_cuda_slice(out, self.dev.clone());
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // The slots' buffers are freed on the copy stream: let both streams finish with them.
        let _ = self.dev.cuda_stream().synchronize();
        let _ = self.copy.synchronize();
    }
}

/// Where the flash forward leaves its log-sum-exp for the backward of the same attention node.
pub type SavedLse = std::sync::Mutex<Option<CudaSlice<f32>>>;

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("flash attention: a thread panicked holding the log-sum-exp".into())
}

/// The kernel-name suffix of the flash kernels that fetch the next tile during the current one.
fn prefetch_suffix() -> &'static str {
    if crate::fused::flash_prefetch() {
        "_pf"
    } else {
        ""
    }
}

/// [`crate::fused::FlashAttention`] on the device: `qkv` bf16 `[B, N, 3·H·hd]` (contiguous, at an
/// even element offset) → `[B, N, H·hd]` bf16. `hd` is 32 or 64.
/// The kernel also writes each query's log-sum-exp (f32 `[B, H, N]`); `keep` receives it for
/// the backward ([`flash_attention_bwd`]), else it is dropped.
pub fn flash_attention(
    s: &CudaStorage,
    l: &Layout,
    (b, n, heads, hd): (usize, usize, usize, usize),
    keep: Option<&SavedLse>,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let qkv = typed::<half::bf16>(s, l)?;
    if !l.start_offset().is_multiple_of(2) || !matches!(hd, 32 | 64) {
        candle_core::bail!("flash attention: head width {hd} or an odd offset");
    }
    let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg("too large".into()));
    let (n_i, h_i) = (int(n)?, int(heads)?);
    let scale_log2 = (hd as f32).powf(-0.5) * std::f32::consts::LOG2_E;
    let f = func(dev, &format!("flash_fwd_{hd}{}", prefetch_suffix()))?;
    // SAFETY: every element is written: each (sample, head, query) by its warp.
    let out = unsafe { dev.alloc::<half::bf16>(b * n * heads * hd)? };
    // SAFETY: as above.
    let lse = unsafe { dev.alloc::<f32>(b * heads * n)? };
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(64) as u32,
            heads as u32,
            u32::try_from(b).map_err(|_| candle_core::Error::Msg("batch too large".into()))?,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&qkv)
        .arg(&out)
        .arg(&lse)
        .arg(&n_i)
        .arg(&h_i)
        .arg(&scale_log2);
    // SAFETY: the arguments match the kernel's signature; `qkv` holds B·N·3·H·hd values.
    unsafe { lb.launch(cfg) }.w()?;
    if let Some(slot) = keep {
        *slot.lock().map_err(|_| poisoned())? = Some(lse);
    }
    Ok(wrap(dev, CudaStorageSlice::BF16(out)))
}

/// [`crate::seg::Im2col3`] on the device (`adjoint` false: `[B, H, W, C]` → `[B, H, W, 9·C]`)
/// and its backward (`adjoint` true: `[B, H, W, 9·C]` → `[B, H, W, C]`); `(b, h, w, c)` are the
/// map's dimensions.
pub fn im2col3(
    s: &CudaStorage,
    l: &Layout,
    (b, h, w, c): (usize, usize, usize, usize),
    adjoint: bool,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s: &CudaStorage,
        l: &Layout,
        (b, h, w, c): (usize, usize, usize, usize),
        adjoint: bool,
    ) -> Result<CudaStorageSlice> {
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg("map too large".into()))
        };
        let dims = (int(b)?, int(h)?, int(w)?, int(c)?);
        let n = b * h * w * c * if adjoint { 1 } else { 9 };
        let name = if adjoint { "col2im3" } else { "im2col3" };
        let f = func(dev, &format!("{name}_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(&y)
            .arg(&dims.0)
            .arg(&dims.1)
            .arg(&dims.2)
            .arg(&dims.3);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s, go(s, l, (b, h, w, c), adjoint))?;
    Ok(wrap(&s.device, slice))
}

/// [`crate::fused::FlashAttentionGrad`] on the device: `qkv` `[B, N, 3·H·hd]`, the forward's
/// output `o` and its gradient `dout` `[B, N, H·hd]`, all bf16 contiguous at even offsets →
/// `dqkv` in `qkv`'s layout. `hd` is 32 or 64.
/// `saved`: the forward's log-sum-exp ([`flash_attention`]'s `keep`), taken if it is there, so
/// that the dq kernel skips its first pass over the keys.
pub fn flash_attention_bwd(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    (b, n, heads, hd): (usize, usize, usize, usize),
    saved: Option<&SavedLse>,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let qkv = typed::<half::bf16>(s1, l1)?;
    let o = typed::<half::bf16>(s2, l2)?;
    let dout = typed::<half::bf16>(s3, l3)?;
    if [l1, l2, l3]
        .iter()
        .any(|l| !l.start_offset().is_multiple_of(2))
        || !matches!(hd, 32 | 64)
    {
        candle_core::bail!("flash attention backward: head width {hd} or an odd offset");
    }
    let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg("too large".into()));
    let (n_i, h_i) = (int(n)?, int(heads)?);
    let scale = (hd as f32).powf(-0.5);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let rows = b * heads * n;
    // SAFETY: every element is written: the q slots by the first kernel, k and v by the
    // second; the log-sum-exp (unless saved by the forward) and D of each (sample, head,
    // query) by the first.
    let dqkv = unsafe { dev.alloc::<half::bf16>(b * n * 3 * heads * hd)? };
    let saved = match saved {
        Some(slot) => slot.lock().map_err(|_| poisoned())?.take(),
        None => None,
    }
    .filter(|lse| lse.len() == rows);
    let have_lse = saved.is_some();
    let lse = match saved {
        Some(lse) => lse,
        // SAFETY: as above.
        None => unsafe { dev.alloc::<f32>(rows)? },
    };
    // SAFETY: as above.
    let dvec = unsafe { dev.alloc::<f32>(rows)? };
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(64) as u32,
            heads as u32,
            u32::try_from(b).map_err(|_| candle_core::Error::Msg("batch too large".into()))?,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let f = func(
        dev,
        &format!(
            "flash_bwd_dq_{}{hd}{}",
            if have_lse { "lse_" } else { "" },
            prefetch_suffix()
        ),
    )?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(&qkv)
        .arg(&o)
        .arg(&dout)
        .arg(&dqkv)
        .arg(&lse)
        .arg(&dvec)
        .arg(&n_i)
        .arg(&h_i)
        .arg(&scale_log2)
        .arg(&scale);
    // SAFETY: the arguments match the kernel's signature and sizes.
    unsafe { lb.launch(cfg) }.w()?;
    let f = func(dev, &format!("flash_bwd_dkv_{hd}{}", prefetch_suffix()))?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(&qkv)
        .arg(&dout)
        .arg(&lse)
        .arg(&dvec)
        .arg(&dqkv)
        .arg(&n_i)
        .arg(&h_i)
        .arg(&scale_log2)
        .arg(&scale);
    // SAFETY: as above; it runs after the first kernel on the same stream.
    unsafe { lb.launch(cfg) }.w()?;
    Ok(wrap(dev, CudaStorageSlice::BF16(dqkv)))
}

/// One cuBLASLt handle (with its 32 MiB workspace on Hopper) per device, made on first use.
fn blas_lt(dev: &CudaDevice) -> Result<std::sync::Arc<CudaBlasLT>> {
    static HANDLES: Memo<DeviceId, std::sync::Arc<CudaBlasLT>> = Memo::new();
    HANDLES.get_or_make(dev.id(), || {
        CudaBlasLT::new(dev.cuda_stream())
            .map(std::sync::Arc::new)
            .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))
    })
}

/// Byte offsets of a view into its allocation that cuBLASLt's default algorithm choice allows
/// (it assumes 256-byte aligned operands unless told otherwise).
fn lt_aligned(l: &Layout, elem_bytes: usize) -> bool {
    (l.start_offset() * elem_bytes).is_multiple_of(256)
}

/// [`crate::fused::LinearBias`] on the device: `x` `[m, k]` and `w` `[n, k]` (bf16, contiguous),
/// `b` `[n]` (f32) → `x · wᵀ + b` `[m, n]` bf16, the bias added in the matrix product's epilogue
/// (cuBLASLt `EPILOGUE_BIAS`, the bias cast to bf16 first) instead of a pass of its own. Operands
/// that are not 256-byte aligned take candle's product and [`bias_add`] instead.
#[allow(clippy::too_many_arguments)]
pub fn linear_bias(
    sx: &CudaStorage,
    lx: &Layout,
    sw: &CudaStorage,
    lw: &Layout,
    sb: &CudaStorage,
    lb: &Layout,
    (m, k, n): (usize, usize, usize),
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::cublaslt::{Matmul, MatmulConfig};
    let dev = &sx.device;
    if !(lt_aligned(lx, 2) && lt_aligned(lw, 2)) {
        let y = sx.matmul(sw, (1, m, n, k), lx, &lw.transpose(0, 1)?)?;
        return bias_add(&y, &Layout::contiguous((m, n)), sb, lb, m, n);
    }
    let x = typed::<half::bf16>(sx, lx)?;
    let w = typed::<half::bf16>(sw, lw)?;
    let b16 = sb.to_dtype(lb, candle_core::DType::BF16)?;
    let b = typed::<half::bf16>(&b16, &Layout::contiguous(n))?;
    let lt = blas_lt(dev)?;
    // Row-major y [m, n] = x [m, k] · wᵀ is column-major yᵀ [n, m] = (w as column-major [k, n])ᵀ
    // · (x as column-major [k, m]); the bias runs along yᵀ's rows, one value per output feature.
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: beta is 0, so the product writes every element of y and reads none.
    let mut y = unsafe { dev.alloc::<half::bf16>(m * n)? };
    // SAFETY: the shapes and leading dimensions above describe the three buffers exactly.
    unsafe { lt.matmul(cfg, &w, &x, &mut y, Some(&b), None) }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt matmul: {e:?}")))?;
    Ok(wrap(dev, CudaStorageSlice::BF16(y)))
}
