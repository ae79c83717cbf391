//! icefm's own CUDA kernels (feature `cuda`): fused layer norm, softmax and their backward
//! passes, and a fused AdamW step over all parameters in one launch.
//!
//! The kernels are CUDA C compiled at run time by NVRTC for the device at hand (no toolkit is
//! needed to build icefm, only the NVRTC library at run time), once per process. They take
//! float or bf16 tensors (bf16 as raw 16-bit words, so no CUDA header is needed) and compute
//! in f32. Each has a CPU reference ([`crate::fused`], [`crate::optim`]); the tests in
//! `model/tests/cuda.rs` compare the two on random inputs.
#![allow(unsafe_code)] // kernel launches and raw device pointers, each commented

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::CudaBlasLT;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Tensor};

/// The kernels' source (CUDA C, compiled by NVRTC at first use; `model/tests/emulator`
/// also builds it for the CPU).
pub const SOURCE: &str = include_str!("kernels.cu");

use crate::memo::Memo;

/// The PTX for this process's device, compiled once.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let r = PTX.get_or_init(|| {
        let (major, minor) = dev
            .cuda_stream()
            .context()
            .compute_capability()
            .map_err(|e| e.to_string())?;
        let arch = match (major, minor) {
            (9, 0) => "compute_90",
            (8, 9) => "compute_89",
            (8, 6) => "compute_86",
            (8, 0) => "compute_80",
            (10, 0) => "compute_100",
            (12, 0) => "compute_120",
            _ => "compute_80",
        };
        let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ..Default::default()
        };
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling icefm's CUDA kernels: {e}"))
    });
    r.as_deref().map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, "icefm_kernels", ptx(dev)?)?
        .into_cuda_function())
}

/// The contiguous part of `s` that `l` describes.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("icefm kernels need contiguous input".into()))?;
    Ok(s.slice(a..b))
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(v) => view(v, l),
        _ => candle_core::bail!("{what} must be f32, got {:?}", s.dtype()),
    }
}

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

/// Values per lane of the register-resident softmax kernels (`None`: the general kernel).
fn softmax_values(d: usize) -> Option<usize> {
    let need = d.div_ceil(32);
    [1, 2, 4, 5, 8, 12, 16, 19, 20, 24, 32]
        .into_iter()
        .find(|&v| v >= need)
}

/// Values per lane of the register-resident norm-pix loss kernels (`None`: the general ones).
fn npx_values(p: usize) -> Option<usize> {
    let need = p.div_ceil(32);
    [4, 8, 12, 16, 24, 32].into_iter().find(|&v| v >= need)
}

/// `base_SUFFIX`, or its register-resident variant `base_SUFFIX_{tag}`.
fn kernel_name(base: &str, suffix: &str, variant: Option<String>) -> String {
    match variant {
        Some(v) => format!("{base}_{suffix}_{v}"),
        None => format!("{base}_{suffix}"),
    }
}

/// One warp per row, 8 rows per block.
fn row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dims(rows: usize, d: usize) -> Result<(i32, i32)> {
    let r = i32::try_from(rows).map_err(|_| candle_core::Error::Msg("too many rows".into()))?;
    let c = i32::try_from(d).map_err(|_| candle_core::Error::Msg("rows too long".into()))?;
    Ok((r, c))
}

/// Output storage of a dtype-generic row kernel.
fn wrap(dev: &CudaDevice, slice: CudaStorageSlice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

/// Typed access to a storage slice.
trait Elem: DeviceRepr + ValidAsZeroBits + Sized {
    const SUFFIX: &'static str;
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<Self>>;
    fn wrap(s: CudaSlice<Self>) -> CudaStorageSlice;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<f32>> {
        match s {
            CudaStorageSlice::F32(v) => Ok(v),
            _ => candle_core::bail!("icefm kernels: operands' dtypes differ (expected f32)"),
        }
    }
    fn wrap(s: CudaSlice<f32>) -> CudaStorageSlice {
        CudaStorageSlice::F32(s)
    }
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn slice(s: &CudaStorageSlice) -> Result<&CudaSlice<half::bf16>> {
        match s {
            CudaStorageSlice::BF16(v) => Ok(v),
            _ => candle_core::bail!("icefm kernels: operands' dtypes differ (expected bf16)"),
        }
    }
    fn wrap(s: CudaSlice<half::bf16>) -> CudaStorageSlice {
        CudaStorageSlice::BF16(s)
    }
}

/// Run `f` with the element type of `s` (f32 or bf16).
macro_rules! with_elem {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match &$s.slice {
            CudaStorageSlice::F32(_) => $f::<f32>($($arg),*),
            CudaStorageSlice::BF16(_) => $f::<half::bf16>($($arg),*),
            _ => Err(candle_core::Error::Msg(format!(
                "icefm kernels take f32 or bf16, got {:?}",
                $s.dtype()
            ))),
        }
    };
}

fn typed<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    view(T::slice(&s.slice)?, l)
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

/// Grid for an elementwise kernel over `n` values.
fn elem_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fused bias add over rows of `c`.
pub fn bias_add(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    c: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        rows: usize,
        c: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let b = f32_view(s2, l2, "bias")?;
        let n = rows * c;
        let (n_i, c_i) = (
            n as i64,
            i32::try_from(c).map_err(|_| candle_core::Error::Msg("rows too long".into()))?,
        );
        let f = func(dev, &format!("bias_add_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&b).arg(&y).arg(&n_i).arg(&c_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, rows, c))?;
    Ok(wrap(&s1.device, slice))
}

/// Partial column sums `[P, c]` (f32) of `[rows, c]`, and `P`.
pub fn column_sums(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    c: usize,
) -> Result<(CudaStorage, usize)> {
    fn go<T: Elem>(
        s: &CudaStorage,
        l: &Layout,
        rows: usize,
        c: usize,
        out: &CudaSlice<f32>,
        p: usize,
    ) -> Result<()> {
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let (r, c_i) = dims(rows, c)?;
        let rpb =
            i32::try_from(rows.div_ceil(p)).map_err(|_| candle_core::Error::Msg("rows".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(32) as u32, p as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = func(dev, &format!("column_sums_{}", T::SUFFIX))?;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(out).arg(&r).arg(&c_i).arg(&rpb);
        // SAFETY: arguments match the kernel's signature; the grid covers every (P, c) output.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(())
    }
    let dev = &s.device;
    let p = crate::fused::column_blocks(rows);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(p * c)? };
    with_elem!(s, go(s, l, rows, c, &out, p))?;
    Ok((wrap(dev, CudaStorageSlice::F32(out)), p))
}

/// Fused GELU forward.
pub fn gelu_fwd(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    map1("gelu_fwd", s, l)
}

/// Fused GELU backward: `(x, dy) → dx`.
pub fn gelu_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    map2("gelu_grad", s1, l1, s2, l2)
}

/// ReLU forward (NaN passes through, as in PyTorch).
pub fn relu_fwd(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    map1("relu_fwd", s, l)
}

/// ReLU backward from the forward's output: `(y, dy) → dy where y > 0, else 0`.
pub fn relu_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    map2("relu_grad", s1, l1, s2, l2)
}

/// One element-wise kernel `{name}_{f32,bf16}(x, y, n)` over a contiguous `s`.
fn map1(name: &str, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    fn go<T: Elem>(name: &str, s: &CudaStorage, l: &Layout) -> Result<CudaStorageSlice> {
        let dev = &s.device;
        let x = typed::<T>(s, l)?;
        let n = l.shape().elem_count();
        let n_i = n as i64;
        let f = func(dev, &format!("{name}_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&y).arg(&n_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s, go(name, s, l))?;
    Ok(wrap(&s.device, slice))
}

/// One element-wise kernel `{name}_{f32,bf16}(a, b, out, n)` over two contiguous operands of
/// one shape and dtype.
fn map2(
    name: &str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        name: &str,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let a = typed::<T>(s1, l1)?;
        let b = typed::<T>(s2, l2)?;
        let n = l1.shape().elem_count();
        let n_i = n as i64;
        let f = func(dev, &format!("{name}_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&a).arg(&b).arg(&out).arg(&n_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(elem_cfg(n)) }.w()?;
        Ok(T::wrap(out))
    }
    let slice = with_elem!(s1, go(name, s1, l1, s2, l2))?;
    Ok(wrap(&s1.device, slice))
}

/// Grid of the row × column element kernels: 256 columns (or column pairs) per block, blocks
/// over rows in turn.
fn rowcol_cfg(rows: usize, c: usize, pairs: bool) -> LaunchConfig {
    let per_thread = if pairs { 2 } else { 1 };
    LaunchConfig {
        grid_dim: (
            c.div_ceil(256 * per_thread).clamp(1, 65535) as u32,
            rows.clamp(1, 8192) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fused `gelu(x + b)` over rows of `c` (`b` f32).
pub fn bias_gelu_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    c: usize,
) -> Result<CudaStorage> {
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        rows: usize,
        c: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let b = f32_view(s2, l2, "bias")?;
        let (r, c_i) = dims(rows, c)?;
        let f = func(dev, &format!("bias_gelu_fwd_{}", T::SUFFIX))?;
        let pairs = c.is_multiple_of(2) && l1.start_offset().is_multiple_of(2);
        let pairs_i = i32::from(pairs);
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(rows * c)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&b).arg(&y).arg(&r).arg(&c_i).arg(&pairs_i);
        // SAFETY: arguments match the kernel's signature; the grid strides over every row;
        // pairs only where every row of x and y starts at an even element (8- or 4-byte
        // aligned: allocations are 256-byte aligned).
        unsafe { lb.launch(rowcol_cfg(rows, c, pairs)) }.w()?;
        Ok(T::wrap(y))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, rows, c))?;
    Ok(wrap(&s1.device, slice))
}

/// Fused backward of `gelu(x + b)`: `(x, b, dy) → dx` (`b` f32, `dy` in `x`'s dtype), and in
/// the same pass `[P, c]` f32 partial column sums of `dx` over `P` blocks of rows
/// ([`crate::fused::column_blocks`]), with `P`.
#[allow(clippy::too_many_arguments)]
pub fn bias_gelu_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    c: usize,
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
        c: usize,
    ) -> Result<(CudaStorageSlice, CudaSlice<f32>, usize)> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let b = f32_view(s2, l2, "bias")?;
        let g = typed::<T>(s3, l3)?;
        let (r, c_i) = dims(rows, c)?;
        let f = func(dev, &format!("bias_gelu_grad_{}", T::SUFFIX))?;
        let pairs = c.is_multiple_of(2)
            && l1.start_offset().is_multiple_of(2)
            && l3.start_offset().is_multiple_of(2);
        let pairs_i = i32::from(pairs);
        let p = crate::fused::column_blocks(rows);
        let rpb =
            i32::try_from(rows.div_ceil(p)).map_err(|_| candle_core::Error::Msg("rows".into()))?;
        let per_thread = if pairs { 2 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(256 * per_thread) as u32, p as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every element of both is written by the kernel (each (block row, column)
        // of the sums by the thread of that column).
        let dx = unsafe { dev.alloc::<T>(rows * c)? };
        let sums = unsafe { dev.alloc::<f32>(p * c)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(&b)
            .arg(&g)
            .arg(&dx)
            .arg(&sums)
            .arg(&r)
            .arg(&c_i)
            .arg(&pairs_i)
            .arg(&rpb);
        // SAFETY: as in `bias_gelu_fwd`, with `dy` checked as well; the grid covers every
        // column (pair) and row block.
        unsafe { lb.launch(cfg) }.w()?;
        Ok((T::wrap(dx), sums, p))
    }
    let dev = &s1.device;
    let (dx, sums, p) = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, c))?;
    Ok((wrap(dev, dx), wrap(dev, CudaStorageSlice::F32(sums)), p))
}

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

/// Per-patch masked norm-pix loss `[rows]` of `[rows, p]` predictions, targets and weights.
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
) -> Result<CudaStorage> {
    npx_launch(s1, l1, s2, l2, s3, l3, rows, p, "norm_pix_loss", rows)
}

/// Gradient of [`norm_pix_loss`] for the predictions, `[rows, p]`; `s3` holds `[rows, p + 1]`
/// weights followed by each patch's incoming gradient.
#[allow(clippy::too_many_arguments)]
pub fn norm_pix_loss_grad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
) -> Result<CudaStorage> {
    npx_launch(
        s1,
        l1,
        s2,
        l2,
        s3,
        l3,
        rows,
        p,
        "norm_pix_loss_grad",
        rows * p,
    )
}

#[allow(clippy::too_many_arguments)]
fn npx_launch(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    p: usize,
    kernel: &str,
    out_len: usize,
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
        p: usize,
        kernel: &str,
        out_len: usize,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let pred = typed::<T>(s1, l1)?;
        let t = typed::<T>(s2, l2)?;
        let w = typed::<T>(s3, l3)?;
        let (r, c) = dims(rows, p)?;
        let variant = npx_values(p).map(|v| format!("v{v}"));
        let f = func(dev, &kernel_name(kernel, T::SUFFIX, variant))?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&pred).arg(&t).arg(&w).arg(&out).arg(&r).arg(&c);
        // SAFETY: arguments match the kernel's signature.
        unsafe { lb.launch(row_cfg(rows)) }.w()?;
        Ok(T::wrap(out))
    }
    let slice = with_elem!(s1, go(s1, l1, s2, l2, s3, l3, rows, p, kernel, out_len))?;
    Ok(wrap(&s1.device, slice))
}

/// Token gather (`scatter` false: `[B, N, D]` → `[B, K, D]`) or its backward scatter
/// (`[B, K, D]` → zero-filled `[B, N, D]`) by `ids` `[B, K]` (u32, distinct per sample).
pub fn move_tokens(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    (b, k, d): (usize, usize, usize),
    n: usize,
    scatter: bool,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        s1: &CudaStorage,
        l1: &Layout,
        ids: &CudaView<'_, u32>,
        (b, k, d): (usize, usize, usize),
        n: usize,
        scatter: bool,
    ) -> Result<CudaStorageSlice> {
        let dev = &s1.device;
        let x = typed::<T>(s1, l1)?;
        let out_len = b * if scatter { n } else { k } * d;
        // Zeros where no token lands (a scatter); a gather writes every element.
        let out = dev.alloc_zeros::<T>(out_len)?;
        let (k_i, n_i) = dims(k, n)?;
        let d_i = i32::try_from(d).map_err(|_| candle_core::Error::Msg("width".into()))?;
        let sc = i32::from(scatter);
        // 16-byte moves where every row starts 16-byte aligned (allocations are 256-byte
        // aligned; the input view may start further in).
        let size = std::mem::size_of::<T>();
        let vec = i32::from(
            (d * size).is_multiple_of(16) && (l1.start_offset() * size).is_multiple_of(16),
        );
        let f = func(dev, &format!("move_tokens_{}", T::SUFFIX))?;
        let cfg = LaunchConfig {
            grid_dim: (k.div_ceil(8) as u32, b as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x)
            .arg(ids)
            .arg(&out)
            .arg(&k_i)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&sc)
            .arg(&vec);
        // SAFETY: arguments match the kernel's signature; the ids are below n (checked where
        // the index tensor is made); `vec` only with 16-byte aligned rows.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(T::wrap(out))
    }
    let ids = match &s2.slice {
        CudaStorageSlice::U32(v) => view(v, l2)?,
        _ => candle_core::bail!("token indices must be u32"),
    };
    if k == 0 || b == 0 {
        candle_core::bail!("move_tokens: no tokens");
    }
    let slice = with_elem!(s1, go(s1, l1, &ids, (b, k, d), n, scatter))?;
    Ok(wrap(&s1.device, slice))
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

/// CUDA device `ordinal` as icefm uses it: candle's device with cudarc's per-launch event
/// tracking turned off.
///
/// With tracking on (cudarc's default once a context has a stream of its own, as candle's
/// does), every kernel launch records and waits on two events per buffer argument, host-side
/// driver work that a step of thousands of small launches pays for nothing: candle queues all
/// its work, and icefm all its kernels, on the device's one stream, in order. The one other
/// stream icefm uses, [`Uploader`]'s, is ordered by explicit events. `ICEFM_CUDA_EVENT_TRACKING=1`
/// leaves tracking on (for comparisons).
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
        Ok(Self { pinned, n })
    }

    /// The values, once their copy is done.
    pub fn finish(self) -> Result<Vec<f32>> {
        let values = self.pinned.as_slice().w()?[..self.n].to_vec();
        let mut spare = SPARE_PINNED.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < 8 {
            spare.push(self.pinned);
        }
        Ok(values)
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

/// Where the flash forward leaves its log-sum-exp for the backward of the same attention node.
pub type SavedLse = std::sync::Mutex<Option<CudaSlice<f32>>>;

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("flash attention: a thread panicked holding the log-sum-exp".into())
}

/// The kernel-name suffix of the flash kernels that fetch the next tile during the current one.
fn prefetch_suffix() -> &'static str {
    if crate::fused::flash_prefetch() {
        "_pf"
    } else {
        ""
    }
}

/// [`crate::fused::FlashAttention`] on the device: `qkv` bf16 `[B, N, 3·H·hd]` (contiguous, at an
/// even element offset) → `[B, N, H·hd]` bf16. `hd` is 32 or 64.
/// The kernel also writes each query's log-sum-exp (f32 `[B, H, N]`); `keep` receives it for
/// the backward ([`flash_attention_bwd`]), else it is dropped.
pub fn flash_attention(
    s: &CudaStorage,
    l: &Layout,
    (b, n, heads, hd): (usize, usize, usize, usize),
    keep: Option<&SavedLse>,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let qkv = typed::<half::bf16>(s, l)?;
    // The kernels read 16 bytes (8 values) at a time: rows of 3·H·hd values are 16-byte multiples.
    if !l.start_offset().is_multiple_of(8) || !matches!(hd, 32 | 64) {
        candle_core::bail!("flash attention: head width {hd}, or an offset off 16 bytes");
    }
    let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg("too large".into()));
    let (n_i, h_i) = (int(n)?, int(heads)?);
    let scale_log2 = (hd as f32).powf(-0.5) * std::f32::consts::LOG2_E;
    let f = func(dev, &format!("flash_fwd_{hd}{}", prefetch_suffix()))?;
    // SAFETY: every element is written: each (sample, head, query) by its warp.
    let out = unsafe { dev.alloc::<half::bf16>(b * n * heads * hd)? };
    // SAFETY: as above.
    let lse = unsafe { dev.alloc::<f32>(b * heads * n)? };
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(64) as u32,
            heads as u32,
            u32::try_from(b).map_err(|_| candle_core::Error::Msg("batch too large".into()))?,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&qkv)
        .arg(&out)
        .arg(&lse)
        .arg(&n_i)
        .arg(&h_i)
        .arg(&scale_log2);
    // SAFETY: the arguments match the kernel's signature; `qkv` holds B·N·3·H·hd values.
    unsafe { lb.launch(cfg) }.w()?;
    if let Some(slot) = keep {
        *slot.lock().map_err(|_| poisoned())? = Some(lse);
    }
    Ok(wrap(dev, CudaStorageSlice::BF16(out)))
}

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

/// [`crate::fused::FlashAttentionGrad`] on the device: `qkv` `[B, N, 3·H·hd]`, the forward's
/// output `o` and its gradient `dout` `[B, N, H·hd]`, all bf16 contiguous from 16-byte boundaries →
/// `dqkv` in `qkv`'s layout. `hd` is 32 or 64.
/// `saved`: the forward's log-sum-exp ([`flash_attention`]'s `keep`), taken if it is there, so
/// that the dq kernel skips its first pass over the keys.
pub fn flash_attention_bwd(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    (b, n, heads, hd): (usize, usize, usize, usize),
    saved: Option<&SavedLse>,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let qkv = typed::<half::bf16>(s1, l1)?;
    let o = typed::<half::bf16>(s2, l2)?;
    let dout = typed::<half::bf16>(s3, l3)?;
    if [l1, l2, l3]
        .iter()
        .any(|l| !l.start_offset().is_multiple_of(8))
        || !matches!(hd, 32 | 64)
    {
        candle_core::bail!("flash attention backward: head width {hd}, or an offset off 16 bytes");
    }
    let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg("too large".into()));
    let (n_i, h_i) = (int(n)?, int(heads)?);
    let scale = (hd as f32).powf(-0.5);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let rows = b * heads * n;
    // SAFETY: every element is written: the q slots by the first kernel, k and v by the
    // second; the log-sum-exp (unless saved by the forward) and D of each (sample, head,
    // query) by the first.
    let dqkv = unsafe { dev.alloc::<half::bf16>(b * n * 3 * heads * hd)? };
    let saved = match saved {
        Some(slot) => slot.lock().map_err(|_| poisoned())?.take(),
        None => None,
    }
    .filter(|lse| lse.len() == rows);
    let have_lse = saved.is_some();
    let lse = match saved {
        Some(lse) => lse,
        // SAFETY: as above.
        None => unsafe { dev.alloc::<f32>(rows)? },
    };
    // SAFETY: as above.
    let dvec = unsafe { dev.alloc::<f32>(rows)? };
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(64) as u32,
            heads as u32,
            u32::try_from(b).map_err(|_| candle_core::Error::Msg("batch too large".into()))?,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let f = func(
        dev,
        &format!(
            "flash_bwd_dq_{}{hd}{}",
            if have_lse { "lse_" } else { "" },
            // No prefetching dq kernel at head width 64: it ran out of registers (spills).
            if hd == 32 { prefetch_suffix() } else { "" }
        ),
    )?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(&qkv)
        .arg(&o)
        .arg(&dout)
        .arg(&dqkv)
        .arg(&lse)
        .arg(&dvec)
        .arg(&n_i)
        .arg(&h_i)
        .arg(&scale_log2)
        .arg(&scale);
    // SAFETY: the arguments match the kernel's signature and sizes.
    unsafe { lb.launch(cfg) }.w()?;
    let f = func(dev, &format!("flash_bwd_dkv_{hd}{}", prefetch_suffix()))?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(&qkv)
        .arg(&dout)
        .arg(&lse)
        .arg(&dvec)
        .arg(&dqkv)
        .arg(&n_i)
        .arg(&h_i)
        .arg(&scale_log2)
        .arg(&scale);
    // SAFETY: as above; it runs after the first kernel on the same stream.
    unsafe { lb.launch(cfg) }.w()?;
    Ok(wrap(dev, CudaStorageSlice::BF16(dqkv)))
}

/// One cuBLASLt handle (with its 32 MiB workspace on Hopper) per device, made on first use.
fn blas_lt(dev: &CudaDevice) -> Result<std::sync::Arc<CudaBlasLT>> {
    static HANDLES: Memo<DeviceId, std::sync::Arc<CudaBlasLT>> = Memo::new();
    HANDLES.get_or_make(dev.id(), || {
        CudaBlasLT::new(dev.cuda_stream())
            .map(std::sync::Arc::new)
            .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))
    })
}

/// Byte offsets of a view into its allocation that cuBLASLt's default algorithm choice allows
/// (it assumes 256-byte aligned operands unless told otherwise).
fn lt_aligned(l: &Layout, elem_bytes: usize) -> bool {
    (l.start_offset() * elem_bytes).is_multiple_of(256)
}

/// [`crate::fused::LinearBias`] on the device: `x` `[m, k]` and `w` `[n, k]` (bf16, contiguous),
/// `b` `[n]` (f32) → `x · wᵀ + b` `[m, n]` bf16, the bias added in the matrix product's epilogue
/// (cuBLASLt `EPILOGUE_BIAS`, the bias cast to bf16 first) instead of a pass of its own. Operands
/// that are not 256-byte aligned take candle's product and [`bias_add`] instead.
#[allow(clippy::too_many_arguments)]
pub fn linear_bias(
    sx: &CudaStorage,
    lx: &Layout,
    sw: &CudaStorage,
    lw: &Layout,
    sb: &CudaStorage,
    lb: &Layout,
    (m, k, n): (usize, usize, usize),
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::cublaslt::{Matmul, MatmulConfig};
    let dev = &sx.device;
    if !(lt_aligned(lx, 2) && lt_aligned(lw, 2)) {
        let y = sx.matmul(sw, (1, m, n, k), lx, &lw.transpose(0, 1)?)?;
        return bias_add(&y, &Layout::contiguous((m, n)), sb, lb, m, n);
    }
    let x = typed::<half::bf16>(sx, lx)?;
    let w = typed::<half::bf16>(sw, lw)?;
    let b16 = sb.to_dtype(lb, candle_core::DType::BF16)?;
    let b = typed::<half::bf16>(&b16, &Layout::contiguous(n))?;
    let lt = blas_lt(dev)?;
    // Row-major y [m, n] = x [m, k] · wᵀ is column-major yᵀ [n, m] = (w as column-major [k, n])ᵀ
    // · (x as column-major [k, m]); the bias runs along yᵀ's rows, one value per output feature.
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: beta is 0, so the product writes every element of y and reads none.
    let mut y = unsafe { dev.alloc::<half::bf16>(m * n)? };
    // SAFETY: the shapes and leading dimensions above describe the three buffers exactly.
    unsafe { lt.matmul(cfg, &w, &x, &mut y, Some(&b), None) }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt matmul: {e:?}")))?;
    Ok(wrap(dev, CudaStorageSlice::BF16(y)))
}

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
