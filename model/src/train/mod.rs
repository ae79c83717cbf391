//! MAE pre-training runs: the loop, checkpoints, exact resume, metrics.
//!
//! Everything random in step `s` (its batch, each sample's mask noise, the drop-path draws) is a
//! function of the seed and `s` alone, and the initial weights of the seed alone. So a run
//! stopped after a checkpoint and resumed gives the same losses as one that never stopped: a
//! checkpoint holds the weights, the optimizer moments and the step, and nothing else is needed.
//!
//! Run directory: `config.toml` (as resolved), `log.txt`, `metrics.parquet` (step, loss, baseline, lr,
//! grad_norm, images_per_s, levels), `checkpoints/step_NNNNNNN/{model,optimizer}.safetensors`
//! with `state.json`, `panels/step_NNNNNNN.png`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::rng::Rng;
use icefm_dataset::{Loader, Sampler};

use crate::config::TrainConfig;
use crate::dist::Group;
use crate::mae::{Mae, Masking};
use crate::optim::{AdamW, AdamWConfig};
use crate::panel::{panel, write_png};
use crate::threads::on_worker;

mod accumulate;
mod checkpoint;
mod device;
mod feeder;
mod records;
mod run;
mod start;

pub(crate) use accumulate::{Accumulated, apply};
pub(crate) use checkpoint::{
    agree_on_weights, checkpoint_due, end_step, load_checkpoint, tensors_of, whole_folder,
    write_checkpoint_folder,
};
pub use checkpoint::{checkpoints, config_of_run};
pub use device::{DeviceName, cuda_device_count, parse_device};
pub(crate) use feeder::{DeviceBatch, Feeder, drop_draws};
pub(crate) use records::{PendingRecord, StepStart, write_parquet};
pub use records::{StepRecord, read_metrics, write_metrics};
pub use run::{
    FAILED_PREFIX, check_batch_split, check_start, record_failure, run_holder, scenes_to_train,
};
pub(crate) use run::{RunDir, Share, agree_on_data, agree_with_ranks, open_loader, open_run};
pub use start::{RegimeRead, RunStart, STARTS_FILE, run_sar_resample, run_starts};

/// What the ranks of a data-parallel run compare when they resume: the step of the checkpoint
/// each found in `--out` (a folder every rank must see).
pub(crate) const RESUME_STEPS: &str = "steps to resume from (each rank reads the checkpoints of --out, which must be one folder \
     that every rank sees, shared between nodes)";
/// What they compare once the weights are loaded or initialised.
pub(crate) const START_WEIGHTS: &str =
    "weights at the start (from --out's checkpoint, seg.init or the seed)";

/// Random streams (xor-ed into the seed) of the things drawn per step.
const MASK_STREAM: u64 = 0x4D41_534B;
const DROP_STREAM: u64 = 0x4452_4F50;
const INIT_STREAM: u64 = 0x494E_4954;

/// A training failure, one line.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad configuration or run directory.
    #[error("{0}")]
    Setup(String),
    /// The data.
    #[error(transparent)]
    Data(#[from] icefm_dataset::DatasetError),
    /// The model.
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// Files.
    #[error("{path}: {reason}")]
    Io {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
}

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps done in total.
    pub steps_done: u64,
    /// Steps done by this call.
    pub steps_run: u64,
    /// Stopped early (Ctrl-C) after saving.
    pub interrupted: bool,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// All records of the run so far.
    pub records: Vec<StepRecord>,
    /// Validation passes so far (fine-tuning with a validation regime).
    pub validation: Vec<crate::finetune::ValRecord>,
}

/// Where to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The store.
    pub store: PathBuf,
    /// Run directory.
    pub out: PathBuf,
    /// Continue from the newest checkpoint of `out`.
    pub resume: bool,
    /// Where the model runs (`Device::Cpu`, or a CUDA device with feature `cuda`).
    pub device: Device,
}

/// Deterministic initial weights for `seed`, by name (candle's own initialisers draw from an
/// unseeded generator): Xavier-uniform matrices and kernels, normal(0.02) tokens, unit norm scales, zero
/// biases and shifts.
pub fn init_weights(vars: &VarMap, seed: u64) -> candle_core::Result<()> {
    for (i, (name, var)) in named_vars(vars).iter().enumerate() {
        let t = var.as_tensor();
        let shape = t.shape().clone();
        let n = shape.elem_count();
        let mut rng = Rng::new(seed ^ INIT_STREAM, i as u64);
        let values: Vec<f32> = if name.ends_with("_token") {
            (0..n).map(|_| 0.02 * normal(&mut rng) as f32).collect()
        } else if t.rank() >= 2 {
            // Matrices `[out, in]` and convolution kernels `[out, in, k, k]`.
            let d = shape.dims();
            let field: usize = d[2..].iter().product();
            let (out, inp) = (d[0] * field, d[1] * field);
            let a = (6.0 / (inp + out) as f64).sqrt();
            (0..n)
                .map(|_| ((rng.unit() * 2.0 - 1.0) * a) as f32)
                .collect()
        } else if name.ends_with(".weight") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        var.set(&Tensor::from_vec(values, shape, t.device())?.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

fn normal(rng: &mut Rng) -> f64 {
    let u1 = rng.unit().max(1e-300);
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The variables of a map, sorted by name (the order every pass over parameters uses).
pub fn named_vars(vars: &VarMap) -> Vec<(String, Var)> {
    // A panic elsewhere while the map was locked leaves it intact: read it anyway.
    let map = vars.data().lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<(String, Var)> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Train (or resume) an MAE as `cfg` says. `stop` is checked at every step boundary: when set,
/// the run saves a checkpoint and returns. `on_step` sees every record (progress bars).
pub fn train_mae(
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    on_step: &dyn Fn(&StepRecord),
) -> Result<RunSummary, TrainError> {
    train_mae_in(&mut Group::single(), cfg, opts, stop, on_step)
}

/// [`train_mae`] as one rank of `group` ([`crate::dist`]): this rank's share of each batch,
/// gradients averaged over the ranks (weighted by each rank's count of loss terms, so the
/// step is the one a single process takes on the whole batch), the run directory written by
/// rank 0 alone.
pub fn train_mae_in(
    group: &mut Group,
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    on_step: &dyn Fn(&StepRecord),
) -> Result<RunSummary, TrainError> {
    let dev = opts.device.clone();
    let mcfg = cfg.mae_config().map_err(|e| TrainError::Setup(e.0))?;

    // The store, regime and levels are checked before the run directory is written: a run
    // that cannot start leaves no folder to mistake for one that did.
    agree_with_ranks(cfg, opts, group)?;
    let (loader, trained) = open_loader(cfg, &opts.store, Sampler::LevelWeighted, &dev, group)?;
    agree_on_data(group, &opts.store, &trained)?;
    let mut run = open_run(cfg, opts, group, &trained)?;
    let existing = run.existing.clone();

    // Model and optimizer.
    let vars = VarMap::new();
    let mut mae = Mae::new(VarBuilder::from_varmap(&vars, DType::F32, &dev), &mcfg)?;
    if cfg.train.precision == "bf16" {
        mae.compute_dtype = DType::BF16;
    }
    init_weights(&vars, cfg.train.seed)?;
    let named = named_vars(&vars);
    let mut opt = AdamW::new(
        named.clone(),
        AdamWConfig {
            weight_decay: cfg.train.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let mut records = Vec::new();
    let mut start = 0;
    if opts.resume {
        if let Some((step, dir)) = existing.last() {
            load_checkpoint(dir, &named, &mut opt, &dev)?;
            start = *step;
            records = read_metrics(&opts.out.join("metrics.parquet"))?
                .into_iter()
                .filter(|r| r.step < start)
                .collect();
            if group.is_leader() {
                run.warn_of_missing_records(&opts.out, records.len(), start)?;
            }
            run.log(&format!("resumed from {} (step {start})", dir.display()))?;
        }
        group.check_same(RESUME_STEPS, &start.to_string())?;
    } else {
        run.log(&format!(
            "new run: {} parameters",
            named
                .iter()
                .map(|(_, v)| v.as_tensor().elem_count())
                .sum::<usize>()
        ))?;
    }
    agree_on_weights(group, &named, START_WEIGHTS)?;

    let share = Share::of(group, cfg);

    let total = cfg.train.steps;
    let mut checkpoint = existing.last().map(|(_, p)| p.clone());
    let mut interrupted = false;
    let mut steps_run = 0;
    let mut feeder = Feeder::new(&loader, start, &dev)?;
    let p = mcfg.encoder.patch;
    let n_tokens = (cfg.data.crop as usize / p).pow(2);
    let vars_only: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut pending: Option<PendingRecord> = None;
    for step in start..total {
        let t0 = StepStart::now(&dev)?;
        let batch = feeder.next()?;
        let (c, n) = (batch.channels, batch.size);
        let k = cfg.train.accumulate as usize;
        let mut acc = Accumulated::new();
        for (m, part) in share.parts(k).into_iter().enumerate() {
            // The whole batch when k = 1 (narrow then returns the tensor itself).
            let at = m * part.len;
            let images = batch.images.narrow(0, at, part.len)?;
            let valid = batch.valid.narrow(0, at, part.len)?;
            // Each sample's noise by its place in the whole batch, whichever rank and
            // micro-batch take it.
            let noise: Vec<Vec<f32>> = (part.first..part.first + part.len)
                .map(|j| {
                    let mut r = Rng::new(
                        cfg.train.seed ^ MASK_STREAM,
                        step * share.batch as u64 + j as u64,
                    );
                    (0..n_tokens).map(|_| r.unit() as f32).collect()
                })
                .collect();
            let masking = Masking::from_noise(&noise, mcfg.mask_ratio);
            let draws = drop_draws(cfg.train.seed, step, mcfg.encoder.depth, &part);
            // One micro-batch a step goes up through the page-locked staging; several copy
            // their masks and draws as the forward pass needs them.
            let (masking, keep) = if k == 1 {
                (
                    feeder.stage_masking(masking)?,
                    feeder.stage_draws(draws, &mae.encoder)?,
                )
            } else {
                (masking, draws)
            };
            let out = on_worker(dev.is_cpu(), || {
                mae.forward(&images, &valid, &masking, Some(&keep))
            })?;
            if m == 0 && step + 1 < total {
                // The next batch's copy runs beside this step's queued work.
                feeder.prefetch()?;
            }
            let every = cfg.train.panel_every;
            if m == 0 && every > 0 && (step + 1) % every == 0 && group.is_leader() {
                let pred: Vec<Vec<Vec<f32>>> = out.pred.detach().to_vec3()?;
                let (w, h, px) = panel(
                    &images.flatten_all()?.to_vec1::<f32>()?,
                    &valid.flatten_all()?.to_vec1::<f32>()?,
                    &pred,
                    &masking,
                    c,
                    n,
                    p,
                );
                let path = opts
                    .out
                    .join("panels")
                    .join(format!("step_{:07}.png", step + 1));
                write_png(&path, w, h, &px).map_err(|e| io_err(&path, e))?;
            }
            // Each part's loss is a mean over its patches that count: weighed by their
            // number, the parts' mean gradient over every rank is the whole batch's.
            let terms = if group.world() > 1 || k > 1 {
                Some(crate::mae::loss_terms(&out.weight)?)
            } else {
                None
            };
            acc.add(
                &out.loss,
                &vars_only,
                vec![out.loss.clone(), out.baseline.clone()],
                terms,
            )?;
        }
        let (grads, values) = acc.finish(group, &vars_only)?;
        let (clipped, lr) = apply(&grads, &vars_only, &mut opt, cfg, step)?;
        drop(grads);
        let levels = batch_levels(group, &loader, step, &batch.samples)?;
        let rec = StepRecord {
            step,
            loss: f32::NAN,
            lr,
            grad_norm: f64::NAN,
            images_per_s: 0.0,
            levels,
            extra: vec![("baseline".into(), f32::NAN)],
        };
        let this = PendingRecord::new(rec, share.batch, t0, &values[0], &values[1..], &clipped)?;
        // The previous step's values: its work is done (or nearly), this step's is queued.
        if let Some(prev) = pending.take() {
            prev.emit(&mut records, on_step)?;
        }
        steps_run += 1;
        let done = step + 1;
        let this = if this.queued() {
            Some(this)
        } else {
            this.emit(&mut records, on_step)?;
            None
        };
        // Every rank stops at the step any of them is asked to.
        let stopping = group.agree(stop.load(Ordering::SeqCst))?;
        if let Some(t) = this {
            // A checkpoint saves every record so far: read this step's now if one is due.
            if checkpoint_due(cfg, done, stopping) {
                t.emit(&mut records, on_step)?;
            } else {
                pending = Some(t);
            }
        }
        if end_step(
            &mut run,
            group,
            cfg,
            &opts.out,
            done,
            stopping,
            &records,
            &named,
            &opt,
            &mut checkpoint,
        )? {
            interrupted = true;
            break;
        }
    }
    Ok(RunSummary {
        steps_done: records.last().map_or(start, |r| r.step + 1),
        steps_run,
        interrupted,
        checkpoint,
        records,
        validation: Vec::new(),
    })
}

/// Samples per level of a batch, `80m:12 200m:20`.
pub(crate) fn level_mix(samples: &[icefm_dataset::SampleInfo]) -> String {
    mix_of(samples.iter().map(|s| s.level.spacing_m()))
}

/// The level mix of step `step`'s whole batch: its samples in one process, every rank's
/// samples in a data-parallel run.
pub(crate) fn batch_levels(
    group: &Group,
    loader: &Loader,
    step: u64,
    samples: &[icefm_dataset::SampleInfo],
) -> Result<String, TrainError> {
    if group.world() == 1 {
        return Ok(level_mix(samples));
    }
    Ok(level_mix(&loader.whole_windows(step)?))
}

fn mix_of(spacings: impl Iterator<Item = u32>) -> String {
    let mut counts: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for m in spacings {
        *counts.entry(m).or_default() += 1;
    }
    counts
        .iter()
        .map(|(m, k)| format!("{m}m:{k}"))
        .collect::<Vec<_>>()
        .join(" ")
}
