//! icefm's CUDA kernels (`model/src/kernels.cu`) run on the CPU by the emulator in
//! `tests/emulator/`, against the CPU references of their ops: the kernels' own source, so that
//! a kernel written on a machine without a GPU has its indexing, tiling, barriers and
//! warp-level arithmetic checked before any GPU time is spent on it. Every launch mirrors the
//! configuration `model/src/cuda/` uses (or a smaller one that exercises the same loops);
//! buffers carry NaN guard zones and outputs start as NaN, so reads past an end, writes past an
//! end and elements never written all fail. Kernels that have no atomics are also run with
//! their threads in other orders between barriers, and must give the same bits. The flash
//! kernels' `ldmatrix` loads must be free of shared-memory bank conflicts.
//!
//! Needs a C++17 compiler (`$CXX` or `c++`); no CUDA toolkit, no GPU.
#![allow(clippy::unwrap_used)]
#![allow(unsafe_code)] // calls into the kernel emulator (FFI); each block states its contract

use candle_core::{DType, Device, Tensor, Var};
use icefm_model::{fused, ops};

mod common;
mod emulator;
use common::max_rel;
use emulator::{Buffer, Elem, Order, emulator};

/// Host element types of the kernels' buffers.
trait Host: Elem {
    const DTYPE: DType;
    fn of(t: &Tensor) -> Vec<Self>;
    fn tensor(v: &[Self], shape: &[usize]) -> Tensor;
}
impl Host for f32 {
    const DTYPE: DType = DType::F32;
    fn of(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }
}
/// bf16, as its bits.
impl Host for u16 {
    const DTYPE: DType = DType::BF16;
    fn of(t: &Tensor) -> Vec<u16> {
        t.to_dtype(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .into_iter()
            .map(half::bf16::to_bits)
            .collect()
    }
    fn tensor(v: &[u16], shape: &[usize]) -> Tensor {
        let h: Vec<half::bf16> = v.iter().map(|&b| half::bf16::from_bits(b)).collect();
        Tensor::from_vec(h, shape, &Device::Cpu).unwrap()
    }
}

/// A seeded CPU tensor of `dtype`, uniform in `[-scale, scale)`.
fn random(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    common::random(shape, seed, scale, dtype)
}

/// `got` has no NaN or infinity and is within `tol` of `want` (relative to `want`'s largest).
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let g = common::values(got);
    if let Some(i) = g.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} of {} is {}", g.len(), g[i]);
    }
    let e = max_rel(got, want);
    assert!(e < tol, "{what}: off by {e:.3e} (limit {tol:.1e})");
}

// ---- The emulator itself.

type ProbeFn = unsafe extern "C" fn() -> u32;
type SyncFn = unsafe extern "C" fn();
type ShflFn = unsafe extern "C" fn(f32, i32) -> f32;

/// The emulated thread's block index (x).
fn emu_block() -> u32 {
    // SAFETY: the probe's C signature; called only inside launches.
    let f: ProbeFn = unsafe { emulator().kernel("emu_probe_block") };
    // SAFETY: as above.
    unsafe { f() }
}

#[test]
fn the_emulator_runs_threads_to_their_barriers_and_completes_shuffles() {
    let emu = emulator();
    // SAFETY: the probes' C signatures (emu.cpp), called only inside launches.
    let (thread, sync, shfl): (ProbeFn, SyncFn, ShflFn) = unsafe {
        (
            emu.kernel("emu_probe_thread"),
            emu.kernel("emu_probe_syncthreads"),
            emu.kernel("emu_probe_shfl_xor"),
        )
    };
    // Each thread writes its slot of a block-shared array, then reads its neighbour's. With the
    // barrier, every order gives the neighbour's value. Without it, some thread always reads
    // its neighbour's slot before the write (the neighbours form a cycle): all but the last in
    // index order, only the last in reverse order.
    let n = 64usize;
    for barrier in [true, false] {
        for order in [Order::Forward, Order::Reverse, Order::Random(7)] {
            let mut shared = vec![0u32; n];
            let mut out = vec![0u32; n];
            let (s, o) = (shared.as_mut_ptr(), out.as_mut_ptr());
            emu.launch((1, 1, 1), (n as u32, 1, 1), 0, order, &|| {
                // SAFETY: each thread writes its own slots; the emulator runs one at a time.
                unsafe {
                    let i = thread() as usize;
                    *s.add(i) = i as u32 + 1;
                    if barrier {
                        sync();
                    }
                    *o.add(i) = *s.add((i + 1) % n);
                }
            })
            .unwrap();
            let stale: Vec<usize> = (0..n)
                .filter(|&i| out[i] != ((i + 1) % n) as u32 + 1)
                .collect();
            let expected: Vec<usize> = match (barrier, order) {
                (true, _) => vec![],
                (false, Order::Forward) => (0..n - 1).collect(),
                (false, Order::Reverse) => vec![n - 1],
                (false, Order::Random(_)) => stale.clone(),
            };
            assert_eq!(stale, expected, "barrier {barrier}, {order:?}");
            if !barrier {
                assert!(!stale.is_empty(), "{order:?}: the race does not show");
            }
            drop(shared);
        }
    }
    // A butterfly of shuffles sums the warp's lanes in every lane.
    let mut out = vec![0f32; 64];
    let o = out.as_mut_ptr();
    emu.launch((1, 1, 1), (64, 1, 1), 0, Order::Random(3), &|| {
        // SAFETY: as above.
        unsafe {
            let i = thread();
            let mut v = i as f32;
            for m in [16, 8, 4, 2, 1] {
                v += shfl(v, m);
            }
            *o.add(i as usize) = v;
        }
    })
    .unwrap();
    assert!(out[..32].iter().all(|&v| v == 496.0), "{out:?}"); // 0 + … + 31
    assert!(out[32..].iter().all(|&v| v == 1520.0), "{out:?}"); // 32 + … + 63
    // Shared memory no thread of the block has written reads as NaN bytes, whatever an
    // earlier block left there.
    // SAFETY: the probes' C signatures.
    let (read, write): (ProbeFn, unsafe extern "C" fn(u32)) = unsafe {
        (
            emu.kernel("emu_probe_shared_read"),
            emu.kernel("emu_probe_shared_write"),
        )
    };
    let mut seen = vec![0u32; 3];
    let sp = seen.as_mut_ptr();
    emu.launch((3, 1, 1), (32, 1, 1), 0, Order::Forward, &|| {
        // SAFETY: as above; thread 0 of each block records what it read first.
        unsafe {
            if thread() == 0 {
                *sp.add(emu_block() as usize) = read();
                write(12345);
            }
        }
    })
    .unwrap();
    assert_eq!(seen, vec![u32::MAX; 3]);
    // Half a warp at a barrier while the other half waits for it at a shuffle is a deadlock,
    // reported as one. (Threads that have exited do not hold a barrier, as on the GPU.)
    let e = emu
        .launch((2, 1, 1), (32, 1, 1), 0, Order::Forward, &|| {
            // SAFETY: as above.
            unsafe {
                if thread() < 16 {
                    sync();
                } else {
                    shfl(1.0, 1);
                }
            }
        })
        .unwrap_err();
    assert!(e.contains("deadlock"), "{e}");
    // So is a shuffle that half a warp never reaches.
    let e = emu
        .launch((1, 1, 1), (32, 1, 1), 0, Order::Forward, &|| {
            // SAFETY: as above.
            unsafe {
                if thread() < 16 {
                    shfl(1.0, 1);
                }
            }
        })
        .unwrap_err();
    assert!(e.contains("exited"), "{e}");
}

// ---- Layer norm.

type LnFwd = unsafe extern "C" fn(*const u16, *const f32, *const f32, *mut u16, i32, i32, f32);
type LnGrad = unsafe extern "C" fn(
    *const u16,
    *const f32,
    *const u16,
    *mut u16,
    *mut f32,
    i32,
    i32,
    f32,
    i32,
);

/// Layer norm of bf16 rows in f64 (ops::layer_norm and candle's autograd): y, dx, dw, db.
fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, dy: &Tensor) -> [Tensor; 4] {
    let f64v = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
    let (xv, wv, bv) = (f64v(x), f64v(w), f64v(b));
    let y = ops::layer_norm(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-6).unwrap();
    let g = (&y * dy.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
    [y, grad(&xv), grad(&wv), grad(&bv)]
}

/// The layer norm's kernels: forward, and the backward's one pass (dx and per-block partial
/// sums for the scale and shift). The wide-access ones of `ICEFM_LN_V8` (16-byte accesses,
/// warps striding over rows) on grids of fewer warps than rows, one warp per row, and more
/// warps than rows; the register-resident and general ones on the launchers' grids and on one
/// block. Partial sums of the wide and register-resident kernels add their warps in a fixed
/// order, so every output has the same bits in every thread order; the general kernel's
/// partial sums use atomics, so only its dx must.
#[test]
fn layer_norm_kernels_match_the_reference_in_the_emulator() {
    let emu = emulator();
    for (rows, d, seed) in [
        (37usize, 512usize, 1u64),
        (21, 768, 2),
        (9, 1024, 3),
        (13, 1280, 4),
        (70, 512, 5),
    ] {
        let x = random(&[rows, d], seed, 2.0, DType::BF16)
            .affine(1.0, 0.3)
            .unwrap();
        let w = random(&[d], seed + 10, 1.0, DType::F32);
        let b = random(&[d], seed + 20, 1.0, DType::F32);
        let dy = random(&[rows, d], seed + 30, 1.0, DType::BF16);
        let [y_ref, dx_ref, dw_ref, db_ref] = layer_norm_reference(&x, &w, &b, &dy);
        let (xb, wb, bb, gb) = (
            Buffer::from(&u16::of(&x)),
            Buffer::from(&f32::of(&w)),
            Buffer::from(&f32::of(&b)),
            Buffer::from(&u16::of(&dy)),
        );
        let (ri, di) = (rows as i32, d as i32);
        let q = d / 256;
        let per_warp = rows.div_ceil(8) as u32;
        let blocks = fused::ln_grad_blocks(rows) as u32;
        // (kernel suffix, forward grid, backward grid): the wide kernels with 1 and 2 blocks of
        // 8 warps (rows per warp 2–5) and with a block per 8 rows (the launchers' cap), up to 4
        // loads per lane (the backward has no 5); the others one warp per row forward,
        // the launchers' blocks or one block backward.
        let wide_grad = if q <= 4 {
            format!("bf16_q{q}")
        } else {
            format!("bf16_p{}", d / 64)
        };
        let mut runs: Vec<(String, u32, String, u32)> = [1, 2, per_warp]
            .into_iter()
            .map(|g| (format!("bf16_q{q}"), g, wide_grad.clone(), g))
            .collect();
        for grad_grid in [blocks, 1] {
            for suffix in [format!("bf16_p{}", d / 64), "bf16".into()] {
                runs.push((suffix.clone(), per_warp, suffix, grad_grid));
            }
        }
        for (suffix, grid, grad_suffix, grad_grid) in runs {
            let p = grad_grid as usize;
            let rpb = rows.div_ceil(p) as i32;
            let mut outs = Vec::new();
            for order in [Order::Forward, Order::Reverse, Order::Random(seed)] {
                // SAFETY: the kernels' C signatures (kernels.cu).
                let (fwd, bwd): (LnFwd, LnGrad) = unsafe {
                    (
                        emu.kernel(&format!("ln_fwd_{suffix}")),
                        emu.kernel(&format!("ln_grad_{grad_suffix}")),
                    )
                };
                let mut y = Buffer::<u16>::output(rows * d);
                let mut dx = Buffer::<u16>::output(rows * d);
                let mut parts = Buffer::<f32>::output(2 * p * d);
                let (yp, dxp, pp) = (y.mut_ptr(), dx.mut_ptr(), parts.mut_ptr());
                emu.launch((grid, 1, 1), (256, 1, 1), 0, order, &|| {
                    // SAFETY: buffers of rows × d (x, y) and d (w, b), as the kernel reads.
                    unsafe { fwd(xb.ptr(), wb.ptr(), bb.ptr(), yp, ri, di, 1e-6) }
                })
                .unwrap();
                emu.launch((grad_grid, 1, 1), (256, 1, 1), 2 * d * 4, order, &|| {
                    // SAFETY: as above; parts holds 2 × p × d partial sums.
                    unsafe { bwd(xb.ptr(), wb.ptr(), gb.ptr(), dxp, pp, ri, di, 1e-6, rpb) }
                })
                .unwrap();
                let what = format!(
                    "{suffix}, {grad_suffix} {rows}×{d} grids {grid}, {grad_grid} {order:?}"
                );
                let y_t = u16::tensor(y.values(), &[rows, d]);
                let dx_t = u16::tensor(dx.values(), &[rows, d]);
                assert_close(&y_t, &y_ref, 1e-2, &format!("forward {what}"));
                assert_close(&dx_t, &dx_ref, 2e-2, &format!("dx {what}"));
                let sums = f32::tensor(parts.values(), &[2, p, d]).sum(1).unwrap();
                assert_close(&sums.get(0).unwrap(), &dw_ref, 1e-3, &format!("dw {what}"));
                assert_close(&sums.get(1).unwrap(), &db_ref, 1e-3, &format!("db {what}"));
                let atomics = grad_suffix == "bf16";
                outs.push((
                    y.values().to_vec(),
                    dx.values().to_vec(),
                    if atomics {
                        Vec::new()
                    } else {
                        parts.values().to_vec()
                    },
                ));
            }
            assert!(
                outs.iter().all(|o| *o == outs[0]),
                "{suffix}: the thread order changed the bits"
            );
        }
    }
}

// ---- Bias + GELU, column sums, bias add.

type BiasGeluFwd<T> = unsafe extern "C" fn(*const T, *const f32, *mut T, i32, i32, i32);
type BiasGeluBwd<T> =
    unsafe extern "C" fn(*const T, *const f32, *const T, *mut T, *mut f32, i32, i32, i32, i32);
type ColumnSums<T> = unsafe extern "C" fn(*const T, *mut f32, i32, i32, i32);

fn bias_gelu_case<T: Host + PartialEq>(rows: usize, c: usize, seed: u64, tol: f64) {
    let emu = emulator();
    let suffix = if T::DTYPE == DType::F32 {
        "f32"
    } else {
        "bf16"
    };
    let x = random(&[rows, c], seed, 3.0, T::DTYPE);
    let b = random(&[c], seed + 1, 1.0, DType::F32);
    let g = random(&[rows, c], seed + 2, 1.0, T::DTYPE);
    let y_ref = x.apply_op2_no_bwd(&b, &fused::BiasGelu).unwrap();
    let (dx_ref, _) = fused::bias_gelu_grad(&x, &b, &g).unwrap();
    // The bias's gradient: the column sums of dx (in f64; the kernel sums dx before rounding).
    let db_ref = dx_ref.to_dtype(DType::F64).unwrap().sum(0).unwrap();
    let (xb, bb, gb) = (
        Buffer::from(&T::of(&x)),
        Buffer::from(&f32::of(&b)),
        Buffer::from(&T::of(&g)),
    );
    // SAFETY: the kernels' C signatures.
    let (fwd, bwd): (BiasGeluFwd<T>, BiasGeluBwd<T>) = unsafe {
        (
            emu.kernel(&format!("bias_gelu_fwd_{suffix}")),
            emu.kernel(&format!("bias_gelu_grad_{suffix}")),
        )
    };
    let pair_modes: &[bool] = if c.is_multiple_of(2) {
        &[true, false]
    } else {
        &[false]
    };
    let (r, ci) = (rows as i32, c as i32);
    for &pairs in pair_modes {
        let (per, pi) = (if pairs { 2 } else { 1 }, i32::from(pairs));
        // Forward: the launchers' rowcol_cfg, and a smaller grid (rows and columns strided).
        for grid in [
            ((c.div_ceil(256 * per)) as u32, rows as u32, 1),
            (1, 3.min(rows) as u32, 1),
        ] {
            for order in [Order::Forward, Order::Reverse] {
                let mut y = Buffer::<T>::output(rows * c);
                let yp = y.mut_ptr();
                emu.launch(grid, (256, 1, 1), 0, order, &|| {
                    // SAFETY: rows × c values (x, y), c (b).
                    unsafe { fwd(xb.ptr(), bb.ptr(), yp, r, ci, pi) }
                })
                .unwrap();
                let what = format!("{suffix} {rows}×{c} pairs {pairs} grid {grid:?} {order:?}");
                assert_close(&T::tensor(y.values(), &[rows, c]), &y_ref, tol, &what);
            }
        }
        // Backward: a thread per column (pair) and a block row per P blocks of rows, the launchers'
        // P, one and three; dx and the partial column sums, the same bits in every order.
        for p in [fused::column_blocks(rows), 1, 3.min(rows)] {
            let grid = ((c.div_ceil(256 * per)) as u32, p as u32, 1);
            let rpb = rows.div_ceil(p) as i32;
            let mut outs = Vec::new();
            for order in [Order::Forward, Order::Reverse, Order::Random(seed)] {
                let mut dx = Buffer::<T>::output(rows * c);
                let mut sums = Buffer::<f32>::output(p * c);
                let (dxp, sp) = (dx.mut_ptr(), sums.mut_ptr());
                emu.launch(grid, (256, 1, 1), 0, order, &|| {
                    // SAFETY: rows × c values (x, g, dx), c (b), p × c (sums).
                    unsafe { bwd(xb.ptr(), bb.ptr(), gb.ptr(), dxp, sp, r, ci, pi, rpb) }
                })
                .unwrap();
                let what = format!("backward {suffix} {rows}×{c} pairs {pairs} p {p} {order:?}");
                assert_close(&T::tensor(dx.values(), &[rows, c]), &dx_ref, tol, &what);
                let db = f32::tensor(sums.values(), &[p, c]).sum(0).unwrap();
                assert_close(&db, &db_ref, tol, &format!("bias gradient {what}"));
                outs.push((dx.values().to_vec(), sums.values().to_vec()));
            }
            assert!(
                outs.iter().all(|o| *o == outs[0]),
                "backward {suffix} p {p}: the thread order changed the bits"
            );
        }
    }
    // Column sums (the bias's gradient): partial sums over blocks of rows, as launched; rows
    // enough for every warp of a block to have some.
    let rows = 70;
    let x = random(&[rows, c], seed + 3, 3.0, T::DTYPE);
    let xb = Buffer::from(&T::of(&x));
    // SAFETY: the kernel's C signature.
    let sums: ColumnSums<T> = unsafe { emu.kernel(&format!("column_sums_{suffix}")) };
    for (p, order) in [
        (1usize, Order::Forward),
        (1, Order::Reverse),
        (3, Order::Forward),
    ] {
        let rpb = rows.div_ceil(p) as i32;
        let mut out = Buffer::<f32>::output(p * c);
        let op = out.mut_ptr();
        let (r, ci) = (rows as i32, c as i32);
        let grid = (c.div_ceil(32) as u32, p as u32, 1);
        emu.launch(grid, (256, 1, 1), 0, order, &|| {
            // SAFETY: out holds p × c partial sums.
            unsafe { sums(xb.ptr(), op, r, ci, rpb) }
        })
        .unwrap();
        let got = f32::tensor(out.values(), &[p, c]).sum(0).unwrap();
        let want = x.to_dtype(DType::F64).unwrap().sum(0).unwrap();
        assert_close(
            &got,
            &want,
            1e-5,
            &format!("column sums {suffix} {rows}×{c} p {p} {order:?}"),
        );
    }
}

/// The kernels of `ICEFM_BIAS_GELU_CUDA` and the bias gradient's column sums.
#[test]
fn bias_gelu_and_column_sums_match_the_cpu_in_the_emulator() {
    bias_gelu_case::<f32>(5, 3072, 11, 1e-5);
    bias_gelu_case::<u16>(70, 768, 12, 1e-2); // blocks of several rows
    bias_gelu_case::<f32>(3, 77, 13, 1e-5); // odd width: one value per thread
    bias_gelu_case::<u16>(4, 45, 14, 1e-2);
}

// ---- Flash attention.

type FlashFwd = unsafe extern "C" fn(*const u16, *mut u16, *mut f32, i32, i32, f32);
type FlashDq = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *const u16,
    *mut u16,
    *mut f32,
    *mut f32,
    i32,
    i32,
    f32,
    f32,
);
type FlashDkv = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *const f32,
    *const f32,
    *mut u16,
    i32,
    i32,
    f32,
    f32,
);

/// Attention shapes: (batch, tokens, heads, head width), token counts on and off the 64-token
/// tiles.
const FLASH_SHAPES: [(usize, usize, usize, usize); 4] = [
    (2, 145, 2, 64),
    (1, 77, 3, 32),
    (1, 5, 2, 64),
    (1, 128, 1, 32),
];

fn flash_grid(b: usize, n: usize, heads: usize) -> (u32, u32, u32) {
    (n.div_ceil(64) as u32, heads as u32, b as u32)
}

/// Each query's log-sum-exp of its scaled scores in the log2 domain, in f64: [B, H, N].
fn lse_reference(qkv: &[u16], (b, n, heads, hd): (usize, usize, usize, usize)) -> Vec<f64> {
    let v = |i: usize| f64::from(half::bf16::from_bits(qkv[i]).to_f32());
    let scale_log2 = (hd as f64).powf(-0.5) * std::f64::consts::LOG2_E;
    let at = |s: usize, t: usize, part: usize, h: usize, e: usize| {
        (((s * n + t) * 3 + part) * heads + h) * hd + e
    };
    let mut out = Vec::with_capacity(b * heads * n);
    for s in 0..b {
        for h in 0..heads {
            for i in 0..n {
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|e| v(at(s, i, 0, h, e)) * v(at(s, j, 1, h, e)))
                            .sum::<f64>()
                            * scale_log2
                    })
                    .collect();
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                out.push(m + scores.iter().map(|x| (x - m).exp2()).sum::<f64>().log2());
            }
        }
    }
    out
}

/// The flash forward (the default path, with its new tile loading, one-instruction bf16 packing
/// and saved log-sum-exp) and its prefetching variant (`ICEFM_FLASH_PREFETCH`).
#[test]
fn the_flash_forward_kernels_match_the_cpu_in_the_emulator() {
    let emu = emulator();
    for (i, &(b, n, heads, hd)) in FLASH_SHAPES.iter().enumerate() {
        let qkv = random(&[b, n, 3 * heads * hd], 70 + i as u64, 2.0, DType::BF16);
        let want = qkv
            .apply_op1_no_bwd(&fused::FlashAttention::new(heads))
            .unwrap();
        let qb = Buffer::from(&u16::of(&qkv));
        let lse_want = lse_reference(&u16::of(&qkv), (b, n, heads, hd));
        let scale_log2 = (hd as f32).powf(-0.5) * std::f32::consts::LOG2_E;
        let mut bits = Vec::new();
        for (pf, order) in [
            ("", Order::Forward),
            ("", Order::Reverse),
            ("", Order::Random(5)),
            ("_pf", Order::Forward),
            ("_pf", Order::Reverse),
        ] {
            // SAFETY: the kernel's C signature.
            let k: FlashFwd = unsafe { emu.kernel(&format!("flash_fwd_{hd}{pf}")) };
            let mut out = Buffer::<u16>::output(b * n * heads * hd);
            let mut lse = Buffer::<f32>::output(b * heads * n);
            let (op, lp) = (out.mut_ptr(), lse.mut_ptr());
            let (ni, hi) = (n as i32, heads as i32);
            let conflict = emu.ldmatrix_conflict(|| {
                emu.launch(flash_grid(b, n, heads), (128, 1, 1), 0, order, &|| {
                    // SAFETY: qkv [B, N, 3·H·hd], out [B, N, H·hd], lse [B, H, N].
                    unsafe { k(qb.ptr(), op, lp, ni, hi, scale_log2) }
                })
                .unwrap()
            });
            let what = format!("flash_fwd_{hd}{pf} {b}×{n}×{heads} {order:?}");
            assert_eq!(conflict, 1, "{what}: ldmatrix bank conflicts");
            assert_close(
                &u16::tensor(out.values(), want.dims()),
                &want,
                1.5e-2,
                &what,
            );
            for (j, (&got, &w)) in lse.values().iter().zip(&lse_want).enumerate() {
                assert!(
                    (f64::from(got) - w).abs() < 1e-4 * w.abs().max(1.0),
                    "{what}: log-sum-exp {j} is {got}, not {w}"
                );
            }
            bits.push((out.values().to_vec(), lse.values().to_vec()));
        }
        assert!(
            bits.iter().all(|v| *v == bits[0]),
            "{b}×{n}×{heads}×{hd}: the thread order or prefetching changed the bits"
        );
    }
}

/// The flash backward (`ICEFM_FLASH_BWD`): the dq kernel with its own log-sum-exp pass and with
/// the forward's saved one, the dk/dv kernel, and their prefetching variants.
#[test]
fn the_flash_backward_kernels_match_the_cpu_in_the_emulator() {
    let emu = emulator();
    for (i, &(b, n, heads, hd)) in FLASH_SHAPES.iter().enumerate() {
        let seed = 90 + 2 * i as u64;
        let qkv = random(&[b, n, 3 * heads * hd], seed, 2.0, DType::BF16);
        let o = qkv
            .apply_op1_no_bwd(&fused::FlashAttention::new(heads))
            .unwrap();
        let dout = random(&[b, n, heads * hd], seed + 1, 1.0, DType::BF16);
        let want = qkv
            .apply_op3_no_bwd(&o, &dout, &fused::FlashAttentionGrad::new(heads))
            .unwrap();
        let (qb, ob, gb) = (
            Buffer::from(&u16::of(&qkv)),
            Buffer::from(&u16::of(&o)),
            Buffer::from(&u16::of(&dout)),
        );
        let scale = (hd as f32).powf(-0.5);
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let (ni, hi) = (n as i32, heads as i32);
        let grid = flash_grid(b, n, heads);
        // The forward's log-sum-exp, for the dq kernel that takes it.
        let saved = {
            // SAFETY: the kernel's C signature.
            let k: FlashFwd = unsafe { emu.kernel(&format!("flash_fwd_{hd}")) };
            let mut out = Buffer::<u16>::output(b * n * heads * hd);
            let mut lse = Buffer::<f32>::output(b * heads * n);
            let (op, lp) = (out.mut_ptr(), lse.mut_ptr());
            emu.launch(grid, (128, 1, 1), 0, Order::Forward, &|| {
                // SAFETY: as in the forward test.
                unsafe { k(qb.ptr(), op, lp, ni, hi, scale_log2) }
            })
            .unwrap();
            lse.values().to_vec()
        };
        let mut bits = Vec::new();
        for (lse_kind, pf, order) in [
            ("", "", Order::Forward),
            ("", "", Order::Reverse),
            ("lse_", "", Order::Forward),
            ("lse_", "", Order::Random(seed)),
            ("", "_pf", Order::Reverse),
            ("lse_", "_pf", Order::Forward),
        ] {
            // SAFETY: the kernels' C signatures.
            let (dq, dkv): (FlashDq, FlashDkv) = unsafe {
                (
                    // The launchers: no prefetching dq kernel at head width 64.
                    emu.kernel(&format!(
                        "flash_bwd_dq_{lse_kind}{hd}{}",
                        if hd == 32 { pf } else { "" }
                    )),
                    emu.kernel(&format!("flash_bwd_dkv_{hd}{pf}")),
                )
            };
            let mut dqkv = Buffer::<u16>::output(b * n * 3 * heads * hd);
            let mut lse = if lse_kind.is_empty() {
                Buffer::<f32>::output(b * heads * n)
            } else {
                Buffer::from(&saved)
            };
            let mut dvec = Buffer::<f32>::output(b * heads * n);
            let (dp, lp, vp) = (dqkv.mut_ptr(), lse.mut_ptr(), dvec.mut_ptr());
            let conflict = emu.ldmatrix_conflict(|| {
                emu.launch(grid, (128, 1, 1), 0, order, &|| {
                    // SAFETY: qkv and dqkv [B, N, 3·H·hd], o and dout [B, N, H·hd], lse and
                    // dvec [B, H, N].
                    unsafe {
                        dq(
                            qb.ptr(),
                            ob.ptr(),
                            gb.ptr(),
                            dp,
                            lp,
                            vp,
                            ni,
                            hi,
                            scale_log2,
                            scale,
                        )
                    }
                })
                .unwrap();
                emu.launch(grid, (128, 1, 1), 0, order, &|| {
                    // SAFETY: as above.
                    unsafe { dkv(qb.ptr(), gb.ptr(), lp, vp, dp, ni, hi, scale_log2, scale) }
                })
                .unwrap();
            });
            let what = format!("flash_bwd_*_{lse_kind}{hd}{pf} {b}×{n}×{heads} {order:?}");
            assert_eq!(conflict, 1, "{what}: ldmatrix bank conflicts");
            assert_close(&u16::tensor(dqkv.values(), want.dims()), &want, 2e-2, &what);
            for (j, (&got, &w)) in lse.values().iter().zip(&saved).enumerate() {
                assert!(
                    (got - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{what}: log-sum-exp {j} is {got}, the forward's {w}"
                );
            }
            bits.push(dqkv.values().to_vec());
        }
        assert!(
            bits.iter().all(|v| *v == bits[0]),
            "{b}×{n}×{heads}×{hd}: the variants or the thread order changed dqkv's bits"
        );
    }
}

// ---- im2col.

type Im2col<T> = unsafe extern "C" fn(*const T, *mut T, i32, i32, i32, i32, i32);
type Col2im<T> = unsafe extern "C" fn(*const T, *mut T, i32, i32, i32, i32);

fn im2col_case<T: Host>(tol: f64) {
    use icefm_model::seg::Im2col3;
    let emu = emulator();
    let suffix = if T::DTYPE == DType::F32 {
        "f32"
    } else {
        "bf16"
    };
    let (b, h, w, c) = (2usize, 5usize, 7usize, 6usize);
    let dims = (b as i32, h as i32, w as i32, c as i32);
    // SAFETY: the kernels' C signatures.
    let im2col: Im2col<T> = unsafe { emu.kernel(&format!("im2col3_{suffix}")) };
    let col2im: Col2im<T> = unsafe { emu.kernel(&format!("col2im3_{suffix}")) };
    for (op, seed) in [
        (Im2col3::COLUMNS, 81),
        (Im2col3::MIRRORED, 83),
        (Im2col3::ADJOINT, 82),
    ] {
        let shape_in = if op.adjoint {
            [b, h, w, 9 * c]
        } else {
            [b, h, w, c]
        };
        let x = random(&shape_in, seed, 2.0, T::DTYPE);
        let want = x.apply_op1_no_bwd(&op).unwrap();
        let xb = Buffer::from(&T::of(&x));
        let n = want.elem_count();
        let mirror = i32::from(op.mirrored);
        // The launchers' elem_cfg, and one block striding over everything.
        for grid in [n.div_ceil(256) as u32, 1] {
            let mut y = Buffer::<T>::output(n);
            let yp = y.mut_ptr();
            emu.launch((grid, 1, 1), (256, 1, 1), 0, Order::Forward, &|| {
                // SAFETY: x and y of the map's sizes.
                unsafe {
                    if op.adjoint {
                        col2im(xb.ptr(), yp, dims.0, dims.1, dims.2, dims.3)
                    } else {
                        im2col(xb.ptr(), yp, dims.0, dims.1, dims.2, dims.3, mirror)
                    }
                }
            })
            .unwrap();
            let got = T::tensor(y.values(), want.dims());
            assert_close(&got, &want, tol, &format!("{op:?} {suffix} grid {grid}"));
        }
    }
}

/// The fine-tuning step's 3 × 3 im2col, mirrored and not, and its adjoint.
#[test]
fn the_im2col_kernels_match_the_cpu_in_the_emulator() {
    im2col_case::<f32>(1e-6);
    im2col_case::<u16>(1e-2);
}

// ---- Kernels that passed on an H200, as a check of the emulator.

type SoftmaxFwd = unsafe extern "C" fn(*const u16, *mut u16, i32, i32, i32);
type SoftmaxGrad = unsafe extern "C" fn(*const u16, *const u16, *mut u16, i32, i32);
type SumSquares = unsafe extern "C" fn(*const u64, *mut f64);

#[test]
fn kernels_verified_on_a_gpu_also_pass_in_the_emulator() {
    let emu = emulator();
    // Softmax over rows of 145 (the encoder's attention), register-resident (5 values a lane).
    let (rows, d) = (20usize, 145usize);
    let x = random(&[rows, d], 31, 6.0, DType::BF16);
    let dy = random(&[rows, d], 32, 1.0, DType::BF16);
    let xv = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let y_ref = ops::softmax(xv.as_tensor()).unwrap();
    let g = (&y_ref * dy.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx_ref = g.get(xv.as_tensor()).unwrap();
    let (xb, gb) = (Buffer::from(&u16::of(&x)), Buffer::from(&u16::of(&dy)));
    // SAFETY: the kernels' C signatures.
    let (fwd, bwd): (SoftmaxFwd, SoftmaxGrad) = unsafe {
        (
            emu.kernel("softmax_fwd_bf16_v5"),
            emu.kernel("softmax_grad_bf16_v5"),
        )
    };
    let mut y = Buffer::<u16>::output(rows * d);
    let mut dx = Buffer::<u16>::output(rows * d);
    let (yp, dxp) = (y.mut_ptr(), dx.mut_ptr());
    let (r, di) = (rows as i32, d as i32);
    emu.launch(
        (rows.div_ceil(8) as u32, 1, 1),
        (256, 1, 1),
        0,
        Order::Reverse,
        &|| {
            // SAFETY: rows × d values each.
            unsafe { fwd(xb.ptr(), yp, r, di, di) }
        },
    )
    .unwrap();
    let y_t = u16::tensor(y.values(), &[rows, d]);
    let yb = Buffer::from(y.values());
    emu.launch(
        (rows.div_ceil(8) as u32, 1, 1),
        (256, 1, 1),
        0,
        Order::Forward,
        &|| {
            // SAFETY: as above.
            unsafe { bwd(yb.ptr(), gb.ptr(), dxp, r, di) }
        },
    )
    .unwrap();
    assert_close(&y_t, &y_ref, 1e-2, "softmax forward");
    assert_close(
        &u16::tensor(dx.values(), &[rows, d]),
        dx_ref,
        2e-2,
        "softmax backward",
    );
    // The general softmax (rows over 1,024 values), over the first 1,000 of 1,100 (the rest
    // padding: 0).
    let (rows, d, valid) = (3usize, 1100usize, 1000usize);
    let x = random(&[rows, d], 33, 6.0, DType::BF16);
    let want = fused::softmax_valid(&x.to_dtype(DType::F32).unwrap(), valid).unwrap();
    let xb = Buffer::from(&u16::of(&x));
    // SAFETY: the kernel's C signature.
    let general: SoftmaxFwd = unsafe { emu.kernel("softmax_fwd_bf16") };
    let mut y = Buffer::<u16>::output(rows * d);
    let yp = y.mut_ptr();
    emu.launch((1, 1, 1), (256, 1, 1), 0, Order::Forward, &|| {
        // SAFETY: rows × d values each.
        unsafe { general(xb.ptr(), yp, rows as i32, d as i32, valid as i32) }
    })
    .unwrap();
    assert_close(
        &u16::tensor(y.values(), &[rows, d]),
        &want,
        1e-2,
        "softmax over valid values",
    );
    // The gradient norm's sum of squares over two tensors in one launch (shared memory, warp
    // sums, a double atomic).
    let a: Vec<f32> = (0..5000)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    let c: Vec<f32> = (0..300).map(|i| (i as f32).sin()).collect();
    let want: f64 = a
        .iter()
        .chain(&c)
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    let (ab, cb) = (Buffer::from(&a), Buffer::from(&c));
    let table = [
        ab.ptr() as u64,
        a.len() as u64,
        cb.ptr() as u64,
        c.len() as u64,
    ];
    let mut out = 0f64;
    let op: *mut f64 = &mut out;
    // SAFETY: the kernel's C signature.
    let k: SumSquares = unsafe { emu.kernel("sum_squares_multi") };
    emu.launch((2, 2, 1), (256, 1, 1), 0, Order::Random(9), &|| {
        // SAFETY: the table names two live f32 buffers and their lengths.
        unsafe { k(table.as_ptr(), op) }
    })
    .unwrap();
    assert!(
        (out - want).abs() < 1e-5 * want,
        "sum of squares {out}, not {want}"
    );
}

// ---- Element-wise kernels (bias add, GELU, ReLU), the MAE loss, masking, the optimizer and batch preparation.

type BiasAdd<T> = unsafe extern "C" fn(*const T, *const f32, *mut T, i64, i32);
/// `(x, y, n)`: GELU and ReLU forward.
type Map1<T> = unsafe extern "C" fn(*const T, *mut T, i64);
/// `(x or y, dy, dx, n)`: GELU and ReLU backward.
type Map2<T> = unsafe extern "C" fn(*const T, *const T, *mut T, i64);

fn elementwise_case<T: Host>(rows: usize, c: usize, seed: u64, tol: f64) {
    let emu = emulator();
    let suffix = if T::DTYPE == DType::F32 {
        "f32"
    } else {
        "bf16"
    };
    let n = rows * c;
    let x = random(&[rows, c], seed, 3.0, T::DTYPE);
    let b = random(&[c], seed + 1, 1.0, DType::F32);
    let g = random(&[rows, c], seed + 2, 1.0, T::DTYPE);
    let add_ref = x
        .to_dtype(DType::F64)
        .unwrap()
        .broadcast_add(&b.to_dtype(DType::F64).unwrap())
        .unwrap();
    let gelu_ref = x.apply_op1_no_bwd(&fused::Gelu).unwrap();
    let grad_ref = x.apply_op2_no_bwd(&g, &fused::GeluGrad).unwrap();
    // ReLU's backward reads the forward's output.
    let relu_ref = x.apply_op1_no_bwd(&fused::Relu).unwrap();
    let relu_grad_ref = relu_ref.apply_op2_no_bwd(&g, &fused::ReluGrad).unwrap();
    let yb = Buffer::from(&T::of(&relu_ref));
    let (xb, bb, gb) = (
        Buffer::from(&T::of(&x)),
        Buffer::from(&f32::of(&b)),
        Buffer::from(&T::of(&g)),
    );
    // SAFETY (these three): the kernels' C signatures.
    let add: BiasAdd<T> = unsafe { emu.kernel(&format!("bias_add_{suffix}")) };
    let [fwd, relu]: [Map1<T>; 2] =
        ["gelu_fwd", "relu_fwd"].map(|k| unsafe { emu.kernel(&format!("{k}_{suffix}")) });
    let [bwd, relu_bwd]: [Map2<T>; 2] =
        ["gelu_grad", "relu_grad"].map(|k| unsafe { emu.kernel(&format!("{k}_{suffix}")) });
    // The launchers' elem_cfg, and two blocks striding over everything.
    for grid in [n.div_ceil(256) as u32, 2] {
        let mut outs: Vec<Buffer<T>> = (0..5).map(|_| Buffer::output(n)).collect();
        let ptrs: Vec<*mut T> = outs.iter_mut().map(Buffer::mut_ptr).collect();
        let (ni, ci) = (n as i64, c as i32);
        for (k, ptr) in ptrs.into_iter().enumerate() {
            emu.launch((grid, 1, 1), (256, 1, 1), 0, Order::Reverse, &|| {
                // SAFETY: n values each; b holds c.
                unsafe {
                    match k {
                        0 => add(xb.ptr(), bb.ptr(), ptr, ni, ci),
                        1 => fwd(xb.ptr(), ptr, ni),
                        2 => bwd(xb.ptr(), gb.ptr(), ptr, ni),
                        3 => relu(xb.ptr(), ptr, ni),
                        _ => relu_bwd(yb.ptr(), gb.ptr(), ptr, ni),
                    }
                }
            })
            .unwrap();
        }
        let what = |name: &str| format!("{name}_{suffix} {rows}×{c} grid {grid}");
        let t = |i: usize| T::tensor(outs[i].values(), &[rows, c]);
        assert_close(&t(0), &add_ref, tol, &what("bias_add"));
        assert_close(&t(1), &gelu_ref, tol, &what("gelu_fwd"));
        assert_close(&t(2), &grad_ref, tol, &what("gelu_grad"));
        // ReLU moves values, it computes none: the same values.
        assert_eq!(
            common::values(&t(3)),
            common::values(&relu_ref),
            "{}",
            what("relu_fwd")
        );
        assert_eq!(
            common::values(&t(4)),
            common::values(&relu_grad_ref),
            "{}",
            what("relu_grad")
        );
    }
}

#[test]
fn elementwise_kernels_match_the_cpu_in_the_emulator() {
    elementwise_case::<f32>(7, 300, 41, 1e-5);
    elementwise_case::<u16>(9, 768, 42, 1e-2);
}

/// `(pred, target, weight, loss, aux, rows, p)`.
type NpxLoss<T> = unsafe extern "C" fn(*const T, *const T, *const T, *mut T, *mut T, i32, i32);
/// `(pred, target, weight, g, dpred, rows, p)`.
type NpxGrad<T> = unsafe extern "C" fn(*const T, *const T, *const T, *const T, *mut T, i32, i32);
/// `(in, ids, out, k, n, d, vec)`: `gather_tokens_*` and `scatter_tokens_*`.
type MoveTokens<T> = unsafe extern "C" fn(*const T, *const u32, *mut T, i32, i32, i32, i32);
/// `(table, lr, b1, b2, c1, c2, eps, wd, gscale, sumsq or null, max_norm)`.
type AdamWMulti =
    unsafe extern "C" fn(*const u64, f32, f32, f32, f32, f32, f32, f32, f32, *const f64, f64);
type NormaliseAugment = unsafe extern "C" fn(*const f32, *const f32, *mut f32, i32, i32, i32);

/// The norm-pix loss kernels for rows of `p`: the general ones and, for `p` up to 1,024, the
/// register-resident ones of `v` values a lane the launcher picks (the smallest that holds `p`).
fn norm_pix_case<T: Host>(p: usize, v: usize, tol: f64) {
    let emu = emulator();
    let suffix = if T::DTYPE == DType::F32 {
        "f32"
    } else {
        "bf16"
    };
    // 2 samples × 9 patches; weights 0/1 (invalid pixels and kept patches 0), one patch with a
    // single weighted pixel (too few: loss 0).
    let (b, n) = (2usize, 9usize);
    let rows = b * n;
    let pred = random(&[b, n, p], 51, 1.0, T::DTYPE);
    let target = random(&[b, n, p], 52, 2.0, T::DTYPE);
    let w: Vec<f32> = (0..rows * p)
        .map(|i| {
            let (row, j) = (i / p, i % p);
            let keep = row % 4 != 1 && (i * 7919) % 5 != 0;
            f32::from(u8::from(if row == 5 { j == 3 } else { keep }))
        })
        .collect();
    let weight = f32::tensor(&w, &[b, n, p]).to_dtype(T::DTYPE).unwrap();
    let op = fused::NormPixLoss::default();
    let loss_ref = pred.apply_op3_no_bwd(&target, &weight, &op).unwrap();
    let aux_ref = op.aux.take(&loss_ref).unwrap();
    let up = random(&[rows], 53, 1.0, T::DTYPE);
    let grad_ref = pred
        .reshape((rows, p))
        .unwrap()
        .apply_op3_no_bwd(
            &target.reshape((rows, p)).unwrap(),
            &weight.reshape((rows, p)).unwrap(),
            &fused::NormPixLossGrad::new(&up).unwrap(),
        )
        .unwrap();
    let (pb, tb, wb, gb) = (
        Buffer::from(&T::of(&pred)),
        Buffer::from(&T::of(&target)),
        Buffer::from(&T::of(&weight)),
        Buffer::from(&T::of(&up)),
    );
    for variant in [String::new(), format!("_v{v}")] {
        // SAFETY: the kernels' C signatures.
        let (loss, grad): (NpxLoss<T>, NpxGrad<T>) = unsafe {
            (
                emu.kernel(&format!("norm_pix_loss_{suffix}{variant}")),
                emu.kernel(&format!("norm_pix_loss_grad_{suffix}{variant}")),
            )
        };
        let mut out = Buffer::<T>::output(rows);
        let mut aux = Buffer::<T>::output(2 * rows);
        let mut dp = Buffer::<T>::output(rows * p);
        let (op, ap, dpp) = (out.mut_ptr(), aux.mut_ptr(), dp.mut_ptr());
        let (ri, pi) = (rows as i32, p as i32);
        let grid = (rows.div_ceil(8) as u32, 1, 1);
        emu.launch(grid, (256, 1, 1), 0, Order::Reverse, &|| {
            // SAFETY: rows × p values (pred, target, weight), rows (out), 2 × rows (aux).
            unsafe { loss(pb.ptr(), tb.ptr(), wb.ptr(), op, ap, ri, pi) }
        })
        .unwrap();
        emu.launch(grid, (256, 1, 1), 0, Order::Forward, &|| {
            // SAFETY: rows × p values (pred, target, weight, dp), rows (g).
            unsafe { grad(pb.ptr(), tb.ptr(), wb.ptr(), gb.ptr(), dpp, ri, pi) }
        })
        .unwrap();
        let what = format!("norm_pix_loss_{suffix}{variant}, rows of {p}");
        let (loss_t, aux_t, grad_t) = (
            T::tensor(out.values(), &[b, n]),
            T::tensor(aux.values(), &[b, n, 2]),
            T::tensor(dp.values(), &[rows, p]),
        );
        assert_close(&loss_t, &loss_ref, tol, &what);
        assert_close(&aux_t, &aux_ref, tol, &what);
        assert_close(&grad_t, &grad_ref, tol, &what);
        // The patches kept whole (no weights) and the one with a single weighted pixel do not
        // count, and their baselines are 0; the others count.
        let a = common::values(&aux_t);
        for row in 0..rows {
            let counts = row % 4 != 1;
            assert_eq!(
                a[2 * row + 1],
                f64::from(u8::from(counts)),
                "{what}: patch {row}"
            );
            assert_eq!(a[2 * row] > 0.0, counts, "{what}: patch {row}");
        }
        // The patch with one weighted pixel has too few for statistics: loss 0, gradient 0.
        assert_eq!(common::values(&loss_t)[5], 0.0, "{what}");
        assert!(
            common::values(&grad_t)[5 * p..6 * p]
                .iter()
                .all(|&x| x == 0.0),
            "{what}"
        );
    }
}

#[test]
fn the_mae_loss_masking_optimizer_and_batch_kernels_match_the_cpu_in_the_emulator() {
    let emu = emulator();
    norm_pix_case::<f32>(70, 4, 1e-5);
    norm_pix_case::<u16>(70, 4, 2e-2);
    norm_pix_case::<f32>(512, 16, 1e-5); // MAE's patches: 2 channels of 16 × 16
    norm_pix_case::<u16>(768, 24, 2e-2);
    // Token gather and scatter: 3 samples of 10 tokens, 4 kept (one block of 8 warps, half of
    // them idle); rows of 40 f32 moved 16 bytes at a time and one value at a time, rows of 6
    // (24 bytes) one value at a time, as the launchers decide. Then 2 samples of 600 tokens,
    // 300 kept: more indices than a block has threads. Outputs start as NaN: the scatter
    // writes its zeros itself.
    // SAFETY: the kernels' C signature.
    let (gather, scatter): (MoveTokens<f32>, MoveTokens<f32>) = unsafe {
        (
            emu.kernel("gather_tokens_f32"),
            emu.kernel("scatter_tokens_f32"),
        )
    };
    let mut r = icefm_dataset::rng::Rng::new(54, 0);
    let big: Vec<u32> = (0..2)
        .flat_map(|_| {
            let noise: Vec<f64> = (0..600).map(|_| r.unit()).collect();
            let mut order: Vec<u32> = (0..600).collect();
            order.sort_by(|&i, &j| noise[i as usize].total_cmp(&noise[j as usize]));
            order.truncate(300);
            order
        })
        .collect();
    let small: Vec<u32> = vec![7, 0, 3, 9, 1, 2, 8, 5, 6, 4, 0, 9];
    for (b, n, k, d, vec, ids) in [
        (3usize, 10usize, 4usize, 40usize, 1, &small),
        (3, 10, 4, 40, 0, &small),
        (3, 10, 4, 6, 0, &small),
        (2, 600, 300, 8, 1, &big),
    ] {
        let x: Vec<f32> = (0..b * n * d).map(|i| i as f32 * 0.5 - 7.0).collect();
        let (xb, ib) = (Buffer::from(&x), Buffer::from(ids));
        let mut kept = Buffer::<f32>::output(b * k * d);
        let kp = kept.mut_ptr();
        let (ki, ni, di) = (k as i32, n as i32, d as i32);
        emu.launch(
            (k.div_ceil(8) as u32, b as u32, 1),
            (256, 1, 1),
            0,
            Order::Forward,
            &|| {
                // SAFETY: x [b, n, d], ids [b, k], kept [b, k, d], 16-byte aligned (Buffer).
                unsafe { gather(xb.ptr(), ib.ptr(), kp, ki, ni, di, vec) }
            },
        )
        .unwrap();
        let want: Vec<f32> = (0..b * k * d)
            .map(|i| {
                let (s, j, e) = (i / (k * d), (i / d) % k, i % d);
                x[(s * n + ids[s * k + j] as usize) * d + e]
            })
            .collect();
        assert_eq!(kept.values(), &want[..], "gather, rows of {d}, vec {vec}");
        // Scatter back: the kept rows in place, the others 0.
        let mut back = Buffer::<f32>::output(b * n * d);
        let (kb, bp) = (Buffer::from(kept.values()), back.mut_ptr());
        emu.launch(
            (n.div_ceil(8) as u32, b as u32, 1),
            (256, 1, 1),
            0,
            Order::Reverse,
            &|| {
                // SAFETY: kept [b, k, d], ids [b, k], back [b, n, d], 16-byte aligned.
                unsafe { scatter(kb.ptr(), ib.ptr(), bp, ki, ni, di, vec) }
            },
        )
        .unwrap();
        let want: Vec<f32> = (0..b * n * d)
            .map(|i| {
                let (s, t) = (i / (n * d), (i / d) % n);
                let kept = ids[s * k..(s + 1) * k].contains(&(t as u32));
                if kept { x[i] } else { 0.0 }
            })
            .collect();
        assert_eq!(
            back.values(),
            &want[..],
            "scatter, n {n}, rows of {d}, vec {vec}"
        );
    }
    // AdamW over two tensors in one launch, one of them without weight decay: the gradient
    // scale given, and clipping's read from a sum of squares on the device, over and under
    // the norm bound.
    let sizes = [1000usize, 37];
    let mk = |n: usize, s: u64, scale: f64| f32::of(&random(&[n], s, scale, DType::F32));
    let (lr, b1, b2, c1, c2, eps, wd) = (
        1e-3f32, 0.9f32, 0.95f32, 0.19f32, 0.0975f32, 1e-8f32, 0.05f32,
    );
    // (sum of squares on the device, max norm, the scale the kernel must use)
    let cases = [
        (None, 0.0, 0.7f32),
        (Some(16.0f64), 1.5, (1.5 / (4.0 + 1e-6)) as f32),
        (Some(16.0f64), 5.0, 1.0),
    ];
    for (sumsq, max_norm, gs) in cases {
        let mut bufs: Vec<[Buffer<f32>; 4]> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let s = 60 + 4 * i as u64;
                let v: Vec<f32> = mk(n, s + 2, 1.0).iter().map(|x| x * x).collect();
                [
                    Buffer::from(&mk(n, s, 1.0)),
                    Buffer::from(&mk(n, s + 1, 0.1)),
                    Buffer::from(&v),
                    Buffer::from(&mk(n, s + 3, 2.0)),
                ]
            })
            .collect();
        let before: Vec<[Vec<f32>; 4]> = bufs
            .iter()
            .map(|b| std::array::from_fn(|j| b[j].values().to_vec()))
            .collect();
        let table: Vec<u64> = bufs
            .iter_mut()
            .zip(&sizes)
            .enumerate()
            .flat_map(|(i, (b, &n))| {
                let [w, m, v, g] = b;
                [
                    w.mut_ptr() as u64,
                    m.mut_ptr() as u64,
                    v.mut_ptr() as u64,
                    g.ptr() as u64,
                    n as u64,
                    u64::from(i == 0),
                ]
            })
            .collect();
        // With a sum of squares the kernel must not use the scale passed (a wrong one here).
        let passed = if sumsq.is_some() { 123.0 } else { gs };
        let sq: Option<Buffer<f64>> = sumsq.map(|v| Buffer::from(&[v][..]));
        let sq_ptr = sq.as_ref().map_or(std::ptr::null(), |b| b.ptr());
        // SAFETY: the kernel's C signature.
        let adamw: AdamWMulti = unsafe { emu.kernel("adamw_multi") };
        let tp = table.as_ptr();
        emu.launch((2, 2, 1), (256, 1, 1), 0, Order::Random(4), &|| {
            // SAFETY: the table names live buffers of the sizes it gives; `sq_ptr` is null or
            // one live f64.
            unsafe { adamw(tp, lr, b1, b2, c1, c2, eps, wd, passed, sq_ptr, max_norm) }
        })
        .unwrap();
        for (t, (b, [w0, m0, v0, g])) in bufs.iter().zip(&before).enumerate() {
            for i in 0..sizes[t] {
                let f = |x: f32| f64::from(x);
                let gi = f(g[i]) * f(gs);
                let m = f(m0[i]) * f(b1) + gi * (1.0 - f(b1));
                let v = f(v0[i]) * f(b2) + gi * gi * (1.0 - f(b2));
                let mut u = (m / f(c1)) / ((v / f(c2)).sqrt() + f(eps));
                if t == 0 {
                    u += f(w0[i]) * f(wd);
                }
                let w = f(w0[i]) - u * f(lr);
                for (name, got, want) in [
                    ("w", b[0].values()[i], w),
                    ("m", b[1].values()[i], m),
                    ("v", b[2].values()[i], v),
                ] {
                    assert!(
                        (f(got) - want).abs() <= 2e-6 * want.abs().max(0.1), // f32 arithmetic, cancellation
                        "adamw (sum of squares {sumsq:?}, max {max_norm}) tensor {t} {name}[{i}]: {got}, not {want}"
                    );
                }
            }
        }
    }
    // Batch preparation: 2 samples of 2 channels, NaN and infinite pixels invalid, all eight
    // transforms across four launches; 5 × 5 (one partial tile) and 37 × 37 (four tiles, three
    // partial: a transposed tile's source is another tile), in three thread orders.
    // SAFETY: the kernel's C signature.
    let prep: NormaliseAugment = unsafe { emu.kernel("normalise_augment") };
    let (bsz, c) = (2usize, 2usize);
    for side in [5usize, 37] {
        let mut raw = f32::of(&random(&[bsz, c, side, side], 71, 3.0, DType::F32));
        raw[3] = f32::NAN;
        raw[31] = f32::INFINITY;
        raw[2 * side * side + side + 4] = f32::NAN; // sample 1's, channel 0
        let raw_t = f32::tensor(&raw, &[bsz, c, side, side]);
        let rb = Buffer::from(&raw);
        let tiles = side.div_ceil(32) as u32;
        for (codes, order) in [
            ([0f32, 1.0], Order::Reverse),
            ([2.0, 3.0], Order::Forward),
            ([4.0, 5.0], Order::Random(5)),
            ([6.0, 7.0], Order::Reverse),
        ] {
            let prm = [0.5f32, -1.0, 2.0, 0.25, codes[0], codes[1]];
            let want = raw_t
                .apply_op2_no_bwd(&f32::tensor(&prm, &[6]), &fused::NormaliseAugment)
                .unwrap();
            let pb = Buffer::from(&prm);
            let mut out = Buffer::<f32>::output(bsz * (c + 1) * side * side);
            let op = out.mut_ptr();
            // As launched: a block of 32 × 8 per 32 × 32 tile of each sample.
            emu.launch((tiles, tiles, bsz as u32), (32, 8, 1), 0, order, &|| {
                // SAFETY: raw [b, c, n, n], prm [2c + b], out [b, c + 1, n, n].
                unsafe { prep(rb.ptr(), pb.ptr(), op, bsz as i32, c as i32, side as i32) }
            })
            .unwrap();
            let got = f32::tensor(out.values(), want.dims());
            assert_close(
                &got,
                &want,
                1e-6,
                &format!("normalise_augment {side} × {side}, codes {codes:?}"),
            );
        }
    }
}

/// The flash kernels' inline-PTX primitives as the emulator runs them, against the PTX ISA's
/// definitions (the CUDA test `the_ptx_primitives_behave_as_the_emulator_assumes` checks the
/// same words on a GPU).
#[test]
fn the_emulated_ptx_primitives_follow_the_ptx_isa() {
    let emu = emulator();
    // SAFETY: the kernel's C signature.
    let probe: unsafe extern "C" fn(*mut u32) = unsafe { emu.kernel("ptx_probe") };
    let mut out = Buffer::<u32>::output(320);
    let op = out.mut_ptr();
    emu.launch((1, 1, 1), (32, 1, 1), 0, Order::Reverse, &|| {
        // SAFETY: 320 words.
        unsafe { probe(op) }
    })
    .unwrap();
    common::check_ptx_probe(out.values()).unwrap();
}
