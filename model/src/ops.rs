//! Differentiable building blocks. candle 0.11's fast `candle_nn::ops::layer_norm`,
//! `softmax_last_dim` and `rms_norm` record no backward (and `candle_nn::LayerNorm` takes that
//! path for contiguous input), so a model built on them trains only part of its weights without
//! any error. Everything here is composed of primitives that do record their backward; the
//! tests check every parameter gets a gradient and compare gradients with finite differences.

use candle_core::{D, DType, Result, Tensor};

/// Layer norm over the last dimension: `(x − mean) / sqrt(var + eps) · weight + bias`, with the
/// biased variance (as PyTorch's `nn.LayerNorm`).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    centred
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last dimension, shifted by the (constant) row maximum for stability.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Stochastic depth: zero whole samples (first dimension) with probability `p` and scale the
/// others by `1 / (1 − p)`. `keep` holds one uniform number in `[0, 1)` per sample.
pub fn drop_path(x: &Tensor, p: f64, keep: &[f32]) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let scale: Vec<f32> = keep
        .iter()
        .take(b)
        .map(|&u| {
            if f64::from(u) >= p {
                (1.0 / (1.0 - p)) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    let s = Tensor::from_vec(scale, shape, x.device())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&s)
}

/// Mean of `x` over the positions where `weight` is 1 (`weight` broadcastable to `x`); 0 when
/// nothing is weighted.
pub fn weighted_mean(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let w = weight.to_dtype(x.dtype())?;
    let num = x.broadcast_mul(&w)?.sum_all()?;
    let den = w.broadcast_as(x.shape())?.sum_all()?;
    let den_v = den.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if den_v <= 0.0 {
        return num.zeros_like();
    }
    num / den_v
}
