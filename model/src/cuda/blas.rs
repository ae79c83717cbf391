//! Linear layers through cuBLASLt with the bias added in the product's epilogue.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::CudaBlasLT;
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

use super::bias_add;
use super::launch::{typed, wrap};
use crate::memo::Memo;

/// One cuBLASLt handle (with its 32 MiB workspace on Hopper) per device, made on first use.
fn blas_lt(dev: &CudaDevice) -> Result<std::sync::Arc<CudaBlasLT>> {
    static HANDLES: Memo<DeviceId, std::sync::Arc<CudaBlasLT>> = Memo::new();
    HANDLES.get_or_make(dev.id(), || {
        CudaBlasLT::new(dev.cuda_stream())
            .map(std::sync::Arc::new)
            .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))
    })
}

/// Byte offsets of a view into its allocation that cuBLASLt's default algorithm choice allows
/// (it assumes 256-byte aligned operands unless told otherwise).
fn lt_aligned(l: &Layout, elem_bytes: usize) -> bool {
    (l.start_offset() * elem_bytes).is_multiple_of(256)
}

/// [`crate::fused::LinearBias`] on the device: `x` `[m, k]` and `w` `[n, k]` (bf16, contiguous),
/// `b` `[n]` (f32) → `x · wᵀ + b` `[m, n]` bf16, the bias added in the matrix product's epilogue
/// (cuBLASLt `EPILOGUE_BIAS`, the bias cast to bf16 first) instead of a pass of its own. Operands
/// that are not 256-byte aligned take candle's product and [`bias_add`] instead.
#[allow(clippy::too_many_arguments)]
pub fn linear_bias(
    sx: &CudaStorage,
    lx: &Layout,
    sw: &CudaStorage,
    lw: &Layout,
    sb: &CudaStorage,
    lb: &Layout,
    (m, k, n): (usize, usize, usize),
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::cublaslt::{Matmul, MatmulConfig};
    let dev = &sx.device;
    if !(lt_aligned(lx, 2) && lt_aligned(lw, 2)) {
        let y = sx.matmul(sw, (1, m, n, k), lx, &lw.transpose(0, 1)?)?;
        return bias_add(&y, &Layout::contiguous((m, n)), sb, lb, m, n);
    }
    let x = typed::<half::bf16>(sx, lx)?;
    let w = typed::<half::bf16>(sw, lw)?;
    let b16 = sb.to_dtype(lb, candle_core::DType::BF16)?;
    let b = typed::<half::bf16>(&b16, &Layout::contiguous(n))?;
    let lt = blas_lt(dev)?;
    // Row-major y [m, n] = x [m, k] · wᵀ is column-major yᵀ [n, m] = (w as column-major [k, n])ᵀ
    // · (x as column-major [k, m]); the bias runs along yᵀ's rows, one value per output feature.
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: beta is 0, so the product writes every element of y and reads none.
    let mut y = unsafe { dev.alloc::<half::bf16>(m * n)? };
    // SAFETY: the shapes and leading dimensions above describe the three buffers exactly.
    unsafe { lt.matmul(cfg, &w, &x, &mut y, Some(&b), None) }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt matmul: {e:?}")))?;
    Ok(wrap(dev, CudaStorageSlice::BF16(y)))
}
