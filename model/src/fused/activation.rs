//! Activations: exact GELU ([`Gelu`]), ReLU ([`Relu`]) and bias add + GELU as one op
//! ([`BiasGelu`]), each with its backward in one pass.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};

use super::bias::{bias_add, partial_sums_storage};
use super::cpu::{
    by_dtype, cpu_f64, map_pairs, map_rows_bias, map_rows_bias2, map_rows_bias2_sums, map_values,
    rows_cols, typed,
};
use super::fast_math::{normal_cdf_pdf, normal_cdf_pdf_f32};
use super::stash::{Stash, Stashed};
use super::{BIAS_GELU_CUDA, fused, gpu_route};

/// Exact (erf) GELU, `x · Φ(x)`, forward and backward in one pass each. Falls back to
/// candle's `gelu_erf` when fusion is off.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !fused() {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

/// Fused exact GELU (forward); its backward is [`GeluGrad`].
#[derive(Debug, Clone, Copy)]
pub struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "icefm-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let x = typed::<T>(s, l, "gelu")?;
            let y = map_values(x, |xv| {
                let v = xv.to_f64();
                T::from_f64(v * normal_cdf_pdf(v).0)
            });
            Ok(T::to_cpu_storage_owned(y))
        }
        if s.dtype() == DType::F32 {
            let x = typed::<f32>(s, l, "gelu")?;
            // Element-wise: any row length serves.
            let c = x.len().clamp(1, 4096);
            let y = map_rows_bias(x, &vec![(); c], c, 0f32, |v, ()| {
                v * normal_cdf_pdf_f32(v).0
            });
            return Ok((CpuStorage::F32(y), l.shape().clone()));
        }
        let out = by_dtype!(s.dtype(), go(s, l))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::gelu_fwd(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// GELU backward: `(x, dy) → dy · (Φ(x) + x·φ(x))`.
#[derive(Debug, Clone, Copy)]
pub struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "icefm-gelu-grad"
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
            let x = typed::<T>(s1, l1, "gelu backward")?;
            let g = typed::<T>(s2, l2, "gelu backward")?;
            let dx = map_pairs(x, g, |xv, gv| {
                let v = xv.to_f64();
                let (cdf, pdf) = normal_cdf_pdf(v);
                T::from_f64(gv.to_f64() * (cdf + v * pdf))
            });
            Ok(T::to_cpu_storage_owned(dx))
        }
        if s1.dtype() == DType::F32 && s2.dtype() == DType::F32 {
            let x = typed::<f32>(s1, l1, "gelu backward")?;
            let g = typed::<f32>(s2, l2, "gelu backward")?;
            let c = x.len().clamp(1, 4096);
            let dx = map_rows_bias2(x, g, &vec![(); c], c, 0f32, |v, gv, ()| {
                let (cdf, pdf) = normal_cdf_pdf_f32(v);
                gv * (cdf + v * pdf)
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
        Ok((crate::cuda::gelu_grad(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

/// ReLU, `max(x, 0)` with NaN passed through, forward and backward in one pass each
/// ([`Relu`], [`ReluGrad`]): the gradient passes where the output is positive, as PyTorch's
/// does (none at 0; candle's `relu` passes it at 0 too). Candle's own backward is six launches
/// (a zero tensor, a comparison, a cast, a product, a zero-filled gradient and an add); the
/// UPerNet heads run 36 ReLUs on maps of up to `[B, 96, 96, 512]` (docs/benchmarks.md). Falls
/// back to candle's `relu` when fusion is off.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !fused() {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

/// Fused ReLU forward ([`relu`]); backward [`ReluGrad`] on its output.
#[derive(Debug, Clone, Copy)]
pub struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "icefm-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let zero = T::from_f64(0.0);
            let x = typed::<T>(s, l, "relu")?;
            // `v < 0` is false for NaN: it passes through.
            let y = map_values(x, |v| if v.to_f64() < 0.0 { zero } else { v });
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = by_dtype!(s.dtype(), go(s, l))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::relu_fwd(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &ReluGrad)?))
    }
}

/// ReLU backward from the forward's output: `(y, dy) → dy` where `y > 0`, else 0.
#[derive(Debug, Clone, Copy)]
pub struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "icefm-relu-grad"
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
            let y = typed::<T>(s1, l1, "relu backward")?;
            let g = typed::<T>(s2, l2, "relu backward")?;
            let zero = T::from_f64(0.0);
            let dx = map_pairs(y, g, |yv, gv| if yv.to_f64() > 0.0 { gv } else { zero });
            Ok(T::to_cpu_storage_owned(dx))
        }
        if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
            candle_core::bail!(
                "relu backward: output {:?} {:?} and gradient {:?} {:?} differ",
                l1.dims(),
                s1.dtype(),
                l2.dims(),
                s2.dtype()
            );
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
        if l1.shape() != l2.shape() {
            candle_core::bail!("relu backward: {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        Ok((crate::cuda::relu_grad(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

/// `gelu(x + b)` over the rows of `x` `[..., C]`, `b` `[C]`: a linear layer's bias add and the
/// MLP's exact GELU as one op ([`BiasGelu`]). The forward reads `x` and writes the result once;
/// the backward reads `x` and `dy` and writes `dx` once, summing `dx`'s columns for `b` as it
/// goes ([`BiasGeluGrad`]). The pre-activation `x + b` is never stored: one `[rows, C]` pass and one
/// saved activation fewer per MLP than [`bias_add`] then [`gelu`], which is what this is with
/// fusion off (and on a GPU until `ICEFM_BIAS_GELU_CUDA=1`: its kernels have not yet run on
/// one, `model/tests/cuda/`).
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !bias_gelu_fuses(x) {
        return gelu(&bias_add(x, bias)?);
    }
    let c = x.dim(candle_core::D::Minus1)?;
    if bias.dims() != [c] {
        candle_core::bail!("bias_gelu: bias {:?} must be [{c}]", bias.dims());
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGelu)
}

/// Whether [`bias_gelu`] of `x` is one fused op (on GPUs only with `ICEFM_BIAS_GELU_CUDA=1`).
pub(super) fn bias_gelu_fuses(x: &Tensor) -> bool {
    fused() && (!gpu_route(x) || BIAS_GELU_CUDA.get())
}

/// `gelu(x + b)` (forward of [`bias_gelu`]); its backward is [`BiasGeluGrad`], then a sum of
/// its partial column sums for `b`.
#[derive(Debug, Clone, Copy)]
pub struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "icefm-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(s: &CpuStorage, l: &Layout, b: &[f64]) -> Result<CpuStorage> {
            let (_, c) = rows_cols(l);
            let x = typed::<T>(s, l, "bias gelu")?;
            let y = map_rows_bias(x, b, c, T::from_f64(0.0), |xv, bv| {
                let h = xv.to_f64() + bv;
                T::from_f64(h * normal_cdf_pdf(h).0)
            });
            Ok(T::to_cpu_storage_owned(y))
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) {
            let (_, c) = rows_cols(l1);
            let x = typed::<f32>(s1, l1, "bias gelu")?;
            let b = typed::<f32>(s2, l2, "bias gelu")?;
            let y = map_rows_bias(x, b, c, 0f32, |xv, bv| {
                let h = xv + bv;
                h * normal_cdf_pdf_f32(h).0
            });
            return Ok((CpuStorage::F32(y), l1.shape().clone()));
        }
        let b = cpu_f64(s2, l2, self.name())?;
        let out = by_dtype!(s1.dtype(), go(s1, l1, &b))?;
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
        let (rows, c) = rows_cols(l1);
        Ok((
            crate::cuda::bias_gelu_fwd(s1, l1, s2, l2, rows, c)?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, sums) = bias_gelu_grad(x, b, grad)?;
        let db = sums.sum(0)?.to_dtype(b.dtype())?;
        Ok((Some(dx), Some(db)))
    }
}

/// [`bias_gelu`]'s backward ([`BiasGeluGrad`], no gradient of its own): `dx`, and the `[P, C]`
/// partial column sums whose sum over `P` is the bias's gradient.
pub fn bias_gelu_grad(x: &Tensor, b: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let sums = Stash::default();
    let op = BiasGeluGrad { sums: sums.clone() };
    let dx = x.apply_op3_no_bwd(b, &dy.contiguous()?, &op)?;
    Ok((dx, sums.take(b)?))
}

/// [`BiasGelu`]'s backward: `(x, b, dy) → dx = dy · (Φ(h) + h·φ(h))` with `h = x + b`, in
/// `x`'s dtype, and, left in [`Stash`] `sums`, the bias's gradient as `[P, C]` partial column
/// sums of `dx` over `P` = [`column_blocks`] blocks of rows (f32; f64 for f64 input), from
/// the same pass (no second read of `dx`).
///
/// [`column_blocks`]: super::column_blocks
#[derive(Debug, Clone, Default)]
pub struct BiasGeluGrad {
    /// Where the partial column sums go.
    pub sums: Stash,
}

impl BiasGeluGrad {
    /// Keep the CPU's partial sums `[p, c]` of an input of `dtype`.
    fn keep_sums(&self, sums: Vec<f64>, dtype: DType, p: usize, c: usize) -> Result<()> {
        let storage = partial_sums_storage(sums, dtype)?;
        self.sums.keep(Stashed::Cpu(storage), (p, c).into());
        Ok(())
    }
}

impl CustomOp3 for BiasGeluGrad {
    fn name(&self) -> &'static str {
        "icefm-bias-gelu-grad"
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
            b: &[f64],
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<(CpuStorage, Vec<f64>, usize)> {
            let (_, c) = rows_cols(l1);
            let x = typed::<T>(s1, l1, "bias gelu backward")?;
            let g = typed::<T>(s3, l3, "bias gelu backward")?;
            let (dx, sums, p) = map_rows_bias2_sums(x, g, b, c, |xv, gv, bv| {
                let h = xv.to_f64() + bv;
                let (cdf, pdf) = normal_cdf_pdf(h);
                T::from_f64(gv.to_f64() * (cdf + h * pdf))
            });
            Ok((T::to_cpu_storage_owned(dx), sums, p))
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2, s3) {
            let (_, c) = rows_cols(l1);
            let x = typed::<f32>(s1, l1, "bias gelu backward")?;
            let b = typed::<f32>(s2, l2, "bias gelu backward")?;
            let g = typed::<f32>(s3, l3, "bias gelu backward")?;
            let (dx, sums, p) = map_rows_bias2_sums(x, g, b, c, |xv, gv, bv| {
                let h = xv + bv;
                let (cdf, pdf) = normal_cdf_pdf_f32(h);
                gv * (cdf + h * pdf)
            });
            self.keep_sums(sums, DType::F32, p, c)?;
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        if s1.dtype() != s3.dtype() {
            candle_core::bail!(
                "bias gelu backward: x is {:?}, its gradient {:?}",
                s1.dtype(),
                s3.dtype()
            );
        }
        let b = cpu_f64(s2, l2, self.name())?;
        let (out, sums, p) = by_dtype!(s1.dtype(), go(s1, l1, &b, s3, l3))?;
        self.keep_sums(sums, s1.dtype(), p, rows_cols(l1).1)?;
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
        let (rows, c) = rows_cols(l1);
        let (dx, sums, p) = crate::cuda::bias_gelu_grad(s1, l1, s2, l2, s3, l3, rows, c)?;
        self.sums.keep(Stashed::Cuda(sums), (p, c).into());
        Ok((dx, l1.shape().clone()))
    }
}
