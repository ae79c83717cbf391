//! AdamW's element-wise steps on the CPU, in place ([`AdamMoment`], [`AdamUpdate`]), and the
//! gradient norm's sum of squares ([`sum_squares_cpu`]).

use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu::{span, typed};

/// Values per rayon task of the element-wise optimizer kernels.
const OPT_CHUNK: usize = 1 << 15;

/// The contiguous f32 values of a mutable CPU storage.
fn f32_mut<'a>(s: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (a, b) = span(layout, op)?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: expected f32"),
    }
}

/// One AdamW moment in place: `m ← β·m + (1 − β)·(s·g)`, or with `square` the second moment
/// `v ← β·v + (1 − β)·(s·g)²` (f32, as the CUDA kernel).
pub struct AdamMoment {
    /// Decay β.
    pub beta: f32,
    /// Gradient scale (clipping).
    pub scale: f32,
    /// Second moment.
    pub square: bool,
}

impl candle_core::InplaceOp2 for AdamMoment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let m = f32_mut(s1, l1, self.name())?;
        let g = typed::<f32>(s2, l2, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!("adam-moment: {} moments, {} gradients", m.len(), g.len());
        }
        m.par_chunks_mut(OPT_CHUNK)
            .zip(g.par_chunks(OPT_CHUNK))
            .for_each(|(m, g)| {
                pulp::Arch::new().dispatch(AdamMomentChunk { m, g, op: self });
            });
        Ok(())
    }
}

/// The AdamW update in place: `w ← w − lr·((m/c1) / (sqrt(v/c2) + eps) + wd·w)` (the decay term
/// only for the decay group).
pub struct AdamUpdate {
    /// Learning rate.
    pub lr: f32,
    /// Bias corrections `1 − β1^t`, `1 − β2^t`.
    pub c1: f32,
    /// See `c1`.
    pub c2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Weight decay (0 for the no-decay group).
    pub wd: f32,
}

impl candle_core::InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let w = f32_mut(s1, l1, self.name())?;
        let m = typed::<f32>(s2, l2, self.name())?;
        let v = typed::<f32>(s3, l3, self.name())?;
        if m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!("adam-update: moments do not match the weights");
        }
        w.par_chunks_mut(OPT_CHUNK)
            .zip(m.par_chunks(OPT_CHUNK).zip(v.par_chunks(OPT_CHUNK)))
            .for_each(|(w, (m, v))| {
                pulp::Arch::new().dispatch(AdamUpdateChunk { w, m, v, op: self });
            });
        Ok(())
    }
}

/// One task of [`AdamMoment`], compiled for the CPU's widest vectors ([`pulp::WithSimd`]).
struct AdamMomentChunk<'a> {
    m: &'a mut [f32],
    g: &'a [f32],
    op: &'a AdamMoment,
}

impl pulp::WithSimd for AdamMomentChunk<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (b, s, sq) = (self.op.beta, self.op.scale, self.op.square);
        for (m, &g) in self.m.iter_mut().zip(self.g) {
            let g = g * s;
            *m = *m * b + if sq { g * g } else { g } * (1.0 - b);
        }
    }
}

/// One task of [`AdamUpdate`], compiled for the CPU's widest vectors ([`pulp::WithSimd`]).
struct AdamUpdateChunk<'a> {
    w: &'a mut [f32],
    m: &'a [f32],
    v: &'a [f32],
    op: &'a AdamUpdate,
}

impl pulp::WithSimd for AdamUpdateChunk<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let p = self.op;
        for ((w, &m), &v) in self.w.iter_mut().zip(self.m).zip(self.v) {
            let mut u = (m / p.c1) / ((v / p.c2).sqrt() + p.eps);
            if p.wd != 0.0 {
                u += *w * p.wd;
            }
            *w -= u * p.lr;
        }
    }
}

/// `Σ x²` over CPU tensors of any float dtype, in f64, in parallel and without copies (the
/// gradient norm for clipping). Non-contiguous tensors are made contiguous first.
pub fn sum_squares_cpu(tensors: &[&Tensor]) -> Result<f64> {
    fn part<T: WithDType>(v: &[T]) -> Result<f64> {
        Ok(v.par_chunks(OPT_CHUNK)
            .map(|c| {
                c.iter()
                    .map(|x| {
                        let x = x.to_f64();
                        x * x
                    })
                    .sum::<f64>()
            })
            .sum())
    }
    let mut total = 0.0;
    for t in tensors {
        let t = t.contiguous()?;
        let (s, l) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cs) = &*s else {
            candle_core::bail!("sum of squares: a tensor is not on the CPU");
        };
        let (a, b) = span(l, "sum of squares")?;
        total += match cs {
            CpuStorage::F32(v) => part(&v[a..b])?,
            CpuStorage::F64(v) => part(&v[a..b])?,
            CpuStorage::BF16(v) => part(&v[a..b])?,
            CpuStorage::F16(v) => part(&v[a..b])?,
            _ => candle_core::bail!("sum of squares: not a float tensor"),
        };
    }
    Ok(total)
}
