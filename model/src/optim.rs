//! AdamW with SAR-IceFM's parameter groups, the learning-rate schedule and gradient clipping.
//! Written here rather than taken from candle-nn: candle's AdamW keeps its moments private, and
//! an exact resume needs them in the checkpoint.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// Optimiser settings (MAE's defaults but the learning rate).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay (0.95 in MAE).
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay of the decay group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// Whether a parameter is exempt from weight decay, as SAR-IceFM: norms and biases (1-D
/// tensors) and the position, class and mask tokens.
pub fn no_decay(name: &str, rank: usize) -> bool {
    rank <= 1
        || ["cls_token", "mask_token", "pos_embed"]
            .iter()
            .any(|t| name.ends_with(t))
}

struct Slot {
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    step: u64,
}

impl AdamW {
    /// An optimiser for `vars` (name → variable), moments at zero.
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (name, var) in vars {
            let t = var.as_tensor();
            // Two buffers: the fused CUDA step updates the moments in place.
            let m = Tensor::zeros(t.shape(), DType::F32, t.device())?;
            let v = Tensor::zeros(t.shape(), DType::F32, t.device())?;
            slots.insert(
                name.clone(),
                Slot {
                    decay: !no_decay(&name, t.rank()),
                    v,
                    m,
                    var,
                },
            );
        }
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|(_, s)| s.decay)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// One update with learning rate `lr`, the gradients scaled by `grad_scale` (clipping).
    /// A parameter without a gradient is an error: it would silently never train.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step_clipped(
            grads,
            lr,
            &Clip::Host {
                norm: f64::NAN,
                scale: grad_scale,
            },
        )
    }

    /// [`AdamW::step`] with the scale of [`clip`]'s result. On a GPU whose clipping left the
    /// sum of squares on the device, the update kernel computes the scale from it: nothing is
    /// read back between the backward pass and the update.
    pub fn step_clipped(&mut self, grads: &GradStore, lr: f64, clip: &Clip) -> Result<()> {
        #[cfg(feature = "cuda")]
        if crate::fused::fused()
            && self
                .slots
                .values()
                .next()
                .is_some_and(|s| s.var.as_tensor().device().is_cuda())
        {
            return self.step_cuda(grads, lr, clip);
        }
        let grad_scale = clip.scale()?;
        if crate::fused::fused() && self.cpu_f32() {
            return self.step_cpu(grads, lr, grad_scale);
        }
        self.step_composed(grads, lr, grad_scale)
    }

    /// [`AdamW::step`] as candle tensor operations (any device and dtype; `ICEFM_FUSED=0`).
    fn step_composed(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for (name, s) in &mut self.slots {
            let w = s.var.as_tensor();
            let Some(g) = grads.get(w) else {
                candle_core::bail!("parameter {name} received no gradient");
            };
            let g = (g.to_dtype(DType::F32)? * grad_scale)?;
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&s.m / c1)? / ((&s.v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let w32 = w.to_dtype(DType::F32)?;
            let update = if s.decay {
                (update + (&w32 * self.cfg.weight_decay)?)?
            } else {
                update
            };
            let next = (w32 - (update * lr)?)?.to_dtype(w.dtype())?;
            s.var.set(&next)?;
        }
        Ok(())
    }

    /// Whether every parameter is an f32 CPU tensor (the fused CPU step's case).
    fn cpu_f32(&self) -> bool {
        self.slots.values().all(|s| {
            let w = s.var.as_tensor();
            w.device().is_cpu() && w.dtype() == DType::F32
        })
    }

    /// [`AdamW::step`] in place on the CPU: per parameter, the two moments and then the weights
    /// in one pass each over their memory (rayon), instead of a dozen whole-tensor operations
    /// with their allocations. The same f32 arithmetic as the CUDA kernel.
    fn step_cpu(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let update = |decay: bool| crate::fused::AdamUpdate {
            lr: lr as f32,
            c1: (1.0 - b1.powi(t)) as f32,
            c2: (1.0 - b2.powi(t)) as f32,
            eps: self.cfg.eps as f32,
            wd: if decay {
                self.cfg.weight_decay as f32
            } else {
                0.0
            },
        };
        for (name, s) in &self.slots {
            let w = s.var.as_tensor();
            let Some(g) = grads.get(w) else {
                candle_core::bail!("parameter {name} received no gradient");
            };
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            for (m, beta, square) in [(&s.m, b1, false), (&s.v, b2, true)] {
                m.inplace_op2(
                    &g,
                    &crate::fused::AdamMoment {
                        beta: beta as f32,
                        scale: grad_scale as f32,
                        square,
                    },
                )?;
            }
            w.inplace_op3(&s.m, &s.v, &update(s.decay))?;
        }
        Ok(())
    }

    /// [`AdamW::step`] as one launch of icefm's fused kernel over every parameter (CUDA).
    #[cfg(feature = "cuda")]
    fn step_cuda(&mut self, grads: &GradStore, lr: f64, clip: &Clip) -> Result<()> {
        let (grad_scale, on_device) = match clip {
            Clip::Host { scale, .. } => (*scale, None),
            Clip::Device { sumsq, max_norm } => (1.0, Some((sumsq, *max_norm))),
        };
        let mut gs = Vec::with_capacity(self.slots.len());
        for (name, s) in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                candle_core::bail!("parameter {name} received no gradient");
            };
            gs.push(g.to_dtype(DType::F32)?.contiguous()?);
        }
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let slots: Vec<crate::cuda::AdamSlot<'_>> = self
            .slots
            .values()
            .zip(&gs)
            .map(|(s, g)| crate::cuda::AdamSlot {
                w: s.var.as_tensor(),
                m: &s.m,
                v: &s.v,
                g,
                decay: s.decay,
            })
            .collect();
        crate::cuda::adamw_step(
            &slots,
            crate::cuda::AdamStep {
                lr: lr as f32,
                b1: b1 as f32,
                b2: b2 as f32,
                c1: (1.0 - b1.powi(t)) as f32,
                c2: (1.0 - b2.powi(t)) as f32,
                eps: self.cfg.eps as f32,
                wd: self.cfg.weight_decay as f32,
                gscale: grad_scale as f32,
            },
            on_device,
        )
    }

    /// The moments and step, for a checkpoint: `{name}.m`, `{name}.v`.
    pub fn state(&self) -> (u64, Vec<(String, Tensor)>) {
        let mut out = Vec::new();
        for (n, s) in &self.slots {
            out.push((format!("{n}.m"), s.m.clone()));
            out.push((format!("{n}.v"), s.v.clone()));
        }
        (self.step, out)
    }

    /// Restore [`AdamW::state`]; every moment must be present with its shape.
    pub fn load_state(&mut self, step: u64, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (n, s) in &mut self.slots {
            for (suffix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{n}.{suffix}");
                let t = tensors.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no {key}"))
                })?;
                if t.dims() != slot.dims() {
                    candle_core::bail!(
                        "optimizer state {key}: shape {:?}, want {:?}",
                        t.dims(),
                        slot.dims()
                    );
                }
                // A copy of its own: the fused CUDA step updates the moments in place.
                *slot = t.to_dtype(DType::F32)?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The gradients' global L2 norm before clipping and the scale that clips it: on the host,
/// or, on a GPU with icefm's kernels, the sum of squares still on the device, so that the
/// backward pass, the norm and the update are queued with no read back between them.
#[derive(Debug, Clone)]
pub enum Clip {
    /// Known on the host.
    Host {
        /// The norm.
        norm: f64,
        /// `max_norm / (norm + 1e-6)` when the norm is over `max_norm > 0`, else 1.
        scale: f64,
    },
    /// Still on the device.
    Device {
        /// The gradients' sum of squares, f64 `[1]`.
        sumsq: Tensor,
        /// The norm clipped to (≤ 0: no clipping).
        max_norm: f64,
    },
}

impl Clip {
    /// The norm (a read back, which waits for the backward pass, when it is on the device).
    pub fn norm(&self) -> Result<f64> {
        match self {
            Self::Host { norm, .. } => Ok(*norm),
            Self::Device { sumsq, .. } => Ok(sumsq.to_vec1::<f64>()?[0].sqrt()),
        }
    }

    /// The clipping scale (a read back when the norm is on the device).
    pub fn scale(&self) -> Result<f64> {
        match self {
            Self::Host { scale, .. } => Ok(*scale),
            Self::Device { max_norm, .. } => Ok(scale_for(self.norm()?, *max_norm).1),
        }
    }
}

/// Global L2 norm of the gradients of `vars`, and the scale that clips it to `max_norm`
/// (1 when under, or when `max_norm` ≤ 0): [`clip`], read on the host.
pub fn clip_scale<'a>(
    grads: &GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<(f64, f64)> {
    let c = clip(grads, vars, max_norm)?;
    Ok((c.norm()?, c.scale()?))
}

/// [`clip_scale`] without the read back on a GPU with icefm's kernels ([`Clip::Device`]);
/// elsewhere [`Clip::Host`].
pub fn clip<'a>(
    grads: &GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<Clip> {
    let vars: Vec<&Var> = vars.into_iter().collect();
    let host = |norm: f64| {
        let (norm, scale) = scale_for(norm, max_norm);
        Clip::Host { norm, scale }
    };
    #[cfg(feature = "cuda")]
    if crate::fused::fused()
        && vars
            .first()
            .is_some_and(|v| v.as_tensor().device().is_cuda())
    {
        let gs: Vec<Tensor> = vars
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()))
            .map(|g| g.to_dtype(DType::F32)?.contiguous())
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = gs.iter().collect();
        return Ok(match crate::cuda::sum_squares_on_device(&refs)? {
            Some(sumsq) => Clip::Device { sumsq, max_norm },
            None => host(0.0),
        });
    }
    if crate::fused::fused()
        && vars
            .first()
            .is_some_and(|v| v.as_tensor().device().is_cpu())
    {
        let gs: Vec<&Tensor> = vars
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()))
            .collect();
        return Ok(host(crate::fused::sum_squares_cpu(&gs)?.sqrt()));
    }
    // One device-to-host read for all parameters (a read per parameter stalls a GPU each time).
    let mut parts = Vec::new();
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            parts.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
        }
    }
    let sq = if parts.is_empty() {
        0.0
    } else {
        Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f64>()?
    };
    Ok(host(sq.sqrt()))
}

/// The norm and the clipping scale for it.
fn scale_for(norm: f64, max_norm: f64) -> (f64, f64) {
    let scale = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    (norm, scale)
}

/// Learning rate at `step` (0-based): a linear warm-up over `warmup` steps from `start` × `base`
/// (0: from nothing) to `base`, then a half cosine from `base` to `min_lr` at `total`.
pub fn lr_at(step: u64, base: f64, warmup: u64, start: f64, total: u64, min_lr: f64) -> f64 {
    if step < warmup {
        return base * (start + (1.0 - start) * (step + 1) as f64 / warmup as f64);
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use candle_core::Device;

    use super::*;

    #[test]
    fn adamw_matches_hand_computed_steps() {
        // The fused CPU step and the composed one, each against f64 by hand.
        for fused in [true, false] {
            hand_computed_steps(fused);
        }
    }

    #[test]
    fn the_cpu_gradient_norm_is_the_composed_one() {
        let dev = Device::Cpu;
        let a = Tensor::arange(-3f32, 5.0, &dev)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        let b = Tensor::new(&[0.5f64, -1.5], &dev).unwrap();
        let t = a.t().unwrap(); // non-contiguous
        let want = 2.0 * (9.0 + 4.0 + 1.0 + 0.0 + 1.0 + 4.0 + 9.0 + 16.0) + 0.25 + 2.25;
        let got = crate::fused::sum_squares_cpu(&[&a, &b, &t]).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    fn hand_computed_steps(fused: bool) {
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f32, -2.0]], &dev).unwrap(); // rank 2: decayed
        let b = Var::new(&[0.5f32], &dev).unwrap(); // rank 1: not decayed
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(
            [
                ("l.weight".to_string(), w.clone()),
                ("l.bias".to_string(), b.clone()),
            ],
            cfg,
        )
        .unwrap();
        assert_eq!(opt.decayed(), vec!["l.weight"]);
        // loss = 3·w0 + w1² + 4·b → grads (3, 2·w1, 4).
        let lr = 0.01;
        let mut expect_w = [1.0f64, -2.0];
        let mut expect_b = 0.5f64;
        let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
        for t in 1..=2 {
            let loss = ((w.as_tensor().narrow(1, 0, 1).unwrap() * 3.0)
                .unwrap()
                .sum_all()
                .unwrap()
                + w.as_tensor()
                    .narrow(1, 1, 1)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            if fused {
                opt.step_cpu(&grads, lr, 1.0).unwrap();
            } else {
                opt.step_composed(&grads, lr, 1.0).unwrap();
            }
            let g = [3.0, 2.0 * expect_w[1], 4.0];
            let p = [expect_w[0], expect_w[1], expect_b];
            let mut next = [0f64; 3];
            for k in 0..3 {
                m[k] = 0.9 * m[k] + 0.1 * g[k];
                v[k] = 0.95 * v[k] + 0.05 * g[k] * g[k];
                let mh = m[k] / (1.0 - 0.9f64.powi(t));
                let vh = v[k] / (1.0 - 0.95f64.powi(t));
                let decay = if k < 2 { 0.1 * p[k] } else { 0.0 };
                next[k] = p[k] - lr * (mh / (vh.sqrt() + 1e-8) + decay);
            }
            expect_w = [next[0], next[1]];
            expect_b = next[2];
            let got: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                (f64::from(got[0]) - expect_w[0]).abs() < 1e-6,
                "step {t}: {got:?}"
            );
            assert!(
                (f64::from(got[1]) - expect_w[1]).abs() < 1e-6,
                "step {t}: {got:?}"
            );
            let gb: Vec<f32> = b.as_tensor().to_vec1().unwrap();
            assert!((f64::from(gb[0]) - expect_b).abs() < 1e-6, "step {t}");
        }
        // The state round-trips.
        let (step, tensors) = opt.state();
        let map: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        let mut again = AdamW::new(
            [("l.weight".to_string(), w), ("l.bias".to_string(), b)],
            AdamWConfig::default(),
        )
        .unwrap();
        again.load_state(step, &map).unwrap();
        assert_eq!(again.steps(), 2);
        let (_, t2) = again.state();
        for (k, t) in t2 {
            let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = map[&k].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        }
        let mut missing = map.clone();
        missing.remove("l.bias.v");
        assert!(again.load_state(2, &missing).is_err());
    }

    #[test]
    fn groups_schedule_and_clipping() {
        assert!(no_decay("encoder.cls_token", 3));
        assert!(no_decay("decoder.mask_token", 3));
        assert!(no_decay("encoder.blocks.0.ln1.weight", 1));
        assert!(!no_decay("encoder.blocks.0.attn.qkv.weight", 2));
        // Warm-up 10 steps to 1e-3, cosine to 0 at 110.
        assert!((lr_at(0, 1e-3, 10, 0.0, 110, 0.0) - 1e-4).abs() < 1e-12);
        assert!((lr_at(9, 1e-3, 10, 0.0, 110, 0.0) - 1e-3).abs() < 1e-12);
        assert!((lr_at(10, 1e-3, 10, 0.0, 110, 0.0) - 1e-3).abs() < 1e-12);
        assert!((lr_at(60, 1e-3, 10, 0.0, 110, 0.0) - 5e-4).abs() < 1e-12);
        assert!(lr_at(110, 1e-3, 10, 0.0, 110, 1e-5) - 1e-5 < 1e-12);
        // From a third (SAR-IceFM's LinearLR): 1/3 + 2/3 × 1/10 of lr at the first step, lr at
        // the last warm-up step, the same cosine after.
        assert!((lr_at(0, 9e-4, 10, 1.0 / 3.0, 110, 0.0) - 3.6e-4).abs() < 1e-12);
        assert!((lr_at(9, 9e-4, 10, 1.0 / 3.0, 110, 0.0) - 9e-4).abs() < 1e-12);
        assert_eq!(
            lr_at(60, 1e-3, 10, 1.0 / 3.0, 110, 0.0),
            lr_at(60, 1e-3, 10, 0.0, 110, 0.0)
        );
        let dev = Device::Cpu;
        let x = Var::new(&[3.0f32, 4.0], &dev).unwrap();
        let grads = x
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap(); // (6, 8)
        let (norm, scale) = clip_scale(&grads, [&x], 5.0).unwrap();
        assert!((norm - 10.0).abs() < 1e-9);
        assert!((scale - 0.5).abs() < 1e-6);
        assert_eq!(clip_scale(&grads, [&x], 20.0).unwrap().1, 1.0);
    }
}
