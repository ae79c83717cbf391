//! Gradients summed over a step's parts (`train.accumulate`), scaled, and applied by the optimizer.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::config::TrainConfig;
use crate::dist::{Group, Weights};
use crate::optim::{AdamW, Clip, clip, lr_at};
use crate::threads::on_worker;

use super::TrainError;

/// A step's gradients over its micro-batches (`train.accumulate`) on this rank, each
/// micro-batch's weighed by its number of loss terms (or 1): `Σ wₘ·gₘ`, the values likewise,
/// and `Σ wₘ`. [`Accumulated::finish`] turns them into the weighted mean over every rank's
/// micro-batches, the gradient of the whole batch. One micro-batch in one process costs
/// nothing: its gradients are the step's as they are.
pub(crate) struct Accumulated {
    grads: Option<GradStore>,
    values: Vec<Tensor>,
    /// The weight of the only micro-batch so far, not yet applied to its gradients.
    pending: Option<Tensor>,
    /// `Σ wₘ` once more than one micro-batch is in.
    total: Option<Tensor>,
}

impl Accumulated {
    pub fn new() -> Self {
        Self {
            grads: None,
            values: Vec::new(),
            pending: None,
            total: None,
        }
    }

    /// The backward pass of a micro-batch's `loss` (its `values` for the record), weighed by
    /// `weight` (a scalar; `None`: 1), added in.
    pub fn add(
        &mut self,
        loss: &Tensor,
        vars: &[Var],
        values: Vec<Tensor>,
        weight: Option<Tensor>,
    ) -> Result<(), TrainError> {
        let grads = on_worker(loss.device().is_cpu(), || loss.backward())?;
        // Detached: a value that kept its graph would keep the micro-batch's activations
        // alive until the step ends.
        let values: Vec<Tensor> = values.iter().map(Tensor::detach).collect();
        let Some(mut acc) = self.grads.take() else {
            self.grads = Some(grads);
            self.values = values;
            self.pending = weight;
            return Ok(());
        };
        let dev = loss.device();
        let one = || Tensor::new(1f32, dev);
        // The first micro-batch's weight, now that it is a sum.
        let first = match self.pending.take() {
            Some(w) => {
                scale_grads(&mut acc, vars, &w)?;
                self.values = scaled(&self.values, &w)?;
                w
            }
            None => one()?,
        };
        let w = match weight {
            Some(w) => w,
            None => one()?,
        };
        on_worker(dev.is_cpu(), || -> candle_core::Result<()> {
            for v in vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let gw = g.broadcast_mul(&w.to_dtype(g.dtype())?)?;
                    let sum = match acc.get(v.as_tensor()) {
                        Some(a) => (a + gw)?,
                        None => gw,
                    };
                    acc.insert(v.as_tensor(), sum);
                }
            }
            Ok(())
        })?;
        let more = scaled(&values, &w)?;
        self.values = self
            .values
            .iter()
            .zip(&more)
            .map(|(a, b)| a + b)
            .collect::<candle_core::Result<_>>()?;
        let before = match self.total.take() {
            Some(t) => t,
            None => first,
        };
        self.total = Some((before.to_dtype(DType::F32)? + w.to_dtype(DType::F32)?)?);
        self.grads = Some(acc);
        Ok(())
    }

    /// The step's gradients of `vars` and its values: the weighted mean over every rank's
    /// micro-batches ([`Group::reduce`]).
    pub fn finish(
        self,
        group: &mut Group,
        vars: &[Var],
    ) -> Result<(GradStore, Vec<Tensor>), TrainError> {
        let mut grads = self
            .grads
            .ok_or_else(|| TrainError::Setup("a step without a micro-batch".into()))?;
        let weights = match (&self.total, &self.pending) {
            (Some(t), _) => Weights::Summed(t),
            (None, Some(w)) => Weights::Scale(w),
            (None, None) => Weights::Equal,
        };
        let values = group.reduce(&mut grads, vars, &self.values, weights)?;
        Ok((grads, values))
    }
}

fn scale_grads(grads: &mut GradStore, vars: &[Var], w: &Tensor) -> candle_core::Result<()> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let gw = g.broadcast_mul(&w.to_dtype(g.dtype())?)?;
            grads.insert(v.as_tensor(), gw);
        }
    }
    Ok(())
}

fn scaled(values: &[Tensor], w: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    values
        .iter()
        .map(|v| v.broadcast_mul(&w.to_dtype(v.dtype())?))
        .collect()
}

/// Clipping and one AdamW update of step `step` from the step's `grads`; returns the
/// clipping (the gradient norm before clipping, on a GPU still on the device) and the
/// learning rate.
pub(crate) fn apply(
    grads: &GradStore,
    vars: &[Var],
    opt: &mut AdamW,
    cfg: &TrainConfig,
    step: u64,
) -> Result<(Clip, f64), TrainError> {
    let t = &cfg.train;
    let lr = lr_at(
        step,
        t.lr,
        t.warmup_steps,
        t.warmup_start,
        t.steps,
        t.min_lr,
    );
    let cpu = vars.first().is_none_or(|v| v.device().is_cpu());
    on_worker(cpu, || {
        let c = clip(grads, vars.iter(), t.clip_grad)?;
        opt.step_clipped(grads, lr, &c)?;
        Ok((c, lr))
    })
}
