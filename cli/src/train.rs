//! `icefm train`: MAE pre-training from a store, with a progress bar and Ctrl-C at a step
//! boundary.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use icefm_model::config::TrainConfig;
use icefm_model::train::{RunOptions, StepRecord, parse_device, train_mae};
use indicatif::{ProgressBar, ProgressStyle};

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
}

/// Run `icefm train`.
pub fn cmd_train(a: TrainArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read {}", a.config.display()))?;
    let cfg =
        TrainConfig::parse(&text, &a.set).with_context(|| format!("in {}", a.config.display()))?;
    let out = match a.out {
        Some(o) => o,
        None => PathBuf::from("runs").join(
            a.config
                .file_stem()
                .and_then(|s| s.to_str())
                .context("--config has no file name")?,
        ),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while saving still ends the process the usual way.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let bar = ProgressBar::new(cfg.train.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("train");
    bar.enable_steady_tick(Duration::from_millis(500));
    let on_step = |r: &StepRecord| {
        bar.set_position(r.step + 1);
        bar.set_message(format!(
            "loss {:.4}  {:.1} img/s  lr {:.2e}",
            r.loss, r.images_per_s, r.lr
        ));
    };
    let opts = RunOptions {
        device: parse_device(&a.device).map_err(anyhow::Error::msg)?,
        store: a.store,
        out: out.clone(),
        resume: a.resume,
    };
    let summary = train_mae(&cfg, &opts, &stop, &on_step);
    bar.finish_and_clear();
    let summary = summary?;
    let last = summary.records.last();
    println!(
        "{} {} steps (now at {} of {}); last loss {}; run: {}",
        if summary.interrupted {
            "stopped after"
        } else {
            "trained"
        },
        summary.steps_run,
        summary.steps_done,
        cfg.train.steps,
        last.map_or("-".to_string(), |r| format!("{:.4}", r.loss)),
        out.display()
    );
    if let Some(c) = &summary.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    if summary.interrupted {
        println!(
            "continue with: icefm train --resume --out {} …",
            out.display()
        );
    }
    Ok(())
}
