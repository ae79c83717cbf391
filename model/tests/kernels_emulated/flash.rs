//! The flash attention kernels, forward and backward.

use super::*;

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
