//! The GPU half of scripts/gpu-check.sh (feature `cuda`): benchmarks of the MAE training step
//! and of icefm's kernels against the candle compositions they replace, and a resumed
//! training run on the GPU. Each mode prints one JSON object per line (`"kind": …`), which
//! the script turns into its table.
//!
//! ```text
//! gpu_check step [--preset base] [--size 384] [--batch 64] [--mask 0.75] [--precision bf16]
//!                [--steps 10] [--warmup 3] [--composed]
//! gpu_check kernels
//! gpu_check resume --store STORE
//! gpu_check profile
//! gpu_check train --store STORE [--steps 12] [--batch 64]   (ICEFM_UPLOAD=pageable to compare)
//! gpu_check seg [--preset base] [--size 384] [--batch 16] [--precision bf16] [--steps 8]
//! gpu_check profile-blocks      (under ncu --profile-from-start off)
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::rng::Rng;
use icefm_model::config::TrainConfig;
use icefm_model::cuda;
use icefm_model::fused;
use icefm_model::mae::{Mae, MaeConfig, Masking};
use icefm_model::optim::{AdamW, AdamWConfig, clip, clip_scale};
use icefm_model::seg::{SegConfig, SegModel, seg_loss};
use icefm_model::train::{RunOptions, init_weights, named_vars, train_mae};
use icefm_model::vit::VitConfig;

mod kernels;
mod profile;

use kernels::kernels_bench;
use profile::{profile, profile_blocks};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg<T: std::str::FromStr>(args: &[String], key: &str, default: T) -> T {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random(shape: &[usize], seed: u64, dev: &Device, dtype: DType) -> Res<Tensor> {
    let mut r = Rng::new(seed, 0);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.unit() as f32 * 2.0 - 1.0).collect();
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
}

/// Milliseconds per call of `f`, after `warm` calls, over `n` calls, the device synchronised.
fn time_ms(dev: &Device, warm: usize, n: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..warm {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
}

fn step_bench(args: &[String]) -> Res<()> {
    let dev = cuda::device(0)?;
    let cd = dev.as_cuda_device()?.clone();
    let preset: String = arg(args, "--preset", "base".to_string());
    let px: usize = arg(args, "--size", 384);
    let batch: usize = arg(args, "--batch", 64);
    let steps: usize = arg(args, "--steps", 10);
    let warmup: usize = arg(args, "--warmup", 3);
    let precision: String = arg(args, "--precision", "bf16".to_string());
    let composed = args.iter().any(|a| a == "--composed");
    fused::set_fused(!composed);
    let mut cfg = MaeConfig::new(VitConfig::preset(&preset).ok_or("preset")?);
    cfg.mask_ratio = arg(args, "--mask", 0.75);
    let varmap = VarMap::new();
    let mut mae = Mae::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    if precision == "bf16" {
        mae.compute_dtype = DType::BF16;
    }
    init_weights(&varmap, 0)?;
    let vars = named_vars(&varmap);
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let just_vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let images = random(&[batch, 2, px, px], 1, &dev, DType::F32)?;
    let valid = Tensor::ones((batch, px, px), DType::F32, &dev)?;
    let n = (px / 16).pow(2);
    // The masking of random stream `stream` (seed 7).
    let masking = |stream: u64| {
        let mut r = Rng::new(7, stream);
        let noise: Vec<Vec<f32>> = (0..batch)
            .map(|_| (0..n).map(|_| r.unit() as f32).collect())
            .collect();
        Masking::from_noise(&noise, cfg.mask_ratio)
    };
    // The loss of a forward pass under that masking (its indices copied when it runs).
    let forward = |stream: u64| -> candle_core::Result<Tensor> {
        Ok(mae.forward(&images, &valid, &masking(stream), None)?.loss)
    };
    // A step as `icefm train` queues it: the masking's indices through page-locked memory,
    // clipping and the update with the norm left on the device, nothing read back; the losses
    // are read after the timed steps. `ICEFM_STEP_SYNC=1` reads each loss and the norm when
    // they are made, as the loop did before.
    let sync = std::env::var("ICEFM_STEP_SYNC").is_ok_and(|v| v == "1");
    let mut indices = cuda::Uploader::<u32>::new(&cd)?;
    let mut losses = Vec::new();
    let mut step = |i: u64| -> Res<Tensor> {
        let m = masking(i).staged_through(&mut indices)?;
        let loss = mae.forward(&images, &valid, &m, None)?.loss;
        if sync {
            loss.to_scalar::<f32>()?;
        }
        let grads = loss.backward()?;
        let c = clip(&grads, just_vars.iter(), 3.0)?;
        if sync {
            c.norm()?;
        }
        opt.step_clipped(&grads, 1e-4, &c)?;
        // Detached: a loss kept with its graph keeps the step's activations alive, and the
        // peak would grow with every step kept (as `icefm train`'s records detach theirs).
        Ok(loss.detach())
    };
    for i in 0..warmup {
        losses.push(step(i as u64)?);
    }
    dev.synchronize()?;
    cuda::pool_peak_reset(&cd)?;
    let t = Instant::now();
    // The host's time to queue one step, the first after the device drained its queue (so
    // nothing in it waits for the device): near the step's own time, the host is the limit.
    let mut host_s = 0.0;
    for i in 0..steps {
        losses.push(step((warmup + i) as u64)?);
        if i == 0 {
            host_s = t.elapsed().as_secs_f64();
        }
    }
    dev.synchronize()?;
    let s = t.elapsed().as_secs_f64() / steps as f64;
    let peak = cuda::pool_peak(&cd)?;
    let losses: Vec<f32> = Tensor::stack(&losses, 0)?.to_vec1()?;
    // Where a step's time goes: three more steps, synchronised after each phase.
    let phase = phase_ms(&dev, 3, &just_vars, &mut opt, |i| Ok(forward(1000 + i)?))?;
    let flops = 3.0 * cfg.forward_flops(px) * batch as f64;
    let (launches, census_gb, bound_ms) = census_bound(&cd, || forward(2000))?;
    // Which variant ran: candle's compositions, upstream candle's zero-filled gradient
    // accumulation (vendor/README.md), cudarc's event tracking, no flash forward, the flash
    // backward, the fused bias + GELU, the flash kernels' prefetching and the cuBLASLt bias
    // epilogue (off by default until they have run on a GPU).
    let label = format!(
        "icefm{}{}{}{}{}{}{}{}{}{}",
        if composed { "-composed" } else { "" },
        if std::env::var("CANDLE_GRAD_ZERO_FILL").is_ok_and(|v| v == "1") {
            "-zerofill"
        } else {
            ""
        },
        if cuda::event_tracking_requested() {
            "-tracking"
        } else {
            ""
        },
        if fused::flash() { "" } else { "-noflash" },
        if fused::flash_bwd() { "-flashbwd" } else { "" },
        if fused::bias_gelu_cuda() {
            "-biasgelu"
        } else {
            ""
        },
        if fused::flash_prefetch() {
            "-prefetch"
        } else {
            ""
        },
        if fused::lt_bias() { "-ltbias" } else { "" },
        if fused::ln_v8() { "-lnv8" } else { "" },
        if sync { "-sync" } else { "" }
    );
    println!(
        "{{\"kind\":\"step\",\"impl\":\"{}\",\"preset\":\"{preset}\",\"size\":{px},\"batch\":{batch},\"precision\":\"{precision}\",\"params\":{params},\"ms_per_step\":{:.2},\"host_ms\":{:.2},\"images_per_s\":{:.1},\"tflops\":{:.1},\"peak_mem_gib\":{:.2},\"forward_ms\":{:.1},\"backward_ms\":{:.1},\"optimizer_ms\":{:.1},\"launches\":{launches},\"census_gb\":{census_gb:.2},\"bound_ms\":{:.2},\"of_bound\":{:.3},\"losses\":{:?}}}",
        label,
        s * 1e3,
        host_s * 1e3,
        batch as f64 / s,
        flops / s / 1e12,
        peak as f64 / (1u64 << 30) as f64,
        phase[0],
        phase[1],
        phase[2],
        bound_ms,
        bound_ms / (phase[0] + phase[1]),
        losses
    );
    Ok(())
}

/// What one more forward pass (`forward`, to a loss) and its backward ask of the card
/// (icefm_model::census, docs/gpu.md): launches, GB moved, and the bound of their time in ms at
/// the card's copy bandwidth (measured here) and 600 TFLOP/s of products.
fn census_bound(
    cd: &candle_core::CudaDevice,
    forward: impl FnOnce() -> candle_core::Result<Tensor>,
) -> Res<(f64, f64, f64)> {
    let copy = cuda::copy_bandwidth(cd, 1 << 30, 5)?;
    let rows = icefm_model::census::rows(&icefm_model::census::count(false, forward)?);
    let bound_s: f64 = rows.iter().map(|r| r.seconds(copy * 1e9, 600e12)).sum();
    let gb = rows.iter().map(|r| r.bytes()).sum::<f64>() / 1e9;
    Ok((rows.iter().map(|r| r.calls).sum(), gb, bound_s * 1e3))
}

/// One kernel's line; `bytes` 0 for a compute-bound one (no bandwidth figure).
/// Mean milliseconds of a training step's phases over `reps` steps, the device synchronised
/// after each: `forward(i)` (to the loss), backward with clipping, and the AdamW update.
fn phase_ms(
    dev: &Device,
    reps: u64,
    vars: &[Var],
    opt: &mut AdamW,
    mut forward: impl FnMut(u64) -> Res<Tensor>,
) -> Res<[f64; 3]> {
    let mut phase = [0f64; 3];
    for i in 0..reps {
        let t0 = Instant::now();
        let loss = forward(i)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let (_, scale) = clip_scale(&grads, vars.iter(), 3.0)?;
        dev.synchronize()?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-4, scale)?;
        dev.synchronize()?;
        let t3 = Instant::now();
        for (p, (a, b)) in phase.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
            *p += (b - a).as_secs_f64() * 1e3 / reps as f64;
        }
    }
    Ok(phase)
}

/// A fine-tuning step on the GPU: SAR-IceFM's ViT-B/16 + UPerNet (512 channels), three tasks
/// (SIC as MSE, SOD and FLOE cross-entropy, weights 1, 3, 3), AdamW, on one random batch with
/// random labels (a tenth ignored). Prints the step's time, peak memory and the losses (which
/// must fall on a repeated batch).
fn seg_bench(args: &[String]) -> Res<()> {
    let dev = cuda::device(0)?;
    let cd = dev.as_cuda_device()?.clone();
    let preset: String = arg(args, "--preset", "base".to_string());
    let px: usize = arg(args, "--size", 384);
    let batch: usize = arg(args, "--batch", 16);
    let steps: usize = arg(args, "--steps", 8);
    let warmup: usize = arg(args, "--warmup", 2);
    let precision: String = arg(args, "--precision", "bf16".to_string());
    let encoder = VitConfig::preset(&preset).ok_or("preset")?;
    let cfg = SegConfig::sar_icefm(encoder);
    let varmap = VarMap::new();
    let mut model = SegModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    if precision == "bf16" {
        model.compute_dtype = DType::BF16;
    }
    init_weights(&varmap, 0)?;
    let vars = named_vars(&varmap);
    let just_vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let images = random(&[batch, 2, px, px], 1, &dev, DType::F32)?;
    let mut r = Rng::new(3, 0);
    let plane = px * px;
    let labels: Vec<u8> = (0..batch * 3 * plane)
        .map(|i| {
            let classes = [11u64, 6, 7][(i / plane) % 3];
            if r.unit() < 0.1 {
                255
            } else {
                (r.below(classes)) as u8
            }
        })
        .collect();
    let mut losses = Vec::new();
    let mut step = || -> Res<f32> {
        let outs = model.forward(&images, None)?;
        let loss = seg_loss(&outs, &labels, &cfg)?;
        let value = loss.total.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let grads = loss.total.backward()?;
        let (_, scale) = clip_scale(&grads, just_vars.iter(), 3.0)?;
        opt.step(&grads, 1e-4, scale)?;
        Ok(value)
    };
    for _ in 0..warmup {
        losses.push(step()?);
    }
    dev.synchronize()?;
    cuda::pool_peak_reset(&cd)?;
    let t = Instant::now();
    for _ in 0..steps {
        losses.push(step()?);
    }
    dev.synchronize()?;
    let s = t.elapsed().as_secs_f64() / steps as f64;
    let peak = cuda::pool_peak(&cd)?;
    // Where a step's time goes: two more steps, synchronised after each phase.
    let phase = phase_ms(&dev, 2, &just_vars, &mut opt, |_| {
        let outs = model.forward(&images, None)?;
        Ok(seg_loss(&outs, &labels, &cfg)?.total)
    })?;
    let (launches, census_gb, bound_ms) = census_bound(&cd, || {
        let outs = model.forward(&images, None)?;
        Ok(seg_loss(&outs, &labels, &cfg)?.total)
    })?;
    let ok = losses.iter().all(|l| l.is_finite()) && losses.last() < losses.first();
    println!(
        "{{\"kind\":\"seg_step\",\"impl\":\"icefm ViT-{preset}/16 + UPerNet\",\"size\":{px},\"batch\":{batch},\"precision\":\"{precision}\",\"ms_per_step\":{:.2},\"images_per_s\":{:.1},\"peak_mem_gib\":{:.2},\"forward_ms\":{:.1},\"backward_ms\":{:.1},\"optimizer_ms\":{:.1},\"launches\":{launches},\"census_gb\":{census_gb:.2},\"bound_ms\":{bound_ms:.2},\"of_bound\":{:.3},\"loss_falls\":{ok},\"losses\":{losses:?}}}",
        s * 1e3,
        batch as f64 / s,
        peak as f64 / (1u64 << 30) as f64,
        phase[0],
        phase[1],
        phase[2],
        bound_ms / (phase[0] + phase[1]),
    );
    if !ok {
        return Err("the fine-tuning loss did not fall on a repeated batch".into());
    }
    Ok(())
}

fn resume_check(args: &[String]) -> Res<()> {
    let store: String = arg(args, "--store", String::new());
    let dir = std::env::temp_dir().join("icefm-gpu-resume");
    let _ = std::fs::remove_dir_all(&dir);
    let text = "[model]\npreset = \"tiny\"\ndepth = 2\n[mae]\ndecoder_dim = 64\ndecoder_depth = 1\ndecoder_heads = 4\n[data]\ncrop = 64\nbatch_size = 4\nlevels = \"\"\n[train]\nsteps = 4\nwarmup_steps = 1\ncheckpoint_every = 2\npanel_every = 0\nprecision = \"bf16\"\nlr = 1e-3\n";
    let cfg = TrainConfig::parse(text, &[])?;
    let dev = cuda::device(0)?;
    let run = |out: &str, steps: u64, resume: bool| -> Res<Vec<f32>> {
        let mut c = cfg.clone();
        c.train.steps = steps;
        let opts = RunOptions {
            store: store.clone().into(),
            out: dir.join(out),
            resume,
            device: dev.clone(),
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let s = train_mae(&c, &opts, &stop, &|_| {})?;
        Ok(s.records.iter().map(|r| r.loss).collect())
    };
    let whole = run("whole", 4, false)?;
    run("split", 2, false)?;
    let resumed = run("split", 4, true)?;
    let diff = whole
        .iter()
        .zip(&resumed)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs() / a.abs().max(1e-6)));
    let ok = whole.len() == 4 && resumed.len() == 4 && diff < 1e-3;
    println!(
        "{{\"kind\":\"resume\",\"ok\":{ok},\"whole\":{whole:?},\"resumed\":{resumed:?},\"max_rel_diff\":{diff:e}}}"
    );
    if !ok {
        return Err("a resumed GPU run differs from an uninterrupted one".into());
    }
    Ok(())
}

/// End-to-end MAE training from a store on the GPU (`icefm train`'s loop: loader, uploads,
/// step, metrics): ViT-B/16, 384 px, batch 64, bf16. Prints the mean images/s of the steps
/// after the first two, and whether the uploads were page-locked and overlapped (the
/// default) or pageable (`ICEFM_UPLOAD=pageable`).
fn train_bench(args: &[String]) -> Res<()> {
    let store: String = arg(args, "--store", String::new());
    let steps: u64 = arg(args, "--steps", 12);
    let batch: usize = arg(args, "--batch", 64);
    let dir = std::env::temp_dir().join("icefm-gpu-train");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "[model]\npreset = \"base\"\n[data]\ncrop = 384\nbatch_size = {batch}\nlevels = \"\"\n[train]\nsteps = {steps}\nwarmup_steps = 1\ncheckpoint_every = 100000\npanel_every = 0\nprecision = \"bf16\"\n"
    );
    let cfg = TrainConfig::parse(&text, &[])?;
    let opts = RunOptions {
        store: store.into(),
        out: dir.clone(),
        resume: false,
        device: cuda::device(0)?,
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let t = Instant::now();
    let s = train_mae(&cfg, &opts, &stop, &|_| {})?;
    let wall = t.elapsed().as_secs_f64();
    // The rate over the timed steps: their images over the sum of their own times (each
    // record's rate is its step's, images / its device time).
    let timed: Vec<f64> = s.records.iter().skip(2).map(|r| r.images_per_s).collect();
    let secs: f64 = timed.iter().map(|ips| batch as f64 / ips).sum();
    let mean = (timed.len() * batch) as f64 / secs.max(1e-9);
    let upload = if std::env::var("ICEFM_UPLOAD").is_ok_and(|v| v == "pageable") {
        "pageable"
    } else {
        "pinned, overlapped"
    };
    println!(
        "{{\"kind\":\"train\",\"upload\":\"{upload}\",\"batch\":{batch},\"steps\":{steps},\"images_per_s\":{mean:.1},\"wall_s\":{wall:.1},\"losses\":{:?}}}",
        s.records.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("step") => step_bench(&args),
        Some("kernels") => kernels_bench(),
        Some("resume") => resume_check(&args),
        Some("profile") => profile(),
        Some("seg") => seg_bench(&args),
        Some("train") => train_bench(&args),
        Some("profile-blocks") => profile_blocks(),
        _ => Err("usage: gpu_check step|kernels|resume|profile|seg|train [options]".into()),
    }
}
