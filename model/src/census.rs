//! What one training step asks of a device (MAE pre-training, [`mae_step`], or fine-tuning,
//! [`seg_step`]), counted on any device: every storage operation of the forward and backward
//! passes (a kernel launch on a GPU) with the bytes it reads and writes and, for matrix
//! products, its floating-point operations ([`candle_core::census`]).
//!
//! Run on the CPU with [`crate::fused::set_gpu_routes`] on, the count is the GPU step's: the
//! same graph, the same ops, the ops that choose a path by device taking the GPU's (through
//! their CPU references). A step at batch 64 costs too much on a CPU, but every count is affine
//! in the batch size (the graph is the same, each operand's size is a fixed part plus a part
//! per image), so two small batches give any other ([`extrapolate`]; 2 and 3, not 1).
//! `examples/census.rs` prints the result; docs/gpu.md reads it.

use crate::mae::{Mae, MaeConfig, Masking};
use crate::seg::{SegConfig, SegModel, seg_loss_staged};
use crate::vit::VitConfig;
use candle_core::census::Entry;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::BTreeMap;

/// One row of a census: the operations of one kind in one phase (and, where the census took
/// them, one call site), all sizes and calls together.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `forward`, or `backward: <the node whose gradient they compute>`.
    pub phase: String,
    /// The operation (`matmul`, `copy (strided)`, `binary add`, `custom icefm-…`, …).
    pub op: String,
    /// Result dtype.
    pub dtype: String,
    /// Call site (the innermost frame in `model/src/`; `""` when not taken).
    pub site: String,
    /// The largest result shape among them, as the census ran.
    pub shape: String,
    /// Operations (launches).
    pub calls: f64,
    /// Bytes read.
    pub read: f64,
    /// Bytes written.
    pub written: f64,
    /// Floating-point operations.
    pub flops: f64,
}

impl Row {
    /// Bytes moved, read and written.
    pub fn bytes(&self) -> f64 {
        self.read + self.written
    }

    /// A lower bound of the time on a device: the bytes at `bandwidth` (bytes/s), or the
    /// products' operations at `flop_rate` (FLOP/s), whichever is longer.
    pub fn seconds(&self, bandwidth: f64, flop_rate: f64) -> f64 {
        (self.bytes() / bandwidth).max(self.flops / flop_rate)
    }
}

type Key = (String, String, String, String);

/// Census entries merged over their shapes into rows keyed by phase, op, dtype and site.
pub fn rows(entries: &[Entry]) -> Vec<Row> {
    let mut by: BTreeMap<Key, (Row, u64)> = BTreeMap::new();
    for e in entries {
        let key = (
            e.phase.clone(),
            e.op.clone(),
            e.dtype.clone(),
            e.site.clone(),
        );
        let (r, largest) = by.entry(key).or_insert_with(|| {
            (
                Row {
                    phase: e.phase.clone(),
                    op: e.op.clone(),
                    dtype: e.dtype.clone(),
                    site: e.site.clone(),
                    shape: String::new(),
                    calls: 0.0,
                    read: 0.0,
                    written: 0.0,
                    flops: 0.0,
                },
                0,
            )
        });
        r.calls += e.calls as f64;
        r.read += e.bytes_read as f64;
        r.written += e.bytes_written as f64;
        r.flops += e.flops as f64;
        let per_call = e.bytes_written / e.calls.max(1);
        if per_call >= *largest {
            *largest = per_call;
            r.shape = e.shape.clone();
        }
    }
    by.into_values().map(|(r, _)| r).collect()
}

/// The rows at batch `batch` from censuses of the same step at two batch sizes, `(batch, rows)`
/// each: every size is `fixed + per_image · batch`, so it is the line through the two. Calls
/// must not depend on the batch; an error names a row whose calls do (the two censuses did not
/// run the same graph) or that only one of them has. Batch 1 is a poor base: narrowing a
/// batch of one often leaves a contiguous view that a larger batch would copy, so use 2 and 3.
pub fn extrapolate(a: (usize, &[Row]), b: (usize, &[Row]), batch: usize) -> Result<Vec<Row>> {
    let ((ba, one), (bb, two)) = (a, b);
    if ba == bb {
        candle_core::bail!("census: two batch sizes are needed, not {ba} twice");
    }
    let key = |r: &Row| {
        (
            r.phase.clone(),
            r.op.clone(),
            r.dtype.clone(),
            r.site.clone(),
        )
    };
    let ones: BTreeMap<Key, &Row> = one.iter().map(|r| (key(r), r)).collect();
    let mut out = Vec::with_capacity(two.len());
    for r2 in two {
        let Some(r1) = ones.get(&key(r2)) else {
            candle_core::bail!("census: {} {} ran at batch {bb} only", r2.phase, r2.op);
        };
        if r1.calls != r2.calls {
            candle_core::bail!(
                "census: {} {} ran {} times at batch {ba}, {} at batch {bb}",
                r2.phase,
                r2.op,
                r1.calls,
                r2.calls
            );
        }
        let t = (batch as f64 - ba as f64) / (bb as f64 - ba as f64);
        let at = |v1: f64, v2: f64| v1 + t * (v2 - v1);
        out.push(Row {
            read: at(r1.read, r2.read),
            written: at(r1.written, r2.written),
            flops: at(r1.flops, r2.flops),
            ..r2.clone()
        });
    }
    if out.len() != one.len() {
        candle_core::bail!("census: batch {ba} ran operations that batch {bb} did not");
    }
    Ok(out)
}

/// Count the forward pass `forward` (to a scalar loss) and its backward: phases `forward` and
/// `backward: <node>`. `sites`: also each operation's call site in `model/src/`.
pub fn count(sites: bool, forward: impl FnOnce() -> Result<Tensor>) -> Result<Vec<Entry>> {
    candle_core::census::start(sites.then_some("model/src/"));
    let counted = (|| {
        candle_core::census::phase("forward");
        let loss = forward()?;
        candle_core::census::phase("backward");
        loss.backward()?;
        Ok(())
    })();
    let entries = candle_core::census::finish();
    counted.map(|()| entries)
}

/// Fresh f32 variables (a model's initial weights) and `batch` random images of `px` pixels for
/// `encoder` on `dev`.
fn weights_and_images(
    encoder: &VitConfig,
    px: usize,
    batch: usize,
    dev: &Device,
) -> Result<(VarBuilder<'static>, Tensor)> {
    let vars = VarBuilder::from_varmap(&VarMap::new(), DType::F32, dev);
    let c = encoder.in_channels;
    Ok((vars, Tensor::randn(0f32, 1.0, (batch, c, px, px), dev)?))
}

/// The census of one MAE step's forward pass and backward pass (no optimizer step: its
/// kernels differ by device) on `dev`: random weights and images of `px` pixels, `batch` of
/// them, arithmetic in `dtype` (f32 master weights, as training keeps). `sites`: also take each
/// operation's call site (slow). The phases are `forward` and `backward: <node>`.
pub fn mae_step(
    cfg: &MaeConfig,
    px: usize,
    batch: usize,
    dtype: DType,
    dev: &Device,
    sites: bool,
) -> Result<Vec<Entry>> {
    let (vars, images) = weights_and_images(&cfg.encoder, px, batch, dev)?;
    let mut mae = Mae::new(vars, cfg)?;
    mae.compute_dtype = dtype;
    let valid = Tensor::ones((batch, px, px), DType::F32, dev)?;
    let n = (px / cfg.encoder.patch).pow(2);
    // The same masking for every batch size: each sample's noise depends on its index only.
    let noise: Vec<Vec<f32>> = (0..batch)
        .map(|b| {
            (0..n)
                .map(|t| ((t * 7919 + b * 31) % 1000) as f32 / 1000.0)
                .collect()
        })
        .collect();
    let masking = Masking::from_noise(&noise, cfg.mask_ratio);
    // Its indices on the device before the step, as `icefm train` stages them.
    let packed = masking.packed();
    let len = packed.len();
    let masking = masking.staged(Tensor::from_vec(packed, len, dev)?)?;
    // The steady state of training: what the first step makes and keeps (the position
    // embeddings) is made before the count, by a forward pass of one sample.
    let one = Masking::from_noise(&noise[..1], cfg.mask_ratio);
    mae.forward(
        &images.narrow(0, 0, 1)?,
        &valid.narrow(0, 0, 1)?,
        &one,
        None,
    )?;
    count(sites, || {
        Ok(mae.forward(&images, &valid, &masking, None)?.loss)
    })
}

/// The census of one fine-tuning step's forward pass (encoder, head, the three tasks' losses)
/// and backward pass, as [`mae_step`]: random weights, images of `px` pixels and labels (a
/// tenth of them ignored), `batch` of them, arithmetic in `dtype`.
pub fn seg_step(
    cfg: &SegConfig,
    px: usize,
    batch: usize,
    dtype: DType,
    dev: &Device,
    sites: bool,
) -> Result<Vec<Entry>> {
    let (vars, images) = weights_and_images(&cfg.encoder, px, batch, dev)?;
    let mut model = SegModel::new(vars, cfg)?;
    model.compute_dtype = dtype;
    let plane = px * px;
    // Each label depends on its sample's index and place only, the same for every batch size.
    let labels: Vec<u8> = (0..batch * 3 * plane)
        .map(|i| {
            let classes = [11, 6, 7][(i / plane) % 3];
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            if h.is_multiple_of(10) {
                255
            } else {
                (h % classes) as u8
            }
        })
        .collect();
    // The steady state of training: what the first step makes and keeps (the resizes'
    // resampling matrices, the classes of the loss) is made before the count, by a forward
    // pass and loss of one sample.
    let outs = model.forward(&images.narrow(0, 0, 1)?, None)?;
    seg_loss_staged(&outs, &labels[..3 * plane], None, cfg)?;
    // The labels on the device before the step, as the fine-tuning loop stages them.
    let staged = Tensor::from_slice(&labels, (batch, 3, plane), dev)?;
    count(sites, || {
        let outs = model.forward(&images, None)?;
        Ok(seg_loss_staged(&outs, &labels, Some(&staged), cfg)?.total)
    })
}
