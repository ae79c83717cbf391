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
use icefm_model::fused;
use icefm_model::mae::{Mae, MaeConfig, Masking};
use icefm_model::optim::{AdamW, AdamWConfig, clip, clip_scale};
use icefm_model::seg::{SegConfig, SegModel, seg_loss};
use icefm_model::train::{RunOptions, init_weights, named_vars, train_mae};
use icefm_model::vit::VitConfig;
use icefm_model::{cuda, ops};

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

fn kernel_line(name: &str, shape: &str, bytes: f64, fused_ms: f64, composed_ms: f64, copy: f64) {
    let gbs = bytes / (fused_ms * 1e-3) / 1e9;
    let (gbs, of) = if bytes > 0.0 {
        (format!("{gbs:.0}"), format!("{:.2}", gbs / copy))
    } else {
        ("null".into(), "null".into())
    };
    println!(
        "{{\"kind\":\"kernel\",\"name\":\"{name}\",\"shape\":\"{shape}\",\"fused_ms\":{fused_ms:.4},\"composed_ms\":{composed_ms:.4},\"speedup\":{:.2},\"gb_per_s\":{gbs},\"copy_gb_per_s\":{copy:.0},\"of_copy\":{of}}}",
        composed_ms / fused_ms,
    );
}

/// Milliseconds of `f` with icefm's fused ops, then with candle's compositions.
fn fused_vs_composed(dev: &Device, mut f: impl FnMut() -> Res<()>) -> Res<(f64, f64)> {
    let fused_ms = time_ms(dev, 3, 20, &mut f)?;
    fused::set_fused(false);
    let composed = time_ms(dev, 2, 10, &mut f);
    fused::set_fused(true);
    Ok((fused_ms, composed?))
}

fn kernels_bench() -> Res<()> {
    let dev = cuda::device(0)?;
    // Copy bandwidth: the driver's device-to-device copy of 2 GiB, bytes read + written.
    let copy = cuda::copy_bandwidth(dev.as_cuda_device()?, 1 << 31, 10)?;
    println!("{{\"kind\":\"copy\",\"gib\":2,\"gb_per_s\":{copy:.0}}}");
    let eps = 1e-6;
    for (rows, d, what) in [
        (64 * 145, 768usize, "ViT-B encoder"),
        (64 * 577, 512, "decoder"),
    ] {
        let x = random(&[rows, d], 1, &dev, DType::BF16)?;
        let dy = random(&[rows, d], 2, &dev, DType::BF16)?;
        let w = random(&[d], 3, &dev, DType::F32)?;
        let b = random(&[d], 4, &dev, DType::F32)?;
        let shape = format!("{rows}x{d} bf16 ({what})");
        let composed_fwd = |x: &Tensor| -> Res<Tensor> {
            Ok(ops::layer_norm(&x.to_dtype(DType::F32)?, &w, &b, eps)?.to_dtype(DType::BF16)?)
        };
        let f_fwd = time_ms(&dev, 3, 20, || {
            fused::layer_norm(&x, &w, &b, eps)?;
            Ok(())
        })?;
        let c = time_ms(&dev, 3, 20, || {
            composed_fwd(&x)?;
            Ok(())
        })?;
        kernel_line(
            "layer_norm fwd",
            &shape,
            2.0 * (rows * d * 2) as f64,
            f_fwd,
            c,
            copy,
        );
        // The fused backward's kernel (dx and the partial sums for the scale and shift), then
        // with `with_sum` the sum of those partial sums, as the layer norm's backward runs.
        let grad = |with_sum: bool| -> Res<f64> {
            time_ms(&dev, 3, 20, || {
                let (_, parts) = fused::layer_norm_grad(&x, &w, &dy, eps)?;
                if with_sum {
                    parts.sum(1)?;
                }
                Ok(())
            })
        };
        let f = grad(true)?;
        let xv = Var::from_tensor(&x)?;
        let wv = Var::from_tensor(&w)?;
        let bv = Var::from_tensor(&b)?;
        let c = time_ms(&dev, 3, 20, || {
            let y = ops::layer_norm(
                &xv.as_tensor().to_dtype(DType::F32)?,
                wv.as_tensor(),
                bv.as_tensor(),
                eps,
            )?
            .to_dtype(DType::BF16)?;
            (y * &dy)?.backward()?;
            Ok(())
        })?;
        // Fused backward: one pass reads x, dy and writes dx (and the partial sums).
        kernel_line(
            "layer_norm bwd",
            &shape,
            3.0 * (rows * d * 2) as f64,
            f,
            c,
            copy,
        );
        // The wide-access kernels (16-byte loads, warps striding over rows) against the
        // register-resident ones timed above: forward, and the backward's kernel alone.
        let dx_reg = grad(false)?;
        let ln_v8_env = fused::ln_v8();
        fused::set_ln_v8(true);
        let fwd_v8 = time_ms(&dev, 3, 20, || {
            fused::layer_norm(&x, &w, &b, eps)?;
            Ok(())
        });
        let dx_v8 = grad(false);
        fused::set_ln_v8(ln_v8_env);
        kernel_line(
            "layer_norm fwd, wide loads (vs register-resident)",
            &shape,
            2.0 * (rows * d * 2) as f64,
            fwd_v8?,
            f_fwd,
            copy,
        );
        kernel_line(
            "layer_norm bwd kernel, wide loads (vs register-resident)",
            &shape,
            3.0 * (rows * d * 2) as f64,
            dx_v8?,
            dx_reg,
            copy,
        );
    }
    for (shape_v, what) in [
        (vec![64usize, 12, 145, 145], "encoder attention"),
        (vec![64, 16, 577, 577], "decoder attention"),
    ] {
        let el: usize = shape_v.iter().product();
        let x = random(&shape_v, 5, &dev, DType::BF16)?;
        let dy = random(&shape_v, 6, &dev, DType::BF16)?;
        let shape = format!("{shape_v:?} bf16 ({what})");
        let f = time_ms(&dev, 3, 20, || {
            fused::softmax(&x)?;
            Ok(())
        })?;
        let c = time_ms(&dev, 3, 20, || {
            ops::softmax(&x.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?;
            Ok(())
        })?;
        kernel_line("softmax fwd", &shape, 2.0 * (el * 2) as f64, f, c, copy);
        let y = fused::softmax(&x)?;
        let f = time_ms(&dev, 3, 20, || {
            y.apply_op2_no_bwd(&dy, &fused::SoftmaxGrad)?;
            Ok(())
        })?;
        let xv = Var::from_tensor(&x)?;
        let c = time_ms(&dev, 2, 10, || {
            let y = ops::softmax(&xv.as_tensor().to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?;
            (y * &dy)?.backward()?;
            Ok(())
        })?;
        kernel_line("softmax bwd", &shape, 3.0 * (el * 2) as f64, f, c, copy);
    }
    // The MLP's pieces in a ViT-B encoder block, forward + backward, fused vs candle's.
    let (rows, d) = (64 * 145, 3072usize);
    let x = random(&[rows, d], 10, &dev, DType::BF16)?;
    let dy = random(&[rows, d], 11, &dev, DType::BF16)?;
    let bias = random(&[d], 12, &dev, DType::F32)?;
    let lt_env = fused::lt_bias();
    let el = (rows * d) as f64;
    let xv = Var::from_tensor(&x)?;
    let bv = Var::from_tensor(&bias)?;
    let shape = format!("{rows}x{d} bf16 (MLP)");
    // Forward reads x and writes y; backward reads dy (the gradient passes through) and sums
    // its columns: 3 bf16 passes.
    let (f, c) = fused_vs_composed(&dev, || {
        let y = fused::bias_add(xv.as_tensor(), bv.as_tensor())?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    kernel_line("bias add fwd+bwd", &shape, 3.0 * el * 2.0, f, c, copy);
    // Forward reads x, writes y; backward reads x and dy, writes dx: 5 passes.
    let (f, c) = fused_vs_composed(&dev, || {
        let y = fused::gelu(xv.as_tensor())?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    kernel_line("gelu fwd+bwd", &shape, 5.0 * el * 2.0, f, c, copy);
    // ReLU: forward reads x, writes y; backward reads y and dy, writes dx: 5 passes (candle's
    // backward takes six launches).
    let (f, c) = fused_vs_composed(&dev, || {
        let y = fused::relu(xv.as_tensor())?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    kernel_line("relu fwd+bwd", &shape, 5.0 * el * 2.0, f, c, copy);
    // gelu(x + b) as one op against the two fused ops above (the "candle" column here):
    // forward reads x, writes y; backward reads x and dy, writes dx and sums its columns as
    // it goes: 5 passes.
    let one = time_ms(&dev, 3, 20, || {
        let y = xv.as_tensor().apply_op2(bv.as_tensor(), fused::BiasGelu)?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    let two = time_ms(&dev, 3, 20, || {
        let y = fused::gelu(&fused::bias_add(xv.as_tensor(), bv.as_tensor())?)?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    kernel_line(
        "bias+gelu one op fwd+bwd (vs bias add, gelu)",
        &shape,
        5.0 * el * 2.0,
        one,
        two,
        copy,
    );
    // A linear layer's forward, x · wᵀ + b: one cuBLASLt product with the bias in its epilogue
    // against candle's product and the bias add (ViT-B's encoder qkv and decoder fc1 shapes).
    for (m, k, n, what) in [
        (64 * 145usize, 768usize, 2304usize, "encoder qkv"),
        (64 * 577, 512, 2048, "decoder fc1"),
    ] {
        let x = random(&[m, k], 18, &dev, DType::BF16)?;
        let w = random(&[n, k], 19, &dev, DType::BF16)?;
        let b = random(&[n], 20, &dev, DType::F32)?;
        let mut ms = [0f64; 2];
        for (i, lt) in [true, false].into_iter().enumerate() {
            fused::set_lt_bias(lt);
            ms[i] = time_ms(&dev, 3, 20, || {
                fused::linear(&x, &w, &b)?;
                Ok(())
            })?;
        }
        fused::set_lt_bias(lt_env);
        kernel_line(
            "linear fwd: bias in cuBLASLt epilogue (vs product + bias add)",
            &format!("[{m}, {k}] x [{n}, {k}]^T bf16 ({what})"),
            0.0,
            ms[0],
            ms[1],
            copy,
        );
    }
    // The attention core (head split, q·kᵀ, softmax, ·v, head merge), forward + backward: one
    // autograd node against candle's autograd through its operations. Compute-bound: no
    // bandwidth figure.
    for (n, heads, dim, what) in [
        (145usize, 12usize, 768usize, "encoder"),
        (577, 16, 512, "decoder"),
    ] {
        let qkv = random(&[64, n, 3 * dim], 13, &dev, DType::BF16)?;
        let dy = random(&[64, n, dim], 14, &dev, DType::BF16)?;
        let qv = Var::from_tensor(&qkv)?;
        let (f, c) = fused_vs_composed(&dev, || {
            let y = fused::attention(qv.as_tensor(), heads)?;
            (y * &dy)?.backward()?;
            Ok(())
        })?;
        kernel_line(
            "attention core fwd+bwd",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            f,
            c,
            copy,
        );
    }
    // The attention core's forward: the flash kernel against the materialised scores (split
    // heads, q·kᵀ, softmax, ·v, merge) it replaces.
    let flash_bwd_env = fused::flash_bwd();
    let prefetch_env = fused::flash_prefetch();
    for (n, heads, dim, what) in [
        (145usize, 12usize, 768usize, "encoder"),
        (577, 16, 512, "decoder"),
    ] {
        let qkv = random(&[64, n, 3 * dim], 22, &dev, DType::BF16)?;
        let f = time_ms(&dev, 3, 20, || {
            fused::attention(&qkv, heads)?;
            Ok(())
        })?;
        fused::set_flash_prefetch(true);
        let fpf = time_ms(&dev, 3, 20, || {
            fused::attention(&qkv, heads)?;
            Ok(())
        });
        fused::set_flash_prefetch(prefetch_env);
        fused::set_flash(false);
        let c = time_ms(&dev, 3, 20, || {
            fused::attention(&qkv, heads)?;
            Ok(())
        });
        fused::set_flash(true);
        // The node's backward: the two flash kernels against the materialised recompute, and
        // the flash kernels with prefetching against without.
        let qv = Var::from_tensor(&qkv)?;
        let dy = random(&[64, n, dim], 23, &dev, DType::BF16)?;
        let mut bwd = [0f64; 3];
        for (i, (on, prefetch)) in [(true, false), (false, false), (true, true)]
            .into_iter()
            .enumerate()
        {
            fused::set_flash_bwd(on);
            fused::set_flash_prefetch(prefetch);
            bwd[i] = time_ms(&dev, 2, 10, || {
                let y = fused::attention(qv.as_tensor(), heads)?;
                (y * &dy)?.backward()?;
                Ok(())
            })?;
        }
        fused::set_flash_bwd(flash_bwd_env);
        fused::set_flash_prefetch(prefetch_env);
        kernel_line(
            "attention node fwd+bwd, flash: prefetching (vs not)",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            bwd[2],
            bwd[0],
            copy,
        );
        kernel_line(
            "flash attention fwd: prefetching (vs not)",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            fpf?,
            f,
            copy,
        );
        kernel_line(
            "attention node fwd+bwd: flash bwd (vs materialised)",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            bwd[0],
            bwd[1],
            copy,
        );
        kernel_line(
            "flash attention fwd (vs materialised)",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            f,
            c?,
            copy,
        );
    }
    // MAE's masked norm-pix loss, forward + backward: pred, target, weight [64, 432, 512] f32
    // (432 masked patches of 16 x 16 x 2 values). Forward reads three tensors; backward reads
    // three and writes the gradient.
    let shape_v = [64usize, 432, 512];
    let el = shape_v.iter().product::<usize>() as f64;
    let pred = Var::from_tensor(&random(&shape_v, 15, &dev, DType::F32)?)?;
    let target = random(&shape_v, 16, &dev, DType::F32)?;
    let weight = random(&shape_v, 17, &dev, DType::F32)?
        .ge(-0.8)?
        .to_dtype(DType::F32)?;
    let (f, c) = fused_vs_composed(&dev, || {
        let (loss, _) = fused::masked_norm_pix_loss(pred.as_tensor(), &target, &weight)?;
        loss.backward()?;
        Ok(())
    })?;
    kernel_line(
        "norm-pix loss fwd+bwd",
        &format!("{shape_v:?} f32"),
        7.0 * el * 4.0,
        f,
        c,
        copy,
    );
    // Masking: the 144 kept tokens of 576 per sample, [64, 576, 768] bf16, forward (gather) and
    // backward (rows written back, zeros elsewhere).
    let (b, n, d, k) = (64usize, 576usize, 768usize, 144usize);
    let xv = Var::from_tensor(&random(&[b, n, d], 18, &dev, DType::BF16)?)?;
    let dy = random(&[b, k, d], 19, &dev, DType::BF16)?;
    let mut r = Rng::new(20, 0);
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            let noise: Vec<f32> = (0..n).map(|_| r.unit() as f32).collect();
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_by(|&i, &j| noise[i as usize].total_cmp(&noise[j as usize]));
            order.truncate(k);
            order
        })
        .collect();
    let (f, c) = fused_vs_composed(&dev, || {
        let y = fused::gather_tokens(xv.as_tensor(), &ids)?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    // Gather reads and writes K rows; scatter reads K rows and writes all N.
    kernel_line(
        "token gather fwd+bwd",
        &format!("[{b}, {n}, {d}] bf16, keep {k}"),
        ((3 * k + n) * b * d * 2) as f64,
        f,
        c,
        copy,
    );
    // Batch preparation: raw windows [64, 2, 384, 384] f32 → inputs and validity mask,
    // flipped and turned, against the same op on the host (what the loader did before).
    let (b, ch, px) = (64usize, 2usize, 384usize);
    let mut r = Rng::new(21, 0);
    let raw: Vec<f32> = (0..b * ch * px * px)
        .map(|_| {
            let u = r.unit() as f32;
            if u < 0.01 { f32::NAN } else { u * 40.0 - 30.0 }
        })
        .collect();
    let raw_cpu = Tensor::from_vec(raw, (b, ch, px, px), &Device::Cpu)?;
    let raw_gpu = raw_cpu.to_device(&dev)?;
    let transforms: Vec<icefm_dataset::Transform> = (0..b)
        .map(|i| icefm_dataset::Transform {
            transpose: i % 2 == 1,
            flip_y: i % 4 >= 2,
            flip_x: i % 8 >= 4,
        })
        .collect();
    let (mean, inv_std) = ([-20.0f32, -25.0], [0.2f32, 0.25]);
    let f = time_ms(&dev, 3, 20, || {
        fused::normalise_augment(&raw_gpu, &mean, &inv_std, &transforms)?;
        Ok(())
    })?;
    let c = time_ms(&Device::Cpu, 1, 3, || {
        fused::normalise_augment(&raw_cpu, &mean, &inv_std, &transforms)?;
        Ok(())
    })?;
    let el = (b * px * px) as f64;
    kernel_line(
        "batch preparation (vs host)",
        &format!("[{b}, {ch}, {px}, {px}] f32"),
        (2.0 + 3.0) * el * 4.0,
        f,
        c,
        copy,
    );
    // AdamW over ViT-B/16 MAE's parameters: fused (one launch) vs composed candle ops.
    let cfg = MaeConfig::new(VitConfig::preset("base").ok_or("preset")?);
    let varmap = VarMap::new();
    let _mae = Mae::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    let vars = named_vars(&varmap);
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut loss = Tensor::zeros((), DType::F32, &dev)?;
    for (_, v) in &vars {
        loss = (loss + v.as_tensor().sum_all()?)?;
    }
    let grads = loss.backward()?;
    let mut times = Vec::new();
    for on in [true, false] {
        fused::set_fused(on);
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
        times.push(time_ms(&dev, 2, 10, || {
            opt.step(&grads, 1e-4, 1.0)?;
            Ok(())
        })?);
    }
    fused::set_fused(true);
    kernel_line(
        "adamw (all params)",
        &format!("{params} f32 in {} tensors", vars.len()),
        28.0 * params as f64,
        times[0],
        times[1],
        copy,
    );
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
    let timed: Vec<f64> = s.records.iter().skip(2).map(|r| r.images_per_s).collect();
    let mean = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
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

/// Forward and forward+backward times of the pieces of a ViT-B/16 MAE step at batch 64,
/// 384 px, bf16: where a step's time goes.
fn profile() -> Res<()> {
    let dev = cuda::device(0)?;
    let bf = DType::BF16;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let (b, keep, n) = (64usize, 145usize, 577usize);
    let line = |name: &str, fwd: f64, both: f64| {
        println!(
            "{{\"kind\":\"profile\",\"name\":\"{name}\",\"fwd_ms\":{fwd:.3},\"fwd_bwd_ms\":{both:.3}}}"
        );
    };
    // fwd, then fwd + backward of sum(y · r) (the product and sum are the same in every row).
    let measure = |name: &str, x: &Tensor, f: &dyn Fn(&Tensor) -> Res<Tensor>| -> Res<()> {
        let xv = Var::from_tensor(x)?;
        let y0 = f(xv.as_tensor())?;
        let r = random(y0.dims(), 9, &dev, y0.dtype())?;
        let fwd = time_ms(&dev, 2, 5, || {
            f(xv.as_tensor())?;
            Ok(())
        })?;
        let both = time_ms(&dev, 2, 5, || {
            let y = f(xv.as_tensor())?;
            // Row sums first: candle's sum_all is one block over everything.
            (y * &r)?
                .to_dtype(DType::F32)?
                .sum_keepdim(candle_core::D::Minus1)?
                .sum_all()?
                .backward()?;
            Ok(())
        })?;
        line(name, fwd, both);
        Ok(())
    };
    let enc_block = icefm_model::vit::Block::new(vb.pp("e"), 768, 12, 4, 1e-6, 0.0)?;
    let dec_block = icefm_model::vit::Block::new(vb.pp("d"), 512, 16, 4, 1e-6, 0.0)?;
    let fc1 = icefm_model::vit::Linear::new(vb.pp("fc1"), 512, 2048)?;
    let norm = icefm_model::vit::Norm::new(vb.pp("n"), 512, 1e-6)?;
    init_weights(&varmap, 3)?;
    let xe = random(&[b, keep, 768], 1, &dev, bf)?;
    let xd = random(&[b, n, 512], 2, &dev, bf)?;
    measure("encoder block [64,145,768]", &xe, &|x| {
        Ok(enc_block.forward(x, None)?)
    })?;
    measure("decoder block [64,577,512]", &xd, &|x| {
        Ok(dec_block.forward(x, None)?)
    })?;
    measure("linear 512->2048 [64,577]", &xd, &|x| Ok(fc1.forward(x)?))?;
    let w_bf = random(&[2048, 512], 10, &dev, bf)?;
    measure("matmul only [36928,512]x[512,2048]", &xd, &|x| {
        Ok(x.reshape((b * n, 512))?.matmul(&w_bf.t()?)?)
    })?;
    let bias = random(&[2048], 11, &dev, DType::F32)?;
    measure(
        "bias add [36928,2048]",
        &random(&[b * n, 2048], 12, &dev, bf)?,
        &|x| Ok(fused::bias_add(x, &bias)?),
    )?;
    measure(
        "gelu [64,577,2048]",
        &random(&[b, n, 2048], 3, &dev, bf)?,
        &|x| Ok(fused::gelu(x)?),
    )?;
    measure(
        "gelu candle [64,577,2048]",
        &random(&[b, n, 2048], 3, &dev, bf)?,
        &|x| Ok(x.gelu_erf()?),
    )?;
    measure("layer norm [64,577,512]", &xd, &|x| Ok(norm.forward(x)?))?;
    let qkv = random(&[b, n, 3 * 512], 4, &dev, bf)?;
    measure("attention core (dec)", &qkv, &|x| {
        let t = x.reshape((b, n, 3, 16, 32))?.permute((2, 0, 3, 1, 4))?;
        let q = (t.get(0)? * 0.17)?;
        let k = t.get(1)?.contiguous()?;
        let v = t.get(2)?.contiguous()?;
        let a = fused::softmax(&q.matmul(&k.t()?)?)?;
        Ok(a.matmul(&v)?.transpose(1, 2)?.reshape((b, n, 512))?)
    })?;
    let qkv_p = random(&[b, 584, 3 * 512], 4, &dev, bf)?;
    measure("attention core (dec, padded to 584)", &qkv_p, &|x| {
        let t = x.reshape((b, 584, 3, 16, 32))?.permute((2, 0, 3, 1, 4))?;
        let q = (t.get(0)? * 0.17)?;
        let k = t.get(1)?.contiguous()?;
        let v = t.get(2)?.contiguous()?;
        let a = fused::softmax_valid(&q.matmul(&k.t()?)?, 577)?;
        Ok(a.matmul(&v)?.transpose(1, 2)?.reshape((b, 584, 512))?)
    })?;
    let scores = random(&[b * 16, 577, 577], 13, &dev, bf)?;
    let vv = random(&[b * 16, 577, 32], 14, &dev, bf)?;
    measure("batched matmul [1024,577,577]x[577,32]", &scores, &|a| {
        Ok(a.matmul(&vv)?)
    })?;
    let scores_p = random(&[b * 16, 584, 584], 13, &dev, bf)?;
    let vv_p = random(&[b * 16, 584, 32], 14, &dev, bf)?;
    measure("batched matmul [1024,584,584]x[584,32]", &scores_p, &|a| {
        Ok(a.matmul(&vv_p)?)
    })?;
    measure("residual add [64,577,512]", &xd, &|x| Ok((x + x)?))?;
    let idx = Tensor::arange(0u32, keep as u32, &dev)?
        .reshape((1, keep, 1))?
        .broadcast_as((b, keep, 768))?
        .contiguous()?;
    measure(
        "gather tokens [64,576,768]->145",
        &random(&[b, 576, 768], 5, &dev, bf)?,
        &|x| Ok(x.contiguous()?.gather(&idx, 1)?),
    )?;
    let images = random(&[b, 2, 384, 384], 6, &dev, DType::F32)?;
    let valid = Tensor::ones((b, 384, 384), DType::F32, &dev)?;
    let ones = Tensor::ones((b, 576, 1), DType::F32, &dev)?;
    measure(
        "norm-pix loss [64,576,512]",
        &random(&[b, 576, 512], 7, &dev, DType::F32)?,
        &|pred| {
            let target = icefm_model::vit::patchify(&images, 16)?;
            let vm = icefm_model::vit::patchify(
                &valid
                    .unsqueeze(1)?
                    .broadcast_as((b, 2, 384, 384))?
                    .contiguous()?,
                16,
            )?;
            let (t, w) = icefm_model::mae::norm_pix(&target, &vm)?;
            Ok(icefm_model::mae::patch_loss(pred, &t, &w, &ones)?.reshape((1, 1))?)
        },
    )?;
    let w32 = random(&[3072, 768], 8, &dev, DType::F32)?;
    measure("weight cast f32->bf16 [3072,768]", &w32, &|w| {
        Ok(w.to_dtype(bf)?)
    })?;
    Ok(())
}

/// One encoder and one decoder block of ViT-B/16 MAE (batch 64, bf16), forward and backward,
/// bracketed by cuProfilerStart/Stop for a kernel-level profile under
/// `ncu --profile-from-start off` (the warm-up pass stays outside).
#[allow(unsafe_code)]
fn profile_blocks() -> Res<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let dev = cuda::device(0)?;
    let bf = DType::BF16;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let enc = icefm_model::vit::Block::new(vb.pp("e"), 768, 12, 4, 1e-6, 0.0)?;
    let dec = icefm_model::vit::Block::new(vb.pp("d"), 512, 16, 4, 1e-6, 0.0)?;
    init_weights(&varmap, 3)?;
    let xe = Var::from_tensor(&random(&[64, 145, 768], 1, &dev, bf)?)?;
    let xd = Var::from_tensor(&random(&[64, 577, 512], 2, &dev, bf)?)?;
    let pass = || -> Res<()> {
        let ye = enc.forward(xe.as_tensor(), None)?;
        let yd = dec.forward(xd.as_tensor(), None)?;
        let loss = (ye.to_dtype(DType::F32)?.sqr()?.sum_keepdim(2)?.sum_all()?
            + yd.to_dtype(DType::F32)?.sqr()?.sum_keepdim(2)?.sum_all()?)?;
        loss.backward()?;
        Ok(())
    };
    pass()?;
    dev.synchronize()?;
    // SAFETY: profiler control calls on the current context; no arguments.
    unsafe { sys::cuProfilerStart() };
    pass()?;
    dev.synchronize()?;
    // SAFETY: as above.
    unsafe { sys::cuProfilerStop() };
    println!("{{\"kind\":\"profile_blocks\",\"ok\":true}}");
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
