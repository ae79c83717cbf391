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

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use candle_nn::{Init, VarBuilder};
use icefm_schemas::{IGNORE, Task};
use rayon::prelude::*;

use crate::fused::{bias_add, gelu};
use crate::memo::{DeviceKey, Memo};
use crate::vit::{Linear, Norm, Vit, VitConfig};

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

/// A 3 × 3 convolution (padding 1) on a channels-last map.
#[derive(Debug, Clone)]
struct Conv3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3 {
    fn new(vb: VarBuilder, inp: usize, out: usize) -> Result<Self> {
        let a = (6.0 / (9 * (inp + out)) as f64).sqrt();
        Ok(Self {
            weight: vb.get_with_hints(
                (out, inp, 3, 3),
                "weight",
                Init::Uniform { lo: -a, up: a },
            )?,
            bias: vb.get_with_hints(out, "bias", Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv3x3(x, &self.weight, &self.bias)
    }
}

/// A 3 × 3 convolution, stride 1, zero padding 1, on a channels-last map `x` `[B, H, W, C]`
/// with PyTorch's weight layout `[C_out, C, 3, 3]` and bias `[C_out]` (cast to `x`'s dtype):
/// the nine shifted copies of `x` side by side ([`Im2col3`]), then one matrix product, as one
/// graph node whose backward recomputes the copies (they are never kept).
/// Candle's `conv2d` computes the same, but its backward (a transposed convolution, and a
/// convolution with the whole map as its kernel) is orders of magnitude slower on a GPU.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (out, inp, kh, kw) = weight.dims4()?;
    if (inp, kh, kw) != (c, 3, 3) {
        candle_core::bail!("conv3x3: weight {:?} for {c} input channels", weight.dims());
    }
    // [C_out, C, 3, 3] → [3, 3, C, C_out] → [9·C, C_out]: row (dy·3 + dx)·C + c.
    let k = weight
        .to_dtype(x.dtype())?
        .permute((2, 3, 1, 0))?
        .contiguous()?
        .reshape((9 * c, out))?;
    let x = x.contiguous()?;
    // The product on detached inputs, then one graph node whose backward recomputes the
    // columns: the [B·H·W, 9·C] columns are never kept for the backward pass.
    let y = columns(&x.detach(), Im2col3::COLUMNS)?
        .matmul(&k.detach())?
        .reshape((b, h, w, out))?
        .contiguous()?;
    let y = x.apply_op3(&k, &y, Conv3Node)?;
    bias_add(&y, bias)
}

/// `op`'s columns of a contiguous `[B, H, W, C]` map as `[B·H·W, 9·C]` rows.
fn columns(x: &Tensor, op: Im2col3) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.apply_op1_no_bwd(&op)?.reshape((b * h * w, 9 * c))
}

/// [`conv3x3`]'s graph node `(x [B, H, W, C], k [9·C, C_out], y)`: forward passes the product
/// `y` through; backward recomputes the columns of `x` for `dk = colsᵀ·dy` and returns
/// `dx = col2im(dy·kᵀ)`, or, with no more output than input channels, takes both from the
/// mirrored columns of `dy` (`9·C_out` wide instead of `9·C`; `x`'s columns are not
/// recomputed). Peak memory is then one layer's columns, not every layer's.
#[derive(Debug, Clone, Copy)]
struct Conv3Node;

impl CustomOp3 for Conv3Node {
    fn name(&self) -> &'static str {
        "icefm-conv3x3"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::fused::pass_through(s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::fused::pass_through(s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, w, c) = x.dims4()?;
        let out = k.dim(1)?;
        let g = grad.contiguous()?.reshape((b * h * w, out))?;
        if out > c {
            // dk = colsᵀ·dy from the recomputed columns of x; dx = col2im(dy·kᵀ).
            let dk = columns(&x.detach(), Im2col3::COLUMNS)?.t()?.matmul(&g)?;
            let dx = g
                .matmul(&k.detach().t()?)?
                .reshape((b, h, w, 9 * c))?
                .apply_op1_no_bwd(&Im2col3::ADJOINT)?;
            return Ok((Some(dx), Some(dk), None));
        }
        // No more output than input channels (the UPerNet fusion conv: 2,048 → 512; its
        // pyramid's: 512 → 512): both gradients from the mirrored columns of dy,
        // m[p, tap·C_out + o] = dy[p − offset(tap), o], 9·C_out wide, written once and read
        // twice, where the way above writes and reads x's columns and dy·kᵀ, each 9·C wide:
        //   dx[p, c] = Σ_tap,o m[p, tap·C_out + o] · k[tap·C + c, o] (k per tap transposed);
        //   dk[tap·C + c, o] = Σ_p x[p, c] · m[p, tap·C_out + o] (xᵀ·m, per tap transposed back).
        let m = columns(&g.reshape((b, h, w, out))?, Im2col3::MIRRORED)?;
        let kt = k
            .detach()
            .reshape((9, c, out))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((9 * out, c))?;
        let dx = m.matmul(&kt)?.reshape((b, h, w, c))?;
        let dk = x
            .detach()
            .reshape((b * h * w, c))?
            .t()?
            .matmul(&m)?
            .reshape((c, 9, out))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((9 * c, out))?;
        Ok((Some(dx), Some(dk), None))
    }
}

/// 3 × 3 im2col of a channels-last map with zero padding 1: `[B, H, W, C]` → `[B, H, W, 9·C]`,
/// value `(dy·3 + dx)·C + c` of pixel `(y, x)` = `x[y + dy − 1, x + dx − 1, c]` (0 outside the
/// map), in one pass; its backward is the adjoint (`adjoint: true`: `[B, H, W, 9·C]` →
/// `[B, H, W, C]`, each pixel the sum of its nine copies' gradients). `mirrored`: the taps
/// point-reflected, `x[y − dy + 1, x − dx + 1, c]` (a convolution's gradients, for input and
/// kernel, both come from its output gradient's mirrored columns; no backward). CPU (rayon over pixels)
/// and CUDA ([`crate::cuda::im2col3`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2col3 {
    /// The backward direction.
    pub adjoint: bool,
    /// The taps point-reflected (forward direction only).
    pub mirrored: bool,
}

impl Im2col3 {
    /// The columns.
    pub const COLUMNS: Self = Self {
        adjoint: false,
        mirrored: false,
    };
    /// The columns' adjoint.
    pub const ADJOINT: Self = Self {
        adjoint: true,
        mirrored: false,
    };
    /// The columns with the taps point-reflected.
    pub const MIRRORED: Self = Self {
        adjoint: false,
        mirrored: true,
    };

    /// The map's `(B, H, W, C)` from the input's layout.
    fn map(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (b, h, w, c) = l.shape().dims4()?;
        if self.adjoint && self.mirrored {
            candle_core::bail!("col2im: there is no mirrored adjoint");
        }
        if self.adjoint {
            if c % 9 != 0 {
                candle_core::bail!("col2im: {c} channels are not 9 × C");
            }
            return Ok((b, h, w, c / 9));
        }
        Ok((b, h, w, c))
    }

    fn out_shape(&self, (b, h, w, c): (usize, usize, usize, usize)) -> Shape {
        Shape::from((b, h, w, if self.adjoint { c } else { 9 * c }))
    }
}

impl CustomOp1 for Im2col3 {
    fn name(&self) -> &'static str {
        "icefm-im2col3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = self.map(l)?;
        let (a, z) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("im2col needs a contiguous map".into()))?;
        fn go<T: WithDType>(
            x: &[T],
            (b, h, w, c): (usize, usize, usize, usize),
            Im2col3 { adjoint, mirrored }: Im2col3,
        ) -> CpuStorage {
            let pixel = |p: usize| (p / (h * w), (p / w) % h, p % w);
            let inside =
                |y: isize, x: isize| y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w;
            let mut out = vec![T::zero(); b * h * w * if adjoint { c } else { 9 * c }];
            if adjoint {
                out.par_chunks_mut(c).enumerate().for_each(|(p, o)| {
                    let (bi, y, xx) = pixel(p);
                    let mut acc = vec![0f64; c];
                    for tap in 0..9 {
                        let ty = y as isize - (tap / 3) as isize + 1;
                        let tx = xx as isize - (tap % 3) as isize + 1;
                        if inside(ty, tx) {
                            let src = (((bi * h + ty as usize) * w + tx as usize) * 9 + tap) * c;
                            for (a, gv) in acc.iter_mut().zip(&x[src..src + c]) {
                                *a += gv.to_f64();
                            }
                        }
                    }
                    for (ov, a) in o.iter_mut().zip(acc) {
                        *ov = T::from_f64(a);
                    }
                });
            } else {
                out.par_chunks_mut(9 * c).enumerate().for_each(|(p, o)| {
                    let (bi, y, xx) = pixel(p);
                    for (tap, ot) in o.chunks_mut(c).enumerate() {
                        let (oy, ox) = ((tap / 3) as isize - 1, (tap % 3) as isize - 1);
                        let (oy, ox) = if mirrored { (-oy, -ox) } else { (oy, ox) };
                        let (sy, sx) = (y as isize + oy, xx as isize + ox);
                        if inside(sy, sx) {
                            let src = ((bi * h + sy as usize) * w + sx as usize) * c;
                            ot.copy_from_slice(&x[src..src + c]);
                        }
                    }
                });
            }
            T::to_cpu_storage_owned(out)
        }
        let dims = (b, h, w, c);
        let out = match s {
            CpuStorage::F32(v) => go(&v[a..z], dims, *self),
            CpuStorage::F64(v) => go(&v[a..z], dims, *self),
            CpuStorage::BF16(v) => go(&v[a..z], dims, *self),
            CpuStorage::F16(v) => go(&v[a..z], dims, *self),
            _ => candle_core::bail!("im2col: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, self.out_shape(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.map(l)?;
        let out = crate::cuda::im2col3(s, l, dims, *self)?;
        Ok((out, self.out_shape(dims)))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if self.adjoint || self.mirrored {
            candle_core::bail!("col2im and mirrored columns have no backward (unused)");
        }
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&Im2col3::ADJOINT)?,
        ))
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

/// Log-softmax over the last dimension, shifted by the (constant) row maximum.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let d = x.broadcast_sub(&max)?;
    let lse = d.exp()?.sum_keepdim(D::Minus1)?.log()?;
    d.broadcast_sub(&lse)
}

/// A training loss and its parts.
#[derive(Debug, Clone)]
pub struct SegLoss {
    /// `Σ weight_t · loss_t`, differentiable.
    pub total: Tensor,
    /// Per task, in `counts`' order: its unweighted loss, f32 `[tasks]`, on the outputs'
    /// device (not read: a read would make the host wait for the forward pass).
    pub values: Tensor,
    /// Per task: the labelled pixels it saw.
    pub counts: Vec<(Task, usize)>,
}

impl SegLoss {
    /// Per task: its unweighted loss (read back) and the labelled pixels it saw.
    pub fn parts(&self) -> Result<Vec<(Task, f32, usize)>> {
        let values = self.values.to_vec1::<f32>()?;
        Ok(self
            .counts
            .iter()
            .zip(values)
            .map(|(&(t, n), v)| (t, v, n))
            .collect())
    }
}

/// The class indices `0..k` as f32 on `dev`, made once (an `arange` copies them from the host).
fn classes_on(k: usize, dev: &Device) -> Result<Tensor> {
    static CLASSES: Memo<(usize, DeviceKey), Tensor> = Memo::new();
    CLASSES.get_or_make((k, DeviceKey(dev.clone())), || {
        Tensor::arange(0u32, k as u32, dev)?.to_dtype(DType::F32)
    })
}

/// The multi-task loss of `outputs` ([`SegModel::forward`]) against `labels` `u8 [B, 3, H, W]`
/// (SIC, SOD, FLOE; 255 ignored): mean squared error on the SIC class index (one output) or
/// cross-entropy, averaged over each task's labelled pixels. A task without a labelled pixel
/// in the batch contributes 0.
pub fn seg_loss(outputs: &[(Task, Tensor)], labels: &[u8], cfg: &SegConfig) -> Result<SegLoss> {
    seg_loss_staged(outputs, labels, None, cfg)
}

/// [`seg_loss`] with `labels` already on the outputs' device (`staged`, u8 `[B, 3, H·W]`, as
/// the training loop's page-locked upload leaves them): no copy from the host. The host copy
/// `labels` still gives each task's labelled-pixel count and the class checks.
pub fn seg_loss_staged(
    outputs: &[(Task, Tensor)],
    labels: &[u8],
    staged: Option<&Tensor>,
    cfg: &SegConfig,
) -> Result<SegLoss> {
    seg_loss_shared(outputs, labels, staged, cfg, None)
}

/// The labelled (not 255) pixels of each task in `labels` (u8 `[B, 3, H·W]`, planes of
/// `plane` = H·W pixels), by channel.
pub fn label_counts(labels: &[u8], plane: usize) -> [usize; 3] {
    let mut n = [0; 3];
    for (k, p) in labels.chunks(plane.max(1)).enumerate() {
        n[k % 3] += p.iter().filter(|&&l| l != IGNORE).count();
    }
    n
}

/// [`seg_loss_staged`] for one rank of a data-parallel run: each task's sum divided by
/// `shared[channel]` in place of this rank's own labelled-pixel count. With `shared` the whole
/// batch's count over the number of ranks, the ranks' mean loss (and gradient) is the whole
/// batch's: each task a mean over all its labelled pixels, as in one process.
pub fn seg_loss_shared(
    outputs: &[(Task, Tensor)],
    labels: &[u8],
    staged: Option<&Tensor>,
    cfg: &SegConfig,
    shared: Option<[f64; 3]>,
) -> Result<SegLoss> {
    let mut total: Option<Tensor> = None;
    let (mut values, mut counts) = (Vec::new(), Vec::new());
    // The labels go to the outputs' device once; masks, targets and one-hot codes are made
    // there (on a GPU the host would otherwise build and copy B·H·W·K floats per task).
    let mut on_device: Option<Tensor> = staged.cloned();
    for (task, y) in outputs {
        let (b, h, w, k) = y.dims4()?;
        let plane = h * w;
        if labels.len() != b * 3 * plane {
            candle_core::bail!(
                "labels hold {} values, expected {}",
                labels.len(),
                b * 3 * plane
            );
        }
        let ch = task.channel();
        let task_labels = || (0..b).flat_map(|s| &labels[(s * 3 + ch) * plane..][..plane]);
        let n = task_labels().filter(|&&v| v != IGNORE).count();
        if k > 1
            && let Some(&v) = task_labels().find(|&&v| v != IGNORE && usize::from(v) >= k)
        {
            candle_core::bail!("{} label {v} is not below its {k} classes", task.name());
        }
        let (dev, dt) = (y.device(), y.dtype());
        let den = shared.map_or(n as f64, |d| d[ch]);
        let loss = if n == 0 {
            // Zero, with a zero gradient for the head: candle's backward skips a product with
            // the constant 0, which would leave the head without a gradient at all.
            (y - y.detach())?.sqr()?.sum_all()?
        } else {
            let all = match &on_device {
                Some(t) => t.clone(),
                None => {
                    let t = Tensor::from_slice(labels, (b, 3, plane), dev)?;
                    on_device = Some(t.clone());
                    t
                }
            };
            let lab = all
                .narrow(1, ch, 1)?
                .to_dtype(DType::F32)?
                .reshape((b, h, w, 1))?;
            if k == 1 {
                let ignore = crate::fused::filled(&lab, f64::from(IGNORE))?;
                let m = lab.ne(&ignore)?.to_dtype(dt)?;
                let t = (lab.to_dtype(dt)? * &m)?;
                (((y - t)?.sqr()? * m)?.sum_all()? / den)?
            } else {
                // Ignored pixels (255) match no class: an all-zero row.
                let classes = classes_on(k, dev)?;
                let t = lab.broadcast_eq(&classes)?.to_dtype(dt)?;
                ((log_softmax(y)? * t)?.sum_all()? / -den)?
            }
        };
        values.push(loss.to_dtype(DType::F32)?);
        counts.push((*task, n));
        let weighted = (loss * cfg.task_weights[task.channel()])?;
        total = Some(match total {
            Some(t) => t.add(&weighted)?,
            None => weighted,
        });
    }
    let total = match total {
        Some(t) => t,
        None => candle_core::bail!("the model has no task"),
    };
    Ok(SegLoss {
        total,
        values: Tensor::stack(&values, 0)?,
        counts,
    })
}

/// The class of one pixel from its outputs: the argmax of `K > 1` scores (first wins ties),
/// or one SIC regression value rounded and clamped to 0–10.
pub fn class_of(values: &[f32], task: Task) -> u8 {
    match values {
        [] => IGNORE,
        [v] => v.round().clamp(0.0, (task.n_classes() - 1) as f32) as u8,
        _ => {
            let mut best = 0;
            for (j, &v) in values.iter().enumerate() {
                if v > values[best] {
                    best = j;
                }
            }
            best as u8
        }
    }
}
