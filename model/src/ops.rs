//! Differentiable building blocks. candle 0.11's fast `candle_nn::ops::layer_norm`,
//! `softmax_last_dim` and `rms_norm` record no backward (and `candle_nn::LayerNorm` takes that
//! path for contiguous input), so a model built on them trains only part of its weights without
//! any error. Everything here is composed of primitives that do record their backward; the
//! tests check every parameter gets a gradient and compare gradients with finite differences.

use candle_core::{D, DType, Result, Tensor};

/// Layer norm over the last dimension: `(x − mean) / sqrt(var + eps) · weight + bias`, with the
/// biased variance (as PyTorch's `nn.LayerNorm`).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    centred
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last dimension, shifted by the (constant) row maximum for stability.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Stochastic depth: zero whole samples (first dimension) with probability `p` and scale the
/// others by `1 / (1 − p)`. `keep` holds one uniform number in `[0, 1)` per sample.
pub fn drop_path(x: &Tensor, p: f64, keep: &[f32]) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let s = Tensor::from_vec(drop_scales(p, &keep[..b.min(keep.len())]), b, x.device())?;
    drop_path_scaled(x, p, &s)
}

/// [`drop_path`] with the per-sample scales already made (`scale` f32 `[B]`, [`drop_scales`];
/// on a GPU, uploaded beside the step: nothing copied from the host here).
pub fn drop_path_scaled(x: &Tensor, p: f64, scale: &Tensor) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    x.broadcast_mul(&scale.to_dtype(x.dtype())?.reshape(shape)?)
}

/// Each sample's stochastic-depth scale at rate `p` from its uniform draw: `1 / (1 − p)` when
/// the draw is at least `p`, else 0.
pub fn drop_scales(p: f64, keep: &[f32]) -> Vec<f32> {
    keep.iter()
        .map(|&u| {
            if f64::from(u) >= p {
                (1.0 / (1.0 - p)) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// A training step's stochastic-depth draws: per block, one uniform number in `[0, 1)` per
/// sample for the attention branch and one for the MLP branch, and, once staged
/// ([`crate::vit::Vit::drop_scales`], [`Draws::staged`]), the scales they give already on the
/// device, so that the forward pass copies nothing from the host for them.
#[derive(Debug, Clone)]
pub struct Draws {
    /// Per block: (attention branch, MLP branch), one draw per sample each.
    pub per_block: Vec<(Vec<f32>, Vec<f32>)>,
    /// f32 `[blocks, 2, B]`: each branch's scale per sample.
    scales: Option<Tensor>,
}

impl Draws {
    /// Draws on the host only.
    pub fn new(per_block: Vec<(Vec<f32>, Vec<f32>)>) -> Self {
        Self {
            per_block,
            scales: None,
        }
    }

    /// With the scales on the device: `[blocks, 2, B]` f32, as [`crate::vit::Vit::drop_scales`]
    /// lays them out.
    pub fn staged(mut self, scales: Tensor) -> Result<Self> {
        let b = self.per_block.first().map_or(0, |(a, _)| a.len());
        if scales.dims() != [self.per_block.len(), 2, b] || scales.dtype() != DType::F32 {
            candle_core::bail!(
                "drop-path scales {:?} {:?}, not f32 [{}, 2, {b}]",
                scales.dtype(),
                scales.dims(),
                self.per_block.len()
            );
        }
        self.scales = Some(scales);
        Ok(self)
    }

    /// Block `i`'s draws, with its staged scales (`[2, B]`) where there are some.
    pub fn block(&self, i: usize) -> Result<Option<BlockDraws<'_>>> {
        let Some((attn, mlp)) = self.per_block.get(i) else {
            return Ok(None);
        };
        let scales = match &self.scales {
            Some(s) => Some(s.get(i)?),
            None => None,
        };
        Ok(Some(BlockDraws { attn, mlp, scales }))
    }
}

/// One block's stochastic-depth draws ([`Draws::block`]).
#[derive(Debug, Clone)]
pub struct BlockDraws<'a> {
    /// The attention branch's draw per sample.
    pub attn: &'a [f32],
    /// The MLP branch's draw per sample.
    pub mlp: &'a [f32],
    /// Both branches' scales on the device, f32 `[2, B]`, when staged.
    pub scales: Option<Tensor>,
}

impl BlockDraws<'_> {
    /// `x` through stochastic depth at rate `p` with branch `branch`'s draws (0 attention,
    /// 1 MLP): from the staged scales, or from the host draws.
    pub fn apply(&self, x: &Tensor, p: f64, branch: usize) -> Result<Tensor> {
        match &self.scales {
            Some(s) => drop_path_scaled(x, p, &s.get(branch)?),
            None => drop_path(x, p, if branch == 0 { self.attn } else { self.mlp }),
        }
    }
}

/// Mean of `x` over the positions where `weight` is 1 (`weight` broadcastable to `x`); 0 when
/// nothing is weighted.
pub fn weighted_mean(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let w = weight.to_dtype(x.dtype())?;
    let num = x.broadcast_mul(&w)?.sum_all()?;
    let den = w.broadcast_as(x.shape())?.sum_all()?;
    let den_v = den.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if den_v <= 0.0 {
        return num.zeros_like();
    }
    num / den_v
}
