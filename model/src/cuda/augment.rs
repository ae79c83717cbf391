//! Normalisation and augmentation of raw training windows on the device.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{f32_view, wrap};

/// [`crate::fused::NormaliseAugment`] on the device: raw windows `[B, C, n, n]` and the
/// parameter vector → `[B, C + 1, n, n]`.
pub fn normalise_augment(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    (b, c, n): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let raw = f32_view(s1, l1, "raw windows")?;
    let prm = f32_view(s2, l2, "normalisation parameters")?;
    let total = b * (c + 1) * n * n;
    let int =
        |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg("batch too large".into()));
    let (b_i, c_i, n_i) = (int(b)?, int(c)?, int(n)?);
    let f = func(dev, "normalise_augment")?;
    // SAFETY: every element is written by the kernel (each pixel writes its C + 1 channels).
    let out = unsafe { dev.alloc::<f32>(total)? };
    let stream = dev.cuda_stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&raw)
        .arg(&prm)
        .arg(&out)
        .arg(&b_i)
        .arg(&c_i)
        .arg(&n_i);
    let tiles = u32::try_from(n.div_ceil(32))
        .map_err(|_| candle_core::Error::Msg("windows too large".into()))?;
    let samples = u32::try_from(b)
        .ok()
        .filter(|&s| s <= 65_535)
        .ok_or_else(|| candle_core::Error::Msg(format!("batch of {b}: at most 65,535")))?;
    let cfg = LaunchConfig {
        grid_dim: (tiles, tiles, samples),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel's signature; sizes were checked by the caller; one
    // block per 32 × 32 output tile of each sample, as the kernel expects.
    unsafe { lb.launch(cfg) }.w()?;
    Ok(wrap(dev, CudaStorageSlice::F32(out)))
}
