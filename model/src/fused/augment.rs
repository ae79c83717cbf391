//! The loader's normalisation and symmetries of the square on the batch's own device
//! ([`normalise_augment`], [`NormaliseAugment`]).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::typed;

/// The batch preparation of the loader on the batch's own device: from raw windows
/// `[B, C, n, n]` (f32 in the store's units, NaN where invalid, in the scene's orientation) to
/// normalised inputs (`(x − mean) · inv_std`, 0 where invalid) and the validity mask
/// `[B, n, n]` (1 where every channel is finite), each sample turned by its [`Transform`] (one
/// of the 8 symmetries of the square). The loader's host path does the same
/// ([`icefm_dataset::LoaderOptions::raw_inputs`] leaves it to this op); on a GPU it saves the
/// host that work and copies raw windows instead.
///
/// [`Transform`]: icefm_dataset::Transform
pub fn normalise_augment(
    raw: &Tensor,
    mean: &[f32],
    inv_std: &[f32],
    transforms: &[icefm_dataset::Transform],
) -> Result<(Tensor, Tensor)> {
    let (b, c, n, n2) = raw.dims4()?;
    if n != n2 || mean.len() != c || inv_std.len() != c || transforms.len() != b {
        candle_core::bail!(
            "normalise-augment: raw {:?}, {} means, {} scales, {} transforms",
            raw.dims(),
            mean.len(),
            inv_std.len(),
            transforms.len()
        );
    }
    let code = |t: &icefm_dataset::Transform| {
        f32::from(u8::from(t.transpose) | u8::from(t.flip_y) << 1 | u8::from(t.flip_x) << 2)
    };
    let params: Vec<f32> = mean
        .iter()
        .chain(inv_std)
        .copied()
        .chain(transforms.iter().map(code))
        .collect();
    let params = Tensor::from_vec(params, 2 * c + b, raw.device())?;
    let out = raw
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2_no_bwd(&params, &NormaliseAugment)?;
    Ok((out.narrow(1, 0, c)?, out.narrow(1, c, 1)?.squeeze(1)?))
}

/// [`normalise_augment`] as one op: `(raw [B, C, n, n], params [2C + B])` → `[B, C + 1, n, n]`
/// (the inputs, then the validity mask as channel `C`). `params` holds the means, the inverse
/// standard deviations and one transform code per sample (bit 0 transpose, 1 flip rows,
/// 2 flip columns).
#[derive(Debug, Clone, Copy)]
pub struct NormaliseAugment;

/// Where output pixel `(i, j)` reads from under transform `code` (the loader's
/// `Transform::source`).
#[inline(always)]
fn transform_source(code: u8, i: usize, j: usize, n: usize) -> (usize, usize) {
    let (a, b) = if code & 1 != 0 { (j, i) } else { (i, j) };
    (
        if code & 2 != 0 { n - 1 - a } else { a },
        if code & 4 != 0 { n - 1 - b } else { b },
    )
}

impl CustomOp2 for NormaliseAugment {
    fn name(&self) -> &'static str {
        "icefm-normalise-augment"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, n, _) = l1.shape().dims4()?;
        let raw = typed::<f32>(s1, l1, self.name())?;
        let prm = typed::<f32>(s2, l2, self.name())?;
        let plane = n * n;
        let mut out = vec![0f32; b * (c + 1) * plane];
        out.par_chunks_mut((c + 1) * plane)
            .enumerate()
            .for_each(|(s, o)| {
                let code = prm[2 * c + s] as u8;
                let (inputs, valid) = o.split_at_mut(c * plane);
                valid.fill(1.0);
                for ch in 0..c {
                    let src = &raw[(s * c + ch) * plane..(s * c + ch + 1) * plane];
                    let dst = &mut inputs[ch * plane..(ch + 1) * plane];
                    let (m, k) = (prm[ch], prm[c + ch]);
                    for i in 0..n {
                        for j in 0..n {
                            let (y, x) = transform_source(code, i, j, n);
                            let v = src[y * n + x];
                            if v.is_finite() {
                                dst[i * n + j] = (v - m) * k;
                            } else {
                                valid[i * n + j] = 0.0;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c + 1, n, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, c, n, _) = l1.shape().dims4()?;
        Ok((
            crate::cuda::normalise_augment(s1, l1, s2, l2, (b, c, n))?,
            Shape::from((b, c + 1, n, n)),
        ))
    }
}
