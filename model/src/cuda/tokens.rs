//! Token gather by index and its backward scatter.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{Elem, dims, typed, view, with_elem, wrap};

/// Token gather (`scatter` false: `[B, N, D]` → `[B, K, D]`) or its backward scatter
/// (`[B, K, D]` → `[B, N, D]`, zeros in the rows no index names) by `ids` `[B, K]` (u32,
/// distinct per sample). Both kernels write every output element once: no zero fill first.
pub fn move_tokens(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    (b, k, d): (usize, usize, usize),
    n: usize,
    scatter: bool,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        ids: &CudaView<'_, u32>,
        (b, k, d): (usize, usize, usize),
        n: usize,
        scatter: bool,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let rows_out = if scatter { n } else { k };
        // SAFETY: every element is written by the kernel (a scatter writes zeros where no
        // token lands).
        let out = unsafe { dev.alloc::<T>(b * rows_out * d)? };
        let (k_i, n_i) = dims(k, n)?;
        let d_i = i32::try_from(d).map_err(|_| candle_core::Error::Msg("width".into()))?;
        // 16-byte moves where every row starts 16-byte aligned (allocations are 256-byte
        // aligned; the input view may start further in).
        let size = std::mem::size_of::<T>();
        let vec = i32::from(
            (d * size).is_multiple_of(16) && (l1.start_offset() * size).is_multiple_of(16),
        );
        let kernel = if scatter {
            "scatter_tokens"
        } else {
            "gather_tokens"
        };
        let f = func(dev, &format!("{kernel}_{}", T::SUFFIX))?;
        let cfg = LaunchConfig {
            grid_dim: (rows_out.div_ceil(8) as u32, b as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(ids)
            .arg(&out)
            .arg(&k_i)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&vec);
        // SAFETY: arguments match the kernel's signature; the ids are below n (checked where
        // the index tensor is made); `vec` only with 16-byte aligned rows.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(T::wrap(out))
    }
    let ids = match &s2.slice {
        CudaStorageSlice::U32(v) => view(v, l2)?,
        _ => candle_core::bail!("token indices must be u32"),
    };
    if k == 0 || b == 0 {
        candle_core::bail!("move_tokens: no tokens");
    }
    let slice = with_elem!(s1, go(s1, l1, &ids, (b, k, d), n, scatter))?;
    Ok(wrap(&s1.device, slice))
}
