//! Softmax over rows, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{Elem, dims, kernel_name, row_cfg, typed, with_elem, wrap};

/// Values per lane of the register-resident softmax kernels (`None`: the general kernel).
fn softmax_values(d: usize) -> Option<usize> {
    let need = d.div_ceil(32);
    [1, 2, 4, 5, 8, 12, 16, 19, 20, 24, 32]
        .into_iter()
        .find(|&v| v >= need)
}

/// Fused softmax forward over rows.
/// Fused softmax forward over rows, over their first `valid` values (the rest get 0).
pub fn softmax_fwd(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    d: usize,
    valid: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s: &CudaStorage,
        l: &Layout,
        rows: usize,
        d: usize,
        valid: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let (r, c) = dims(rows, d)?;
        let v = i32::try_from(valid.clamp(1, d))
            .map_err(|_| candle_core::Error::Msg("rows too long".into()))?;
        let f = func(
            dev,
            &kernel_name(
                "softmax_fwd",
                T::SUFFIX,
                softmax_values(d).map(|v| format!("v{v}")),
            ),
        )?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(rows * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&y).arg(&r).arg(&c).arg(&v);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s, go(s, l, rows, d, valid))?;
    Ok(wrap(&s.device, slice))
}

/// Fused softmax backward: `(y, dy) → dx`.
pub fn softmax_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    d: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        rows: usize,
        d: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let y = typed::<T>(s1, l1)?;
        let dy = typed::<T>(s2, l2)?;
        let (r, c) = dims(rows, d)?;
        let f = func(
            dev,
            &kernel_name(
                "softmax_grad",
                T::SUFFIX,
                softmax_values(d).map(|v| format!("v{v}")),
            ),
        )?;
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(rows * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&y).arg(&dy).arg(&dx).arg(&r).arg(&c);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(dx))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, rows, d))?;
    Ok(wrap(&s1.device, slice))
}
