//! Masked-autoencoder pre-training (He et al. 2022, as SAR-IceFM): per-sample random masking,
//! the encoder on visible tokens only, a light decoder, and the norm-pix loss on masked patches,
//! with invalid (no-data) pixels left out of the loss.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::fused::{gather_tokens_at, masked_norm_pix_loss};
use crate::vit::{Block, Linear, Norm, Vit, VitConfig, patchify, sincos_on};

/// MAE shape and masking.
#[derive(Debug, Clone, PartialEq)]
pub struct MaeConfig {
    /// The encoder.
    pub encoder: VitConfig,
    /// Decoder width (512 in MAE and SAR-IceFM).
    pub decoder_dim: usize,
    /// Decoder blocks (8).
    pub decoder_depth: usize,
    /// Decoder heads (16).
    pub decoder_heads: usize,
    /// Share of patch tokens hidden from the encoder (0.75; 0.60–0.90 studied).
    pub mask_ratio: f64,
}

impl MaeConfig {
    /// A micro model (width 16, 2 blocks, patch 4, 2 channels; decoder 8 wide, 1 block): the
    /// model of the gradient tests and of the NumPy reference fixture.
    pub fn micro() -> Self {
        Self {
            encoder: VitConfig {
                dim: 16,
                depth: 2,
                heads: 2,
                patch: 4,
                in_channels: 2,
                mlp_ratio: 2,
                drop_path: 0.0,
                ln_eps: 1e-6,
            },
            decoder_dim: 8,
            decoder_depth: 1,
            decoder_heads: 2,
            mask_ratio: 0.75,
        }
    }

    /// Matrix-product FLOPs of one forward pass for one `px × px` image (2·m·n·k per product:
    /// patch embedding, qkv, projection, MLP and the two attention products of every block,
    /// decoder embedding and prediction). A training step is about 3× this.
    pub fn forward_flops(&self, px: usize) -> f64 {
        let e = &self.encoder;
        let n = (px / e.patch).pow(2) as f64;
        let keep = (n * (1.0 - self.mask_ratio)).floor();
        let p = e.patch_values() as f64;
        let block = |tokens: f64, d: f64, ratio: f64| {
            // qkv + proj + MLP, plus the two attention products.
            2.0 * tokens * d * d * (4.0 + 2.0 * ratio) + 4.0 * tokens * tokens * d
        };
        let (d, dd) = (e.dim as f64, self.decoder_dim as f64);
        let r = e.mlp_ratio as f64;
        2.0 * n * p * d
            + e.depth as f64 * block(keep + 1.0, d, r)
            + 2.0 * (keep + 1.0) * d * dd
            + self.decoder_depth as f64 * block(n + 1.0, dd, r)
            + 2.0 * n * dd * p
    }

    /// SAR-IceFM's decoder (512 / 8 / 16) on an encoder.
    pub fn new(encoder: VitConfig) -> Self {
        Self {
            encoder,
            decoder_dim: 512,
            decoder_depth: 8,
            decoder_heads: 16,
            mask_ratio: 0.75,
        }
    }
}

/// The model.
#[derive(Debug, Clone)]
pub struct Mae {
    /// Shape.
    pub cfg: MaeConfig,
    /// Encoder.
    pub encoder: Vit,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: Norm,
    decoder_pred: Linear,
    /// Arithmetic of the forward pass: the variables' dtype (default) or `BF16` (see
    /// `train.precision`).
    pub compute_dtype: DType,
}

/// What a forward pass gives.
#[derive(Debug, Clone)]
pub struct MaeOutput {
    /// Scalar loss.
    pub loss: Tensor,
    /// Predicted (normalised) patches `[B, N, C·p·p]`.
    pub pred: Tensor,
    /// Encoder output on the kept tokens, class token first: `[B, 1 + K, D]`.
    pub latent: Tensor,
    /// The loss of predicting each patch's mean (0 in norm-pix units) on the same patches:
    /// the baseline an MAE must beat (≈ 1). An f32 scalar on the model's device, not read
    /// here: a read would make the host wait for the forward pass.
    pub baseline: Tensor,
    /// 1 where a token was masked, `[B, N]` (host copy).
    pub masked: Vec<Vec<bool>>,
    /// The loss's weights `[B, N, C·p·p]`: 1 on the valid pixels of masked patches
    /// ([`loss_terms`] counts the patches the loss averages).
    pub weight: Tensor,
}

/// The number of patches MAE's loss averages over, from its `weight` `[B, N, P]`: those with
/// at least 2 weighted values. An f32 scalar on the weight's device (data-parallel ranks weigh
/// their gradients by it).
pub fn loss_terms(weight: &Tensor) -> Result<Tensor> {
    weight
        .sum(D::Minus1)?
        .ge(2.0)?
        .to_dtype(DType::F32)?
        .sum_all()
}

/// The tokens each sample keeps: the first `keep` of a permutation ordered by the sample's noise
/// (ascending, as MAE's `argsort(noise)`); `ids_restore` undoes the shuffle.
#[derive(Debug, Clone)]
pub struct Masking {
    /// `[B][keep]` kept token indices.
    pub ids_keep: Vec<Vec<u32>>,
    /// `[B][N]` position of each token in the shuffled order.
    pub ids_restore: Vec<Vec<u32>>,
    /// [`Masking::packed`] already on the device ([`Masking::staged`]).
    staged: Option<Tensor>,
}

impl PartialEq for Masking {
    /// The same indices (wherever a copy of them is).
    fn eq(&self, other: &Self) -> bool {
        self.ids_keep == other.ids_keep && self.ids_restore == other.ids_restore
    }
}

/// A masking's indices on a device: kept tokens u32 `[B, K]`, restore positions u32 `[B, N]`,
/// and 1 where a token is masked, u32 `[B, N]`.
pub struct MaskingOn {
    /// Kept token indices.
    pub keep: Tensor,
    /// Position of each token in the shuffled order.
    pub restore: Tensor,
    /// 1 for a masked token, 0 for a kept one.
    pub masked: Tensor,
}

/// Tokens of `n` an MAE keeps visible at mask `ratio`: ⌊n · (1 − ratio)⌋.
pub fn kept_tokens(n: usize, ratio: f64) -> usize {
    ((n as f64) * (1.0 - ratio)) as usize
}

impl Masking {
    /// From per-sample noise `[B][N]` in `[0, 1)` and the mask ratio.
    pub fn from_noise(noise: &[Vec<f32>], ratio: f64) -> Self {
        let mut ids_keep = Vec::new();
        let mut ids_restore = Vec::new();
        for row in noise {
            let n = row.len();
            let keep = kept_tokens(n, ratio);
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]).then(a.cmp(&b)));
            let mut restore = vec![0u32; n];
            for (pos, &tok) in order.iter().enumerate() {
                restore[tok as usize] = pos as u32;
            }
            ids_keep.push(order[..keep].to_vec());
            ids_restore.push(restore);
        }
        Self {
            ids_keep,
            ids_restore,
            staged: None,
        }
    }

    /// Samples, tokens per sample and kept tokens per sample.
    fn dims(&self) -> (usize, usize, usize) {
        let b = self.ids_keep.len();
        let n = self.ids_restore.first().map_or(0, Vec::len);
        let k = self.ids_keep.first().map_or(0, Vec::len);
        (b, n, k)
    }

    /// The kept indices, the restore positions and the masked flags, `[B·K | B·N | B·N]`, in one
    /// buffer: what [`Masking::staged`] takes uploaded.
    pub fn packed(&self) -> Vec<u32> {
        let (b, n, k) = self.dims();
        let mut out = Vec::with_capacity(b * (k + 2 * n));
        out.extend(self.ids_keep.iter().flatten());
        out.extend(self.ids_restore.iter().flatten());
        out.extend(
            self.ids_restore
                .iter()
                .flatten()
                .map(|&pos| u32::from(pos as usize >= k)),
        );
        out
    }

    /// With [`Masking::packed`] already on the device (as a page-locked upload queued beside
    /// the previous step, [`crate::cuda::Uploader`]): the forward pass then copies nothing
    /// from the host for its masking.
    pub fn staged(mut self, packed: Tensor) -> Result<Self> {
        let (b, n, k) = self.dims();
        if packed.dtype() != DType::U32 || packed.dims() != [b * (k + 2 * n)] {
            candle_core::bail!(
                "masking: a staged copy is {:?} {:?}, not u32 [{}]",
                packed.dtype(),
                packed.dims(),
                b * (k + 2 * n)
            );
        }
        self.staged = Some(packed);
        Ok(self)
    }

    /// [`Masking::staged`] through a page-locked upload queued on `up`'s stream.
    #[cfg(feature = "cuda")]
    pub fn staged_through(self, up: &mut crate::cuda::Uploader<u32>) -> Result<Self> {
        let packed = self.packed();
        let t = up.upload(&packed, packed.len())?;
        self.staged(t)
    }

    /// The indices on `dev`: the staged copy's parts, or one upload of [`Masking::packed`].
    pub fn on(&self, dev: &candle_core::Device) -> Result<MaskingOn> {
        let (b, n, k) = self.dims();
        let all = match &self.staged {
            Some(t) if t.device().same_device(dev) => t.clone(),
            _ => {
                let packed = self.packed();
                let len = packed.len();
                Tensor::from_vec(packed, len, dev)?
            }
        };
        Ok(MaskingOn {
            keep: all.narrow(0, 0, b * k)?.reshape((b, k))?,
            restore: all.narrow(0, b * k, b * n)?.reshape((b, n))?,
            masked: all.narrow(0, b * (k + n), b * n)?.reshape((b, n))?,
        })
    }

    /// Whether token `t` of sample `b` is masked.
    pub fn is_masked(&self, b: usize, t: usize) -> bool {
        self.ids_restore[b][t] as usize >= self.ids_keep[b].len()
    }
}

impl Mae {
    /// A new model under `vb` (encoder under `encoder.`, decoder under `decoder.`).
    pub fn new(vb: VarBuilder, cfg: &MaeConfig) -> Result<Self> {
        let e = &cfg.encoder;
        let dd = cfg.decoder_dim;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| {
                Block::new(
                    vb.pp(format!("decoder.blocks.{i}")),
                    dd,
                    cfg.decoder_heads,
                    e.mlp_ratio,
                    e.ln_eps,
                    0.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Vit::new(vb.pp("encoder"), e)?,
            decoder_embed: Linear::new(vb.pp("decoder.embed"), e.dim, dd)?,
            mask_token: vb.get_with_hints(
                (1, 1, dd),
                "decoder.mask_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            decoder_blocks,
            decoder_norm: Norm::new(vb.pp("decoder.norm"), dd, e.ln_eps)?,
            decoder_pred: Linear::new(vb.pp("decoder.pred"), dd, e.patch_values())?,
            compute_dtype: vb.dtype(),
        })
    }

    /// Forward pass and loss. `images` `[B, C, H, W]` (normalised, 0 where invalid), `valid`
    /// `[B, H, W]` (1 = valid pixel), `masking` from [`Masking::from_noise`], `keep` the
    /// stochastic-depth draws (`None`: no drop-path).
    pub fn forward(
        &self,
        images: &Tensor,
        valid: &Tensor,
        masking: &Masking,
        keep: Option<&crate::ops::Draws>,
    ) -> Result<MaeOutput> {
        let enc = &self.encoder;
        let (b, c, h, w) = images.dims4()?;
        let p = enc.cfg.patch;
        let (gh, gw) = (h / p, w / p);
        let n = gh * gw;
        let dev = images.device();
        let dtype = self.compute_dtype;

        let ids = masking.on(dev)?;
        // Encoder on the kept tokens.
        let tokens = enc.embed(&images.to_dtype(dtype)?)?;
        let kept = gather_tokens_at(&tokens, &ids.keep)?;
        let latent = enc.encode(&kept, keep)?;

        // Decoder on all tokens: kept ones in their places, mask tokens elsewhere.
        let x = self.decoder_embed.forward(&latent)?;
        let dd = self.cfg.decoder_dim;
        let k = kept.dim(1)?;
        let mask_tokens = self
            .mask_token
            .to_dtype(dtype)?
            .broadcast_as((b, n - k, dd))?;
        let shuffled = Tensor::cat(&[&x.narrow(1, 1, k)?, &mask_tokens], 1)?;
        let restored = gather_tokens_at(&shuffled, &ids.restore)?;
        let pos = sincos_on(gh, gw, dd, dtype, dev)?;
        let mut y = Tensor::cat(&[&x.narrow(1, 0, 1)?, &restored.broadcast_add(&pos)?], 1)?;
        for blk in &self.decoder_blocks {
            y = blk.forward(&y, None)?;
        }
        let y = self.decoder_norm.forward(&y)?;
        // The loss in f32 whatever the arithmetic before it.
        let pred = self
            .decoder_pred
            .forward(&y)?
            .narrow(1, 1, n)?
            .to_dtype(images.dtype())?;
        let dtype = images.dtype();

        // Norm-pix targets over each patch's valid pixels; the loss over masked patches.
        let target = patchify(images, p)?.detach();
        let vmask = patchify(
            &valid
                .to_dtype(dtype)?
                .unsqueeze(1)?
                .broadcast_as((b, c, h, w))?
                .contiguous()?,
            p,
        )?;
        let masked: Vec<Vec<bool>> = (0..b)
            .map(|i| (0..n).map(|t| masking.is_masked(i, t)).collect())
            .collect();
        let m = ids.masked.to_dtype(dtype)?.unsqueeze(2)?;
        // Valid pixels of masked patches.
        let weight = vmask.broadcast_mul(&m)?;
        let (loss, baseline) = masked_norm_pix_loss(&pred, &target, &weight)?;
        let baseline = baseline.to_dtype(DType::F32)?;
        Ok(MaeOutput {
            loss,
            pred,
            latent,
            baseline,
            masked,
            weight,
        })
    }
}

/// Normalise each patch of `target` `[B, N, P]` by the mean and unbiased variance of its valid
/// values (`valid` 1/0, same shape; eps 1e-6). Returns the targets and the per-value weight:
/// `valid`, zeroed for patches with fewer than 2 valid values.
pub fn norm_pix(target: &Tensor, valid: &Tensor) -> Result<(Tensor, Tensor)> {
    let cnt = valid.sum_keepdim(D::Minus1)?;
    let enough = cnt.ge(2.0)?.to_dtype(target.dtype())?;
    let safe = cnt.clamp(2.0, f64::MAX)?;
    let mean = (target * valid)?.sum_keepdim(D::Minus1)?.div(&safe)?;
    let centred = target.broadcast_sub(&mean)?;
    let var = ((&centred * valid)?.sqr()?.sum_keepdim(D::Minus1)? / (safe - 1.0)?)?;
    let t = centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
    let weight = valid.broadcast_mul(&enough)?;
    Ok((t, weight))
}

/// MAE's loss: per patch, the mean squared error over its weighted values; then the mean over
/// the masked patches (`masked` `[B, N, 1]`) that have any weighted value.
pub fn patch_loss(
    pred: &Tensor,
    target: &Tensor,
    weight: &Tensor,
    masked: &Tensor,
) -> Result<Tensor> {
    let se = ((pred - target)?.sqr()? * weight)?.sum_keepdim(D::Minus1)?;
    let cnt = weight.sum_keepdim(D::Minus1)?;
    let has = cnt.gt(0.0)?.to_dtype(pred.dtype())?;
    let per_patch = se.div(&cnt.clamp(1.0, f64::MAX)?)?;
    let w = (masked * has)?;
    let den = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if den <= 0.0 {
        return (per_patch * 0.0)?.sum_all();
    }
    (per_patch * w)?.sum_all()? / den
}
