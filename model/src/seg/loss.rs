//! The fine-tuning losses: SIC regression (MSE on the class index) and SOD/FLOE cross-entropy,
//! ignoring 255, weighted per task.

use candle_core::{D, DType, Device, Result, Tensor};
use icefm_schemas::{IGNORE, Task};

use crate::memo::{DeviceKey, Memo};

use super::SegConfig;

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
///
/// [`SegModel::forward`]: super::SegModel::forward
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
