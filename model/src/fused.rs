//! Fused layer norm and softmax as candle custom ops, each with its own backward.
//!
//! [`crate::ops`] composes both from differentiable primitives: about ten kernels (CPU passes or
//! CUDA launches) and as many temporaries per call forward, more backward. The ops here do each
//! in one pass per direction, on the CPU (rayon over rows, computed in f64) and, with feature
//! `cuda`, with icefm's own kernels ([`crate::cuda`]: float and bf16 inputs, f32 arithmetic).
//! Their backward passes are custom ops too, so gradients never fall back to the composition.
//!
//! The composed versions stay as the reference: the tests compare values and gradients of the
//! two, and `ICEFM_FUSED=0` (or [`set_fused`]) switches the model back to them.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// A process-wide switch read once from its environment variable; settable.
struct Switch {
    /// 0 (3): not yet read from the environment, on (off) by default; 1: on; 2: off.
    state: AtomicU8,
    var: &'static str,
}

impl Switch {
    const fn new(var: &'static str) -> Self {
        Self {
            state: AtomicU8::new(0),
            var,
        }
    }

    /// A switch that is off unless its variable says `1`.
    const fn off_by_default(var: &'static str) -> Self {
        Self {
            state: AtomicU8::new(3),
            var,
        }
    }

    fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            3 => {
                let on = std::env::var(self.var).is_ok_and(|v| v == "1");
                self.set(on);
                on
            }
            _ => {
                let on = std::env::var(self.var).map_or(true, |v| v != "0");
                self.set(on);
                on
            }
        }
    }

    fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

static FUSED: Switch = Switch::new("ICEFM_FUSED");
static FLASH: Switch = Switch::new("ICEFM_FLASH");
static FLASH_BWD: Switch = Switch::off_by_default("ICEFM_FLASH_BWD");
static BIAS_GELU_CUDA: Switch = Switch::off_by_default("ICEFM_BIAS_GELU_CUDA");
static FLASH_PREFETCH: Switch = Switch::off_by_default("ICEFM_FLASH_PREFETCH");
static LT_BIAS: Switch = Switch::off_by_default("ICEFM_LT_BIAS");
static LN_V8: Switch = Switch::off_by_default("ICEFM_LN_V8");
static GPU_ROUTES: Switch = Switch::off_by_default("ICEFM_GPU_ROUTES");

/// Whether the model uses the fused ops (default; `ICEFM_FUSED=0` in the environment turns them
/// off, for comparisons).
pub fn fused() -> bool {
    FUSED.get()
}

/// Switch the fused ops on or off for the whole process.
pub fn set_fused(on: bool) {
    FUSED.set(on);
}

/// Whether the ops take their GPU routes on every device (`ICEFM_GPU_ROUTES=1`; off by
/// default): where an op chooses its path by device (the flash attention, the fused bias +
/// GELU, the cuBLASLt bias epilogue), the CPU then runs the GPU's choice through its CPU
/// reference. For counting on the CPU the operations a GPU step runs (`examples/census.rs`);
/// slow (the references compute in f64), not for training.
pub fn gpu_routes() -> bool {
    GPU_ROUTES.get()
}

/// Switch [`gpu_routes`] on or off for the whole process.
pub fn set_gpu_routes(on: bool) {
    GPU_ROUTES.set(on);
}

/// Whether `t`'s ops take their GPU routes: on a GPU, or everywhere under [`gpu_routes`].
fn gpu_route(t: &Tensor) -> bool {
    t.device().is_cuda() || gpu_routes()
}

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

/// Rows and row length of a contiguous tensor.
fn rows_cols(layout: &Layout) -> (usize, usize) {
    let dims = layout.dims();
    let d = dims.last().copied().unwrap_or(1).max(1);
    (layout.shape().elem_count() / d, d)
}

/// The contiguous element range of `layout`, or an error naming the op.
fn span(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))
}

/// A CPU storage as f64 values over `layout` (contiguous).
fn cpu_f64(s: &CpuStorage, layout: &Layout, op: &str) -> Result<Vec<f64>> {
    let (a, b) = span(layout, op)?;
    fn conv<T: WithDType>(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f64()).collect()
    }
    Ok(match s {
        CpuStorage::F32(v) => conv(&v[a..b]),
        CpuStorage::F64(v) => conv(&v[a..b]),
        CpuStorage::BF16(v) => conv(&v[a..b]),
        CpuStorage::F16(v) => conv(&v[a..b]),
        _ => candle_core::bail!("{op}: a float tensor is needed, got {:?}", s.dtype()),
    })
}

/// f64 values as a CPU storage of `dtype`.
fn cpu_from_f64(v: Vec<f64>, dtype: DType) -> Result<CpuStorage> {
    fn conv<T: WithDType>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&x| T::from_f64(x)).collect()
    }
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(conv(&v)),
        DType::F64 => CpuStorage::F64(v),
        DType::BF16 => CpuStorage::BF16(conv(&v)),
        DType::F16 => CpuStorage::F16(conv(&v)),
        d => candle_core::bail!("fused ops: unsupported dtype {d:?}"),
    })
}

/// Run `$f::<T>(…)` for the float dtype `$dt` (f32, f64, bf16, f16).
macro_rules! by_dtype {
    ($dt:expr, $f:ident ( $($arg:expr),* )) => {
        match $dt {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            d => Err(candle_core::Error::Msg(format!("fused ops: unsupported dtype {d:?}"))),
        }
    };
}

/// The values of a contiguous CPU storage, in its own dtype (no copy).
fn typed<'a, T: WithDType>(s: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [T]> {
    let (a, b) = span(layout, op)?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
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

/// Rows per rayon task (a few thousand values each).
fn rows_per_task(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// `f(x, b)` for every element of the rows of `x` (`c` wide) and its column's `b`, rows split
/// into parallel tasks, each compiled for the CPU's widest vectors ([`RowsWithBias`]).
fn map_rows_bias<X, B, Y>(
    x: &[X],
    b: &[B],
    c: usize,
    zero: Y,
    f: impl Fn(X, B) -> Y + Sync,
) -> Vec<Y>
where
    X: Copy + Sync,
    B: Copy + Sync,
    Y: Copy + Send + Sync,
{
    map_rows_bias2(x, x, b, c, zero, |xv, _, bv| f(xv, bv))
}

/// [`map_rows_bias`] over two inputs of the same shape: `f(x, g, b)`.
fn map_rows_bias2<X, B, Y>(
    x: &[X],
    g: &[X],
    b: &[B],
    c: usize,
    zero: Y,
    f: impl Fn(X, X, B) -> Y + Sync,
) -> Vec<Y>
where
    X: Copy + Sync,
    B: Copy + Sync,
    Y: Copy + Send + Sync,
{
    let mut y = vec![zero; x.len()];
    let chunk = rows_per_task(c) * c;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .for_each(|(y, (x, g))| {
            pulp::Arch::new().dispatch(RowsWithBias {
                y,
                x,
                g,
                b,
                c,
                f: &f,
            });
        });
    y
}

/// [`map_rows_bias2`] in the [`column_blocks`] blocks of rows, each block's results summed per
/// column while they are in cache: the results, and `[P, c]` partial column sums of them (f64)
/// with `P`.
fn map_rows_bias2_sums<X, B, Y>(
    x: &[X],
    g: &[X],
    b: &[B],
    c: usize,
    f: impl Fn(X, X, B) -> Y + Sync,
) -> (Vec<Y>, Vec<f64>, usize)
where
    X: Copy + Sync,
    B: Copy + Sync,
    Y: WithDType,
{
    if c == 0 {
        return (Vec::new(), Vec::new(), 1);
    }
    let p = column_blocks(x.len() / c);
    let chunk = (x.len() / c).div_ceil(p).max(1) * c;
    let mut y = vec![Y::from_f64(0.0); x.len()];
    // Blocks past the rows (none but for zero rows) stay 0.
    let mut sums = vec![0f64; p * c];
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .zip(sums.par_chunks_mut(c))
        .for_each(|((y, (x, g)), acc)| {
            pulp::Arch::new().dispatch(RowsWithBias {
                y,
                x,
                g,
                b,
                c,
                f: &f,
            });
            add_rows(acc, y);
        });
    (y, sums, p)
}

/// One task of [`map_rows_bias2`]: a [`pulp::WithSimd`], so that its loop (and the inlined
/// `f`) is compiled for AVX2 + FMA where the CPU has them; a closure handed to pulp's dispatch
/// is not inlined into it, and the default target vectorises 4 wide (SSE2) only.
struct RowsWithBias<'a, X, B, Y, F> {
    y: &'a mut [Y],
    x: &'a [X],
    g: &'a [X],
    b: &'a [B],
    c: usize,
    f: &'a F,
}

impl<X: Copy, B: Copy, Y, F: Fn(X, X, B) -> Y> pulp::WithSimd for RowsWithBias<'_, X, B, Y, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let c = self.c;
        for ((yr, xr), gr) in self
            .y
            .chunks_mut(c)
            .zip(self.x.chunks(c))
            .zip(self.g.chunks(c))
        {
            for (((yv, &xv), &gv), &bv) in yr.iter_mut().zip(xr).zip(gr).zip(self.b) {
                *yv = (self.f)(xv, gv, bv);
            }
        }
    }
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
fn row_blocks(rows: usize, per: usize, cap: usize) -> usize {
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

/// A second result of a custom op (candle's ops have one), kept for the caller to take as a
/// tensor with [`Stash::take`]: an op that launches nothing and hands the kept storage on.
#[derive(Debug, Clone, Default)]
pub struct Stash {
    inner: std::sync::Arc<std::sync::Mutex<Option<(Stashed, Shape)>>>,
}

/// A kept storage, on the device that computed it.
#[derive(Debug)]
enum Stashed {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
}

impl Stash {
    /// Keep `storage` of `shape`, written by the op now running: an open census counts its
    /// bytes with that op's.
    fn keep(&self, storage: Stashed, shape: Shape) {
        let dtype = match &storage {
            Stashed::Cpu(s) => s.dtype(),
            #[cfg(feature = "cuda")]
            Stashed::Cuda(s) => s.dtype(),
        };
        candle_core::census::written((shape.elem_count() * dtype.size_in_bytes()) as u64);
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some((storage, shape));
    }

    fn get(&self) -> Result<(Stashed, Shape)> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("stash: nothing kept, or taken twice".into()))
    }

    /// The kept result as a tensor on `like`'s device (no gradient). Once only.
    pub fn take(&self, like: &Tensor) -> Result<Tensor> {
        like.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for Stash {
    fn name(&self) -> &'static str {
        "icefm-stash"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::census::launchless();
        match self.get()? {
            (Stashed::Cpu(s), shape) => Ok((s, shape)),
            #[cfg(feature = "cuda")]
            _ => candle_core::bail!("stash: kept on a GPU, taken on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        candle_core::census::launchless();
        match self.get()? {
            (Stashed::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("stash: kept on the CPU, taken on a GPU"),
        }
    }
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

/// `x + bias` over the last dimension (`bias` `[C]` of any float dtype; the result has `x`'s
/// dtype). Its backward sums the gradient over rows with a column reduction of its own:
/// candle's broadcast-add backward reduces over the leading dimensions with one strided pass
/// per column, the slowest part of a linear layer's backward on a GPU. Falls back to
/// `broadcast_add` when fusion is off.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !fused() {
        return x.broadcast_add(&bias.to_dtype(x.dtype())?);
    }
    let c = x.dim(candle_core::D::Minus1)?;
    if bias.dims() != [c] {
        candle_core::bail!("bias_add: bias {:?} must be [{c}]", bias.dims());
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)
}

/// Exact (erf) GELU, `x · Φ(x)`, forward and backward in one pass each. Falls back to
/// candle's `gelu_erf` when fusion is off.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !fused() {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

/// Fused bias add (forward); its backward is the gradient itself and [`ColumnSums`].
#[derive(Debug, Clone, Copy)]
pub struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "icefm-bias-add"
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
            let x = typed::<T>(s, l, "bias add")?;
            let y = map_rows_bias(x, b, c, T::from_f64(0.0), |xv, bv| {
                T::from_f64(xv.to_f64() + bv)
            });
            Ok(T::to_cpu_storage_owned(y))
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
            crate::cuda::bias_add(s1, l1, s2, l2, rows, c)?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(bias_grad(grad, b)?)))
    }
}

/// A linear layer's `x · wᵀ + b` for `x` `[rows, in]`, `w` `[out, in]` in `x`'s dtype and `b`
/// `[out]` (any float dtype): candle's matrix product then [`bias_add`]; or, on a GPU in bf16
/// with `ICEFM_LT_BIAS=1`, one cuBLASLt product with the bias added in its epilogue
/// ([`LinearBias`]: no pass of its own over the output). Off by default until the GPU check has
/// run it.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if lt_bias_applies(x) {
        return linear_bias(x, w, b);
    }
    bias_add(&x.matmul(&w.t()?)?, b)
}

/// `gelu(linear(x, w, b))`: the matrix product then [`bias_gelu`]; or, where [`linear`] adds
/// the bias in the product's epilogue and `bias_gelu` has no fused kernels, that then
/// [`gelu`]. Both make the same passes forward; backward, the fused `bias_gelu` sums the
/// bias's gradient in its own pass, where the epilogue's route reads the gradient again.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if lt_bias_applies(x) && !bias_gelu_fuses(x) {
        return gelu(&linear_bias(x, w, b)?);
    }
    bias_gelu(&x.matmul(&w.t()?)?, b)
}

fn lt_bias_applies(x: &Tensor) -> bool {
    fused() && LT_BIAS.get() && gpu_route(x) && x.dtype() == DType::BF16
}

/// Whether [`linear`] adds biases in cuBLASLt's epilogue on GPUs (`ICEFM_LT_BIAS=1`).
pub fn lt_bias() -> bool {
    LT_BIAS.get()
}

/// Switch [`linear`]'s cuBLASLt bias epilogue on or off for the whole process.
pub fn set_lt_bias(on: bool) {
    LT_BIAS.set(on);
}

/// Whether the bf16 layer norm on GPUs uses its kernels with 16-byte accesses and warps that
/// stride over rows, fetching the next row while they reduce the current one (rows of 512 to
/// 1280 values in steps of 256). Off by default until the GPU check has compared them with the
/// register-resident ones (`ICEFM_LN_V8=1`).
pub fn ln_v8() -> bool {
    LN_V8.get()
}

/// Switch the layer norm's wide-access GPU kernels on or off for the whole process.
pub fn set_ln_v8(on: bool) {
    LN_V8.set(on);
}

/// [`LinearBias`] applied, with its shapes checked.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    if kw != k || b.dims() != [n] {
        candle_core::bail!(
            "linear: x {:?}, w {:?}, b {:?} do not fit [rows, in], [out, in], [out]",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias)
}

/// `x · wᵀ + b` as one op: `x` `[m, k]`, `w` `[n, k]` (same dtype), `b` `[n]` → `[m, n]` in
/// `x`'s dtype. On the GPU (bf16) one cuBLASLt product with the bias in its epilogue
/// ([`crate::cuda::linear_bias`]); on the CPU a reference in f64 (for the tests, not for
/// training: [`linear`] takes candle's product there). Backward: `dx = dy · w`,
/// `dw = dyᵀ · x` (candle's products) and the bias's column sums ([`ColumnSums`]).
#[derive(Debug, Clone, Copy)]
pub struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "icefm-linear-bias"
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
            b: &[f64],
        ) -> Result<CpuStorage> {
            let (_, k) = rows_cols(l1);
            let x = typed::<T>(s1, l1, "linear")?;
            let w: Vec<f64> = typed::<T>(s2, l2, "linear")?
                .iter()
                .map(|v| v.to_f64())
                .collect();
            let n = b.len();
            let y: Vec<T> = x
                .par_chunks(k)
                .flat_map_iter(|row| {
                    let row: Vec<f64> = row.iter().map(|v| v.to_f64()).collect();
                    w.chunks(k)
                        .zip(b)
                        .map(move |(wr, bv)| {
                            T::from_f64(row.iter().zip(wr).map(|(a, c)| a * c).sum::<f64>() + bv)
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            debug_assert_eq!(y.len(), x.len() / k.max(1) * n);
            Ok(T::to_cpu_storage_owned(y))
        }
        let (m, k) = rows_cols(l1);
        let b = cpu_f64(s3, l3, self.name())?;
        let n = b.len();
        candle_core::census::flops(2 * (m * k * n) as u64);
        let out = by_dtype!(s1.dtype(), go(s1, l1, s2, l2, &b))?;
        Ok((out, Shape::from((m, n))))
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
        let (m, k) = rows_cols(l1);
        let (n, _) = rows_cols(l2);
        candle_core::census::flops(2 * (m * k * n) as u64);
        Ok((
            crate::cuda::linear_bias(s1, l1, s2, l2, s3, l3, (m, k, n))?,
            Shape::from((m, n)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.matmul(w)?;
        let dw = grad.t()?.matmul(x)?;
        Ok((Some(dx), Some(dw), Some(bias_grad(grad, b)?)))
    }
}

/// The gradient of a bias `b` `[C]` added to every row: the column sums of `d` `[..., C]`
/// ([`ColumnSums`]), in `b`'s dtype.
fn bias_grad(d: &Tensor, b: &Tensor) -> Result<Tensor> {
    d.contiguous()?
        .apply_op1_no_bwd(&ColumnSums)?
        .sum(0)?
        .to_dtype(b.dtype())
}

/// Blocks of rows of the column sums ([`ColumnSums`], [`BiasGeluGrad`]): about 64 rows each,
/// at most 256. The CUDA kernels' grid and the CPU's split, so both hand on partial sums of
/// the same shape.
pub fn column_blocks(rows: usize) -> usize {
    row_blocks(rows, 64, 256)
}

/// `[P, c]` partial column sums of `x`'s rows of `c` over the `P` = [`column_blocks`] blocks
/// of rows, in f64 (row-major), with `P`.
fn column_partial_sums<T: WithDType>(x: &[T], c: usize) -> (Vec<f64>, usize) {
    if c == 0 {
        return (Vec::new(), 1);
    }
    let p = column_blocks(x.len() / c);
    // Blocks past the rows (none but for zero rows) stay 0.
    let mut sums = vec![0f64; p * c];
    x.par_chunks((x.len() / c).div_ceil(p).max(1) * c)
        .zip(sums.par_chunks_mut(c))
        .for_each(|(chunk, acc)| add_rows(acc, chunk));
    (sums, p)
}

/// Add each row of `rows` (rows of `acc.len()` values) into `acc`, in f64.
fn add_rows<T: WithDType>(acc: &mut [f64], rows: &[T]) {
    for row in rows.chunks(acc.len().max(1)) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.to_f64();
        }
    }
}

/// f32 storage of partial sums (f64 where the input was f64).
fn partial_sums_storage(sums: Vec<f64>, input: DType) -> Result<CpuStorage> {
    cpu_from_f64(
        sums,
        if input == DType::F64 {
            DType::F64
        } else {
            DType::F32
        },
    )
}

/// Column sums of `[rows, C]` (C the last dimension) as `[P, C]` partial sums over `P` row
/// blocks ([`column_blocks`]), in f32 (f64 for f64 input); the caller sums over `P`.
#[derive(Debug, Clone, Copy)]
pub struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "icefm-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(s: &CpuStorage, l: &Layout) -> Result<(Vec<f64>, usize)> {
            let (_, c) = rows_cols(l);
            Ok(column_partial_sums(typed::<T>(s, l, "column sums")?, c))
        }
        let (_, c) = rows_cols(l);
        let (out, p) = by_dtype!(s.dtype(), go(s, l))?;
        Ok((partial_sums_storage(out, s.dtype())?, Shape::from((p, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, c) = rows_cols(l);
        let (out, p) = crate::cuda::column_sums(s, l, rows, c)?;
        Ok((out, Shape::from((p, c))))
    }
}

/// Independent accumulators of the row reductions below: a single running maximum or sum is
/// one dependent chain of 4-cycle operations per value; 16 lanes let them vectorise.
const LANES: usize = 16;

/// Largest value of `v` (−∞ for an empty slice; NaN ignored as `f32::max` does).
#[inline(always)]
fn max_f32(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    acc.iter().fold(tail, |a, &b| a.max(b))
}

/// `Σ v` in f64.
#[inline(always)]
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(x);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ a·b` in f64.
#[inline(always)]
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += f64::from(u) * f64::from(v);
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&u, &v)| f64::from(u) * f64::from(v))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `Φ(x)` and `φ(x)` of the standard normal.
fn normal_cdf_pdf(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf, pdf)
}

/// `e^x` in f32 to about 2 ulp, written so that loops over slices vectorise (glibc's `exp` is
/// a scalar call per value, about a tenth of a CPU training step in attention's softmax):
/// `2^k · p(r)` with `k = round(x / ln 2)`, `r = x − k·ln 2` (two-part ln 2) and Cephes' `expf`
/// polynomial on `|r| ≤ ln 2 / 2`. Inputs are clamped to the finite range.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = (p * r * r) + r + 1.0;
    e * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// `Φ(x)` and `φ(x)` in f32: `erf` by Abramowitz and Stegun 7.1.26 (absolute error below
/// 1.5e-7) with [`exp_f32`]; `Φ` is within 3e-7 (2 ulp at 1) of the f64 value.
#[inline(always)]
fn normal_cdf_pdf_f32(x: f32) -> (f32, f32) {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let e = exp_f32(-a * a);
    let erf = (1.0 - poly * e).copysign(z);
    // e^{-x²/2} = e^{-z²}
    (0.5 * (1.0 + erf), e * 0.398_942_3)
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

/// `(x, f)` → `f(v)` for every value `v` of `x` in `T`, in parallel chunks.
fn map_values<T: WithDType>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(yc, xc)| {
            for (yv, &xv) in yc.iter_mut().zip(xc) {
                *yv = f(xv);
            }
        });
    y
}

/// `(a, b, f)` → `f(a[i], b[i])` for every `i` (as long as `a`), in parallel chunks.
fn map_pairs<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); a.len()];
    y.par_chunks_mut(4096)
        .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
        .for_each(|(yc, (ac, bc))| {
            for ((yv, &av), &bv) in yc.iter_mut().zip(ac).zip(bc) {
                *yv = f(av, bv);
            }
        });
    y
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
/// one, `model/tests/cuda.rs`).
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
fn bias_gelu_fuses(x: &Tensor) -> bool {
    fused() && (!gpu_route(x) || BIAS_GELU_CUDA.get())
}

/// Whether [`bias_gelu`] uses its fused kernels on GPUs (`ICEFM_BIAS_GELU_CUDA=1`).
pub fn bias_gelu_cuda() -> bool {
    BIAS_GELU_CUDA.get()
}

/// Switch [`bias_gelu`]'s fused kernels on or off on GPUs for the whole process.
pub fn set_bias_gelu_cuda(on: bool) {
    BIAS_GELU_CUDA.set(on);
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

/// Whether [`attention`]'s forward pass may use the flash kernel (default; `ICEFM_FLASH=0`
/// turns it off, for comparisons).
pub fn flash() -> bool {
    FLASH.get()
}

/// Switch the flash attention forward on or off for the whole process.
pub fn set_flash(on: bool) {
    FLASH.set(on);
}

/// Whether [`attention`]'s backward pass may use the flash kernels. Off by default until they
/// have run on a GPU (`ICEFM_FLASH_BWD=1` turns them on; `model/tests/cuda.rs` checks them).
pub fn flash_bwd() -> bool {
    FLASH_BWD.get()
}

/// Switch the flash attention backward on or off for the whole process.
pub fn set_flash_bwd(on: bool) {
    FLASH_BWD.set(on);
}

/// Whether the flash kernels fetch the next key (or query) tile into registers while they
/// compute on the current one: fewer stalls on memory, more registers and so fewer warps per
/// SM. Off by default until the GPU check has compared the two (`ICEFM_FLASH_PREFETCH=1`).
pub fn flash_prefetch() -> bool {
    FLASH_PREFETCH.get()
}

/// Switch the flash kernels' prefetching on or off for the whole process.
pub fn set_flash_prefetch(on: bool) {
    FLASH_PREFETCH.set(on);
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

#[cfg(test)]
mod fast_math_tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * f64::from(i) / 200_000.0;
            let got = f64::from(exp_f32(x as f32));
            let want = f64::from(x as f32).exp();
            worst = worst.max((got - want).abs() / want);
        }
        // f32's unit roundoff is 6e-8.
        assert!(worst < 2.5e-7, "{worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-200.0) < 1e-37 && exp_f32(-200.0) >= 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn f32_normal_cdf_and_pdf_match_f64() {
        let (mut cdf_err, mut pdf_err) = (0f64, 0f64);
        for i in 0..=40_000 {
            let x = -10.0 + 20.0 * f64::from(i) / 40_000.0;
            let (c, p) = normal_cdf_pdf_f32(x as f32);
            let (cw, pw) = normal_cdf_pdf(f64::from(x as f32));
            cdf_err = cdf_err.max((f64::from(c) - cw).abs());
            pdf_err = pdf_err.max((f64::from(p) - pw).abs());
        }
        // A&S's 1.5e-7 on erf, halved, plus f32 rounding near 1 (one ulp is 1.2e-7).
        assert!(
            cdf_err < 3e-7 && pdf_err < 1e-7,
            "cdf {cdf_err}, pdf {pdf_err}"
        );
    }
}

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
