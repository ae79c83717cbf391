//! Flash attention, forward and backward, and the log-sum-exp the forward keeps for the
//! backward.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use super::func;
use super::launch::{typed, wrap};

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
