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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arrow_array::{ArrayRef, Float32Array, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::regime::Regime;
use icefm_dataset::rng::Rng;
use icefm_dataset::sampler::parse_level_weights;
use icefm_dataset::{Augment, Loader, LoaderOptions, Sampler};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::dist::{Group, Route, Weights, weights_digest};
use crate::fused::normalise_augment;
use crate::mae::{Mae, Masking};
use crate::ops::Draws;
use crate::optim::{AdamW, AdamWConfig, Clip, clip, lr_at};
use crate::panel::{panel, write_png};
use crate::threads::on_worker;
use crate::vit::Vit;

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

/// One step's record.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Step (0-based).
    pub step: u64,
    /// The training loss (MAE: masked-patch loss; fine-tuning: the weighted task sum).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Images per second of this step.
    pub images_per_s: f64,
    /// Samples per level, `80m:12 200m:20`.
    pub levels: String,
    /// Further named values, one `metrics.parquet` column each: MAE's `baseline` (the loss of
    /// predicting each patch's mean on the same batch, ≈ 1: what the MAE beats), fine-tuning's
    /// `loss_SIC`, `loss_SOD`, `loss_FLOE`.
    pub extra: Vec<(String, f32)>,
}

impl StepRecord {
    /// A named extra value.
    pub fn value(&self, name: &str) -> Option<f32> {
        self.extra.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// Checkpoint bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    /// Steps done.
    step: u64,
    /// The run's seed.
    seed: u64,
    /// Loss of the last step.
    loss: f32,
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

fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step_{step:07}"))
}

/// Checkpoints of a run directory, oldest first.
pub fn checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step_")?.parse().ok()?;
            e.path()
                .join("state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// A device name as written: `cpu`, `cuda` (no ordinal: `cuda:0`, or under `--dist` the
/// rank's GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    /// `cpu`.
    Cpu,
    /// `cuda` (`None`) or `cuda:N`.
    Cuda(Option<usize>),
}

impl DeviceName {
    /// Read `name`; the error says what is expected.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            s => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| Self::Cuda(Some(n)))
                .ok_or_else(|| format!("--device `{s}`: expected cpu, cuda or cuda:N")),
        }
    }
}

/// A device from its name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, String> {
    let ordinal = match DeviceName::parse(name)? {
        DeviceName::Cpu => return Ok(Device::Cpu),
        DeviceName::Cuda(n) => n.unwrap_or(0),
    };
    #[cfg(feature = "cuda")]
    return crate::cuda::device(ordinal).map_err(|e| format!("--device {name}: {e}"));
    #[cfg(not(feature = "cuda"))]
    Err(format!(
        "--device {name}: this icefm was built without CUDA ({ordinal}); build it with \
         `--features cuda` (scripts/cuda-env.sh sets up the toolchain)"
    ))
}

/// GPUs this process sees (after `CUDA_VISIBLE_DEVICES`), counted without opening any: an
/// error in a build without CUDA, or where the driver cannot be loaded.
pub fn cuda_device_count() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    return candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .map(|n| usize::try_from(n).unwrap_or(0))
        .map_err(|e| format!("cannot count the GPUs: {e}"));
    #[cfg(not(feature = "cuda"))]
    Err(
        "this icefm was built without CUDA; build it with `--features cuda` \
         (scripts/cuda-env.sh sets up the toolchain)"
            .into(),
    )
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

    let mut run = open_run(cfg, opts, group)?;
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
            run.log(&format!("resumed from {} (step {start})", dir.display()))?;
        }
        group.check_same("steps to resume from", &start.to_string())?;
    } else {
        run.log(&format!(
            "new run: {} parameters",
            named
                .iter()
                .map(|(_, v)| v.as_tensor().elem_count())
                .sum::<usize>()
        ))?;
    }

    let loader = open_loader(cfg, &opts.store, Sampler::LevelWeighted, &dev, group)?;
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
    let mut last = Instant::now();
    for step in start..total {
        let t0 = Instant::now();
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
            prev.emit(&mut last, &mut records, on_step)?;
        }
        steps_run += 1;
        let done = step + 1;
        let this = if this.queued() {
            Some(this)
        } else {
            this.emit(&mut last, &mut records, on_step)?;
            None
        };
        // Every rank stops at the step any of them is asked to.
        let stopping = group.agree(stop.load(Ordering::SeqCst))?;
        if let Some(t) = this {
            // A checkpoint saves every record so far: read this step's now if one is due.
            if checkpoint_due(cfg, done, stopping) {
                t.emit(&mut last, &mut records, on_step)?;
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

/// An opened run directory: its checkpoints when it opened, and its log.
pub(crate) struct RunDir {
    /// Checkpoints found, oldest first.
    pub existing: Vec<(u64, PathBuf)>,
    /// `log.txt` (rank 0 only; the other ranks of a data-parallel run write nothing).
    log: Option<File>,
    log_path: PathBuf,
}

impl RunDir {
    /// Append a line to `log.txt` (nothing on ranks other than 0).
    pub fn log(&mut self, line: &str) -> Result<(), TrainError> {
        match self.log.as_mut() {
            Some(f) => writeln!(f, "{line}").map_err(|e| io_err(&self.log_path, e)),
            None => Ok(()),
        }
    }
}

/// One rank's share of each batch: samples `first .. first + batch / world` of `batch`.
pub(crate) struct Share {
    /// The whole batch (`data.batch_size`).
    pub batch: usize,
    /// This rank's first sample.
    pub first: usize,
    /// This rank's number of samples.
    pub len: usize,
}

impl Share {
    /// This share in `k` equal consecutive parts (micro-batches).
    pub fn parts(&self, k: usize) -> Vec<Share> {
        let len = self.len / k.max(1);
        (0..k.max(1))
            .map(|m| Share {
                batch: self.batch,
                first: self.first + m * len,
                len,
            })
            .collect()
    }

    pub fn of(group: &Group, cfg: &TrainConfig) -> Self {
        let batch = cfg.data.batch_size;
        let len = batch / group.world();
        Self {
            batch,
            first: group.rank() * len,
            len,
        }
    }
}

/// Whether `cfg`'s batch splits equally between `world` ranks and, on each, into its
/// `train.accumulate` micro-batches; the message says why not.
pub fn check_batch_split(cfg: &TrainConfig, world: usize) -> Result<(), String> {
    let b = cfg.data.batch_size;
    let k = cfg.train.accumulate as usize;
    if b.is_multiple_of(world * k) {
        return Ok(());
    }
    let parts = if k > 1 {
        format!(" × {k} micro-batches (train.accumulate)")
    } else {
        String::new()
    };
    Err(format!(
        "data.batch_size {b} is not a multiple of the {world} ranks{parts}: each rank takes an \
         equal share of every batch"
    ))
}

/// Open the run directory of `opts`: new (no checkpoints in it), or resumed with the same
/// configuration ([`TrainConfig::continues_as`]). Writes `config.toml` as resolved. In a
/// data-parallel run every rank must have the same configuration; rank 0 alone checks and
/// writes the directory, after which the others list its checkpoints.
pub(crate) fn open_run(
    cfg: &TrainConfig,
    opts: &RunOptions,
    group: &mut Group,
) -> Result<RunDir, TrainError> {
    let resolved = cfg.to_toml();
    if group.world() > 1 {
        check_batch_split(cfg, group.world()).map_err(TrainError::Setup)?;
        group.check_same("configurations", &resolved)?;
        group.check_same("--resume", &opts.resume.to_string())?;
        let path = group.attach(&opts.device)?;
        // Rank 0 checks and writes the directory first; the others wait for its word.
        let opened = if group.is_leader() {
            open_run_dir(cfg, opts, &resolved).map(Some)
        } else {
            Ok(None)
        };
        let word = match &opened {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        let all = group.all_gather(word.as_bytes())?;
        let said = String::from_utf8_lossy(&all[0]).into_owned();
        return match opened? {
            Some(mut run) => {
                run.log(&format!(
                    "data-parallel: {} ranks, gradients summed {}",
                    group.world(),
                    if path == Route::Nccl {
                        "by NCCL on the GPUs"
                    } else {
                        "on the hosts through rank 0"
                    }
                ))?;
                Ok(run)
            }
            None if !said.is_empty() => Err(TrainError::Setup(format!("rank 0: {said}"))),
            None => Ok(RunDir {
                existing: checkpoints(&opts.out),
                log: None,
                log_path: opts.out.join("log.txt"),
            }),
        };
    }
    open_run_dir(cfg, opts, &resolved)
}

fn open_run_dir(
    cfg: &TrainConfig,
    opts: &RunOptions,
    resolved: &str,
) -> Result<RunDir, TrainError> {
    // The run directory: new, or resumed with the same configuration (steps may grow).
    let existing = checkpoints(&opts.out);
    let config_path = opts.out.join("config.toml");
    if opts.resume {
        let saved = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, e))?;
        let saved = TrainConfig::parse(&saved, &[]).map_err(|e| TrainError::Setup(e.0))?;
        // The steps may grow, and the micro-batches change (a run out of memory continues in
        // smaller parts).
        if !saved.continues_as(cfg) {
            return Err(TrainError::Setup(format!(
                "{}: the configuration differs from the run's config.toml (only train.steps and \
                 train.accumulate may change on --resume)",
                opts.out.display()
            )));
        }
    } else if !existing.is_empty() {
        return Err(TrainError::Setup(format!(
            "{} already holds checkpoints: add --resume to continue it, or give another --out",
            opts.out.display()
        )));
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| io_err(&opts.out, e))?;
    // Through a temporary file: `icefm ablate` workers read the config.toml of runs that
    // another worker may be (re)starting.
    let tmp = opts.out.join("config.toml.tmp");
    std::fs::write(&tmp, resolved).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &config_path).map_err(|e| io_err(&config_path, e))?;
    let log_path = opts.out.join("log.txt");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io_err(&log_path, e))?;
    Ok(RunDir {
        existing,
        log: Some(log),
        log_path,
    })
}

/// The loader of a run: the store, `data.regime`, levels, crop, batch and augmentation of
/// `cfg`, seeded by `train.seed`; `group`'s rank reads its share of each batch.
pub(crate) fn open_loader(
    cfg: &TrainConfig,
    store: &Path,
    sampler: Sampler,
    dev: &Device,
    group: &Group,
) -> Result<Loader, TrainError> {
    let regime = if cfg.data.regime.is_empty() {
        None
    } else {
        Some(Regime::open(Some(store), &cfg.data.regime)?)
    };
    let levels = if cfg.data.levels.trim().is_empty() {
        Vec::new()
    } else {
        parse_level_weights(&cfg.data.levels)?
    };
    Ok(Loader::open(
        store,
        regime.as_ref(),
        LoaderOptions {
            levels,
            crop: cfg.data.crop,
            batch_size: cfg.data.batch_size,
            channels: cfg.data.channels.clone(),
            seed: cfg.train.seed,
            sampler,
            augment: Augment {
                flips: cfg.data.flips,
                rot90: cfg.data.rot90,
                jitter: cfg.data.jitter,
            },
            min_valid: cfg.data.min_valid,
            threads: cfg.data.threads,
            raw_inputs: device_prepares(dev),
            part: (group.rank(), group.world()),
            ..LoaderOptions::default()
        },
    )?)
}

/// Whether batches are normalised and turned on the device ([`normalise_augment`]) rather
/// than on the host: on a GPU with icefm's kernels.
fn device_prepares(dev: &Device) -> bool {
    dev.is_cuda() && crate::fused::fused()
}

/// A training batch on the device: images `[B, C, n, n]` and validity `[B, n, n]`, with the
/// host-side facts the step needs.
pub(crate) struct DeviceBatch {
    pub images: Tensor,
    pub valid: Tensor,
    /// `u8 [B, 3, n, n]` (the loader's labels).
    pub labels: Vec<u8>,
    /// The labels already on the device, `u8 [B, 3, n·n]` ([`Feeder::with_labels`]).
    pub labels_on: Option<Tensor>,
    pub samples: Vec<icefm_dataset::SampleInfo>,
    pub channels: usize,
    pub size: usize,
}

/// A training loop's batches on its device, in the loader's order.
///
/// On the CPU a batch is made when [`Feeder::next`] asks for it. On a GPU (feature `cuda`),
/// [`Feeder::prefetch`], called once a step's forward pass is queued, takes the next batch
/// from the loader and starts its copy through page-locked buffers on a stream of its own
/// ([`crate::cuda::Uploader`]), so that the copy runs beside the step; with icefm's kernels
/// the loader ships raw windows, normalised and turned on the device ([`normalise_augment`]).
/// `ICEFM_UPLOAD=pageable` copies from pageable memory when asked for (for comparisons).
pub(crate) struct Feeder<'a> {
    batches: icefm_dataset::Batches,
    loader: &'a Loader,
    dev: Device,
    staged: Option<DeviceBatch>,
    #[cfg(feature = "cuda")]
    uploader: Option<crate::cuda::Uploader>,
    /// The masking's indices ([`Feeder::stage_masking`]).
    #[cfg(feature = "cuda")]
    indices: Option<crate::cuda::Uploader<u32>>,
    /// The batches' labels, when asked for ([`Feeder::with_labels`]).
    #[cfg(feature = "cuda")]
    labels: Option<crate::cuda::Uploader<u8>>,
    /// Stochastic depth's scales ([`Feeder::stage_draws`]).
    #[cfg(feature = "cuda")]
    draws: Option<crate::cuda::Uploader<f32>>,
}

impl<'a> Feeder<'a> {
    /// Batches of `loader` from batch index `start`, for `dev`.
    pub fn new(loader: &'a Loader, start: u64, dev: &Device) -> Result<Self, TrainError> {
        #[cfg(feature = "cuda")]
        let uploader = match dev {
            Device::Cuda(cd) if !std::env::var("ICEFM_UPLOAD").is_ok_and(|v| v == "pageable") => {
                Some(crate::cuda::Uploader::new(cd)?)
            }
            _ => None,
        };
        Ok(Self {
            batches: loader.iter(start),
            loader,
            dev: dev.clone(),
            staged: None,
            #[cfg(feature = "cuda")]
            uploader,
            #[cfg(feature = "cuda")]
            indices: None,
            #[cfg(feature = "cuda")]
            labels: None,
            #[cfg(feature = "cuda")]
            draws: None,
        })
    }

    /// `draws` with the scales they give `vit`'s blocks on their way to the device through
    /// page-locked memory (a GPU with page-locked uploads, and a model with stochastic depth;
    /// elsewhere as they are, and each block copies its scales from the host).
    pub fn stage_draws(&mut self, draws: Draws, vit: &Vit) -> Result<Draws, TrainError> {
        #[cfg(feature = "cuda")]
        if vit.cfg.drop_path > 0.0
            && let Some(up) = side_uploader(&self.dev, self.uploader.is_some(), &mut self.draws)?
        {
            let b = draws.per_block.first().map_or(0, |(a, _)| a.len());
            let scales = up.upload(&vit.drop_scales(&draws), (draws.per_block.len(), 2, b))?;
            return Ok(draws.staged(scales)?);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = vit;
        Ok(draws)
    }

    /// Also copy each batch's labels to the device beside the step (a GPU with page-locked
    /// uploads: [`DeviceBatch::labels_on`]), for fine-tuning's loss.
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    pub fn with_labels(mut self) -> Result<Self, TrainError> {
        #[cfg(feature = "cuda")]
        side_uploader(&self.dev, self.uploader.is_some(), &mut self.labels)?;
        Ok(self)
    }

    /// `masking` with its indices on their way to the device through page-locked memory (on
    /// a GPU with page-locked uploads; elsewhere as it is, and the forward pass copies them).
    pub fn stage_masking(&mut self, masking: Masking) -> Result<Masking, TrainError> {
        #[cfg(feature = "cuda")]
        if let Some(up) = side_uploader(&self.dev, self.uploader.is_some(), &mut self.indices)? {
            return Ok(masking.staged_through(up)?);
        }
        Ok(masking)
    }

    /// The next batch: the one [`Feeder::prefetch`] started, or a new one.
    pub fn next(&mut self) -> Result<DeviceBatch, TrainError> {
        match self.staged.take() {
            Some(b) => Ok(b),
            None => self.fetch(),
        }
    }

    /// Start the next batch's copy now (a GPU with page-locked uploads; elsewhere nothing, the
    /// batch is made when asked for).
    pub fn prefetch(&mut self) -> Result<(), TrainError> {
        #[cfg(feature = "cuda")]
        if self.uploader.is_some() && self.staged.is_none() {
            self.staged = Some(self.fetch()?);
        }
        Ok(())
    }

    fn fetch(&mut self) -> Result<DeviceBatch, TrainError> {
        let batch = self
            .batches
            .next()
            .ok_or_else(|| TrainError::Setup("the loader stopped".into()))??;
        let (b, c, n) = (batch.len(), batch.channels, batch.size);
        let images = self.upload(&batch.inputs, (b, c, n, n))?;
        let (images, valid) = if device_prepares(&self.dev) {
            let (mean, inv): (Vec<f32>, Vec<f32>) = self.loader.channel_norms().into_iter().unzip();
            let tf: Vec<icefm_dataset::Transform> =
                batch.samples.iter().map(|s| s.transform).collect();
            normalise_augment(&images, &mean, &inv, &tf)?
        } else {
            let valid: Vec<f32> = batch.valid.iter().map(|&v| f32::from(v)).collect();
            (images, Tensor::from_vec(valid, (b, n, n), &self.dev)?)
        };
        #[cfg(feature = "cuda")]
        let labels_on = match self.labels.as_mut() {
            Some(up) => Some(up.upload(&batch.labels, (b, 3, n * n))?),
            None => None,
        };
        #[cfg(not(feature = "cuda"))]
        let labels_on = None;
        let out = DeviceBatch {
            images,
            valid,
            labels_on,
            labels: batch.labels.clone(),
            samples: batch.samples.clone(),
            channels: c,
            size: n,
        };
        self.batches.recycle(batch);
        Ok(out)
    }

    fn upload(
        &mut self,
        data: &[f32],
        shape: (usize, usize, usize, usize),
    ) -> Result<Tensor, TrainError> {
        #[cfg(feature = "cuda")]
        if let Some(up) = self.uploader.as_mut() {
            return Ok(up.upload(data, shape)?);
        }
        Ok(Tensor::from_slice(data, shape, &self.dev)?)
    }
}

/// `slot`'s uploader beside the batches' (made on first use) when batches go up through
/// page-locked memory (`page_locked`, a GPU); `None` elsewhere.
#[cfg(feature = "cuda")]
fn side_uploader<'s, T: crate::cuda::Upload>(
    dev: &Device,
    page_locked: bool,
    slot: &'s mut Option<crate::cuda::Uploader<T>>,
) -> Result<Option<&'s mut crate::cuda::Uploader<T>>, TrainError> {
    let Device::Cuda(cd) = dev else {
        return Ok(None);
    };
    if page_locked && slot.is_none() {
        *slot = Some(crate::cuda::Uploader::new(cd)?);
    }
    Ok(slot.as_mut())
}

/// Stochastic-depth draws of step `step` for `depth` blocks and the samples of `share` (a
/// function of the seed and the step alone, so a resumed run draws the same, and drawn for
/// the whole batch, so each rank's share draws what one process would for those samples).
pub(crate) fn drop_draws(seed: u64, step: u64, depth: usize, share: &Share) -> Draws {
    let mine = share.first..share.first + share.len;
    Draws::new(
        (0..depth)
            .map(|i| {
                let mut r = Rng::new(seed ^ DROP_STREAM, step * 1024 + i as u64);
                let mut draw = || {
                    let all: Vec<f32> = (0..share.batch).map(|_| r.unit() as f32).collect();
                    all[mine.clone()].to_vec()
                };
                (draw(), draw())
            })
            .collect(),
    )
}

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
    let lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr);
    let cpu = vars.first().is_none_or(|v| v.device().is_cpu());
    on_worker(cpu, || {
        let c = clip(grads, vars.iter(), t.clip_grad)?;
        opt.step_clipped(grads, lr, &c)?;
        Ok((c, lr))
    })
}

/// A step's values still on its device: the loss, named extras and, where clipping left it
/// there, the gradient norm. On a GPU their copy to the host is queued behind the step
/// ([`crate::cuda::Readback`]) and read once the next step is queued, so that the device never
/// waits for the host between steps; elsewhere they are read at once.
pub(crate) struct PendingRecord {
    record: StepRecord,
    values: Deferred,
    norm_queued: bool,
    images: usize,
    t0: Instant,
}

enum Deferred {
    Ready(Vec<f32>),
    #[cfg(feature = "cuda")]
    Queued(crate::cuda::Readback),
}

impl PendingRecord {
    /// `record` with its loss, extras' values (in order: `extras`' values, each tensor's
    /// flattened) and gradient norm still to come from `loss`, `extras` and `clip`; `images` in
    /// the step, which began at `t0`.
    pub fn new(
        record: StepRecord,
        images: usize,
        t0: Instant,
        loss: &Tensor,
        extras: &[Tensor],
        clip: &Clip,
    ) -> Result<Self, TrainError> {
        let mut parts = vec![loss.to_dtype(DType::F32)?.reshape(1)?];
        for e in extras {
            parts.push(e.to_dtype(DType::F32)?.flatten_all()?);
        }
        let (mut record, norm_queued) = (record, matches!(clip, Clip::Device { .. }));
        match clip {
            Clip::Device { sumsq, .. } => parts.push(sumsq.sqrt()?.to_dtype(DType::F32)?),
            Clip::Host { norm, .. } => record.grad_norm = *norm,
        }
        let all = Tensor::cat(&parts, 0)?;
        #[cfg(feature = "cuda")]
        if all.device().is_cuda() {
            return Ok(Self {
                record,
                values: Deferred::Queued(crate::cuda::Readback::start(&all)?),
                norm_queued,
                images,
                t0,
            });
        }
        Ok(Self {
            record,
            values: Deferred::Ready(all.to_vec1::<f32>()?),
            norm_queued,
            images,
            t0,
        })
    }

    /// Whether its values are still on their way (a GPU), rather than read.
    pub fn queued(&self) -> bool {
        !matches!(self.values, Deferred::Ready(_))
    }

    /// The record, its values read (waiting for the step if it is still running). The step's
    /// rate counts from its start or from `last`, the moment the previous record was read,
    /// whichever is later; `last` becomes now. A loss that is not finite is an error.
    pub fn finish(self, last: &mut Instant) -> Result<StepRecord, TrainError> {
        // One variant only without the `cuda` feature.
        #[allow(clippy::infallible_destructuring_match)]
        let values = match self.values {
            Deferred::Ready(v) => v,
            #[cfg(feature = "cuda")]
            Deferred::Queued(r) => r.finish()?,
        };
        let now = Instant::now();
        let since = (*last).max(self.t0);
        *last = now;
        let mut record = self.record;
        let loss = values[0];
        if !loss.is_finite() {
            return Err(TrainError::Setup(format!(
                "step {}: the loss is {loss}; lower train.lr or check the data",
                record.step
            )));
        }
        record.loss = loss;
        for ((_, v), x) in record.extra.iter_mut().zip(&values[1..]) {
            *v = *x;
        }
        if self.norm_queued {
            record.grad_norm = f64::from(values[values.len() - 1]);
        }
        record.images_per_s = self.images as f64 / (now - since).as_secs_f64();
        Ok(record)
    }

    /// [`PendingRecord::finish`], then the record to `on_step` and onto `records`.
    pub fn emit(
        self,
        last: &mut Instant,
        records: &mut Vec<StepRecord>,
        on_step: &dyn Fn(&StepRecord),
    ) -> Result<(), TrainError> {
        let rec = self.finish(last)?;
        on_step(&rec);
        records.push(rec);
        Ok(())
    }
}

/// Whether a checkpoint is due after `done` steps: every `checkpoint_every` steps, after the
/// last step, or when stopping.
pub(crate) fn checkpoint_due(cfg: &TrainConfig, done: u64, stopping: bool) -> bool {
    done == cfg.train.steps || stopping || done.is_multiple_of(cfg.train.checkpoint_every.max(1))
}

/// The end of a step: a checkpoint (with the metrics so far) when one is due, every
/// `checkpoint_every` steps, after the last step, or when stopping. Returns `true` when the
/// run stops here early.
#[allow(clippy::too_many_arguments)]
pub(crate) fn end_step(
    run: &mut RunDir,
    group: &mut Group,
    cfg: &TrainConfig,
    out: &Path,
    done: u64,
    stopping: bool,
    records: &[StepRecord],
    named: &[(String, Var)],
    opt: &AdamW,
    checkpoint: &mut Option<PathBuf>,
) -> Result<bool, TrainError> {
    let total = cfg.train.steps;
    let loss = records.last().map_or(f32::NAN, |r| r.loss);
    let due = checkpoint_due(cfg, done, stopping);
    if due && group.world() > 1 {
        // The ranks took the same steps from the same gradients: their weights must agree.
        let weights: Vec<Tensor> = named.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        group.check_same(
            &format!("weights after step {done}"),
            &weights_digest(&weights)?,
        )?;
    }
    if due && group.is_leader() {
        *checkpoint = Some(save_checkpoint(
            out,
            done,
            cfg.train.seed,
            loss,
            named,
            opt,
        )?);
        write_metrics(&out.join("metrics.parquet"), records)?;
        prune(out, cfg.train.keep_last.max(1))?;
        run.log(&format!("step {done}: loss {loss:.5}, checkpoint saved"))?;
    }
    if stopping && done < total {
        run.log(&format!("stopped at step {done} (interrupt)"))?;
        return Ok(true);
    }
    Ok(false)
}

pub(crate) fn save_checkpoint(
    out: &Path,
    step: u64,
    seed: u64,
    loss: f32,
    named: &[(String, Var)],
    opt: &AdamW,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoint_dir(out, step);
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let weights: HashMap<String, Tensor> = named
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&weights, tmp.join("model.safetensors"))?;
    let (_, moments) = opt.state();
    let moments: HashMap<String, Tensor> = moments.into_iter().collect();
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    let state = serde_json::to_string_pretty(&CheckpointState { step, seed, loss })
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::write(tmp.join("state.json"), state).map_err(|e| io_err(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| io_err(&dir, e))?;
    Ok(dir)
}

pub(crate) fn load_checkpoint(
    dir: &Path,
    named: &[(String, Var)],
    opt: &mut AdamW,
    dev: &Device,
) -> Result<(), TrainError> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| io_err(&state_path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| io_err(&state_path, e))?;
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), dev)?;
    for (n, v) in named {
        let t = weights
            .get(n)
            .ok_or_else(|| io_err(dir, format!("the checkpoint has no weight {n}")))?;
        v.set(t)?;
    }
    let moments: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("optimizer.safetensors"), dev)?
            .into_iter()
            .collect();
    opt.load_state(state.step, &moments)?;
    Ok(())
}

pub(crate) fn prune(out: &Path, keep: usize) -> Result<(), TrainError> {
    let all = checkpoints(out);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).map_err(|e| io_err(p, e))?;
        }
    }
    Ok(())
}

/// Write the records as `metrics.parquet` (through a temporary file): `step`, `loss`, `lr`,
/// `grad_norm`, `images_per_s`, `levels` and one `f32` column per extra value of the first
/// record.
pub fn write_metrics(path: &Path, records: &[StepRecord]) -> Result<(), TrainError> {
    let names: Vec<String> = records
        .first()
        .map(|r| r.extra.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let mut fields = vec![
        Field::new("step", DataType::UInt64, false),
        Field::new("loss", DataType::Float32, false),
        Field::new("lr", DataType::Float64, false),
        Field::new("grad_norm", DataType::Float64, false),
        Field::new("images_per_s", DataType::Float64, false),
        Field::new("levels", DataType::Utf8, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            records.iter().map(|r| r.step),
        )),
        Arc::new(Float32Array::from_iter_values(
            records.iter().map(|r| r.loss),
        )),
        Arc::new(Float64Array::from_iter_values(records.iter().map(|r| r.lr))),
        Arc::new(Float64Array::from_iter_values(
            records.iter().map(|r| r.grad_norm),
        )),
        Arc::new(Float64Array::from_iter_values(
            records.iter().map(|r| r.images_per_s),
        )),
        Arc::new(StringArray::from_iter_values(
            records.iter().map(|r| r.levels.as_str()),
        )),
    ];
    for n in &names {
        fields.push(Field::new(n, DataType::Float32, false));
        cols.push(Arc::new(Float32Array::from_iter_values(
            records.iter().map(|r| r.value(n).unwrap_or(f32::NAN)),
        )));
    }
    let batch =
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| io_err(path, e))?;
    write_parquet(path, &batch)
}

/// Write one record batch as a Parquet file, through a temporary file renamed into place.
pub(crate) fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), TrainError> {
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| io_err(&tmp, e))?;
    w.write(batch).map_err(|e| io_err(&tmp, e))?;
    w.close().map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Read `metrics.parquet` (empty when absent).
pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>, TrainError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, UInt64Type};
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| io_err(path, e))?;
        let col = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| io_err(path, format!("no column {name}")))
        };
        let (step, loss, lr) = (col("step")?, col("loss")?, col("lr")?);
        let (gn, ips, lv) = (col("grad_norm")?, col("images_per_s")?, col("levels")?);
        let bad = || io_err(path, "unexpected column types");
        let step = step.as_primitive_opt::<UInt64Type>().ok_or_else(bad)?;
        let loss = loss.as_primitive_opt::<Float32Type>().ok_or_else(bad)?;
        let fixed = ["step", "loss", "lr", "grad_norm", "images_per_s", "levels"];
        let extra: Vec<(String, &arrow_array::Float32Array)> = b
            .schema()
            .fields()
            .iter()
            .filter(|f| !fixed.contains(&f.name().as_str()))
            .map(|f| {
                let c = col(f.name())?;
                Ok((
                    f.name().clone(),
                    c.as_primitive_opt::<Float32Type>().ok_or_else(bad)?,
                ))
            })
            .collect::<Result<_, TrainError>>()?;
        let lr = lr.as_primitive_opt::<Float64Type>().ok_or_else(bad)?;
        let gn = gn.as_primitive_opt::<Float64Type>().ok_or_else(bad)?;
        let ips = ips.as_primitive_opt::<Float64Type>().ok_or_else(bad)?;
        let lv = lv.as_string_opt::<i32>().ok_or_else(bad)?;
        for i in 0..b.num_rows() {
            out.push(StepRecord {
                step: step.value(i),
                loss: loss.value(i),
                lr: lr.value(i),
                grad_norm: gn.value(i),
                images_per_s: ips.value(i),
                levels: lv.value(i).to_string(),
                extra: extra.iter().map(|(n, c)| (n.clone(), c.value(i))).collect(),
            });
        }
    }
    Ok(out)
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
