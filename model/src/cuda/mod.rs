//! icefm's own CUDA kernels (feature `cuda`): fused layer norm, softmax and their backward
//! passes, and a fused AdamW step over all parameters in one launch.
//!
//! The kernels are CUDA C compiled at run time by NVRTC for the device at hand (no toolkit is
//! needed to build icefm, only the NVRTC library at run time), once per process. They take
//! float or bf16 tensors (bf16 as raw 16-bit words, so no CUDA header is needed) and compute
//! in f32. Each has a CPU reference ([`crate::fused`], [`crate::optim`]); the tests in
//! `model/tests/cuda/` compare the two on random inputs.
#![allow(unsafe_code)] // kernel launches and raw device pointers, each commented

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::{CudaDevice, Result};

mod adamw;
mod attention;
mod augment;
mod blas;
mod elementwise;
mod im2col;
mod launch;
mod layer_norm;
mod memory;
mod nccl;
mod norm_pix;
mod softmax;
mod tokens;
mod upload;

pub use adamw::{AdamSlot, AdamStep, adamw_step, sum_squares, sum_squares_on_device};
pub use attention::{SavedLse, flash_attention, flash_attention_bwd};
pub use augment::normalise_augment;
pub use blas::linear_bias;
pub use elementwise::{
    bias_add, bias_gelu_fwd, bias_gelu_grad, column_sums, gelu_fwd, gelu_grad, relu_fwd, relu_grad,
};
pub use im2col::im2col3;
pub use layer_norm::{layer_norm_fwd, layer_norm_grad};
pub use memory::{
    copy_bandwidth, device, event_tracking_requested, mem_info, pool_peak, pool_peak_reset,
    ptx_probe,
};
pub use nccl::Nccl;
pub use norm_pix::{norm_pix_loss, norm_pix_loss_grad};
pub use softmax::{softmax_fwd, softmax_grad};
pub use tokens::move_tokens;
pub use upload::{DeviceMark, Readback, Upload, Uploader};

/// The kernels' source (CUDA C, compiled by NVRTC at first use; `model/tests/emulator`
/// also builds it for the CPU).
pub const SOURCE: &str = include_str!("../kernels.cu");

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
