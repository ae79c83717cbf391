//! `icefm train`: MAE pre-training, or fine-tuning for SIC / SOD / FLOE when the configuration
//! has a `[seg]` section, from a store, with a progress bar and Ctrl-C at a step boundary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use icefm_model::config::TrainConfig;
use icefm_model::dist::{DistSpec, Group, SumPath, step_timeout_from_env, timeout_from_env};
use icefm_model::finetune::{ValRecord, train_seg_in};
use icefm_model::train::{
    DeviceName, RunOptions, RunSummary, StepRecord, check_batch_split, check_start, parse_device,
    train_mae_in,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::launch::{launch, local_world};

/// Arguments of `icefm train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Store to train from.
    #[arg(long)]
    store: PathBuf,
    /// TOML configuration (`configs/mae_vit_tiny.toml`, `configs/mae_vit_b.toml`, …).
    #[arg(long)]
    config: PathBuf,
    /// Run directory [default: runs/<config file stem>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a configuration key, e.g. `--set train.steps=40` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Where to run: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Fine-tuning: encoder weights to start from (an MAE run or checkpoint, or an
    /// `icefm import` output); sets `seg.init`.
    #[arg(long)]
    init: Option<PathBuf>,
    /// The regime of training scenes; sets `data.regime`.
    #[arg(long)]
    regime: Option<String>,
    /// Data-parallel training, one process per rank: `local:N` (icefm starts N ranks on this
    /// machine, e.g. one per GPU), `RANK/WORLD@HOST:PORT` (one rank; rank 0 listens on PORT,
    /// every rank names rank 0's host), or `slurm` (rank, world and GPU from `srun`'s
    /// variables). `data.batch_size` is the whole batch, split equally between the ranks.
    /// `--device cuda` is then the rank's GPU: `cuda:RANK`, or Slurm's local rank.
    #[arg(long, value_name = "local:N|RANK/WORLD@HOST:PORT|slurm")]
    dist: Option<String>,
}

/// Run `icefm train`.
pub fn cmd_train(a: TrainArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read {}", a.config.display()))?;
    let mut set = a.set.clone();
    if let Some(r) = &a.regime {
        set.push(format!("data.regime={r}"));
    }
    if let Some(i) = &a.init {
        if !text.contains("[seg]") && !set.iter().any(|s| s.starts_with("seg.")) {
            anyhow::bail!(
                "--init is for fine-tuning: {} has no [seg] section (MAE pre-training starts from scratch)",
                a.config.display()
            );
        }
        // Absolute, so that the run's config.toml names it from any folder (`icefm eval`
        // follows it to the scenes the encoder was trained on).
        let i = std::path::absolute(i).unwrap_or_else(|_| i.clone());
        set.push(format!("seg.init=\"{}\"", i.display()));
    }
    let cfg = TrainConfig::parse(&text, &set).with_context(|| {
        if set.is_empty() {
            format!("in {}", a.config.display())
        } else {
            format!("in {} or its --set overrides", a.config.display())
        }
    })?;
    let out = match a.out {
        Some(o) => o,
        None => PathBuf::from("runs").join(
            a.config
                .file_stem()
                .and_then(|s| s.to_str())
                .context("--config has no file name")?,
        ),
    };
    // A step that cannot fit in this machine's memory is refused, not left to the kernel's
    // out-of-memory killer: the ranks of `local:N` share the machine, others hold their share.
    if DeviceName::parse(&a.device) == Ok(DeviceName::Cpu) {
        let local = a.dist.as_deref().map(local_world).transpose()?.flatten();
        let ranks_elsewhere = match (&a.dist, local) {
            (Some(d), None) => DistSpec::parse(d).map_or(1, |s| s.world),
            _ => 1,
        };
        check_memory(&cfg, ranks_elsewhere)?;
    }
    if let Some(world) = a.dist.as_deref().map(local_world).transpose()?.flatten() {
        // Said once here rather than by every rank.
        check_batch_split(&cfg, world).map_err(anyhow::Error::msg)?;
        timeout_from_env().map_err(anyhow::Error::msg)?;
        step_timeout_from_env().map_err(anyhow::Error::msg)?;
        SumPath::from_env().map_err(anyhow::Error::msg)?;
        check_start(
            &cfg,
            &RunOptions {
                // Not opened: the checks read the store and the run folder only.
                device: parse_device("cpu").map_err(anyhow::Error::msg)?,
                store: a.store.clone(),
                out: out.clone(),
                resume: a.resume,
            },
        )?;
        return launch(world, &a.device);
    }
    let spec = a
        .dist
        .as_deref()
        .map(DistSpec::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    // Under data-parallel training, `--device cuda` is the rank's GPU on its node.
    let device = match &spec {
        Some(s) if DeviceName::parse(&a.device) == Ok(DeviceName::Cuda(None)) => {
            format!("cuda:{}", s.local_rank)
        }
        _ => a.device.clone(),
    };
    // Said by one process: the run's own, or rank 0 of a data-parallel one (the `local:N`
    // launcher leaves it to its rank 0).
    if spec.as_ref().is_none_or(|s| s.rank == 0) {
        crate::manifest::warn_if_unmerged(&a.store);
        let has_seg = text.lines().any(|l| l.trim() == "[seg]");
        if !has_seg && let Some(s) = set.iter().find(|s| s.starts_with("seg.")) {
            eprintln!(
                "note: --set {s} makes this a fine-tuning run: {} has no [seg] section (an MAE \
                 configuration), so the rest of [seg] takes its defaults",
                a.config.display()
            );
        }
        for n in cfg.ignored_settings() {
            eprintln!("note: {n}");
        }
        if cfg.train.warmup_steps >= cfg.train.steps {
            eprintln!(
                "warning: train.warmup_steps {} is not below train.steps {}: the learning rate \
                 never reaches train.lr",
                cfg.train.warmup_steps, cfg.train.steps
            );
        }
    }
    let opts = RunOptions {
        device: parse_device(&device).map_err(anyhow::Error::msg)?,
        store: a.store,
        out: out.clone(),
        resume: a.resume,
    };
    let mut group = match &spec {
        Some(s) => {
            let timeout = timeout_from_env().map_err(anyhow::Error::msg)?;
            let step_timeout = step_timeout_from_env().map_err(anyhow::Error::msg)?;
            eprintln!(
                "rank {} of {}: meeting the other ranks at {} (waiting up to {:.0} s)",
                s.rank,
                s.world,
                s.addr,
                timeout.as_secs_f64()
            );
            let mut g = Group::connect(s, timeout)?;
            g.set_exchange_timeout(step_timeout);
            g.allow_nccl(std::env::var("ICEFM_NCCL").map_or(true, |v| v != "0"));
            g
        }
        None => Group::single(),
    };
    if !group.is_leader() {
        // The other ranks train quietly; rank 0 shows the run and writes its directory.
        let summary = run_quiet(&mut group, &cfg, &opts)?;
        println!(
            "rank {} of {}: {} {} steps (now at {} of {})",
            group.rank(),
            group.world(),
            ended(&summary),
            summary.steps_run,
            summary.steps_done,
            cfg.train.steps
        );
        return Ok(exit_status(&summary));
    }
    let summary = run_with_bar_in(&mut group, &cfg, &opts, "train")?;
    let last = summary.records.last();
    println!(
        "{} {} steps (now at {} of {}); last loss {}; run: {}",
        ended(&summary),
        summary.steps_run,
        summary.steps_done,
        cfg.train.steps,
        last.map_or("-".to_string(), |r| format!("{:.4}", r.loss)),
        out.display()
    );
    if let Some(c) = &summary.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    if let Some(best) = summary
        .validation
        .iter()
        .filter(|v| v.score.is_finite())
        .max_by(|a, b| a.score.total_cmp(&b.score))
    {
        println!(
            "best validation: step {}, {} (checkpoints/best)",
            best.step,
            crate::run_summary::selection(best)
        );
    }
    if summary.interrupted {
        // The run's config.toml is its configuration with every --set, --regime and --init
        // applied: the one --resume must be given.
        // A data-parallel run continues as it was started: `local:N` as such (its ranks are
        // told by the launcher), Slurm's as `slurm`, ranks started by hand each with its own.
        let dist = match (std::env::var(LAUNCHED_AS).ok(), a.dist.as_deref()) {
            (Some(local), _) => format!(" --dist {local}"),
            (None, Some("slurm")) => " --dist slurm".to_string(),
            (None, Some(d)) => format!(" --dist {} (each rank with its own --dist)", shell_word(d)),
            (None, None) => String::new(),
        };
        println!(
            "continue with: icefm train --resume --store {} --config {} --out {}{}{dist}",
            shell_word(&opts.store.display().to_string()),
            shell_word(&out.join("config.toml").display().to_string()),
            shell_word(&out.display().to_string()),
            if a.device == "cpu" {
                String::new()
            } else {
                format!(" --device {}", shell_word(&a.device))
            }
        );
    }
    Ok(exit_status(&summary))
}

/// Exit status of a run: 0 when it trained to its last step, 130 when a stop signal ended it
/// early (saved, and resumable), as `ablate` and `demo` do: a job chained on success
/// (`&&`, Slurm's `afterok`) must not take a stopped run for a finished one.
fn exit_status(summary: &RunSummary) -> ExitCode {
    if summary.interrupted {
        ExitCode::from(STOPPED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Refuse a CPU run whose step needs more memory than this machine has available: its
/// largest attention matrix alone ([`TrainConfig::largest_attention_bytes`], a floor), for
/// this process's share of each batch (`ranks` processes on other machines share it).
fn check_memory(cfg: &TrainConfig, ranks: usize) -> Result<()> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let images = (cfg.data.batch_size / ranks.max(1) / cfg.train.accumulate.max(1) as usize).max(1);
    let need = cfg
        .largest_attention_bytes(images)
        .map_err(|e| anyhow::anyhow!(e.0))?;
    if need > available {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        let patch = if cfg.is_seg() {
            cfg.seg_config().map(|s| s.encoder.patch)
        } else {
            cfg.mae_config().map(|m| m.encoder.patch)
        }
        .map_err(|e| anyhow::anyhow!(e.0))?;
        let side = cfg.data.crop as usize / patch;
        anyhow::bail!(
            "this step cannot fit in memory: one attention matrix of it alone is {:.1} GiB \
             ({images} image(s) at a time, each of {} tokens: data.crop {} px / patch {patch} \
             px, squared), and this machine has {:.1} GiB available; lower data.crop or \
             data.batch_size, or raise train.accumulate (micro-batches of the step)",
            gib(need),
            side * side,
            cfg.data.crop,
            gib(available)
        );
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (Linux; none elsewhere).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Set by the `local:N` launcher in its ranks' environment: the `--dist` it was given.
pub(crate) const LAUNCHED_AS: &str = "ICEFM_LAUNCHED_AS";

/// Exit status of a run stopped by a signal (128 + SIGINT, as shells report Ctrl-C).
pub(crate) const STOPPED: u8 = 130;

/// `w` as one word of a POSIX shell command: as it is when it holds only characters no shell
/// treats specially, else in single quotes.
pub(crate) fn shell_word(w: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !w.is_empty() && w.chars().all(plain) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// How a run ended, for its last line.
fn ended(summary: &RunSummary) -> &'static str {
    if summary.interrupted {
        "stopped after"
    } else {
        "trained"
    }
}

/// Set by the first stop signal (Ctrl-C's SIGINT, or SIGTERM as `kill`, Slurm and container
/// runtimes send): runs stop at their next step boundary and save.
static STOP: AtomicBool = AtomicBool::new(false);
/// Stop signals this process has received.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);
/// When the first one came.
static FIRST_SIGNAL: OnceLock<Instant> = OnceLock::new();
/// A signal this soon after the first is the same stop, not a second one: a terminal's Ctrl-C
/// reaches a `--dist local:N` rank both from the terminal and forwarded by the launcher.
const SAME_STOP: Duration = Duration::from_secs(1);

/// Install the stop-signal handler once per process. `exit_on_second`: a later signal ends the
/// process at once (exit status 130), for when saving takes too long.
fn install_stop_handler(exit_on_second: bool) {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // If the handler cannot be registered, the default actions stay: a signal ends the
        // process at once, without a checkpoint.
        let Ok(mut signals) = Signals::new([SIGINT, SIGTERM]) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("icefm-signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    SIGNALS.fetch_add(1, Ordering::SeqCst);
                    let first = *FIRST_SIGNAL.get_or_init(Instant::now);
                    if STOP.swap(true, Ordering::SeqCst)
                        && exit_on_second
                        && first.elapsed() > SAME_STOP
                    {
                        std::process::exit(130);
                    }
                }
            });
        if let Err(e) = spawned {
            // The signals are registered but nothing reads them now: say so rather than
            // leave Ctrl-C silently without effect.
            eprintln!(
                "warning: cannot watch for Ctrl-C and SIGTERM ({e}); stop this run with kill -9"
            );
        }
    });
}

/// The stop flag, with its handler installed.
pub fn stop_flag() -> &'static AtomicBool {
    install_stop_handler(true);
    &STOP
}

/// Stop signals received so far, the handler installed without exiting on a second one: the
/// `--dist local:N` launcher forwards each to its ranks and waits for them to end.
pub fn stop_signals() -> usize {
    install_stop_handler(false);
    SIGNALS.load(Ordering::SeqCst)
}

/// Run `cfg` (MAE, or fine-tuning with a `[seg]` section) with a progress bar labelled
/// `prefix`; validation passes are printed above the bar.
pub fn run_with_bar(cfg: &TrainConfig, opts: &RunOptions, prefix: &str) -> Result<RunSummary> {
    run_with_bar_in(&mut Group::single(), cfg, opts, prefix)
}

/// A rank other than 0 of a data-parallel run: no bar, no output until it ends.
fn run_quiet(group: &mut Group, cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let stop = stop_flag();
    Ok(if cfg.is_seg() {
        train_seg_in(group, cfg, opts, stop, &|_| {}, &|_| {})
    } else {
        train_mae_in(group, cfg, opts, stop, &|_| {})
    }?)
}

/// [`run_with_bar`] as rank 0 of `group`.
fn run_with_bar_in(
    group: &mut Group,
    cfg: &TrainConfig,
    opts: &RunOptions,
    prefix: &str,
) -> Result<RunSummary> {
    let stop = stop_flag();
    // The bar is drawn once the run has set up (its first step, or a second of set-up), so a
    // refused configuration (a level or channel the store lacks, a run folder in the way) prints
    // its error alone, without a bar flashing before it.
    let terminal = !ProgressDrawTarget::stderr().is_hidden();
    let bar = ProgressBar::with_draw_target(Some(cfg.train.steps), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    let shown = Once::new();
    let show = || {
        if terminal {
            shown.call_once(|| {
                bar.set_draw_target(ProgressDrawTarget::stderr());
                bar.enable_steady_tick(Duration::from_millis(500));
            });
        }
    };
    // Without a terminal the bar prints nothing: a line a minute instead (and the first and
    // last steps), for batch logs.
    let last_line = std::cell::Cell::new(None::<Instant>);
    let on_step = |r: &StepRecord| {
        show();
        bar.set_position(r.step + 1);
        let msg = format!(
            "loss {:.4}  {:.1} img/s  lr {:.2e}",
            r.loss, r.images_per_s, r.lr
        );
        if !terminal
            && (last_line
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                || r.step + 1 == cfg.train.steps)
        {
            eprintln!(
                "{prefix}: step {} of {}  {msg}",
                r.step + 1,
                cfg.train.steps
            );
            last_line.set(Some(Instant::now()));
        }
        bar.set_message(msg);
    };
    let on_val = |v: &ValRecord| {
        let text = |x: f64| icefm_model::metrics::score_text(x, 3);
        let line = format!(
            "step {}: validation SIC R² {}  SOD F1 {}  FLOE F1 {}  {}  ({:.0} s)",
            v.step,
            text(v.sic_r2),
            text(v.sod_f1),
            text(v.floe_f1),
            crate::run_summary::selection(v),
            v.seconds
        );
        // Without a terminal the bar is hidden and prints nothing: say it on stderr, named (an
        // ablation worker's log interleaves its cells).
        if terminal {
            show();
            bar.println(line);
        } else {
            eprintln!("{prefix}: {line}");
        }
    };
    let (set_up, waiting) = std::sync::mpsc::channel::<()>();
    let summary = std::thread::scope(|scope| {
        let show = &show;
        scope.spawn(move || {
            // A second of set-up without a step or an error: show the bar at 0.
            if waiting.recv_timeout(Duration::from_secs(1))
                == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            {
                show();
            }
        });
        let summary = if cfg.is_seg() {
            train_seg_in(group, cfg, opts, stop, &on_step, &on_val)
        } else {
            train_mae_in(group, cfg, opts, stop, &on_step)
        };
        drop(set_up);
        summary
    });
    bar.finish_and_clear();
    let summary = summary.inspect_err(|e| {
        if group.is_leader() {
            icefm_model::train::record_failure(&opts.out, &e.to_string());
        }
    })?;
    // The curve so far, at every end (a stop included). A plot that cannot be drawn costs the
    // run nothing: the metrics are saved.
    if opts.out.join("metrics.parquet").is_file()
        && let Err(e) = crate::plot::write_loss_plot(&opts.out)
    {
        eprintln!("warning: no loss.png: {e:#}");
    }
    Ok(summary)
}
