//! What the launchers share: typed views of storages, the element types (`f32`, `bf16`) and
//! dispatch over them, row and element-wise grids, kernel names and output storage.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

/// The contiguous part of `s` that `l` describes.
pub(super) fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("icefm kernels need contiguous input".into()))?;
    Ok(s.slice(a..b))
}

pub(super) fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(v) => view(v, l),
        _ => candle_core::bail!("{what} must be f32, got {:?}", s.dtype()),
    }
}

/// `base_SUFFIX`, or its register-resident variant `base_SUFFIX_{tag}`.
pub(super) fn kernel_name(base: &str, suffix: &str, variant: Option<String>) -> String {
    match variant {
        Some(v) => format!("{base}_{suffix}_{v}"),
        None => format!("{base}_{suffix}"),
    }
}

/// One warp per row, 8 rows per block.
pub(super) fn row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn dims(rows: usize, d: usize) -> Result<(i32, i32)> {
    let r = i32::try_from(rows).map_err(|_| candle_core::Error::Msg("too many rows".into()))?;
    let c = i32::try_from(d).map_err(|_| candle_core::Error::Msg("rows too long".into()))?;
    Ok((r, c))
}

/// Output storage of a dtype-generic row kernel.
pub(super) fn wrap(dev: &CudaDevice, slice: CudaStorageSlice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

/// Typed access to a storage slice.
pub(super) trait Elem: DeviceRepr + ValidAsZeroBits + Sized {
    const SUFFIX: &'static str;
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<Self>>;
    fn wrap(s: CudaSlice<Self>) -> CudaStorageSlice;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<f32>> {
        match s {
            CudaStorageSlice::F32(v) => Ok(v),
            _ => candle_core::bail!("icefm kernels: operands' dtypes differ (expected f32)"),
        }
    }
    fn wrap(s: CudaSlice<f32>) -> CudaStorageSlice {
        CudaStorageSlice::F32(s)
    }
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<half::bf16>> {
        match s {
            CudaStorageSlice::BF16(v) => Ok(v),
            _ => candle_core::bail!("icefm kernels: operands' dtypes differ (expected bf16)"),
        }
    }
    fn wrap(s: CudaSlice<half::bf16>) -> CudaStorageSlice {
        CudaStorageSlice::BF16(s)
    }
}

/// Run `f` with the element type of `s` (f32 or bf16).
macro_rules! with_elem {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match &$s.slice {
            CudaStorageSlice::F32(_) => $f::<f32>($($arg),*),
            CudaStorageSlice::BF16(_) => $f::<half::bf16>($($arg),*),
            _ => Err(candle_core::Error::Msg(format!(
                "icefm kernels take f32 or bf16, got {:?}",
                $s.dtype()
            ))),
        }
    };
}
pub(super) use with_elem;

pub(super) fn typed<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    view(T::slice(&s.slice)?, l)
}

/// Grid for an elementwise kernel over `n` values.
pub(super) fn elem_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
