//! Fused layer norm and softmax as candle custom ops, each with its own backward.
//!
//! [`crate::ops`] composes both from differentiable primitives: about ten kernels (CPU passes or
//! CUDA launches) and as many temporaries per call forward, more backward. The ops here do each
//! in one pass per direction, on the CPU (rayon over rows, computed in f64) and, with feature
//! `cuda`, with icefm's own kernels ([`crate::cuda`]: float and bf16 inputs, f32 arithmetic).
//! Their backward passes are custom ops too, so gradients never fall back to the composition.
//!
//! The composed versions stay as the reference: the tests compare values and gradients of the
//! two, and `ICEFM_FUSED=0` (or [`set_fused`]) switches the model back to them.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Tensor;

mod activation;
mod adamw;
mod attn;
mod augment;
mod bias;
mod cpu;
mod fast_math;
mod layer_norm;
mod norm_pix;
mod softmax;
mod stash;
mod tokens;

pub use activation::{
    BiasGelu, BiasGeluGrad, Gelu, GeluGrad, Relu, ReluGrad, bias_gelu, bias_gelu_grad, gelu, relu,
};
pub use adamw::{AdamMoment, AdamUpdate, sum_squares_cpu};
pub(crate) use attn::pass_through;
pub use attn::{FlashAttention, FlashAttentionGrad, attention, attention_reference};
pub use augment::{NormaliseAugment, normalise_augment};
pub use bias::{
    BiasAdd, ColumnSums, LinearBias, bias_add, column_blocks, linear, linear_bias, linear_gelu,
};
pub use fast_math::exp_f32;
pub use layer_norm::{LayerNorm, LayerNormGrad, layer_norm, layer_norm_grad, ln_grad_blocks};
pub use norm_pix::{NormPixLoss, NormPixLossGrad, filled, masked_norm_pix_loss};
pub use softmax::{Softmax, SoftmaxGrad, softmax, softmax_valid};
pub use stash::Stash;
pub use tokens::{TokenRows, gather_tokens, gather_tokens_at};

/// A process-wide switch read once from its environment variable; settable.
struct Switch {
    /// 0 (3): not yet read from the environment, on (off) by default; 1: on; 2: off.
    state: AtomicU8,
    var: &'static str,
}

impl Switch {
    const fn new(var: &'static str) -> Self {
        Self {
            state: AtomicU8::new(0),
            var,
        }
    }

    /// A switch that is off unless its variable says `1`.
    const fn off_by_default(var: &'static str) -> Self {
        Self {
            state: AtomicU8::new(3),
            var,
        }
    }

    fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            3 => {
                let on = std::env::var(self.var).is_ok_and(|v| v == "1");
                self.set(on);
                on
            }
            _ => {
                let on = std::env::var(self.var).map_or(true, |v| v != "0");
                self.set(on);
                on
            }
        }
    }

    fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

static FUSED: Switch = Switch::new("ICEFM_FUSED");
static FLASH: Switch = Switch::new("ICEFM_FLASH");
static FLASH_BWD: Switch = Switch::new("ICEFM_FLASH_BWD");
static BIAS_GELU_CUDA: Switch = Switch::new("ICEFM_BIAS_GELU_CUDA");
static FLASH_PREFETCH: Switch = Switch::new("ICEFM_FLASH_PREFETCH");
static LT_BIAS: Switch = Switch::new("ICEFM_LT_BIAS");
static LN_V8: Switch = Switch::new("ICEFM_LN_V8");
static GPU_ROUTES: Switch = Switch::off_by_default("ICEFM_GPU_ROUTES");

/// Whether the model uses the fused ops (default; `ICEFM_FUSED=0` in the environment turns them
/// off, for comparisons).
pub fn fused() -> bool {
    FUSED.get()
}

/// Switch the fused ops on or off for the whole process.
pub fn set_fused(on: bool) {
    FUSED.set(on);
}

/// Whether the ops take their GPU routes on every device (`ICEFM_GPU_ROUTES=1`; off by
/// default): where an op chooses its path by device (the flash attention, the fused bias +
/// GELU, the cuBLASLt bias epilogue), the CPU then runs the GPU's choice through its CPU
/// reference. For counting on the CPU the operations a GPU step runs (`examples/census.rs`);
/// slow (the references compute in f64), not for training.
pub fn gpu_routes() -> bool {
    GPU_ROUTES.get()
}

/// Switch [`gpu_routes`] on or off for the whole process.
pub fn set_gpu_routes(on: bool) {
    GPU_ROUTES.set(on);
}

/// Whether `t`'s ops take their GPU routes: on a GPU, or everywhere under [`gpu_routes`].
fn gpu_route(t: &Tensor) -> bool {
    t.device().is_cuda() || gpu_routes()
}

/// Whether [`linear`] adds biases in cuBLASLt's epilogue on GPUs (default; `ICEFM_LT_BIAS=0`
/// turns it off).
pub fn lt_bias() -> bool {
    LT_BIAS.get()
}

/// Switch [`linear`]'s cuBLASLt bias epilogue on or off for the whole process.
pub fn set_lt_bias(on: bool) {
    LT_BIAS.set(on);
}

/// Whether the bf16 layer norm on GPUs uses its kernels with 16-byte accesses and warps that
/// stride over rows, fetching the next row while they reduce the current one (rows of 512 to
/// 1280 values in steps of 256). On by default since the GPU check measured them faster than the
/// register-resident ones on an H200 (`ICEFM_LN_V8=0` turns them off; `docs/benchmarks.md`).
pub fn ln_v8() -> bool {
    LN_V8.get()
}

/// Switch the layer norm's wide-access GPU kernels on or off for the whole process.
pub fn set_ln_v8(on: bool) {
    LN_V8.set(on);
}

/// Whether [`bias_gelu`] uses its fused kernels on GPUs (default; `ICEFM_BIAS_GELU_CUDA=0`
/// turns them off there).
pub fn bias_gelu_cuda() -> bool {
    BIAS_GELU_CUDA.get()
}

/// Switch [`bias_gelu`]'s fused kernels on or off on GPUs for the whole process.
pub fn set_bias_gelu_cuda(on: bool) {
    BIAS_GELU_CUDA.set(on);
}

/// Whether [`attention`]'s forward pass may use the flash kernel (default; `ICEFM_FLASH=0`
/// turns it off, for comparisons).
pub fn flash() -> bool {
    FLASH.get()
}

/// Switch the flash attention forward on or off for the whole process.
pub fn set_flash(on: bool) {
    FLASH.set(on);
}

/// Whether [`attention`]'s backward pass may use the flash kernels (default since they passed
/// `model/tests/cuda/` and halved the step on an H200; `ICEFM_FLASH_BWD=0` turns them off).
pub fn flash_bwd() -> bool {
    FLASH_BWD.get()
}

/// Switch the flash attention backward on or off for the whole process.
pub fn set_flash_bwd(on: bool) {
    FLASH_BWD.set(on);
}

/// Whether the flash kernels fetch the next key (or query) tile into registers while they
/// compute on the current one: fewer stalls on memory, more registers and so fewer warps per
/// SM. On by default since the GPU check measured it faster (`ICEFM_FLASH_PREFETCH=0`).
pub fn flash_prefetch() -> bool {
    FLASH_PREFETCH.get()
}

/// Switch the flash kernels' prefetching on or off for the whole process.
pub fn set_flash_prefetch(on: bool) {
    FLASH_PREFETCH.set(on);
}
