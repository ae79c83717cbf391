//! The device as icefm sets it up (cudarc's event tracking off) and measures it: free memory,
//! the memory pool's peak, copy bandwidth, and the PTX probe.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CudaDevice, Result};

use super::func;

/// Free and total device memory in bytes.
pub fn mem_info(dev: &CudaDevice) -> Result<(usize, usize)> {
    dev.cuda_stream().context().mem_get_info().w()
}

/// The device's default memory pool (where candle's stream-ordered allocations come from).
fn default_pool(
    dev: &CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("cuDeviceGetDefaultMemPool: {r:?}");
    }
    Ok(pool)
}

/// Reset the high-water mark of the device's memory pool (see [`pool_peak`]).
pub fn pool_peak_reset(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let mut zero: u64 = 0;
    // SAFETY: the attribute takes a u64 by pointer; `pool` is the device's default pool.
    let r = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("cuMemPoolSetAttribute: {r:?}");
    }
    Ok(())
}

/// The most memory of the device's pool in use at once since the last reset, in bytes (the
/// peak of candle's allocations; PyTorch's `max_memory_allocated` is the counterpart).
pub fn pool_peak(dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let mut v: u64 = 0;
    // SAFETY: the attribute is a u64 written through the pointer.
    let r = unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v as *mut u64).cast(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("cuMemPoolGetAttribute: {r:?}");
    }
    Ok(v)
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), copying `bytes` `reps`
/// times with the driver's copy: the ceiling memory-bound kernels are measured against.
pub fn copy_bandwidth(dev: &CudaDevice, bytes: usize, reps: usize) -> Result<f64> {
    let stream = dev.cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes).w()?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).w()?;
    stream.memcpy_dtod(&src, &mut dst).w()?;
    stream.synchronize().w()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        stream.memcpy_dtod(&src, &mut dst).w()?;
    }
    stream.synchronize().w()?;
    Ok(2.0 * (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// The words `ptx_probe` (kernels.cu) writes on this device: the flash kernels' inline-PTX
/// primitives (`ldmatrix`, `ldmatrix .trans`, the bf16 pair conversion, `ex2.approx.ftz`) on
/// known inputs, one warp, 320 words. Tests compare them with the PTX ISA's definitions.
pub fn ptx_probe(dev: &CudaDevice) -> Result<Vec<u32>> {
    let f = func(dev, "ptx_probe")?;
    let stream = dev.cuda_stream();
    let out = stream.alloc_zeros::<u32>(320).w()?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(&out);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one warp writes the 320 words of `out`, the kernel's only argument.
    unsafe { lb.launch(cfg) }.w()?;
    stream.clone_dtoh(&out).w()
}

/// CUDA device `ordinal` as icefm uses it: candle's device with cudarc's per-launch event
/// tracking turned off.
///
/// With tracking on (cudarc's default once a context has a stream of its own, as candle's
/// does), every kernel launch records and waits on two events per buffer argument, host-side
/// driver work that a step of thousands of small launches pays for nothing: candle queues all
/// its work, and icefm all its kernels, on the device's one stream, in order. The one other
/// stream icefm uses, [`Uploader`]'s, is ordered by explicit events. `ICEFM_CUDA_EVENT_TRACKING=1`
/// leaves tracking on (for comparisons).
///
/// [`Uploader`]: super::Uploader
pub fn device(ordinal: usize) -> Result<candle_core::Device> {
    let dev = candle_core::Device::new_cuda(ordinal)?;
    if !event_tracking_requested() {
        // SAFETY: all of candle's and icefm's kernels run on the device's single stream, in
        // order, so no buffer needs cross-stream events; the uploader's copy stream orders
        // its buffers with its own events.
        unsafe { dev.as_cuda_device()?.disable_event_tracking() };
    }
    Ok(dev)
}

/// Whether `ICEFM_CUDA_EVENT_TRACKING=1` asks [`device`] to leave cudarc's tracking on.
pub fn event_tracking_requested() -> bool {
    std::env::var("ICEFM_CUDA_EVENT_TRACKING").is_ok_and(|v| v == "1")
}
