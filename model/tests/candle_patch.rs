//! The vendored candle-core's patches (vendor/README.md): float-only unary ops on integer
//! tensors are an error naming the op, not a panic; integer-capable ops still work; gradients
//! still sum over every path to a tensor.
#![allow(clippy::unwrap_used, missing_docs)]

use candle_core::{Device, Tensor, Var};

#[test]
fn float_only_ops_on_integer_tensors_are_errors() {
    let t = Tensor::new(&[1u8, 2, 3], &Device::Cpu).unwrap();
    for (name, r) in [("exp", t.exp()), ("sqrt", t.sqrt()), ("neg", t.neg())] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("floating-point"), "{e}");
    }
    // Ops defined on integers are unchanged.
    assert_eq!(t.abs().unwrap().to_vec1::<u8>().unwrap(), [1, 2, 3]);
    let f = t.to_dtype(candle_core::DType::F32).unwrap().sqr().unwrap();
    assert_eq!(f.to_vec1::<f32>().unwrap(), [1.0, 4.0, 9.0]);
}

#[test]
fn a_tensor_used_twice_gets_the_sum_of_both_gradients() {
    // y = x·x + 3x (x used on three paths; the first gradient stored as it is, then added to).
    let x = Var::new(&[1f32, -2.0, 0.5], &Device::Cpu).unwrap();
    let y = ((x.as_tensor() * x.as_tensor()).unwrap() + (x.as_tensor() * 3.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = y.backward().unwrap();
    let got = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got, [5.0, -1.0, 4.0]);
    // Subtraction: d(a − b)/db = −1 with b's first gradient stored negated.
    let b = Var::new(&[2f32, 4.0], &Device::Cpu).unwrap();
    let z = (Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap() - b.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = z.backward().unwrap();
    assert_eq!(
        g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [-1.0, -1.0]
    );
}

/// `a · b` for row-major `[m, k]` and `[k, n]` slices, in f64.
fn matmul_ref(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|l| f64::from(a[i * k + l]) * f64::from(b[l * n + j]))
                .sum();
        }
    }
    out
}

#[test]
fn a_weight_used_through_its_transpose_gets_a_contiguous_exact_gradient() {
    let dev = Device::Cpu;
    let xs: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    let ws: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos()).collect();
    let cs: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
    let x = Tensor::from_vec(xs.clone(), (3, 4), &dev).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(ws.clone(), (2, 4), &dev).unwrap()).unwrap();
    let c = Tensor::from_vec(cs.clone(), (3, 2), &dev).unwrap();
    // loss = Σ c ⊙ (x wᵀ) + Σ (x wᵀ) (the same transposed view used twice), so
    // dL/dw = (c + 1)ᵀ x.
    let wt = w.as_tensor().t().unwrap();
    let y1 = x.matmul(&wt).unwrap();
    let y2 = x.matmul(&wt).unwrap();
    let loss = ((y1 * &c).unwrap().sum_all().unwrap() + y2.sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    let gw = g.get(w.as_tensor()).unwrap();
    assert!(gw.is_contiguous());
    assert_eq!(gw.dims(), [2, 4]);
    let ct1: Vec<f32> = (0..2)
        .flat_map(|j| (0..3).map(move |i| (i, j)))
        .map(|(i, j)| cs[i * 2 + j] + 1.0)
        .collect();
    let want = matmul_ref(&ct1, &xs, 2, 3, 4);
    for (got, want) in gw
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(&want)
    {
        assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
    }
    // Batched: [b, m, k] × [b, n, k]ᵀ.
    let xb = Tensor::from_vec(xs.repeat(2), (2, 3, 4), &dev).unwrap();
    let wb = Var::from_tensor(&Tensor::from_vec(ws.repeat(2), (2, 2, 4), &dev).unwrap()).unwrap();
    let cb = Tensor::from_vec(cs.repeat(2), (2, 3, 2), &dev).unwrap();
    let loss = (xb.matmul(&wb.as_tensor().t().unwrap()).unwrap() * &cb)
        .unwrap()
        .sum_all()
        .unwrap();
    let gb = loss.backward().unwrap();
    let gwb = gb.get(wb.as_tensor()).unwrap();
    assert!(gwb.is_contiguous());
    let ct: Vec<f32> = (0..2)
        .flat_map(|j| (0..3).map(move |i| (i, j)))
        .map(|(i, j)| cs[i * 2 + j])
        .collect();
    let want = matmul_ref(&ct, &xs, 2, 3, 4);
    let got = gwb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, g) in got.iter().enumerate() {
        assert!(
            (f64::from(*g) - want[k % 8]).abs() < 1e-5,
            "{g} vs {}",
            want[k % 8]
        );
    }
}
