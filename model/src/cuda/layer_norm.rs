//! Layer norm forward and backward: the register-resident, wide-access and general kernels and
//! their launch configurations.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

use super::func;
use super::launch::{Elem, dims, f32_view, kernel_name, row_cfg, typed, with_elem, wrap};
use crate::memo::Memo;

/// Pairs per lane of the register-resident layer-norm kernels for rows of `d` values starting
/// at element `offset` (`None`: the general kernel).
fn ln_pairs(d: usize, offset: usize) -> Option<usize> {
    let p = d / 64;
    (d.is_multiple_of(64) && offset.is_multiple_of(2) && [3, 4, 6, 8, 12, 16, 20].contains(&p))
        .then_some(p)
}

/// 16-byte loads per lane of the bf16 layer-norm kernels with wide accesses (`ln_*_bf16_q{Q}`),
/// where they are switched on (`fused::ln_v8`) and apply: bf16 rows of 512 to 1280 values in
/// steps of 256, the bf16 operands (`halves`) at multiples of 8 elements, the f32 ones
/// (`floats`) at multiples of 4.
fn ln_quads<T: Elem>(d: usize, halves: &[&Layout], floats: &[&Layout]) -> Option<usize> {
    let q = d / 256;
    (crate::fused::ln_v8()
        && T::SUFFIX == "bf16"
        && d.is_multiple_of(256)
        && (2..=5).contains(&q)
        && halves.iter().all(|l| l.start_offset().is_multiple_of(8))
        && floats.iter().all(|l| l.start_offset().is_multiple_of(4)))
    .then_some(q)
}

/// A layer-norm kernel `base` and its launch: the wide-access one where [`ln_quads`] allows,
/// else the register-resident one (`pairs`) or the general one, a warp per row.
fn ln_kernel<T: Elem>(
    dev: &CudaDevice,
    base: &str,
    pairs: Option<String>,
    (rows, d): (usize, usize),
    halves: &[&Layout],
    floats: &[&Layout],
) -> Result<(CudaFunction, LaunchConfig)> {
    Ok(match ln_quads::<T>(d, halves, floats) {
        Some(q) => {
            let name = format!("{base}_bf16_q{q}");
            let f = func(dev, &name)?;
            let cfg = persistent_row_cfg(dev, &f, &name, rows, 0)?;
            (f, cfg)
        }
        None => (
            func(dev, &kernel_name(base, T::SUFFIX, pairs))?,
            row_cfg(rows),
        ),
    })
}

/// Blocks of 256 threads (8 warps) and `shared` bytes of dynamic shared memory for kernel
/// `name` (`f`), whose warps stride over `rows` rows: as many as are resident on the device at
/// once (asked of the driver once per kernel and device), and no more than the rows need.
fn persistent_row_cfg(
    dev: &CudaDevice,
    f: &CudaFunction,
    name: &str,
    rows: usize,
    shared: usize,
) -> Result<LaunchConfig> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    static RESIDENT: Memo<(DeviceId, String), usize> = Memo::new();
    let resident = RESIDENT.get_or_make((dev.id(), name.to_string()), || {
        let sms = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(256, shared, None)
            .w()?;
        Ok(sms.max(1) as usize * per_sm.max(1) as usize)
    })?;
    let blocks = resident.min(rows.div_ceil(8).max(1));
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: shared as u32,
    })
}

/// Fused layer-norm forward.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
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
        d: usize,
        eps: f32,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let w = f32_view(s2, l2, "layer norm weight")?;
        let b = f32_view(s3, l3, "layer norm bias")?;
        let (r, c) = dims(rows, d)?;
        let aligned = l2.start_offset().is_multiple_of(2) && l3.start_offset().is_multiple_of(2);
        let pairs = ln_pairs(d, l1.start_offset())
            .filter(|_| aligned)
            .map(|p| format!("p{p}"));
        let (f, cfg) = ln_kernel::<T>(dev, "ln_fwd", pairs, (rows, d), &[l1], &[l2, l3])?;
        // SAFETY: every element is written by the kernel before it is read.
        let y = unsafe { dev.alloc::<T>(rows * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&w).arg(&b).arg(&y).arg(&r).arg(&c).arg(&eps);
        // SAFETY: arguments match the kernel's signature; sizes are rows × d.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, d, eps))?;
    Ok(wrap(&s1.device, slice))
}

/// Fused layer-norm backward, one pass over `x` (`s1`) and `dy` (`s3`) with the f32 weight
/// (`s2`): `dx` in `x`'s dtype, and `[2, P, d]` f32 partial sums over `P` blocks of rows of
/// `dy · x̂` (the scale's gradient) and `dy` (the shift's), with `P`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaStorage, CudaStorage, usize)> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<(CudaStorageSlice, CudaSlice<f32>, usize)> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let w = f32_view(s2, l2, "layer norm weight")?;
        let dy = typed::<T>(s3, l3)?;
        let (r, c) = dims(rows, d)?;
        let shared = 2 * d * 4;
        // The wide-access backward exists up to 4 loads per lane (kernels.cu: it spills at 5).
        let (f, cfg) = match ln_quads::<T>(d, &[l1, l3], &[l2]).filter(|&q| q <= 4) {
            Some(q) => {
                let name = format!("ln_grad_bf16_q{q}");
                let f = func(dev, &name)?;
                let cfg = persistent_row_cfg(dev, &f, &name, rows, shared)?;
                (f, cfg)
            }
            None => {
                let pairs = (ln_pairs(d, l1.start_offset()).is_some()
                    && l2.start_offset().is_multiple_of(2)
                    && l3.start_offset().is_multiple_of(2))
                .then(|| ln_pairs(d, 0))
                .flatten()
                .map(|p| format!("p{p}"));
                let f = func(dev, &kernel_name("ln_grad", T::SUFFIX, pairs))?;
                let cfg = LaunchConfig {
                    grid_dim: (crate::fused::ln_grad_blocks(rows) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: shared as u32,
                };
                (f, cfg)
            }
        };
        let p = cfg.grid_dim.0 as usize;
        let rpb =
            i32::try_from(rows.div_ceil(p)).map_err(|_| candle_core::Error::Msg("rows".into()))?;
        // SAFETY: every element of both is written by the kernel (each block writes its whole
        // slice of the partial sums).
        let dx = unsafe { dev.alloc::<T>(rows * d)? };
        let parts = unsafe { dev.alloc::<f32>(2 * p * d)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(&w)
            .arg(&dy)
            .arg(&dx)
            .arg(&parts)
            .arg(&r)
            .arg(&c)
            .arg(&eps)
            .arg(&rpb);
        // SAFETY: arguments match the kernel's signature; shared memory is 2·d floats, under
        // 48 KiB for d ≤ 6144.
        unsafe { lb.launch(cfg) }.w()?;
        Ok((T::wrap(dx), parts, p))
    }
    if d > 6144 {
        candle_core::bail!("fused layer norm backward: rows of {d} values are over 6144");
    }
    let dev = &s1.device;
    let (dx, parts, p) = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, d, eps))?;
    Ok((wrap(dev, dx), wrap(dev, CudaStorageSlice::F32(parts)), p))
}
