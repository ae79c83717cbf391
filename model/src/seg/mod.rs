//! Segmentation for SIC, SOD and FLOE: a ViT encoder, a feature pyramid made from four of its
//! blocks, and one head per task: UPerNet (as SAR-IceFM) or a light FCN head for CPU runs.
//!
//! Feature maps are channels-last (`[B, H, W, C]`, the token layout), so every 1 × 1
//! convolution is one matrix product ([`Linear`]). Resizing is a product with fixed
//! interpolation matrices on each axis ([`resize`]): bilinear (PyTorch's `align_corners=False`)
//! or adaptive average pooling, exact for any size and differentiable on every device.
//!
//! The pyramid follows mmsegmentation's `Feature2Pyramid` for ViT/MAE backbones: block outputs
//! at ×4 (two 2 × 2 transposed convolutions with a norm and GELU between), ×2 (one), ×1 and ×0.5
//! (2 × 2 average pooling; mmsegmentation takes the maximum). mmsegmentation's batch norms are
//! layer norms over channels here: a batch of 8 crops gives poor batch statistics, and a layer
//! norm behaves the same in training and inference.
//!
//! Variables: `encoder.*` (the names of MAE checkpoints and imported SAR-IceFM encoders, so
//! `--init` maps one to one), `neck.*`, `heads.{sic,sod,floe}.*`.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use icefm_schemas::Task;

use crate::fused::gelu;
use crate::memo::{DeviceKey, Memo};
use crate::vit::{Linear, Norm, Vit, VitConfig};

mod conv;
mod loss;

use conv::Conv3;
pub use conv::{Im2col3, conv3x3};
pub use loss::{
    SegLoss, class_of, label_counts, log_softmax, seg_loss, seg_loss_shared, seg_loss_staged,
};

/// Which head each task gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// Lateral 1 × 1 projections of the four levels summed at ×4, norm, GELU, classifier.
    Fcn,
    /// UPerNet: pyramid pooling on the coarsest level, a top-down path, 3 × 3 convolutions.
    UperNet,
}

impl HeadKind {
    /// From its config name, `fcn` or `upernet`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fcn" => Some(Self::Fcn),
            "upernet" => Some(Self::UperNet),
            _ => None,
        }
    }
}

/// How SIC is learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SicLoss {
    /// Regression on the class index 0–10 (mean squared error), as SAR-IceFM.
    Mse,
    /// 11-class cross-entropy.
    CrossEntropy,
}

/// Shape of a segmentation model.
#[derive(Debug, Clone, PartialEq)]
pub struct SegConfig {
    /// The encoder.
    pub encoder: VitConfig,
    /// The four blocks (0-based) whose outputs feed the pyramid.
    pub layers: [usize; 4],
    /// Head kind.
    pub head: HeadKind,
    /// Head width (channels).
    pub channels: usize,
    /// Tasks, each with its own head.
    pub tasks: Vec<Task>,
    /// SIC loss.
    pub sic_loss: SicLoss,
    /// Loss weight per task, indexed by [`Task::channel`] (SAR-IceFM: 1, 3, 3).
    pub task_weights: [f64; 3],
}

impl SegConfig {
    /// SAR-IceFM's fine-tuning model on `encoder`: features of the default four blocks, one
    /// UPerNet head of 512 channels per task (SIC, SOD, FLOE), SIC as MSE, weights 1, 3, 3
    /// (what `configs/seg_vit_b.toml` sets).
    pub fn sar_icefm(encoder: VitConfig) -> Self {
        Self {
            layers: Self::default_layers(encoder.depth),
            encoder,
            head: HeadKind::UperNet,
            channels: 512,
            tasks: Task::ALL.to_vec(),
            sic_loss: SicLoss::Mse,
            task_weights: [1.0, 3.0, 3.0],
        }
    }

    /// Blocks evenly spaced over the encoder, ending at the last (12 blocks: 2, 5, 8, 11, as
    /// SAR-IceFM's ViT-B).
    pub fn default_layers(depth: usize) -> [usize; 4] {
        [1, 2, 3, 4].map(|k| (k * depth / 4).max(1) - 1)
    }

    /// Output channels of a task's head: 1 for SIC regression, else its class count.
    pub fn outputs(&self, task: Task) -> usize {
        match (task, self.sic_loss) {
            (Task::Sic, SicLoss::Mse) => 1,
            _ => task.n_classes(),
        }
    }
}

/// Resampling of a feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// Bilinear, half-pixel centres (PyTorch `align_corners=False`, no antialiasing).
    Bilinear,
    /// Adaptive average pooling (PyTorch `adaptive_avg_pool2d`).
    AreaMean,
}

/// Row-major `[out, inp]` matrix mapping `inp` samples to `out` along one axis.
pub fn resample_matrix(kind: Resample, out: usize, inp: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    if inp == 0 {
        return m;
    }
    for i in 0..out {
        let row = &mut m[i * inp..(i + 1) * inp];
        match kind {
            Resample::Bilinear => {
                let scale = inp as f64 / out as f64;
                let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                let l = (src - i0 as f64) as f32;
                row[i0] += 1.0 - l;
                row[i1] += l;
            }
            Resample::AreaMean => {
                let a = i * inp / out;
                let b = ((i + 1) * inp).div_ceil(out).max(a + 1);
                for v in &mut row[a..b] {
                    *v = 1.0 / (b - a) as f32;
                }
            }
        }
    }
    m
}

/// [`resample_matrix`] on `dev` in `dt`, made once per process and device: built on the host
/// at every call, each matrix was a copy to the GPU that waits for the queue to drain, and a
/// cast, about a hundred of each per fine-tuning step.
fn resample_on(kind: Resample, out: usize, inp: usize, dev: &Device, dt: DType) -> Result<Tensor> {
    type Key = (Resample, usize, usize, DType, DeviceKey);
    static MATRICES: Memo<Key, Tensor> = Memo::new();
    MATRICES.get_or_make((kind, out, inp, dt, DeviceKey(dev.clone())), || {
        Tensor::from_vec(resample_matrix(kind, out, inp), (out, inp), dev)?.to_dtype(dt)
    })
}

/// Resize a channels-last map `[B, H, W, C]` to `[B, h, w, C]`: a product with a fixed matrix
/// along each axis, each a batched product whose left operand is the matrix broadcast over the
/// batch (no transposed copies of the map either way; the matrices get no gradient).
pub fn resize(x: &Tensor, h: usize, w: usize, kind: Resample) -> Result<Tensor> {
    let (b, h0, w0, c) = x.dims4()?;
    if (h0, w0) == (h, w) {
        return Ok(x.clone());
    }
    let (dev, dt) = (x.device(), x.dtype());
    let mh = resample_on(kind, h, h0, dev, dt)?;
    let mw = resample_on(kind, w, w0, dev, dt)?;
    // Rows: Mh [h, H] · x[b] [H, W·C] → [B, h, W·C].
    let y = mh
        .broadcast_as((b, h, h0))?
        .matmul(&x.contiguous()?.reshape((b, h0, w0 * c))?)?;
    // Columns: Mw [w, W] · y[b, i] [W, C] → [B·h, w, C].
    mw.broadcast_as((b * h, w, w0))?
        .matmul(&y.reshape((b * h, w0, c))?)?
        .reshape((b, h, w, c))
}

/// A 2 × 2, stride-2 transposed convolution on a channels-last map: one matrix product to
/// `4·C_out` channels, then each pixel's four outputs moved to their 2 × 2 cell.
#[derive(Debug, Clone)]
struct Up2 {
    lin: Linear,
    out: usize,
}

impl Up2 {
    fn new(vb: VarBuilder, inp: usize, out: usize) -> Result<Self> {
        Ok(Self {
            lin: Linear::new(vb, inp, 4 * out)?,
            out,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = x.dims4()?;
        self.lin
            .forward(x)?
            .reshape((b, h, w, 2, 2, self.out))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((b, 2 * h, 2 * w, self.out))
    }
}

/// A convolution (1 × 1 or 3 × 3), a layer norm over channels and a ReLU: mmsegmentation's
/// `ConvModule` with its batch norm as a layer norm.
#[derive(Debug, Clone)]
struct ConvNorm {
    conv: Kernel,
    norm: Norm,
}

#[derive(Debug, Clone)]
enum Kernel {
    One(Linear),
    Three(Conv3),
}

impl ConvNorm {
    fn new(vb: VarBuilder, inp: usize, out: usize, k3: bool, eps: f64) -> Result<Self> {
        let conv = if k3 {
            Kernel::Three(Conv3::new(vb.pp("conv"), inp, out)?)
        } else {
            Kernel::One(Linear::new(vb.pp("conv"), inp, out)?)
        };
        Ok(Self {
            conv,
            norm: Norm::new(vb.pp("norm"), out, eps)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.conv {
            Kernel::One(l) => l.forward(x)?,
            Kernel::Three(c) => c.forward(x)?,
        };
        crate::fused::relu(&self.norm.forward(&y.contiguous()?)?)
    }
}

/// The pyramid: four block outputs `[B, h, w, D]` → ×4, ×2, ×1, ×0.5.
#[derive(Debug, Clone)]
struct Neck {
    up4a: Up2,
    up4_norm: Norm,
    up4b: Up2,
    up2: Up2,
}

impl Neck {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            up4a: Up2::new(vb.pp("up4.0"), dim, dim)?,
            up4_norm: Norm::new(vb.pp("up4.norm"), dim, eps)?,
            up4b: Up2::new(vb.pp("up4.1"), dim, dim)?,
            up2: Up2::new(vb.pp("up2"), dim, dim)?,
        })
    }

    fn forward(&self, f: &[Tensor]) -> Result<Vec<Tensor>> {
        let p4 = self
            .up4b
            .forward(&gelu(&self.up4_norm.forward(&self.up4a.forward(&f[0])?)?)?)?;
        let p8 = self.up2.forward(&f[1])?;
        let p16 = f[2].clone();
        let (_, h, w, _) = f[3].dims4()?;
        let p32 = resize(&f[3], h.div_ceil(2), w.div_ceil(2), Resample::AreaMean)?;
        Ok(vec![p4, p8, p16, p32])
    }
}

/// The light head: lateral projections of the four levels summed at ×4, norm, GELU,
/// classifier.
#[derive(Debug, Clone)]
struct FcnHead {
    lateral: Vec<Linear>,
    norm: Norm,
    cls: Linear,
}

impl FcnHead {
    fn new(vb: VarBuilder, dim: usize, ch: usize, out: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            lateral: (0..4)
                .map(|i| Linear::new(vb.pp(format!("lateral.{i}")), dim, ch))
                .collect::<Result<_>>()?,
            norm: Norm::new(vb.pp("norm"), ch, eps)?,
            cls: Linear::new(vb.pp("cls"), ch, out)?,
        })
    }

    fn forward(&self, pyr: &[Tensor]) -> Result<Tensor> {
        let (_, h, w, _) = pyr[0].dims4()?;
        let mut s = self.lateral[0].forward(&pyr[0])?;
        for (lat, p) in self.lateral.iter().zip(pyr).skip(1) {
            s = (s + resize(&lat.forward(p)?, h, w, Resample::Bilinear)?)?;
        }
        self.cls.forward(&gelu(&self.norm.forward(&s)?)?)
    }
}

/// UPerNet (mmsegmentation's `UPerHead`, pool scales 1, 2, 3, 6).
#[derive(Debug, Clone)]
struct UperHead {
    ppm: Vec<(usize, ConvNorm)>,
    bottleneck: ConvNorm,
    lateral: Vec<ConvNorm>,
    fpn: Vec<ConvNorm>,
    fuse: ConvNorm,
    cls: Linear,
}

impl UperHead {
    const POOL_SCALES: [usize; 4] = [1, 2, 3, 6];

    fn new(vb: VarBuilder, dim: usize, ch: usize, out: usize, eps: f64) -> Result<Self> {
        let ppm = Self::POOL_SCALES
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                Ok((
                    s,
                    ConvNorm::new(vb.pp(format!("ppm.{i}")), dim, ch, false, eps)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            ppm,
            bottleneck: ConvNorm::new(vb.pp("bottleneck"), dim + 4 * ch, ch, true, eps)?,
            lateral: (0..3)
                .map(|i| ConvNorm::new(vb.pp(format!("lateral.{i}")), dim, ch, false, eps))
                .collect::<Result<_>>()?,
            fpn: (0..3)
                .map(|i| ConvNorm::new(vb.pp(format!("fpn.{i}")), ch, ch, true, eps))
                .collect::<Result<_>>()?,
            fuse: ConvNorm::new(vb.pp("fuse"), 4 * ch, ch, true, eps)?,
            cls: Linear::new(vb.pp("cls"), ch, out)?,
        })
    }

    fn forward(&self, pyr: &[Tensor]) -> Result<Tensor> {
        let top = &pyr[3];
        let (_, th, tw, _) = top.dims4()?;
        let mut parts = vec![top.clone()];
        for (s, conv) in &self.ppm {
            let pooled = resize(top, *s, *s, Resample::AreaMean)?;
            parts.push(resize(&conv.forward(&pooled)?, th, tw, Resample::Bilinear)?);
        }
        let mut lat: Vec<Tensor> = self
            .lateral
            .iter()
            .zip(pyr)
            .map(|(l, p)| l.forward(p))
            .collect::<Result<_>>()?;
        lat.push(self.bottleneck.forward(&Tensor::cat(&parts, 3)?)?);
        for i in (1..4).rev() {
            let (_, h, w, _) = lat[i - 1].dims4()?;
            let up = resize(&lat[i], h, w, Resample::Bilinear)?;
            lat[i - 1] = (&lat[i - 1] + up)?;
        }
        let (_, h, w, _) = lat[0].dims4()?;
        let mut outs = Vec::with_capacity(4);
        for (i, l) in lat.iter().enumerate() {
            let o = if i < 3 {
                self.fpn[i].forward(l)?
            } else {
                l.clone()
            };
            outs.push(resize(&o, h, w, Resample::Bilinear)?);
        }
        self.cls
            .forward(&self.fuse.forward(&Tensor::cat(&outs, 3)?)?)
    }
}

#[derive(Debug, Clone)]
enum Head {
    Fcn(FcnHead),
    UperNet(UperHead),
}

/// Encoder, pyramid and heads.
#[derive(Debug, Clone)]
pub struct SegModel {
    /// Shape.
    pub cfg: SegConfig,
    /// The encoder (`encoder.*`).
    pub encoder: Vit,
    neck: Neck,
    heads: Vec<(Task, Head)>,
    /// Arithmetic dtype of the forward pass (weights stay in the variables' dtype).
    pub compute_dtype: DType,
    /// Cut the graph after the encoder (linear probing: only the neck and heads train).
    pub freeze_encoder: bool,
}

impl SegModel {
    /// A new model under `vb`.
    pub fn new(vb: VarBuilder, cfg: &SegConfig) -> Result<Self> {
        let e = &cfg.encoder;
        if cfg.layers.iter().any(|&l| l >= e.depth) {
            candle_core::bail!(
                "feature layers {:?} must be below the encoder depth {}",
                cfg.layers,
                e.depth
            );
        }
        let heads = cfg
            .tasks
            .iter()
            .map(|&t| {
                let vb = vb.pp(format!("heads.{}", t.name().to_lowercase()));
                let out = cfg.outputs(t);
                Ok((
                    t,
                    match cfg.head {
                        HeadKind::Fcn => {
                            Head::Fcn(FcnHead::new(vb, e.dim, cfg.channels, out, e.ln_eps)?)
                        }
                        HeadKind::UperNet => {
                            Head::UperNet(UperHead::new(vb, e.dim, cfg.channels, out, e.ln_eps)?)
                        }
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Vit::new(vb.pp("encoder"), e)?,
            neck: Neck::new(vb.pp("neck"), e.dim, e.ln_eps)?,
            heads,
            compute_dtype: vb.dtype(),
            freeze_encoder: false,
        })
    }

    /// `images` `[B, C, H, W]` (H, W multiples of the patch) → per task, outputs
    /// `[B, H, W, K]` in the images' dtype (logits, or the SIC class index for regression).
    /// `keep`: stochastic-depth draws (training only).
    pub fn forward(
        &self,
        images: &Tensor,
        keep: Option<&crate::ops::Draws>,
    ) -> Result<Vec<(Task, Tensor)>> {
        let (b, _, h, w) = images.dims4()?;
        let p = self.cfg.encoder.patch;
        let (gh, gw) = (h / p, w / p);
        let enc = &self.encoder;
        let tokens = enc.embed(&images.to_dtype(self.compute_dtype)?)?;
        let feats = enc.features(&tokens, &self.cfg.layers, keep)?;
        let feats: Vec<Tensor> = feats
            .iter()
            .map(|f| {
                let f = f.narrow(1, 1, gh * gw)?.reshape((b, gh, gw, enc.cfg.dim))?;
                Ok(if self.freeze_encoder { f.detach() } else { f })
            })
            .collect::<Result<_>>()?;
        let pyr = self.neck.forward(&feats)?;
        self.heads
            .iter()
            .map(|(t, head)| {
                let y = match head {
                    Head::Fcn(f) => f.forward(&pyr)?,
                    Head::UperNet(u) => u.forward(&pyr)?,
                };
                let y = resize(&y, h, w, Resample::Bilinear)?.to_dtype(images.dtype())?;
                Ok((*t, y))
            })
            .collect()
    }
}
