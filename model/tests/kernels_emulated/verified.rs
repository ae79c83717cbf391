//! Kernels that passed on an H200, as a check of the emulator.

use super::*;

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
