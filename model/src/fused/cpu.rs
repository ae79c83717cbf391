//! Shared CPU helpers of the fused ops: contiguous storage access, f64 conversions, dispatch by
//! dtype, and parallel maps over rows and values.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use rayon::prelude::*;

use super::bias::{add_rows, column_blocks};

/// Rows and row length of a contiguous tensor.
pub(super) fn rows_cols(layout: &Layout) -> (usize, usize) {
    let dims = layout.dims();
    let d = dims.last().copied().unwrap_or(1).max(1);
    (layout.shape().elem_count() / d, d)
}

/// The contiguous element range of `layout`, or an error naming the op.
pub(super) fn span(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))
}

/// A CPU storage as f64 values over `layout` (contiguous).
pub(super) fn cpu_f64(s: &CpuStorage, layout: &Layout, op: &str) -> Result<Vec<f64>> {
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
pub(super) fn cpu_from_f64(v: Vec<f64>, dtype: DType) -> Result<CpuStorage> {
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
pub(super) use by_dtype;

/// The values of a contiguous CPU storage, in its own dtype (no copy).
pub(super) fn typed<'a, T: WithDType>(
    s: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let (a, b) = span(layout, op)?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Rows per rayon task (a few thousand values each).
pub(super) fn rows_per_task(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// `f(x, b)` for every element of the rows of `x` (`c` wide) and its column's `b`, rows split
/// into parallel tasks, each compiled for the CPU's widest vectors ([`RowsWithBias`]).
pub(super) fn map_rows_bias<X, B, Y>(
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
pub(super) fn map_rows_bias2<X, B, Y>(
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
pub(super) fn map_rows_bias2_sums<X, B, Y>(
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

/// `(x, f)` → `f(v)` for every value `v` of `x` in `T`, in parallel chunks.
pub(super) fn map_values<T: WithDType>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
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
pub(super) fn map_pairs<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
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
