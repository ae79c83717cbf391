//! Time icefm's fused CPU kernels at the shapes of a ViT-tiny MAE step at 384 px (batch 8):
//! the decoder's attention softmax `[8·16·577, 577]` and its backward, the MLP's bias + GELU
//! `[4616, 2048]` both ways (the backward with the bias's gradient), GELU, and layer norm
//! `[4616, 512]` both ways (the backward: its one pass and the sum of its partial sums for the
//! scale and shift). Best of 5, on a rayon worker, freed memory kept (as `icefm train`).
//! `cargo run --release -p icefm-model --example cpu_kernels`.
#![allow(missing_docs, clippy::unwrap_used)]
use candle_core::{DType, Device, Tensor};
use icefm_model::fused;
use std::time::Instant;
fn main() {
    icefm_model::alloc::keep_freed_memory();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (8 * 16 * 577, 577), &dev).unwrap();
    let h = Tensor::randn(0f32, 1.0, (4616, 2048), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, 2048, &dev).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (4616, 2048), &dev).unwrap();
    let ln_x = Tensor::randn(0f32, 1.0, (4616, 512), &dev).unwrap();
    let w = Tensor::ones(512, DType::F32, &dev).unwrap();
    let ln_dy = Tensor::randn(0f32, 1.0, (4616, 512), &dev).unwrap();
    icefm_model::threads::on_worker(true, || {
        for name in [
            "softmax",
            "softmax_grad",
            "bias_gelu",
            "bias_gelu_grad",
            "layer_norm",
            "layer_norm_grad",
            "gelu",
        ] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let _y = match name {
                    "softmax" => fused::softmax(&x).unwrap(),
                    "softmax_grad" => x.apply_op2_no_bwd(&x, &fused::SoftmaxGrad).unwrap(),
                    "bias_gelu" => fused::bias_gelu(&h, &b).unwrap(),
                    "bias_gelu_grad" => {
                        let (_, sums) = fused::bias_gelu_grad(&h, &b, &dy).unwrap();
                        sums.sum(0).unwrap()
                    }
                    "layer_norm" => fused::layer_norm(&ln_x, &w, &w, 1e-6).unwrap(),
                    "layer_norm_grad" => {
                        let (_, parts) = fused::layer_norm_grad(&ln_x, &w, &ln_dy, 1e-6).unwrap();
                        parts.sum(1).unwrap()
                    }
                    _ => fused::gelu(&h).unwrap(),
                };
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("{name}: {:.2} ms", best * 1e3);
        }
    });
}
