//! Bias + GELU, the bias gradient's column sums and the bias add.

use super::*;

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
