//! The layer norm's kernels: forward and the backward's one pass.

use super::*;

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
