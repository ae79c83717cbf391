//! One MAE training step (forward, backward, AdamW) on the CPU, for ViT-tiny and ViT-small at
//! 96, 224 and 384 px, beside candle's own f32 matmul at the shapes of the step's largest layers.
//! Reports images/s and the step's FLOP/s as a share of the matmul FLOP/s. Results:
//! `docs/benchmarks.md`.
//!
//! The decoder is SAR-IceFM's (512 wide, 8 blocks, 16 heads); mask ratio 0.75; batch 8.
//! Each case also times single steps right after a matmul reference (5 pairs, 3 at 384 px) and
//! prints the median share; the VM's speed drifts too much for one reference per case.
//! `ICEFM_BENCH_QUICK=1` runs only the 96 px cases; 384 px cases skip criterion (the paired
//! steps are the measurement) unless `ICEFM_BENCH_FULL=1`. It keeps freed memory as `icefm train` does
//! ([`icefm_model::alloc::keep_freed_memory`]; `ICEFM_MALLOC=default` for glibc's defaults). Do
//! not run it under the loader bench's fixed `MALLOC_MMAP_THRESHOLD_`: every large tensor would
//! be a fresh mapping. Steps run on a rayon worker, as in `icefm train` (`ICEFM_ON_WORKER=0`:
//! on the bench's thread).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use icefm_dataset::rng::Rng;
use icefm_model::mae::{Mae, MaeConfig, Masking};
use icefm_model::optim::{AdamW, AdamWConfig, clip_scale};
use icefm_model::threads::on_worker;
use icefm_model::train::named_vars;
use icefm_model::vit::VitConfig;

const BATCH: usize = 8;

struct Setup {
    mae: Mae,
    vars: Vec<(String, candle_core::Var)>,
    opt: AdamW,
    images: Tensor,
    valid: Tensor,
    masking: Masking,
}

fn setup(preset: &str, px: usize) -> Setup {
    let dev = Device::Cpu;
    let cfg = MaeConfig::new(VitConfig::preset(preset).expect("preset"));
    let varmap = VarMap::new();
    let mae = Mae::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).expect("model");
    let vars = named_vars(&varmap);
    let opt = AdamW::new(vars.clone(), AdamWConfig::default()).expect("optimizer");
    let mut rng = Rng::new(1, 0);
    let x: Vec<f32> = (0..BATCH * 2 * px * px)
        .map(|_| rng.unit() as f32 * 2.0 - 1.0)
        .collect();
    let images = Tensor::from_vec(x, (BATCH, 2, px, px), &dev).expect("images");
    let valid = Tensor::ones((BATCH, px, px), DType::F32, &dev).expect("valid");
    let n = (px / 16).pow(2);
    let noise: Vec<Vec<f32>> = (0..BATCH)
        .map(|_| (0..n).map(|_| rng.unit() as f32).collect())
        .collect();
    let masking = Masking::from_noise(&noise, cfg.mask_ratio);
    Setup {
        mae,
        vars,
        opt,
        images,
        valid,
        masking,
    }
}

/// One step, on a rayon worker as `icefm train` runs it ([`on_worker`]).
fn step(s: &mut Setup) -> f32 {
    on_worker(true, || {
        let out = s
            .mae
            .forward(&s.images, &s.valid, &s.masking, None)
            .expect("forward");
        let grads = out.loss.backward().expect("backward");
        let (_, scale) = clip_scale(&grads, s.vars.iter().map(|(_, v)| v), 3.0).expect("clip");
        s.opt.step(&grads, 1e-4, scale).expect("step");
        out.loss.to_scalar::<f32>().expect("loss")
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// candle's f32 matmul FLOP/s for `[m, k] × [k, n]`, on a rayon worker like the step.
fn matmul_flops(m: usize, k: usize, n: usize) -> f64 {
    on_worker(true, || matmul_flops_here(m, k, n))
}

fn matmul_flops_here(m: usize, k: usize, n: usize) -> f64 {
    let dev = Device::Cpu;
    let a = Tensor::ones((m, k), DType::F32, &dev).expect("a");
    let b = Tensor::ones((k, n), DType::F32, &dev).expect("b");
    let _ = a.matmul(&b).expect("warm");
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(a.matmul(&b).expect("matmul"));
    }
    2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64()
}

fn train_step(c: &mut Criterion) {
    let kept = icefm_model::alloc::keep_freed_memory();
    eprintln!("allocator: freed memory kept for reuse: {kept}");
    let quick = std::env::var("ICEFM_BENCH_QUICK").is_ok();
    let mut g = c.benchmark_group("mae_train_step_b8");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(BATCH as u64));
    for preset in ["tiny", "small"] {
        for px in [96, 224, 384] {
            if quick && px != 96 {
                continue;
            }
            let mut s = setup(preset, px);
            let cfg = s.mae.cfg.clone();
            let flops = 3.0 * MaeConfig::forward_flops(&cfg, px) * BATCH as f64;
            let t = Instant::now();
            let loss = step(&mut s);
            let once = t.elapsed().as_secs_f64();
            // The decoder (all tokens, 512 wide) is the largest layer: its MLP matmul.
            let (tokens, d) = (BATCH * ((px / 16).pow(2) + 1), cfg.decoder_dim);
            eprintln!(
                "{preset} {px}px: {:.2} GFLOP/step, first step {:.3} s ({:.1} GFLOP/s), loss {loss:.3}",
                flops / 1e9,
                once,
                flops / once / 1e9,
            );
            // The VM's speed drifts by up to 2× within a run, so the share of the matmul's
            // FLOP/s is taken over pairs: the reference, then one step right after it.
            let pairs = if px >= 384 { 3 } else { 5 };
            let mut shares = Vec::new();
            let mut times = Vec::new();
            let mut refs = Vec::new();
            for _ in 0..pairs {
                let mm = matmul_flops(tokens, d, d * 4);
                let t = Instant::now();
                step(&mut s);
                let per = t.elapsed().as_secs_f64();
                times.push(per);
                refs.push(mm);
                shares.push(flops / per / mm);
            }
            eprintln!(
                "{preset} {px}px: paired over {pairs} steps: median {:.3} s/step, {:.2} images/s; \
                 matmul [{tokens}x{d}]x[{d}x{}] median {:.1} GFLOP/s; median share {:.0} % \
                 (range {:.0}–{:.0} %)",
                median(&times),
                BATCH as f64 / median(&times),
                d * 4,
                median(&refs) / 1e9,
                100.0 * median(&shares),
                100.0 * shares.iter().copied().fold(f64::INFINITY, f64::min),
                100.0 * shares.iter().copied().fold(0.0, f64::max),
            );
            if px >= 384 && std::env::var("ICEFM_BENCH_FULL").is_err() {
                // Tens of seconds a step on 2 cores: criterion's ten samples would take many
                // minutes; the paired steps above are the measurement (ICEFM_BENCH_FULL=1 for
                // criterion as well).
                continue;
            }
            g.bench_function(format!("{preset}/{px}px"), |b| b.iter(|| step(&mut s)));
        }
    }
    g.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
