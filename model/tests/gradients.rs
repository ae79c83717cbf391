//! The silent risk of candle models: layers whose backward is missing train nothing and say
//! nothing. Every trainable parameter of a tiny MAE must get a non-zero, finite gradient, and the
//! gradients must match finite differences, per op class and through the whole model.
#![allow(clippy::unwrap_used, missing_docs)]

use candle_core::{DType, Device, Tensor, Var};

mod common;
use candle_nn::{VarBuilder, VarMap};
use common::check_var;
use icefm_model::mae::{Mae, MaeConfig, Masking, norm_pix, patch_loss};
use icefm_model::ops::{layer_norm, softmax};
use icefm_model::train::named_vars;
use icefm_model::vit::{Linear, patchify, sincos_2d};

fn tiny(dtype: DType) -> (VarMap, Mae) {
    let cfg = MaeConfig::micro();
    let vars = VarMap::new();
    let mae = Mae::new(VarBuilder::from_varmap(&vars, dtype, &Device::Cpu), &cfg).unwrap();
    // Seeded weights: candle's own initialisers are unseeded, and the checks must not depend on
    // the draw.
    icefm_model::train::init_weights(&vars, 7).unwrap();
    (vars, mae)
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// Images `[2, 2, 16, 16]`, a validity mask with a no-data corner, and a fixed masking.
fn inputs(dtype: DType) -> (Tensor, Tensor, Masking) {
    let dev = Device::Cpu;
    let images = Tensor::from_vec(values(2 * 2 * 16 * 16, 1), (2, 2, 16, 16), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let mut v = vec![1f64; 2 * 16 * 16];
    for y in 0..6 {
        for x in 0..5 {
            v[y * 16 + x] = 0.0; // sample 0: a no-data corner
        }
    }
    let valid = Tensor::from_vec(v, (2, 16, 16), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let noise: Vec<Vec<f32>> = (0..2)
        .map(|b| values(16, 10 + b).iter().map(|&x| x as f32).collect())
        .collect();
    (images, valid, Masking::from_noise(&noise, 0.75))
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let (vars, mae) = tiny(DType::F32);
    let (images, valid, masking) = inputs(DType::F32);
    let out = mae.forward(&images, &valid, &masking, None).unwrap();
    let loss = out.loss.to_scalar::<f32>().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    let grads = out.loss.backward().unwrap();
    let named = named_vars(&vars);
    assert!(named.len() > 30, "{} parameters", named.len());
    for (name, var) in &named {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        if name.ends_with("attn.qkv.bias") {
            // The key bias shifts every score of a query alike, which softmax ignores: its
            // gradient is zero by symmetry (as in PyTorch). Query and value biases must move.
            let d = g.len() / 3;
            let top = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                g[..d].iter().any(|&x| x != 0.0),
                "{name}: zero query gradient"
            );
            assert!(
                g[2 * d..].iter().any(|&x| x != 0.0),
                "{name}: zero value gradient"
            );
            assert!(
                g[d..2 * d].iter().all(|x| x.abs() <= 1e-4 * top),
                "{name}: key bias"
            );
        } else {
            assert!(g.iter().any(|&x| x != 0.0), "{name}: zero gradient");
        }
    }
    // The trap this guards against: candle's fast layer norm records no backward.
    let x = Var::new(&[[1f32, 2.0, 4.0]], &Device::Cpu).unwrap();
    let w = Var::new(&[1f32, 1.0, 1.0], &Device::Cpu).unwrap();
    let b = Var::new(&[0f32, 0.0, 0.0], &Device::Cpu).unwrap();
    let fast = candle_nn::ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(fast.backward().unwrap().get(w.as_tensor()).is_none());
    assert!(ours.backward().unwrap().get(w.as_tensor()).is_some());
}

#[test]
fn op_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let var = |n: usize, seed: u64, shape: &[usize]| {
        Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, &dev).unwrap()).unwrap()
    };
    // Norm: input, scale and shift.
    let x = var(24, 1, &[2, 3, 4]);
    let w = var(4, 2, &[4]);
    let b = var(4, 3, &[4]);
    let probe = Tensor::from_vec(values(24, 4), (2, 3, 4), &dev).unwrap();
    let f = || {
        (layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    for (name, v) in [("norm.x", &x), ("norm.weight", &w), ("norm.bias", &b)] {
        check_var(name, v, &f, 24);
    }
    // Attention: softmax of scaled q·kᵀ, times v.
    let q = var(12, 5, &[1, 3, 4]);
    let k = var(12, 6, &[1, 3, 4]);
    let vv = var(12, 7, &[1, 3, 4]);
    let probe = Tensor::from_vec(values(12, 8), (1, 3, 4), &dev).unwrap();
    let f = || {
        let att =
            softmax(&(q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap() * 0.5).unwrap())
                .unwrap();
        (att.matmul(vv.as_tensor()).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    for (name, v) in [("attn.q", &q), ("attn.k", &k), ("attn.v", &vv)] {
        check_var(name, v, &f, 12);
    }
    // MLP: linear, exact GELU, linear.
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F64, &dev);
    let fc1 = Linear::new(vb.pp("fc1"), 4, 6).unwrap();
    let fc2 = Linear::new(vb.pp("fc2"), 6, 4).unwrap();
    icefm_model::train::init_weights(&vars, 5).unwrap();
    let input = Tensor::from_vec(values(8, 9), (2, 4), &dev).unwrap();
    let f = || {
        fc2.forward(&fc1.forward(&input).unwrap().gelu_erf().unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    for (name, v) in named_vars(&vars) {
        check_var(&name, &v, &f, 24);
    }
    // Loss: norm-pix targets, masked-patch mean, invalid values left out.
    let pred = var(2 * 3 * 8, 10, &[2, 3, 8]);
    let target = Tensor::from_vec(values(48, 11), (2, 3, 8), &dev).unwrap();
    let mut v = vec![1f64; 48];
    v[0] = 0.0;
    v[5] = 0.0;
    for x in &mut v[8..15] {
        *x = 0.0; // patch (0, 1) keeps a single valid value: left out
    }
    let valid = Tensor::from_vec(v, (2, 3, 8), &dev).unwrap();
    let masked = Tensor::from_vec(vec![1f64, 1.0, 0.0, 1.0, 0.0, 1.0], (2, 3, 1), &dev).unwrap();
    let (t, weight) = norm_pix(&target, &valid).unwrap();
    let f = || patch_loss(pred.as_tensor(), &t, &weight, &masked).unwrap();
    check_var("loss.pred", &pred, &f, 48);
    // Patch (0, 1) has one valid value and (0, 2), (1, 0)… are unmasked: their predictions get
    // no gradient.
    let g: Vec<f64> = f()
        .backward()
        .unwrap()
        .get(pred.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g[8..16].iter().all(|&x| x == 0.0));
    assert!(g[16..24].iter().all(|&x| x == 0.0));
    assert_eq!(g[0], 0.0);
    assert!(g[1] != 0.0);
}

#[test]
fn model_gradients_match_finite_differences() {
    let (vars, mae) = tiny(DType::F64);
    let (images, valid, masking) = inputs(DType::F64);
    let f = || mae.forward(&images, &valid, &masking, None).unwrap().loss;
    for (name, var) in named_vars(&vars) {
        // A few elements of every parameter: each op class of encoder and decoder.
        check_var(&name, &var, &f, 3);
    }
}

#[test]
fn masking_position_embedding_and_patch_order() {
    let noise = vec![vec![0.5f32, 0.1, 0.9, 0.3]];
    let m = Masking::from_noise(&noise, 0.5);
    assert_eq!(m.ids_keep, vec![vec![1, 3]]);
    assert_eq!(m.ids_restore, vec![vec![2, 0, 3, 1]]);
    assert!(m.is_masked(0, 0) && !m.is_masked(0, 1) && m.is_masked(0, 2));

    // The first half of the position embedding encodes the row, the second the column.
    let (h, w, d) = (3, 4, 16);
    let pe = sincos_2d(h, w, d);
    let tok = |r: usize, c: usize| &pe[(r * w + c) * d..(r * w + c + 1) * d];
    assert_eq!(&tok(2, 0)[..d / 2], &tok(2, 3)[..d / 2]);
    assert_ne!(&tok(1, 0)[..d / 2], &tok(2, 0)[..d / 2]);
    assert_eq!(&tok(1, 0)[d / 2..], &tok(2, 0)[d / 2..]);
    assert_ne!(&tok(1, 0)[d / 2..], &tok(1, 1)[d / 2..]);
    assert_eq!(tok(0, 0)[0], 0.0); // sin(0)
    assert_eq!(tok(0, 0)[d / 4], 1.0); // cos(0)
    assert!((tok(1, 0)[0] - 1f32.sin()).abs() < 1e-7);

    // Patchify order is a flattened [D, C, p, p] kernel: the linear patch embedding equals a
    // stride-p convolution with the same weights.
    let dev = Device::Cpu;
    let x = Tensor::from_vec(values(2 * 2 * 8 * 8, 3), (2, 2, 8, 8), &dev).unwrap();
    let wt = Tensor::from_vec(values(5 * 2 * 4 * 4, 4), (5, 2, 4, 4), &dev).unwrap();
    let conv = x.conv2d(&wt, 0, 4, 1, 1).unwrap(); // [2, 5, 2, 2]
    let lin = patchify(&x, 4)
        .unwrap()
        .broadcast_matmul(&wt.reshape((5, 32)).unwrap().t().unwrap())
        .unwrap(); // [2, 4, 5]
    let conv: Vec<f64> = conv
        .permute((0, 2, 3, 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let lin: Vec<f64> = lin.flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in conv.iter().zip(&lin) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}
