//! Element-wise kernels (bias add, GELU, ReLU), the MAE loss, masking, the optimizer and batch preparation.

use super::*;

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
