//! Element-wise and bias kernels: bias add and its column sums, GELU and ReLU with their
//! backward passes, and the fused `gelu(x + b)`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{Elem, dims, elem_cfg, f32_view, typed, with_elem, wrap};

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
