//! NCCL sums between the ranks of a data-parallel run, the library loaded at run time.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{CudaDevice, CudaStorage, Result, Tensor};

/// NCCL between the ranks of a data-parallel run ([`crate::dist`]): one communicator per
/// process, on candle's stream of its device, so that its sums queue behind the backward pass
/// without the host waiting. The library is loaded when first asked for (`libnccl.so.2`, as
/// PyTorch's wheel carries it, or `libnccl.so`), so a build with `cuda` runs without it.
pub struct Nccl {
    lib: &'static nccl_ffi::Lib,
    comm: *mut std::ffi::c_void,
}

// SAFETY: a communicator may be used from any thread, one call at a time; `Nccl` is used
// through `&self` by its one owner and is never shared.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Whether the NCCL library can be loaded (its directory on `LD_LIBRARY_PATH`;
    /// `scripts/gpu-env.sh` adds PyTorch's).
    pub fn available() -> bool {
        nccl_ffi::lib().is_ok()
    }

    /// A new unique id (rank 0 makes it and sends it to the others), as bytes.
    pub fn unique_id() -> Result<Vec<u8>> {
        let lib = nccl_ffi::lib()?;
        let mut id = nccl_ffi::UniqueId { internal: [0; 128] };
        // SAFETY: writes the 128-byte id it is given.
        lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// Rank `rank` of `world`'s communicator on `dev`, from rank 0's unique id. Every rank
    /// must call it (it waits for all of them).
    pub fn new(dev: &CudaDevice, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let lib = nccl_ffi::lib()?;
        let mut uid = nccl_ffi::UniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            candle_core::bail!("NCCL unique id of {} bytes, expected 128", id.len());
        }
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as std::ffi::c_char;
        }
        let (rank, world) = (
            i32::try_from(rank).map_err(|_| candle_core::Error::Msg("rank".into()))?,
            i32::try_from(world).map_err(|_| candle_core::Error::Msg("world".into()))?,
        );
        // NCCL takes the device of the thread's current context: candle's.
        dev.cuda_stream().context().bind_to_thread().w()?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is passed by value.
        lib.check(
            unsafe { (lib.comm_init_rank)(&mut comm, world, uid, rank) },
            "ncclCommInitRank",
        )?;
        Ok(Self { lib, comm })
    }

    /// The sum over the ranks of each rank's `t` (f32, on this communicator's device), queued
    /// on candle's stream; a new tensor of `t`'s shape.
    pub fn sum(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() != candle_core::DType::F32 {
            candle_core::bail!("NCCL sum of {:?}, expected f32", t.dtype());
        }
        let t = t.contiguous()?;
        let n = t.elem_count();
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("NCCL sum of a tensor that is not on a CUDA device");
        };
        let dev = cs.device().clone();
        let stream = dev.cuda_stream();
        let at = layout.start_offset();
        let src = cs.as_cuda_slice::<f32>()?.slice(at..at + n);
        let mut out = dev.alloc_zeros::<f32>(n)?;
        {
            let (src_ptr, _s) = src.device_ptr(&stream);
            let (out_ptr, _o) = out.device_ptr_mut(&stream);
            // SAFETY: both pointers hold `n` f32 on this communicator's device (kept alive and
            // ordered on `stream` by the guards); ncclFloat32 = 7, ncclSum = 0.
            self.lib.check(
                unsafe {
                    (self.lib.all_reduce)(
                        src_ptr as *const std::ffi::c_void,
                        out_ptr as *mut std::ffi::c_void,
                        n,
                        7,
                        0,
                        self.comm,
                        stream.cu_stream() as *mut std::ffi::c_void,
                    )
                },
                "ncclAllReduce",
            )?;
        }
        drop(storage);
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev)),
            t.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitRank and is not used after this.
        let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

/// The five NCCL functions icefm calls, loaded at run time with `dlopen`.
mod nccl_ffi {
    use std::ffi::{CStr, c_char, c_int, c_void};
    use std::sync::OnceLock;

    /// `ncclUniqueId`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct UniqueId {
        pub internal: [c_char; 128],
    }

    type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
    type CommInitRank = unsafe extern "C" fn(*mut *mut c_void, c_int, UniqueId, c_int) -> c_int;
    /// `ncclAllReduce(send, recv, count, datatype, op, comm, stream)`.
    type AllReduce = unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        *mut c_void,
        *mut c_void,
    ) -> c_int;
    type CommDestroy = unsafe extern "C" fn(*mut c_void) -> c_int;
    type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

    pub struct Lib {
        pub get_unique_id: GetUniqueId,
        pub comm_init_rank: CommInitRank,
        pub all_reduce: AllReduce,
        pub comm_destroy: CommDestroy,
        error_string: GetErrorString,
    }

    impl Lib {
        /// `code` of `what` as a result (0 is success).
        pub fn check(&self, code: c_int, what: &str) -> candle_core::Result<()> {
            if code == 0 {
                return Ok(());
            }
            // SAFETY: NCCL returns a static string for every code.
            let text = unsafe { CStr::from_ptr((self.error_string)(code)) };
            candle_core::bail!("{what}: NCCL error {code}: {}", text.to_string_lossy())
        }
    }

    /// The library, loaded once; an error saying what was tried when it cannot be.
    pub fn lib() -> candle_core::Result<&'static Lib> {
        static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
        LIB.get_or_init(load)
            .as_ref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    fn load() -> std::result::Result<Lib, String> {
        let names = [c"libnccl.so.2", c"libnccl.so"];
        // SAFETY: dlopen with a NUL-terminated name; the handle is kept for the process.
        let handle = names
            .iter()
            .map(|n| unsafe { libc::dlopen(n.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) })
            .find(|h| !h.is_null())
            .ok_or("NCCL: neither libnccl.so.2 nor libnccl.so is on the library path")?;
        let sym = |name: &CStr| -> std::result::Result<*mut c_void, String> {
            // SAFETY: looks a NUL-terminated name up in a loaded library.
            let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if p.is_null() {
                Err(format!(
                    "NCCL: the library has no {}",
                    name.to_string_lossy()
                ))
            } else {
                Ok(p)
            }
        };
        // SAFETY: each symbol is the NCCL function of that name, whose C signature the field's
        // type spells (nccl.h, NCCL 2.x).
        unsafe {
            Ok(Lib {
                get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueId>(sym(
                    c"ncclGetUniqueId",
                )?),
                comm_init_rank: std::mem::transmute::<*mut c_void, CommInitRank>(sym(
                    c"ncclCommInitRank",
                )?),
                all_reduce: std::mem::transmute::<*mut c_void, AllReduce>(sym(c"ncclAllReduce")?),
                comm_destroy: std::mem::transmute::<*mut c_void, CommDestroy>(sym(
                    c"ncclCommDestroy",
                )?),
                error_string: std::mem::transmute::<*mut c_void, GetErrorString>(sym(
                    c"ncclGetErrorString",
                )?),
            })
        }
    }
}
