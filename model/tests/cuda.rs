//! icefm's CUDA kernels against their CPU references (feature `cuda`; needs a GPU, so CI does
//! not run these: scripts/gpu-check.sh does). Random seeded inputs; values and gradients of the
//! fused layer norm and softmax (f32 and bf16), the fused AdamW step against the composed one,
//! a whole micro MAE's loss and gradients on the GPU against the CPU, the page-locked
//! uploaders and queued readbacks, clipping on the device against clipping on the host, and a
//! step's census on the GPU against the CPU's. Run them on one thread
//! (`--test-threads=1`): the AdamW test switches fusion off and on for the whole process, and a
//! census counts every thread's operations.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::rng::Rng;
use icefm_model::mae::{Mae, MaeConfig, Masking};
use icefm_model::optim::{AdamW, AdamWConfig};
use icefm_model::train::{init_weights, named_vars};
use icefm_model::{fused, ops};

mod common;
use common::{max_rel, values as host};

fn gpu() -> Device {
    icefm_model::cuda::device(0).expect("a CUDA device")
}

/// A seeded f32 tensor on the CPU.
fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    common::random(shape, seed, scale, DType::F32)
}

/// NCCL, as data-parallel training uses it ([`icefm_model::dist`]), with the one rank a
/// one-GPU machine can hold (NCCL refuses two ranks on one device): a unique id, a
/// communicator on candle's stream, and a sum that returns each value as it was.
#[test]
fn nccl_sums_on_the_device_with_one_rank() {
    use icefm_model::cuda::Nccl;
    assert!(
        Nccl::available(),
        "libnccl.so.2 is not on the library path (scripts/gpu-env.sh adds PyTorch's)"
    );
    let Device::Cuda(cd) = gpu() else {
        unreachable!()
    };
    let id = Nccl::unique_id().unwrap();
    assert_eq!(id.len(), 128);
    let nccl = Nccl::new(&cd, 0, 1, &id).unwrap();
    let x = random(&[3, 1001], 7, 2.0);
    let on = x.to_device(&gpu()).unwrap();
    // A view off its storage's start, as the gradients' flat buffer may be.
    let sum = nccl.sum(&on.narrow(0, 1, 2).unwrap()).unwrap();
    assert_eq!(sum.dims(), &[2, 1001]);
    assert_eq!(host(&sum), host(&x.narrow(0, 1, 2).unwrap()));
}

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

/// A micro MAE on `dev` with seeded weights, its loss and named gradients for one batch.
fn micro_grads(dev: &Device, dtype: DType) -> (f32, Vec<(String, Vec<f64>)>) {
    let mut cfg = MaeConfig::micro();
    cfg.encoder.dim = 32;
    cfg.encoder.heads = 4;
    cfg.decoder_dim = 16;
    let vars = VarMap::new();
    let mut mae = Mae::new(VarBuilder::from_varmap(&vars, DType::F32, dev), &cfg).unwrap();
    mae.compute_dtype = dtype;
    init_weights(&vars, 11).unwrap();
    let (b, n) = (3usize, 16usize);
    let images = random(&[b, 2, n, n], 12, 1.5).to_device(dev).unwrap();
    let valid = Tensor::ones((b, n, n), DType::F32, dev).unwrap();
    let mut r = Rng::new(13, 0);
    let noise: Vec<Vec<f32>> = (0..b)
        .map(|_| (0..16).map(|_| r.unit() as f32).collect())
        .collect();
    let masking = Masking::from_noise(&noise, 0.75);
    let out = mae.forward(&images, &valid, &masking, None).unwrap();
    let grads = out.loss.backward().unwrap();
    let named = named_vars(&vars)
        .into_iter()
        .map(|(name, v)| {
            let g = grads.get(v.as_tensor()).unwrap();
            (name, host(g))
        })
        .collect();
    (out.loss.to_scalar::<f32>().unwrap(), named)
}

#[test]
fn a_micro_mae_has_the_same_loss_and_gradients_on_the_gpu() {
    let (loss_c, grads_c) = micro_grads(&Device::Cpu, DType::F32);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
        let (loss_g, grads_g) = micro_grads(&gpu(), dtype);
        assert!(
            ((loss_g - loss_c) / loss_c).abs() < tol as f32,
            "{dtype:?} loss {loss_g} vs {loss_c}"
        );
        for ((name, a), (_, c)) in grads_g.iter().zip(&grads_c) {
            let scale = c.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
            let e = a
                .iter()
                .zip(c)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale));
            // The key third of the qkv bias has no gradient by symmetry: its scale is ~0.
            assert!(e < tol * 10.0, "{dtype:?} gradient of {name}: {e}");
        }
    }
}

/// `Σᵢ Σ (vᵢ · rᵢ)²` with `rᵢ` seeded random multipliers (seed `seed + i`) on `g`: a loss
/// whose gradients differ per parameter and step.
fn squared_products<'a>(vars: impl Iterator<Item = &'a Var>, seed: u64, g: &Device) -> Tensor {
    let mut loss = Tensor::zeros((), DType::F32, g).unwrap();
    for (i, v) in vars.enumerate() {
        let t = random(v.dims(), seed + i as u64, 1.0).to_device(g).unwrap();
        let term = (v.as_tensor() * t)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        loss = (loss + term).unwrap();
    }
    loss
}

#[test]
fn the_fused_adamw_step_matches_the_composed_one() {
    let g = gpu();
    let run = |fusion: bool| {
        fused::set_fused(fusion);
        let shapes: [&[usize]; 4] = [&[300, 70], &[70], &[1, 1, 16], &[1000, 3]];
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let name = format!("p{i}.{}", if s.len() == 1 { "bias" } else { "weight" });
                (
                    name,
                    Var::from_tensor(&random(s, 20 + i as u64, 1.0).to_device(&g).unwrap())
                        .unwrap(),
                )
            })
            .collect();
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
        for step in 0..3u64 {
            let loss = squared_products(vars.iter().map(|(_, v)| v), 40 + step * 10, &g);
            let grads = loss.backward().unwrap();
            opt.step(&grads, 1e-2, 0.7).unwrap();
        }
        let (_, moments) = opt.state();
        let mut out: Vec<Vec<f64>> = vars.iter().map(|(_, v)| host(v.as_tensor())).collect();
        out.extend(moments.iter().map(|(_, t)| host(t)));
        out
    };
    let composed = run(false);
    let fused_out = run(true);
    fused::set_fused(true);
    for (i, (a, c)) in fused_out.iter().zip(&composed).enumerate() {
        let scale = c.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        let e = a
            .iter()
            .zip(c)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale));
        assert!(e < 1e-5, "tensor {i}: {e}");
    }
    // The update moved the weights.
    assert!(
        fused_out[0]
            .iter()
            .zip(&host(&random(&[300, 70], 20, 1.0)))
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
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
fn the_uploader_delivers_every_batch_intact() {
    let g = gpu();
    let mut up = icefm_model::cuda::Uploader::new(g.as_cuda_device().unwrap()).unwrap();
    // Two slots, reused; a short batch in between (new buffers for its slot); each tensor kept
    // alive while later uploads reuse the slots, and work queued on each before the next.
    let sizes = [6 * 1000, 6 * 1000, 6 * 1000, 6 * 500, 6 * 1000, 6 * 1000];
    let mut kept = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let data: Vec<f32> = host(&random(&[len], 200 + i as u64, 3.0))
            .iter()
            .map(|&x| x as f32)
            .collect();
        let t = up.upload(&data, (len / 6, 6)).unwrap();
        let doubled = (&t * 2.0).unwrap();
        kept.push((data, t, doubled));
    }
    for (data, t, doubled) in &kept {
        assert_eq!(t.dims(), &[data.len() / 6, 6]);
        let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&got, data);
        let twice: Vec<f32> = doubled.flatten_all().unwrap().to_vec1().unwrap();
        assert!(twice.iter().zip(data).all(|(a, b)| *a == 2.0 * b));
    }
    assert!(up.upload(&[1.0, 2.0, 3.0], (2, 2)).is_err());
}

#[test]
fn index_uploads_and_queued_readbacks_carry_their_values() {
    let g = gpu();
    let cd = g.as_cuda_device().unwrap();
    let mut up = icefm_model::cuda::Uploader::<u32>::new(cd).unwrap();
    let noise: Vec<Vec<f32>> = (0..3)
        .map(|s| {
            (0..16)
                .map(|t| ((t * 7 + s * 5) % 16) as f32 / 16.0)
                .collect()
        })
        .collect();
    let masking = Masking::from_noise(&noise, 0.75);
    let packed = masking.packed();
    let len = packed.len();
    let staged = masking
        .clone()
        .staged(up.upload(&packed, len).unwrap())
        .unwrap();
    let on = staged.on(&g).unwrap();
    let keep: Vec<Vec<u32>> = on.keep.to_vec2().unwrap();
    let restore: Vec<Vec<u32>> = on.restore.to_vec2().unwrap();
    assert_eq!(keep, masking.ids_keep);
    assert_eq!(restore, masking.ids_restore);
    let masked: Vec<Vec<u32>> = on.masked.to_vec2().unwrap();
    for (b, row) in masked.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            assert_eq!(m == 1, masking.is_masked(b, t));
        }
    }
    // A readback queued behind more work returns the values as they were when it was queued.
    let t = Tensor::new(&[1.5f32, -2.0, 3.25], &g).unwrap();
    let r = icefm_model::cuda::Readback::start(&t.affine(2.0, 0.0).unwrap()).unwrap();
    let _more = t.exp().unwrap();
    assert_eq!(r.finish().unwrap().0, vec![3.0, -4.0, 6.5]);
    let bf = Tensor::new(0.5f32, &g)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        icefm_model::cuda::Readback::start(&bf)
            .unwrap()
            .finish()
            .unwrap()
            .0,
        vec![0.5]
    );
    // Two at a time, in page-locked buffers the finished ones left for reuse.
    let a = icefm_model::cuda::Readback::start(&t).unwrap();
    let b = icefm_model::cuda::Readback::start(&t.neg().unwrap()).unwrap();
    let (vb, mark_b) = b.finish().unwrap();
    let (va, mark_a) = a.finish().unwrap();
    assert_eq!(vb, vec![-1.5, 2.0, -3.25]);
    assert_eq!(va, vec![1.5, -2.0, 3.25]);
    // Each readback's mark is behind its copy: a's comes first on the stream.
    assert!(mark_a.secs_to(&mark_b).unwrap() >= 0.0);
    // Device time between two marks is the work queued between them, whatever the host does
    // after: a record read late (training's records) still gets its step's time.
    let start = icefm_model::cuda::DeviceMark::record(g.as_cuda_device().unwrap()).unwrap();
    let m = Tensor::ones((2048, 2048), DType::F32, &g).unwrap();
    let host = std::time::Instant::now();
    for _ in 0..20 {
        m.matmul(&m).unwrap();
    }
    let r = icefm_model::cuda::Readback::start(&m.sum_all().unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (v, end) = r.finish().unwrap();
    assert_eq!(v, vec![2048.0 * 2048.0]);
    let secs = start.secs_to(&end).unwrap();
    assert!(
        secs > 0.0 && secs < host.elapsed().as_secs_f64() - 0.25,
        "{secs} s"
    );
}

#[test]
fn clipping_on_the_device_updates_as_clipping_on_the_host() {
    let g = gpu();
    fused::set_fused(true);
    for max_norm in [0.5, 1e9, 0.0] {
        let run = |on_device: bool| {
            let shapes: [&[usize]; 3] = [&[300, 70], &[70], &[1000, 3]];
            let vars: Vec<(String, Var)> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let v = Var::from_tensor(&random(s, 80 + i as u64, 1.0).to_device(&g).unwrap());
                    (format!("p{i}.weight"), v.unwrap())
                })
                .collect();
            let just: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
            let mut norms = Vec::new();
            for step in 0..3u64 {
                let loss = squared_products(just.iter(), 90 + step * 10, &g);
                let grads = loss.backward().unwrap();
                let c = icefm_model::optim::clip(&grads, just.iter(), max_norm).unwrap();
                assert!(matches!(c, icefm_model::optim::Clip::Device { .. }));
                norms.push(c.norm().unwrap());
                if on_device {
                    opt.step_clipped(&grads, 1e-2, &c).unwrap();
                } else {
                    opt.step(&grads, 1e-2, c.scale().unwrap()).unwrap();
                }
            }
            let w: Vec<Vec<f64>> = just.iter().map(|v| host(v.as_tensor())).collect();
            (w, norms)
        };
        let (dev_w, dev_norms) = run(true);
        let (host_w, host_norms) = run(false);
        assert_eq!(dev_norms, host_norms, "max norm {max_norm}");
        // The same scale, computed in double on either side, then the same kernel.
        assert_eq!(dev_w, host_w, "max norm {max_norm}");
    }
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

#[test]
fn the_gpu_step_census_is_the_cpu_census_with_gpu_routes() {
    // What examples/census.rs counts on the CPU is what a GPU step runs: the same operations,
    // bytes and products, under whatever switches the process has (the partial sums of
    // parameter gradients aside: the kernels choose their own row blocks).
    use icefm_model::census::{mae_step, rows};
    let cfg = common::census_mae();
    let on_gpu = rows(&mae_step(&cfg, 64, 3, DType::BF16, &gpu(), false).unwrap());
    fused::set_gpu_routes(true);
    let on_cpu = mae_step(&cfg, 64, 3, DType::BF16, &Device::Cpu, false);
    fused::set_gpu_routes(false);
    common::assert_same_census(&on_gpu, &rows(&on_cpu.unwrap()));
}

/// Data-parallel training on a GPU through the host route, on the GPU check's store (two ranks
/// share the one GPU, which NCCL refuses, so NCCL is off): the gradients' flat buffer goes to the host and back, the
/// fused AdamW and clipping read gradients that are views into it, and two ranks give one
/// process's losses and weights.
#[test]
fn two_ranks_on_one_gpu_take_one_process_steps_through_the_host() {
    use icefm_model::config::TrainConfig;
    use icefm_model::dist::{DistSpec, Group};
    use icefm_model::train::{RunOptions, checkpoints, train_mae, train_mae_in};
    use std::sync::atomic::AtomicBool;
    // The GPU check's small store (scripts/build-gpu-check.sh; this binary must not link
    // netCDF, so it cannot make one).
    let store = std::path::PathBuf::from(
        std::env::var("ICEFM_GPU_STORE").unwrap_or_else(|_| ".gpu/store".into()),
    );
    assert!(
        store.join("zarr.json").exists(),
        "{}: no store (run from the repository root after scripts/build-gpu-check.sh, or set \
         ICEFM_GPU_STORE)",
        store.display()
    );
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.panel_every=0",
    ];
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = TrainConfig::parse(common::DIST_MAE, &sets).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = |out: &std::path::Path| RunOptions {
        device: gpu(),
        store: store.clone(),
        out: out.to_path_buf(),
        resume: false,
    };
    let one = train_mae(
        &cfg,
        &opts(&tmp.path().join("one")),
        &AtomicBool::new(false),
        &|_| {},
    )
    .unwrap();
    let port = common::free_port();
    let two = tmp.path().join("two");
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let (cfg, o) = (cfg.clone(), opts(&two));
            std::thread::spawn(move || {
                let spec = DistSpec::parse(&format!("{r}/2@127.0.0.1:{port}")).unwrap();
                let mut g = Group::connect(&spec, std::time::Duration::from_secs(60)).unwrap();
                g.allow_nccl(false);
                train_mae_in(&mut g, &cfg, &o, &AtomicBool::new(false), &|_| {}).unwrap()
            })
        })
        .collect();
    let two_runs: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    for (a, b) in one.records.iter().zip(&two_runs[0].records) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-4 * a.loss.abs(),
            "{a:?}\n{b:?}"
        );
    }
    assert_eq!(two_runs[1].steps_done, 3);
    let load = |o: &std::path::Path| {
        let dir = checkpoints(o).last().unwrap().1.clone();
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    // Adam moves a weight whose gradient is near 0 by up to its learning rate either way, so
    // the gap is taken against the largest weight of the model, not each tensor's.
    let (a, b) = (load(&tmp.path().join("one")), load(&two));
    let (mut gap, mut top) = (0f64, 0f64);
    for (name, x) in &a {
        for (p, q) in host(x).iter().zip(host(&b[name])) {
            gap = gap.max((p - q).abs());
            top = top.max(p.abs());
        }
    }
    assert!(gap / top < 1e-3, "weights differ by {}", gap / top);
}
