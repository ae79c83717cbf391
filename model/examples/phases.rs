//! Time the phases of one MAE step (ViT-tiny, batch 8): forward, backward, AdamW.
//! `cargo run --release -p icefm-model --example phases -- 224 [STEPS]` (the input size in
//! pixels; 3 steps unless given).
#![allow(missing_docs, clippy::unwrap_used)]
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use icefm_model::mae::{Mae, MaeConfig, Masking};
use icefm_model::optim::{AdamW, AdamWConfig};
use icefm_model::threads::on_worker;
use icefm_model::train::named_vars;
use icefm_model::vit::VitConfig;
use std::time::Instant;
fn main() {
    let px: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    // As `icefm train` runs (ICEFM_MALLOC=default for glibc's defaults).
    icefm_model::alloc::keep_freed_memory();
    let dev = Device::Cpu;
    let cfg = MaeConfig::new(VitConfig::preset("tiny").unwrap());
    let vm = VarMap::new();
    let mae = Mae::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
    let vars = named_vars(&vm);
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let images = Tensor::randn(0f32, 1.0, (8, 2, px, px), &dev).unwrap();
    let valid = Tensor::ones((8, px, px), DType::F32, &dev).unwrap();
    let n = (px / 16).pow(2);
    let noise: Vec<Vec<f32>> = (0..8)
        .map(|b| {
            (0..n)
                .map(|t| ((t * 7919 + b * 31) % 1000) as f32 / 1000.0)
                .collect()
        })
        .collect();
    let m = Masking::from_noise(&noise, 0.75);
    let steps: usize = std::env::args().nth(2).map_or(3, |s| s.parse().unwrap());
    for _ in 0..steps {
        let t0 = Instant::now();
        // As `icefm train` runs a CPU step: on a rayon worker (`ICEFM_ON_WORKER=0`: not).
        let out = on_worker(true, || {
            let o = mae.forward(&images, &valid, &m, None).unwrap();
            let _ = o.loss.to_scalar::<f32>().unwrap();
            o
        });
        let t1 = Instant::now();
        let g = on_worker(true, || out.loss.backward().unwrap());
        let t2 = Instant::now();
        on_worker(true, || opt.step(&g, 1e-4, 1.0).unwrap());
        let t3 = Instant::now();
        println!(
            "{px}px: forward {:.3} s, backward {:.3} s, adamw {:.3} s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
    }
}
