//! The per-patch masked norm-pix loss and its gradient.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{Elem, dims, kernel_name, row_cfg, typed, with_elem, wrap};

/// Values per lane of the register-resident norm-pix loss kernels (`None`: the general ones).
fn npx_values(p: usize) -> Option<usize> {
    let need = p.div_ceil(32);
    [4, 8, 12, 16, 24, 32].into_iter().find(|&v| v >= need)
}

/// The kernel for rows of `p`: `base_SUFFIX`, or its register-resident variant.
fn npx_func<T: Elem>(dev: &candle_core::CudaDevice, base: &str, p: usize) -> Result<CudaFunction> {
    let variant = npx_values(p).map(|v| format!("v{v}"));
    func(dev, &kernel_name(base, T::SUFFIX, variant))
}

/// Per-patch masked norm-pix loss `[rows]` of `[rows, p]` predictions, targets and weights,
/// and `[rows, 2]`: each patch's baseline (the loss of predicting 0) and 1 if it counts.
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
) -> Result<(CudaStorage, CudaStorage)> {
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
    ) -> Result<(CudaStorageSlice, CudaStorageSlice)> {
        let dev = &s1.device;
        let (pred, t, w) = (
            typed::<T>(s1, l1)?,
            typed::<T>(s2, l2)?,
            typed::<T>(s3, l3)?,
        );
        let (r, c) = dims(rows, p)?;
        let f = npx_func::<T>(dev, "norm_pix_loss", p)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows)? };
        // SAFETY: as `out`.
        let aux = unsafe { dev.alloc::<T>(2 * rows)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&pred)
            .arg(&t)
            .arg(&w)
            .arg(&out)
            .arg(&aux)
            .arg(&r)
            .arg(&c);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok((T::wrap(out), T::wrap(aux)))
    }
    let (out, aux) = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, p))?;
    Ok((wrap(&s1.device, out), wrap(&s1.device, aux)))
}

/// Gradient of [`norm_pix_loss`] for the predictions, `[rows, p]`, given each patch's incoming
/// gradient `g` (`[rows]`, in `sg`).
#[allow(clippy::too_many_arguments)]
pub fn norm_pix_loss_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    rows: usize,
    p: usize,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
        rows: usize,
        p: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let (pred, t, w) = (
            typed::<T>(s1, l1)?,
            typed::<T>(s2, l2)?,
            typed::<T>(s3, l3)?,
        );
        let g = typed::<T>(sg, lg)?;
        let (r, c) = dims(rows, p)?;
        let f = npx_func::<T>(dev, "norm_pix_loss_grad", p)?;
        // SAFETY: every element is written by the kernel.
        let dp = unsafe { dev.alloc::<T>(rows * p)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&pred)
            .arg(&t)
            .arg(&w)
            .arg(&g)
            .arg(&dp)
            .arg(&r)
            .arg(&c);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(dp))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, sg, lg, rows, p))?;
    Ok(wrap(&s1.device, slice))
}
