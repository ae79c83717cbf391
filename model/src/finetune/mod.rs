//! Fine-tuning runs for SIC, SOD and FLOE: the same run directory, exact resume, Ctrl-C and
//! metrics as MAE pre-training ([`crate::train`]), plus encoder initialisation from an MAE run
//! or an imported checkpoint, validation on whole scenes, and the best checkpoint by score.
//!
//! Run directory additions: `validation.parquet` (step, sic_r2, sod_f1, floe_f1, combined,
//! score, seconds) and `checkpoints/best/` (`model.safetensors`, `state.json` with the step and
//! scores), kept apart from the rotating `step_*` checkpoints.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::regime::Regime;
use icefm_dataset::{Sampler, SceneReader};

use crate::config::TrainConfig;
use crate::dist::Group;
use crate::evaluate::selection_score;
use crate::metrics::Scores;
use crate::optim::{AdamW, AdamWConfig};
use crate::seg::{SegModel, label_counts, seg_loss_shared};
use crate::threads::on_worker;
use crate::train::{
    Accumulated, DeviceBatch, Feeder, PendingRecord, RESUME_STEPS, RunOptions, RunSummary,
    START_WEIGHTS, Share, StepRecord, StepStart, TrainError, agree_on_data, agree_on_weights,
    agree_with_ranks, apply, batch_levels, checkpoint_due, checkpoints, drop_draws, end_step,
    init_weights, io_err, load_checkpoint, named_vars, open_loader, open_run, read_metrics,
};

mod evaluation;
mod validation;

pub use evaluation::{
    EvalOverrides, RunEvaluation, eval_level, evaluate_run, evaluate_scenes, infer_options,
    load_seg_model, run_config, trained_levels,
};
pub use validation::{ValRecord, read_validation, write_validation};
use validation::{read_best, save_best};

/// What validation reads: the store, the regime's scenes, how to infer and the level scored at.
type ValSet = (
    SceneReader,
    Vec<std::sync::Arc<str>>,
    crate::evaluate::InferOptions,
    icefm_schemas::Level,
);

/// The safetensors file an `--init` path names: a `.safetensors` file, a checkpoint folder
/// (its `model.safetensors`), or a run folder (its best checkpoint, else its newest).
pub fn resolve_weights(path: &Path) -> Result<PathBuf, TrainError> {
    if path.is_file() {
        // A checkpoint's state.json or optimizer file is not weights to start from.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.ends_with(".safetensors") || name == "optimizer.safetensors" {
            return Err(io_err(
                path,
                "not a safetensors file of weights: give a run folder, a checkpoint folder or \
                 its model.safetensors",
            ));
        }
        return Ok(path.to_path_buf());
    }
    let direct = path.join("model.safetensors");
    if direct.is_file() {
        return Ok(direct);
    }
    // The best, or the earlier best a replacement stopped half-way left set aside.
    if let Some(best) = crate::train::whole_folder(&path.join("checkpoints").join("best")) {
        return Ok(best.join("model.safetensors"));
    }
    if let Some((_, dir)) = checkpoints(path).last() {
        return Ok(dir.join("model.safetensors"));
    }
    Err(io_err(
        path,
        "no weights here: expected a .safetensors file, a checkpoint folder or a run folder",
    ))
}

/// Blocks of an encoder, from its variables' names (`encoder.blocks.{i}.…`): the highest `i`
/// plus one, 0 for none.
pub fn encoder_blocks<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names
        .filter_map(|n| {
            n.strip_prefix("encoder.blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// Set every `encoder.*` variable from `path` ([`resolve_weights`]). All of them must be
/// there with their shapes (the patch embedding included: nothing is re-initialised after
/// loading). Returns the file read and the number of tensors set.
pub fn load_init(
    path: &Path,
    named: &[(String, Var)],
    dev: &Device,
) -> Result<(PathBuf, usize), TrainError> {
    let file = resolve_weights(path)?;
    let weights = crate::files::load_checked(&file, dev).map_err(|e| io_err(&file, e))?;
    let (have, want) = (
        encoder_blocks(weights.keys().map(String::as_str)),
        encoder_blocks(named.iter().map(|(n, _)| n.as_str())),
    );
    if have > 0 && have != want {
        return Err(io_err(
            &file,
            format!(
                "its encoder has {have} blocks, the model {want}: make model.preset / model.depth match it"
            ),
        ));
    }
    let mut set = 0;
    for (name, var) in named.iter().filter(|(n, _)| n.starts_with("encoder.")) {
        let t = weights.get(name).ok_or_else(|| {
            io_err(
                &file,
                format!(
                    "has no {name}: give an icefm MAE run or checkpoint, or an `icefm import` output"
                ),
            )
        })?;
        if t.dims() != var.as_tensor().dims() {
            return Err(io_err(
                &file,
                format!(
                    "{name} is {:?}, the model's is {:?} (another encoder size? model.preset, or \
                     model.dim and model.heads, give the model's)",
                    t.dims(),
                    var.as_tensor().dims()
                ),
            ));
        }
        var.set(&t.to_dtype(var.as_tensor().dtype())?)?;
        set += 1;
    }
    Ok((file, set))
}

/// With several ranks or micro-batches (`k` a step), each task's labelled pixels in the whole
/// batch over their number ([`seg_loss_shared`]); `None` for one micro-batch in one process.
fn shared_counts(
    group: &mut Group,
    batch: &DeviceBatch,
    k: usize,
) -> Result<Option<[f64; 3]>, TrainError> {
    if group.world() == 1 && k == 1 {
        return Ok(None);
    }
    let mine = label_counts(&batch.labels, batch.size * batch.size);
    let bytes: Vec<u8> = mine
        .iter()
        .flat_map(|n| (*n as u64).to_le_bytes())
        .collect();
    let mut all = [0u64; 3];
    for theirs in group.all_gather(&bytes)? {
        for (a, c) in all.iter_mut().zip(theirs.chunks_exact(8)) {
            *a += c.try_into().map(u64::from_le_bytes).unwrap_or(0);
        }
    }
    let parts = (group.world() * k) as f64;
    Ok(Some(all.map(|n| n as f64 / parts)))
}

/// Train (or resume) a segmentation model as `cfg` (with a `[seg]` section) says. `stop` is
/// checked at every step boundary; `on_step` sees every step, `on_val` every validation.
pub fn train_seg(
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    on_step: &dyn Fn(&StepRecord),
    on_val: &dyn Fn(&ValRecord),
) -> Result<RunSummary, TrainError> {
    train_seg_in(&mut Group::single(), cfg, opts, stop, on_step, on_val)
}

/// [`train_seg`] as one rank of `group` ([`crate::dist`]): this rank's share of each batch,
/// each task's loss divided by the whole batch's labelled pixels (shared between the ranks
/// each step), so the ranks' mean gradient is the one process's step on the whole batch;
/// validation and the run directory on rank 0 alone.
pub fn train_seg_in(
    group: &mut Group,
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    on_step: &dyn Fn(&StepRecord),
    on_val: &dyn Fn(&ValRecord),
) -> Result<RunSummary, TrainError> {
    let dev = opts.device.clone();
    let scfg = cfg.seg_config().map_err(|e| TrainError::Setup(e.0))?;
    let seg = cfg.seg.clone().unwrap_or_default();
    // The store, regimes, levels and initial weights are checked before the run directory is
    // written: a run that cannot start leaves no folder to mistake for one that did.
    agree_with_ranks(cfg, opts, group)?;
    let (loader, mut trained) = open_loader(cfg, &opts.store, Sampler::LevelWeighted, &dev, group)?;
    agree_on_data(group, &opts.store, &trained)?;
    // A validation level the store lacks would fail at the first validation, its steps lost.
    if !seg.eval_level.trim().is_empty() {
        let have = icefm_dataset::store::read_attrs(&opts.store)?.levels;
        let level = eval_level(cfg, &have)?;
        if !have.contains(&level) {
            return Err(TrainError::Setup(format!(
                "seg.eval_level {level}: the store {} has no such level (it has {})",
                opts.store.display(),
                have.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    // Rank 0 alone validates; the others wait for it at the next step's exchange.
    let val = if seg.val_regime.is_empty() || !group.is_leader() {
        None
    } else {
        let reader = SceneReader::open(&opts.store, &cfg.data.channels)?;
        let regime = Regime::open(Some(&opts.store), &seg.val_regime)?;
        let scenes = reader.scenes(Some(&regime))?;
        let level = eval_level(cfg, &reader.levels())?;
        let score_level = reader
            .levels()
            .first()
            .copied()
            .ok_or_else(|| TrainError::Setup("the store has no level".into()))?;
        Some((reader, scenes, infer_options(cfg, level), score_level))
    };
    let vars = VarMap::new();
    let mut model = SegModel::new(VarBuilder::from_varmap(&vars, DType::F32, &dev), &scfg)?;
    if cfg.train.precision == "bf16" {
        model.compute_dtype = DType::BF16;
    }
    model.freeze_encoder = seg.freeze_encoder;
    init_weights(&vars, cfg.train.seed)?;
    let named = named_vars(&vars);
    // The initial encoder is read, its hash and shapes checked, before a run folder is made
    // for it (a resumed run with checkpoints takes its weights from them instead).
    let resuming = opts.resume && !checkpoints(&opts.out).is_empty();
    let initialised = if !seg.init.is_empty() && !resuming {
        // An encoder trained on other input channels (or in another order) loads, and reads
        // its inputs wrong: the run's config says which it was trained on.
        // An `icefm import --channels` file records them in its header instead.
        // The heads too, which the tensors' shapes do not tell: the run's config, or the
        // header of an `icefm export` (or of an import of one).
        let (trained_on, init_heads) = match crate::train::config_of_run(Path::new(&seg.init)) {
            Ok((init_run, icfg)) => {
                // An encoder pre-trained on levels made otherwise (area means against
                // SAR-IceFM's bilinear sampling) sees other coarse inputs here.
                let ours = icefm_dataset::store::read_attrs(&opts.store)?.sar_resample;
                let other = match crate::train::run_sar_resample(&init_run) {
                    Ok(theirs) => (theirs != ours).then(|| theirs.name().to_string()),
                    Err(unknown) => Some(unknown),
                };
                if let Some(theirs) = other {
                    trained.warnings.push(format!(
                        "seg.init {}: its encoder was pre-trained on a store whose levels \
                         resample HH and HV by {theirs}, this store's by {} (`ingest \
                         --sar-resample`): fine-tuning adapts it to these levels",
                        seg.init,
                        ours.name()
                    ));
                }
                let heads = icfg.mae_config().ok().map(|m| m.encoder.heads);
                (Some(icfg.data.channels), heads)
            }
            Err(_) => {
                let recorded = resolve_weights(Path::new(&seg.init))
                    .map(|f| crate::files::Recorded::read(&f))
                    .unwrap_or_default();
                (recorded.channels, recorded.heads)
            }
        };

        if let Some(channels) = trained_on
            && channels != cfg.data.channels
        {
            return Err(TrainError::Setup(format!(
                "seg.init {}: its encoder was trained on data.channels {:?}, this run reads {:?}; \
                 give the same channels in the same order",
                seg.init, channels, cfg.data.channels
            )));
        }
        let loaded = load_init(Path::new(&seg.init), &named, &dev)?;
        // After the tensors loaded: a file that is no encoder at all is said first.
        if let Some(heads) = init_heads
            && heads != scfg.encoder.heads
        {
            return Err(TrainError::Setup(format!(
                "seg.init {}: its encoder has {heads} attention heads, this model {}; set \
                 model.heads = {heads} (or the preset it was trained with)",
                seg.init, scfg.encoder.heads
            )));
        }
        Some(loaded)
    } else {
        None
    };
    let mut run = open_run(cfg, opts, group, &trained)?;
    let existing = run.existing.clone();
    let trained: Vec<(String, Var)> = named
        .iter()
        .filter(|(n, _)| !(seg.freeze_encoder && n.starts_with("encoder.")))
        .cloned()
        .collect();
    let mut opt = AdamW::new(
        trained.clone(),
        AdamWConfig {
            weight_decay: cfg.train.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let mut records = Vec::new();
    let mut validation = Vec::new();
    let mut start = 0;
    // A new run has no best yet (one left in the folder is refused before it starts).
    let mut best = (opts.resume && !existing.is_empty())
        .then(|| read_best(&opts.out).map(|b| (b.step, b.score)))
        .flatten();
    if opts.resume && !existing.is_empty() {
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
            validation = read_validation(&opts.out.join("validation.parquet"))?
                .into_iter()
                .filter(|r| r.step <= start)
                .collect();
            if best.is_some_and(|(s, _)| s > start) {
                best = None;
            }
            run.log(&format!("resumed from {} (step {start})", dir.display()))?;
        }
        group.check_same(RESUME_STEPS, &start.to_string())?;
    } else {
        let n: usize = named.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        run.log(&format!("new fine-tuning run: {n} parameters"))?;
        if let Some((file, k)) = &initialised {
            run.log(&format!("encoder: {k} tensors from {}", file.display()))?;
        } else {
            run.log("encoder: from scratch")?;
        }
    }
    agree_on_weights(group, &named, START_WEIGHTS)?;
    // The validation scenes' pooled scores under the model's weights now, and the score
    // runs select by.
    let validate = |set: &ValSet| -> Result<(Scores, f64), TrainError> {
        let (reader, scenes, iopts, score_level) = set;
        let (pooled, _) = evaluate_scenes(
            &model,
            reader,
            scenes,
            iopts,
            *score_level,
            &dev,
            &mut |_, _| Ok(()),
        )?;
        let s = pooled.scores();
        let score = selection_score(&s, &scfg.tasks);
        Ok((s, score))
    };
    if let Some(set) = &val
        && heal_best(&validation, start, best)
    {
        // The run stopped between the checkpoint it resumes from and saving that step's best:
        // the weights loaded are that step's, scored again as they were.
        let (s, score) = validate(set)?;
        save_best(&opts.out, start, score, &s, &named)?;
        best = Some((start, score));
        run.log(&format!(
            "step {start}: best score {score:.2} saved again (the run stopped before saving it)"
        ))?;
    }

    let share = Share::of(group, cfg);

    let total = cfg.train.steps;
    let mut checkpoint = existing.last().map(|(_, p)| p.clone());
    let mut interrupted = false;
    let mut steps_run = 0;
    let mut feeder = Feeder::new(&loader, start, &dev)?.with_labels()?;
    let trained_vars: Vec<Var> = trained.iter().map(|(_, v)| v.clone()).collect();
    let mut pending: Option<PendingRecord> = None;
    for step in start..total {
        let t0 = StepStart::now(&dev)?;
        let batch = feeder.next()?;
        let k = cfg.train.accumulate as usize;
        // Each task's loss a mean over the whole batch's labelled pixels, whichever rank and
        // micro-batch hold them: the mean gradient over all of them is then one process's.
        let shared = shared_counts(group, &batch, k)?;
        let plane = batch.size * batch.size;
        let mut acc = Accumulated::new();
        let mut names = Vec::new();
        for (m, part) in share.parts(k).into_iter().enumerate() {
            let at = m * part.len;
            let draws = drop_draws(cfg.train.seed, step, scfg.encoder.depth, &part);
            // One micro-batch a step goes up through the page-locked staging.
            let keep = if k == 1 {
                feeder.stage_draws(draws, &model.encoder)?
            } else {
                draws
            };
            // The whole batch when k = 1 (narrow then returns the tensor itself).
            let images = batch.images.narrow(0, at, part.len)?;
            let labels_on = match &batch.labels_on {
                Some(t) => Some(t.narrow(0, at, part.len)?),
                None => None,
            };
            let labels = &batch.labels[at * 3 * plane..(at + part.len) * 3 * plane];
            let outs = on_worker(dev.is_cpu(), || model.forward(&images, Some(&keep)))?;
            if m == 0 && step + 1 < total {
                // The next batch's copy runs beside this step's queued work.
                feeder.prefetch()?;
            }
            let loss = on_worker(dev.is_cpu(), || {
                seg_loss_shared(&outs, labels, labels_on.as_ref(), &scfg, shared)
            })?;
            names = loss.counts.iter().map(|(t, _)| t.name()).collect();
            acc.add(
                &loss.total,
                &trained_vars,
                vec![loss.total.clone(), loss.values.clone()],
                None,
            )?;
        }
        let (grads, values) = acc.finish(group, &trained_vars)?;
        let (clipped, lr) = apply(&grads, &trained_vars, &mut opt, cfg, step)?;
        drop(grads);
        let levels = batch_levels(group, &loader, step, &batch.samples)?;
        let rec = StepRecord {
            step,
            loss: f32::NAN,
            lr,
            grad_norm: f64::NAN,
            images_per_s: 0.0,
            levels,
            extra: names
                .iter()
                .map(|t| (format!("loss_{t}"), f32::NAN))
                .collect(),
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
        let every = seg.val_every;
        let validating =
            val.is_some() && (done == total || (every > 0 && done.is_multiple_of(every)));
        if let Some(t) = this {
            // A checkpoint saves every record so far, and a validation waits for the device
            // anyway: read this step's now if either is due.
            if validating || checkpoint_due(cfg, done, stopping) {
                t.emit(&mut records, on_step)?;
            } else {
                pending = Some(t);
            }
        }
        // A due validation runs even when stopping, so a resumed run keeps the same records
        // and best checkpoint as one that never stopped.
        let mut new_best = None;
        if let Some(set) = &val
            && validating
        {
            let t1 = Instant::now();
            let (s, score) = validate(set)?;
            let v = ValRecord {
                step: done,
                sic_r2: s.sic_r2,
                sod_f1: s.sod_f1,
                floe_f1: s.floe_f1,
                combined: s.combined,
                score,
                seconds: t1.elapsed().as_secs_f64(),
            };
            let text = |v: f64, d: usize| crate::metrics::score_text(v, d);
            run.log(&format!(
                "step {done}: validation SIC R² {}, SOD F1 {}, FLOE F1 {}, combined {}, score {}",
                text(s.sic_r2, 4),
                text(s.sod_f1, 4),
                text(s.floe_f1, 4),
                text(s.combined, 2),
                text(score, 2)
            ))?;
            if score.is_finite() && best.is_none_or(|(_, b)| score > b) {
                new_best = Some((score, s));
                best = Some((done, score));
            }
            on_val(&v);
            validation.push(v);
            write_validation(&opts.out.join("validation.parquet"), &validation)?;
        }
        let stop_here = end_step(
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
        )?;
        // The best after the step's checkpoint: stopped in between, a resume from that
        // checkpoint saves it again (`heal_best`); the other way round, a best would stand
        // without the checkpoint to resume from.
        if let Some((score, s)) = new_best.take() {
            save_best(&opts.out, done, score, &s, &named)?;
            run.log(&format!("step {done}: new best score {score:.2}"))?;
        }
        if stop_here {
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
        validation,
    })
}

/// Whether the best of the `validation` records up to `start` (the first of the highest finite
/// scores, as training picks it) is at `start` itself while the saved best (`best`, its step
/// and score) is not: a run stopped between step `start`'s checkpoint and saving its best.
fn heal_best(validation: &[ValRecord], start: u64, best: Option<(u64, f64)>) -> bool {
    let mut top: Option<&ValRecord> = None;
    for v in validation.iter().filter(|v| v.step <= start) {
        if v.score.is_finite() && top.is_none_or(|t| v.score > t.score) {
            top = Some(v);
        }
    }
    top.is_some_and(|t| t.step == start) && best.is_none_or(|(step, _)| step != start)
}
