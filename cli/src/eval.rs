//! `icefm eval` (AutoICE metrics of a fine-tuned model on whole scenes of a store) and
//! `icefm predict` (charts of new NetCDF scenes in the AutoICE submission format).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use icefm_dataset::SceneReader;
use icefm_dataset::store::ArrayKind;
use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
use icefm_ingest::quicklook::{QuicklookOptions, write_confusion_png, write_eval_panel};
use icefm_ingest::reader::is_reference_file;
use icefm_ingest::store::{new_attrs, with_sar_resample};
use icefm_ingest::submission::{SceneMaps, write_submission};
use icefm_model::evaluate::{
    Blend, SceneResult, ScoredMaps, predict_level, upsample_nearest, write_scene_table,
};
use icefm_model::finetune::{
    EvalOverrides, eval_level, evaluate_run, infer_options, load_seg_model, run_config,
};
use icefm_model::metrics::Scores;
use icefm_model::train::{TrainError, config_of_run, parse_device, run_sar_resample, run_starts};
use icefm_schemas::store::{DEFAULT_CODEC, SarResample};
use icefm_schemas::{Level, Task};
use indicatif::{ProgressBar, ProgressStyle};

/// Panel width per image column in evaluation PNGs (eight columns per panel).
const PANEL_WIDTH: usize = 300;

/// Arguments of `icefm eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Fine-tuning run (its best checkpoint, else its newest), or a checkpoint folder in one.
    #[arg(long)]
    pub run: PathBuf,
    /// Store holding the scenes [default: the store of the run's latest start, from its
    /// starts.jsonl].
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Regime of the scenes to score [default: every scene of the store].
    #[arg(long)]
    pub regime: Option<String>,
    /// Output folder [default: RUN/eval-<regime or all>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip the per-scene PNG panels.
    #[arg(long)]
    pub no_panels: bool,
    /// Inference settings.
    #[command(flatten)]
    pub infer: InferArgs,
}

/// Sliding-window settings shared by `icefm eval` and `icefm predict`.
#[derive(clap::Args, Debug, Default)]
pub struct InferArgs {
    /// Inference level, e.g. 200m [default: the run's seg.eval_level, else its finest level].
    #[arg(long)]
    pub level: Option<String>,
    /// Window stride in pixels [default: the run's seg.eval_stride, else half the crop].
    #[arg(long)]
    pub stride: Option<usize>,
    /// Blending of overlapping windows: mean or taper [default: the run's seg.eval_blend].
    #[arg(long)]
    pub blend: Option<String>,
    /// Where to run: cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
}

impl InferArgs {
    /// The device and the run's settings as overridden here.
    fn resolve(&self) -> Result<(icefm_model::Device, EvalOverrides)> {
        let dev =
            parse_device(self.device.as_deref().unwrap_or("cpu")).map_err(anyhow::Error::msg)?;
        Ok((
            dev,
            overrides(self.level.as_deref(), self.stride, self.blend.as_deref())?,
        ))
    }
}

fn overrides(
    level: Option<&str>,
    stride: Option<usize>,
    blend: Option<&str>,
) -> Result<EvalOverrides> {
    let level = match level {
        Some(l) => Some(
            *Level::parse_list(l)?
                .first()
                .with_context(|| format!("--level {l}: no level"))?,
        ),
        None => None,
    };
    let blend = match blend {
        Some(b) => {
            Some(Blend::parse(b).with_context(|| format!("--blend {b}: expected mean or taper"))?)
        }
        None => None,
    };
    Ok(EvalOverrides {
        level,
        stride,
        blend,
        batch: None,
        progress: None,
    })
}

/// A [`WindowProgress`] that shows the scene at hand's windows in `bar`'s message: a scene
/// takes minutes on a CPU, and the bar moves by whole scenes.
pub(crate) fn window_progress(bar: &ProgressBar) -> icefm_model::evaluate::WindowProgress {
    let bar = bar.clone();
    icefm_model::evaluate::WindowProgress(std::sync::Arc::new(move |done, of| {
        if done < of {
            bar.set_message(format!("scene {}: {done}/{of} windows", bar.position() + 1));
        }
    }))
}

fn scene_bar(n: usize, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} scenes  {elapsed} elapsed, {eta_text}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "eta_text",
            // No estimate before the first scene ends (indicatif would say 0 s).
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = if s.pos() == 0 {
                    write!(w, "eta after the first scene")
                } else {
                    write!(w, "eta {}", indicatif::HumanDuration(s.eta()))
                };
            },
        )
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

/// Peak resident memory of this process so far, MiB (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn fmt_score(v: f64) -> String {
    icefm_model::metrics::score_text(v, 4)
}

/// The store the run at `run` (or a checkpoint in it) trained on at its latest start, which
/// must still be there.
fn trained_store(run: &Path) -> Result<PathBuf> {
    let (dir, _) = config_of_run(run)?;
    let start = run_starts(&dir).pop().with_context(|| {
        format!(
            "{} records no store (runs before starts.jsonl do not): give --store",
            dir.display()
        )
    })?;
    if !icefm_dataset::location::exists(&start.store.join("zarr.json")).unwrap_or(false) {
        bail!(
            "{} trained on {}, which is no longer a store there: give --store",
            dir.display(),
            start.store.display()
        );
    }
    eprintln!(
        "store: {} (the run's, from its starts.jsonl)",
        start.store.display()
    );
    Ok(start.store)
}

/// The configuration of a run (a run folder, or a checkpoint or weights file in one) and the
/// scenes it trained on, as its `starts.jsonl` records them (every start's): `None` where a
/// start records none (started by an icefm older than the record) or there is no record.
pub(crate) fn trained_scenes_of(
    run: &Path,
) -> Option<(
    icefm_model::config::TrainConfig,
    Option<std::collections::BTreeSet<String>>,
)> {
    let (dir, cfg) = config_of_run(run).ok()?;
    let starts = run_starts(&dir);
    let scenes = (!starts.is_empty())
        .then(|| {
            let mut all = std::collections::BTreeSet::new();
            for s in starts {
                all.extend(s.trained_scenes?);
            }
            Some(all)
        })
        .flatten();
    Some((cfg, scenes))
}

/// What a run's scores on `scored` are not held out from: the scored scenes it trained on
/// (`None`: its record does not say), and those its initial encoder's runs trained on, through
/// every `seg.init` back (`None`: an encoder from outside icefm's runs, or no record).
struct Seen {
    by_run: Option<Vec<String>>,
    by_init: Option<Vec<String>>,
    /// The initial encoder's run, when there is one.
    init: Option<String>,
    /// Why `by_init` is `None` when there is an initial encoder: the encoder along the chain
    /// that could not be followed, and why.
    init_unknown: Option<String>,
}

/// Where the `seg.init` of the run at `run` is: as written when absolute or found from here,
/// else below one of the run folder's ancestors (a relative path was written from the folder
/// training ran in, which is usually one of them).
fn find_init(init: &str, run: &Path) -> Option<PathBuf> {
    let p = Path::new(init);
    if p.exists() || p.is_absolute() {
        return p.exists().then(|| p.to_path_buf());
    }
    let base = std::fs::canonicalize(run).ok()?;
    base.ancestors()
        .skip(1)
        .map(|a| a.join(p))
        .find(|c| c.exists())
}

fn seen_in_training(run: &Path, scored: &[std::sync::Arc<str>]) -> Seen {
    let among = |set: &std::collections::BTreeSet<String>| -> Vec<String> {
        scored
            .iter()
            .filter(|s| set.contains(&***s))
            .map(|s| s.to_string())
            .collect()
    };
    let (mut at, own) = trained_scenes_of(run).map_or((None, None), |(c, s)| (Some(c), s));
    let by_run = own.as_ref().map(among);
    // The chain of initial encoders: each run's seg.init, as its config.toml records it.
    let mut init_seen = std::collections::BTreeSet::new();
    let mut unknown = None;
    let mut first = None;
    let mut from = run.to_path_buf();
    for _ in 0..16 {
        let Some(init) = at
            .as_ref()
            .and_then(|c| c.seg.as_ref())
            .map(|s| s.init.clone())
            .filter(|i| !i.is_empty())
        else {
            break;
        };
        first.get_or_insert_with(|| init.clone());
        let Some(path) = find_init(&init, &from) else {
            unknown = Some(format!(
                "{init} is not found (from here, nor below the run's folders)"
            ));
            break;
        };
        match trained_scenes_of(&path) {
            Some((cfg, Some(set))) => {
                init_seen.extend(set);
                at = Some(cfg);
                from = path;
            }
            Some((_, None)) => {
                unknown = Some(format!(
                    "{init} does not record the scenes it trained on (started by an older icefm)"
                ));
                break;
            }
            None => {
                unknown = Some(format!(
                    "{init} is not an icefm run (an imported encoder, `icefm import`, records \
                     no pre-training scenes)"
                ));
                break;
            }
        }
    }
    Seen {
        by_run,
        by_init: unknown.is_none().then(|| among(&init_seen)),
        init: first,
        init_unknown: unknown,
    }
}

/// Err for a `--stride` longer than the run's crop: its windows would leave strips between
/// them that no window predicts, scored as misses.
fn check_stride(stride: Option<usize>, crop: usize) -> Result<()> {
    match stride {
        Some(0) => bail!(
            "--stride 0: windows must move on; give 1 to {crop}, or leave --stride out for the \
             run's (seg.eval_stride, else half the crop)"
        ),
        Some(s) if s > crop => bail!(
            "--stride {s} is longer than the run's windows (data.crop = {crop}): the strips \
             between them would have no prediction; give at most {crop}"
        ),
        _ => Ok(()),
    }
}

/// Run `icefm eval`.
pub fn cmd_eval(a: EvalArgs) -> Result<Scores> {
    let (dev, ov) = a.infer.resolve()?;
    if a.out.is_none() && a.run.is_file() {
        bail!(
            "--run {} is a weights file, with no run folder to write the evaluation into: give \
             --out FOLDER",
            a.run.display()
        );
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| default_out(&a.run, a.regime.as_deref()));
    // Said before the scenes are scored, not after.
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {}: exists and is not a folder; give a folder for the evaluation's files",
            out.display()
        );
    }
    // The output folder is made once there is something to write in it: a run, store, regime
    // or level that does not exist leaves nothing behind.
    let started = Instant::now();
    let cfg = run_config(&a.run)?;
    check_stride(ov.stride, cfg.data.crop as usize)?;
    if let Some(note) = ov.level.and_then(|l| level_note(&cfg, l)) {
        eprintln!("note: {note}");
    }
    let store = match &a.store {
        Some(s) => s.clone(),
        None => trained_store(&a.run)?,
    };
    crate::manifest::warn_if_unmerged(&store);
    let reader = SceneReader::open(&store, &cfg.data.channels)?;
    let regime = a
        .regime
        .as_deref()
        .map(|r| icefm_dataset::regime::Regime::open(Some(&store), r))
        .transpose()?;
    let scored = reader.scenes(regime.as_ref())?;
    let n = scored.len();
    // The scenes that chose the run's best checkpoint, by content, whatever --regime is
    // called (every scene of the store, by default, holds them).
    let val_regime = cfg.seg.as_ref().map_or("", |s| s.val_regime.as_str());
    let of_val: Option<Vec<String>> = if val_regime.is_empty() {
        None
    } else {
        match icefm_dataset::regime::Regime::open(Some(&store), val_regime) {
            Ok(v) => {
                // The regime as it is now must be the one the run validated on (its start
                // records its scenes' hash): one drawn again since names other scenes.
                let dir = config_of_run(&a.run).map(|(d, _)| d).ok();
                let then = dir
                    .map(|d| run_starts(&d))
                    .unwrap_or_default()
                    .last()
                    .and_then(|s| {
                        s.regimes
                            .iter()
                            .find(|r| r.key == "seg.val_regime")
                            .and_then(|r| r.blake3.clone())
                    });
                if then.as_ref().is_some_and(|h| *h != v.scenes_hash()) {
                    eprintln!(
                        "warning: the run's seg.val_regime `{val_regime}` has been drawn again \
                         since the run started (its scenes differ from those recorded in \
                         starts.jsonl): which scored scenes chose its best checkpoint is not \
                         known"
                    );
                    None
                } else {
                    Some(
                        scored
                            .iter()
                            .filter(|s| v.scenes.iter().any(|x| x.as_str() == &***s))
                            .map(|s| s.to_string())
                            .collect(),
                    )
                }
            }
            Err(e) => {
                eprintln!(
                    "note: the run's seg.val_regime `{val_regime}` cannot be read ({e}): which \
                     scored scenes chose its best checkpoint is not known"
                );
                None
            }
        }
    };
    if let Some(v) = of_val.as_ref().filter(|v| !v.is_empty()) {
        eprintln!(
            "warning: {} of the {n} scenes scored are of the run's seg.val_regime `{val_regime}` \
             ({}): its best checkpoint was chosen on them, so its scores on them are not \
             held-out scores (metrics.json lists them)",
            v.len(),
            icefm_schemas::names::first_few(v, 5)
        );
    }
    // Scores on scenes the run (or its initial encoder) trained on are not held-out scores:
    // say so, and record them.
    let seen = seen_in_training(&a.run, &scored);
    let some = |v: &[String]| icefm_schemas::names::first_few(v, 5);
    match &seen.by_run {
        Some(v) if !v.is_empty() => eprintln!(
            "warning: {} of the {n} scenes scored are among those the run trained on ({}); its \
             scores on them are not held-out scores (metrics.json lists them)",
            v.len(),
            some(v)
        ),
        Some(_) => {}
        None => eprintln!(
            "warning: the run's starts.jsonl does not record the scenes it trained on (it was \
             started by an older icefm): whether these {n} scenes were among them is not known"
        ),
    }
    if let Some(why) = &seen.init_unknown {
        eprintln!(
            "note: whether these {n} scenes were among those the initial encoder was trained on \
             is not known: {why}"
        );
    }
    if let Some(v) = seen.by_init.as_ref().filter(|v| !v.is_empty()) {
        eprintln!(
            "warning: {} of the {n} scenes scored are among those its initial encoder ({}) \
             was trained on ({}): not held out from pre-training (metrics.json lists them)",
            v.len(),
            seen.init.as_deref().unwrap_or("?"),
            some(v)
        );
    }
    let bar = scene_bar(n, "eval");
    let panels = !a.no_panels;
    // Everything is written into a folder beside `out` and moved into it once whole: a stopped
    // or failed evaluation leaves an earlier one's outputs as they were, never mixed with its own.
    let stage = Stage::new(&out);
    let mut panel_names: Vec<String> = Vec::new();
    let mut scored_so_far = 0;
    let mut on_scene = |r: &SceneResult, maps: &ScoredMaps| -> Result<(), TrainError> {
        bar.inc(1);
        bar.set_message(format!("{} ({} windows)", r.scene, r.windows));
        scored_so_far += 1;
        if bar.is_hidden() {
            // No terminal (a batch job's log): a line per scene instead of the bar.
            eprintln!(
                "eval: {scored_so_far} of {n} scenes ({}, {} windows), {:.1} s",
                r.scene,
                r.windows,
                started.elapsed().as_secs_f64()
            );
        }
        if panels {
            let dir = stage.dir().map_err(|e| TrainError::Io {
                path: stage.path.display().to_string(),
                reason: e.to_string(),
            })?;
            let dir = dir.join("panels");
            std::fs::create_dir_all(&dir).map_err(|e| TrainError::Io {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
            let name = format!("{}.png", r.scene);
            let path = dir.join(&name);
            write_panel(&reader, &path, r, maps).map_err(|e| {
                let path = path.display().to_string();
                // A write's error names the file already: its cause alone, not the file twice.
                let reason = if e.to_string().starts_with(&path) {
                    e.root_cause().to_string()
                } else {
                    format!("{e:#}")
                };
                TrainError::Io { path, reason }
            })?;
            panel_names.push(name);
        }
        Ok(())
    };
    let ov = EvalOverrides {
        progress: Some(window_progress(&bar)),
        ..ov
    };
    let ev = evaluate_run(
        &a.run,
        &store,
        a.regime.as_deref(),
        &ov,
        &dev,
        &mut on_scene,
    );
    bar.finish_and_clear();
    let ev = ev?;
    let staged = stage
        .dir()
        .with_context(|| format!("creating {}", stage.path.display()))?;
    let s = ev.pooled.scores();
    write_scene_table(&staged.join("scenes.parquet"), &ev.scenes)?;
    for (task, conf) in [
        (Task::Sic, &ev.pooled.sic_confusion),
        (Task::Sod, &ev.pooled.sod),
        (Task::Floe, &ev.pooled.floe),
    ] {
        let csv = staged.join(format!("confusion_{}.csv", task.name()));
        std::fs::write(&csv, conf.to_csv())
            .with_context(|| format!("writing {}", csv.display()))?;
        let png = staged.join(format!("confusion_{}.png", task.name()));
        write_confusion_png(
            &png,
            task,
            conf.counts(),
            conf.classes(),
            conf.classes() + 1,
        )?;
    }
    let windows: usize = ev.scenes.iter().map(|r| r.windows).sum();
    let seconds = started.elapsed().as_secs_f64();
    let unpredicted = [
        ev.pooled
            .sic_confusion
            .predicted(ev.pooled.sic_confusion.classes()),
        ev.pooled.sod.predicted(ev.pooled.sod.classes()),
        ev.pooled.floe.predicted(ev.pooled.floe.classes()),
    ];
    let json = serde_json::json!({
        "scores": s,
        "tasks": ev.cfg.seg_config()?.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "weights": icefm_dataset::location::recorded(&ev.weights),
        "store": store.display().to_string(),
        "regime": a.regime,
        "scenes": ev.scenes.len(),
        "level": ev.opts.level.name(),
        "score_level": ev.score_level.name(),
        "crop": ev.opts.crop,
        "stride": ev.opts.stride,
        "blend": ev.opts.blend.name(),
        "windows": windows,
        "windows_per_scene": windows as f64 / ev.scenes.len().max(1) as f64,
        "seconds": seconds,
        "seconds_per_scene": ev.scenes.iter().map(|r| r.seconds).sum::<f64>() / ev.scenes.len().max(1) as f64,
        "peak_rss_mib": peak_rss_mib(),
        "unpredicted_labelled_pixels": unpredicted,
        "scenes_seen_in_training": seen.by_run,
        "scenes_seen_by_init": seen.by_init,
        "scenes_of_val_regime": of_val,
        "panels": panel_names,
    });
    let path = staged.join(METRICS_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    stage.publish(&out)?;
    println!(
        "scored {} scene{} at {} (crop {}, stride {}, {} blending): {} windows, {:.1} s, peak memory {}",
        ev.scenes.len(),
        if ev.scenes.len() == 1 { "" } else { "s" },
        ev.opts.level,
        ev.opts.crop,
        ev.opts.stride,
        ev.opts.blend.name(),
        windows,
        seconds,
        peak_rss_mib().map_or("-".into(), |m| format!("{m:.0} MiB"))
    );
    println!(
        "SIC R² {}  SOD F1 {}  FLOE F1 {}  combined {}",
        fmt_score(s.sic_r2),
        fmt_score(s.sod_f1),
        fmt_score(s.floe_f1),
        icefm_model::metrics::score_text(s.combined, 2)
    );
    // A task the run does not predict scores nothing, whatever the labels; say which, and warn
    // only of trained tasks without a labelled pixel.
    let trained = ev.cfg.seg_config()?.tasks;
    let untrained = untrained_tasks(&ev.cfg)?;
    if !untrained.is_empty() {
        println!(
            "{}: not trained by this run, not scored",
            untrained.join(" / ")
        );
    }
    let unlabelled: Vec<&str> = Task::ALL
        .into_iter()
        .zip(s.pixels)
        .filter(|(t, n)| *n == 0 && trained.contains(t))
        .map(|(t, _)| t.name())
        .collect();
    if !unlabelled.is_empty() {
        eprintln!(
            "warning: no labelled {} pixel in these scenes, nothing to score; test-release \
             scenes get their charts from their reference files (docs/ingest.md, \
             \"The test release\")",
            unlabelled.join(" / ")
        );
    }
    if ev.score_level != Level::new(80)? {
        eprintln!(
            "note: scored at {}, the store's finest level: AutoICE scores at 80 m (ingest the \
             scenes at 80m to score as it does)",
            ev.score_level
        );
    }
    println!("outputs: {}", out.display());
    Ok(s)
}

fn write_panel(
    reader: &SceneReader,
    path: &Path,
    r: &SceneResult,
    maps: &ScoredMaps,
) -> Result<()> {
    let level = Level::new(
        reader
            .levels()
            .first()
            .map(|l| l.spacing_m())
            .context("the store has no level")?,
    )?;
    let (sar, [c, h, w]) = reader.read_f32(&r.scene, level, ArrayKind::Sar)?;
    if c < 2 || (h, w) != maps.size {
        bail!("{}: SAR at {level} is {c} x {h} x {w}", r.scene);
    }
    let plane = h * w;
    let truth: [&[u8]; 3] = std::array::from_fn(|t| &maps.truth[t * plane..(t + 1) * plane]);
    let pred: [&[u8]; 3] = std::array::from_fn(|t| &maps.pred[t][..]);
    // The level shown and scored is the finest; the model may have run at a coarser one.
    let at = if r.level == r.score_level {
        format!("at {level}")
    } else {
        format!("run at {}, scored at {}", r.level, r.score_level)
    };
    let header = format!(
        "{}  {at}: SIC R2 {}  SOD F1 {}  FLOE F1 {}",
        r.scene,
        fmt_score(r.scores.sic_r2),
        fmt_score(r.scores.sod_f1),
        fmt_score(r.scores.floe_f1)
    );
    write_eval_panel(
        path,
        &header,
        h,
        w,
        &sar[..plane],
        &sar[plane..2 * plane],
        truth,
        pred,
        &QuicklookOptions {
            max_width: PANEL_WIDTH,
        },
    )?;
    Ok(())
}

/// Arguments of `icefm predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// AI4Arctic NetCDF scenes (raw 40 m or ready-to-train 80 m; charts not needed).
    #[arg(required = true)]
    pub scenes: Vec<PathBuf>,
    /// Fine-tuning run (its best checkpoint, else its newest), or a checkpoint folder in one.
    #[arg(long)]
    pub run: PathBuf,
    /// The submission file to write (an earlier submission there is replaced; any other file
    /// is refused).
    #[arg(long)]
    pub out: PathBuf,
    /// Keep the scenes' store here (by default a temporary store is removed afterwards).
    #[arg(long)]
    pub keep_store: Option<PathBuf>,
    /// Inference settings.
    #[command(flatten)]
    pub infer: InferArgs,
}

/// The name of a scene in the submission file: its scene id `<start>_<service>` (the
/// ready-to-train release's file stem without `_prep`, which is what AutoICE names scenes by),
/// for a raw file too, so that one file never mixes two naming schemes. A name that parses as
/// neither is taken as its stem.
pub fn submission_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    icefm_schemas::names::parse_scene_name(&stem).map_or_else(
        || {
            stem.strip_suffix("_prep")
                .map_or_else(|| stem.clone(), str::to_string)
        },
        |n| n.scene_id,
    )
}

/// Run `icefm predict`.
pub fn cmd_predict(a: PredictArgs) -> Result<()> {
    let (dev, ov) = a.infer.resolve()?;
    // Written here, as a local store: a URL would become a folder named `s3:`.
    if let Some(k) = &a.keep_store {
        crate::commands::local_store(k, "predict --keep-store")?;
    }
    // Said before any scene is read: the inputs, the output, then the run.
    // `test/*.nc` also matches the test release's reference charts: they are not scenes.
    let (references, scenes): (Vec<&PathBuf>, Vec<&PathBuf>) =
        a.scenes.iter().partition(|p| is_reference_file(p));
    if scenes.is_empty() {
        bail!("no scenes to predict: the files given are all reference charts (…_reference.nc)");
    }
    check_scene_files(&scenes)?;
    let replacing = check_submission_out(&a.out, &scenes)?;
    let (cfg, model) = load_seg_model(&a.run, &dev)?;
    check_stride(ov.stride, cfg.data.crop as usize)?;
    let score = Level::new(80)?;
    // The inference level: as asked, else the run's rule.
    let level = match ov.level {
        Some(l) => l,
        None => eval_level(&cfg, &[score])?,
    };
    if let Some(note) = level_note(&cfg, level) {
        eprintln!("note: {note}");
    }
    let untrained = untrained_tasks(&cfg)?;
    if !untrained.is_empty() {
        eprintln!(
            "warning: this run does not predict {0}: the file's {0} charts are 255 (no \
             prediction) everywhere, so it is not a complete AutoICE submission",
            untrained.join(" / ")
        );
    }
    if !references.is_empty() {
        eprintln!(
            "{} reference chart file(s) (…_reference.nc) are not scenes: left out",
            references.len()
        );
    }
    let mut levels = vec![score];
    if level != score {
        levels.push(level);
    }
    // Levels made as the run's store made them: HH and HV by area means, or bilinearly for a
    // run trained on a store of `ingest --sar-resample bilinear`.
    let sar_resample: SarResample = match config_of_run(&a.run) {
        Ok((run, _)) => run_sar_resample(&run).map_err(anyhow::Error::msg)?,
        Err(_) => SarResample::Area,
    };
    if !sar_resample.is_area() {
        eprintln!(
            "note: the run trained on a store whose levels resample HH and HV by {}: the scenes' \
             levels are made the same way",
            sar_resample.name()
        );
    }
    // The scenes' store: a scratch folder beside the output, removed however this ends, or the
    // store asked for.
    let scratch = match &a.keep_store {
        Some(k) => {
            if k.join("zarr.json").is_file() {
                eprintln!(
                    "note: --keep-store {} is an existing store: the scenes are added to it",
                    k.display()
                );
            }
            None
        }
        None => Some(Scratch::new(&a.out)?),
    };
    let store = match (&a.keep_store, &scratch) {
        (Some(k), _) => k.clone(),
        (None, Some(s)) => s.path.join("scenes.zarr"),
        (None, None) => unreachable!("a scratch folder is made when no store is kept"),
    };
    let bar = scene_bar(scenes.len(), "predict");
    let mut maps = Vec::new();
    let started = Instant::now();
    for path in &scenes {
        bar.set_message(path.display().to_string());
        let patch = (cfg.data.crop).max(64);
        let summary = ingest(
            std::slice::from_ref(*path),
            &store,
            with_sar_resample(new_attrs(&levels, patch, DEFAULT_CODEC), sar_resample),
            &IngestOptions::default(),
            &NoReporter,
        )
        .with_context(|| format!("reading {}", path.display()))?;
        if let Some((p, why)) = summary.failed.first() {
            // A scene without a valid SAR pixel has no prediction: its charts are 255, and the
            // submission goes on with the other scenes.
            if why.contains(icefm_ingest::NO_VALID_SAR) {
                let (h, w) = grid_at(path, score)?;
                eprintln!(
                    "warning: {}: no valid SAR pixel; its charts in the submission are 255 (no \
                     prediction)",
                    path.display()
                );
                maps.push(SceneMaps {
                    scene: submission_name(path),
                    height: h,
                    width: w,
                    sic: vec![255; h * w],
                    sod: vec![255; h * w],
                    floe: vec![255; h * w],
                });
                bar.inc(1);
                continue;
            }
            // A scene's own error names its file already.
            let named = p.display().to_string();
            if why.starts_with(&named) {
                bail!("{why}");
            }
            bail!("{named}: {why}");
        }
        let id = summary
            .done
            .first()
            .or(summary.skipped.first())
            .with_context(|| format!("{}: not ingested", path.display()))?
            .clone();
        let reader = SceneReader::open(&store, &cfg.data.channels)?;
        let data = reader.read(&id, level)?;
        let mut opts = infer_options(&cfg, level);
        if let Some(s) = ov.stride {
            opts.stride = s;
        }
        if let Some(b) = ov.blend {
            opts.blend = b;
        }
        opts.progress = Some(window_progress(&bar));
        let m = predict_level(&model, &data, &opts, &dev)?;
        let (_, (h, w)) = reader.read_labels(&id, score)?;
        let up: [Vec<u8>; 3] = std::array::from_fn(|t| {
            upsample_nearest(&m.maps[t], (m.height, m.width), level, (h, w), score)
        });
        let [sic, sod, floe] = up;
        maps.push(SceneMaps {
            scene: submission_name(path),
            height: h,
            width: w,
            sic,
            sod,
            floe,
        });
        bar.inc(1);
        if bar.is_hidden() {
            // No terminal (a batch job's log): a line per scene instead of the bar.
            eprintln!(
                "predict: {} of {} scenes ({}), {:.1} s",
                maps.len(),
                scenes.len(),
                path.display(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    bar.finish_and_clear();
    write_submission(&a.out, &maps)?;
    drop(scratch);
    println!(
        "predicted {} scene{} at {level} in {:.1} s: {}{}",
        maps.len(),
        if maps.len() == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64(),
        a.out.display(),
        if replacing {
            " (replacing the submission that was there)"
        } else {
            ""
        }
    );
    Ok(())
}

/// The rows and columns of scene file `path` at `level`, from its header.
fn grid_at(path: &Path, level: Level) -> Result<(usize, usize)> {
    let owned = path.to_path_buf();
    let info = icefm_ingest::netcdf_thread::on_netcdf_thread(move || {
        icefm_ingest::reader::SceneReader::open(&owned).map(|r| r.info().clone())
    })?;
    let ratio = f64::from(level.spacing_m()) / info.native_spacing_m;
    Ok((
        icefm_ingest::resample::out_len(info.height, ratio),
        icefm_ingest::resample::out_len(info.width, ratio),
    ))
}

/// The tasks `cfg`'s model has no head for, by name.
fn untrained_tasks(cfg: &icefm_model::config::TrainConfig) -> Result<Vec<&'static str>> {
    let trained = cfg.seg_config()?.tasks;
    Ok(Task::ALL
        .into_iter()
        .filter(|t| !trained.contains(t))
        .map(|t| t.name())
        .collect())
}

/// A note when `level` is not one the run trained at (`data.levels`; a run without them
/// trained at every level of its store): the model is then applied at another resolution.
fn level_note(cfg: &icefm_model::config::TrainConfig, level: Level) -> Option<String> {
    let trained = icefm_model::finetune::trained_levels(cfg).ok()?;
    if trained.is_empty() || trained.contains(&level) {
        return None;
    }
    let names: Vec<String> = trained.iter().map(ToString::to_string).collect();
    Some(format!(
        "the run trained at {} (data.levels); inference at {level} applies it at another \
         resolution",
        names.join(", ")
    ))
}

/// Err for scene paths that are not files, for two paths of one scene (the submission names
/// each scene once), and for files that are not AI4Arctic scenes (not NetCDF, a variable
/// missing).
fn check_scene_files(scenes: &[&PathBuf]) -> Result<()> {
    let mut names: std::collections::HashMap<String, &PathBuf> = std::collections::HashMap::new();
    for p in scenes {
        if p.is_dir() {
            bail!(
                "{}: a folder, not a scene file (give its *.nc files)",
                p.display()
            );
        }
        if !p.is_file() {
            bail!("{}: no such file", p.display());
        }
        if let Some(first) = names.insert(submission_name(p), p) {
            bail!(
                "scene `{}` is given twice ({} and {}): a submission names each scene once",
                submission_name(p),
                first.display(),
                p.display()
            );
        }
    }
    // Each file's header and variables, as ingest checks them, before any scene's work.
    for p in scenes {
        let owned = p.to_path_buf();
        icefm_ingest::netcdf_thread::on_netcdf_thread(move || {
            icefm_ingest::reader::SceneReader::open(&owned).map(drop)
        })?;
    }
    Ok(())
}

/// Err for an `--out` that cannot take the submission: no file name, a folder, one of the
/// scenes, or a file other than an earlier submission (which would be lost). `Ok(true)` when
/// it replaces an earlier submission.
fn check_submission_out(out: &Path, scenes: &[&PathBuf]) -> Result<bool> {
    if icefm_dataset::location::is_url(out) {
        bail!(
            "--out {}: predict writes the submission as a local file; copy it to object storage \
             afterwards",
            out.display()
        );
    }
    let named = out.file_name().is_some_and(|n| n != "." && n != "..")
        && !out.as_os_str().to_string_lossy().ends_with('/');
    if out.is_dir() || !named {
        bail!(
            "--out {}: a folder; name the submission file to write, e.g. {}",
            out.display(),
            out.join("submission.nc").display()
        );
    }
    if !out.exists() {
        return Ok(false);
    }
    for p in scenes {
        if icefm_model::files::same_file(out, p) {
            bail!(
                "--out {} is one of the scenes to predict: the submission would replace it; \
                 name another file",
                out.display()
            );
        }
    }
    if !icefm_ingest::submission::is_submission(out) {
        bail!(
            "--out {}: exists and is not an AutoICE submission (uint8 `SCENE_SIC`, `_SOD`, \
             `_FLOE` charts only); remove it or name another file, so that nothing is replaced \
             by mistake",
            out.display()
        );
    }
    Ok(true)
}

/// Where an evaluation goes without `--out`: `RUN/eval-<regime>`; for one of a run's
/// checkpoints, `RUN/eval-<regime>-<checkpoint>`, since training removes old checkpoint folders
/// and would take the evaluation with them.
fn default_out(run: &Path, regime: Option<&str>) -> PathBuf {
    // A regime given as its file: by its name, not its path.
    let regime = regime.map(|r| {
        let p = Path::new(r);
        match (p.extension(), p.file_stem()) {
            (Some(e), Some(stem)) if e == "parquet" => stem.to_string_lossy().into_owned(),
            _ => r.to_string(),
        }
    });
    let name = format!("eval-{}", regime.as_deref().unwrap_or("all"));
    let parent = run
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"));
    match (parent.and_then(Path::parent), run.file_name()) {
        (Some(root), Some(checkpoint)) => {
            root.join(format!("{name}-{}", checkpoint.to_string_lossy()))
        }
        _ => run.join(name),
    }
}

/// The file an evaluation writes last: a folder with it holds one whole evaluation.
const METRICS_FILE: &str = "metrics.json";

/// An evaluation's outputs while they are written: a hidden folder beside the output folder,
/// made on first use and removed when dropped unless published.
struct Stage {
    path: PathBuf,
    made: std::cell::Cell<bool>,
}

impl Stage {
    fn new(out: &Path) -> Self {
        // `.`, `..` or `dir/.` have no name of their own: stage beside the folder they are.
        let resolved = std::fs::canonicalize(out).or_else(|_| std::path::absolute(out));
        let out = resolved.as_deref().unwrap_or(out);
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = out
            .file_name()
            .map_or_else(|| "eval".into(), |n| n.to_string_lossy().into_owned());
        let prefix = format!(".{name}.eval-");
        // Those of evaluations killed before they could remove them.
        remove_left_by_dead(parent, &prefix);
        Self {
            path: parent.join(format!("{prefix}{}", std::process::id())),
            made: std::cell::Cell::new(false),
        }
    }

    /// The folder, made if it is not yet.
    fn dir(&self) -> std::io::Result<&Path> {
        if !self.made.get() {
            let _ = std::fs::remove_dir_all(&self.path);
            std::fs::create_dir_all(&self.path)?;
            self.made.set(true);
        }
        Ok(&self.path)
    }

    /// Move the outputs into `out`, replacing an earlier evaluation's: its `metrics.json` goes
    /// first and the new one comes last, so `out` never holds a `metrics.json` beside another
    /// evaluation's tables or panels. Of `panels/`, only the PNGs the earlier evaluation wrote
    /// are removed ([`earlier_panels`]); other files there are left alone.
    fn publish(self, out: &Path) -> Result<()> {
        let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
        std::fs::create_dir_all(out).with_context(|| ctx("creating", out))?;
        let metrics = out.join(METRICS_FILE);
        let panels = out.join("panels");
        if metrics.is_file() {
            let earlier = earlier_panels(&metrics, &panels)?;
            std::fs::remove_file(&metrics)
                .with_context(|| ctx("removing the earlier", &metrics))?;
            for png in earlier {
                std::fs::remove_file(&png).with_context(|| ctx("removing the earlier", &png))?;
            }
        }
        let mut names: Vec<_> = std::fs::read_dir(&self.path)
            .with_context(|| ctx("reading", &self.path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| ctx("reading", &self.path))?;
        // metrics.json last.
        names.sort_by_key(|n| n == METRICS_FILE);
        for n in names {
            let (from, to) = (self.path.join(&n), out.join(&n));
            if n == "panels" {
                // One by one, into a `panels/` that may hold files of the user's.
                std::fs::create_dir_all(&to).with_context(|| ctx("creating", &to))?;
                for png in list(&from)? {
                    let dest = to.join(png.file_name().unwrap_or_default());
                    std::fs::rename(&png, &dest)
                        .with_context(|| ctx("moving into place", &dest))?;
                }
                continue;
            }
            std::fs::rename(&from, &to).with_context(|| ctx("moving into place", &to))?;
        }
        Ok(())
    }
}

/// The panels an earlier evaluation wrote into `panels`: those its `metrics` lists, or for an
/// evaluation by an icefm that did not list them, the PNGs named by a scene id. Other files
/// there are the user's.
fn earlier_panels(metrics: &Path, panels: &Path) -> Result<Vec<PathBuf>> {
    let listed: Option<Vec<String>> = std::fs::read_to_string(metrics)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("panels")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
        });
    let png = |p: &Path| p.extension().is_some_and(|e| e == "png") && p.is_file();
    Ok(match listed {
        // Plain file names only: never a path out of `panels`.
        Some(names) => names
            .iter()
            .filter(|n| Path::new(n.as_str()).file_name() == Some(std::ffi::OsStr::new(n.as_str())))
            .map(|n| panels.join(n))
            .filter(|p| png(p))
            .collect(),
        None => list(panels)?
            .into_iter()
            .filter(|p| {
                png(p)
                    && p.file_stem().is_some_and(|s| {
                        let s = s.to_string_lossy();
                        icefm_schemas::names::parse_scene_name(&s).is_some_and(|n| n.scene_id == s)
                    })
            })
            .collect(),
    })
}

/// The entries of folder `dir` (none when there is no such folder).
fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", dir.display())),
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if self.made.get() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Remove the folders `<prefix><PID>` in `parent` of processes no longer alive: what a killed
/// evaluation or prediction left.
fn remove_left_by_dead(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = n.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok())
            && pid != std::process::id()
            && !icefm_ingest::claim::process_alive(pid)
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `predict`'s scratch folder beside `out`, `.icefm-predict-<PID>`: removed when dropped,
/// however the command ends; those of processes killed before they could remove theirs are
/// removed when the next one is made beside them.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(out: &Path) -> Result<Self> {
        const PREFIX: &str = ".icefm-predict-";
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        remove_left_by_dead(parent, PREFIX);
        let path = parent.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stride_longer_than_the_windows_is_refused() {
        assert!(check_stride(None, 96).is_ok());
        assert!(check_stride(Some(96), 96).is_ok());
        let e = check_stride(Some(192), 96).unwrap_err().to_string();
        assert!(
            e.contains("--stride 192") && e.contains("at most 96"),
            "{e}"
        );
    }

    #[test]
    fn an_evaluation_of_a_checkpoint_goes_beside_the_checkpoints_not_into_one() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            default_out(&p("runs/ft"), Some("test")),
            p("runs/ft/eval-test")
        );
        assert_eq!(default_out(&p("runs/ft/"), None), p("runs/ft/eval-all"));
        assert_eq!(
            default_out(&p("runs/ft/checkpoints/step_0000002"), None),
            p("runs/ft/eval-all-step_0000002")
        );
        assert_eq!(
            default_out(&p("/r/checkpoints/best/"), Some("val")),
            p("/r/eval-val-best")
        );
        // A regime given as its file is named by its name, not its path.
        assert_eq!(
            default_out(&p("runs/ft"), Some("/data/s.zarr/regimes/test.parquet")),
            p("runs/ft/eval-test")
        );
    }

    #[test]
    fn a_relative_initial_encoder_is_found_below_the_runs_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        std::fs::create_dir_all(root.join("runs/mae")).unwrap();
        std::fs::create_dir_all(root.join("runs/ft")).unwrap();
        // Written from `work/` (the folder training ran in); looked for from anywhere.
        let found = find_init("runs/mae", &root.join("runs/ft")).unwrap();
        assert_eq!(
            std::fs::canonicalize(found).unwrap(),
            std::fs::canonicalize(root.join("runs/mae")).unwrap()
        );
        assert_eq!(find_init("runs/nothing", &root.join("runs/ft")), None);
        let abs = root.join("runs/mae");
        assert_eq!(find_init(&abs.to_string_lossy(), Path::new("x")), Some(abs));
        assert_eq!(find_init("/no/such/run", &root.join("runs/ft")), None);
    }

    #[test]
    fn a_run_without_a_task_head_names_it() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/seg_vit_tiny.toml"),
        )
        .unwrap();
        let cfg = icefm_model::config::TrainConfig::parse(&text, &["seg.tasks=[\"SOD\"]".into()])
            .unwrap();
        assert_eq!(untrained_tasks(&cfg).unwrap(), ["SIC", "FLOE"]);
        let cfg = icefm_model::config::TrainConfig::parse(&text, &[]).unwrap();
        assert!(untrained_tasks(&cfg).unwrap().is_empty());
    }
}
