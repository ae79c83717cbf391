//! One fine-tuning step of SAR-IceFM's model (ViT-B/16 + UPerNet 512, three tasks) on the CPU
//! in f32, at 384 px: forward (with the loss) and backward times and the process's peak
//! memory. `cargo run --release -p icefm-model --example seg_step -- 2` (the batch size).
//! Results: docs/benchmarks.md.
#![allow(missing_docs, clippy::unwrap_used)]
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use icefm_model::seg::{SegConfig, SegModel, seg_loss};
use icefm_model::train::init_weights;
use icefm_model::vit::VitConfig;
use std::time::Instant;
fn hwm() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmHWM")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}
fn main() {
    // As `icefm train` runs (ICEFM_MALLOC=default for glibc's defaults).
    icefm_model::alloc::keep_freed_memory();
    let b: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let px = 384;
    let encoder = VitConfig::preset("base").unwrap();
    let cfg = SegConfig::sar_icefm(encoder);
    let vm = VarMap::new();
    let m = SegModel::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    init_weights(&vm, 0).unwrap();
    let images = Tensor::randn(0f32, 1.0, (b, 2, px, px), &Device::Cpu).unwrap();
    let labels: Vec<u8> = (0..b * 3 * px * px).map(|i| (i % 6) as u8).collect();
    let base = hwm();
    let t = Instant::now();
    let outs = m.forward(&images, None).unwrap();
    let loss = seg_loss(&outs, &labels, &cfg).unwrap();
    let t1 = t.elapsed().as_secs_f64();
    let _g = loss.total.backward().unwrap();
    let t2 = t.elapsed().as_secs_f64();
    println!(
        "b{b}: forward {t1:.1} s, backward {:.1} s, peak {:.0} MiB (+{:.0} above the model)",
        t2 - t1,
        hwm(),
        hwm() - base
    );
}
