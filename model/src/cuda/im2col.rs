//! The 3 × 3 im2col of the segmentation head's convolutions, and its adjoint.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{Elem, elem_cfg, typed, with_elem, wrap};

/// [`crate::seg::Im2col3`] on the device (`adjoint` false: `[B, H, W, C]` → `[B, H, W, 9·C]`,
/// the taps point-reflected where `mirrored`) and its backward (`adjoint` true:
/// `[B, H, W, 9·C]` → `[B, H, W, C]`); `(b, h, w, c)` are the map's dimensions.
pub fn im2col3(
    s: &CudaStorage,
    l: &Layout,
    (b, h, w, c): (usize, usize, usize, usize),
    op: crate::seg::Im2col3,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s: &CudaStorage,
        l: &Layout,
        (b, h, w, c): (usize, usize, usize, usize),
        op: crate::seg::Im2col3,
    ) -> Result<CudaStorageSlice> {
        let adjoint = op.adjoint;
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg("map too large".into()))
        };
        let dims = (int(b)?, int(h)?, int(w)?, int(c)?);
        let n = b * h * w * c * if adjoint { 1 } else { 9 };
        let name = if adjoint { "col2im3" } else { "im2col3" };
        let f = func(dev, &format!("{name}_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(&y)
            .arg(&dims.0)
            .arg(&dims.1)
            .arg(&dims.2)
            .arg(&dims.3);
        let mirror = i32::from(op.mirrored);
        if !adjoint {
            lb.arg(&mirror);
        }
        // SAFETY: arguments match the kernel's signature (`mirror` for im2col3 only).
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s, go(s, l, (b, h, w, c), op))?;
    Ok(wrap(&s.device, slice))
}
