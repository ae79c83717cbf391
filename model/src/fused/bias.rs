//! Bias add and linear layers ([`BiasAdd`], [`LinearBias`]), and the bias's gradient as partial
//! column sums ([`ColumnSums`]).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::activation::{bias_gelu, bias_gelu_fuses, gelu};
use super::cpu::{by_dtype, cpu_f64, cpu_from_f64, map_rows_bias, rows_cols, typed};
use super::layer_norm::row_blocks;
use super::{LT_BIAS, fused, gpu_route};

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
///
/// [`BiasGeluGrad`]: super::BiasGeluGrad
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
pub(super) fn add_rows<T: WithDType>(acc: &mut [f64], rows: &[T]) {
    for row in rows.chunks(acc.len().max(1)) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.to_f64();
        }
    }
}

/// f32 storage of partial sums (f64 where the input was f64).
pub(super) fn partial_sums_storage(sums: Vec<f64>, input: DType) -> Result<CpuStorage> {
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
