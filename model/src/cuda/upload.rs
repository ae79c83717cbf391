//! Host-device transfers that do not stall the device: batches uploaded through page-locked
//! buffers on a copy stream of their own, and small results read back into page-locked memory.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, CudaStorage, Result, Tensor};

/// Host-to-device copies of training batches that overlap the step running on the device.
///
/// Each upload copies the host data into a page-locked buffer (a fast host copy), then queues
/// the transfer on a stream of the uploader's own into a device staging buffer, and on the
/// device's stream a wait for that transfer and a device-to-device copy into a fresh tensor.
/// It returns at once: issued while a step is queued, the transfer runs beside the step's
/// kernels. Two slots alternate, so the batch of step s + 1 is copied while step s still reads
/// its own; a slot is reused only after the device's copy out of it (an event) and the
/// transfer out of its page-locked buffer (cudarc's event on that buffer) are done.
pub struct Uploader<T: Upload = f32> {
    dev: CudaDevice,
    copy: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    slots: [Option<Slot<T>>; 2],
    next: usize,
}

/// Element types an [`Uploader`] carries: f32 (images), u32 (token indices), u8 (labels).
pub trait Upload:
    candle_core::cuda_backend::cudarc::driver::DeviceRepr
    + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
    + candle_core::cuda_backend::CudaDType
    + Copy
{
}
impl Upload for f32 {}
impl Upload for u32 {}
impl Upload for u8 {}

struct Slot<T> {
    pinned: candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<T>,
    staging: CudaSlice<T>,
    /// Recorded on the device's stream after its copy out of `staging`.
    released: candle_core::cuda_backend::cudarc::driver::CudaEvent,
}

impl<T: Upload> Uploader<T> {
    /// An uploader for `dev` (creates its copy stream).
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let copy = dev.cuda_stream().context().new_stream().w()?;
        Ok(Self {
            dev: dev.clone(),
            copy,
            slots: [None, None],
            next: 0,
        })
    }

    /// `data` as a tensor of `shape` on the device; the copy is queued, not waited for
    /// (work queued on the device afterwards sees the data).
    pub fn upload(&mut self, data: &[T], shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            candle_core::bail!(
                "upload: {} values for shape {shape:?} ({} elements)",
                data.len(),
                shape.elem_count()
            );
        }
        let n = data.len();
        let compute = self.dev.cuda_stream();
        let i = self.next;
        self.next = 1 - i;
        if self.slots[i].as_ref().is_none_or(|s| s.staging.len() != n) {
            // A batch of another size (a short last batch): new buffers for this slot, after
            // the old ones are out of use.
            if let Some(old) = self.slots[i].take() {
                old.released.synchronize().w()?;
            }
            let ctx = compute.context();
            // SAFETY: both buffers are written (the host copy below, then the transfer)
            // before anything reads them.
            let pinned = unsafe { ctx.alloc_pinned::<T>(n) }.w()?;
            // SAFETY: as above.
            let staging = unsafe { self.copy.alloc::<T>(n) }.w()?;
            let released = compute.record_event(None).w()?;
            self.slots[i] = Some(Slot {
                pinned,
                staging,
                released,
            });
        }
        let Some(slot) = self.slots[i].as_mut() else {
            candle_core::bail!("upload: slot {i} missing");
        };
        // Waits for this buffer's previous transfer (two uploads ago) before writing it.
        slot.pinned.as_mut_slice().w()?.copy_from_slice(data);
        // The staging buffer is free once the device has copied the previous batch out of it.
        self.copy.wait(&slot.released).w()?;
        self.copy.memcpy_htod(&slot.pinned, &mut slot.staging).w()?;
        let copied = self.copy.record_event(None).w()?;
        compute.wait(&copied).w()?;
        // SAFETY: the copy below writes all `n` values before any use.
        let mut out = unsafe { compute.alloc::<T>(n) }.w()?;
        compute.memcpy_dtod(&slot.staging, &mut out).w()?;
        slot.released.record(&compute).w()?;
        let storage = CudaStorage::wrap_cuda_slice(out, self.dev.clone());
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

impl<T: Upload> Drop for Uploader<T> {
    fn drop(&mut self) {
        // The slots' buffers are freed on the copy stream: let both streams finish with them.
        let _ = self.dev.cuda_stream().synchronize();
        let _ = self.copy.synchronize();
    }
}

/// A small tensor's values on their way to the host: the copy is queued on the device's
/// stream into page-locked memory, and [`Readback::finish`] waits for that copy only, not for
/// the work queued after it. A training loop reads a step's loss and gradient norm this way
/// once the next step is queued, so the device never waits for the host between steps.
pub struct Readback {
    pinned: candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>,
    n: usize,
    done: DeviceMark,
}

/// A point in a CUDA device's stream, timed: the moment the device reached the work queued
/// before it. Two marks give the device time between them, whatever the host did meanwhile.
pub struct DeviceMark(candle_core::cuda_backend::cudarc::driver::CudaEvent);

impl DeviceMark {
    /// A mark behind the work queued so far on `dev`'s stream.
    pub fn record(dev: &CudaDevice) -> Result<Self> {
        let flags = candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        Ok(Self(dev.cuda_stream().record_event(Some(flags)).w()?))
    }

    /// Seconds of device time from this mark to `end` (waits for both).
    pub fn secs_to(&self, end: &DeviceMark) -> Result<f64> {
        Ok(f64::from(self.0.elapsed_ms(&end.0).w()?) / 1e3)
    }
}

impl Readback {
    /// Queue the copy of `t` (any shape; its values as f32) to the host.
    pub fn start(t: &Tensor) -> Result<Self> {
        let dev = t.device().as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        let t = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .contiguous()?;
        let n = t.elem_count();
        let mut pinned = spare_pinned(&stream, n.max(1))?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("readback: the tensor is not on the CUDA device");
        };
        let at = layout.start_offset();
        let src = cs.as_cuda_slice::<f32>()?.slice(at..at + n);
        // The source is freed in stream order after the copy (cudarc's stream-ordered frees).
        stream.memcpy_dtoh(&src, &mut pinned).w()?;
        let done = DeviceMark::record(&dev)?;
        Ok(Self { pinned, n, done })
    }

    /// The values, once their copy is done, and the mark of that moment on the device.
    pub fn finish(self) -> Result<(Vec<f32>, DeviceMark)> {
        let values = self.pinned.as_slice().w()?[..self.n].to_vec();
        let mut spare = SPARE_PINNED.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < 8 {
            spare.push(self.pinned);
        }
        Ok((values, self.done))
    }
}

/// Page-locked buffers of finished [`Readback`]s, for the next ones: allocating or freeing
/// page-locked memory makes the driver wait for the device, which a readback every step must
/// not (a few are kept; a run needs two at a time).
static SPARE_PINNED: std::sync::Mutex<
    Vec<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>>,
> = std::sync::Mutex::new(Vec::new());

/// A page-locked buffer of `n` f32 in `stream`'s context: a spare one, or a new one (cached,
/// not write-combined, memory: the host reads it).
fn spare_pinned(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    n: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>> {
    let ctx = stream.context();
    let mut spare = SPARE_PINNED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = spare
        .iter()
        .position(|p| p.len() == n && std::sync::Arc::ptr_eq(p.context(), ctx))
    {
        return Ok(spare.swap_remove(i));
    }
    drop(spare);
    // SAFETY: the readback's copy writes all `n` values before `finish` reads them.
    unsafe { ctx.alloc_pinned_with_flags::<f32>(n, 0) }.w()
}
