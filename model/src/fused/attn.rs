//! The multi-head attention core as one autograd node ([`attention`]), the flash kernels' ops
//! ([`FlashAttention`], [`FlashAttentionGrad`]) and the backward that recomputes.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::cpu::{by_dtype, typed};
use super::softmax::{SoftmaxGrad, softmax, softmax_valid};
use super::{flash, flash_bwd, fused, gpu_route};

/// Multi-head self-attention core: `qkv` `[B, N, 3·D]` (queries, keys, values, heads
/// interleaved as a `[3, H, D/H]` split of the last dimension) → `[B, N, D]`, heads merged.
///
/// Fused (the default), the whole core (head split, `softmax(q·kᵀ/√d)·v`, head merge) is one
/// node of candle's autograd graph: its forward is the flash kernel where that applies (GPU,
/// bf16, heads 32 or 64 wide), else candle's operations on a detached `qkv`, and its backward
/// recomputes the attention matrix and returns `dqkv` in one piece. Candle's
/// gradient store then never holds the `[B, H, N, N]` matrices (it would zero-fill and add
/// each one) nor the strided pieces of the head split, which took most of a GPU step. Tokens
/// are padded to a multiple of 8 inside (aligned GEMMs; padded keys left out of the softmax).
/// With fusion off, the same arithmetic composed of candle operations.
pub fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, _, d3) = qkv.dims3()?;
    if heads == 0 || d3 % (3 * heads) != 0 {
        candle_core::bail!("attention: width {d3} is not 3 × a multiple of {heads} heads");
    }
    if !fused() {
        return attention_forward(qkv, heads, false);
    }
    if flash_applies(qkv, heads) {
        // The flash kernel is the node's forward; on the GPU it leaves each query's
        // log-sum-exp for the node's flash backward.
        let lse = LseSlot::default();
        return flash_operand(qkv)?.apply_op1(FlashAttentionNode { heads, lse });
    }
    // A tensor of its own (the node's forward hands its storage on whole).
    let out = attention_forward(&qkv.detach(), heads, true)?.contiguous()?;
    qkv.apply_op2(&out, AttentionNode { heads })
}

/// Whether the flash kernel runs [`attention`]'s forward pass: bf16 on a GPU, heads 32 or 64
/// wide (ViT-B/16's encoder and MAE decoder), and not switched off.
/// `t` contiguous from a 16-byte boundary of its storage (the flash kernels read their operands
/// 16 bytes at a time): `t` itself, or a copy when it starts elsewhere.
fn flash_operand(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16) {
        Ok(t)
    } else {
        t.copy()
    }
}

fn flash_applies(qkv: &Tensor, heads: usize) -> bool {
    let hd = qkv.dim(2).map_or(0, |d3| d3 / 3 / heads.max(1));
    flash() && gpu_route(qkv) && qkv.dtype() == DType::BF16 && matches!(hd, 32 | 64)
}

/// The attention core's forward pass in one kernel, with no `[N, N]` matrix in memory:
/// `qkv` `[B, N, 3·H·hd]` (queries, keys, values, heads interleaved) → `softmax(q·kᵀ/√hd)·v`
/// `[B, N, H·hd]`, heads merged. On a GPU (bf16, hd 32 or 64) a flash-attention kernel on
/// tensor cores ([`crate::cuda::flash_attention`]); on the CPU the same arithmetic in f64 per
/// query, its reference. No backward of its own: [`attention`]'s node recomputes.
#[derive(Debug, Clone)]
pub struct FlashAttention {
    /// Attention heads.
    pub heads: usize,
    /// Where the GPU kernel leaves each query's log-sum-exp ([`attention`]'s node); none for
    /// [`FlashAttention::new`].
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: Option<LseSlot>,
}

impl FlashAttention {
    /// The op over `heads` heads.
    pub fn new(heads: usize) -> Self {
        Self { heads, lse: None }
    }

    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (b, n, d3) = l.shape().dims3()?;
        let h = self.heads;
        if h == 0 || d3 % (3 * h) != 0 {
            candle_core::bail!("flash attention: width {d3} is not 3 × a multiple of {h} heads");
        }
        Ok((b, n, h, d3 / 3 / h))
    }

    /// Tell a census ([`candle_core::census`]) the products' operations of attention over
    /// `dims`, `matmuls` `[N, N] × [N, hd]`-sized products per head: 2 forward (`q·kᵀ`, `p·v`),
    /// 5 backward (`q·kᵀ` again, `dv`, `dp`, `dq`, `dk`).
    fn declare_flops((b, n, h, hd): (usize, usize, usize, usize), matmuls: usize) {
        candle_core::census::flops((2 * matmuls * b * h * n * n * hd) as u64);
    }
}

impl CustomOp1 for FlashAttention {
    fn name(&self) -> &'static str {
        "icefm-flash-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, h, hd) = self.dims(l)?;
        Self::declare_flops((b, n, h, hd), 2);
        fn go<T: WithDType>(
            s: &CpuStorage,
            l: &Layout,
            (b, n, h, hd): (usize, usize, usize, usize),
        ) -> Result<CpuStorage> {
            let x = typed::<T>(s, l, "flash attention")?;
            let (d, stride) = (h * hd, 3 * h * hd);
            let scale = (hd as f64).powf(-0.5);
            let mut out = vec![T::from_f64(0.0); b * n * d];
            // One (sample, query) row of the output per task: every head of it.
            out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
                let (bi, qi) = (row / n, row % n);
                let tok = |j: usize| &x[(bi * n + j) * stride..][..stride];
                let mut p = vec![0f64; n];
                for head in 0..h {
                    let q = &tok(qi)[head * hd..][..hd];
                    for (j, pj) in p.iter_mut().enumerate() {
                        let k = &tok(j)[(h + head) * hd..][..hd];
                        *pj = q
                            .iter()
                            .zip(k)
                            .map(|(a, b)| a.to_f64() * b.to_f64())
                            .sum::<f64>()
                            * scale;
                    }
                    let m = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    p.iter_mut().for_each(|v| *v = (*v - m).exp());
                    let z: f64 = p.iter().sum();
                    for c in 0..hd {
                        let acc: f64 = p
                            .iter()
                            .enumerate()
                            .map(|(j, pj)| pj * tok(j)[(2 * h + head) * hd + c].to_f64())
                            .sum();
                        o[head * hd + c] = T::from_f64(acc / z);
                    }
                }
            });
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = by_dtype!(s.dtype(), go(s, l, (b, n, h, hd)))?;
        Ok((out, Shape::from((b, n, h * hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, n, h, hd) = self.dims(l)?;
        FlashAttention::declare_flops((b, n, h, hd), 2);
        let keep = self.lse.as_ref().map(|slot| &*slot.inner);
        let out = crate::cuda::flash_attention(s, l, (b, n, h, hd), keep)?;
        Ok((out, Shape::from((b, n, h * hd))))
    }
}

/// [`attention`] differentiated by candle's autograd through its operations (no graph node of
/// its own, no padding): the reference of the node's backward in the tests.
pub fn attention_reference(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    attention_forward(qkv, heads, false)
}

/// Queries (scaled), keys and values `[B, H, N', hd]` of `qkv` padded to `N'` tokens.
fn split_heads(qkv: &Tensor, heads: usize, padded: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads;
    let qkv = if padded > n {
        qkv.pad_with_zeros(1, 0, padded - n)?
    } else {
        qkv.clone()
    };
    let t = qkv
        .reshape((b, padded, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    let q = (t.get(0)? * (hd as f64).powf(-0.5))?;
    Ok((q, t.get(1)?, t.get(2)?))
}

/// The attention core on `qkv`; `pad`: tokens padded to a multiple of 8 (fused kernels only).
fn attention_forward(qkv: &Tensor, heads: usize, pad: bool) -> Result<Tensor> {
    let (b, n, d3) = qkv.dims3()?;
    let d = d3 / 3;
    let padded = if pad { n.div_ceil(8) * 8 } else { n };
    let (q, k, v) = split_heads(qkv, heads, padded)?;
    let scores = q.matmul(&k.t()?)?;
    let p = if padded > n {
        softmax_valid(&scores, n)?
    } else {
        softmax(&scores)?
    };
    let out = p.matmul(&v)?.transpose(1, 2)?.reshape((b, padded, d))?;
    if padded > n {
        out.narrow(1, 0, n)
    } else {
        Ok(out)
    }
}

/// The attention core's backward with no `[N, N]` matrix in memory: `(qkv [B, N, 3·H·hd], o,
/// dout [B, N, H·hd])` → `dqkv` in `qkv`'s layout, where `o` is the forward's output and `dout`
/// its gradient: `D = Σ dout·o` per query, `P` recomputed, `dv = Pᵀ·dout`,
/// `dS = P ∘ (dout·vᵀ − D)`, `dq = dS·k/√hd`, `dk = dSᵀ·q/√hd`. On a GPU (bf16, hd 32 or 64)
/// two flash kernels ([`crate::cuda::flash_attention_bwd`]); on the CPU the same arithmetic in
/// f64, its reference.
#[derive(Debug, Clone)]
pub struct FlashAttentionGrad {
    /// Attention heads.
    pub heads: usize,
    /// The forward's log-sum-exp, used where it is there ([`attention`]'s node): the `dq`
    /// kernel then skips its first pass over the keys. None for [`FlashAttentionGrad::new`].
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: Option<LseSlot>,
}

impl FlashAttentionGrad {
    /// The op over `heads` heads.
    pub fn new(heads: usize) -> Self {
        Self { heads, lse: None }
    }
}

impl CustomOp3 for FlashAttentionGrad {
    fn name(&self) -> &'static str {
        "icefm-flash-attention-grad"
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
        let dims = FlashAttention::new(self.heads).dims(l1)?;
        FlashAttention::declare_flops(dims, 5);
        let (b, n, h, hd) = dims;
        for l in [l2, l3] {
            if l.shape().dims() != [b, n, h * hd] {
                candle_core::bail!(
                    "flash attention backward: output or gradient {:?}, expected [{b}, {n}, {}]",
                    l.shape().dims(),
                    h * hd
                );
            }
        }
        fn go<T: WithDType>(
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
            (b, n, h, hd): (usize, usize, usize, usize),
        ) -> Result<CpuStorage> {
            let x = typed::<T>(s1, l1, "flash attention backward")?;
            let o = typed::<T>(s2, l2, "flash attention backward")?;
            let go_ = typed::<T>(s3, l3, "flash attention backward")?;
            let (d, stride) = (h * hd, 3 * h * hd);
            let scale = (hd as f64).powf(-0.5);
            let f = |v: &T| v.to_f64();
            // One (sample, head) per task, in f64; then written into qkv's layout.
            let parts: Vec<(usize, usize, Vec<f64>)> = (0..b * h)
                .into_par_iter()
                .map(|bh| {
                    let (bi, head) = (bh / h, bh % h);
                    let at = |j: usize, slot: usize, c: usize| {
                        f(&x[(bi * n + j) * stride + (slot * h + head) * hd + c])
                    };
                    let row = |t: &[T], j: usize, c: usize| f(&t[(bi * n + j) * d + head * hd + c]);
                    // dq, dk, dv of this head: [3][n][hd].
                    let mut g = vec![0f64; 3 * n * hd];
                    let mut p = vec![0f64; n];
                    for i in 0..n {
                        for (j, pj) in p.iter_mut().enumerate() {
                            *pj = (0..hd).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f64>() * scale;
                        }
                        let m = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        p.iter_mut().for_each(|v| *v = (*v - m).exp());
                        let z: f64 = p.iter().sum();
                        p.iter_mut().for_each(|v| *v /= z);
                        let dd: f64 = (0..hd).map(|c| row(go_, i, c) * row(o, i, c)).sum();
                        for (j, &pj) in p.iter().enumerate() {
                            let dp: f64 = (0..hd).map(|c| row(go_, i, c) * at(j, 2, c)).sum();
                            let ds = pj * (dp - dd) * scale;
                            for c in 0..hd {
                                g[i * hd + c] += ds * at(j, 1, c);
                                g[(n + j) * hd + c] += ds * at(i, 0, c);
                                g[(2 * n + j) * hd + c] += pj * row(go_, i, c);
                            }
                        }
                    }
                    (bi, head, g)
                })
                .collect();
            let mut out = vec![T::from_f64(0.0); b * n * stride];
            for (bi, head, g) in parts {
                for slot in 0..3 {
                    for j in 0..n {
                        for c in 0..hd {
                            out[(bi * n + j) * stride + (slot * h + head) * hd + c] =
                                T::from_f64(g[(slot * n + j) * hd + c]);
                        }
                    }
                }
            }
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = by_dtype!(s1.dtype(), go((s1, l1), (s2, l2), (s3, l3), dims))?;
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
        let dims = FlashAttention::new(self.heads).dims(l1)?;
        FlashAttention::declare_flops(dims, 5);
        let saved = self.lse.as_ref().map(|slot| &*slot.inner);
        let out = crate::cuda::flash_attention_bwd((s1, l1), (s2, l2), (s3, l3), dims, saved)?;
        Ok((out, l1.shape().clone()))
    }
}

/// Where [`attention`]'s flash forward leaves each query's log-sum-exp for the flash backward
/// of the same node, which then skips recomputing it (a pass over all keys). Filled on GPUs
/// only; shared between the node's forward and backward ops.
#[derive(Debug, Clone, Default)]
struct LseSlot {
    #[cfg(feature = "cuda")]
    inner: std::sync::Arc<crate::cuda::SavedLse>,
}

/// The forward of a graph node that hands on a result computed outside it (the node only
/// attaches a backward): the storage copied as it is. `try_clone` copies a storage whole, so
/// the result must be a contiguous tensor of its own.
pub(crate) fn pass_through<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("graph node: the result must be a contiguous tensor of its own");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

/// [`attention`]'s graph node where the flash kernel does not apply: forward passes the
/// detached result through; backward recomputes and differentiates the core.
#[derive(Debug, Clone)]
struct AttentionNode {
    heads: usize,
}

impl CustomOp2 for AttentionNode {
    fn name(&self) -> &'static str {
        "icefm-attention"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        pass_through(s2, l2)
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dqkv = attention_backward(self.heads, None, qkv, out, grad)?;
        Ok((Some(dqkv), None))
    }
}

/// [`attention`]'s graph node where the flash kernel runs the forward: the node's forward is
/// [`FlashAttention`]'s (no result computed outside and copied in), its backward
/// [`AttentionNode`]'s.
#[derive(Debug, Clone)]
struct FlashAttentionNode {
    heads: usize,
    lse: LseSlot,
}

impl FlashAttentionNode {
    fn op(&self) -> FlashAttention {
        FlashAttention {
            heads: self.heads,
            lse: Some(self.lse.clone()),
        }
    }
}

impl CustomOp1 for FlashAttentionNode {
    fn name(&self) -> &'static str {
        "icefm-flash-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.op().cpu_fwd(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.op().cuda_fwd(s, l)
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        attention_backward(self.heads, Some(&self.lse), qkv, out, grad).map(Some)
    }
}

/// The gradient of [`attention`]'s core for `qkv`, given its output `out` and that output's
/// gradient `grad`: the flash kernels where they apply ([`flash_bwd`]; with the forward's
/// log-sum-exp where `lse` holds it), else the scores recomputed and differentiated with a
/// materialised softmax.
fn attention_backward(
    heads: usize,
    lse: Option<&LseSlot>,
    qkv: &Tensor,
    out: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let qkv = qkv.detach();
    let grad = grad.detach();
    if flash_bwd() && flash_applies(&qkv, heads) && grad.dtype() == DType::BF16 {
        return flash_operand(&qkv)?.apply_op3_no_bwd(
            &flash_operand(&out.detach())?,
            &flash_operand(&grad)?,
            &FlashAttentionGrad {
                heads,
                lse: lse.cloned(),
            },
        );
    }
    let (b, n, d3) = qkv.dims3()?;
    let (h, d) = (heads, d3 / 3);
    let hd = d / h;
    let padded = n.div_ceil(8) * 8;
    let (q, k, v) = split_heads(&qkv, h, padded)?;
    let p = q.matmul(&k.t()?)?;
    let p = if padded > n {
        softmax_valid(&p, n)?
    } else {
        softmax(&p)?
    };
    let go = if padded > n {
        grad.pad_with_zeros(1, 0, padded - n)?
    } else {
        grad
    };
    // dO [B, H, N', hd].
    let go = go
        .reshape((b, padded, h, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let dv = p.t()?.matmul(&go)?;
    let dp = go.matmul(&v.t()?)?;
    let ds = p.apply_op2_no_bwd(&dp, &SoftmaxGrad)?;
    // Scores are (q·s)·kᵀ: d(q·s) = dS·k, dq = that · s; dk = dSᵀ·(q·s).
    let dq = (ds.matmul(&k)? * (hd as f64).powf(-0.5))?;
    let dk = ds.t()?.matmul(&q)?;
    let dqkv = Tensor::stack(&[dq, dk, dv], 0)?
        .permute((1, 3, 0, 2, 4))?
        .reshape((b, padded, d3))?;
    if padded > n {
        dqkv.narrow(1, 0, n)
    } else {
        Ok(dqkv)
    }
}
