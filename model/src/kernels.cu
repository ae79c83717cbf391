// icefm's CUDA kernels. NVRTC compiles this file at first use (model/src/cuda/mod.rs, `SOURCE`);
// the tests' CPU emulator (model/tests/emulator/) compiles it as C++ with ICEFM_EMULATOR defined,
// which supplies the CUDA built-ins and replaces the two inline-PTX instructions below.
#ifndef ICEFM_EMULATOR
#define ICEFM_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
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

// A row's mean, then the variance of the centred values (two passes, as the reference), by
// one warp.
template <typename T>
__device__ __forceinline__ void row_stats(const T* xr, int d, int lane, float eps, float& mean,
                                          float& rstd) {
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += ld(xr, i);
    mean = warp_sum(s) / d;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float c = ld(xr, i) - mean; ss += c * c; }
    rstd = rsqrtf(warp_sum(ss) / d + eps);
}

// One warp per row: its statistics, then the output.
template <typename T>
__device__ void ln_fwd(const T* x, const float* w, const float* b, T* y, int rows, int d,
                       float eps) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (long)row * d;
    T* yr = y + (long)row * d;
    float mean, rstd;
    row_stats(xr, d, lane, eps, mean, rstd);
    for (int i = lane; i < d; i += 32) st(yr, i, (ld(xr, i) - mean) * rstd * w[i] + b[i]);
}

// The block's partial sums of the layer norm's scale and shift gradients, acc[0..2d) in
// shared memory, to out[0][blockIdx][:] and out[1][blockIdx][:] (after a barrier).
__device__ __forceinline__ void ln_write_partials(const float* acc, float* out, int d) {
    __syncthreads();
    long p = gridDim.x;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        out[(long)blockIdx.x * d + i] = acc[i];
        out[(p + blockIdx.x) * d + i] = acc[d + i];
    }
}

// The layer norm's backward in one pass over x and dy: dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))
// with g = dy · w, and the block's partial sums of dy · x̂ (for the scale) and dy (for the
// shift) in out[0][blockIdx][:] and out[1][blockIdx][:]. Block b takes rows
// [b · rows_per_block, (b + 1) · rows_per_block), its warps in turn; shared-memory atomics.
template <typename T>
__device__ void ln_grad(const T* x, const float* w, const T* dy, T* dx, float* out, int rows,
                        int d, float eps, int rows_per_block) {
    ICEFM_DYNAMIC_SHARED(float, acc);  // [2][d]
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    int r0 = blockIdx.x * rows_per_block;
    int r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
    for (int row = r0 + warp; row < r1; row += warps) {
        const T* xr = x + (long)row * d;
        const T* gr = dy + (long)row * d;
        T* o = dx + (long)row * d;
        float mean, rstd;
        row_stats(xr, d, lane, eps, mean, rstd);
        float a = 0.f, bs = 0.f;
        for (int i = lane; i < d; i += 32) {
            float g = ld(gr, i) * w[i];
            a += g;
            bs += g * (ld(xr, i) - mean) * rstd;
        }
        a = warp_sum(a) / d;
        bs = warp_sum(bs) / d;
        for (int i = lane; i < d; i += 32) {
            float gy = ld(gr, i), xh = (ld(xr, i) - mean) * rstd;
            st(o, i, rstd * (gy * w[i] - a - xh * bs));
            atomicAdd(&acc[i], gy * xh);
            atomicAdd(&acc[d + i], gy);
        }
    }
    ln_write_partials(acc, out, d);
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
extern "C" __global__ void ln_grad_##SUF(const T* x, const float* w, const T* dy, T* dx,     \
        float* out, int rows, int d, float eps, int rpb) {                                     \
    ln_grad<T>(x, w, dy, dx, out, rows, d, eps, rpb); }                                        \
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

// [`ln_grad`] with each lane's share of a row in registers (P pairs, d = 64·P): the lane's
// columns are the same in every row, so it sums dy · x̂ and dy over its rows in registers; the
// block's warps then add theirs in shared memory one warp after another, so the partial sums
// have the same bits whatever order the warps run in.
template <typename T, int P>
__device__ void ln_grad_reg(const T* x, const float* w, const T* dy, T* dx, float* out, int rows,
                            float eps, int rows_per_block) {
    const int d = 64 * P;
    ICEFM_DYNAMIC_SHARED(float, acc);  // [2][d]
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
        float a = 0.f, bs = 0.f;
#pragma unroll
        for (int k = 0; k < P; ++k) {
            float2 wv = reinterpret_cast<const float2*>(w)[lane + 32 * k];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int m = 2 * k + j;
                v[m] = (v[m] - mean) * rstd;
                dw[m] += g[m] * v[m];
                db[m] += g[m];
                g[m] *= j ? wv.y : wv.x;
                a += g[m];
                bs += g[m] * v[m];
            }
        }
        a = warp_sum(a) / d;
        bs = warp_sum(bs) / d;
        T* o = dx + (long)row * d;
#pragma unroll
        for (int k = 0; k < P; ++k)
            st2(o, lane + 32 * k, rstd * (g[2 * k] - a - v[2 * k] * bs),
                rstd * (g[2 * k + 1] - a - v[2 * k + 1] * bs));
    }
    for (int s = 0; s < warps; ++s) {
        if (warp == s) {
#pragma unroll
            for (int k = 0; k < P; ++k)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int i = 2 * (lane + 32 * k) + j;
                    acc[i] = s ? acc[i] + dw[2 * k + j] : dw[2 * k + j];
                    acc[d + i] = s ? acc[d + i] + db[2 * k + j] : db[2 * k + j];
                }
        }
        __syncthreads();
    }
    ln_write_partials(acc, out, d);
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
extern "C" __global__ void ln_grad_##SUF##_p##P(const T* x, const float* w, const T* dy,     \
        T* dx, float* out, int rows, int d, float eps, int rpb) {                              \
    ln_grad_reg<T, P>(x, w, dy, dx, out, rows, eps, rpb); }
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

// [`ln_grad`] with 16-byte accesses and persistent warps: each lane sums dy · x̂ and dy of its
// columns over its rows in registers; the block's warps add theirs in warp order
// (as `ln_grad_reg`), so block b's partial sums are over the rows of its warps.
template <int Q>
__device__ void ln_grad_v8(const bf16_t* x, const float* w, const bf16_t* dy, bf16_t* dx,
                           float* out, int rows, float eps) {
    const int lane = threadIdx.x & 31, warps = (gridDim.x * blockDim.x) >> 5;
    const int d = 256 * Q;
    ICEFM_DYNAMIC_SHARED(float, acc);  // [2][d]
    float dw[8 * Q], db[8 * Q];
#pragma unroll
    for (int k = 0; k < 8 * Q; ++k) { dw[k] = 0.f; db[k] = 0.f; }
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
                v[k] = (v[k] - mean) * rstd;
                dw[k] += g[k] * v[k];
                db[k] += g[k];
                g[k] *= wv[i];
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
    const int warp = threadIdx.x >> 5, block_warps = blockDim.x >> 5;
    for (int s = 0; s < block_warps; ++s) {
        if (warp == s) {
#pragma unroll
            for (int k = 0; k < 8 * Q; ++k) {
                const int i = (lane + 32 * (k / 8)) * 8 + k % 8;
                acc[i] = s ? acc[i] + dw[k] : dw[k];
                acc[d + i] = s ? acc[d + i] + db[k] : db[k];
            }
        }
        __syncthreads();
    }
    ln_write_partials(acc, out, d);
}
#define LN_V8_FWD(Q)                                                                          \
extern "C" __global__ void ln_fwd_bf16_q##Q(const bf16_t* x, const float* w, const float* b,  \
        bf16_t* y, int rows, int d, float eps) { ln_fwd_v8<Q>(x, w, b, y, rows, eps); }
// The backward up to Q = 4: at 5 its registers (a row of x and dy, the next row's loads and
// the partial sums) spill.
#define LN_V8_GRAD(Q)                                                                         \
extern "C" __global__ void ln_grad_bf16_q##Q(const bf16_t* x, const float* w,                 \
        const bf16_t* dy, bf16_t* dx, float* out, int rows, int d, float eps, int rpb) {       \
    ln_grad_v8<Q>(x, w, dy, dx, out, rows, eps); }
LN_V8_FWD(2) LN_V8_GRAD(2)
LN_V8_FWD(3) LN_V8_GRAD(3)
LN_V8_FWD(4) LN_V8_GRAD(4)
LN_V8_FWD(5)


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

// ReLU as PyTorch computes it: NaN passes through (x < 0 is false for it), and the backward
// passes the gradient where the output is positive (none at 0, none at NaN).
template <typename T>
__device__ void relu_fwd_k(const T* x, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = ld(x, i);
        st(y, i, v < 0.f ? 0.f : v);
    }
}
template <typename T>
__device__ void relu_grad_k(const T* y, const T* g, T* dx, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(dx, i, ld(y, i) > 0.f ? ld(g, i) : 0.f);
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
// The backward of gelu(x + b), dx = dy · gelu'(x + b), and the column sums of dx (the bias's
// gradient) in the same pass: block (tile, chunk) takes rows [chunk · rpb, (chunk + 1) · rpb),
// each thread one pair of columns (one column where the rows do not allow pairs) down those
// rows, its sums in registers (of dx before rounding to T), written to out[chunk][:]. No
// atomics: the sums have the same bits in any thread order.
template <typename T>
__device__ void bias_gelu_grad_k(const T* x, const float* b, const T* g, T* dx, float* out,
                                 int rows, int c, int pairs, int rpb) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int r0 = blockIdx.y * rpb, r1 = r0 + rpb < rows ? r0 + rpb : rows;
    float* sums = out + (long)blockIdx.y * c;
    if (pairs) {
        if (j >= (c >> 1)) return;
        const float b0 = b[2 * j], b1 = b[2 * j + 1];
        float s0 = 0.f, s1 = 0.f;
#pragma unroll 4
        for (int r = r0; r < r1; ++r) {
            float a, e, ga, ge;
            ld2(x + (long)r * c, j, a, e);
            ld2(g + (long)r * c, j, ga, ge);
            const float d0 = ga * gelu_d(a + b0), d1 = ge * gelu_d(e + b1);
            st2(dx + (long)r * c, j, d0, d1);
            s0 += d0;
            s1 += d1;
        }
        sums[2 * j] = s0;
        sums[2 * j + 1] = s1;
    } else {
        if (j >= c) return;
        const float bj = b[j];
        float s = 0.f;
#pragma unroll 4
        for (int r = r0; r < r1; ++r) {
            const long i = (long)r * c + j;
            const float d = ld(g, i) * gelu_d(ld(x, i) + bj);
            st(dx, i, d);
            s += d;
        }
        sums[j] = s;
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
extern "C" __global__ void relu_fwd_##SUF(const T* x, T* y, long n) { relu_fwd_k<T>(x, y, n); } \
extern "C" __global__ void relu_grad_##SUF(const T* y, const T* g, T* dx, long n) {           \
        relu_grad_k<T>(y, g, dx, n); }                                                        \
extern "C" __global__ void bias_gelu_fwd_##SUF(const T* x, const float* b, T* y, int rows,   \
        int c, int pairs) { bias_gelu_fwd_k<T>(x, b, y, rows, c, pairs); }                     \
extern "C" __global__ void bias_gelu_grad_##SUF(const T* x, const float* b, const T* g,      \
        T* dx, float* out, int rows, int c, int pairs, int rpb) {                              \
    bias_gelu_grad_k<T>(x, b, g, dx, out, rows, c, pairs, rpb); }
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
// The loss writes out[row] (the patch's mean squared error) and aux[2·row], aux[2·row + 1]
// (its baseline, the error of predicting 0, and 1 if the patch counts); all 0 for a patch of
// fewer than 2 weighted values.
template <typename T>
__device__ void npx_loss(const T* pred, const T* t, const T* w, T* out, T* aux, int rows, int p) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    long o = (long)row * p;
    float mean, rstd, cnt;
    if (!npx_stats(t + o, w + o, p, lane, mean, rstd, cnt)) {
        if (lane == 0) { st(out, row, 0.f); st(aux, 2L * row, 0.f); st(aux, 2L * row + 1, 0.f); }
        return;
    }
    float se = 0.f, bs = 0.f;
    for (int i = lane; i < p; i += 32) {
        float z = (ld(t + o, i) - mean) * rstd, wi = ld(w + o, i), e = ld(pred + o, i) - z;
        se += e * e * wi;
        bs += z * z * wi;
    }
    se = warp_sum(se);
    bs = warp_sum(bs);
    if (lane == 0) { st(out, row, se / cnt); st(aux, 2L * row, bs / cnt); st(aux, 2L * row + 1, 1.f); }
}
// g holds each patch's incoming gradient.
template <typename T>
__device__ void npx_grad(const T* pred, const T* t, const T* w, const T* g, T* dp, int rows, int p) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    long o = (long)row * p;
    float mean, rstd, cnt;
    if (!npx_stats(t + o, w + o, p, lane, mean, rstd, cnt)) {
        for (int i = lane; i < p; i += 32) st(dp + o, i, 0.f);
        return;
    }
    float gr = ld(g, row);
    for (int i = lane; i < p; i += 32) {
        float e = ld(pred + o, i) - (ld(t + o, i) - mean) * rstd;
        st(dp + o, i, 2.f * e * ld(w + o, i) * gr / cnt);
    }
}
// Register-resident variants for rows of p ≤ 32·V: each lane loads its V values of the target,
// the weights and the predictions at once (lanes strided, as above; values past p read as 0 and
// weigh nothing), then the statistics and the loss or its gradient come from registers: each
// array read once instead of two or three times, with all of a lane's loads in flight together.
template <int V>
__device__ __forceinline__ bool npx_stats_reg(const float (&t)[V], const float (&w)[V], float& mean,
                                              float& rstd, float& cnt) {
    float c = 0.f, s = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) { c += w[k]; s += w[k] * t[k]; }
    c = warp_sum(c);
    s = warp_sum(s);
    if (c < 2.f) return false;
    mean = s / c;
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) { float d = (t[k] - mean) * w[k]; v += d * d; }
    v = warp_sum(v) / (c - 1.f);
    rstd = rsqrtf(v + 1e-6f);
    cnt = c;
    return true;
}
template <typename T, int V>
__device__ __forceinline__ void npx_load_reg(const T* pred, const T* t, const T* w, int p, int lane,
                                             float (&pv)[V], float (&tv)[V], float (&wv)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const int i = lane + 32 * k;
        const bool in = i < p;
        pv[k] = in ? ld(pred, i) : 0.f;
        tv[k] = in ? ld(t, i) : 0.f;
        wv[k] = in ? ld(w, i) : 0.f;
    }
}
template <typename T, int V>
__device__ void npx_loss_reg(const T* pred, const T* t, const T* w, T* out, T* aux, int rows, int p) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    long o = (long)row * p;
    float pv[V], tv[V], wv[V];
    npx_load_reg<T, V>(pred + o, t + o, w + o, p, lane, pv, tv, wv);
    float mean, rstd, cnt;
    if (!npx_stats_reg<V>(tv, wv, mean, rstd, cnt)) {
        if (lane == 0) { st(out, row, 0.f); st(aux, 2L * row, 0.f); st(aux, 2L * row + 1, 0.f); }
        return;
    }
    float se = 0.f, bs = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        float z = (tv[k] - mean) * rstd, e = pv[k] - z;
        se += e * e * wv[k];
        bs += z * z * wv[k];
    }
    se = warp_sum(se);
    bs = warp_sum(bs);
    if (lane == 0) { st(out, row, se / cnt); st(aux, 2L * row, bs / cnt); st(aux, 2L * row + 1, 1.f); }
}
template <typename T, int V>
__device__ void npx_grad_reg(const T* pred, const T* t, const T* w, const T* g, T* dp, int rows, int p) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    long o = (long)row * p;
    float pv[V], tv[V], wv[V];
    npx_load_reg<T, V>(pred + o, t + o, w + o, p, lane, pv, tv, wv);
    const float gr = ld(g, row);
    float mean, rstd, cnt;
    const bool ok = npx_stats_reg<V>(tv, wv, mean, rstd, cnt);
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const int i = lane + 32 * k;
        if (i < p) st(dp + o, i, ok ? 2.f * (pv[k] - (tv[k] - mean) * rstd) * wv[k] * gr / cnt : 0.f);
    }
}
#define NPX_REG(T, SUF, V)                                                                    \
extern "C" __global__ void norm_pix_loss_##SUF##_v##V(const T* pred, const T* t, const T* w,  \
        T* out, T* aux, int rows, int p) { npx_loss_reg<T, V>(pred, t, w, out, aux, rows, p); } \
extern "C" __global__ void norm_pix_loss_grad_##SUF##_v##V(const T* pred, const T* t,         \
        const T* w, const T* g, T* dp, int rows, int p) {                                     \
    npx_grad_reg<T, V>(pred, t, w, g, dp, rows, p); }
#define NPX_REG_ALL(T, SUF)                                                                   \
    NPX_REG(T, SUF, 4) NPX_REG(T, SUF, 8) NPX_REG(T, SUF, 12) NPX_REG(T, SUF, 16)             \
    NPX_REG(T, SUF, 24) NPX_REG(T, SUF, 32)
NPX_REG_ALL(float, f32)
NPX_REG_ALL(bf16_t, bf16)

#define NPX_INSTANCES(T, SUF)                                                                 \
extern "C" __global__ void norm_pix_loss_##SUF(const T* pred, const T* t, const T* w, T* out, \
        T* aux, int rows, int p) { npx_loss<T>(pred, t, w, out, aux, rows, p); }               \
extern "C" __global__ void norm_pix_loss_grad_##SUF(const T* pred, const T* t, const T* w,   \
        const T* g, T* dp, int rows, int p) { npx_grad<T>(pred, t, w, g, dp, rows, p); }
NPX_INSTANCES(float, f32)
NPX_INSTANCES(bf16_t, bf16)


// ---- Token gather / scatter by index, ids [B, K] (distinct per sample, each below N).
// Gather: out[b, j] = in[b, ids[b, j]], [B, N, D] → [B, K, D]. Scatter (the gather's
// backward): out[b, t] = in[b, j] where ids[b, j] = t, zeros in the rows no index names,
// [B, K, D] → [B, N, D]: every output row is written once, so the output needs no zero fill
// first. One warp per output row, 8 per block (blockIdx.x · 8 + warp); with `vec` (the host
// checks: rows of a multiple of 16 bytes, both buffers 16-byte aligned) each lane moves 16
// bytes at a time, otherwise one value.
template <typename T>
__device__ __forceinline__ void token_row(const T* f, T* o, int d, int lane, int vec) {
    if (vec) {
        const int pieces = d * (int)sizeof(T) / 16;
        if (f) {
            for (int i = lane; i < pieces; i += 32)
                reinterpret_cast<uint4*>(o)[i] = reinterpret_cast<const uint4*>(f)[i];
        } else {
            for (int i = lane; i < pieces; i += 32) reinterpret_cast<uint4*>(o)[i] = make_uint4(0, 0, 0, 0);
        }
    } else {
        for (int i = lane; i < d; i += 32) o[i] = f ? f[i] : (T)0;
    }
}
template <typename T>
__device__ void gather_tokens_k(const T* in, const unsigned int* ids, T* out, int k, int n, int d,
                                int vec) {
    const int b = blockIdx.y, j = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (j >= k) return;
    const int t = (int)ids[(long)b * k + j];
    token_row<T>(in + ((long)b * n + t) * d, out + ((long)b * k + j) * d, d, lane, vec);
}
// The block's 8 output rows find their sources in shared memory: every thread of the block
// walks part of the sample's K indices and notes j for the rows of this block (-1: none).
template <typename T>
__device__ void scatter_tokens_k(const T* in, const unsigned int* ids, T* out, int k, int n,
                                 int d, int vec) {
    __shared__ int src[8];
    const int b = blockIdx.y, t0 = blockIdx.x * 8, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x < 8) src[threadIdx.x] = -1;
    __syncthreads();
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const int r = (int)ids[(long)b * k + j] - t0;
        if (r >= 0 && r < 8) src[r] = j;
    }
    __syncthreads();
    const int t = t0 + warp;
    if (t >= n) return;
    const int j = src[warp];
    token_row<T>(j >= 0 ? in + ((long)b * k + j) * d : nullptr, out + ((long)b * n + t) * d, d,
                 lane, vec);
}
#define TOKEN_INSTANCES(T, SUF)                                                               \
extern "C" __global__ void gather_tokens_##SUF(const T* in, const unsigned int* ids, T* out, \
        int k, int n, int d, int vec) { gather_tokens_k<T>(in, ids, out, k, n, d, vec); }     \
extern "C" __global__ void scatter_tokens_##SUF(const T* in, const unsigned int* ids, T* out,\
        int k, int n, int d, int vec) { scatter_tokens_k<T>(in, ids, out, k, n, d, vec); }
TOKEN_INSTANCES(float, f32)
TOKEN_INSTANCES(bf16_t, bf16)

// AdamW over many tensors in one launch: table[t] = {w, m, v, g, n, decay} (6 words),
// blockIdx.y = tensor. Same arithmetic, in the same order, as icefm_model::optim::AdamW.
// With `sumsq` (the gradients' sum of squares, sum_squares_multi's result, still on the
// device) the gradient scale is clipping's, max_norm / (norm + 1e-6) when the norm is over
// max_norm > 0, else 1, in double as optim::scale_for: no read back between the backward
// pass and the update. Without it (null), `gscale`.
extern "C" __global__ void adamw_multi(const unsigned long long* table, float lr, float b1,
        float b2, float c1, float c2, float eps, float wd, float gscale, const double* sumsq,
        double max_norm) {
    if (sumsq) {
        double norm = sqrt(*sumsq);
        gscale = (max_norm > 0.0 && norm > max_norm) ? (float)(max_norm / (norm + 1e-6)) : 1.f;
    }
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
// transpose, 1 flip rows, 2 flip columns), channel C the validity mask; `v - v == 0` is false
// exactly for NaN and infinities. One block of 32 × 8 threads per 32 × 32 output tile
// (grid: tiles across, tiles down, B). A transposed sample's output rows are source columns:
// a warp reading them directly would touch 32 rows of the source, n values apart, so the
// block reads the tile's source pixels along source rows into shared memory and writes the
// output along output rows from there. Untransposed samples take the same steps (each thread
// reads back the value it stored), so reads and writes go along rows in every case.
#define NA_TILE 32
#define NA_ROWS 8
// Six blocks per SM asked: ptxas took 96 registers otherwise (2 blocks per SM), 38 with it.
extern "C" __global__ void __launch_bounds__(NA_TILE * NA_ROWS, 6)
normalise_augment(const float* raw, const float* prm, float* out, int B, int C, int n) {
    __shared__ float tile[NA_TILE][NA_TILE + 1];  // + 1: column reads hit 32 distinct banks
    const int b = blockIdx.z, tx = threadIdx.x, ty = threadIdx.y;
    if (b >= B) return;  // the whole block: no barrier is skipped by only some threads
    const int i0 = blockIdx.y * NA_TILE, j0 = blockIdx.x * NA_TILE;
    const int code = (int)prm[2 * C + b];
    const bool tr = code & 1, fy = code & 2, fx = code & 4;
    const long plane = (long)n * n;
    // The source offset of output pixel (i, j).
    auto source = [&](int i, int j) -> long {
        int a = tr ? j : i, c2 = tr ? i : j;
        int y = fy ? n - 1 - a : a, x = fx ? n - 1 - c2 : c2;
        return (long)y * n + x;
    };
    float ok[NA_TILE / NA_ROWS];
    for (int k = 0; k < NA_TILE / NA_ROWS; ++k) ok[k] = 1.f;
    for (int c = 0; c < C; ++c) {
        const float* src = raw + ((long)b * C + c) * plane;
        // Load: thread (tx, ty + 8k) fetches output pixel (i0 + r, j0 + tx) when untransposed,
        // (i0 + tx, j0 + r) when transposed (r = ty + 8k): adjacent threads, adjacent source
        // columns either way. Out-of-range pixels are neither read nor written.
        for (int k = 0; k < NA_TILE / NA_ROWS; ++k) {
            const int r = ty + k * NA_ROWS;
            const int i = i0 + (tr ? tx : r), j = j0 + (tr ? r : tx);
            if (i < n && j < n) tile[r][tx] = src[source(i, j)];
        }
        __syncthreads();
        // Write: thread (tx, ty + 8k) writes output pixel (i0 + r, j0 + tx), loaded by thread
        // (tx, r) when untransposed and by thread (r, tx) when transposed.
        for (int k = 0; k < NA_TILE / NA_ROWS; ++k) {
            const int r = ty + k * NA_ROWS;
            const int i = i0 + r, j = j0 + tx;
            if (i < n && j < n) {
                const float v = tr ? tile[tx][r] : tile[r][tx];
                const bool finite = (v - v) == 0.f;
                out[((long)b * (C + 1) + c) * plane + (long)i * n + j] =
                    finite ? (v - prm[c]) * prm[C + c] : 0.f;
                if (!finite) ok[k] = 0.f;
            }
        }
        __syncthreads();  // the tile is reloaded for the next channel
    }
    for (int k = 0; k < NA_TILE / NA_ROWS; ++k) {
        const int i = i0 + ty + k * NA_ROWS, j = j0 + tx;
        if (i < n && j < n) out[((long)b * (C + 1) + C) * plane + (long)i * n + j] = ok[k];
    }
}
// Flash attention forward (icefm_model::fused::FlashAttention): bf16 in and out, f32
// arithmetic on tensor cores (mma.sync m16n8k16, sm_80+). qkv [B, N, 3, H, HD] (the qkv
// projection's layout: queries, keys, values, heads interleaved) → out [B, N, H·HD], heads
// merged, softmax(q·kᵀ·scale)·v with no N × N matrix in memory. One block of 4 warps per 64
// queries of one (sample, head); each warp keeps 16 queries' scores and outputs in registers
// (online softmax in the log2 domain) while keys and values pass through shared memory 64 at
// a time; keys past N are masked, queries past N not written.
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
#if defined(ICEFM_EMULATOR)
    emu_mma_m16n8k16_row_col_f32_bf16(d, a, b0, b1);
#elif __CUDA_ARCH__ >= 800
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
#if defined(ICEFM_EMULATOR)
    return emu_cvt_rn_bf16x2_f32(hi, lo);  // the cvt below, operands in its order
#elif __CUDA_ARCH__ >= 800
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
// Shared-memory tiles of FA_KT tokens: a row per token, its head-width values in pairs, padded by
// 16 bytes (rows of 80 or 144 bytes: 16-byte aligned, and the 8 rows an ldmatrix reads fall in
// distinct banks). Products over the head width read them with ldmatrix, products over the tokens
// with ldmatrix .trans: no transposed copies.
template <int HD> using fa_rows = unsigned[FA_KT][HD / 2 + 4];

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
// between tokens, both 16-byte aligned: the host checks) into registers, 16 bytes (8 values of
// one token) at a time, tokens past N as 0; fa_put_rows stores them as a row tile. All
// FA_THREADS threads of the block.
#define FA_THREADS 128
template <int HD> struct fa_stage {
    static constexpr int PIECES = HD / 8;                  // 16-byte pieces per token
    static constexpr int U = FA_KT * PIECES / FA_THREADS;  // pieces per thread
    static constexpr int TPI = FA_THREADS / PIECES;        // tokens per round
    uint4 v[U];
};
// Piece threadIdx.x + it · FA_THREADS: token threadIdx.x / PIECES + it · TPI, piece
// threadIdx.x % PIECES (addresses stepped from one base).
template <int HD>
__device__ __forceinline__ void fa_fetch(fa_stage<HD>& st, const bf16_t* src, long stride, int j0,
                                         int N) {
    constexpr int P = fa_stage<HD>::PIECES, TPI = fa_stage<HD>::TPI;
    int row = j0 + threadIdx.x / P;
    const bf16_t* p = src + row * stride + (threadIdx.x % P) * 8;
    const long step = (long)TPI * stride;
#pragma unroll
    for (int it = 0; it < fa_stage<HD>::U; ++it, row += TPI, p += step)
        st.v[it] = row < N ? *reinterpret_cast<const uint4*>(p) : make_uint4(0u, 0u, 0u, 0u);
}
template <int HD>
__device__ __forceinline__ void fa_put_rows(fa_rows<HD>& dst, const fa_stage<HD>& st) {
    constexpr int P = fa_stage<HD>::PIECES, TPI = fa_stage<HD>::TPI;
    const int tok = threadIdx.x / P, piece = threadIdx.x % P;
#pragma unroll
    for (int it = 0; it < fa_stage<HD>::U; ++it)
        *reinterpret_cast<uint4*>(&dst[tok + it * TPI][piece * 4]) = st.v[it];
}

// Four 8 × 8 matrices of bf16 from shared memory in one instruction (ldmatrix .x4): lane
// 8·i + j gives the address of matrix i's row j (16 bytes, 16-byte aligned), and register i of
// lane l receives matrix i's row l / 4, values 2·(l % 4) and 2·(l % 4) + 1. With a matrix's
// rows along an mma's n and its columns along k, that register is the B fragment's b0 (k 0-7)
// or b1 (k 8-15): one instruction where four 4-byte shared loads were.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const unsigned* row) {
#if defined(ICEFM_EMULATOR)
    emu_ldmatrix_m8n8_x4_b16(r, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}
// The same, transposed (.trans): register i of lane l receives matrix i's values at rows
// 2·(l % 4) and 2·(l % 4) + 1 of column l / 4. With a matrix's rows along an mma's k and its
// columns along n, that is the B fragment's b0 or b1.
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const unsigned* row) {
#if defined(ICEFM_EMULATOR)
    emu_ldmatrix_m8n8_x4_trans_b16(r, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// A warp's 16 rows (fragments `a`) against the FA_KT rows of a tile: c[nt] = a·tileᵀ. The B
// fragments of two k-steps come in one ldmatrix: matrices (k-step kk, columns 0-7), (kk, 8-15),
// (kk + 1, 0-7), (kk + 1, 8-15) of the tile's rows nt·8 .. nt·8 + 7.
template <int HD>
__device__ __forceinline__ void fa_products(float (&c)[FA_KT / 8][4], const unsigned (&a)[HD / 16][4],
                                            const fa_rows<HD>& tile, int lane) {
    const int row = lane & 7, m = lane >> 3;
    for (int nt = 0; nt < FA_KT / 8; ++nt) {
        c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
        for (int kk = 0; kk < HD / 16; kk += 2) {
            unsigned b[4];
            ldsm_x4(b, &tile[nt * 8 + row][(kk + (m >> 1)) * 8 + (m & 1) * 4]);
            mma_bf16(c[nt], a[kk], b[0], b[1]);
            mma_bf16(c[nt], a[kk + 1], b[2], b[3]);
        }
    }
}

// 2^x for the softmax: one ex2.approx.ftz (MUFU.EX2 alone). exp2f is four instructions a value
// on sm_90 (it rescales inputs below -126 to keep denormal results), a third of the flash
// kernels' floating-point instructions; here results below 2^-126 flush to 0 instead.
__device__ __forceinline__ float fa_exp2(float x) {
#if defined(ICEFM_EMULATOR)
    return emu_ex2_approx_ftz_f32(x);
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}

// Raw scores of keys (columns) at or past N set to -inf. Scores stay unscaled: the softmax scale
// (in the log2 domain) enters each exponent's FFMA, exp2(s·scale − max·scale), and the running
// maxima are of raw scores (the scale is positive). Only the last tile has keys past N: the
// forward masks that one alone; the backward kernels mask every tile, since the branch cost them
// 40-50 registers, by ptxas.
__device__ __forceinline__ void fa_mask(float (&s)[FA_KT / 8][4], int j0, int N, int t) {
    for (int nt = 0; nt < FA_KT / 8; ++nt)
        for (int e = 0; e < 4; ++e) {
            int key = j0 + nt * 8 + t * 2 + (e & 1);
            s[nt][e] = key < N ? s[nt][e] : FA_NEG_INF;
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

// acc[u] += A·tile for the u-th 8 head-width columns, over the tile's FA_KT tokens (k). The B
// fragments of two column groups u, u + 1 in one ldmatrix .trans of the row tile: matrices
// (tokens 16·kstep + 0-7, columns of u), (tokens + 8-15, u), (0-7, u + 1), (8-15, u + 1).
template <int HD>
__device__ __forceinline__ void fa_accumulate(float (&acc)[HD / 8][4], const float (&c)[FA_KT / 8][4],
                                              const fa_rows<HD>& tile, int lane) {
    const int row = lane & 7, m = lane >> 3;
    for (int kstep = 0; kstep < FA_KT / 16; ++kstep) {
        unsigned a[4];
        fa_as_a(c, kstep, a);
        for (int u = 0; u < HD / 8; u += 2) {
            unsigned b[4];
            ldsm_x4_trans(b, &tile[kstep * 16 + (m & 1) * 8 + row][(u + (m >> 1)) * 4]);
            mma_bf16(acc[u], a, b[0], b[1]);
            mma_bf16(acc[u + 1], a, b[2], b[3]);
        }
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
    __shared__ __align__(16) fa_rows<HD> ks;  // keys
    __shared__ __align__(16) fa_rows<HD> vs;  // values
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
        fa_put_rows<HD>(vs, sv);
        __syncthreads();
        if (PF && j0 + FA_KT < N) {  // the next tile's loads, in flight during this tile's products
            fa_fetch<HD>(sk, kbase, stride, j0 + FA_KT, N);
            fa_fetch<HD>(sv, vbase, stride, j0 + FA_KT, N);
        }
        float s[FA_KT / 8][4];
        fa_products<HD>(s, qa, ks, lane);
        if (j0 + FA_KT > N) fa_mask(s, j0, N, t);
        float mx0 = m0, mx1 = m1;
        fa_row_max(s, mx0, mx1);
        float c0 = fa_exp2((m0 - mx0) * scale_log2), c1 = fa_exp2((m1 - mx1) * scale_log2);
        m0 = mx0;
        m1 = mx1;
        const float ms0 = m0 * scale_log2, ms1 = m1 * scale_log2;
        float p0 = 0.f, p1 = 0.f;
        for (int nt = 0; nt < FA_KT / 8; ++nt) {
            s[nt][0] = fa_exp2(fmaf(s[nt][0], scale_log2, -ms0));
            s[nt][1] = fa_exp2(fmaf(s[nt][1], scale_log2, -ms0));
            s[nt][2] = fa_exp2(fmaf(s[nt][2], scale_log2, -ms1));
            s[nt][3] = fa_exp2(fmaf(s[nt][3], scale_log2, -ms1));
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
        fa_accumulate<HD>(o, s, vs, lane);
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    fa_store<HD>(out + (long)b * N * H * HD + h * HD, (long)H * HD, o, r0, r1, N, t, 1.f / l0, 1.f / l1);
    // Each query's log-sum-exp (log2 domain, [B, H, N]), for the backward's dq kernel.
    if (t == 0) {
        const long row_at = ((long)b * H + h) * N;
        if (r0 < N) lse[row_at + r0] = m0 * scale_log2 + log2f(l0);
        if (r1 < N) lse[row_at + r1] = m1 * scale_log2 + log2f(l1);
    }
}
// The launch bounds last: ptxas's own choice of registers for all but flash_fwd_32_pf, which
// spilled 8 bytes at the 96 it chose (with 4 blocks per SM asked: 121, no spill; with ldmatrix
// that spilled too, so 3 are asked: 141, no spill). Asking for 1
// block per SM is not the same as asking nothing: flash_fwd_32 then took 109 registers, not 80.
#define FLASH_FWD(NAME, HD, PF, ...)                                                           \
extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME(const bf16_t* qkv,              \
        bf16_t* out, float* lse, int N, int H, float scale_log2) {                             \
    flash_fwd_k<HD, PF>(qkv, out, lse, N, H, scale_log2); }
FLASH_FWD(flash_fwd_32, 32, false, FA_THREADS, 6)
FLASH_FWD(flash_fwd_64, 64, false, FA_THREADS, 4)
FLASH_FWD(flash_fwd_32_pf, 32, true, FA_THREADS, 3)
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
// the forward; the operands that enter as B go through shared memory as row tiles, read with
// ldmatrix where the product runs over the head width and with ldmatrix .trans where it runs
// over the tokens.
__device__ __forceinline__ float2 unpack_bf16(unsigned u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

// LSE: the forward's log-sum-exp is in `lse` already, so pass 1 is skipped.
template <int HD, bool PF, bool LSE>
__device__ __forceinline__ void flash_bwd_dq_k(const bf16_t* qkv, const bf16_t* o, const bf16_t* dout,
        bf16_t* dqkv, float* lse, float* dvec, int N, int H, float scale_log2, float scale) {
    __shared__ __align__(16) fa_rows<HD> ks;  // keys
    __shared__ __align__(16) fa_rows<HD> vs;  // values
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
            fa_products<HD>(s, qa, ks, lane);
            fa_mask(s, j0, N, t);
            float mx0 = m0, mx1 = m1;
            fa_row_max(s, mx0, mx1);
            const float ms0 = mx0 * scale_log2, ms1 = mx1 * scale_log2;
            float p0 = 0.f, p1 = 0.f;
            for (int nt = 0; nt < FA_KT / 8; ++nt) {
                p0 += fa_exp2(fmaf(s[nt][0], scale_log2, -ms0)) + fa_exp2(fmaf(s[nt][1], scale_log2, -ms0));
                p1 += fa_exp2(fmaf(s[nt][2], scale_log2, -ms1)) + fa_exp2(fmaf(s[nt][3], scale_log2, -ms1));
            }
            l0 = l0 * fa_exp2((m0 - mx0) * scale_log2) + p0;
            l1 = l1 * fa_exp2((m1 - mx1) * scale_log2) + p1;
            m0 = mx0;
            m1 = mx1;
        }
        lse0 = m0 * scale_log2 + log2f(quad_sum(l0));
        lse1 = m1 * scale_log2 + log2f(quad_sum(l1));
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
        fa_put_rows<HD>(vs, sv);
        __syncthreads();
        if (PF && j0 + FA_KT < N) {
            fa_fetch<HD>(sk, kbase, stride, j0 + FA_KT, N);
            fa_fetch<HD>(sv, vbase, stride, j0 + FA_KT, N);
        }
        float s[FA_KT / 8][4], dp[FA_KT / 8][4];
        fa_products<HD>(s, qa, ks, lane);
        fa_products<HD>(dp, da, vs, lane);
        fa_mask(s, j0, N, t);
        for (int nt = 0; nt < FA_KT / 8; ++nt)
            for (int e = 0; e < 4; ++e)  // dS; masked keys have P = exp2(-inf) = 0
                s[nt][e] = fa_exp2(fmaf(s[nt][e], scale_log2, -(e < 2 ? lse0 : lse1))) *
                           (dp[nt][e] - (e < 2 ? d0 : d1));
        fa_accumulate<HD>(dq, s, ks, lane);
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
    __shared__ __align__(16) fa_rows<HD> qs;  // queries
    __shared__ __align__(16) fa_rows<HD> gs;  // dO
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
        fa_put_rows<HD>(gs, sg);
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
        fa_products<HD>(p, ka, qs, lane);
        fa_products<HD>(ds, va, gs, lane);
        for (int nt = 0; nt < FA_KT / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                int q = nt * 8 + t * 2 + (e & 1);
                p[nt][e] = fa_exp2(fmaf(p[nt][e], scale_log2, -ls[q]));  // Pᵀ; 0 past N (ls = inf)
                ds[nt][e] = p[nt][e] * (ds[nt][e] - dl[q]);       // dSᵀ
            }
        fa_accumulate<HD>(dv, p, gs, lane);
        fa_accumulate<HD>(dk, ds, qs, lane);
    }
    bf16_t* dbase = dqkv + (long)b * N * stride;
    fa_store<HD>(dbase + (H + h) * HD, stride, dk, k0, k1, N, t, scale, scale);
    fa_store<HD>(dbase + (2 * H + h) * HD, stride, dv, k0, k1, N, t, 1.f, 1.f);
}
#define FLASH_BWD_DQ(SUFFIX, HD, PF, LSE, ...)                                                \
extern "C" __global__ void __launch_bounds__(__VA_ARGS__) flash_bwd_dq_##SUFFIX(               \
        const bf16_t* qkv, const bf16_t* o, const bf16_t* dout, bf16_t* dqkv, float* lse,      \
        float* dvec, int N, int H, float scale_log2, float scale) {                            \
    flash_bwd_dq_k<HD, PF, LSE>(qkv, o, dout, dqkv, lse, dvec, N, H, scale_log2, scale); }
#define FLASH_BWD_DKV(SUFFIX, HD, PF, ...)                                                     \
extern "C" __global__ void __launch_bounds__(__VA_ARGS__) flash_bwd_dkv_##SUFFIX(              \
        const bf16_t* qkv, const bf16_t* dout, const float* lse, const float* dvec,            \
        bf16_t* dqkv, int N, int H, float scale_log2, float scale) {                           \
    flash_bwd_dkv_k<HD, PF>(qkv, dout, lse, dvec, dqkv, N, H, scale_log2, scale); }
FLASH_BWD_DQ(32, 32, false, false, FA_THREADS, 7)
FLASH_BWD_DQ(lse_32, 32, false, true, FA_THREADS, 7)
FLASH_BWD_DQ(64, 64, false, false, FA_THREADS)
FLASH_BWD_DQ(lse_64, 64, false, true, FA_THREADS)
FLASH_BWD_DQ(32_pf, 32, true, false, FA_THREADS)
FLASH_BWD_DQ(lse_32_pf, 32, true, true, FA_THREADS)
FLASH_BWD_DKV(32, 32, false, FA_THREADS)
FLASH_BWD_DKV(64, 64, false, FA_THREADS)
FLASH_BWD_DKV(32_pf, 32, true, FA_THREADS)
FLASH_BWD_DKV(64_pf, 64, true, FA_THREADS, 1)
// The inline-PTX primitives of the flash kernels, each on known inputs, for one warp (a CUDA test
// and the CPU emulator's test compare the words with what the PTX ISA defines, so a GPU that
// disagrees with the emulator shows which primitive): out[0..128) ldmatrix .x4 and
// out[128..256) ldmatrix .x4.trans of a 16 × 16 tile whose value (r, c) is the bf16 bit pattern
// r·16 + c, four registers per lane; out[256..288) pack_bf16(1 + lane / 8, −2 − lane / 4);
// out[288..320) fa_exp2(−lane · 4.25 − 100) as f32 bits (below −126: flushed to 0).
extern "C" __global__ void ptx_probe(unsigned* out) {
    __shared__ __align__(16) unsigned tile[16][8];
    const int lane = threadIdx.x & 31;
    for (int w = lane; w < 128; w += 32) {
        const int r = w / 8, c = 2 * (w % 8);
        tile[r][w % 8] = (unsigned)(r * 16 + c) | ((unsigned)(r * 16 + c + 1) << 16);
    }
    __syncthreads();
    const int m = lane >> 3, row = (m & 1) * 8 + (lane & 7);
    unsigned r[4];
    ldsm_x4(r, &tile[row][(m >> 1) * 4]);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
    ldsm_x4_trans(r, &tile[row][(m >> 1) * 4]);
    for (int i = 0; i < 4; ++i) out[128 + lane * 4 + i] = r[i];
    out[256 + lane] = pack_bf16(1.f + lane / 8, -2.f - lane / 4);
    out[288 + lane] = __float_as_uint(fa_exp2(-lane * 4.25f - 100.f));
}

// 3 x 3 im2col on channels-last maps (icefm_model::seg::Im2col3): x [B, H, W, C] →
// cols [B, H, W, 9·C], cols[.., (dy·3 + dx)·C + c] = x[b, y + dy − 1, x + dx − 1, c] (0 outside),
// or with `mirror` x[b, y − dy + 1, x − dx + 1, c] (the taps point-reflected: a convolution's
// input gradient as a convolution of the output gradient), and the adjoint of the first: each
// input value the sum of the nine places it was copied to. One thread per output value
// (grid-stride), consecutive threads on consecutive channels.
template <typename T>
__device__ void im2col3_k(const T* x, T* cols, int B, int H, int W, int C, int mirror) {
    long total = (long)B * H * W * 9 * C;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        int c = (int)(i % C);
        long r = i / C;
        int tap = (int)(r % 9);
        long p = r / 9;
        int px = (int)(p % W), py = (int)((p / W) % H);
        long b = p / ((long)W * H);
        int oy = tap / 3 - 1, ox = tap % 3 - 1;
        int sy = mirror ? py - oy : py + oy, sx = mirror ? px - ox : px + ox;
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
extern "C" __global__ void im2col3_f32(const float* x, float* y, int B, int H, int W, int C,
                                       int mirror) {
    im2col3_k<float>(x, y, B, H, W, C, mirror);
}
extern "C" __global__ void im2col3_bf16(const bf16_t* x, bf16_t* y, int B, int H, int W, int C,
                                        int mirror) {
    im2col3_k<bf16_t>(x, y, B, H, W, C, mirror);
}
extern "C" __global__ void col2im3_f32(const float* g, float* y, int B, int H, int W, int C) {
    col2im3_k<float>(g, y, B, H, W, C);
}
extern "C" __global__ void col2im3_bf16(const bf16_t* g, bf16_t* y, int B, int H, int W, int C) {
    col2im3_k<bf16_t>(g, y, B, H, W, C);
}
