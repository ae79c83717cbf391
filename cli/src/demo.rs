//! `icefm demo`: the whole pipeline on generated scenes, on a CPU, in minutes. Generate
//! AI4Arctic-format scenes, ingest them, draw disjoint regimes, pre-train a small MAE, fine-tune
//! from it and from scratch on a few labelled scenes, and score both on held-out scenes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use icefm_dataset::SceneReader;
use icefm_dataset::regime::Regime;
use icefm_ingest::pipeline::IngestOptions;
use icefm_ingest::reader::RAW_SPACING_M;
use icefm_model::config::TrainConfig;
use icefm_model::metrics::{Evaluation, Scores};
use icefm_model::train::{RunOptions, parse_device};
use icefm_schemas::store::DEFAULT_CODEC;
use icefm_schemas::{Level, Task};

use crate::commands::{InspectArgs, cmd_inspect, do_ingest, parse_size, synth_scenes};
use crate::eval::{EvalArgs, InferArgs, cmd_eval};
use crate::train::run_with_bar;

/// The shipped configurations the demo starts from.
const MAE_CONFIG: &str = include_str!("../../configs/mae_vit_tiny.toml");
const SEG_CONFIG: &str = include_str!("../../configs/seg_vit_tiny.toml");

/// Arguments of `icefm demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Working directory (scenes, store, runs, evaluations).
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Scenes to generate (raw and RTT alternate).
    #[arg(long, default_value_t = 12)]
    scenes: u32,
    /// Raw scene size ROWSxCOLS (RTT scenes are half).
    #[arg(long, default_value = "1200x1250")]
    size: String,
    /// MAE pre-training steps.
    #[arg(long, default_value_t = 300)]
    mae_steps: u64,
    /// Fine-tuning steps (each init).
    #[arg(long, default_value_t = 300)]
    ft_steps: u64,
    /// Encoder blocks (ViT-tiny width; 12 is the full ViT-tiny).
    #[arg(long, default_value_t = 6)]
    depth: usize,
    /// Only generate, ingest, inspect and draw regimes (no training).
    #[arg(long)]
    data_only: bool,
}

/// One fine-tuned model's held-out scores.
struct Outcome {
    init: &'static str,
    scores: Scores,
    run: PathBuf,
}

/// Run `icefm demo`.
pub fn cmd_demo(a: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let size = parse_size(&a.size)?;
    if !a.data_only {
        check_demo_size(size)?;
    }
    let scenes_dir = a.out.join("scenes");
    let store = a.out.join("store.zarr");
    let steps = if a.data_only { 4 } else { 8 };
    eprintln!(
        "1/{steps} generating {} AI4Arctic-format scenes in {}",
        a.scenes,
        scenes_dir.display()
    );
    let inputs = synth_scenes(
        &scenes_dir,
        a.scenes,
        None,
        size,
        1,
        "cycle",
        icefm_synth::Release::Train,
    )?;
    eprintln!("2/{steps} ingesting into {}", store.display());
    let summary = do_ingest(
        &inputs,
        &store,
        Level::parse_list("80,200,400")?,
        PATCH,
        DEFAULT_CODEC,
        Default::default(),
        &IngestOptions::default(),
    )?;
    if !summary.failed.is_empty() {
        bail!("{} generated scenes failed to ingest", summary.failed.len());
    }
    eprintln!("3/{steps} inspecting the store\n");
    cmd_inspect(InspectArgs {
        store: store.clone(),
        png: Some(a.out.join("quicklook.png")),
        scene: None,
        level: Some("200m".into()),
        regime: None,
        verify: false,
    })?;
    eprintln!(
        "\n4/{steps} regimes: held-out test scenes, validation scenes, labelled scenes by class \
         coverage, pre-training on the rest\n"
    );
    crate::regime::demo_regimes(&store)?;
    if a.data_only {
        println!(
            "\ndemo (data only) finished in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    }

    let depth = format!("model.depth={}", a.depth);
    let runs = a.out.join("runs");
    eprintln!(
        "\n5/{steps} pre-training a ViT-tiny MAE ({} blocks) on `pt`",
        a.depth
    );
    let mae = TrainConfig::parse(
        MAE_CONFIG,
        &[
            depth.clone(),
            "data.regime=pt".into(),
            "data.levels=80,200".into(),
            format!("train.steps={}", a.mae_steps),
            format!("train.warmup_steps={}", (a.mae_steps / 10).max(1)),
            "train.lr=1e-3".into(),
            format!("train.checkpoint_every={}", a.mae_steps.max(1)),
            format!("train.panel_every={}", a.mae_steps.max(1)),
        ],
    )?;
    let mae_run = runs.join("mae");
    let done = train(&mae, &store, &mae_run, "mae")?;
    if !done {
        return Ok(ExitCode::from(130));
    }

    let mut outcomes = Vec::new();
    for (n, (init, from)) in [("scratch", None), ("MAE", Some(&mae_run))]
        .into_iter()
        .enumerate()
    {
        eprintln!(
            "\n{}/{steps} fine-tuning SIC, SOD and FLOE on `ft` from {}",
            6 + n,
            if n == 0 { "scratch" } else { "the MAE" }
        );
        let mut set = vec![
            depth.clone(),
            "data.regime=ft".into(),
            "seg.val_regime=val".into(),
            format!("seg.val_every={}", (a.ft_steps / 6).max(1)),
            format!("train.steps={}", a.ft_steps),
            format!("train.warmup_steps={}", (a.ft_steps / 10).max(1)),
            format!("train.checkpoint_every={}", a.ft_steps.max(1)),
        ];
        if let Some(m) = from {
            set.push(format!("seg.init=\"{}\"", m.display()));
        }
        let cfg = TrainConfig::parse(SEG_CONFIG, &set)?;
        let run = runs.join(format!("ft-{}", init.to_lowercase()));
        if !train(&cfg, &store, &run, &format!("ft {init}"))? {
            return Ok(ExitCode::from(130));
        }
        outcomes.push((init, run));
    }

    eprintln!(
        "\n8/{steps} scoring both on the held-out `test` scenes (best checkpoint by validation)"
    );
    let mut scored = Vec::new();
    for (init, run) in outcomes {
        let scores = cmd_eval(EvalArgs {
            run: run.clone(),
            store: Some(store.clone()),
            regime: Some("test".into()),
            out: None,
            no_panels: false,
            infer: InferArgs::default(),
        })?;
        scored.push(Outcome { init, scores, run });
    }
    let chance = majority_baseline(&store, "ft", "test")?;
    println!("\nheld-out test scenes, AutoICE metrics (pixels pooled, scored at 80 m):");
    for o in &scored {
        let s = &o.scores;
        println!(
            "{:<8} SIC R² {:.3}  SOD F1 {:.3}  FLOE F1 {:.3}  combined {:.1}   ({})",
            o.init,
            s.sic_r2,
            s.sod_f1,
            s.floe_f1,
            s.combined,
            o.run.join("eval-test").display()
        );
    }
    println!(
        "(a chart of the most common `ft` class everywhere scores SIC R² {:.3}, SOD F1 {:.3}, \
         FLOE F1 {:.3}, combined {:.1})",
        chance.sic_r2, chance.sod_f1, chance.floe_f1, chance.combined
    );
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The store's patch edge, px.
const PATCH: u32 = 256;
/// The coarser level the MAE trains at, m.
const MAE_COARSE_M: usize = 200;

/// Refuse raw scenes too small to train on, before minutes of generating and ingesting: the
/// MAE draws 256-px patches at 80 and 200 m, and the loader takes a patch only when at least
/// half of it is valid SAR (`data.min_valid`). A raw scene of ROWS × COLS at 40 m is ROWS/5 ×
/// COLS/5 at 200 m, of which the generated scenes leave a few percent without SAR: 920x940
/// (53 % of a patch) trained, 920x920 (52 %) found no patch. So the scene must cover 55 % of a
/// patch at 200 m, from 950 × 950 on. (RTT scenes, half the size, cover less; the raw scenes
/// of `pt` carry that level.)
fn check_demo_size((rows, cols): (usize, usize)) -> Result<()> {
    let patch = PATCH as usize;
    let at_coarse = |n: usize| (n * RAW_SPACING_M as usize / MAE_COARSE_M).min(patch);
    if 100 * at_coarse(rows) * at_coarse(cols) < 55 * patch * patch {
        bail!(
            "--size {rows}x{cols}: too small for the demo's MAE, which trains on {PATCH}-px \
             patches at {MAE_COARSE_M} m that must be half SAR; give at least 950x950 (the \
             default is 1200x1250), or --data-only"
        );
    }
    Ok(())
}

/// Train one run of the demo (a fresh run folder); `false` when Ctrl-C stopped it.
fn train(cfg: &TrainConfig, store: &Path, out: &Path, label: &str) -> Result<bool> {
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    let opts = RunOptions {
        store: store.to_path_buf(),
        out: out.to_path_buf(),
        resume: false,
        device: parse_device("cpu").map_err(anyhow::Error::msg)?,
    };
    let summary = run_with_bar(cfg, &opts, label)?;
    let last = summary.records.last().map_or(f32::NAN, |r| r.loss);
    eprintln!(
        "{label}: {} steps, last loss {last:.4} ({})",
        summary.steps_done,
        out.display()
    );
    Ok(!summary.interrupted)
}

/// The scores on `test` of a constant chart: each task's most common class in the `train`
/// scenes (the floor a model must clear).
fn majority_baseline(store: &Path, train: &str, test: &str) -> Result<Scores> {
    let reader = SceneReader::open(store, &["HH".into(), "HV".into()])?;
    let level = *reader.levels().first().context("the store has no level")?;
    let scenes = |name: &str| -> Result<Vec<std::sync::Arc<str>>> {
        Ok(reader.scenes(Some(&Regime::open(Some(store), name)?))?)
    };
    let mut hist: [Vec<u64>; 3] = Task::ALL.map(|t| vec![0; t.n_classes()]);
    for s in scenes(train)? {
        let (labels, (h, w)) = reader.read_labels(&s, level)?;
        for (t, hist) in hist.iter_mut().enumerate() {
            for &v in &labels[t * h * w..(t + 1) * h * w] {
                if let Some(c) = hist.get_mut(usize::from(v)) {
                    *c += 1;
                }
            }
        }
    }
    let majority: [u8; 3] = std::array::from_fn(|t| {
        (0..hist[t].len())
            .max_by_key(|&c| (hist[t][c], std::cmp::Reverse(c)))
            .unwrap_or(0) as u8
    });
    let mut ev = Evaluation::new();
    for s in scenes(test)? {
        let (labels, (h, w)) = reader.read_labels(&s, level)?;
        let plane = h * w;
        let pred: [Vec<u8>; 3] = majority.map(|c| vec![c; plane]);
        let truth: [&[u8]; 3] = std::array::from_fn(|t| &labels[t * plane..(t + 1) * plane]);
        ev.add(truth, [&pred[0][..], &pred[1][..], &pred[2][..]])?;
    }
    Ok(ev.scores())
}

#[cfg(test)]
mod tests {
    use super::check_demo_size;

    #[test]
    fn demo_sizes_too_small_for_the_mae_are_refused_up_front() {
        // 950x950 and the default trained (a 2-step demo); 920x920 and smaller found no
        // 200 m patch for the MAE.
        for ok in [(1200, 1250), (950, 950), (20_000, 950)] {
            assert!(check_demo_size(ok).is_ok(), "{ok:?}");
        }
        for small in [(920, 920), (900, 900), (400, 420), (5_000, 100)] {
            let e = check_demo_size(small).unwrap_err().to_string();
            assert!(e.contains("give at least 950x950"), "{small:?}: {e}");
        }
    }
}
