//! The 3 × 3 convolution of the heads as im2col and one product, with its own backward
//! (`Conv3Node`, `Im2col3`): candle's conv2d backward is slow on the CPU and copies on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::fused::bias_add;

/// A 3 × 3 convolution (padding 1) on a channels-last map.
#[derive(Debug, Clone)]
pub(super) struct Conv3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3 {
    pub(super) fn new(vb: VarBuilder, inp: usize, out: usize) -> Result<Self> {
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

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
