//! `icefm ablate`: the data-regime ablation grid. Regimes × init (scratch / MAE) × tasks
//! (multi / single) × levels, each cell fine-tuned from one base configuration, scored on whole
//! test scenes, written to one Parquet table and one PNG plot. Cells with a result are skipped
//! and runs with checkpoints resume, so re-running the same command finishes a half-done grid.
//! Several processes may run one grid at once (one per GPU): each claims a cell before it runs
//! it ([`claim`]).
//!
//! Output folder: `grid.toml` (the grid as given), `runs/<key>/` (a cell: its run, or for a
//! single-task cell one run per task in `runs/<key>/<TASK>/`, and `result.json`),
//! `ablation.parquet`, `ablation.png` and `claims/` (the workers' locks and failure marks).

mod claim;
mod grid;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use icefm_dataset::regime::Regime;
use icefm_model::finetune::{EvalOverrides, evaluate_run};
use icefm_model::metrics::{combined, score_text as text};
use icefm_model::train::{RunOptions, checkpoints, parse_device};
use icefm_schemas::Task;
use indicatif::{ProgressBar, ProgressStyle};

use claim::{Claim, Claims, probe};
use grid::{Cell, Run, TaskMode, levels_text, plan};
use report::{CellResult, PLOT_FILE, TABLE_FILE, write_atomic, write_outputs};

/// A cell's (or a single-task run's) result; its presence marks the cell done.
pub const RESULT_FILE: &str = "result.json";
/// Wall seconds a run has trained so far, summed over interrupted invocations.
const SECONDS_FILE: &str = "train_seconds.txt";

/// How often a training run's time so far is written to [`SECONDS_FILE`].
const SECONDS_EVERY: Duration = Duration::from_secs(60);

/// Arguments of `icefm ablate`.
#[derive(clap::Args, Debug)]
pub struct AblateArgs {
    /// Store to fine-tune and score from (it holds the regimes the grid names).
    #[arg(long)]
    store: PathBuf,
    /// Grid file (TOML): base config, MAE run, test regime, overrides and the axes.
    #[arg(long)]
    grid: PathBuf,
    /// Output folder [default: runs/<grid file stem>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to run: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Check the grid, list its cells (done, to resume or new) and exit.
    #[arg(long)]
    dry_run: bool,
}

/// A cell's state on disk.
#[derive(Debug, Clone)]
enum State {
    /// Its result is there for the steps asked.
    Done(Box<CellResult>),
    /// Some run has checkpoints; it continues from the newest (step given).
    Partial(u64),
    /// Nothing yet.
    New,
}

/// Run `icefm ablate`.
pub fn cmd_ablate(a: AblateArgs) -> Result<ExitCode> {
    let out = match &a.out {
        Some(o) => o.clone(),
        None => PathBuf::from("runs").join(
            a.grid
                .file_stem()
                .and_then(|s| s.to_str())
                .context("--grid has no file name")?,
        ),
    };
    let grid_text = std::fs::read_to_string(&a.grid)
        .map_err(|e| anyhow!("cannot read {}: {e}", a.grid.display()))?;
    let plan = plan(&a.grid, &grid_text, &a.store, &out)?;
    let n = plan.cells.len();
    warn_of_equal_regimes(&plan);
    if a.dry_run {
        let states: Vec<State> = plan.cells.iter().map(|c| state(c, &plan)).collect();
        println!(
            "{n} cells, scored on regime {}; output {}",
            plan.test_regime,
            out.display()
        );
        for (i, (c, s)) in plan.cells.iter().zip(&states).enumerate() {
            let what = match (s, probe(&out, &c.key)) {
                (State::Done(r), _) => format!("done, combined {}", text(r.combined(), 2)),
                (_, Some(who)) => format!("running in another worker ({who})"),
                (State::Partial(step), None) => format!("resumes at step {step}"),
                (State::New, None) => match claim::failed_before(&out, &c.key) {
                    Some(why) => format!("failed before ({why}); runs again"),
                    None => "new".into(),
                },
            };
            println!(
                "cell {}/{n} {}: {}, {} run(s): {what}",
                i + 1,
                c.key,
                describe(c),
                c.runs.len(),
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Store and device of every run; each run sets its own folder.
    let where_ = RunOptions {
        device: parse_device(&a.device).map_err(anyhow::Error::msg)?,
        store: a.store.clone(),
        out: out.clone(),
        resume: false,
    };
    std::fs::create_dir_all(out.join("runs"))
        .with_context(|| format!("creating {}", out.display()))?;
    let mut claims = Claims::open(&out, &a.device)?;
    {
        let _outputs = claims.outputs()?;
        let grid_copy = out.join("grid.toml");
        if std::fs::read_to_string(&grid_copy).is_ok_and(|t| t != grid_text) {
            eprintln!(
                "note: {} held another grid file; it is replaced by {}",
                grid_copy.display(),
                a.grid.display()
            );
        }
        write_atomic(&grid_copy, grid_text.as_bytes())?;
    }
    warn_of_other_cells(&out, &plan);
    warn_of_raised_steps(&plan);
    warn_of_warmup(&plan);
    let inputs = check_inputs(&plan)?;

    // Other workers may share the grid: each cell is claimed before it runs, cells held by a
    // live worker are left to it, and the pass repeats while it ran something, so a cell freed
    // meanwhile (its worker killed) is taken up.
    let stop = crate::train::stop_flag();
    let mut settled = vec![false; n];
    let mut told_taken = vec![false; n];
    let (mut skipped, mut trained) = (0, 0);
    let mut failed: Vec<String> = Vec::new();
    let mut first = true;
    let elsewhere = loop {
        let mut ran = false;
        let mut taken = 0;
        for (i, cell) in plan.cells.iter().enumerate() {
            if settled[i] {
                continue;
            }
            let head = format!("cell {}/{n} {}", i + 1, cell.key);
            if let Some(r) = done_result(&cell.dir, cell.steps, &plan) {
                let how = if first && !told_taken[i] {
                    "skipped, done before"
                } else {
                    "done by another worker"
                };
                println!("{head}: {how} (combined {})", text(r.combined(), 2));
                settled[i] = true;
                skipped += 1;
                continue;
            }
            if let Some(why) = claims.failed_elsewhere(&cell.key) {
                println!("{head}: FAILED in another worker: {why}");
                settled[i] = true;
                failed.push(cell.key.clone());
                continue;
            }
            // Ctrl-C while a run was being scored: stop before the next cell trains a step.
            if stop.load(Ordering::SeqCst) {
                rewrite_outputs(&out, &plan, &mut claims)?;
                println!(
                    "{head}: not started (interrupted); run the same command again to resume the grid"
                );
                return Ok(ExitCode::from(130));
            }
            let held = match claims.claim(&cell.key)? {
                Claim::Taken(who) => {
                    if !told_taken[i] {
                        println!("{head}: running in another worker ({who})");
                        told_taken[i] = true;
                    }
                    taken += 1;
                    continue;
                }
                Claim::Mine(held) => held,
            };
            // What is on disk now: the cell may have been finished or begun by another worker
            // since this one looked.
            let s = state(cell, &plan);
            if let State::Done(r) = s {
                println!(
                    "{head}: done by another worker (combined {})",
                    text(r.combined(), 2)
                );
                settled[i] = true;
                skipped += 1;
                continue;
            }
            ran = true;
            settled[i] = true;
            println!(
                "{head}: started ({}{})",
                describe(cell),
                match s {
                    State::Partial(step) => format!(", resuming at step {step}"),
                    _ => String::new(),
                }
            );
            match run_cell(cell, &plan, &where_, &inputs, stop) {
                Ok(Some(r)) => {
                    println!(
                        "{head}: finished, combined {} (SIC R2 {}, SOD F1 {}, FLOE F1 {}) in {:.1} s",
                        text(r.combined(), 2),
                        text(r.sic_r2.unwrap_or(f64::NAN), 3),
                        text(r.sod_f1.unwrap_or(f64::NAN), 3),
                        text(r.floe_f1.unwrap_or(f64::NAN), 3),
                        r.seconds
                    );
                    trained += 1;
                    claims.clear_failed(&cell.key);
                    drop(held);
                    rewrite_outputs(&out, &plan, &mut claims)?;
                }
                // A cell fails alone (a diverging loss, unreadable weights): the grid goes on,
                // and a re-run tries the cell again.
                Err(e) => {
                    // Each cause once: an error that quotes its source already says it.
                    let mut why = String::new();
                    for c in e.chain().map(ToString::to_string) {
                        if !why.contains(&c) {
                            if !why.is_empty() {
                                why.push_str(": ");
                            }
                            why.push_str(&c);
                        }
                    }
                    println!("{head}: FAILED: {why}");
                    claims.mark_failed(&cell.key, &why);
                    failed.push(cell.key.clone());
                }
                Ok(None) => {
                    drop(held);
                    rewrite_outputs(&out, &plan, &mut claims)?;
                    println!(
                        "{head}: stopped (checkpoint saved); run the same command again to resume the grid"
                    );
                    return Ok(ExitCode::from(130));
                }
            }
        }
        first = false;
        if taken == 0 || !ran {
            break taken;
        }
    };
    rewrite_outputs(&out, &plan, &mut claims)?;
    let others = if elsewhere > 0 {
        format!(", {elsewhere} running in other workers")
    } else {
        String::new()
    };
    println!(
        "{n} cells ({trained} trained, {skipped} skipped, {} failed{others}): {} and {}",
        failed.len(),
        out.join(TABLE_FILE).display(),
        out.join(PLOT_FILE).display()
    );
    if elsewhere > 0 {
        println!(
            "the table and the plot are complete once the other workers finish (the last one \
             rewrites them)"
        );
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "failed: {}; run the same command again to retry them",
            failed.join(", ")
        );
        Ok(ExitCode::from(1))
    }
}

/// A note of the cell folders in `out/runs` that are not this grid's (an earlier grid's, into
/// the same `--out`): their results stay on disk but leave the table and the plot.
fn warn_of_other_cells(out: &Path, plan: &grid::Plan) {
    let Ok(entries) = std::fs::read_dir(out.join("runs")) else {
        return;
    };
    let mine: std::collections::BTreeSet<&str> =
        plan.cells.iter().map(|c| c.key.as_str()).collect();
    let mut others: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|k| !mine.contains(k.as_str()))
        .collect();
    if others.is_empty() {
        return;
    }
    others.sort();
    eprintln!(
        "note: {} cell folder(s) in {} are not of this grid ({}): their results stay there but \
         are not in {TABLE_FILE} or {PLOT_FILE}; give another --out to keep two grids apart",
        others.len(),
        out.join("runs").display(),
        icefm_schemas::names::first_few(&others, 4)
    );
}

/// A warning for runs trained before with fewer `train.steps` than asked now: they train on
/// from their checkpoint, and their learning-rate schedule (over `train.steps`) changes
/// mid-way, so their rows are not those of fresh runs of as many steps.
fn warn_of_raised_steps(plan: &grid::Plan) {
    let raised: Vec<String> = plan
        .cells
        .iter()
        .filter(|c| {
            c.runs.iter().any(|r| {
                !checkpoints(&r.dir).is_empty()
                    && icefm_model::train::config_of_run(&r.dir)
                        .is_ok_and(|(_, cfg)| cfg.train.steps < c.steps)
            })
        })
        .map(|c| c.key.clone())
        .collect();
    if !raised.is_empty() {
        eprintln!(
            "warning: {} cell(s) began with fewer train.steps ({}); they train on to {}, with \
             their learning-rate schedule changed mid-way: not the same as fresh runs of {} \
             steps (give another --out for those)",
            raised.len(),
            icefm_schemas::names::first_few(&raised, 4),
            plan.cells[0].steps,
            plan.cells[0].steps
        );
    }
}

/// A warning when the cells' `train.warmup_steps` is not below their `train.steps` (as
/// `icefm train` warns of a run): their learning rate never reaches `train.lr`.
fn warn_of_warmup(plan: &grid::Plan) {
    if let Some(cfg) = plan
        .cells
        .iter()
        .flat_map(|c| &c.runs)
        .map(|r| &r.cfg)
        .find(|c| c.train.warmup_steps >= c.train.steps)
    {
        eprintln!(
            "warning: train.warmup_steps {} is not below train.steps {}: the cells' learning \
             rate never reaches train.lr",
            cfg.train.warmup_steps, cfg.train.steps
        );
    }
}

/// A note of the grid's regimes that hold the same scenes (a coverage ladder whose first
/// rungs needed as many scenes as the later ones, say): their cells train on the same data,
/// and their rows differ by nothing but the name.
fn warn_of_equal_regimes(plan: &grid::Plan) {
    let mut by_scenes: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for c in &plan.cells {
        let names = by_scenes.entry(c.scene_set.as_str()).or_default();
        if !names.contains(&c.regime.as_str()) {
            names.push(&c.regime);
        }
    }
    for same in by_scenes.values().filter(|v| v.len() > 1) {
        eprintln!(
            "note: regimes {} hold the same scenes: their cells train on the same data, so \
             their rows differ by the name alone (a coverage ladder whose small shares needed \
             as many scenes as the larger, on a small store)",
            same.join(", ")
        );
    }
}

/// What a run of the grid starts from, recorded in its folder ([`INPUTS_FILE`]) when it
/// starts: its initial encoder's weights file and their BLAKE3, and its training regime's
/// scenes. A cell trained from other inputs than the grid now names (the MAE trained on, a
/// regime drawn again, the store grown) would sit in one table with the others as if alike.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunInputs {
    /// `PATH (BLAKE3 …)` of the initial encoder's weights; none from scratch.
    init: Option<String>,
    /// The training regime and [`icefm_dataset::regime::Regime::scenes_hash`] of its scenes.
    regime: String,
}

/// A run's record of what it started from.
const INPUTS_FILE: &str = "inputs.json";

/// The inputs of every run of `plan` as the grid names them now, by run folder; an error,
/// before anything trains, when a run already started from other ones.
fn check_inputs(plan: &grid::Plan) -> Result<std::collections::HashMap<PathBuf, RunInputs>> {
    let mut weights: std::collections::HashMap<String, String> = Default::default();
    let mut out = std::collections::HashMap::new();
    let mut differ = Vec::new();
    for c in &plan.cells {
        for r in &c.runs {
            let init = match r.cfg.seg.as_ref().map(|s| s.init.as_str()) {
                Some(i) if !i.is_empty() => Some(match weights.get(i) {
                    Some(w) => w.clone(),
                    None => {
                        let file = icefm_model::finetune::resolve_weights(Path::new(i))?;
                        let hash = icefm_model::files::file_blake3(&file)
                            .with_context(|| format!("reading {}", file.display()))?;
                        let w = format!(
                            "{} (BLAKE3 {})",
                            std::fs::canonicalize(&file).unwrap_or(file).display(),
                            &hash[..16]
                        );
                        weights.insert(i.to_string(), w.clone());
                        w
                    }
                }),
                _ => None,
            };
            let regime = format!("{} (scenes BLAKE3 {})", c.regime, &c.scenes_hash[..16]);
            let now = RunInputs { init, regime };
            if let Some(before) = std::fs::read(r.dir.join(INPUTS_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<RunInputs>(&b).ok())
                && before != now
            {
                let what = if before.init != now.init {
                    format!(
                        "started from {}, the grid's mae is now {}",
                        before.init.as_deref().unwrap_or("scratch"),
                        now.init.as_deref().unwrap_or("scratch")
                    )
                } else {
                    format!(
                        "trained on {}, the grid's regime is now {}",
                        before.regime, now.regime
                    )
                };
                differ.push(format!("{}: {what}", c.key));
            }
            out.insert(r.dir.clone(), now);
        }
    }
    if !differ.is_empty() {
        anyhow::bail!(
            "{} cell(s) of this --out started from other inputs than the grid names now, and \
             the table would mix them: {}. Give another --out for the grid as it is now, or \
             delete those cells' folders (--out/runs/KEY) to train them again from it",
            differ.len(),
            differ.join("; ")
        );
    }
    Ok(out)
}

/// A cell's axes and size, as its lines print them.
fn describe(c: &Cell) -> String {
    format!(
        "regime {}, {} scenes, {:.1} % of the pool, init {}, tasks {}, levels {}, {} steps",
        c.regime,
        c.scenes,
        100.0 * c.fraction,
        c.init.name(),
        c.tasks.name(),
        levels_text(&c.levels),
        c.steps
    )
}

/// Rewrite the table and the plot from every cell's result on disk (this worker's and any
/// other's), one worker at a time.
fn rewrite_outputs(out: &Path, plan: &grid::Plan, claims: &mut Claims) -> Result<()> {
    let _outputs = claims.outputs()?;
    // The labelled fraction is the plan's: the pool may have changed since a cell was scored.
    let results: Vec<Option<CellResult>> = plan
        .cells
        .iter()
        .map(|c| {
            done_result(&c.dir, c.steps, plan).map(|mut r| {
                r.labelled_fraction = c.fraction;
                r
            })
        })
        .collect();
    write_outputs(out, plan, &results)
}

/// `dir`'s result, when it is there for `steps` and was scored on the plan's test regime (the
/// same scenes): a result of another test regime is scored again.
fn done_result(dir: &Path, steps: u64, plan: &grid::Plan) -> Option<CellResult> {
    CellResult::read(&dir.join(RESULT_FILE)).filter(|r| {
        r.steps == steps
            && r.test_regime == plan.test_regime
            && r.test_scenes_hash
                .as_ref()
                .is_none_or(|h| *h == plan.test_hash)
    })
}

/// What is on disk of `cell`.
fn state(cell: &Cell, plan: &grid::Plan) -> State {
    if let Some(r) = done_result(&cell.dir, cell.steps, plan) {
        return State::Done(Box::new(r));
    }
    let newest = cell
        .runs
        .iter()
        .filter_map(|r| checkpoints(&r.dir).last().map(|(s, _)| *s))
        .max();
    newest.map_or(State::New, State::Partial)
}

/// A progress bar style from `template`.
fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Train (or resume) and score every run of `cell`; `None` when Ctrl-C stopped it.
fn run_cell(
    cell: &Cell,
    plan: &grid::Plan,
    where_: &RunOptions,
    inputs: &std::collections::HashMap<PathBuf, RunInputs>,
    stop: &AtomicBool,
) -> Result<Option<CellResult>> {
    let test_regime = plan.test_regime.as_str();
    let mut parts = Vec::new();
    for run in &cell.runs {
        if run.task.is_some()
            && let Some(r) = done_result(&run.dir, cell.steps, plan)
        {
            parts.push(r);
            continue;
        }
        match run_one(cell, run, plan, where_, inputs.get(&run.dir), stop)? {
            Some(r) => parts.push(r),
            None => return Ok(None),
        }
    }
    let pick = |t: Task, f: fn(&CellResult) -> Option<f64>| {
        parts
            .iter()
            .zip(&cell.runs)
            .find(|(_, run)| run.task.is_none_or(|x| x == t))
            .and_then(|(r, _)| f(r))
    };
    let (sic, sod, floe) = (
        pick(Task::Sic, |r| r.sic_r2),
        pick(Task::Sod, |r| r.sod_f1),
        pick(Task::Floe, |r| r.floe_f1),
    );
    let total = match (sic, sod, floe) {
        (Some(a), Some(b), Some(c)) => Some(combined(a, b, c)).filter(|v| v.is_finite()),
        _ => None,
    };
    let result = CellResult {
        key: cell.key.clone(),
        regime: cell.regime.clone(),
        labelled_fraction: cell.fraction,
        scenes: cell.scenes as u64,
        init: cell.init.name().into(),
        tasks: cell.tasks.name().into(),
        levels: cell.levels.clone(),
        steps: cell.steps,
        test_regime: test_regime.into(),
        test_scenes_hash: Some(plan.test_hash.clone()),
        sic_r2: sic,
        sod_f1: sod,
        floe_f1: floe,
        combined: total,
        seconds: parts.iter().map(|r| r.seconds).sum(),
        weights: parts.iter().flat_map(|r| r.weights.clone()).collect(),
    };
    if cell.tasks == TaskMode::Single {
        result.write(&cell.dir.join(RESULT_FILE))?;
    }
    Ok(Some(result))
}

/// Train (or resume) one run, then score it on the test regime and write its `result.json`;
/// `None` when Ctrl-C stopped it.
fn run_one(
    cell: &Cell,
    run: &Run,
    plan: &grid::Plan,
    where_: &RunOptions,
    inputs: Option<&RunInputs>,
    stop: &AtomicBool,
) -> Result<Option<CellResult>> {
    let test_regime = plan.test_regime.as_str();
    let store = where_.store.as_path();
    // A run goes on from its checkpoints; one that saved a best before its first step
    // checkpoint and stopped starts over as a resume, which replaces that best.
    let resume = !checkpoints(&run.dir).is_empty()
        || (run.dir.join("checkpoints/best").exists() && run.dir.join("config.toml").is_file());
    let prefix = match run.task {
        Some(t) => format!("{}/{}", cell.key, t.name()),
        None => cell.key.clone(),
    };
    let opts = RunOptions {
        out: run.dir.clone(),
        resume,
        ..where_.clone()
    };
    // What a new run starts from, for later passes to compare with the grid's then.
    if let (false, Some(i)) = (resume, inputs) {
        std::fs::create_dir_all(&run.dir)
            .with_context(|| format!("creating {}", run.dir.display()))?;
        write_atomic(
            &run.dir.join(INPUTS_FILE),
            &serde_json::to_vec_pretty(i).context("inputs record")?,
        )?;
    }
    let seconds_path = run.dir.join(SECONDS_FILE);
    let before: f64 = std::fs::read_to_string(&seconds_path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0);
    let t0 = Instant::now();
    // While it trains, the time so far is written every minute once its run has started: a
    // worker killed outright (kill -9, a node lost) loses at most a minute of it.
    let training = AtomicBool::new(true);
    let trained = std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = Instant::now();
            while training.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= SECONDS_EVERY && run.dir.join("config.toml").is_file() {
                    let so_far = before + t0.elapsed().as_secs_f64();
                    let _ = write_atomic(&seconds_path, format!("{so_far:.3}\n").as_bytes());
                    last = Instant::now();
                }
            }
        });
        let trained = crate::train::run_with_bar(&run.cfg, &opts, &prefix);
        training.store(false, Ordering::SeqCst);
        trained
    });
    let train_seconds = before + t0.elapsed().as_secs_f64();
    // A run refused before it started leaves no record of inputs: the next pass may start it
    // from others (its weights mended, say).
    if !resume && !run.dir.join("config.toml").is_file() {
        let _ = std::fs::remove_file(run.dir.join(INPUTS_FILE));
    }
    // A failed attempt's time counts too, where it left a run to go on from: a re-run resumes
    // from its last checkpoint.
    if trained.is_ok() || run.dir.join("config.toml").is_file() {
        std::fs::write(&seconds_path, format!("{train_seconds:.3}\n"))
            .with_context(|| format!("writing {}", seconds_path.display()))?;
    }
    let summary =
        trained.with_context(|| format!("cell {prefix}: training in {}", run.dir.display()))?;
    if summary.interrupted || stop.load(Ordering::SeqCst) {
        return Ok(None);
    }

    let t1 = Instant::now();
    let bar = ProgressBar::new(regime_scenes(store, test_regime));
    bar.set_style(bar_style(
        "{prefix} [{bar:30}] {pos}/{len} test scenes  {msg}",
    ));
    bar.set_prefix(prefix.clone());
    bar.enable_steady_tick(Duration::from_millis(500));
    let mut told = false;
    let eval = evaluate_run(
        &run.dir,
        store,
        Some(test_regime),
        &EvalOverrides {
            progress: Some(crate::eval::window_progress(&bar)),
            ..EvalOverrides::default()
        },
        &where_.device,
        &mut |s, _| {
            bar.inc(1);
            bar.set_message(s.scene.clone());
            // A stop ends the scoring after the scene at hand; the next run scores the cell
            // again from its last checkpoint.
            if stop.load(Ordering::SeqCst) {
                if !told {
                    bar.println(format!(
                        "{prefix}: stopping; the scoring ends here and is done again next time"
                    ));
                    told = true;
                }
                return Err(icefm_model::train::TrainError::Setup(
                    SCORING_STOPPED.into(),
                ));
            }
            Ok(())
        },
    );
    bar.finish_and_clear();
    if stop.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let eval = eval.with_context(|| format!("cell {prefix}: scoring on regime {test_regime}"))?;
    let s = eval.pooled.scores();
    let finite = |v: f64| Some(v).filter(|v| v.is_finite());
    let result = CellResult {
        key: prefix,
        regime: cell.regime.clone(),
        labelled_fraction: cell.fraction,
        scenes: cell.scenes as u64,
        init: cell.init.name().into(),
        tasks: run
            .task
            .map_or(cell.tasks.name().to_string(), |t| t.name().to_string()),
        levels: cell.levels.clone(),
        steps: cell.steps,
        test_regime: test_regime.into(),
        test_scenes_hash: Some(plan.test_hash.clone()),
        sic_r2: finite(s.sic_r2),
        sod_f1: finite(s.sod_f1),
        floe_f1: finite(s.floe_f1),
        combined: finite(s.combined),
        seconds: train_seconds + t1.elapsed().as_secs_f64(),
        // Absolute: the record holds wherever the grid is run from next.
        weights: vec![
            std::fs::canonicalize(&eval.weights)
                .unwrap_or_else(|_| eval.weights.clone())
                .display()
                .to_string(),
        ],
    };
    result.write(&run.dir.join(RESULT_FILE))?;
    Ok(Some(result))
}

/// The error that ends a cell's scoring on a stop signal (never shown: the cell is reported
/// as stopped).
const SCORING_STOPPED: &str = "stopped";

/// Scenes of the test regime (for the scoring bar; 0 when unreadable).
fn regime_scenes(store: &Path, regime: &str) -> u64 {
    Regime::open(Some(store), regime).map_or(0, |r| r.scenes.len() as u64)
}
