//! The CPU emulator of icefm's CUDA kernels (`emu.cpp` beside this file, which includes
//! `model/src/kernels.cu`): compiled with the system's C++ compiler (`$CXX`, else `c++`) on first
//! use into the tests' scratch directory, loaded with `dlopen`, and driven from Rust: a kernel
//! is looked up by name as an `extern "C"` function and called from a closure that
//! [`Emulator::launch`] runs as every thread of the grid.
#![allow(dead_code, clippy::unwrap_used)]
#![allow(unsafe_code)] // dlopen, dlsym and the emulator's C interface; each block states its contract

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

type LaunchFn = unsafe extern "C" fn(
    grid: *const u32,
    block: *const u32,
    shared_bytes: usize,
    body: extern "C" fn(*mut c_void),
    ctx: *mut c_void,
    order: u64,
    err: *mut c_char,
    err_len: usize,
) -> i32;

/// The order in which a block's threads run between synchronisation points.
#[derive(Clone, Copy, Debug)]
pub enum Order {
    Forward,
    Reverse,
    /// A random order from this seed, drawn again for each block.
    Random(u64),
}

impl Order {
    fn code(self) -> u64 {
        match self {
            Order::Forward => 0,
            Order::Reverse => 1,
            Order::Random(s) => 2 + s,
        }
    }
}

/// The loaded emulator library.
pub struct Emulator {
    handle: *mut c_void,
    launch: LaunchFn,
}

// SAFETY: the library handle is only used for `dlsym`, which is thread-safe; the emulator keeps
// its per-launch state in thread-local storage, so launches from several threads do not meet.
unsafe impl Send for Emulator {}
// SAFETY: as above.
unsafe impl Sync for Emulator {}

/// The emulator, built and loaded once per test process.
pub fn emulator() -> &'static Emulator {
    static EMU: OnceLock<Emulator> = OnceLock::new();
    EMU.get_or_init(|| {
        let lib = build().unwrap_or_else(|e| panic!("building the kernel emulator: {e}"));
        let path = CString::new(lib.to_str().unwrap()).unwrap();
        // SAFETY: a path to a shared library this process just built; RTLD_NOW resolves it all.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(
            !handle.is_null(),
            "dlopen {}: {}",
            lib.display(),
            dl_error()
        );
        let sym = symbol(handle, "emu_launch").expect("emu_launch");
        // SAFETY: emu_launch's C signature is LaunchFn's (emu.cpp).
        let launch = unsafe { std::mem::transmute::<*mut c_void, LaunchFn>(sym) };
        Emulator { handle, launch }
    })
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a C string valid until the next dl call on this thread.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn symbol(handle: *mut c_void, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).unwrap();
    // SAFETY: a live handle and a NUL-terminated name.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// Compiles emu.cpp (and the kernels it includes) unless a library of the same sources is
/// there already; returns its path.
fn build() -> Result<PathBuf, String> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let emu = here.join("tests/emulator/emu.cpp");
    let kernels = here.join("src/kernels.cu");
    let mut text = String::new();
    for p in [&emu, &kernels] {
        text += &std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    // FNV-1a of the sources names the library, so an edited kernel is rebuilt.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-emulator");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let lib = dir.join(format!("emu-{hash:016x}.so"));
    if lib.exists() {
        return Ok(lib);
    }
    let partial = dir.join(format!("emu-{hash:016x}.{}.tmp", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++17",
            "-O2",
            "-fPIC",
            "-shared",
            "-fno-strict-aliasing",
        ])
        .args([
            "-Wall",
            "-Wno-unknown-pragmas",
            "-Wno-unused-function",
            "-o",
        ])
        .arg(&partial)
        .arg(&emu)
        .output()
        .map_err(|e| format!("running {cxx} (a C++17 compiler is needed): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cxx} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&partial, &lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    Ok(lib)
}

extern "C" fn trampoline(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `&&dyn Fn()` that `launch` passed, alive for the whole launch.
    let body = unsafe { &*(ctx as *const &dyn Fn()) };
    body();
}

impl Emulator {
    /// The kernel (or emulator function) `name` as a function pointer of type `F`.
    ///
    /// # Safety
    /// `F` must be an `unsafe extern "C" fn` type with the kernel's exact C signature, and the
    /// kernel may only be called inside [`Emulator::launch`]'s body.
    pub unsafe fn kernel<F: Copy>(&self, name: &str) -> F {
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        let p = symbol(self.handle, name).unwrap_or_else(|| panic!("no kernel {name}"));
        // SAFETY: the caller vouches for F; sizes checked above.
        unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) }
    }

    /// Runs `body` as every thread of a `grid` of `block`s (`shared_bytes` of dynamic shared
    /// memory), threads in `order` between synchronisation points.
    pub fn launch(
        &self,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: usize,
        order: Order,
        body: &dyn Fn(),
    ) -> Result<(), String> {
        let g = [grid.0, grid.1, grid.2];
        let b = [block.0, block.1, block.2];
        let mut err = vec![0 as c_char; 512];
        let ctx: *const &dyn Fn() = &body;
        // SAFETY: emu_launch only calls `trampoline` with `ctx` during this call; the arrays
        // and the error buffer outlive it.
        let rc = unsafe {
            (self.launch)(
                g.as_ptr(),
                b.as_ptr(),
                shared_bytes,
                trampoline,
                ctx as *mut c_void,
                order.code(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: emu_launch wrote a NUL-terminated message within the buffer.
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        }
    }
}

impl Emulator {
    /// Runs `f` and returns the worst `ldmatrix` bank conflict of the launches it made on this
    /// thread: the most rows of one 8 × 8 matrix that fall in the same four banks (1: none).
    pub fn ldmatrix_conflict(&self, f: impl FnOnce()) -> u32 {
        // SAFETY: the emulator's statistics functions take no arguments and touch only its
        // thread-local counters.
        let (reset, read): (unsafe extern "C" fn(), unsafe extern "C" fn() -> u32) = unsafe {
            (
                self.kernel("emu_stats_reset"),
                self.kernel("emu_stats_ldmatrix_conflict"),
            )
        };
        // SAFETY: as above.
        unsafe { reset() };
        f();
        // SAFETY: as above.
        unsafe { read() }
    }
}

/// Element types of kernel buffers, with the bit pattern their guard zones hold.
pub trait Elem: Copy + std::fmt::Debug {
    /// A NaN, so that a value read past either end of a buffer shows in the results.
    const GUARD: Self;
    fn bits(self) -> u64;
}
impl Elem for f32 {
    const GUARD: Self = f32::from_bits(0x7fc0_dead);
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
}
impl Elem for f64 {
    const GUARD: Self = f64::from_bits(0x7ff8_0000_dead_dead);
    fn bits(self) -> u64 {
        self.to_bits()
    }
}
impl Elem for u16 {
    const GUARD: Self = 0x7fde; // a bf16 NaN
    fn bits(self) -> u64 {
        u64::from(self)
    }
}
impl Elem for u32 {
    const GUARD: Self = 0x7fc0_dead;
    fn bits(self) -> u64 {
        u64::from(self)
    }
}

/// Guard elements on each side of a [`Buffer`].
const GUARD: usize = 256;

/// A kernel operand with NaN guard zones on both sides: reads past its ends put NaN into the
/// results, and [`Buffer::values`] fails if the kernel wrote into a guard zone. Outputs start
/// as NaN too, so an element the kernel never writes shows. Its first element is 256-byte
/// aligned, as a CUDA allocation's is.
pub struct Buffer<T: Elem> {
    data: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Elem> Buffer<T> {
    pub fn from(values: &[T]) -> Self {
        let mut b = Self::output(values.len());
        let start = b.start;
        b.data[start..start + values.len()].copy_from_slice(values);
        b
    }
    pub fn output(len: usize) -> Self {
        let size = std::mem::size_of::<T>();
        let data = vec![T::GUARD; len + 2 * GUARD + 256 / size];
        let misaligned = (data.as_ptr() as usize + GUARD * size) % 256;
        let start = GUARD + (256 - misaligned) % 256 / size;
        assert_eq!((data.as_ptr() as usize + start * size) % 256, 0);
        Self { data, start, len }
    }
    pub fn ptr(&self) -> *const T {
        self.data[self.start..].as_ptr()
    }
    pub fn mut_ptr(&mut self) -> *mut T {
        self.data[self.start..].as_mut_ptr()
    }
    /// The contents, after checking the guard zones are as they were.
    pub fn values(&self) -> &[T] {
        let (head, rest) = self.data.split_at(self.start);
        let tail = &rest[self.len..];
        for (side, zone) in [("before", head), ("after", tail)] {
            if let Some(i) = zone.iter().position(|v| v.bits() != T::GUARD.bits()) {
                panic!(
                    "a kernel wrote {side} its buffer of {} (guard element {i})",
                    self.len
                );
            }
        }
        &rest[..self.len]
    }
}
