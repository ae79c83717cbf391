//! `icefm inspect RUN`: where a training run stands, from its folder alone: what it trains,
//! how far it got, its speed, checkpoints, validation and the evaluations made of it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use icefm_model::finetune::{ValRecord, read_validation};
use icefm_model::train::{StepRecord, checkpoints, config_of_run, read_metrics, run_starts};

/// Whether `path` is a run folder (it has the `config.toml` that `icefm train` writes).
pub fn is_run(path: &Path) -> bool {
    path.join("config.toml").is_file() && !path.join("zarr.json").exists()
}

/// Print the summary of the run folder `run`.
pub fn inspect_run(run: &Path) -> Result<()> {
    print!("{}", summarize_run(run)?);
    Ok(())
}

/// The median of the finite ones of the last `n` values (of an even count, the mean of the two
/// middle ones).
fn median_of_last(values: &[f64], n: usize) -> Option<f64> {
    let mut tail: Vec<f64> = values[values.len().saturating_sub(n)..]
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    tail.sort_by(f64::total_cmp);
    let k = tail.len();
    match k {
        0 => None,
        _ if k % 2 == 1 => Some(tail[k / 2]),
        _ => Some((tail[k / 2 - 1] + tail[k / 2]) / 2.0),
    }
}

fn scores_line(v: &ValRecord) -> String {
    let text = |x: f64| icefm_model::metrics::score_text(x, 3);
    format!(
        "SIC R² {}  SOD F1 {}  FLOE F1 {}  {}",
        text(v.sic_r2),
        text(v.sod_f1),
        text(v.floe_f1),
        selection(v)
    )
}

/// The score a run selects its best checkpoint by: the combined AutoICE score, or for a run of
/// fewer tasks (whose combined score is undefined) the (2, 2, 1)-weighted score of its own.
pub(crate) fn selection(v: &ValRecord) -> String {
    if v.combined.is_finite() {
        format!("combined {:.2}", v.combined)
    } else {
        format!("score {:.2} (its tasks' weighted score)", v.score)
    }
}

/// Whether the run is training now, was stopped, failed or ended unrecorded: from its lock
/// (held by a live process) and the last line of its `log.txt`. `None` for a complete run.
fn run_state(run: &Path, complete: bool) -> Option<String> {
    if let Some(who) = icefm_model::train::run_holder(run) {
        return Some(format!(
            "state: training now ({who}); steps are recorded at each checkpoint"
        ));
    }
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap_or_default();
    let last = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if let Some(why) = last.strip_prefix(icefm_model::train::FAILED_PREFIX) {
        return Some(format!("state: failed: {why}"));
    }
    if complete {
        return None;
    }
    Some(if last.starts_with("stopped at step") {
        format!("state: {last}; continue it with --resume")
    } else {
        "state: not training, and its log records no end (killed, or a machine lost?); \
         continue it with --resume"
            .to_string()
    })
}

/// The summary's text.
pub fn summarize_run(run: &Path) -> Result<String> {
    let (_, cfg) = config_of_run(run)?;
    let mut out = String::new();
    let model = match &cfg.seg {
        Some(s) => format!(
            "fine-tuning {} with {} heads ({} channels), ViT {}{}",
            s.tasks.join(", "),
            s.head,
            s.channels,
            cfg.model.describe(),
            if s.init.is_empty() {
                " from scratch".to_string()
            } else {
                format!(" from {}", s.init)
            }
        ),
        None => format!(
            "MAE pre-training, ViT {} (mask ratio {}, decoder {} wide, {} block(s))",
            cfg.model.describe(),
            cfg.mae.mask_ratio,
            cfg.mae.decoder_dim,
            cfg.mae.decoder_depth
        ),
    };
    writeln!(out, "run {}: {model}", run.display())?;
    writeln!(
        out,
        "data: levels {}, crop {} px, batch {}, regime {}",
        cfg.data.levels,
        cfg.data.crop,
        cfg.data.batch_size,
        if cfg.data.regime.is_empty() {
            "(every scene)"
        } else {
            &cfg.data.regime
        }
    )?;

    // When the run began, how often it started again, and the data of its latest start.
    let starts = run_starts(run);
    if let (Some(first), Some(last)) = (starts.first(), starts.last()) {
        writeln!(
            out,
            "started {}{}{}",
            first.time,
            last.ranks.map_or(String::new(), |w| format!(
                " (latest start: {w} data-parallel ranks)"
            )),
            if starts.len() > 1 {
                format!(
                    ", started again {} time(s), last {}",
                    starts.len() - 1,
                    last.time
                )
            } else {
                String::new()
            }
        )?;
        let [_, data] = last.log_lines();
        writeln!(out, "{}", data.trim_start())?;
    }

    // Both readers give nothing for a file not written yet.
    let records: Vec<StepRecord> = read_metrics(&run.join("metrics.parquet"))?;
    match records.last() {
        Some(last) => {
            let ips: Vec<f64> = records.iter().map(|r| r.images_per_s).collect();
            let losses: Vec<f64> = records.iter().map(|r| f64::from(r.loss)).collect();
            writeln!(
                out,
                "steps: {} of {}{}; loss {:.4} (median of the last 20: {:.4}); {:.1} images/s \
                 (median of the last 50 steps)",
                last.step + 1,
                cfg.train.steps,
                if last.step + 1 >= cfg.train.steps {
                    " (complete)"
                } else {
                    ""
                },
                last.loss,
                median_of_last(&losses, 20).unwrap_or(f64::NAN),
                median_of_last(&ips, 50).unwrap_or(f64::NAN),
            )?;
        }
        None => writeln!(out, "steps: none recorded yet (no metrics.parquet)")?,
    }
    let complete = records
        .last()
        .is_some_and(|l| l.step + 1 >= cfg.train.steps);
    if let Some(state) = run_state(run, complete) {
        writeln!(out, "{state}")?;
    }

    let saved = checkpoints(run);
    let names: Vec<String> = saved.iter().map(|(s, _)| s.to_string()).collect();
    writeln!(
        out,
        "checkpoints: {}",
        match names.len() {
            0 => "none".to_string(),
            1 => format!("step {}", names[0]),
            _ => format!(
                "steps {} (newest {})",
                names.join(", "),
                names.last().map_or("", String::as_str)
            ),
        }
    )?;

    if let Some(seg) = &cfg.seg {
        let vals = read_validation(&run.join("validation.parquet"))?;
        let best = vals
            .iter()
            .filter(|v| v.score.is_finite())
            .max_by(|a, b| a.score.total_cmp(&b.score));
        match (vals.last(), best) {
            (Some(last), Some(best)) => {
                writeln!(
                    out,
                    "validation on {} every {} steps: {} record(s)",
                    seg.val_regime,
                    seg.val_every,
                    vals.len()
                )?;
                writeln!(out, "  last, step {}: {}", last.step, scores_line(last))?;
                writeln!(
                    out,
                    "  best, step {}: {}{}",
                    best.step,
                    scores_line(best),
                    if run.join("checkpoints/best/model.safetensors").is_file() {
                        "  (checkpoints/best)"
                    } else {
                        ""
                    }
                )?;
            }
            _ if seg.val_regime.is_empty() => {
                writeln!(out, "validation: none (no seg.val_regime)")?
            }
            _ => writeln!(out, "validation: none recorded yet")?,
        }
    }

    // Each evaluation folder: its metrics, or `None` where it has none to read (an evaluation
    // killed while moving its outputs into place leaves it so).
    let mut evals: Vec<(String, Option<serde_json::Value>)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("eval-") && e.path().is_dir())
        .map(|e| {
            let json = std::fs::read_to_string(e.path().join("metrics.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            (e.file_name().to_string_lossy().into_owned(), json)
        })
        .collect();
    evals.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, m) in &evals {
        let Some(m) = m else {
            writeln!(
                out,
                "{name}: incomplete (no metrics.json: an evaluation stopped while moving its \
                 outputs into place); evaluate again into it"
            )?;
            continue;
        };
        let s = &m["scores"];
        let num = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
        writeln!(
            out,
            "{name}: {} scene(s) at {}: SIC R² {}  SOD F1 {}  FLOE F1 {}  combined {}",
            m["scenes"].as_u64().unwrap_or(0),
            m["level"].as_str().unwrap_or("?"),
            num(&s["sic_r2"]),
            num(&s["sod_f1"]),
            num(&s["floe_f1"]),
            s["combined"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.2}")),
        )?;
    }
    // A run of an `icefm ablate` cell: its score on the grid's test regime.
    if let Some(r) = std::fs::read_to_string(run.join("result.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        let num = |v: &serde_json::Value, d: usize| {
            icefm_model::metrics::score_text(v.as_f64().unwrap_or(f64::NAN), d)
        };
        writeln!(
            out,
            "ablation result (result.json), on {} after {} steps: SIC R² {}  SOD F1 {}  FLOE F1 {}  combined {}",
            r["test_regime"].as_str().unwrap_or("?"),
            r["steps"].as_u64().unwrap_or(0),
            num(&r["sic_r2"], 3),
            num(&r["sod_f1"], 3),
            num(&r["floe_f1"], 3),
            num(&r["combined"], 2),
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_even_counts_are_the_mean_of_the_middle_two() {
        let v = [9.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median_of_last(&v, 4), Some(2.5));
        assert_eq!(median_of_last(&v, 5), Some(3.0));
        assert_eq!(median_of_last(&v, 1), Some(3.0));
        // Non-finite values (a diverged step) are left out, not counted.
        assert_eq!(median_of_last(&[1.0, f64::NAN, 5.0], 3), Some(3.0));
        assert_eq!(median_of_last(&[f64::NAN], 3), None);
        assert_eq!(median_of_last(&[], 20), None);
    }

    #[test]
    fn a_run_of_fewer_tasks_is_reported_by_the_score_it_selects_by() {
        let mut v = ValRecord {
            step: 2,
            sic_r2: f64::NAN,
            sod_f1: 0.387,
            floe_f1: f64::NAN,
            combined: f64::NAN,
            score: 7.74,
            seconds: 0.1,
        };
        assert_eq!(selection(&v), "score 7.74 (its tasks' weighted score)");
        assert!(scores_line(&v).ends_with("score 7.74 (its tasks' weighted score)"));
        v.combined = 59.3;
        assert_eq!(selection(&v), "combined 59.30");
    }
}
