//! A run's folder and log, this process's share of the batch, and the loader a run reads from.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use icefm_dataset::regime::{Regime, TrainingScenes, training_scenes};
use icefm_dataset::sampler::parse_level_weights;
use icefm_dataset::{Augment, Loader, LoaderOptions, Sampler};

use crate::config::TrainConfig;
use crate::dist::{Group, Route, SumPath};

use super::feeder::device_prepares;
use super::start::{RunStart, host_name};
use super::{RunOptions, TrainError, checkpoints, io_err};

/// An opened run directory: its checkpoints when it opened, and its log.
pub(crate) struct RunDir {
    /// Checkpoints found, oldest first.
    pub existing: Vec<(u64, PathBuf)>,
    /// `log.txt` (rank 0 only; the other ranks of a data-parallel run write nothing).
    log: Option<File>,
    log_path: PathBuf,
    /// `run.lock`, locked while this process writes the run (rank 0 only): closed, and so
    /// unlocked, when the run ends or its process dies.
    _lock: Option<File>,
}

/// The lock file of a run folder ([`lock_run`]).
const RUN_LOCK: &str = "run.lock";

/// Who is training into the run folder `out` now (its lock's line, `process PID on HOST`), if
/// a process is: for `icefm inspect`. Creates nothing.
pub fn run_holder(out: &Path) -> Option<String> {
    let path = out.join(RUN_LOCK);
    let file = File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => {
            let who = std::fs::read_to_string(&path).unwrap_or_default();
            Some(match who.trim() {
                "" => "a process that did not say which".to_string(),
                w => w.to_string(),
            })
        }
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// The line a failed run ends its `log.txt` with ([`record_failure`]).
pub const FAILED_PREFIX: &str = "failed: ";

/// Add `error` to the end of `out`'s `log.txt` when this process started the run there (its
/// latest start's): a run that ended with an error then says so to `icefm inspect`. Nothing
/// for a run this process refused before starting it.
pub fn record_failure(out: &Path, error: &str) {
    let started_here = super::run_starts(out)
        .last()
        .is_some_and(|s| s.pid == std::process::id());
    if !started_here {
        return;
    }
    let one_line = error.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .open(out.join("log.txt"))
    {
        let _ = writeln!(f, "{FAILED_PREFIX}{one_line}");
    }
}

/// Lock the run folder `out` for this process: another `icefm train` into it would otherwise
/// mix its checkpoints, log and configuration with this one's. An advisory lock (flock), which
/// the system drops with its process, so a killed run leaves nothing to clean up.
/// The inner error: the filesystem has no locks (the run goes on unguarded, and says so in its
/// log).
fn lock_run(out: &Path) -> Result<Result<File, std::io::Error>, TrainError> {
    let path = out.join(RUN_LOCK);
    let file = crate::files::open_lock_file(&path).map_err(|e| io_err(&path, e))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the message of a run that finds it taken.
            let mut f = &file;
            let _ = f
                .set_len(0)
                .and_then(|()| writeln!(f, "process {} on {}", std::process::id(), host_name()));
            Ok(Ok(file))
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(TrainError::Setup(format!(
                "{} is being written by another training ({}); wait for it to end, or give \
                 another --out",
                out.display(),
                match holder.trim() {
                    "" => "its process did not say which",
                    h => h,
                }
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Ok(Err(e)),
    }
}

impl RunDir {
    /// Append a line to `log.txt` (nothing on ranks other than 0).
    pub fn log(&mut self, line: &str) -> Result<(), TrainError> {
        match self.log.as_mut() {
            Some(f) => writeln!(f, "{line}").map_err(|e| io_err(&self.log_path, e)),
            None => Ok(()),
        }
    }

    /// A warning (on stderr and in the log) when a resumed run's `metrics.parquet` in `out`
    /// holds records of fewer than the `start` steps before its checkpoint (`have`).
    pub(crate) fn warn_of_missing_records(
        &mut self,
        out: &Path,
        have: usize,
        start: u64,
    ) -> Result<(), TrainError> {
        if have as u64 == start {
            return Ok(());
        }
        let w = format!(
            "warning: {} holds records of {have} of the {start} steps before the checkpoint (a \
             copy or a file written over?): the others are lost, and the run's curves have a gap",
            out.join("metrics.parquet").display()
        );
        eprintln!("{w}");
        self.log(&w)
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

/// In a data-parallel run, check with the other ranks that all have the same configuration and
/// `--resume`, and a batch that splits between them; first, so that a rank that differs is
/// named as such rather than by what its configuration then makes fail.
pub(crate) fn agree_with_ranks(
    cfg: &TrainConfig,
    opts: &RunOptions,
    group: &mut Group,
) -> Result<(), TrainError> {
    if group.world() > 1 {
        check_batch_split(cfg, group.world()).map_err(TrainError::Setup)?;
        let resolved = cfg.to_toml();
        let all = group.all_gather(resolved.as_bytes())?;
        let differ: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, t)| *t != &all[0])
            .map(|(k, t)| {
                let parse = |b: &[u8]| TrainConfig::parse(&String::from_utf8_lossy(b), &[]);
                let keys = match (parse(&all[0]), parse(t)) {
                    (Ok(a), Ok(b)) => a.all_differences(&b),
                    _ => Vec::new(),
                };
                if keys.is_empty() {
                    return format!("rank {k}");
                }
                let keys: Vec<String> = keys
                    .into_iter()
                    .map(|(key, a, b)| format!("{key} = {b} (rank 0: {a})"))
                    .collect();
                format!("rank {k} has {}", keys.join(", "))
            })
            .collect();
        if !differ.is_empty() {
            return Err(TrainError::Setup(format!(
                "the ranks' configurations differ from rank 0's: {} (give every rank the same \
                 --config and --set)",
                differ.join("; ")
            )));
        }
        group.check_same("--resume", &opts.resume.to_string())?;
    }
    Ok(())
}

/// In a data-parallel run, check that every rank reads the same data: the same store
/// manifests (one store, or identical copies of it) and the same training scenes. Ranks on
/// different stores, or on copies where a regime differs, would train one model on a mix,
/// and the run's records name rank 0's data alone.
pub(crate) fn agree_on_data(
    group: &mut Group,
    store: &Path,
    trained: &TrainingScenes,
) -> Result<(), TrainError> {
    if group.world() == 1 {
        return Ok(());
    }
    let manifests = icefm_dataset::table::manifests_hash(store).unwrap_or_default();
    let mine = format!(
        "{manifests}\n{}\n{} in {}",
        trained.regime.scenes_hash(),
        trained.describe(),
        store.display()
    );
    let all = group.all_gather(mine.as_bytes())?;
    let fields = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b)
            .splitn(3, '\n')
            .map(str::to_string)
            .collect()
    };
    let first = fields(&all[0]);
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let said = |k: usize, f: &[String]| {
        format!(
            "rank {k} reads {} (manifests {}, scene list {})",
            f.get(2).map_or("?", String::as_str),
            short(f.first().map_or("", String::as_str)),
            short(f.get(1).map_or("", String::as_str))
        )
    };
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, b)| (k, fields(b)))
        .filter(|(_, f)| f[..f.len().min(2)] != first[..first.len().min(2)])
        .map(|(k, f)| said(k, &f))
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(TrainError::Setup(format!(
        "the ranks would train on different data: {}; {} (give every rank the same --store, or \
         an identical copy, with the same regimes)",
        said(0, &first),
        differ.join("; ")
    )))
}

/// Open the run directory of `opts`: new (no checkpoints in it), or resumed with the same
/// configuration ([`TrainConfig::continues_as`]). Writes `config.toml` as resolved. In a
/// data-parallel run (the ranks agreed first: [`agree_with_ranks`]) rank 0 alone checks and
/// writes the directory, after which the others list its checkpoints.
pub(crate) fn open_run(
    cfg: &TrainConfig,
    opts: &RunOptions,
    group: &mut Group,
    trained: &TrainingScenes,
) -> Result<RunDir, TrainError> {
    let resolved = cfg.to_toml();
    if group.world() > 1 {
        let path = group.attach(&opts.device)?;
        // Rank 0 checks and writes the directory first; the others wait for its word.
        let opened = if group.is_leader() {
            open_run_dir(cfg, opts, &resolved, trained, group.world()).map(Some)
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
                    match (path, group.sum_path()) {
                        (Route::Nccl, _) => "by NCCL on the GPUs",
                        (_, SumPath::Chain) => "on the hosts, down the chain of ranks and back",
                        (_, SumPath::Star) => "on the hosts, through rank 0",
                    }
                ))?;
                Ok(run)
            }
            None if !said.is_empty() => Err(TrainError::Setup(format!("rank 0: {said}"))),
            None => Ok(RunDir {
                existing: checkpoints(&opts.out),
                log: None,
                log_path: opts.out.join("log.txt"),
                _lock: None,
            }),
        };
    }
    open_run_dir(cfg, opts, &resolved, trained, 1)
}

/// Whether `a` and `b` name one existing file or folder (both non-empty).
fn same_path(a: &str, b: &str) -> bool {
    !a.is_empty() && !b.is_empty() && crate::files::same_file(Path::new(a), Path::new(b))
}

/// A run folder's step checkpoints: `(step, folder)`, oldest first.
type Checkpoints = Vec<(u64, PathBuf)>;

/// Whether a run of `cfg` may start in `opts.out`: new (no checkpoints there), or resumed
/// with the same configuration (steps may grow). Reads only; returns the checkpoints found
/// and the warnings to say once the run's log is open. A refusal is an error.
fn check_run_dir(
    cfg: &TrainConfig,
    opts: &RunOptions,
    trained: &TrainingScenes,
) -> Result<(Checkpoints, Vec<String>), TrainError> {
    // The run directory: new, or resumed with the same configuration (steps may grow).
    let existing = checkpoints(&opts.out);
    let config_path = opts.out.join("config.toml");
    let best = opts.out.join("checkpoints").join("best");
    // A best set aside by a replacement that stopped counts as there.
    let best_there = best.exists() || super::checkpoint::whole_folder(&best).is_some();
    // Said as warnings once the run's log is open.
    let mut warnings: Vec<String> = trained.warnings.clone();
    if opts.resume {
        if !config_path.is_file() {
            return Err(TrainError::Setup(format!(
                "--resume: {} holds no run (no config.toml); leave --resume out to start one \
                 there",
                opts.out.display()
            )));
        }
        let saved = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, e))?;
        let mut saved = TrainConfig::parse(&saved, &[]).map_err(|e| TrainError::Setup(e.0))?;
        // One initial encoder named two ways (`--init` is written absolute since; a run's
        // config.toml may hold it relative) is the same.
        if let (Some(a), Some(b)) = (saved.seg.as_mut(), cfg.seg.as_ref())
            && same_path(&a.init, &b.init)
        {
            a.init.clone_from(&b.init);
        }
        // The steps may grow, and the micro-batches change (a run out of memory continues in
        // smaller parts).
        if !saved.continues_as(cfg) {
            return Err(TrainError::Setup(format!(
                "{}: the configuration differs from the run's config.toml in {} (the run's \
                 value first; only train.steps and train.accumulate may change on --resume). \
                 Continue it with `--config {}`, which holds every --set it started with",
                opts.out.display(),
                saved.differences(cfg).join(", "),
                config_path.display()
            )));
        }
        if let Some((at, _)) = existing.last()
            && *at > cfg.train.steps
        {
            return Err(TrainError::Setup(format!(
                "{}: the run is at step {at} already, past train.steps = {} (give at least {at})",
                opts.out.display(),
                cfg.train.steps
            )));
        }
        if existing.is_empty() {
            // The configuration is the run's own (checked above): a best left without a step
            // checkpoint is of this run's start that stopped before its first checkpoint, and
            // starting over gives it again.
            let best_too = if best_there {
                ", and its checkpoints/best (of the start that stopped before its first \
                 checkpoint) is replaced by this start's"
            } else {
                ""
            };
            warnings.push(format!(
                "--resume: {} holds no step checkpoint; training starts at step 0{best_too}",
                opts.out.display()
            ));
        } else if saved.train.steps < cfg.train.steps {
            warnings.push(format!(
                "train.steps grew from {} to {}: the learning-rate schedule, over train.steps, \
                 changes from this step on, so the run is not one of {} steps from the start",
                saved.train.steps, cfg.train.steps, cfg.train.steps
            ));
        }
        // The scenes of the last start: a store or regime changed since changes the run.
        if !existing.is_empty()
            && let Some(before) = super::run_starts(&opts.out)
                .last()
                .and_then(|s| s.trained_scenes.clone())
        {
            let before: std::collections::BTreeSet<&str> =
                before.iter().map(String::as_str).collect();
            let now: std::collections::BTreeSet<&str> =
                trained.regime.scenes.iter().map(String::as_str).collect();
            if before != now {
                warnings.push(format!(
                    "the scenes to train on are not those of the run's last start ({} added, {} \
                     gone: the store or a regime changed since); the run goes on with them, and \
                     its losses will not match an uninterrupted run's",
                    now.difference(&before).count(),
                    before.difference(&now).count()
                ));
            }
        }
    } else if !existing.is_empty() {
        return Err(TrainError::Setup(format!(
            "{} already holds checkpoints: add --resume to continue it, or give another --out",
            opts.out.display()
        )));
    } else if best_there {
        return Err(TrainError::Setup(format!(
            "{} holds the best checkpoint of an earlier training (checkpoints/best), which a \
             new run would be compared with and `icefm eval` would score; give another --out, or \
             delete checkpoints/best",
            opts.out.display()
        )));
    } else if opts.out.join("metrics.parquet").is_file() {
        warnings.push(format!(
            "{}: the records of an earlier start that left no checkpoint (metrics.parquet) are \
             replaced by this run's",
            opts.out.display()
        ));
    }
    Ok((existing, warnings))
}

fn open_run_dir(
    cfg: &TrainConfig,
    opts: &RunOptions,
    resolved: &str,
    trained: &TrainingScenes,
    world: usize,
) -> Result<RunDir, TrainError> {
    let (existing, warnings) = check_run_dir(cfg, opts, trained)?;
    let config_path = opts.out.join("config.toml");
    std::fs::create_dir_all(&opts.out).map_err(|e| io_err(&opts.out, e))?;
    let lock = lock_run(&opts.out)?;
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
    let (lock, unlocked) = match lock {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e)),
    };
    // What stopped processes left in checkpoints/, put back or removed while no other
    // training can be writing there.
    let swept = if lock.is_some() {
        super::checkpoint::sweep(&opts.out)?
    } else {
        Vec::new()
    };
    let mut run = RunDir {
        existing,
        log: Some(log),
        log_path,
        _lock: lock,
    };
    let mut start = RunStart::now(cfg, opts, trained);
    start.ranks = (world > 1).then_some(world);
    for line in start.log_lines() {
        run.log(&line)?;
    }
    for w in &warnings {
        eprintln!("warning: {w}");
        run.log(&format!("warning: {w}"))?;
    }
    if !swept.is_empty() {
        run.log(&format!(
            "removed what a stopped process left in checkpoints/: {}",
            swept.join(", ")
        ))?;
    }
    if let Some(e) = unlocked {
        run.log(&format!(
            "warning: cannot lock {} ({e}): nothing stops another training from writing this \
             folder at the same time",
            opts.out.join(RUN_LOCK).display()
        ))?;
    }
    start.record(&opts.out)?;
    Ok(run)
}

/// The scenes `cfg` trains on in `store` ([`training_scenes`]): `data.regime`'s, or every
/// scene but the held-out ones. Never a test or validation regime, never the validation
/// scenes, and the test release only when the regime was drawn to hold it: a refusal is an
/// error. The `local:N` launcher asks once before it starts the ranks, so that a refusal is
/// said once rather than by every rank.
pub fn scenes_to_train(cfg: &TrainConfig, store: &Path) -> Result<TrainingScenes, TrainError> {
    let given = if cfg.data.regime.is_empty() {
        None
    } else {
        Some(Regime::open(Some(store), &cfg.data.regime)?)
    };
    let val = match cfg.seg.as_ref().map(|s| s.val_regime.as_str()) {
        Some(v) if !v.is_empty() => Some(Regime::open(Some(store), v)?),
        _ => None,
    };
    Ok(training_scenes(store, given, val.as_ref())?)
}

/// What a run of `cfg` with `opts` checks before it starts, without starting it or writing
/// anything: its scenes ([`scenes_to_train`]), its loader (levels, channels, patches) and its
/// run folder. The `local:N` launcher asks before it starts the ranks, so that a refusal is
/// said once rather than by every rank.
pub fn check_start(cfg: &TrainConfig, opts: &RunOptions) -> Result<(), TrainError> {
    let (_, trained) = open_loader(
        cfg,
        &opts.store,
        Sampler::LevelWeighted,
        &Device::Cpu,
        &Group::single(),
    )?;
    check_run_dir(cfg, opts, &trained)?;
    Ok(())
}

/// The loader of a run: the store, `data.regime`, levels, crop, batch and augmentation of
/// `cfg`, seeded by `train.seed`; `group`'s rank reads its share of each batch. With it, the
/// scenes it reads ([`training_scenes`]), which the run's start record keeps.
pub(crate) fn open_loader(
    cfg: &TrainConfig,
    store: &Path,
    sampler: Sampler,
    dev: &Device,
    group: &Group,
) -> Result<(Loader, TrainingScenes), TrainError> {
    let mut trained = scenes_to_train(cfg, store)?;
    let levels = if cfg.data.levels.trim().is_empty() {
        Vec::new()
    } else {
        parse_level_weights(&cfg.data.levels)?
    };
    let loader = Loader::open(
        store,
        Some(&trained.regime),
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
            // Charts for fine-tuning's loss; MAE pre-training reads none.
            labels: cfg.is_seg(),
            ..LoaderOptions::default()
        },
    )?;
    trained.warnings.extend(loader.padding_notes());
    Ok((loader, trained))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_folder_named_relative_and_absolute_is_one_path() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("runs/mae");
        std::fs::create_dir_all(&run).unwrap();
        let abs = run.to_string_lossy().into_owned();
        let rel = dir.path().join("runs/./mae/../mae");
        assert!(same_path(&abs, &rel.to_string_lossy()));
        assert!(!same_path(&abs, &dir.path().join("runs").to_string_lossy()));
        assert!(!same_path(&abs, ""));
        assert!(!same_path("/no/such/run", "/no/such/run"));
    }
}
