//! Each of icefm's CUDA kernels against its CPU reference.

use super::*;

#[test]
fn layer_norm_kernels_match_the_cpu_reference() {
    let g = gpu();
    for (rows, d) in [
        (37, 768),
        (1000, 512),
        (5, 17),
        (64 * 145, 192),
        (6, 1344),
        (9, 1280),
        (12_000, 1024), // more rows than the wide kernels have resident warps
    ] {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let x = random(&[rows, d], 1, 2.0).affine(1.0, 0.3).unwrap();
            let w = random(&[d], 2, 1.0);
            let b = random(&[d], 3, 1.0);
            let dy = random(&[rows, d], 4, 1.0);
            // CPU reference in f64 on the same (rounded) inputs.
            let xr = x.to_dtype(dtype).unwrap();
            let dyr = dy.to_dtype(dtype).unwrap();
            let xv = Var::from_tensor(&xr.to_dtype(DType::F64).unwrap()).unwrap();
            let wv = Var::from_tensor(&w.to_dtype(DType::F64).unwrap()).unwrap();
            let bv = Var::from_tensor(&b.to_dtype(DType::F64).unwrap()).unwrap();
            let yc = ops::layer_norm(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-6).unwrap();
            let gc = (&yc * dyr.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // GPU, with the register-resident kernels and (bf16 rows of 512 to 1280 in steps
            // of 256) the wide-access ones.
            for v8 in [false, true] {
                fused::set_ln_v8(v8);
                let xg = Var::from_tensor(&xr.to_device(&g).unwrap()).unwrap();
                let wg = Var::from_tensor(&w.to_device(&g).unwrap()).unwrap();
                let bg = Var::from_tensor(&b.to_device(&g).unwrap()).unwrap();
                let yg = fused::layer_norm(xg.as_tensor(), wg.as_tensor(), bg.as_tensor(), 1e-6)
                    .unwrap();
                assert_eq!(yg.dtype(), dtype);
                let gg = (yg.to_dtype(DType::F32).unwrap()
                    * dyr.to_dtype(DType::F32).unwrap().to_device(&g).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
                let e = max_rel(&yg, &yc);
                assert!(e < tol, "forward {rows}x{d} {dtype:?} v8 {v8}: {e}");
                for (name, a, c) in [("x", &xg, &xv), ("weight", &wg, &wv), ("bias", &bg, &bv)] {
                    let e = max_rel(
                        gg.get(a.as_tensor()).unwrap(),
                        gc.get(c.as_tensor()).unwrap(),
                    );
                    // dw, db sum over rows: bf16 inputs, f32 sums.
                    assert!(e < tol * 2.0, "d{name} {rows}x{d} {dtype:?} v8 {v8}: {e}");
                }
            }
            fused::set_ln_v8(false);
        }
    }
}

#[test]
fn softmax_kernels_match_the_cpu_reference() {
    let g = gpu();
    for shape in [
        vec![2, 3, 145, 145],
        vec![4, 577],
        vec![3, 1],
        vec![2, 2, 577, 577],
    ] {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let x = random(&shape, 5, 6.0).to_dtype(dtype).unwrap();
            let dy = random(&shape, 6, 1.0).to_dtype(dtype).unwrap();
            let xv = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
            let yc = ops::softmax(xv.as_tensor()).unwrap();
            let gc = (&yc * dy.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let xg = Var::from_tensor(&x.to_device(&g).unwrap()).unwrap();
            let yg = fused::softmax(xg.as_tensor()).unwrap();
            let gg = (&yg * dy.to_device(&g).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let e = max_rel(&yg, &yc);
            assert!(e < tol, "forward {shape:?} {dtype:?}: {e}");
            let e = max_rel(
                gg.get(xg.as_tensor()).unwrap(),
                gc.get(xv.as_tensor()).unwrap(),
            );
            assert!(e < tol * 2.0, "dx {shape:?} {dtype:?}: {e}");
        }
    }
}

#[test]
fn softmax_over_valid_entries_matches_the_cpu() {
    let g = gpu();
    for (shape, valid) in [
        (vec![2, 3, 584, 584], 577usize),
        (vec![5, 152], 145),
        (vec![3, 1500], 1499),
    ] {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let x = random(&shape, 41, 6.0).to_dtype(dtype).unwrap();
            let yc = fused::softmax_valid(&x.to_dtype(DType::F64).unwrap(), valid).unwrap();
            let yg = fused::softmax_valid(&x.to_device(&g).unwrap(), valid).unwrap();
            let e = max_rel(&yg, &yc);
            assert!(e < tol, "{shape:?} valid {valid} {dtype:?}: {e}");
        }
    }
}

#[test]
fn bias_add_gelu_and_column_sums_match_the_cpu_reference() {
    let g = gpu();
    // Two kernels (bias add, then GELU) and the fused `gelu(x + b)` of `bias_gelu` (applied
    // directly: its process-wide switch stays as the other tests expect it).
    for one_op in [false, true] {
        for (rows, c) in [(37, 2048), (1000, 513), (3, 1), (9000, 24)] {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                let x = random(&[rows, c], 31, 3.0).to_dtype(dtype).unwrap();
                let b = random(&[c], 32, 1.0);
                let dy = random(&[rows, c], 33, 1.0).to_dtype(dtype).unwrap();
                let xv = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
                let bv = Var::from_tensor(&b.to_dtype(DType::F64).unwrap()).unwrap();
                let yc = xv
                    .as_tensor()
                    .broadcast_add(bv.as_tensor())
                    .unwrap()
                    .gelu_erf()
                    .unwrap();
                let gc = (&yc * dy.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let xg = Var::from_tensor(&x.to_device(&g).unwrap()).unwrap();
                let bg = Var::from_tensor(&b.to_device(&g).unwrap()).unwrap();
                let yg = if one_op {
                    xg.as_tensor()
                        .apply_op2(bg.as_tensor(), fused::BiasGelu)
                        .unwrap()
                } else {
                    fused::gelu(&fused::bias_add(xg.as_tensor(), bg.as_tensor()).unwrap()).unwrap()
                };
                assert_eq!(yg.dtype(), dtype);
                let gg = (&yg * dy.to_device(&g).unwrap())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let e = max_rel(&yg, &yc);
                assert!(
                    e < tol,
                    "one op {one_op}: forward {rows}x{c} {dtype:?}: {e}"
                );
                for (name, a, r) in [("x", &xg, &xv), ("bias", &bg, &bv)] {
                    let e = max_rel(
                        gg.get(a.as_tensor()).unwrap(),
                        gc.get(r.as_tensor()).unwrap(),
                    );
                    assert!(
                        e < tol * 2.0,
                        "one op {one_op}: d{name} {rows}x{c} {dtype:?}: {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_relu_kernels_match_the_cpu() {
    let g = gpu();
    for dtype in [DType::F32, DType::BF16] {
        // Sizes off the launch's 256 threads; values moved, not computed: equal to the bit.
        for (rows, c) in [(37, 513), (3, 1)] {
            let x =
                Var::from_tensor(&random(&[rows, c], 61, 2.0).to_dtype(dtype).unwrap()).unwrap();
            let dy = random(&[rows, c], 62, 1.0).to_dtype(dtype).unwrap();
            let xg = Var::from_tensor(&x.as_tensor().to_device(&g).unwrap()).unwrap();
            let dyg = dy.to_device(&g).unwrap();
            let mut got = Vec::new();
            for (v, d) in [(&x, &dy), (&xg, &dyg)] {
                let y = fused::relu(v.as_tensor()).unwrap();
                let gr = (&y * d).unwrap().sum_all().unwrap().backward().unwrap();
                got.push((host(&y), host(gr.get(v.as_tensor()).unwrap())));
            }
            assert_eq!(got[0], got[1], "{rows}x{c} {dtype:?}");
        }
    }
}

#[test]
fn the_gradient_norm_in_one_launch_matches_the_host() {
    let g = gpu();
    let shapes: [&[usize]; 4] = [&[300, 70], &[70], &[2_000_000], &[1]];
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Var::from_tensor(&random(s, 50 + i as u64, 1.0).to_device(&g).unwrap()).unwrap()
        })
        .collect();
    let mut loss = Tensor::zeros((), DType::F32, &g).unwrap();
    for (i, v) in vars.iter().enumerate() {
        let t = random(v.dims(), 60 + i as u64, 1.0).to_device(&g).unwrap();
        loss = (loss + (v.as_tensor() * t).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    fused::set_fused(true);
    let (norm, scale) = icefm_model::optim::clip_scale(&grads, vars.iter(), 1.0).unwrap();
    // The gradients are the random multipliers: their norm on the host, in f64.
    let sq: f64 = vars
        .iter()
        .map(|v| {
            host(grads.get(v.as_tensor()).unwrap())
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
        })
        .sum();
    assert!(
        (norm - sq.sqrt()).abs() / sq.sqrt() < 1e-5,
        "{norm} vs {}",
        sq.sqrt()
    );
    assert!((scale - 1.0 / (norm + 1e-6)).abs() < 1e-9);
}

#[test]
fn the_norm_pix_loss_kernels_match_the_cpu() {
    let g = gpu();
    let (b, n, p) = (4usize, 37usize, 512usize);
    let pred = random(&[b, n, p], 71, 1.0);
    let target = random(&[b, n, p], 72, 2.0);
    let mut r = Rng::new(73, 0);
    let weight: Vec<f32> = (0..b * n * p)
        .map(|i| {
            // Unmasked patches (every fourth), invalid pixels, a patch with one valid pixel.
            let patch = i / p;
            if patch % 4 == 0 || patch == 5 && i % p > 0 || r.unit() < 0.2 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let weight = Tensor::from_vec(weight, (b, n, p), &Device::Cpu).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let run = |dev: &Device| {
            let pv =
                Var::from_tensor(&pred.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap();
            let t = target.to_dtype(dtype).unwrap().to_device(dev).unwrap();
            let w = weight.to_dtype(dtype).unwrap().to_device(dev).unwrap();
            let (loss, base) = fused::masked_norm_pix_loss(pv.as_tensor(), &t, &w).unwrap();
            let grads = loss.backward().unwrap();
            (
                host(&loss)[0],
                host(&base)[0],
                grads.get(pv.as_tensor()).unwrap().clone(),
            )
        };
        let (lc, bc, gc) = run(&Device::Cpu);
        let (lg, bg, gg) = run(&g);
        assert!((lg - lc).abs() / lc < tol, "{dtype:?} loss {lg} vs {lc}");
        assert!(
            (bg - bc).abs() / bc < tol,
            "{dtype:?} baseline {bg} vs {bc}"
        );
        let e = max_rel(&gg, &gc);
        assert!(e < tol * 3.0, "{dtype:?} dpred: {e}");
    }
}

#[test]
fn the_token_gather_and_scatter_kernels_match_the_cpu() {
    let g = gpu();
    let (b, n, d) = (3usize, 577usize, 512usize);
    let mut r = Rng::new(81, 0);
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            let noise: Vec<Vec<f32>> = vec![(0..n).map(|_| r.unit() as f32).collect()];
            Masking::from_noise(&noise, 0.75).ids_restore[0].clone()
        })
        .collect();
    for dtype in [DType::F32, DType::BF16] {
        let x = random(&[b, n, d], 82, 1.0).to_dtype(dtype).unwrap();
        let lw = random(&[b, n, d], 83, 1.0).to_dtype(dtype).unwrap();
        let run = |dev: &Device| {
            let xv = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
            let y = fused::gather_tokens(xv.as_tensor(), &ids).unwrap();
            let gr = (&y * lw.to_device(dev).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, gr.get(xv.as_tensor()).unwrap().clone())
        };
        let (yc, gc) = run(&Device::Cpu);
        let (yg, gg) = run(&g);
        assert_eq!(max_rel(&yg, &yc), 0.0, "{dtype:?} gather");
        assert_eq!(max_rel(&gg, &gc), 0.0, "{dtype:?} scatter");
    }
}

#[test]
fn the_device_batch_preparation_matches_the_cpu_reference() {
    let g = gpu();
    let (b, c, n) = (8, 2, 37);
    // Values around the SAR means with NaN holes, one whole channel invalid in a sample.
    let mut v: Vec<f32> = host(&random(&[b, c, n, n], 91, 10.0))
        .iter()
        .map(|&x| x as f32 - 15.0)
        .collect();
    for (i, x) in v.iter_mut().enumerate() {
        if i % 11 == 3 || (i / (n * n) == 5 && i % 2 == 0) {
            *x = f32::NAN;
        }
    }
    v[7] = f32::INFINITY;
    let raw = Tensor::from_vec(v, (b, c, n, n), &Device::Cpu).unwrap();
    let tf: Vec<icefm_dataset::Transform> = (0..8u8)
        .map(|k| icefm_dataset::Transform {
            transpose: k & 1 != 0,
            flip_y: k & 2 != 0,
            flip_x: k & 4 != 0,
        })
        .collect();
    let (mean, inv) = ([-14.5f32, -24.7], [1.0 / 5.66f32, 1.0 / 4.75]);
    let (ci, cv) = fused::normalise_augment(&raw, &mean, &inv, &tf).unwrap();
    let (gi, gv) = fused::normalise_augment(&raw.to_device(&g).unwrap(), &mean, &inv, &tf).unwrap();
    assert_eq!(host(&gi), host(&ci));
    assert_eq!(host(&gv), host(&cv));
    assert!(host(&cv).contains(&0.0) && host(&cv).contains(&1.0));
}

#[test]
fn the_cublaslt_bias_epilogue_matches_the_cpu_reference() {
    let g = gpu();
    // ViT-B/16's qkv and fc1 shapes at a few rows, and a small odd one.
    for (m, k, n) in [(300, 768, 2304), (577, 512, 2048), (16, 64, 24)] {
        let x = random(&[m, k], 101, 2.0).to_dtype(DType::BF16).unwrap();
        let w = random(&[n, k], 102, 0.1).to_dtype(DType::BF16).unwrap();
        let b = random(&[n], 103, 1.0);
        let cpu = x.apply_op3_no_bwd(&w, &b, &fused::LinearBias).unwrap();
        let on = |t: &Tensor| t.to_device(&g).unwrap();
        let gpu_y = on(&x)
            .apply_op3_no_bwd(&on(&w), &on(&b), &fused::LinearBias)
            .unwrap();
        assert_eq!(gpu_y.dims(), &[m, n]);
        let e = max_rel(&gpu_y, &cpu);
        assert!(e < 2e-2, "{m}x{k}x{n}: {e}");
        // An operand off cuBLASLt's 256-byte alignment takes candle's product + bias add.
        let xs = on(&random(&[m + 1, k], 104, 2.0).to_dtype(DType::BF16).unwrap())
            .narrow(0, 1, m)
            .unwrap();
        let shifted = xs
            .apply_op3_no_bwd(&on(&w), &on(&b), &fused::LinearBias)
            .unwrap();
        let cpu_s = xs
            .to_device(&Device::Cpu)
            .unwrap()
            .apply_op3_no_bwd(&w, &b, &fused::LinearBias)
            .unwrap();
        assert!(max_rel(&shifted, &cpu_s) < 2e-2, "{m}x{k}x{n}, offset");
        // Through `linear`: epilogue on against off, values and gradients.
        let (xv, wv, bv) = (
            Var::from_tensor(&on(&x)).unwrap(),
            Var::from_tensor(&on(&w)).unwrap(),
            Var::from_tensor(&on(&b)).unwrap(),
        );
        let dy = on(&random(&[m, n], 105, 1.0));
        let mut runs = Vec::new();
        for lt in [true, false] {
            fused::set_lt_bias(lt);
            let y = fused::linear(xv.as_tensor(), wv.as_tensor(), bv.as_tensor()).unwrap();
            let gr = (y.to_dtype(DType::F32).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<Tensor> = [&xv, &wv, &bv]
                .iter()
                .map(|v| gr.get(v.as_tensor()).unwrap().clone())
                .collect();
            runs.push((y, grads));
        }
        fused::set_lt_bias(false);
        assert!(max_rel(&runs[0].0, &runs[1].0) < 2e-2, "{m}x{k}x{n}: y");
        for (i, name) in ["x", "w", "b"].iter().enumerate() {
            let e = max_rel(&runs[0].1[i], &runs[1].1[i]);
            assert!(e < 2e-2, "{m}x{k}x{n}: d{name} {e}");
        }
    }
}

#[test]
fn the_flash_attention_kernel_matches_the_cpu_reference() {
    let g = gpu();
    // ViT-B/16's encoder (hd 64) and MAE decoder (hd 32) shapes, token counts off the tiles.
    for (b, n, heads, hd, seed) in [(2, 145, 12, 64, 71), (3, 77, 16, 32, 72), (1, 5, 2, 64, 73)] {
        let qkv = random(&[b, n, 3 * heads * hd], seed, 2.0)
            .to_dtype(DType::BF16)
            .unwrap();
        let op = fused::FlashAttention::new(heads);
        let cpu = qkv.apply_op1_no_bwd(&op).unwrap();
        // Both tile-loading variants: the same loads at other times, so the same bits.
        let mut variants = Vec::new();
        for prefetch in [false, true] {
            fused::set_flash_prefetch(prefetch);
            let gpu_out = qkv.to_device(&g).unwrap().apply_op1_no_bwd(&op).unwrap();
            assert_eq!(gpu_out.dims(), cpu.dims());
            let e = max_rel(&gpu_out, &cpu);
            assert!(e < 1.5e-2, "n = {n}, hd = {hd}, prefetch {prefetch}: {e}");
            variants.push(host(&gpu_out));
        }
        fused::set_flash_prefetch(false);
        assert_eq!(
            variants[0], variants[1],
            "n = {n}, hd = {hd}: prefetch changed the output"
        );
        // The model's attention: flash forward against the materialised one, same backward.
        let q = Var::from_tensor(&qkv.to_device(&g).unwrap()).unwrap();
        let probe = random(&[b, n, heads * hd], seed + 10, 1.0)
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(&g)
            .unwrap();
        let mut outs = Vec::new();
        for on in [true, false] {
            fused::set_flash(on);
            let y = fused::attention(q.as_tensor(), heads).unwrap();
            let gr = (y.to_dtype(DType::F32).unwrap() * probe.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            outs.push((y, gr.get(q.as_tensor()).unwrap().clone()));
        }
        fused::set_flash(true);
        assert!(max_rel(&outs[0].0, &outs[1].0) < 1.5e-2);
        assert_eq!(host(&outs[0].1), host(&outs[1].1));
    }
}

#[test]
fn the_im2col_kernels_match_the_cpu() {
    use icefm_model::seg::Im2col3;
    let g = gpu();
    for dt in [DType::F32, DType::BF16] {
        let x = random(&[2, 5, 7, 6], 81, 2.0).to_dtype(dt).unwrap();
        for fwd in [Im2col3::COLUMNS, Im2col3::MIRRORED] {
            let cpu = x.apply_op1_no_bwd(&fwd).unwrap();
            let gpu_cols = x.to_device(&g).unwrap().apply_op1_no_bwd(&fwd).unwrap();
            assert_eq!(gpu_cols.dims(), &[2, 5, 7, 54]);
            assert_eq!(host(&gpu_cols), host(&cpu), "{fwd:?}");
        }
        let gr = random(&[2, 5, 7, 54], 82, 1.0).to_dtype(dt).unwrap();
        let adj = Im2col3::ADJOINT;
        let cpu = gr.apply_op1_no_bwd(&adj).unwrap();
        let gpu_dx = gr.to_device(&g).unwrap().apply_op1_no_bwd(&adj).unwrap();
        assert_eq!(gpu_dx.dims(), &[2, 5, 7, 6]);
        let tol = if dt == DType::BF16 { 1e-2 } else { 1e-6 };
        assert!(max_rel(&gpu_dx, &cpu) < tol, "{dt:?}");
    }
}

#[test]
fn the_flash_attention_backward_kernels_match_the_cpu_reference() {
    let g = gpu();
    for (b, n, heads, hd, seed) in [(2, 145, 12, 64, 91), (3, 77, 16, 32, 92), (1, 5, 2, 64, 93)] {
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let qkv = bf(random(&[b, n, 3 * heads * hd], seed, 2.0));
        let o = qkv
            .apply_op1_no_bwd(&fused::FlashAttention::new(heads))
            .unwrap();
        let dout = bf(random(&[b, n, heads * hd], seed + 1, 1.0));
        let op = fused::FlashAttentionGrad::new(heads);
        let cpu = qkv.apply_op3_no_bwd(&o, &dout, &op).unwrap();
        let on = |t: &Tensor| t.to_device(&g).unwrap();
        let mut variants = Vec::new();
        for prefetch in [false, true] {
            fused::set_flash_prefetch(prefetch);
            let gpu_out = on(&qkv).apply_op3_no_bwd(&on(&o), &on(&dout), &op).unwrap();
            assert_eq!(gpu_out.dims(), cpu.dims());
            let e = max_rel(&gpu_out, &cpu);
            assert!(e < 2e-2, "n = {n}, hd = {hd}, prefetch {prefetch}: {e}");
            variants.push(host(&gpu_out));
        }
        fused::set_flash_prefetch(false);
        assert_eq!(
            variants[0], variants[1],
            "n = {n}, hd = {hd}: prefetch changed dqkv"
        );
        // Through the model's attention node: flash backward on (using the flash forward's
        // log-sum-exp), on without it (materialised forward), and off.
        let q = Var::from_tensor(&on(&qkv)).unwrap();
        let mut grads = Vec::new();
        for (flash_bwd, flash_fwd) in [(true, true), (false, true), (true, false)] {
            fused::set_flash_bwd(flash_bwd);
            fused::set_flash(flash_fwd);
            let y = fused::attention(q.as_tensor(), heads).unwrap();
            let gr = (y.to_dtype(DType::F32).unwrap() * on(&dout).to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            grads.push(gr.get(q.as_tensor()).unwrap().clone());
        }
        fused::set_flash_bwd(false);
        fused::set_flash(true);
        let e = max_rel(&grads[0], &grads[1]);
        assert!(e < 2e-2, "through the node, n = {n}: {e}");
        let e = max_rel(&grads[2], &grads[1]);
        assert!(
            e < 2e-2,
            "through the node, no saved log-sum-exp, n = {n}: {e}"
        );
    }
}

/// The flash kernels' inline-PTX primitives (`ldmatrix`, `ldmatrix .trans`, the bf16 pair
/// conversion, `ex2.approx.ftz`) on this GPU, against the PTX ISA's definitions that the CPU
/// emulator also follows: if the flash tests fail and this passes, the fault is not in them.
#[test]
fn the_ptx_primitives_behave_as_the_emulator_assumes() {
    let g = gpu();
    let words = icefm_model::cuda::ptx_probe(g.as_cuda_device().unwrap()).unwrap();
    common::check_ptx_probe(&words).unwrap();
}
