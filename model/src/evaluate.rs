//! Full-scene evaluation: sliding-window inference at one level, blended, only over valid
//! pixels, upsampled (nearest) to the scoring grid and scored with the AutoICE metrics.
//!
//! Windows advance by `stride` pixels; the last window of a row or column is moved back to end
//! at the scene edge, and a scene smaller than a window is padded (padding is invalid input).
//! Windows without a valid pixel are skipped, so inference runs only where there is SAR. Overlaps are blended by averaging class
//! probabilities (or the SIC regression value), uniformly (`mean`) or with weights falling
//! towards each window's edges (`taper`), where context is poorest.
//!
//! Memory stays bounded on 26-Mpx scenes: outputs accumulate in a band of rows one window high
//! (plus one stride), and rows no later window touches are decided and released.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use icefm_dataset::{SceneLevel, SceneReader};
use icefm_schemas::{IGNORE, Level, Task};

use crate::metrics::{Evaluation, Scores};
use crate::seg::{SegModel, class_of};
use crate::threads::on_worker;

/// Blending of overlapping windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blend {
    /// Uniform weights.
    Mean,
    /// Weights `t(y)·t(x)`, `t` rising linearly from the window edge to its centre.
    Taper,
}

impl Blend {
    /// From its config name, `mean` or `taper`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mean" => Some(Self::Mean),
            "taper" => Some(Self::Taper),
            _ => None,
        }
    }

    /// Its config name, `mean` or `taper`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Taper => "taper",
        }
    }

    fn weights(self, crop: usize) -> Vec<f32> {
        match self {
            Self::Mean => vec![1.0; crop],
            Self::Taper => (0..crop)
                .map(|i| (i.min(crop - 1 - i) + 1) as f32 / crop.div_ceil(2) as f32)
                .collect(),
        }
    }
}

/// What a scene's sliding-window inference tells as it goes: window positions done (those
/// skipped for want of a valid pixel included) of the level's positions, after each batch.
/// Progress bars read it; results do not depend on it (two options differing only in it are
/// equal).
#[derive(Clone)]
pub struct WindowProgress(pub std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>);

impl std::fmt::Debug for WindowProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WindowProgress")
    }
}

impl PartialEq for WindowProgress {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// How a scene is inferred.
#[derive(Debug, Clone, PartialEq)]
pub struct InferOptions {
    /// The level the model sees.
    pub level: Level,
    /// Window edge, pixels (a multiple of the patch).
    pub crop: usize,
    /// Window stride, pixels.
    pub stride: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Blending of overlaps.
    pub blend: Blend,
    /// Told the windows done as they run (none: nobody asks).
    pub progress: Option<WindowProgress>,
}

/// Start offsets of windows of `crop` along an axis of `len` pixels, every `stride`, the last
/// one ending at the edge (a single window at 0 when `len ≤ crop`).
pub fn window_starts(len: usize, crop: usize, stride: usize) -> Vec<usize> {
    if len <= crop {
        return vec![0];
    }
    let last = len - crop;
    let mut v: Vec<usize> = (0..last).step_by(stride.max(1)).collect();
    v.push(last);
    v
}

/// Class maps of one scene at the inference level.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelMaps {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// SIC, SOD, FLOE classes, `height × width` each; 255 where no window ran (windows
    /// without a valid pixel are skipped) or the model has no head for the task. Invalid pixels
    /// inside a window get the model's output (their charts are 255 there, so scoring ignores
    /// them; near coast and swath edges a coarse invalid pixel can hold valid 80 m pixels).
    pub maps: [Vec<u8>; 3],
    /// Windows run.
    pub windows: usize,
}

/// Sliding-window inference of `model` over one scene level.
pub fn predict_level(
    model: &SegModel,
    scene: &SceneLevel,
    opts: &InferOptions,
    dev: &Device,
) -> Result<LevelMaps> {
    let (h, w, c) = (scene.height, scene.width, scene.channels);
    let crop = opts.crop;
    let cfg = &model.cfg;
    let ks: Vec<(Task, usize)> = cfg.tasks.iter().map(|&t| (t, cfg.outputs(t))).collect();
    let kt: usize = ks.iter().map(|(_, k)| k).sum();
    let ys = window_starts(h, crop, opts.stride);
    let xs = window_starts(w, crop, opts.stride);
    let taper = opts.blend.weights(crop);
    let mut maps: [Vec<u8>; 3] = std::array::from_fn(|_| vec![IGNORE; h * w]);
    let mut windows = 0;
    // Accumulators for rows [lo, lo + rows): Σ weight · output, and Σ weight.
    let mut lo = 0usize;
    let mut acc: Vec<f32> = Vec::new();
    let mut wsum: Vec<f32> = Vec::new();
    let mut decide = |upto: usize, lo: &mut usize, acc: &mut Vec<f32>, wsum: &mut Vec<f32>| {
        let upto = upto.min(h);
        if upto <= *lo {
            return;
        }
        let n = upto - *lo;
        for r in 0..n {
            let y = *lo + r;
            for x in 0..w {
                let px = r * w + x;
                let wt = wsum.get(px).copied().unwrap_or(0.0);
                if wt <= 0.0 {
                    continue;
                }
                let mut off = 0;
                for (t, k) in &ks {
                    let v = &acc[px * kt + off..px * kt + off + k];
                    // Dividing by the weight does not move an argmax.
                    let class = if *k == 1 {
                        class_of(&[v[0] / wt], *t)
                    } else {
                        class_of(v, *t)
                    };
                    maps[t.channel()][y * w + x] = class;
                    off += k;
                }
            }
        }
        let cut = (n * w).min(wsum.len());
        wsum.drain(..cut);
        acc.drain(..cut * kt);
        *lo = upto;
    };
    let positions = ys.len() * xs.len();
    let mut done = 0;
    for &y0 in &ys {
        decide(y0, &mut lo, &mut acc, &mut wsum);
        let rows_needed = (y0 + crop).min(h) - lo;
        if wsum.len() < rows_needed * w {
            wsum.resize(rows_needed * w, 0.0);
            acc.resize(rows_needed * w * kt, 0.0);
        }
        let row: Vec<usize> = xs
            .iter()
            .copied()
            .filter(|&x0| {
                (y0..(y0 + crop).min(h))
                    .any(|y| scene.valid[y * w + x0..(x0 + crop).min(w) + y * w].contains(&1))
            })
            .collect();
        for group in row.chunks(opts.batch.max(1)) {
            let b = group.len();
            let mut input = vec![0f32; b * c * crop * crop];
            for (i, &x0) in group.iter().enumerate() {
                for ch in 0..c {
                    for dy in 0..crop.min(h - y0) {
                        let n = crop.min(w - x0);
                        let src = (ch * h + y0 + dy) * w + x0;
                        let dst = ((i * c + ch) * crop + dy) * crop;
                        input[dst..dst + n].copy_from_slice(&scene.inputs[src..src + n]);
                    }
                }
            }
            let images = Tensor::from_vec(input, (b, c, crop, crop), dev)?;
            let outs = on_worker(dev.is_cpu(), || model.forward(&images, None))?;
            let mut off = 0;
            for ((_, y), (_, k)) in outs.iter().zip(&ks) {
                let y = if *k > 1 {
                    candle_nn::ops::softmax_last_dim(&y.to_dtype(DType::F32)?)?
                } else {
                    y.to_dtype(DType::F32)?
                };
                let vals = y.flatten_all()?.to_vec1::<f32>()?;
                for (i, &x0) in group.iter().enumerate() {
                    for dy in 0..crop.min(h - y0) {
                        let r = y0 + dy - lo;
                        for dx in 0..crop.min(w - x0) {
                            let wt = taper[dy] * taper[dx];
                            let px = r * w + x0 + dx;
                            let src = ((i * crop + dy) * crop + dx) * k;
                            let dst = px * kt + off;
                            for j in 0..*k {
                                acc[dst + j] += wt * vals[src + j];
                            }
                        }
                    }
                }
                off += k;
            }
            for &x0 in group {
                for dy in 0..crop.min(h - y0) {
                    let r = y0 + dy - lo;
                    for dx in 0..crop.min(w - x0) {
                        wsum[r * w + x0 + dx] += taper[dy] * taper[dx];
                    }
                }
            }
            windows += b;
            if let Some(p) = &opts.progress {
                (p.0)(done + windows_before_in_row(&xs, group), positions);
            }
        }
        done += xs.len();
        if let Some(p) = &opts.progress {
            (p.0)(done, positions);
        }
    }
    decide(h, &mut lo, &mut acc, &mut wsum);
    Ok(LevelMaps {
        height: h,
        width: w,
        maps,
        windows,
    })
}

/// Window positions of a row `xs` up to the end of `group` (its last window's position).
fn windows_before_in_row(xs: &[usize], group: &[usize]) -> usize {
    group
        .last()
        .and_then(|last| xs.iter().position(|x| x == last))
        .map_or(0, |i| i + 1)
}

/// Nearest-neighbour upsampling of a `h × w` map at `from` to a `height × width` grid at
/// `to` (the grids share their origin; `to` is finer or equal).
pub fn upsample_nearest(
    map: &[u8],
    (h, w): (usize, usize),
    from: Level,
    (height, width): (usize, usize),
    to: Level,
) -> Vec<u8> {
    let (a, b) = (to.spacing_m() as usize, from.spacing_m() as usize);
    let cols: Vec<usize> = (0..width)
        .map(|x| (x * a / b).min(w.saturating_sub(1)))
        .collect();
    let mut out = vec![IGNORE; height * width];
    if h == 0 || w == 0 {
        return out;
    }
    for y in 0..height {
        let sy = (y * a / b).min(h - 1);
        let src = &map[sy * w..(sy + 1) * w];
        for (o, &sx) in out[y * width..(y + 1) * width].iter_mut().zip(&cols) {
            *o = src[sx];
        }
    }
    out
}

/// One scene's evaluation.
#[derive(Debug, Clone)]
pub struct SceneResult {
    /// Scene id.
    pub scene: String,
    /// Windows run.
    pub windows: usize,
    /// Seconds of inference and scoring.
    pub seconds: f64,
    /// Level the model was run at.
    pub level: Level,
    /// Inference grid `(H, W)`.
    pub level_size: (usize, usize),
    /// Level the predictions were scored at.
    pub score_level: Level,
    /// Scoring grid `(H, W)`.
    pub score_size: (usize, usize),
    /// The scene's own pixels.
    pub evaluation: Evaluation,
    /// Its scores (for the table; the pooled scores are what count).
    pub scores: Scores,
}

/// A scene's truth and predictions on the scoring grid.
#[derive(Debug, Clone)]
pub struct ScoredMaps {
    /// Scoring grid `(H, W)`.
    pub size: (usize, usize),
    /// Truth `u8 [3, H, W]`.
    pub truth: Vec<u8>,
    /// Predictions per task, 255 where none.
    pub pred: [Vec<u8>; 3],
}

/// Infer one scene at `opts.level` and score it against its labels at `score_level`.
pub fn evaluate_scene(
    model: &SegModel,
    reader: &SceneReader,
    scene: &str,
    opts: &InferOptions,
    score_level: Level,
    dev: &Device,
) -> std::result::Result<(SceneResult, ScoredMaps), crate::train::TrainError> {
    let t0 = Instant::now();
    let data = reader.read(scene, opts.level)?;
    let maps = predict_level(model, &data, opts, dev)?;
    drop(data);
    let (truth, (sh, sw)) = reader.read_labels(scene, score_level)?;
    let plane = sh * sw;
    let pred: [Vec<u8>; 3] = std::array::from_fn(|t| {
        upsample_nearest(
            &maps.maps[t],
            (maps.height, maps.width),
            opts.level,
            (sh, sw),
            score_level,
        )
    });
    // Tasks without a head are not scored (their truth is masked out).
    let blank = vec![IGNORE; plane];
    let truth_of = |t: Task| {
        if model.cfg.tasks.contains(&t) {
            &truth[t.channel() * plane..(t.channel() + 1) * plane]
        } else {
            &blank[..]
        }
    };
    let mut evaluation = Evaluation::new();
    evaluation
        .add(
            Task::ALL.map(truth_of),
            [&pred[0][..], &pred[1][..], &pred[2][..]],
        )
        .map_err(|e| crate::train::TrainError::Setup(format!("{scene}: {e}")))?;
    let scores = evaluation.scores();
    Ok((
        SceneResult {
            scene: scene.to_string(),
            windows: maps.windows,
            seconds: t0.elapsed().as_secs_f64(),
            level: opts.level,
            level_size: (maps.height, maps.width),
            score_level,
            score_size: (sh, sw),
            evaluation,
            scores,
        },
        ScoredMaps {
            size: (sh, sw),
            truth,
            pred,
        },
    ))
}

/// The score a run selects checkpoints by: AutoICE's combined score when all three tasks are
/// trained, else the same weights (2, 2, 1) over the trained tasks (× 100).
pub fn selection_score(scores: &Scores, tasks: &[Task]) -> f64 {
    let parts = [
        (Task::Sic, 2.0, scores.sic_r2),
        (Task::Sod, 2.0, scores.sod_f1),
        (Task::Floe, 1.0, scores.floe_f1),
    ];
    let (mut num, mut den) = (0.0, 0.0);
    for (t, w, v) in parts {
        if tasks.contains(&t) {
            num += w * v;
            den += w;
        }
    }
    if den > 0.0 {
        100.0 * num / den
    } else {
        f64::NAN
    }
}

/// Write the per-scene table (`scenes.parquet`): `scene_id` (as the store's manifests name it),
/// windows, seconds, the inference and scoring levels and grids, the scene's own R² and F1
/// scores and its combined score (null where undefined: no labelled pixel of the task, or a
/// task the model does not predict, as `metrics.json` writes them) and its labelled pixels per
/// task.
pub fn write_scene_table(
    path: &std::path::Path,
    scenes: &[SceneResult],
) -> std::result::Result<(), crate::train::TrainError> {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
    use arrow_schema::{DataType, Field, Schema};
    let u = |name: &str| Field::new(name, DataType::UInt64, false);
    let f = |name: &str| Field::new(name, DataType::Float64, false);
    let score = |name: &str| Field::new(name, DataType::Float64, true);
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let schema = Schema::new(vec![
        text("scene_id"),
        u("windows"),
        f("seconds"),
        text("level"),
        u("level_height"),
        u("level_width"),
        text("score_level"),
        u("score_height"),
        u("score_width"),
        score("sic_r2"),
        score("sod_f1"),
        score("floe_f1"),
        score("combined"),
        u("pixels_sic"),
        u("pixels_sod"),
        u("pixels_floe"),
    ]);
    let ucol = |g: &dyn Fn(&SceneResult) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(scenes.iter().map(g)))
    };
    let fcol = |g: &dyn Fn(&SceneResult) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(scenes.iter().map(g)))
    };
    // Undefined scores (NaN) as nulls, which readers leave out of means.
    let scol = |g: &dyn Fn(&SceneResult) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter(
            scenes.iter().map(|s| Some(g(s)).filter(|v| v.is_finite())),
        ))
    };
    let tcol = |g: &dyn Fn(&SceneResult) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(scenes.iter().map(g)))
    };
    let cols: Vec<ArrayRef> = vec![
        tcol(&|s| s.scene.clone()),
        ucol(&|s| s.windows as u64),
        fcol(&|s| s.seconds),
        tcol(&|s| s.level.name()),
        ucol(&|s| s.level_size.0 as u64),
        ucol(&|s| s.level_size.1 as u64),
        tcol(&|s| s.score_level.name()),
        ucol(&|s| s.score_size.0 as u64),
        ucol(&|s| s.score_size.1 as u64),
        scol(&|s| s.scores.sic_r2),
        scol(&|s| s.scores.sod_f1),
        scol(&|s| s.scores.floe_f1),
        scol(&|s| s.scores.combined),
        ucol(&|s| s.scores.pixels[0]),
        ucol(&|s| s.scores.pixels[1]),
        ucol(&|s| s.scores.pixels[2]),
    ];
    let batch =
        RecordBatch::try_new(Arc::new(schema), cols).map_err(|e| crate::train::io_err(path, e))?;
    crate::train::write_parquet(path, &batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, Float64Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn result(scene: &str, scores: Scores) -> SceneResult {
        SceneResult {
            scene: scene.into(),
            windows: 4,
            seconds: 0.5,
            level: Level::new(200).unwrap(),
            level_size: (20, 21),
            score_level: Level::new(80).unwrap(),
            score_size: (50, 52),
            evaluation: Evaluation::new(),
            scores,
        }
    }

    #[test]
    fn the_scene_table_names_scenes_as_the_manifests_do_and_leaves_undefined_scores_null() {
        let scored = Scores {
            sic_r2: 0.5,
            sod_f1: 0.25,
            floe_f1: 0.75,
            combined: 50.0,
            pixels: [10, 20, 30],
        };
        // A test-release scene without its reference: nothing labelled, nothing defined.
        let unlabelled = Scores {
            sic_r2: f64::NAN,
            sod_f1: f64::NAN,
            floe_f1: f64::NAN,
            combined: f64::NAN,
            pixels: [0; 3],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scenes.parquet");
        write_scene_table(&path, &[result("a", scored), result("b", unlabelled)]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let batch = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let text = |c: &str| -> Vec<String> {
            let col = batch.column_by_name(c).unwrap();
            let a = col.as_any().downcast_ref::<StringArray>().unwrap();
            (0..a.len()).map(|i| a.value(i).to_string()).collect()
        };
        assert_eq!(text("scene_id"), ["a", "b"]);
        assert_eq!(text("level"), ["200m", "200m"]);
        assert_eq!(text("score_level"), ["80m", "80m"]);
        for (c, want) in [
            ("sic_r2", 0.5),
            ("sod_f1", 0.25),
            ("floe_f1", 0.75),
            ("combined", 50.0),
        ] {
            let col = batch.column_by_name(c).unwrap();
            let a = col.as_any().downcast_ref::<Float64Array>().unwrap();
            assert_eq!(
                (a.value(0), a.is_null(0), a.is_null(1)),
                (want, false, true)
            );
        }
    }
}
