//! `icefm plot`: training curves of one or more runs as one PNG, from their `metrics.parquet`
//! (loss, per-task losses, learning rate, gradient norm, images/s) or `validation.parquet`
//! (`val.combined`, `val.sod_f1`, …). `icefm train` draws `loss.png` into each run it trains.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use icefm_ingest::plot::{
    Dash, LinePlot, MAE_COLOUR, Marker, SCRATCH_COLOUR, Scale, Series, nice_ticks, write_line_plot,
};
use icefm_model::finetune::{ValRecord, read_validation};
use icefm_model::train::{StepRecord, read_metrics};

/// Okabe–Ito colours (safe for colour-blind readers), one per run, then again dashed.
const COLOURS: [[u8; 3]; 8] = [
    [0, 114, 178],
    [213, 94, 0],
    [0, 158, 115],
    [230, 159, 0],
    [204, 121, 167],
    [86, 180, 233],
    [0, 0, 0],
    [240, 228, 66],
];
/// The default running mean spans this share of the longest run's steps.
const SMOOTH_SHARE: usize = 50;
/// Prefix of the columns of `validation.parquet`.
const VAL: &str = "val.";

/// Arguments of `icefm plot`.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run folders (`icefm train --out`), drawn one line each.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// What to draw: a column of metrics.parquet (`loss`, `lr`, `grad_norm`, `images_per_s`;
    /// MAE runs `baseline`, fine-tuning runs `loss_SIC`, `loss_SOD`, `loss_FLOE`), or `val.`
    /// and a column of validation.parquet (`val.combined`, `val.score`, `val.sic_r2`,
    /// `val.sod_f1`, `val.floe_f1`, `val.seconds`).
    #[arg(long, default_value = "loss")]
    metric: String,
    /// Steps in the running mean of metrics.parquet columns [default: a fiftieth of the
    /// longest run]; 1 draws every step as it is.
    #[arg(long)]
    smooth: Option<usize>,
    /// PNG to write [default: RUN/<metric>.png for one run, <metric>.png here for several].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Run `icefm plot`.
pub fn cmd_plot(a: PlotArgs) -> Result<()> {
    let out = match (&a.out, a.runs.as_slice()) {
        (Some(o), _) => o.clone(),
        (None, [run]) => run.join(format!("{}.png", a.metric)),
        (None, _) => PathBuf::from(format!("{}.png", a.metric)),
    };
    let curves = a
        .runs
        .iter()
        .map(|r| read_curve(r, &a.metric))
        .collect::<Result<Vec<_>>>()?;
    // A curve of no value at all (`val.combined` of a single-task run) draws nothing: say so.
    let empty: Vec<String> = a
        .runs
        .iter()
        .zip(&curves)
        .filter(|(_, c)| !c.iter().any(|p| p.1.is_finite()))
        .map(|(r, _)| r.display().to_string())
        .collect();
    if empty.len() == curves.len() {
        bail!(
            "no value of {} in {}{}",
            a.metric,
            icefm_schemas::names::first_few(&empty, 3),
            if a.metric == "val.combined" {
                " (runs of fewer than three tasks have no combined score: plot val.score)"
            } else {
                ""
            }
        );
    }
    if !empty.is_empty() {
        eprintln!(
            "warning: no value of {} in {}: drawn without them",
            a.metric,
            icefm_schemas::names::first_few(&empty, 3)
        );
    }
    if a.metric == "loss" {
        warn_of_mixed_losses(&a.runs);
    }
    let window = smoothing(&a.metric, a.smooth, &curves)?;
    draw(&a.runs, &a.metric, &curves, window, &out)?;
    println!("{}", out.display());
    Ok(())
}

/// A warning when `runs` mix MAE pre-training and fine-tuning: their `loss` columns are
/// different quantities (a norm-pix reconstruction error; a weighted sum of task losses), so
/// one y axis does not compare them.
fn warn_of_mixed_losses(runs: &[PathBuf]) {
    let kinds: Vec<(bool, String)> = runs
        .iter()
        .filter_map(|r| {
            icefm_model::train::config_of_run(r)
                .ok()
                .map(|(_, c)| (c.is_seg(), r.display().to_string()))
        })
        .collect();
    let (seg, mae): (Vec<_>, Vec<_>) = kinds.into_iter().partition(|(s, _)| *s);
    if !seg.is_empty() && !mae.is_empty() {
        let names = |v: &[(bool, String)]| {
            icefm_schemas::names::first_few(&v.iter().map(|(_, n)| n).collect::<Vec<_>>(), 3)
        };
        eprintln!(
            "warning: {} are MAE runs and {} fine-tuning runs: their losses are different \
             quantities (norm-pix reconstruction error; weighted task losses), drawn on one axis \
             but not comparable; plot each kind on its own",
            names(&mae),
            names(&seg)
        );
    }
}

/// `loss.png` in `run`, after `icefm train`: the loss with the default running mean.
pub fn write_loss_plot(run: &Path) -> Result<PathBuf> {
    let curve = read_curve(run, "loss")?;
    let window = smoothing("loss", None, std::slice::from_ref(&curve))?;
    let out = run.join("loss.png");
    draw(&[run.to_path_buf()], "loss", &[curve], window, &out)?;
    Ok(out)
}

/// The running mean's window: as asked, 1 for validation columns, else a fiftieth of the
/// longest curve.
fn smoothing(metric: &str, asked: Option<usize>, curves: &[Vec<(f64, f64)>]) -> Result<usize> {
    match asked {
        Some(0) => bail!("--smooth 0: give at least 1 (1 draws every step as it is)"),
        Some(n) => Ok(n),
        None if metric.starts_with(VAL) => Ok(1),
        None => {
            let longest = curves.iter().map(Vec::len).max().unwrap_or(0);
            Ok((longest / SMOOTH_SHARE).max(1))
        }
    }
}

/// Draw `curves` (one per run) as `metric` against the step into `out`.
fn draw(
    runs: &[PathBuf],
    metric: &str,
    curves: &[Vec<(f64, f64)>],
    window: usize,
    out: &Path,
) -> Result<()> {
    let mut names = labels(runs);
    let inits = inits_of(runs);
    let styles = match &inits {
        Some(inits) => by_init(inits),
        None => (0..runs.len())
            .map(|i| {
                (
                    COLOURS[i % COLOURS.len()],
                    Dash::ALL[(i / COLOURS.len()) % Dash::ALL.len()],
                )
            })
            .collect(),
    };
    for (name, &mae) in names.iter_mut().zip(inits.iter().flatten()) {
        name.push_str(if mae { " (MAE)" } else { " (scratch)" });
    }
    let series = curves
        .iter()
        .zip(&names)
        .zip(styles)
        .enumerate()
        .map(|(i, ((c, name), (colour, dash)))| Series {
            label: name.clone(),
            colour,
            dash,
            // A few points (validation passes) get markers; a curve of steps is a bare line.
            marker: if c.len() <= 40 {
                Marker::ALL[i % Marker::ALL.len()]
            } else {
                Marker::None
            },
            points: running_mean(c, window),
        })
        .collect();
    let last = curves.iter().flatten().map(|p| p.0).fold(0.0, f64::max);
    let first = curves
        .iter()
        .flatten()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min);
    let title = match names.as_slice() {
        [one] => format!("{metric} of {one}"),
        many => format!("{metric} of {} runs", many.len()),
    };
    let y_label = if window > 1 {
        format!("{metric} (running mean of {window} steps)")
    } else {
        metric.to_string()
    };
    let plot = LinePlot {
        title,
        x_label: "step".into(),
        y_label,
        x_scale: Scale::Linear,
        x_ticks: nice_ticks(first.min(last), last),
        series,
    };
    write_line_plot(out, &plot).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Whether each run was fine-tuned from an MAE encoder (`seg.init` set), when `runs` are
/// fine-tuning runs of both kinds, from scratch and from an MAE, and no more than three of a
/// kind: they are then told apart as `icefm ablate`'s plot tells them ([`by_init`]), their
/// legend names marked `(MAE)` or `(scratch)`.
fn inits_of(runs: &[PathBuf]) -> Option<Vec<bool>> {
    let inits: Vec<bool> = runs
        .iter()
        .map(|r| {
            let (_, cfg) = icefm_model::train::config_of_run(r).ok()?;
            cfg.seg.map(|s| !s.init.trim().is_empty())
        })
        .collect::<Option<_>>()?;
    let mae = inits.iter().filter(|&&m| m).count();
    let scratch = inits.len() - mae;
    (mae > 0 && scratch > 0 && mae.max(scratch) <= Dash::ALL.len()).then_some(inits)
}

/// Colour and dash of each run when [`inits_of`] tells them apart: the MAE colour or the scratch
/// colour of `icefm ablate`'s plot, the runs of one kind dashed in turn.
fn by_init(inits: &[bool]) -> Vec<([u8; 3], Dash)> {
    let (mut mae, mut scratch) = (0, 0);
    inits
        .iter()
        .map(|&m| {
            let (colour, k) = if m {
                (MAE_COLOUR, &mut mae)
            } else {
                (SCRATCH_COLOUR, &mut scratch)
            };
            *k += 1;
            (colour, Dash::ALL[*k - 1])
        })
        .collect()
}

/// Legend names: each run's folder name, or the whole path where two runs share a name.
fn labels(runs: &[PathBuf]) -> Vec<String> {
    let short: Vec<String> = runs
        .iter()
        .map(|r| {
            r.file_name()
                .map_or_else(|| r.display().to_string(), |n| n.to_string_lossy().into())
        })
        .collect();
    short
        .iter()
        .zip(runs)
        .map(|(s, r)| {
            if short.iter().filter(|t| *t == s).count() > 1 {
                r.display().to_string()
            } else {
                s.clone()
            }
        })
        .collect()
}

/// The mean of each point's `window` last values (fewer at the start); the steps stay.
/// Non-finite values are left out of the means.
fn running_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    (0..points.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let (sum, n) = points[from..=i]
                .iter()
                .filter(|p| p.1.is_finite())
                .fold((0.0, 0usize), |(s, n), p| (s + p.1, n + 1));
            (points[i].0, if n > 0 { sum / n as f64 } else { f64::NAN })
        })
        .collect()
}

/// (step, value) of `metric` in `run`, in the file's order.
fn read_curve(run: &Path, metric: &str) -> Result<Vec<(f64, f64)>> {
    let (file, column) = match metric.strip_prefix(VAL) {
        Some(c) => ("validation.parquet", c),
        None => ("metrics.parquet", metric),
    };
    let path = run.join(file);
    if !path.is_file() {
        bail!(
            "{} has no {file}{}",
            run.display(),
            if file == "validation.parquet" {
                " (only fine-tuning runs with seg.val_regime validate)"
            } else {
                if run.is_dir() {
                    " (is it an icefm train run folder?)"
                } else {
                    ": no such folder"
                }
            }
        );
    }
    let missing = |have: &[&str]| {
        anyhow!(
            "{} has no column {column:?}; it has {}",
            path.display(),
            have.join(", ")
        )
    };
    if file == "validation.parquet" {
        let get: fn(&ValRecord) -> f64 = match column {
            "sic_r2" => |r| r.sic_r2,
            "sod_f1" => |r| r.sod_f1,
            "floe_f1" => |r| r.floe_f1,
            "combined" => |r| r.combined,
            "score" => |r| r.score,
            "seconds" => |r| r.seconds,
            _ => {
                return Err(missing(&[
                    "sic_r2", "sod_f1", "floe_f1", "combined", "score", "seconds",
                ]));
            }
        };
        let records = read_validation(&path)?;
        return Ok(records.iter().map(|r| (r.step as f64, get(r))).collect());
    }
    let records = read_metrics(&path)?;
    // The fixed columns, then each record's extra values (`baseline`, `loss_SIC`, …).
    let value = |r: &StepRecord| match column {
        "loss" => Some(f64::from(r.loss)),
        "lr" => Some(r.lr),
        "grad_norm" => Some(r.grad_norm),
        "images_per_s" => Some(r.images_per_s),
        c => r.value(c).map(f64::from),
    };
    if let Some(first) = records.first()
        && value(first).is_none()
    {
        let have: Vec<&str> = ["loss", "lr", "grad_norm", "images_per_s"]
            .into_iter()
            .chain(first.extra.iter().map(|(n, _)| n.as_str()))
            .collect();
        return Err(missing(&have));
    }
    Ok(records
        .iter()
        .map(|r| (r.step as f64, value(r).unwrap_or(f64::NAN)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_mean_averages_the_window_behind_each_step() {
        let p = [
            (1.0, 4.0),
            (2.0, 2.0),
            (3.0, f64::NAN),
            (4.0, 6.0),
            (5.0, 1.0),
        ];
        let m = running_mean(&p, 2);
        let ys: Vec<f64> = m.iter().map(|q| q.1).collect();
        assert_eq!(
            m.iter().map(|q| q.0).collect::<Vec<_>>(),
            [1.0, 2.0, 3.0, 4.0, 5.0]
        );
        // 4; (4+2)/2; 2 alone (NaN left out); 6 alone; (6+1)/2.
        assert_eq!(ys, [4.0, 3.0, 2.0, 6.0, 3.5]);
        assert_eq!(running_mean(&p[..2], 1), p[..2]);
        assert!(running_mean(&[(1.0, f64::NAN)], 3)[0].1.is_nan());
    }

    /// Fine-tuning runs from scratch and from an MAE take the colours `icefm ablate`'s plot
    /// gives them, the runs of a kind dashed in turn; other mixes keep the palette.
    #[test]
    fn fine_tuning_runs_are_coloured_by_their_initialisation() {
        let dir = tempfile::tempdir().unwrap();
        let seg = include_str!("../../configs/seg_vit_tiny.toml");
        let mae = include_str!("../../configs/mae_vit_tiny.toml");
        let run = |name: &str, text: &str, sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| (*s).to_string()).collect();
            let cfg = icefm_model::config::TrainConfig::parse(text, &sets).unwrap();
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join("config.toml"), cfg.to_toml()).unwrap();
            path
        };
        let scratch = run("scratch", seg, &[]);
        let from_mae = run("from-mae", seg, &["seg.init=runs/mae"]);
        let from_mae2 = run("from-mae-2", seg, &["seg.init=runs/mae"]);
        let pretrain = run("mae", mae, &[]);
        let runs = [scratch.clone(), from_mae.clone(), from_mae2.clone()];
        let inits = inits_of(&runs).unwrap();
        assert_eq!(inits, [false, true, true]);
        assert_eq!(
            by_init(&inits),
            [
                (SCRATCH_COLOUR, Dash::Solid),
                (MAE_COLOUR, Dash::Solid),
                (MAE_COLOUR, Dash::Dashed)
            ]
        );
        // One kind alone, an MAE run among them, or more of a kind than dashes: the palette.
        assert_eq!(inits_of(&[from_mae.clone(), from_mae2.clone()]), None);
        assert_eq!(
            inits_of(&[scratch.clone(), from_mae.clone(), pretrain]),
            None
        );
        let many: Vec<PathBuf> = (0..4)
            .map(|i| run(&format!("m{i}"), seg, &["seg.init=runs/mae"]))
            .chain([scratch])
            .collect();
        assert_eq!(inits_of(&many), None);
    }

    #[test]
    fn runs_of_the_same_name_are_told_apart_by_their_paths() {
        let runs = [
            PathBuf::from("a/ft"),
            PathBuf::from("b/ft"),
            PathBuf::from("b/mae"),
        ];
        assert_eq!(labels(&runs), ["a/ft", "b/ft", "mae"]);
    }

    #[test]
    fn smoothing_defaults_to_a_fiftieth_of_the_longest_run() {
        let c = vec![vec![(0.0, 0.0); 300], vec![(0.0, 0.0); 1000]];
        assert_eq!(smoothing("loss", None, &c).unwrap(), 20);
        assert_eq!(smoothing("loss", None, &c[..1]).unwrap(), 6);
        assert_eq!(smoothing("loss", None, &[vec![(0.0, 0.0); 30]]).unwrap(), 1);
        assert_eq!(smoothing("val.combined", None, &c).unwrap(), 1);
        assert_eq!(smoothing("loss", Some(7), &c).unwrap(), 7);
        assert!(smoothing("loss", Some(0), &c).is_err());
    }
}
