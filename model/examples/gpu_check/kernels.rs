//! `gpu_check kernels`: icefm's kernels against the candle compositions they replace, and
//! their bandwidth against the device's copy.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::rng::Rng;
use icefm_model::fused;
use icefm_model::mae::{Mae, MaeConfig};
use icefm_model::optim::{AdamW, AdamWConfig};
use icefm_model::train::named_vars;
use icefm_model::vit::VitConfig;
use icefm_model::{cuda, ops};

use super::{Res, random, time_ms};

/// The copy rates a kernel's bandwidth is set against: the driver's device-to-device copy of
/// 2 GiB (the card's rate), and a copy moving as many bytes as the kernel does, whose rate at
/// that size already pays for a launch's start and its last partial wave: what a kernel of
/// that size could reach at best.
struct Ceiling {
    dev: candle_core::CudaDevice,
    big: f64,
    sizes: std::cell::RefCell<std::collections::HashMap<usize, f64>>,
}

impl Ceiling {
    fn new(dev: &Device) -> Res<Self> {
        let dev = dev.as_cuda_device()?.clone();
        let big = cuda::copy_bandwidth(&dev, 1 << 31, 10)?;
        Ok(Self {
            dev,
            big,
            sizes: Default::default(),
        })
    }

    /// GB/s (read + written) of copies moving `bytes` in all; NaN if it could not be measured.
    fn same_size(&self, bytes: f64) -> f64 {
        let half = ((bytes / 2.0) as usize).div_ceil(256) * 256;
        if let Some(&r) = self.sizes.borrow().get(&half) {
            return r;
        }
        // Some 4 GB in all, between 20 and 1,000 copies.
        let reps = ((4e9 / bytes.max(1.0)) as usize).clamp(20, 1000);
        let r = cuda::copy_bandwidth(&self.dev, half.max(256), reps).unwrap_or(f64::NAN);
        self.sizes.borrow_mut().insert(half, r);
        r
    }
}

fn kernel_line(
    name: &str,
    shape: &str,
    bytes: f64,
    fused_ms: f64,
    composed_ms: f64,
    copy: &Ceiling,
) {
    let gbs = bytes / (fused_ms * 1e-3) / 1e9;
    let num = |x: f64, digits: usize| {
        if x.is_finite() {
            format!("{x:.digits$}")
        } else {
            "null".to_string()
        }
    };
    let (gbs, of, same, of_same) = if bytes > 0.0 {
        let same = copy.same_size(bytes);
        (
            num(gbs, 0),
            num(gbs / copy.big, 2),
            num(same, 0),
            num(gbs / same, 2),
        )
    } else {
        let null = || "null".to_string();
        (null(), null(), null(), null())
    };
    // Rows without a candle composition to compare have no speed-up.
    let (composed, speedup) = (num(composed_ms, 4), num(composed_ms / fused_ms, 2));
    println!(
        "{{\"kind\":\"kernel\",\"name\":\"{name}\",\"shape\":\"{shape}\",\"fused_ms\":{fused_ms:.4},\"composed_ms\":{composed},\"speedup\":{speedup},\"gb_per_s\":{gbs},\"copy_gb_per_s\":{:.0},\"of_copy\":{of},\"same_size_copy_gb_per_s\":{same},\"of_same_size_copy\":{of_same}}}",
        copy.big,
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

pub(super) fn kernels_bench() -> Res<()> {
    let dev = cuda::device(0)?;
    // Copy bandwidth: the driver's device-to-device copy of 2 GiB, bytes read + written.
    let copy = Ceiling::new(&dev)?;
    println!(
        "{{\"kind\":\"copy\",\"gib\":2,\"gb_per_s\":{:.0}}}",
        copy.big
    );
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
            &copy,
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
            &copy,
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
            &copy,
        );
        kernel_line(
            "layer_norm bwd kernel, wide loads (vs register-resident)",
            &shape,
            3.0 * (rows * d * 2) as f64,
            dx_v8?,
            dx_reg,
            &copy,
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
        kernel_line("softmax fwd", &shape, 2.0 * (el * 2) as f64, f, c, &copy);
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
        kernel_line("softmax bwd", &shape, 3.0 * (el * 2) as f64, f, c, &copy);
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
    kernel_line("bias add fwd+bwd", &shape, 3.0 * el * 2.0, f, c, &copy);
    // Forward reads x, writes y; backward reads x and dy, writes dx: 5 passes.
    let (f, c) = fused_vs_composed(&dev, || {
        let y = fused::gelu(xv.as_tensor())?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    kernel_line("gelu fwd+bwd", &shape, 5.0 * el * 2.0, f, c, &copy);
    // ReLU: forward reads x, writes y; backward reads y and dy, writes dx: 5 passes (candle's
    // backward takes six launches).
    let (f, c) = fused_vs_composed(&dev, || {
        let y = fused::relu(xv.as_tensor())?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    kernel_line("relu fwd+bwd", &shape, 5.0 * el * 2.0, f, c, &copy);
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
        &copy,
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
            &copy,
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
            &copy,
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
            &copy,
        );
        kernel_line(
            "flash attention fwd: prefetching (vs not)",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            fpf?,
            f,
            &copy,
        );
        kernel_line(
            "attention node fwd+bwd: flash bwd (vs materialised)",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            bwd[0],
            bwd[1],
            &copy,
        );
        kernel_line(
            "flash attention fwd (vs materialised)",
            &format!("[64, {n}, 3x{dim}] bf16, {heads} heads ({what})"),
            0.0,
            f,
            c?,
            &copy,
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
        &copy,
    );
    // Each direction alone, as a step runs it: the forward (the loss kernel and the few small
    // reductions after it), and the backward of one loss (candle's backward over the small
    // tensors, then the gradient kernel).
    let fwd = time_ms(&dev, 3, 20, || {
        fused::masked_norm_pix_loss(pred.as_tensor(), &target, &weight)?;
        Ok(())
    })?;
    let (loss, _) = fused::masked_norm_pix_loss(pred.as_tensor(), &target, &weight)?;
    let bwd = time_ms(&dev, 3, 20, || {
        loss.backward()?;
        Ok(())
    })?;
    let shape = format!("{shape_v:?} f32");
    kernel_line(
        "norm-pix loss fwd",
        &shape,
        3.0 * el * 4.0,
        fwd,
        f64::NAN,
        &copy,
    );
    kernel_line(
        "norm-pix loss bwd",
        &shape,
        4.0 * el * 4.0,
        bwd,
        f64::NAN,
        &copy,
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
    // The indices on the device, as a step has them (`gather_tokens` would check and upload
    // them on every call).
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let idx = Tensor::from_vec(flat, (b, k), &dev)?;
    let (f, c) = fused_vs_composed(&dev, || {
        let y = fused::gather_tokens_at(xv.as_tensor(), &idx)?;
        (y * &dy)?.backward()?;
        Ok(())
    })?;
    // Gather reads and writes K rows; scatter reads K rows and writes all N. The time also
    // holds the product with `dy` and its backward, which the bytes leave out.
    let shape = format!("[{b}, {n}, {d}] bf16, keep {k}");
    kernel_line(
        "token gather fwd+bwd (with a product)",
        &shape,
        ((3 * k + n) * b * d * 2) as f64,
        f,
        c,
        &copy,
    );
    // Each kernel alone.
    let gather = time_ms(&dev, 3, 20, || {
        fused::gather_tokens_at(xv.as_tensor(), &idx)?;
        Ok(())
    })?;
    let back = fused::TokenRows { n, scatter: true };
    let scatter = time_ms(&dev, 3, 20, || {
        dy.apply_op2_no_bwd(&idx, &back)?;
        Ok(())
    })?;
    let row = (b * d * 2) as f64;
    kernel_line(
        "token gather",
        &shape,
        2.0 * k as f64 * row,
        gather,
        f64::NAN,
        &copy,
    );
    kernel_line(
        "token scatter (gather bwd)",
        &shape,
        (k + n) as f64 * row,
        scatter,
        f64::NAN,
        &copy,
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
        &copy,
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
        &copy,
    );
    Ok(())
}
