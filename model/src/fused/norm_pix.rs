//! MAE's masked norm-pix loss in one pass per direction ([`NormPixLoss`], [`NormPixLossGrad`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu::{by_dtype, rows_cols, typed};
use super::fused;

/// MAE's masked norm-pix loss in one pass per direction: `pred`, `target` `[B, N, P]` (raw
/// patch values) and `weight` `[B, N, P]` (1 where a pixel is valid *and* its patch masked).
/// Each patch's target is normalised by the mean and unbiased variance of its weighted values
/// (eps 1e-6); patches with fewer than 2 weighted values are left out; the loss is the mean
/// over the other patches of each one's mean squared error. Returns the loss and the loss of
/// predicting 0 (each patch's mean), the baseline. Same arithmetic as
/// [`crate::mae::norm_pix`] + [`crate::mae::patch_loss`], which it falls back to when fusion
/// is off.
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
    let counts = weight.sum_keepdim(candle_core::D::Minus1)?;
    if !fused() {
        let ones = counts.ge(0.0)?.to_dtype(pred.dtype())?;
        let (t, w) = crate::mae::norm_pix(target, weight)?;
        let loss = crate::mae::patch_loss(pred, &t, &w, &ones)?;
        let base = crate::mae::patch_loss(&t.zeros_like()?, &t, &w, &ones)?;
        return Ok((loss, base));
    }
    let target = target.detach().contiguous()?;
    let weight = weight.detach().contiguous()?;
    let per_patch = pred
        .contiguous()?
        .apply_op3(&target, &weight, NormPixLoss)?;
    let base = pred
        .zeros_like()?
        .apply_op3_no_bwd(&target, &weight, &NormPixLoss)?;
    // The patches that count, at least 1, left on the device: read on the host, the count
    // would make the host wait for the forward pass.
    let patches = counts
        .ge(&filled(&counts, 2.0)?)?
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
/// its backward gives `pred`'s gradient.
#[derive(Debug, Clone, Copy)]
pub struct NormPixLoss;

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
        ) -> Result<CpuStorage> {
            let (_, p) = rows_cols(l1);
            let pred = typed::<T>(s1, l1, "norm-pix loss")?;
            let t = typed::<T>(s2, l2, "norm-pix loss")?;
            let w = typed::<T>(s3, l3, "norm-pix loss")?;
            let out: Vec<T> = pred
                .par_chunks(p)
                .zip(t.par_chunks(p).zip(w.par_chunks(p)))
                .map(|(pr, (tr, wr))| {
                    let Some((mean, rstd, cnt)) = norm_pix_stats(tr, wr) else {
                        return T::from_f64(0.0);
                    };
                    let se: f64 = pr
                        .iter()
                        .zip(tr.iter().zip(wr))
                        .map(|(pv, (tv, wv))| {
                            let e = pv.to_f64() - (tv.to_f64() - mean) * rstd;
                            e * e * wv.to_f64()
                        })
                        .sum();
                    T::from_f64(se / cnt)
                })
                .collect();
            Ok(T::to_cpu_storage_owned(out))
        }
        let dims = l1.dims();
        let out = by_dtype!(s1.dtype(), go(s1, l1, s2, l2, s3, l3))?;
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
        let out = crate::cuda::norm_pix_loss(s1, l1, s2, l2, s3, l3, rows, p)?;
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
        // grad [B, N] → [B, N, 1]: one scale per patch, after the patch's weights.
        let g = grad
            .unsqueeze(candle_core::D::Minus1)?
            .to_dtype(weight.dtype())?;
        let dpred = pred.apply_op3_no_bwd(
            &target.detach(),
            &Tensor::cat(&[&weight.detach(), &g], candle_core::D::Minus1)?,
            &NormPixLossGrad,
        )?;
        Ok((Some(dpred), None, None))
    }
}

/// [`NormPixLoss`] backward: `(pred, target, [weight | g])` → `2·(pred − t̂)·w·g / count`,
/// the weights `[B, N, P + 1]` ending in each patch's incoming gradient `g` (three inputs).
#[derive(Debug, Clone, Copy)]
pub struct NormPixLossGrad;

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
        fn go<T: WithDType>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            let (_, p) = rows_cols(l1);
            let pred = typed::<T>(s1, l1, "norm-pix loss backward")?;
            let t = typed::<T>(s2, l2, "norm-pix loss backward")?;
            let wg = typed::<T>(s3, l3, "norm-pix loss backward")?;
            let mut dp = vec![T::from_f64(0.0); pred.len()];
            dp.par_chunks_mut(p)
                .zip(
                    pred.par_chunks(p)
                        .zip(t.par_chunks(p).zip(wg.par_chunks(p + 1))),
                )
                .for_each(|(o, (pr, (tr, wgr)))| {
                    let (wr, gr) = wgr.split_at(p);
                    let Some((mean, rstd, cnt)) = norm_pix_stats(tr, wr) else {
                        return;
                    };
                    let g = gr[0].to_f64();
                    for i in 0..p {
                        let e = pr[i].to_f64() - (tr[i].to_f64() - mean) * rstd;
                        o[i] = T::from_f64(2.0 * e * wr[i].to_f64() * g / cnt);
                    }
                });
            Ok(T::to_cpu_storage_owned(dp))
        }
        let out = by_dtype!(s1.dtype(), go(s1, l1, s2, l2, s3, l3))?;
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
        let out = crate::cuda::norm_pix_loss_grad(s1, l1, s2, l2, s3, l3, rows, p)?;
        Ok((out, l1.shape().clone()))
    }
}
