//! Fused softmax ([`Softmax`], over all or the first `valid` entries of each row) and its
//! backward ([`SoftmaxGrad`]), with vectorised f32 rows on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::cpu::{by_dtype, rows_cols, rows_per_task, typed};
use super::fast_math::{dot_f64, exp_f32, max_f32, sum_f64};
use super::fused;

/// Softmax over the first `valid` entries of the last dimension; the others are padding and
/// get probability 0 (and no gradient). Needs fusion (the model pads only when fused).
pub fn softmax_valid(x: &Tensor, valid: usize) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if valid == 0 || valid > d {
        candle_core::bail!("softmax_valid: {valid} valid entries in rows of {d}");
    }
    x.contiguous()?.apply_op1(Softmax { valid })
}

/// Softmax over the last dimension (the row maximum subtracted first). Falls back to
/// [`crate::ops::softmax`] when fusion is off.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if !fused() {
        if x.dtype() == DType::BF16 || x.dtype() == DType::F16 {
            return crate::ops::softmax(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
        }
        return crate::ops::softmax(x);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    x.contiguous()?.apply_op1(Softmax { valid: d })
}

/// Fused softmax over the first `valid` entries of the last dimension, 0 after them
/// (forward); its backward is [`SoftmaxGrad`].
#[derive(Debug, Clone, Copy)]
pub struct Softmax {
    /// Entries of each row that take part (the row length for a plain softmax).
    pub valid: usize,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "icefm-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(s: &CpuStorage, l: &Layout, valid: usize) -> Result<CpuStorage> {
            let (_, d) = rows_cols(l);
            let x = typed::<T>(s, l, "softmax")?;
            let valid = valid.clamp(1, d);
            let mut y = vec![T::from_f64(0.0); x.len()];
            let chunk = rows_per_task(d) * d;
            y.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(yc, xc)| {
                    let mut e = vec![0f64; valid];
                    for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                        let m = xr[..valid]
                            .iter()
                            .map(|v| v.to_f64())
                            .fold(f64::NEG_INFINITY, f64::max);
                        let mut sum = 0.0;
                        for (ev, xv) in e.iter_mut().zip(&xr[..valid]) {
                            *ev = (xv.to_f64() - m).exp();
                            sum += *ev;
                        }
                        for (yv, ev) in yr.iter_mut().zip(&e) {
                            *yv = T::from_f64(ev / sum);
                        }
                    }
                });
            Ok(T::to_cpu_storage_owned(y))
        }
        if s.dtype() == DType::F32 {
            return Ok((softmax_f32(s, l, self.valid)?, l.shape().clone()));
        }
        let out = by_dtype!(s.dtype(), go(s, l, self.valid))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = rows_cols(l);
        Ok((
            crate::cuda::softmax_fwd(s, l, rows, d, self.valid)?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// Softmax backward: `(y, dy) → y · (dy − Σ dy·y)` per row.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "icefm-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let (_, d) = rows_cols(l1);
            let y = typed::<T>(s1, l1, "softmax backward")?;
            let g = typed::<T>(s2, l2, "softmax backward")?;
            let mut dx = vec![T::from_f64(0.0); y.len()];
            let chunk = rows_per_task(d) * d;
            dx.par_chunks_mut(chunk)
                .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .for_each(|(oc, (yc, gc))| {
                    for ((o, yr), gr) in oc.chunks_mut(d).zip(yc.chunks(d)).zip(gc.chunks(d)) {
                        let s: f64 = gr
                            .iter()
                            .zip(yr)
                            .map(|(a, b)| a.to_f64() * b.to_f64())
                            .sum();
                        for ((ov, yv), gv) in o.iter_mut().zip(yr).zip(gr) {
                            *ov = T::from_f64(yv.to_f64() * (gv.to_f64() - s));
                        }
                    }
                });
            Ok(T::to_cpu_storage_owned(dx))
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) {
            let (_, d) = rows_cols(l1);
            let y = typed::<f32>(s1, l1, "softmax backward")?;
            let g = typed::<f32>(s2, l2, "softmax backward")?;
            let mut dx = vec![0f32; y.len()];
            let chunk = rows_per_task(d) * d;
            dx.par_chunks_mut(chunk)
                .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .for_each(|(dx, (y, g))| {
                    pulp::Arch::new().dispatch(SoftmaxGradRows { dx, y, g, d });
                });
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        let out = by_dtype!(s1.dtype(), go(s1, l1, s2, l2))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = rows_cols(l1);
        Ok((
            crate::cuda::softmax_grad(s1, l1, s2, l2, rows, d)?,
            l1.shape().clone(),
        ))
    }
}

/// Softmax of f32 rows over their first `valid` entries ([`exp_f32`]; sums in f64).
fn softmax_f32(s: &CpuStorage, l: &Layout, valid: usize) -> Result<CpuStorage> {
    let (_, d) = rows_cols(l);
    let x = typed::<f32>(s, l, "softmax")?;
    let valid = valid.clamp(1, d);
    let mut y = vec![0f32; x.len()];
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| {
            pulp::Arch::new().dispatch(SoftmaxRows { y, x, d, valid });
        });
    Ok(CpuStorage::F32(y))
}

/// Rows of [`softmax_f32`]: a [`pulp::WithSimd`] so that the loop is compiled for the CPU's
/// widest vectors (a closure would not be inlined into pulp's dispatch).
struct SoftmaxRows<'a> {
    y: &'a mut [f32],
    x: &'a [f32],
    d: usize,
    valid: usize,
}

impl pulp::WithSimd for SoftmaxRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (d, valid) = (self.d, self.valid);
        for (yr, xr) in self.y.chunks_mut(d).zip(self.x.chunks(d)) {
            let (yv, xv) = (&mut yr[..valid], &xr[..valid]);
            let m = max_f32(xv);
            for (o, &v) in yv.iter_mut().zip(xv) {
                *o = exp_f32(v - m);
            }
            let inv = (1.0 / sum_f64(yv)) as f32;
            for o in yv.iter_mut() {
                *o *= inv;
            }
        }
    }
}

/// Rows of [`SoftmaxGrad`] in f32 (a [`pulp::WithSimd`], as [`SoftmaxRows`]).
struct SoftmaxGradRows<'a> {
    dx: &'a mut [f32],
    y: &'a [f32],
    g: &'a [f32],
    d: usize,
}

impl pulp::WithSimd for SoftmaxGradRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let d = self.d;
        for ((o, yr), gr) in self
            .dx
            .chunks_mut(d)
            .zip(self.y.chunks(d))
            .zip(self.g.chunks(d))
        {
            let s = dot_f64(gr, yr) as f32;
            for ((ov, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                *ov = yv * (gv - s);
            }
        }
    }
}
