//! `gpu_check profile` and `gpu_check profile-blocks`: where a step's time goes.

use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_model::cuda;
use icefm_model::fused;
use icefm_model::train::init_weights;

use super::{Res, random, time_ms};

/// Forward and forward+backward times of the pieces of a ViT-B/16 MAE step at batch 64,
/// 384 px, bf16: where a step's time goes.
pub(super) fn profile() -> Res<()> {
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
/// then the norm-pix loss, the token gather and scatter and the batch preparation at the step's
/// shapes, bracketed by cuProfilerStart/Stop for a kernel-level profile under
/// `ncu --profile-from-start off` (the warm-up pass stays outside).
#[allow(unsafe_code)]
pub(super) fn profile_blocks() -> Res<()> {
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
    // The step's other memory-bound kernels at its shapes: the norm-pix loss both ways, the
    // token gather and its scatter, and the batch preparation.
    let pred = Var::from_tensor(&random(&[64, 432, 512], 3, &dev, DType::F32)?)?;
    let target = random(&[64, 432, 512], 4, &dev, DType::F32)?;
    let weight = random(&[64, 432, 512], 5, &dev, DType::F32)?
        .ge(-0.8)?
        .to_dtype(DType::F32)?;
    let tokens = random(&[64, 576, 768], 6, &dev, bf)?;
    let ids: Vec<u32> = (0..64u32)
        .flat_map(|b| (0..144u32).map(move |j| (j * 4 + b % 4) % 576))
        .collect();
    let idx = Tensor::from_vec(ids, (64, 144), &dev)?;
    let back = fused::TokenRows {
        n: 576,
        scatter: true,
    };
    let raw = random(&[64, 2, 384, 384], 7, &dev, DType::F32)?;
    let transforms: Vec<icefm_dataset::Transform> = (0..64)
        .map(|i| icefm_dataset::Transform {
            transpose: i % 2 == 1,
            flip_y: i % 4 >= 2,
            flip_x: i % 8 >= 4,
        })
        .collect();
    let pass = || -> Res<()> {
        let ye = enc.forward(xe.as_tensor(), None)?;
        let yd = dec.forward(xd.as_tensor(), None)?;
        let loss = (ye.to_dtype(DType::F32)?.sqr()?.sum_keepdim(2)?.sum_all()?
            + yd.to_dtype(DType::F32)?.sqr()?.sum_keepdim(2)?.sum_all()?)?;
        loss.backward()?;
        let (npx, _) = fused::masked_norm_pix_loss(pred.as_tensor(), &target, &weight)?;
        npx.backward()?;
        let kept = fused::gather_tokens_at(&tokens, &idx)?;
        kept.apply_op2_no_bwd(&idx, &back)?;
        fused::normalise_augment(&raw, &[-20.0, -25.0], &[0.2, 0.25], &transforms)?;
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
