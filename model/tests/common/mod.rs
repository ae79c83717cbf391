//! Helpers shared by icefm-model's test files (`mod common;` in each).
#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use icefm_dataset::rng::Rng;

/// A seeded tensor on the CPU, uniform in `[-scale, scale)`, of `dtype`.
pub fn random(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed, 0);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| (r.unit() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tensor's values on the host, as f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |got − want| over the largest |want| (floored at 1e-12); the shapes must agree.
pub fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    g.iter()
        .zip(&w)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}
