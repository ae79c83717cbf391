//! Tokens gathered by index ([`gather_tokens`]) and scattered back in the backward pass
//! ([`TokenRows`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu::{by_dtype, typed};
use super::fused;

/// Tokens of each sample by index: `x` `[B, N, D]`, `ids` `[B][K]` (each row's indices
/// distinct, below N) → `[B, K, D]`. Its backward writes each gradient row back to its token
/// (zeros elsewhere) with no atomic adds, since a sample's indices are distinct. Falls back
/// to candle's `gather` (an index tensor as wide as the tokens) when fusion is off.
pub fn gather_tokens(x: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
    let (b, n, _) = x.dims3()?;
    let k = ids.first().map_or(0, Vec::len);
    if ids.len() != b || ids.iter().any(|r| r.len() != k) {
        candle_core::bail!(
            "gather_tokens: {} index rows of unequal length for {b} samples",
            ids.len()
        );
    }
    for row in ids {
        let mut seen = vec![false; n];
        for &i in row {
            let i = i as usize;
            if i >= n || std::mem::replace(&mut seen[i], true) {
                candle_core::bail!("gather_tokens: index {i} repeated or not below {n}");
            }
        }
    }
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    gather_tokens_at(x, &Tensor::from_vec(flat, (b, k), x.device())?)
}

/// [`gather_tokens`] with the indices already on `x`'s device: `idx` u32 `[B, K]`, each row's
/// indices distinct and below N (not checked here: [`crate::mae::Masking`] makes them so).
pub fn gather_tokens_at(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let (ib, k) = idx.dims2()?;
    if ib != b || idx.dtype() != DType::U32 {
        candle_core::bail!(
            "gather_tokens: {:?} indices {:?} for {b} samples",
            idx.dtype(),
            idx.dims()
        );
    }
    let idx = idx.contiguous()?;
    if !fused() {
        let wide = idx.unsqueeze(2)?.broadcast_as((b, k, d))?.contiguous()?;
        return x.contiguous()?.gather(&wide, 1);
    }
    x.contiguous()?
        .apply_op2(&idx, TokenRows { n, scatter: false })
}

/// [`gather_tokens`]'s op and its backward: `(x [B, N, D], ids [B, K] u32) → [B, K, D]`
/// (gather), or `(grad [B, K, D], ids) → [B, n, D]` with zeros where no index points (scatter).
#[derive(Debug, Clone, Copy)]
pub struct TokenRows {
    /// Tokens per sample of a scatter's result (unused by a gather).
    pub n: usize,
    /// Scatter (the gather's backward) rather than gather.
    pub scatter: bool,
}

/// Copy rows between `[B, ·, D]` buffers: `to[b, dst(j)] = from[b, src(j)]` for each index `j`
/// of a sample (`gather`: src = ids[j], dst = j; scatter: src = j, dst = ids[j]).
fn move_rows<T: WithDType>(
    from: &[T],
    ids: &[u32],
    (b, k, d): (usize, usize, usize),
    n: usize,
    scatter: bool,
) -> Vec<T> {
    let (rows_in, rows_out) = if scatter { (k, n) } else { (n, k) };
    let mut out = vec![T::from_f64(0.0); b * rows_out * d];
    out.par_chunks_mut(rows_out * d)
        .zip(from.par_chunks(rows_in * d))
        .zip(ids.par_chunks(k))
        .for_each(|((o, f), id)| {
            for (j, &t) in id.iter().enumerate() {
                let t = t as usize;
                let (src, dst) = if scatter { (j, t) } else { (t, j) };
                o[dst * d..(dst + 1) * d].copy_from_slice(&f[src * d..(src + 1) * d]);
            }
        });
    out
}

impl CustomOp2 for TokenRows {
    fn name(&self) -> &'static str {
        if self.scatter {
            "icefm-scatter-tokens"
        } else {
            "icefm-gather-tokens"
        }
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
            ids: &[u32],
            bkd: (usize, usize, usize),
            n: usize,
            scatter: bool,
        ) -> Result<CpuStorage> {
            let x = typed::<T>(s1, l1, "token rows")?;
            Ok(T::to_cpu_storage_owned(move_rows(x, ids, bkd, n, scatter)))
        }
        let ids = typed::<u32>(s2, l2, self.name())?;
        let (bkd, n, shape) = self.shapes(l1, l2);
        let out = by_dtype!(s1.dtype(), go(s1, l1, ids, bkd, n, self.scatter))?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bkd, n, shape) = self.shapes(l1, l2);
        let out = crate::cuda::move_tokens(s1, l1, s2, l2, bkd, n, self.scatter)?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.scatter {
            candle_core::bail!("the token scatter is a backward pass and has none of its own");
        }
        let back = TokenRows {
            n: x.dim(1)?,
            scatter: true,
        };
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(ids, &back)?), None))
    }
}

impl TokenRows {
    /// `(B, K, D)`, the token count `N` and the result's shape, from the input's layout
    /// (`[B, N, D]` for a gather, `[B, K, D]` for a scatter) and the ids' (`[B, K]`).
    fn shapes(&self, l1: &Layout, l2: &Layout) -> ((usize, usize, usize), usize, Shape) {
        let dims = l1.dims();
        let (b, d, k) = (dims[0], dims[2], l2.dims()[1]);
        if self.scatter {
            ((b, k, d), self.n, Shape::from((b, self.n, d)))
        } else {
            ((b, k, d), dims[1], Shape::from((b, k, d)))
        }
    }
}
