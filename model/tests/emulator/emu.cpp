// A CPU emulator for icefm's CUDA kernels (model/src/kernels.cu), for tests on machines without
// a GPU: the kernels' own source, compiled as C++, runs block by block, every CUDA thread of a
// block a coroutine on one OS thread.
//
// A thread runs until it reaches a barrier (`__syncthreads`) or a warp collective (shuffles,
// `mma.sync`), then the next thread runs. A barrier opens when every live thread of the block
// waits at it; a warp collective completes when every lane of its mask waits at it, and then
// computes all lanes' results at once (mma with the PTX fragment layouts). So threads run
// serially between synchronisation points, in an order the caller picks (forward, reverse or
// seeded random): a legal schedule under CUDA's independent thread scheduling, and one that
// makes a missing barrier visible, because the threads of a block then see each other's
// shared-memory writes in a different order. Deadlocks (a barrier some threads never reach),
// collectives that lanes reach at different places, and `__trap` end the launch with an error
// instead of hanging. Shared memory is per-OS-thread static storage (`__shared__` →
// `static thread_local`): blocks run one after another, and before each block all of this
// library's thread-local storage but the emulator's own state is filled with 0xff bytes (NaN
// floats), as is dynamic shared memory, so a read of shared memory that no thread of the block
// wrote shows as NaN instead of a value left by an earlier block.
//
// What it does not model: timing, memory coalescing, real concurrency between warps (so no
// data races beyond ordering), out-of-bounds accesses (the tests put NaN guard zones around
// buffers instead), and tensor cores' own rounding (mma sums in double, then rounds to f32).
//
// C interface (tests/common/emulator.rs): emu_launch, and every kernel as an exported C function
// that must be called from inside emu_launch's body callback.

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

// ---- The CUDA surface the kernels use.
#define ICEFM_EMULATOR 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
// At least 128-byte alignment, so that a shared array's offsets modulo 128 (and so its banks) are
// those of the GPU, where the kernels' shared arrays start on 128-byte multiples.
#define __align__(n) __attribute__((aligned((n) > 128 ? (n) : 128)))
#define ICEFM_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(emu_dynamic_shared())

struct uint3 {
    unsigned x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return {x, y, z, w};
}

static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float emu_expf(float x) { return expf(x); }
static inline float emu_rsqrtf(float x) { return 1.f / sqrtf(x); }
#define __expf emu_expf  // glibc declares its own __expf
#define rsqrtf emu_rsqrtf
// prmt.b32 (default mode): result byte i = byte (s >> 4i) & 7 of {y, x} (x the low word).
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
// One CUDA thread at a time runs on an OS thread: read-modify-write is atomic.
static inline float atomicAdd(float* p, float v) {
    float o = *p;
    *p = o + v;
    return o;
}
static inline double atomicAdd(double* p, double v) {
    double o = *p;
    *p = o + v;
    return o;
}

namespace emu {

enum class State { Ready, AtBarrier, AtWarp, Done };
enum class Op { ShflXor, ShflIdx, Mma, Ldsm, LdsmTrans };

struct Thread {
    ucontext_t ctx;
    uint3 tid;
    unsigned lin;  // linear index in the block
    State state;
    // The pending warp collective.
    Op op;
    unsigned mask;
    uint32_t in, out;
    int arg;
    float* d;
    const unsigned* a;
    unsigned b0, b1;
    unsigned* r;          // ldmatrix: this lane's four registers
    const unsigned* row;  // ldmatrix: the row this lane addresses
};

struct Block {
    std::vector<Thread> threads;
    std::vector<char*> stacks;
    ucontext_t sched;
    void (*body)(void*);
    void* ctx;
    std::vector<unsigned char> dynamic_shared;
    std::string error;
};

constexpr size_t STACK = 256 * 1024;

thread_local Block* block;
// The worst ldmatrix bank conflict since the last emu_stats_reset on this OS thread: the most
// rows of one 8 × 8 matrix (one shared-memory wavefront of 128 bytes) that fall in the same four
// banks at distinct addresses. 1 is conflict-free.
thread_local unsigned ldmatrix_conflict;
thread_local Thread* cur;
thread_local uint3 block_idx, block_dim, grid_dim;

inline void yield() { swapcontext(&cur->ctx, &block->sched); }

// Ends the calling thread with an error: the launch fails after this pass.
[[noreturn]] void fail(const std::string& what) {
    if (block->error.empty()) {
        char where[96];
        snprintf(where, sizeof where, " (block %u,%u,%u thread %u)", block_idx.x, block_idx.y,
                 block_idx.z, cur->lin);
        block->error = what + where;
    }
    cur->state = State::Done;
    yield();
    abort();  // never resumed
}

// The calling thread, marked as waiting at warp collective `op` over the lanes of `mask`; the
// caller sets the collective's operands, then yields.
inline Thread* arrive(Op op, unsigned mask) {
    cur->state = State::AtWarp;
    cur->op = op;
    cur->mask = mask;
    return cur;
}

template <typename T>
T warp_op(Op op, unsigned mask, T v, int arg) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    Thread* me = arrive(op, mask);
    memcpy(&me->in, &v, 4);
    me->arg = arg;
    yield();
    T r;
    memcpy(&r, &me->out, 4);
    return r;
}

}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

static inline void __syncthreads() {
    emu::cur->state = emu::State::AtBarrier;
    emu::yield();
}
template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    if (width != 32) emu::fail("shuffle width other than 32");
    return emu::warp_op(emu::Op::ShflXor, mask, v, lane_mask);
}
template <typename T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    if (width != 32) emu::fail("shuffle width other than 32");
    return emu::warp_op(emu::Op::ShflIdx, mask, v, src);
}
[[noreturn]] static inline void __trap() { emu::fail("__trap"); }
static inline void* emu_dynamic_shared() { return emu::block->dynamic_shared.data(); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, d: a warp collective.
static inline void emu_mma_m16n8k16_row_col_f32_bf16(float* d, const unsigned* a, unsigned b0,
                                                     unsigned b1) {
    emu::Thread* me = emu::arrive(emu::Op::Mma, 0xffffffffu);
    me->d = d;
    me->a = a;
    me->b0 = b0;
    me->b1 = b1;
    emu::yield();
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 {r0..r3}, [row]: a warp collective (`op`
// Ldsm or LdsmTrans).
static inline void emu_ldmatrix(emu::Op op, unsigned (&r)[4], const unsigned* row) {
    if (reinterpret_cast<uintptr_t>(row) % 16) emu::fail("ldmatrix row address not 16-byte aligned");
    emu::Thread* me = emu::arrive(op, 0xffffffffu);
    me->r = r;
    me->row = row;
    emu::yield();
}
static inline void emu_ldmatrix_m8n8_x4_b16(unsigned (&r)[4], const unsigned* row) {
    emu_ldmatrix(emu::Op::Ldsm, r, row);
}
static inline void emu_ldmatrix_m8n8_x4_trans_b16(unsigned (&r)[4], const unsigned* row) {
    emu_ldmatrix(emu::Op::LdsmTrans, r, row);
}

// cvt.rn.bf16x2.f32 d, a, b: a rounded to nearest even into the upper half of d, b the lower.
static inline unsigned emu_bf16_rn(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // canonical NaN
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
static inline unsigned emu_cvt_rn_bf16x2_f32(float a, float b) {
    return (emu_bf16_rn(a) << 16) | emu_bf16_rn(b);
}

// ex2.approx.ftz.f32: 2^x with denormal inputs and results flushed to zero (the hardware's
// approximation is within 2 ulp; this is exact before the flush).
static inline float emu_ex2_approx_ftz_f32(float x) {
    if (fabsf(x) < 1.17549435e-38f) x = 0.f;
    float r = exp2f(x);
    return r < 1.17549435e-38f ? 0.f : r;
}

#include "../../src/kernels.cu"

// ---- The scheduler.
namespace emu {

float bf_lo(unsigned u) { return __uint_as_float(u << 16); }
float bf_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

// D = A·B + C over the warp's fragments (lane = 4g + t).
void mma(Thread* const* lane) {
    float A[16][16], B[16][8];
    double C[16][8];
    for (int l = 0; l < 32; ++l) {
        const Thread* th = lane[l];
        int g = l >> 2, t = l & 3;
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int r = 0; r < 4; ++r) {
            A[rows[r]][cols[r]] = bf_lo(th->a[r]);
            A[rows[r]][cols[r] + 1] = bf_hi(th->a[r]);
        }
        B[2 * t][g] = bf_lo(th->b0);
        B[2 * t + 1][g] = bf_hi(th->b0);
        B[2 * t + 8][g] = bf_lo(th->b1);
        B[2 * t + 9][g] = bf_hi(th->b1);
        C[g][2 * t] = th->d[0];
        C[g][2 * t + 1] = th->d[1];
        C[g + 8][2 * t] = th->d[2];
        C[g + 8][2 * t + 1] = th->d[3];
    }
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j)
            for (int k = 0; k < 16; ++k) C[i][j] += (double)A[i][k] * B[k][j];
    for (int l = 0; l < 32; ++l) {
        int g = l >> 2, t = l & 3;
        float* d = lane[l]->d;
        d[0] = (float)C[g][2 * t];
        d[1] = (float)C[g][2 * t + 1];
        d[2] = (float)C[g + 8][2 * t];
        d[3] = (float)C[g + 8][2 * t + 1];
    }
}

// Completes warp w's pending collective if every lane of its mask waits at it. Returns whether
// it did; sets the block's error for collectives that cannot complete.
bool resolve_warp(Block& b, unsigned w) {
    const unsigned first = 32 * w, n = (unsigned)b.threads.size();
    Thread* lanes[32] = {};
    const Thread* lead = nullptr;
    for (unsigned l = 0; l < 32 && first + l < n; ++l) {
        lanes[l] = &b.threads[first + l];
        if (!lead && lanes[l]->state == State::AtWarp) lead = lanes[l];
    }
    if (!lead) return false;
    const unsigned mask = lead->mask;
    for (unsigned l = 0; l < 32; ++l) {
        Thread* th = lanes[l];
        bool in_mask = (mask >> l) & 1u;
        if (th && th->state == State::AtWarp && th->mask != mask) {
            b.error = "lanes of a warp wait at collectives with different masks";
            return false;
        }
        if (!in_mask) continue;
        if (!th) {
            b.error = "a warp collective's mask names a lane the block does not have";
            return false;
        }
        if (th->state == State::Done) {
            b.error = "a warp collective waits for a lane that has exited";
            return false;
        }
        if (th->state != State::AtWarp) return false;  // not there yet
        if (th->op != lead->op) {
            b.error = "the lanes of a warp reached different collectives";
            return false;
        }
    }
    if (lead->op == Op::Ldsm || lead->op == Op::LdsmTrans) {
        for (unsigned i = 0; i < 4; ++i) {
            unsigned hits[8] = {};
            for (unsigned j = 0; j < 8; ++j) {
                const uintptr_t a = reinterpret_cast<uintptr_t>(lanes[8 * i + j]->row);
                bool repeat = false;  // the same row twice is a broadcast, not a conflict
                for (unsigned k = 0; k < j; ++k)
                    repeat |= reinterpret_cast<uintptr_t>(lanes[8 * i + k]->row) == a;
                if (!repeat) ldmatrix_conflict = std::max(ldmatrix_conflict, ++hits[(a / 16) % 8]);
            }
        }
    }
    if (lead->op == Op::Mma || lead->op == Op::Ldsm || lead->op == Op::LdsmTrans) {
        if (mask != 0xffffffffu) {
            b.error = "mma.sync and ldmatrix need the whole warp";
            return false;
        }
        if (lead->op == Op::Mma) {
            mma(lanes);
        } else if (lead->op == Op::LdsmTrans) {
            // Register i of lane l: matrix i's column l / 4 at rows 2·(l % 4) (low half) and
            // 2·(l % 4) + 1 (high half); row r of matrix i is addressed by lane 8·i + r.
            unsigned out[32][4];
            for (unsigned l = 0; l < 32; ++l)
                for (unsigned i = 0; i < 4; ++i) {
                    const auto* lo = reinterpret_cast<const uint16_t*>(lanes[8 * i + 2 * (l % 4)]->row);
                    const auto* hi = reinterpret_cast<const uint16_t*>(lanes[8 * i + 2 * (l % 4) + 1]->row);
                    out[l][i] = (unsigned)lo[l / 4] | ((unsigned)hi[l / 4] << 16);
                }
            for (unsigned l = 0; l < 32; ++l)
                for (unsigned i = 0; i < 4; ++i) lanes[l]->r[i] = out[l][i];
        } else {
            // Register i of lane l: matrix i's row l / 4 (addressed by lane 8·i + l / 4), its
            // 32-bit word l % 4.
            unsigned out[32][4];
            for (unsigned l = 0; l < 32; ++l)
                for (unsigned i = 0; i < 4; ++i) out[l][i] = lanes[8 * i + l / 4]->row[l % 4];
            for (unsigned l = 0; l < 32; ++l)
                for (unsigned i = 0; i < 4; ++i) lanes[l]->r[i] = out[l][i];
        }
    } else {
        for (unsigned l = 0; l < 32; ++l) {
            if (!((mask >> l) & 1u)) continue;
            unsigned src = lead->op == Op::ShflXor ? (l ^ (unsigned)lanes[l]->arg) & 31u
                                                   : (unsigned)lanes[l]->arg & 31u;
            // A source lane outside the mask gives an undefined value: NaN here.
            lanes[l]->out = ((mask >> src) & 1u) ? lanes[src]->in : 0x7fc00000u;
        }
    }
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) lanes[l]->state = State::Ready;
    return true;
}

void entry() {
    block->body(block->ctx);
    cur->state = State::Done;
    yield();
    abort();  // never resumed
}

std::string describe_wait(const Block& b) {
    unsigned barrier = 0, warp = 0, done = 0;
    for (const Thread& t : b.threads) {
        barrier += t.state == State::AtBarrier;
        warp += t.state == State::AtWarp;
        done += t.state == State::Done;
    }
    char s[160];
    snprintf(s, sizeof s, "deadlock: %u threads at a barrier, %u at warp collectives, %u exited",
             barrier, warp, done);
    return s;
}

// This library's thread-local storage block in the calling thread.
struct Span {
    unsigned char* at = nullptr;
    size_t len = 0;
};
int find_tls(struct dl_phdr_info* info, size_t, void* data) {
    Dl_info self;
    if (!dladdr(reinterpret_cast<void*>(&find_tls), &self)) return 0;
    if (info->dlpi_addr != reinterpret_cast<ElfW(Addr)>(self.dli_fbase)) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i)
        if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_data) {
            auto* s = static_cast<Span*>(data);
            s->at = static_cast<unsigned char*>(info->dlpi_tls_data);
            s->len = info->dlpi_phdr[i].p_memsz;
        }
    return 1;
}

// Fills static shared memory (all thread-local storage of this library) with 0xff bytes,
// keeping the emulator's own thread-local state.
void poison_shared() {
    Span s;
    dl_iterate_phdr(find_tls, &s);
    if (!s.at) return;
    // Every thread_local of the emulator itself (namespace emu, above) is kept.
    Block* b = block;
    Thread* c = cur;
    uint3 bi = block_idx, bd = block_dim, gd = grid_dim;
    unsigned conflict = ldmatrix_conflict;
    memset(s.at, 0xff, s.len);
    block = b;
    cur = c;
    block_idx = bi;
    block_dim = bd;
    grid_dim = gd;
    ldmatrix_conflict = conflict;
}

// Runs one block; false (with b.error) on a deadlock, a failed collective or a trap.
bool run_block(Block& b, const std::vector<unsigned>& order) {
    const unsigned n = (unsigned)b.threads.size();
    for (unsigned i = 0; i < n; ++i) {
        Thread& t = b.threads[i];
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = b.stacks[i];
        t.ctx.uc_stack.ss_size = STACK;
        t.ctx.uc_link = nullptr;
        makecontext(&t.ctx, entry, 0);
        t.lin = i;
        t.tid = {i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        t.state = State::Ready;
    }
    std::fill(b.dynamic_shared.begin(), b.dynamic_shared.end(), 0xff);  // NaN floats
    poison_shared();
    for (;;) {
        for (unsigned i : order) {
            Thread& t = b.threads[i];
            if (t.state != State::Ready) continue;
            cur = &t;
            swapcontext(&b.sched, &t.ctx);
        }
        if (!b.error.empty()) return false;
        bool moved = false, live = false, all_at_barrier = true;
        for (unsigned w = 0; w * 32 < n; ++w) moved |= resolve_warp(b, w);
        if (!b.error.empty()) return false;
        if (moved) continue;
        for (Thread& t : b.threads) {
            if (t.state == State::Done) continue;
            live = true;
            all_at_barrier &= t.state == State::AtBarrier;
        }
        if (!live) return true;
        if (!all_at_barrier) {
            b.error = describe_wait(b);
            return false;
        }
        for (Thread& t : b.threads)
            if (t.state == State::AtBarrier) t.state = State::Ready;
    }
}

}  // namespace emu

extern "C" {

// Runs `body(ctx)` as every thread of a grid[0] × grid[1] × grid[2] grid of
// block[0] × block[1] × block[2] blocks. order: 0 threads in index order between synchronisation
// points, 1 reverse, 2 + s a random order from seed s (drawn again for each block). Returns 0, or
// 1 with a message in err.
int emu_launch(const unsigned* grid, const unsigned* blk, size_t shared_bytes,
               void (*body)(void*), void* ctx, unsigned long long order, char* err,
               size_t err_len) {
    using namespace emu;
    const unsigned n = blk[0] * blk[1] * blk[2];
    if (n == 0 || n > 1024 || grid[0] * grid[1] * grid[2] == 0) {
        snprintf(err, err_len, "bad launch: grid %u×%u×%u, block %u×%u×%u", grid[0], grid[1],
                 grid[2], blk[0], blk[1], blk[2]);
        return 1;
    }
    Block b;
    b.threads.resize(n);
    b.body = body;
    b.ctx = ctx;
    b.dynamic_shared.resize(shared_bytes);
    for (unsigned i = 0; i < n; ++i) {
        void* s = mmap(nullptr, STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (s == MAP_FAILED) {
            for (char* p : b.stacks) munmap(p, STACK);
            snprintf(err, err_len, "no memory for %u thread stacks", n);
            return 1;
        }
        mprotect(s, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting
        b.stacks.push_back(static_cast<char*>(s));
    }
    std::vector<unsigned> sequence(n);
    for (unsigned i = 0; i < n; ++i) sequence[i] = order == 1 ? n - 1 - i : i;
    std::mt19937_64 rng(order >= 2 ? order - 2 : 0);
    Block* outer = block;
    Thread* outer_cur = cur;
    block = &b;
    grid_dim = {grid[0], grid[1], grid[2]};
    block_dim = {blk[0], blk[1], blk[2]};
    int rc = 0;
    for (unsigned z = 0; z < grid[2] && rc == 0; ++z)
        for (unsigned y = 0; y < grid[1] && rc == 0; ++y)
            for (unsigned x = 0; x < grid[0] && rc == 0; ++x) {
                block_idx = {x, y, z};
                if (order >= 2) std::shuffle(sequence.begin(), sequence.end(), rng);
                if (!run_block(b, sequence)) {
                    snprintf(err, err_len, "block (%u, %u, %u): %s", x, y, z, b.error.c_str());
                    rc = 1;
                }
            }
    for (char* p : b.stacks) munmap(p, STACK);
    block = outer;
    cur = outer_cur;
    return rc;
}

}  // extern "C"

// Probes for the emulator's own tests (tests/kernels_emulated.rs), callable inside a launch.
extern "C" unsigned emu_probe_thread() { return emu::cur->lin; }
extern "C" void emu_probe_syncthreads() { __syncthreads(); }
extern "C" float emu_probe_shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
__shared__ unsigned emu_probe_word;
extern "C" unsigned emu_probe_shared_read() { return emu_probe_word; }
extern "C" void emu_probe_shared_write(unsigned v) { emu_probe_word = v; }
extern "C" unsigned emu_probe_block() { return blockIdx.x; }

// Statistics for tests: reset, and the worst ldmatrix bank conflict since (1: none).
extern "C" void emu_stats_reset() { emu::ldmatrix_conflict = 0; }
extern "C" unsigned emu_stats_ldmatrix_conflict() { return emu::ldmatrix_conflict; }
