//! The fused AdamW step over all parameters in one launch, and the gradients' sum of squares
//! (for clipping) it reads.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, Result, Tensor};

use super::func;

/// Sum of squares of many contiguous f32 tensors on one CUDA device, in one launch (the
/// global gradient norm of clipping, with one read back).
pub fn sum_squares(tensors: &[&Tensor]) -> Result<f64> {
    match sum_squares_on_device(tensors)? {
        Some(t) => t
            .to_vec1::<f64>()
            .map(|v| v.first().copied().unwrap_or(0.0)),
        None => Ok(0.0),
    }
}

/// [`sum_squares`] left on the device: an f64 tensor `[1]`, which [`adamw_step`] reads for
/// clipping without a read back to the host (`None` for no tensors).
pub fn sum_squares_on_device(tensors: &[&Tensor]) -> Result<Option<Tensor>> {
    let Some(first) = tensors.first() else {
        return Ok(None);
    };
    let dev = first.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    for t in tensors {
        if t.dtype() != candle_core::DType::F32 || !t.is_contiguous() {
            candle_core::bail!("sum_squares takes contiguous f32 tensors");
        }
    }
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut table = Vec::with_capacity(2 * tensors.len());
    let mut syncs = Vec::new();
    let mut largest = 0usize;
    for ((storage, layout), t) in guards.iter().zip(tensors) {
        let candle_core::Storage::Cuda(cs) = &**storage else {
            candle_core::bail!("sum_squares: a tensor is not on the CUDA device");
        };
        let (ptr, sync) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
        syncs.push(sync);
        table.push(ptr + (layout.start_offset() * 4) as u64);
        table.push(t.elem_count() as u64);
        largest = largest.max(t.elem_count());
    }
    let table_dev = dev.clone_htod(&table)?;
    let out = dev.alloc_zeros::<f64>(1)?;
    let cfg = LaunchConfig {
        grid_dim: (
            largest.div_ceil(256 * 8).clamp(1, 128) as u32,
            u32::try_from(tensors.len()).map_err(|_| candle_core::Error::Msg("tensors".into()))?,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = func(&dev, "sum_squares_multi")?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(&table_dev).arg(&out);
    // SAFETY: the table holds live device pointers (storages locked above) of `n` f32 each.
    unsafe { lb.launch(cfg) }.w()?;
    drop(syncs);
    drop(guards);
    Ok(Some(Tensor::from_storage(
        candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev)),
        1,
        candle_core::op::BackpropOp::none(),
        false,
    )))
}

/// One tensor of a fused AdamW step: weight, moments and gradient (all f32, contiguous, on
/// one CUDA device) and whether it is decayed.
pub struct AdamSlot<'a> {
    /// Weight, updated in place.
    pub w: &'a Tensor,
    /// First moment, updated in place.
    pub m: &'a Tensor,
    /// Second moment, updated in place.
    pub v: &'a Tensor,
    /// Gradient (read).
    pub g: &'a Tensor,
    /// Decoupled weight decay applies.
    pub decay: bool,
}

/// AdamW hyper-parameters of one step (`c1`, `c2` the bias corrections).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub b1: f32,
    /// Second-moment decay.
    pub b2: f32,
    /// `1 − b1^t`.
    pub c1: f32,
    /// `1 − b2^t`.
    pub c2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Weight decay.
    pub wd: f32,
    /// Gradient scale (clipping).
    pub gscale: f32,
}

/// Update every slot in place with one kernel launch. `clip`: the gradients' sum of squares
/// on the device ([`sum_squares_on_device`]) and the norm to clip to; the kernel then
/// computes the gradient scale itself and `h.gscale` is unused.
pub fn adamw_step(slots: &[AdamSlot<'_>], h: AdamStep, clip: Option<(&Tensor, f64)>) -> Result<()> {
    let Some(first) = slots.first() else {
        return Ok(());
    };
    let dev = first.w.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    for s in slots {
        for t in [s.w, s.m, s.v, s.g] {
            if t.dtype() != candle_core::DType::F32 || !t.is_contiguous() {
                candle_core::bail!("fused AdamW takes contiguous f32 tensors");
            }
            if t.elem_count() != s.w.elem_count() {
                candle_core::bail!("fused AdamW: moment or gradient size differs from weight");
            }
        }
    }
    // Hold every storage's read lock while its raw pointer is in use.
    let guards: Vec<_> = slots
        .iter()
        .map(|s| [s.w, s.m, s.v, s.g].map(|t| t.storage_and_layout()))
        .collect();
    let mut table: Vec<u64> = Vec::with_capacity(6 * slots.len());
    let mut syncs = Vec::new();
    let mut largest = 0usize;
    for (s, g) in slots.iter().zip(&guards) {
        for (storage, layout) in g {
            let candle_core::Storage::Cuda(cs) = &**storage else {
                candle_core::bail!("fused AdamW: a tensor is not on the CUDA device");
            };
            let slice = cs.as_cuda_slice::<f32>()?;
            let (ptr, sync) = slice.device_ptr(&stream);
            syncs.push(sync);
            table.push(ptr + (layout.start_offset() * 4) as u64);
        }
        let n = s.w.elem_count();
        largest = largest.max(n);
        table.push(n as u64);
        table.push(u64::from(s.decay));
    }
    // In-place updates need a buffer of their own per weight and moment.
    let mut seen = std::collections::HashSet::new();
    for e in table.chunks(6) {
        for &ptr in &e[..3] {
            if !seen.insert(ptr) {
                candle_core::bail!("fused AdamW: two weights or moments share one buffer");
            }
        }
    }
    let table_dev = dev.clone_htod(&table)?;
    let clip_guard = clip.map(|(t, _)| t.storage_and_layout());
    let (sumsq, max_norm, clip_sync) = match (&clip_guard, clip) {
        (Some((storage, layout)), Some((t, max_norm))) => {
            let candle_core::Storage::Cuda(cs) = &**storage else {
                candle_core::bail!("fused AdamW: the sum of squares is not on the CUDA device");
            };
            if t.dtype() != candle_core::DType::F64 || t.elem_count() != 1 {
                candle_core::bail!("fused AdamW: the sum of squares must be one f64");
            }
            let (ptr, sync) = cs.as_cuda_slice::<f64>()?.device_ptr(&stream);
            (
                ptr + (layout.start_offset() * 8) as u64,
                max_norm,
                Some(sync),
            )
        }
        _ => (0u64, 0.0, None),
    };
    let tensors = u32::try_from(slots.len())
        .map_err(|_| candle_core::Error::Msg("too many tensors".into()))?;
    let blocks = largest.div_ceil(256 * 4).clamp(1, 256) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, tensors, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = func(&dev, "adamw_multi")?;
    let stream = dev.cuda_stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&table_dev)
        .arg(&h.lr)
        .arg(&h.b1)
        .arg(&h.b2)
        .arg(&h.c1)
        .arg(&h.c2)
        .arg(&h.eps)
        .arg(&h.wd)
        .arg(&h.gscale)
        .arg(&sumsq)
        .arg(&max_norm);
    // SAFETY: the table holds live device pointers (their storages are locked above) of `n`
    // f32 values each; weights and moments are owned by the optimizer and its variables and
    // are not read by anything else while this stream runs the update. `sumsq` is 0 (null) or
    // one live f64, locked above.
    unsafe { lb.launch(cfg) }.w()?;
    drop(syncs);
    drop(clip_sync);
    drop(clip_guard);
    drop(guards);
    Ok(())
}
