//! MAE's masked norm-pix loss in one pass per direction ([`NormPixLoss`], [`NormPixLossGrad`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu::{by_dtype, rows_cols, typed};
use super::fused;
use super::stash::{Stash, Stashed};

/// MAE's masked norm-pix loss in one pass per direction: `pred`, `target` `[B, N, P]` (raw
/// patch values) and `weight` `[B, N, P]` (1 where a pixel is valid *and* its patch masked).
/// Each patch's target is normalised by the mean and unbiased variance of its weighted values
/// (eps 1e-6); patches with fewer than 2 weighted values are left out; the loss is the mean
/// over the other patches of each one's mean squared error. Returns the loss and the loss of
/// predicting 0 (each patch's mean), the baseline. Same arithmetic as
/// [`crate::mae::norm_pix`] + [`crate::mae::patch_loss`], which it falls back to when fusion
/// is off.
///
/// Fused, the forward pass reads the three arrays once (the loss, the baseline and whether the
/// patch counts come out of one kernel per patch) and the backward pass reads them once more
/// and writes the gradient: no other pass over `[B, N, P]`.
pub fn masked_norm_pix_loss(
    pred: &Tensor,
    target: &Tensor,
    weight: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if pred.dims() != target.dims() || pred.dims() != weight.dims() || pred.rank() != 3 {
        candle_core::bail!(
            "masked_norm_pix_loss: pred {:?}, target {:?} and weight {:?} must be one [B, N, P] shape",
            pred.dims(),
            target.dims(),
            weight.dims()
        );
    }
    if !fused() {
        let counts = weight.sum_keepdim(candle_core::D::Minus1)?;
        let ones = counts.ge(0.0)?.to_dtype(pred.dtype())?;
        let (t, w) = crate::mae::norm_pix(target, weight)?;
        let loss = crate::mae::patch_loss(pred, &t, &w, &ones)?;
        let base = crate::mae::patch_loss(&t.zeros_like()?, &t, &w, &ones)?;
        return Ok((loss, base));
    }
    let target = target.detach().contiguous()?;
    let weight = weight.detach().contiguous()?;
    let op = NormPixLoss::default();
    let per_patch = pred.contiguous()?.apply_op3(&target, &weight, op.clone())?;
    // [B, N, 2]: each patch's baseline, and 1 where it counts (2 weighted values or more).
    let aux = op.aux.take(&per_patch)?;
    let base = aux.narrow(candle_core::D::Minus1, 0, 1)?;
    // The patches that count, at least 1, left on the device: read on the host, the count
    // would make the host wait for the forward pass.
    let patches = aux
        .narrow(candle_core::D::Minus1, 1, 1)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    let den = patches
        .maximum(&filled(&patches, 1.0)?)?
        .to_dtype(per_patch.dtype())?;
    Ok((per_patch.sum_all()?.div(&den)?, base.sum_all()?.div(&den)?))
}

/// `v` in `like`'s shape, dtype and device, made on the device (a comparison with a number
/// would copy the number from the host).
pub fn filled(like: &Tensor, v: f64) -> Result<Tensor> {
    let dev = like.device();
    let one = match like.dtype() {
        DType::F32 => Tensor::full(v as f32, (), dev)?,
        DType::F64 => Tensor::full(v, (), dev)?,
        DType::BF16 => Tensor::full(half::bf16::from_f64(v), (), dev)?,
        dt => Tensor::full(v, (), dev)?.to_dtype(dt)?,
    };
    one.broadcast_as(like.shape())
}

/// Per-patch norm-pix squared error `[B, N]` (0 for a patch with fewer than 2 weighted values);
/// its backward gives `pred`'s gradient. Left in [`Stash`] `aux` for the caller: `[B, N, 2]`,
/// each patch's baseline (its error when predicting 0) and 1 if the patch counts, else 0.
#[derive(Debug, Clone, Default)]
pub struct NormPixLoss {
    /// The second result, `[B, N, 2]`.
    pub aux: Stash,
}

/// A patch's normalised target value, weight and count: `(mean, 1/sqrt(var + eps), count)`.
fn norm_pix_stats<T: WithDType>(t: &[T], w: &[T]) -> Option<(f64, f64, f64)> {
    let cnt: f64 = w.iter().map(|v| v.to_f64()).sum();
    if cnt < 2.0 {
        return None;
    }
    let mean = t
        .iter()
        .zip(w)
        .map(|(a, b)| a.to_f64() * b.to_f64())
        .sum::<f64>()
        / cnt;
    let var = t
        .iter()
        .zip(w)
        .map(|(a, b)| {
            let c = (a.to_f64() - mean) * b.to_f64();
            c * c
        })
        .sum::<f64>()
        / (cnt - 1.0);
    Some((mean, 1.0 / (var + 1e-6).sqrt(), cnt))
}

impl CustomOp3 for NormPixLoss {
    fn name(&self) -> &'static str {
        "icefm-norm-pix-loss"
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
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<(CpuStorage, CpuStorage)> {
            let (_, p) = rows_cols(l1);
            let pred = typed::<T>(s1, l1, "norm-pix loss")?;
            let t = typed::<T>(s2, l2, "norm-pix loss")?;
            let w = typed::<T>(s3, l3, "norm-pix loss")?;
            let (out, aux): (Vec<T>, Vec<[T; 2]>) = pred
                .par_chunks(p)
                .zip(t.par_chunks(p).zip(w.par_chunks(p)))
                .map(|(pr, (tr, wr))| {
                    let zero = T::from_f64(0.0);
                    let Some((mean, rstd, cnt)) = norm_pix_stats(tr, wr) else {
                        return (zero, [zero; 2]);
                    };
                    let (mut se, mut base) = (0.0, 0.0);
                    for ((pv, tv), wv) in pr.iter().zip(tr).zip(wr) {
                        let z = (tv.to_f64() - mean) * rstd;
                        let (e, w) = (pv.to_f64() - z, wv.to_f64());
                        se += e * e * w;
                        base += z * z * w;
                    }
                    (
                        T::from_f64(se / cnt),
                        [T::from_f64(base / cnt), T::from_f64(1.0)],
                    )
                })
                .unzip();
            let aux: Vec<T> = aux.into_iter().flatten().collect();
            Ok((T::to_cpu_storage_owned(out), T::to_cpu_storage_owned(aux)))
        }
        let dims = l1.dims();
        let (out, aux) = by_dtype!(s1.dtype(), go(s1, l1, s2, l2, s3, l3))?;
        self.aux.keep(Stashed::Cpu(aux), aux_shape(dims));
        Ok((out, Shape::from(&dims[..dims.len() - 1])))
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
        let (rows, p) = rows_cols(l1);
        let dims = l1.dims();
        let (out, aux) = crate::cuda::norm_pix_loss(s1, l1, s2, l2, s3, l3, rows, p)?;
        self.aux.keep(Stashed::Cuda(aux), aux_shape(dims));
        Ok((out, Shape::from(&dims[..dims.len() - 1])))
    }

    fn bwd(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = NormPixLossGrad::new(&grad.to_dtype(weight.dtype())?)?;
        let dpred = pred.apply_op3_no_bwd(&target.detach(), &weight.detach(), &back)?;
        Ok((Some(dpred), None, None))
    }
}

/// `[.., 2]` after the patch dimensions of `[.., P]`.
fn aux_shape(dims: &[usize]) -> Shape {
    let mut d = dims.to_vec();
    if let Some(last) = d.last_mut() {
        *last = 2;
    }
    Shape::from(d)
}

/// [`NormPixLoss`] backward: `(pred, target, weight)` → `2·(pred − t̂)·w·g / count`, with `g`
/// each patch's incoming gradient (a fourth input, held by the op: candle's ops take three).
#[derive(Debug, Clone)]
pub struct NormPixLossGrad {
    g: Tensor,
}

impl NormPixLossGrad {
    /// The backward for incoming gradients `g`, one per patch (`[B, N]`, or any shape of as many
    /// values), in the dtype of the inputs it will be applied to.
    pub fn new(g: &Tensor) -> Result<Self> {
        Ok(Self {
            g: g.detach().flatten_all()?.contiguous()?,
        })
    }

    fn check(&self, rows: usize, dtype: DType) -> Result<()> {
        if self.g.elem_count() != rows || self.g.dtype() != dtype {
            candle_core::bail!(
                "norm-pix loss backward: {} {:?} gradients for {rows} {dtype:?} patches",
                self.g.elem_count(),
                self.g.dtype()
            );
        }
        Ok(())
    }
}

impl CustomOp3 for NormPixLossGrad {
    fn name(&self) -> &'static str {
        "icefm-norm-pix-loss-grad"
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
        #[allow(clippy::too_many_arguments)]
        fn go<T: WithDType>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
            gs: &CpuStorage,
            gl: &Layout,
        ) -> Result<CpuStorage> {
            let g = typed::<T>(gs, gl, "norm-pix loss backward")?;
            let (_, p) = rows_cols(l1);
            let pred = typed::<T>(s1, l1, "norm-pix loss backward")?;
            let t = typed::<T>(s2, l2, "norm-pix loss backward")?;
            let w = typed::<T>(s3, l3, "norm-pix loss backward")?;
            let mut dp = vec![T::from_f64(0.0); pred.len()];
            dp.par_chunks_mut(p)
                .zip(pred.par_chunks(p).zip(t.par_chunks(p).zip(w.par_chunks(p))))
                .zip(g.par_iter())
                .for_each(|((o, (pr, (tr, wr))), g)| {
                    let Some((mean, rstd, cnt)) = norm_pix_stats(tr, wr) else {
                        return;
                    };
                    let g = g.to_f64();
                    for i in 0..p {
                        let e = pr[i].to_f64() - (tr[i].to_f64() - mean) * rstd;
                        o[i] = T::from_f64(2.0 * e * wr[i].to_f64() * g / cnt);
                    }
                });
            Ok(T::to_cpu_storage_owned(dp))
        }
        self.check(rows_cols(l1).0, s1.dtype())?;
        let (gs, gl) = self.g.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else {
            candle_core::bail!("norm-pix loss backward: the gradients are not on the CPU");
        };
        let out = by_dtype!(s1.dtype(), go(s1, l1, s2, l2, s3, l3, gs, gl))?;
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
        let (rows, p) = rows_cols(l1);
        self.check(rows, s1.dtype())?;
        let (gs, gl) = self.g.storage_and_layout();
        let candle_core::Storage::Cuda(gs) = &*gs else {
            candle_core::bail!("norm-pix loss backward: the gradients are not on the GPU");
        };
        let out = crate::cuda::norm_pix_loss_grad(s1, l1, s2, l2, s3, l3, gs, gl, rows, p)?;
        Ok((out, l1.shape().clone()))
    }
}
