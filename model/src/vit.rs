//! Vision Transformer encoder (pre-norm blocks, class token, fixed 2-D sin-cos position
//! embedding in SAR-IceFM's layout), built only from differentiable primitives ([`crate::ops`]).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::fused::{attention, layer_norm, linear, linear_gelu};
use crate::memo::{DeviceKey, Memo};
use crate::ops::{BlockDraws, Draws, drop_scales};

/// Encoder shape.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Token width.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Patch edge in pixels.
    pub patch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// MLP hidden width / token width.
    pub mlp_ratio: usize,
    /// Stochastic-depth rate of the last block (linear from 0 over the blocks).
    pub drop_path: f64,
    /// Layer-norm epsilon (1e-6, as MAE/mmselfsup).
    pub ln_eps: f64,
}

impl VitConfig {
    /// A preset: `tiny` (192/12/3), `small` (384/12/6), `base` (768/12/12), `large`
    /// (1024/24/16), `huge` (1280/32/16); patch 16, 2 input channels.
    pub fn preset(name: &str) -> Option<Self> {
        let (dim, depth, heads) = match name {
            "tiny" => (192, 12, 3),
            "small" => (384, 12, 6),
            "base" => (768, 12, 12),
            "large" => (1024, 24, 16),
            "huge" => (1280, 32, 16),
            _ => return None,
        };
        Some(Self {
            dim,
            depth,
            heads,
            patch: 16,
            in_channels: 2,
            mlp_ratio: 4,
            drop_path: 0.0,
            ln_eps: 1e-6,
        })
    }

    /// Values per patch token: `in_channels · patch²`.
    pub fn patch_values(&self) -> usize {
        self.in_channels * self.patch * self.patch
    }
}

/// `x · Wᵀ + b` with MAE's initialisation (Xavier-uniform weight, zero bias).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl Linear {
    /// A new layer under `vb`.
    pub fn new(vb: VarBuilder, inp: usize, out: usize) -> Result<Self> {
        let a = (6.0 / (inp + out) as f64).sqrt();
        Ok(Self {
            weight: vb.get_with_hints((out, inp), "weight", Init::Uniform { lo: -a, up: a })?,
            bias: vb.get_with_hints(out, "bias", Init::Const(0.0))?,
        })
    }

    /// Apply to `[..., in]`.
    /// Weight and bias take `x`'s dtype (bf16 training keeps f32 master weights). The leading
    /// dimensions are folded into one, so the product is a single `[rows, in] · [in, out]`
    /// matrix product: a weight broadcast over the batch would make the backward pass build
    /// one weight gradient per sample and sum them.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, w, out_dims) = self.operands(x)?;
        linear(&x2, &w, &self.bias)?.reshape(out_dims)
    }

    /// `gelu(forward(x))`, the bias add and GELU fused ([`linear_gelu`]).
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, w, out_dims) = self.operands(x)?;
        linear_gelu(&x2, &w, &self.bias)?.reshape(out_dims)
    }

    /// `x` as `[rows, in]`, the weight in `x`'s dtype, and the output's dimensions.
    fn operands(&self, x: &Tensor) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let dims = x.dims();
        let inp = dims.last().copied().unwrap_or(1);
        let rows = x.elem_count() / inp.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        let w = self.weight.to_dtype(x.dtype())?;
        Ok((x.reshape((rows, inp))?, w, out_dims))
    }
}

/// Layer norm with learned scale and shift ([`layer_norm`]).
#[derive(Debug, Clone)]
pub struct Norm {
    /// Scale.
    pub weight: Tensor,
    /// Shift.
    pub bias: Tensor,
    eps: f64,
}

impl Norm {
    /// A new norm under `vb` (scale 1, shift 0).
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// Apply over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Multi-head self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            qkv: Linear::new(vb.pp("qkv"), dim, 3 * dim)?,
            proj: Linear::new(vb.pp("proj"), dim, dim)?,
            heads,
        })
    }

    /// `[B, N, D]` → `[B, N, D]` ([`attention`] between the projections).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj
            .forward(&attention(&self.qkv.forward(x)?, self.heads)?)
    }
}

/// Two-layer MLP with exact (erf) GELU.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), dim, hidden)?,
            fc2: Linear::new(vb.pp("fc2"), hidden, dim)?,
        })
    }

    /// `[..., D]` → `[..., D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_gelu(x)?)
    }
}

/// A pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    ln1: Norm,
    attn: Attention,
    ln2: Norm,
    mlp: Mlp,
    drop_path: f64,
}

impl Block {
    /// A new block under `vb`.
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        mlp_ratio: usize,
        eps: f64,
        drop_path: f64,
    ) -> Result<Self> {
        Ok(Self {
            ln1: Norm::new(vb.pp("ln1"), dim, eps)?,
            attn: Attention::new(vb.pp("attn"), dim, heads)?,
            ln2: Norm::new(vb.pp("ln2"), dim, eps)?,
            mlp: Mlp::new(vb.pp("mlp"), dim, dim * mlp_ratio)?,
            drop_path,
        })
    }

    /// `x + attn(ln1(x))`, then `+ mlp(ln2(·))`; `keep` draws for stochastic depth (training
    /// only; `None` at inference).
    pub fn forward(&self, x: &Tensor, keep: Option<BlockDraws<'_>>) -> Result<Tensor> {
        let a = self.attn.forward(&self.ln1.forward(x)?)?;
        let a = match &keep {
            Some(k) => k.apply(&a, self.drop_path, 0)?,
            None => a,
        };
        let x = (x + a)?;
        let m = self.mlp.forward(&self.ln2.forward(&x)?)?;
        let m = match &keep {
            Some(k) => k.apply(&m, self.drop_path, 1)?,
            None => m,
        };
        x + m
    }
}

/// [`sincos_2d`] as a `[1, h·w, dim]` tensor on `dev` in `dtype`, made once per grid, width,
/// dtype and device and kept: made at every forward pass, it was a copy from the host (on a
/// GPU one that waits for the queue to drain) and a cast.
pub fn sincos_on(h: usize, w: usize, dim: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    type Key = (usize, usize, usize, DType, DeviceKey);
    static TABLES: Memo<Key, Tensor> = Memo::new();
    TABLES.get_or_make((h, w, dim, dtype, DeviceKey(dev.clone())), || {
        Tensor::from_vec(sincos_2d(h, w, dim), (1, h * w, dim), dev)?.to_dtype(dtype)
    })
}

/// Fixed 2-D sin-cos position embedding `[h·w, dim]` for a `h × w` token grid (row-major), in
/// SAR-IceFM's (mmselfsup's) layout: `[sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)]`, the first half
/// encoding the row `r`, with `ω_k = 10000^(−k / (dim/4))`.
pub fn sincos_2d(h: usize, w: usize, dim: usize) -> Vec<f32> {
    let q = dim / 4;
    let omega: Vec<f64> = (0..q)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / q as f64))
        .collect();
    let mut out = vec![0f32; h * w * dim];
    for r in 0..h {
        for c in 0..w {
            let row = &mut out[(r * w + c) * dim..(r * w + c + 1) * dim];
            for (k, o) in omega.iter().enumerate() {
                let (a, b) = (r as f64 * o, c as f64 * o);
                row[k] = a.sin() as f32;
                row[q + k] = a.cos() as f32;
                row[2 * q + k] = b.sin() as f32;
                row[3 * q + k] = b.cos() as f32;
            }
        }
    }
    out
}

/// `[B, C, H, W]` → `[B, N, C·p·p]`, tokens row-major, values in `(c, i, j)` order (the order of
/// a flattened `[D, C, p, p]` convolution kernel).
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    x.reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, gh * gw, c * p * p))
}

/// The encoder.
#[derive(Debug, Clone)]
pub struct Vit {
    /// Shape.
    pub cfg: VitConfig,
    /// Patch embedding: a `[D, C·p·p]` linear map of patchified input (= a stride-p convolution).
    pub patch_embed: Linear,
    /// `[1, 1, D]`.
    pub cls_token: Tensor,
    /// Blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: Norm,
}

impl Vit {
    /// A new encoder under `vb`.
    pub fn new(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let blocks = (0..cfg.depth)
            .map(|i| {
                let dp = if cfg.depth > 1 {
                    cfg.drop_path * i as f64 / (cfg.depth - 1) as f64
                } else {
                    0.0
                };
                Block::new(
                    vb.pp(format!("blocks.{i}")),
                    cfg.dim,
                    cfg.heads,
                    cfg.mlp_ratio,
                    cfg.ln_eps,
                    dp,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: Linear::new(vb.pp("patch_embed"), cfg.patch_values(), cfg.dim)?,
            cls_token: vb.get_with_hints(
                (1, 1, cfg.dim),
                "cls_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            blocks,
            norm: Norm::new(vb.pp("norm"), cfg.dim, cfg.ln_eps)?,
        })
    }

    /// Position embedding `[1, h·w, D]` for a token grid ([`sincos_on`]).
    pub fn pos_embed(&self, h: usize, w: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
        sincos_on(h, w, self.cfg.dim, dtype, dev)
    }

    /// Patch tokens with position embedding: `[B, C, H, W]` → `[B, N, D]`.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        let p = self.cfg.patch;
        let tokens = self.patch_embed.forward(&patchify(images, p)?)?;
        tokens.broadcast_add(&self.pos_embed(h / p, w / p, images.dtype(), images.device())?)
    }

    /// Prepend the class token (its position embedding is 0) and run the blocks and the final
    /// norm: `[B, N, D]` → `[B, 1 + N, D]`. `keep` gives stochastic-depth draws per block.
    pub fn encode(&self, tokens: &Tensor, keep: Option<&Draws>) -> Result<Tensor> {
        let mut x = self.with_cls(tokens)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let k = match keep {
                Some(k) => k.block(i)?,
                None => None,
            };
            x = blk.forward(&x, k)?;
        }
        self.norm.forward(&x)
    }

    /// The stochastic-depth scales `draws` give, f32 `[blocks, 2, B]` (each block at its own
    /// rate): what [`Draws::staged`] takes uploaded.
    pub fn drop_scales(&self, draws: &Draws) -> Vec<f32> {
        let mut out = Vec::new();
        for (blk, (attn, mlp)) in self.blocks.iter().zip(&draws.per_block) {
            // A block without stochastic depth ignores its scales.
            let p = blk.drop_path.max(0.0);
            out.extend(drop_scales(p, attn));
            out.extend(drop_scales(p, mlp));
        }
        out
    }

    /// `[B, N, D]` → `[B, 1 + N, D]` with the class token first.
    fn with_cls(&self, tokens: &Tensor) -> Result<Tensor> {
        let b = tokens.dim(0)?;
        let cls = self
            .cls_token
            .to_dtype(tokens.dtype())?
            .broadcast_as((b, 1, self.cfg.dim))?;
        Tensor::cat(&[&cls, tokens], 1)
    }

    /// The outputs of the blocks listed in `layers` (0-based, ascending), each `[B, 1 + N, D]`,
    /// for a segmentation neck. The output of the last block, if listed, passes the final norm
    /// (the norm MAE pre-training trained on it). Blocks after the last listed one are not run.
    pub fn features(
        &self,
        tokens: &Tensor,
        layers: &[usize],
        keep: Option<&Draws>,
    ) -> Result<Vec<Tensor>> {
        let mut x = self.with_cls(tokens)?;
        let last = layers.iter().copied().max().unwrap_or(0);
        let mut outs: Vec<Option<Tensor>> = vec![None; self.blocks.len()];
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            let k = match keep {
                Some(k) => k.block(i)?,
                None => None,
            };
            x = blk.forward(&x, k)?;
            if layers.contains(&i) {
                outs[i] = Some(if i + 1 == self.blocks.len() {
                    self.norm.forward(&x)?
                } else {
                    x.clone()
                });
            }
        }
        layers
            .iter()
            .map(|&i| {
                outs.get(i).cloned().flatten().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "feature layer {i} is not below the depth {}",
                        self.blocks.len()
                    ))
                })
            })
            .collect()
    }

    /// Inference: images → `[B, 1 + N, D]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.encode(&self.embed(images)?, None)
    }
}
