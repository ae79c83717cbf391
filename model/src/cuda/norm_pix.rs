//! The per-patch masked norm-pix loss and its gradient.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{Elem, dims, kernel_name, row_cfg, typed, with_elem, wrap};

/// Values per lane of the register-resident norm-pix loss kernels (`None`: the general ones).
fn npx_values(p: usize) -> Option<usize> {
    let need = p.div_ceil(32);
    [4, 8, 12, 16, 24, 32].into_iter().find(|&v| v >= need)
}

/// Per-patch masked norm-pix loss `[rows]` of `[rows, p]` predictions, targets and weights.
#[allow(clippy::too_many_arguments)]
pub fn norm_pix_loss(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
) -> Result<CudaStorage> {
    npx_launch(s1, l1, s2, l2, s3, l3, rows, p, "norm_pix_loss", rows)
}

/// Gradient of [`norm_pix_loss`] for the predictions, `[rows, p]`; `s3` holds `[rows, p + 1]`
/// weights followed by each patch's incoming gradient.
#[allow(clippy::too_many_arguments)]
pub fn norm_pix_loss_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
) -> Result<CudaStorage> {
    npx_launch(
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        rows,
        p,
        "norm_pix_loss_grad",
        rows * p,
    )
}

#[allow(clippy::too_many_arguments)]
fn npx_launch(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
    kernel: &str,
    out_len: usize,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        rows: usize,
        p: usize,
        kernel: &str,
        out_len: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let pred = typed::<T>(s1, l1)?;
        let t = typed::<T>(s2, l2)?;
        let w = typed::<T>(s3, l3)?;
        let (r, c) = dims(rows, p)?;
        let variant = npx_values(p).map(|v| format!("v{v}"));
        let f = func(dev, &kernel_name(kernel, T::SUFFIX, variant))?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&pred).arg(&t).arg(&w).arg(&out).arg(&r).arg(&c);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(out))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, p, kernel, out_len))?;
    Ok(wrap(&s1.device, slice))
}
