//! The fused layer norm and softmax ([`icefm_model::fused`]) against their compositions of
//! candle primitives ([`icefm_model::ops`]): values and gradients, f32 and f64, on seeded
//! random inputs with awkward row lengths.
#![allow(clippy::unwrap_used)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use icefm_model::{fused, ops};

mod common;
use common::{max_rel, random, values};

/// Loss weights that make every output element matter differently.
fn weights_like(t: &Tensor, seed: u64) -> Tensor {
    random(t.dims(), seed, 1.0, t.dtype())
}

/// The gradients of `Σ w·fused` and `Σ w·composed` for one seeded probe `w` shaped like them.
fn probed_grads(fused: Tensor, composed: Tensor, seed: u64) -> (GradStore, GradStore) {
    let w = weights_like(&composed, seed);
    let grads = |y: Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    (grads(fused), grads(composed))
}

#[test]
fn fused_layer_norm_equals_the_composition_with_gradients() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (shape, d) in [
            (vec![3, 5, 17], 17usize),
            (vec![7, 96], 96),
            (vec![2, 33, 200], 200),
            // More rows than the backward's 2,048 blocks take at 16 each; a short last block.
            (vec![40_001, 8], 8),
        ] {
            let x =
                Var::from_tensor(&random(&shape, 1, 3.0, dtype).affine(1.0, 0.5).unwrap()).unwrap();
            let w = Var::from_tensor(&random(&[d], 2, 1.0, dtype)).unwrap();
            let b = Var::from_tensor(&random(&[d], 3, 1.0, dtype)).unwrap();
            let out_f =
                fused::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
            let out_c = ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
            assert!(max_rel(&out_f, &out_c) < tol, "{dtype:?} {shape:?} forward");
            let (gf, gc) = probed_grads(out_f, out_c, 4);
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let a = gf.get(v.as_tensor()).unwrap();
                let e = gc.get(v.as_tensor()).unwrap();
                assert_eq!(a.dims(), e.dims(), "{name}");
                let err = max_rel(a, e);
                assert!(err < tol * 10.0, "{dtype:?} {shape:?} d{name}: {err}");
            }
        }
    }
}

/// A batch of no rows: empty outputs and input gradients, zero gradients for the parameters
/// (the backward's blocks of rows, of which there are none, must not divide by zero).
#[test]
fn empty_batches_give_zero_parameter_gradients() {
    let x = Var::from_tensor(&Tensor::zeros((0, 17), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let w = Var::from_tensor(&random(&[17], 2, 1.0, DType::F32)).unwrap();
    let b = Var::from_tensor(&random(&[17], 3, 1.0, DType::F32)).unwrap();
    for one_op in [false, true] {
        let y = if one_op {
            fused::bias_gelu(x.as_tensor(), b.as_tensor()).unwrap()
        } else {
            fused::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap()
        };
        assert_eq!(y.dims(), [0, 17]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().dims(), [0, 17]);
        let params: &[&Var] = if one_op { &[&b] } else { &[&w, &b] };
        for v in params {
            assert_eq!(
                values(g.get(v.as_tensor()).unwrap()),
                vec![0.0; 17],
                "bias+gelu {one_op}"
            );
        }
    }
}

#[test]
fn fused_softmax_equals_the_composition_with_gradients() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for shape in [vec![2, 3, 5, 145], vec![4, 577], vec![9, 1]] {
            let x = Var::from_tensor(&random(&shape, 5, 8.0, dtype)).unwrap();
            let out_f = fused::softmax(x.as_tensor()).unwrap();
            let out_c = ops::softmax(x.as_tensor()).unwrap();
            assert!(max_rel(&out_f, &out_c) < tol, "{dtype:?} {shape:?} forward");
            // Rows sum to one.
            let sums: Vec<f64> = out_f
                .to_dtype(DType::F64)
                .unwrap()
                .sum(candle_core::D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
            let (gf, gc) = probed_grads(out_f, out_c, 6);
            let err = max_rel(
                gf.get(x.as_tensor()).unwrap(),
                gc.get(x.as_tensor()).unwrap(),
            );
            assert!(err < tol * 10.0, "{dtype:?} {shape:?} dx: {err}");
        }
    }
}

#[test]
fn fused_bias_add_and_gelu_equal_candles_with_gradients() {
    // Two ops (bias add, then GELU) and one (bias_gelu), against candle's composition.
    for one_op in [false, true] {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            // The last: more rows than the bias gradient's 256 blocks take at 64 each.
            for shape in [vec![3, 7, 33], vec![200, 64], vec![5, 1], vec![20_001, 3]] {
                let c = *shape.last().unwrap();
                let x = Var::from_tensor(&random(&shape, 11, 3.0, dtype)).unwrap();
                let b = Var::from_tensor(&random(&[c], 12, 1.0, dtype)).unwrap();
                // gelu(x + b), fused and candle's.
                let out_f = if one_op {
                    fused::bias_gelu(x.as_tensor(), b.as_tensor()).unwrap()
                } else {
                    fused::gelu(&fused::bias_add(x.as_tensor(), b.as_tensor()).unwrap()).unwrap()
                };
                let out_c = x
                    .as_tensor()
                    .broadcast_add(b.as_tensor())
                    .unwrap()
                    .gelu_erf()
                    .unwrap();
                assert!(max_rel(&out_f, &out_c) < tol, "{dtype:?} {shape:?} forward");
                let (gf, gc) = probed_grads(out_f, out_c, 13);
                for (name, v) in [("x", &x), ("bias", &b)] {
                    let a = gf.get(v.as_tensor()).unwrap();
                    let e = gc.get(v.as_tensor()).unwrap();
                    assert_eq!(a.dims(), e.dims(), "{name}");
                    // candle's GELU derivative rounds 1/sqrt(2 pi) to 0.398942 (4e-7 relative).
                    let err = max_rel(a, e);
                    assert!(
                        err < tol.max(1e-6) * 10.0,
                        "one op {one_op}, {dtype:?} {shape:?} d{name}: {err}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_linear_op_equals_candles_product_and_bias_with_gradients() {
    // LinearBias (the CPU reference of the cuBLASLt bias epilogue) against x · wᵀ + b.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for (m, k, n) in [(37, 24, 40), (1, 5, 3), (64, 96, 1)] {
            let x = Var::from_tensor(&random(&[m, k], 21, 2.0, dtype)).unwrap();
            let w = Var::from_tensor(&random(&[n, k], 22, 1.0, dtype)).unwrap();
            let b = Var::from_tensor(&random(&[n], 23, 1.0, dtype)).unwrap();
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let out_f = fused::linear_bias(xt, wt, bt).unwrap();
            let out_c = xt
                .matmul(&wt.t().unwrap())
                .unwrap()
                .broadcast_add(bt)
                .unwrap();
            assert_eq!(out_f.dims(), &[m, n]);
            assert!(max_rel(&out_f, &out_c) < tol, "{dtype:?} {m}x{k}x{n}");
            // `linear` on the CPU is candle's product and the fused bias add.
            assert!(max_rel(&fused::linear(xt, wt, bt).unwrap(), &out_c) < tol);
            let (gf, gc) = probed_grads(out_f, out_c, 24);
            for (name, v) in [("x", &x), ("w", &w), ("bias", &b)] {
                let a = gf.get(v.as_tensor()).unwrap();
                let e = gc.get(v.as_tensor()).unwrap();
                assert_eq!(a.dims(), e.dims(), "{name}");
                let err = max_rel(a, e);
                assert!(err < tol, "{dtype:?} {m}x{k}x{n} d{name}: {err}");
            }
        }
    }
    let x = random(&[4, 6], 25, 1.0, DType::F32);
    let w = random(&[3, 5], 26, 1.0, DType::F32);
    let b = random(&[3], 27, 1.0, DType::F32);
    assert!(fused::linear_bias(&x, &w, &b).is_err(), "in-widths differ");
}

#[test]
fn softmax_over_the_valid_entries_ignores_the_padding() {
    for dtype in [DType::F64, DType::F32] {
        let (rows, d, valid) = (6, 24, 17);
        let x = Var::from_tensor(&random(&[rows, d], 21, 5.0, dtype)).unwrap();
        let y = fused::softmax_valid(x.as_tensor(), valid).unwrap();
        let head = ops::softmax(&x.as_tensor().narrow(1, 0, valid).unwrap()).unwrap();
        assert!(max_rel(&y.narrow(1, 0, valid).unwrap(), &head) < 1e-6);
        let pad: Vec<f64> = y
            .narrow(1, valid, d - valid)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(pad.iter().all(|&v| v == 0.0));
        // Gradients: the valid part as the plain softmax's, none into the padding.
        let lw = weights_like(&y, 22);
        let g = (&y * &lw).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap();
        let xh = Var::from_tensor(&x.as_tensor().narrow(1, 0, valid).unwrap()).unwrap();
        let gh = (ops::softmax(xh.as_tensor()).unwrap() * lw.narrow(1, 0, valid).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gh = gh.get(xh.as_tensor()).unwrap();
        assert!(max_rel(&g.narrow(1, 0, valid).unwrap(), gh) < 1e-5);
        let gpad: Vec<f64> = g
            .narrow(1, valid, d - valid)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gpad.iter().all(|&v| v == 0.0));
    }
    let x = random(&[2, 4], 23, 1.0, DType::F32);
    assert!(fused::softmax_valid(&x, 5).is_err());
    assert!(fused::softmax_valid(&x, 0).is_err());
}

#[test]
fn the_fused_relu_equals_candles_with_gradients_and_follows_pytorch_at_zero_and_nan() {
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        // No value is exactly 0 here: there the two backward passes differ on purpose.
        let x = Var::from_tensor(&random(&[7, 33], 51, 2.0, dtype)).unwrap();
        let probe = random(&[7, 33], 52, 1.0, dtype);
        // Candle's own relu (what `fused::relu` is with fusion off; switching fusion here would
        // reach the tests running beside this one).
        let run = |fusion: bool| {
            let y = if fusion {
                fused::relu(x.as_tensor()).unwrap()
            } else {
                x.as_tensor().relu().unwrap()
            };
            let g = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (values(&y), values(g.get(x.as_tensor()).unwrap()))
        };
        let (yf, gf) = run(true);
        let (yc, gc) = run(false);
        assert_eq!(yf, yc, "{dtype:?}");
        assert_eq!(gf, gc, "{dtype:?}");
        assert!(yf.contains(&0.0) && yf.iter().any(|&v| v > 0.0));
    }
    // PyTorch's rules: NaN passes through, and no gradient at 0 or at NaN.
    let x = Var::new(&[-1f32, 0.0, 2.0, f32::NAN], &Device::Cpu).unwrap();
    let y = fused::relu(x.as_tensor()).unwrap();
    let v = y.to_vec1::<f32>().unwrap();
    assert_eq!(&v[..3], &[0.0, 0.0, 2.0]);
    assert!(v[3].is_nan());
    let dy = Tensor::new(&[5f32, 6.0, 7.0, 8.0], &Device::Cpu).unwrap();
    let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    // The NaN output makes the sum NaN, but its gradient to x is still 0 where y is not > 0.
    let d = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(d, [0.0, 0.0, 7.0, 0.0]);
}

#[test]
fn the_attention_node_equals_the_composed_attention_with_gradients() {
    // 5 and 16 tokens: padded to 8 and not padded.
    for (b, n, heads, hd) in [(2usize, 5usize, 2usize, 3usize), (1, 16, 3, 4)] {
        let d3 = 3 * heads * hd;
        let qkv = Var::from_tensor(&random(&[b, n, d3], 31, 1.5, DType::F64)).unwrap();
        let lw = random(&[b, n, heads * hd], 32, 1.0, DType::F64);
        let run = |node: bool| {
            let y = if node {
                fused::attention(qkv.as_tensor(), heads).unwrap()
            } else {
                fused::attention_reference(qkv.as_tensor(), heads).unwrap()
            };
            let g = (&y * &lw).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(qkv.as_tensor()).unwrap().clone())
        };
        let (yc, gc) = run(false);
        let (yf, gf) = run(true);
        assert!(max_rel(&yf, &yc) < 1e-12, "forward n={n}");
        assert!(
            max_rel(&gf, &gc) < 1e-12,
            "dqkv n={n}: {}",
            max_rel(&gf, &gc)
        );
    }
}

#[test]
fn the_flash_attention_reference_equals_the_composed_attention() {
    // Token counts around and off the GPU kernel's 64-token tiles; any head width on the CPU.
    for (b, n, heads, hd, seed) in [(2, 13, 3, 4, 61), (1, 70, 2, 8, 62)] {
        let qkv = random(&[b, n, 3 * heads * hd], seed, 1.5, DType::F64);
        let flash = qkv
            .apply_op1_no_bwd(&fused::FlashAttention::new(heads))
            .unwrap();
        let want = fused::attention_reference(&qkv, heads).unwrap();
        assert_eq!(flash.dims(), &[b, n, heads * hd]);
        assert!(max_rel(&flash, &want) < 1e-12, "n = {n}");
    }
    // A width that is not 3 × heads is an error.
    let qkv = random(&[1, 4, 10], 63, 1.0, DType::F32);
    assert!(
        qkv.apply_op1_no_bwd(&fused::FlashAttention::new(2))
            .is_err()
    );
}

#[test]
fn the_flash_attention_backward_reference_equals_autograd() {
    for (b, n, heads, hd, seed) in [(2, 9, 3, 4, 64), (1, 70, 2, 8, 65)] {
        let qkv =
            Var::from_tensor(&random(&[b, n, 3 * heads * hd], seed, 1.5, DType::F64)).unwrap();
        let probe = random(&[b, n, heads * hd], seed + 100, 1.0, DType::F64);
        let o = fused::attention_reference(qkv.as_tensor(), heads).unwrap();
        let want = (&o * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(qkv.as_tensor())
            .unwrap()
            .clone();
        let got = qkv
            .as_tensor()
            .apply_op3_no_bwd(&o.detach(), &probe, &fused::FlashAttentionGrad::new(heads))
            .unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(max_rel(&got, &want) < 1e-10, "n = {n}");
    }
    // An output of the wrong shape is an error.
    let qkv = random(&[1, 4, 12], 66, 1.0, DType::F32);
    let o = random(&[1, 4, 5], 67, 1.0, DType::F32);
    assert!(
        qkv.apply_op3_no_bwd(&o, &o, &fused::FlashAttentionGrad::new(2))
            .is_err()
    );
}

#[test]
fn the_fused_norm_pix_loss_equals_the_composition_with_gradients() {
    let (b, n, p) = (3usize, 7usize, 20usize);
    for dtype in [DType::F64, DType::F32] {
        let pred = Var::from_tensor(&random(&[b, n, p], 41, 1.0, dtype)).unwrap();
        let target = random(&[b, n, p], 42, 2.0, dtype).affine(1.0, 0.3).unwrap();
        // Invalid pixels (about a third), one patch with a single valid pixel, and a mask.
        let mut r = icefm_dataset::rng::Rng::new(43, 0);
        let mut valid: Vec<f64> = (0..b * n * p)
            .map(|_| if r.unit() < 0.35 { 0.0 } else { 1.0 })
            .collect();
        for v in &mut valid[p + 1..2 * p] {
            *v = 0.0;
        }
        let masked: Vec<f64> = (0..b * n)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 })
            .collect();
        let valid = Tensor::from_vec(valid, (b, n, p), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let masked = Tensor::from_vec(masked, (b, n, 1), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let weight = valid.broadcast_mul(&masked).unwrap();
        let (loss, base) = fused::masked_norm_pix_loss(pred.as_tensor(), &target, &weight).unwrap();
        let (t, w) = icefm_model::mae::norm_pix(&target, &valid).unwrap();
        let loss_c = icefm_model::mae::patch_loss(pred.as_tensor(), &t, &w, &masked).unwrap();
        let base_c =
            icefm_model::mae::patch_loss(&t.zeros_like().unwrap(), &t, &w, &masked).unwrap();
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        assert!(max_rel(&loss, &loss_c) < tol, "{dtype:?} loss");
        assert!(max_rel(&base, &base_c) < tol, "{dtype:?} baseline");
        let g = loss.backward().unwrap();
        let gc = loss_c.backward().unwrap();
        let e = max_rel(
            g.get(pred.as_tensor()).unwrap(),
            gc.get(pred.as_tensor()).unwrap(),
        );
        assert!(e < tol * 10.0, "{dtype:?} dpred {e}");
    }
}

#[test]
fn token_gather_equals_candles_gather_with_gradients() {
    let (b, n, d) = (2usize, 9usize, 5usize);
    let ids = vec![vec![4u32, 0, 7], vec![8, 2, 1]];
    let x = Var::from_tensor(&random(&[b, n, d], 51, 1.0, DType::F64)).unwrap();
    let y = fused::gather_tokens(x.as_tensor(), &ids).unwrap();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let wide = Tensor::from_vec(flat, (b, 3, 1), &Device::Cpu)
        .unwrap()
        .broadcast_as((b, 3, d))
        .unwrap()
        .contiguous()
        .unwrap();
    let yc = x.as_tensor().gather(&wide, 1).unwrap();
    assert_eq!(y.dims(), &[b, 3, d]);
    assert!(max_rel(&y, &yc) == 0.0);
    let lw = weights_like(&y, 52);
    let g = (&y * &lw).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (&yc * &lw).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(
        max_rel(
            g.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap()
        ) == 0.0
    );
    // Repeated or out-of-range indices are refused.
    assert!(fused::gather_tokens(x.as_tensor(), &[vec![1, 1, 2], vec![0, 1, 2]]).is_err());
    assert!(fused::gather_tokens(x.as_tensor(), &[vec![1, 9, 2], vec![0, 1, 2]]).is_err());
    assert!(fused::gather_tokens(x.as_tensor(), &[vec![1, 2]]).is_err());
}

#[test]
fn a_non_contiguous_input_is_made_contiguous_first() {
    let x = random(&[6, 10], 7, 2.0, DType::F32).t().unwrap();
    assert!(!x.is_contiguous());
    let w = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap();
    let f = fused::layer_norm(&x, &w, &b, 1e-6).unwrap();
    let c = ops::layer_norm(&x, &w, &b, 1e-6).unwrap();
    assert!(max_rel(&f, &c) < 1e-5);
    assert!(max_rel(&fused::softmax(&x).unwrap(), &ops::softmax(&x).unwrap()) < 1e-5);
}

#[test]
fn a_weight_of_the_wrong_length_is_an_error() {
    let x = random(&[2, 8], 8, 1.0, DType::F32);
    let w = Tensor::ones(7, DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
    let e = fused::layer_norm(&x, &w, &b, 1e-6).unwrap_err().to_string();
    assert!(e.contains("[8]"), "{e}");
}
