//! Fused layer norm ([`LayerNorm`]) and its backward in one pass ([`LayerNormGrad`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::bias::partial_sums_storage;
use super::cpu::{by_dtype, cpu_f64, rows_cols, rows_per_task, typed};
use super::fused;
use super::stash::{Stash, Stashed};

/// Layer norm over the last dimension, `(x − mean) / sqrt(var + eps) · weight + bias` (biased
/// variance, as PyTorch). `x` may be f32, f64 or (CUDA) bf16; the result has `x`'s dtype;
/// `weight` and `bias` are `[D]` of any float dtype (the statistics are computed in f32 or
/// wider). Falls back to [`crate::ops::layer_norm`] when fusion is off.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused() {
        if x.dtype() != weight.dtype() {
            // Statistics in the weights' (wider) dtype, as autocast does.
            let y = crate::ops::layer_norm(&x.to_dtype(weight.dtype())?, weight, bias, eps)?;
            return y.to_dtype(x.dtype());
        }
        return crate::ops::layer_norm(x, weight, bias, eps);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} must be [{d}]",
            weight.dims(),
            bias.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )
}

/// Mean and `1 / sqrt(var + eps)` of a row (f64 arithmetic).
fn row_stats_t<T: WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row
        .iter()
        .map(|v| {
            let c = v.to_f64() - mean;
            c * c
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Fused layer norm (forward); its backward is [`LayerNormGrad`] (one pass), then a sum of
/// its partial sums for the scale and shift.
#[derive(Debug, Clone, Copy)]
pub struct LayerNorm {
    /// Variance epsilon.
    pub eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "icefm-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(
            s: &CpuStorage,
            l: &Layout,
            w: &[f64],
            b: &[f64],
            eps: f64,
        ) -> Result<CpuStorage> {
            let (_, d) = rows_cols(l);
            let x = typed::<T>(s, l, "layer norm")?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            let chunk = rows_per_task(d) * d;
            y.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(yc, xc)| {
                    for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                        let (mean, rstd) = row_stats_t(xr, eps);
                        for i in 0..d {
                            yr[i] = T::from_f64((xr[i].to_f64() - mean) * rstd * w[i] + b[i]);
                        }
                    }
                });
            Ok(T::to_cpu_storage_owned(y))
        }
        let w = cpu_f64(s2, l2, self.name())?;
        let b = cpu_f64(s3, l3, self.name())?;
        let out = by_dtype!(s1.dtype(), go(s1, l1, &w, &b, self.eps))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = rows_cols(l1);
        let out = crate::cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, rows, d, self.eps as f32)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, parts) = layer_norm_grad(x, w, grad, self.eps)?;
        // [2, P, D] partial sums over row blocks → [2, D].
        let wb = parts.sum(1)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(wb.get(0)?), Some(wb.get(1)?)))
    }
}

/// The layer norm's backward ([`LayerNormGrad`], no gradient of its own): `dx`, and the
/// `[2, P, D]` partial sums whose sum over `P` is the scale's and the shift's gradients.
pub fn layer_norm_grad(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let parts = Stash::default();
    let op = LayerNormGrad {
        eps,
        parts: parts.clone(),
    };
    let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &op)?;
    Ok((dx, parts.take(w)?))
}

/// Blocks of rows of the layer norm's backward ([`LayerNormGrad`]): each writes one partial
/// sum of the scale and shift gradients per column. Two or more rows per warp of 8, at most
/// 2,048 blocks; the CUDA kernels' grid (but for the wide-access ones, `ICEFM_LN_V8`), and the
/// CPU's split, so both hand on partial sums of the same shape.
pub fn ln_grad_blocks(rows: usize) -> usize {
    row_blocks(rows, 16, 2048)
}

/// Blocks of about `per` rows each, at most `cap`, evened out (at least one, for no rows too).
pub(super) fn row_blocks(rows: usize, per: usize, cap: usize) -> usize {
    let p = rows.div_ceil(per).clamp(1, cap);
    rows.div_ceil(rows.div_ceil(p).max(1)).max(1)
}

/// Layer norm backward in one pass over `x` and `dy`: `(x, weight, dy) → dx` in `x`'s dtype,
/// and, left in [`Stash`] `parts` for the caller, `[2, P, D]` partial sums over `P` blocks of
/// rows of `dy · x̂` (the scale's gradient) and `dy` (the shift's), in f32 (f64 for f64 input).
#[derive(Debug, Clone)]
pub struct LayerNormGrad {
    /// Variance epsilon.
    pub eps: f64,
    /// Where the partial sums go.
    pub parts: Stash,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "icefm-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(
            s1: &CpuStorage,
            l1: &Layout,
            w: &[f64],
            s3: &CpuStorage,
            l3: &Layout,
            eps: f64,
        ) -> Result<(CpuStorage, Vec<f64>, usize)> {
            let (rows, d) = rows_cols(l1);
            let x = typed::<T>(s1, l1, "layer norm backward")?;
            let dy = typed::<T>(s3, l3, "layer norm backward")?;
            let mut dx = vec![T::from_f64(0.0); x.len()];
            let p = ln_grad_blocks(rows);
            let chunk = rows.div_ceil(p).max(1) * d;
            let n = d as f64;
            let sums: Vec<Vec<f64>> = dx
                .par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
                .map(|(oc, (xc, gc))| {
                    let mut acc = vec![0f64; 2 * d];
                    for ((o, xr), gr) in oc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                        let (mean, rstd) = row_stats_t(xr, eps);
                        let (mut a, mut bsum) = (0f64, 0f64);
                        for i in 0..d {
                            let g = gr[i].to_f64() * w[i];
                            a += g;
                            bsum += g * (xr[i].to_f64() - mean) * rstd;
                        }
                        let (a, bsum) = (a / n, bsum / n);
                        for i in 0..d {
                            let (gy, xhat) = (gr[i].to_f64(), (xr[i].to_f64() - mean) * rstd);
                            o[i] = T::from_f64(rstd * (gy * w[i] - a - xhat * bsum));
                            acc[i] += gy * xhat;
                            acc[d + i] += gy;
                        }
                    }
                    acc
                })
                .collect();
            // [2, P, D]; blocks past the rows (none but for zero rows) stay 0.
            let mut out = vec![0f64; 2 * p * d];
            for (j, acc) in sums.iter().enumerate() {
                out[j * d..(j + 1) * d].copy_from_slice(&acc[..d]);
                out[(p + j) * d..(p + j + 1) * d].copy_from_slice(&acc[d..]);
            }
            Ok((T::to_cpu_storage_owned(dx), out, p))
        }
        let (_, d) = rows_cols(l1);
        let w = cpu_f64(s2, l2, self.name())?;
        let (dx, parts, p) = by_dtype!(s1.dtype(), go(s1, l1, &w, s3, l3, self.eps))?;
        let parts = partial_sums_storage(parts, s1.dtype())?;
        self.parts.keep(Stashed::Cpu(parts), (2, p, d).into());
        Ok((dx, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = rows_cols(l1);
        let (dx, parts, p) =
            crate::cuda::layer_norm_grad(s1, l1, s2, l2, s3, l3, rows, d, self.eps as f32)?;
        self.parts.keep(Stashed::Cuda(parts), (2, p, d).into());
        Ok((dx, l1.shape().clone()))
    }
}
