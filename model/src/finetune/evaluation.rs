//! Scoring a run's model on whole scenes, for validation and `icefm eval`: the level it is scored
//! at, the inference options, the run's configuration and its best (or last) weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use icefm_dataset::SceneReader;
use icefm_dataset::regime::Regime;
use icefm_dataset::sampler::parse_level_weights;
use icefm_schemas::Level;

use crate::config::TrainConfig;
use crate::evaluate::{Blend, InferOptions, SceneResult, evaluate_scene};
use crate::metrics::Evaluation;
use crate::seg::SegModel;
use crate::train::{TrainError, config_of_run, io_err};

use super::resolve_weights;

/// The level sliding-window inference runs at: `seg.eval_level`, else the finest level of
/// `data.levels`, else the finest of `store_levels`.
pub fn eval_level(cfg: &TrainConfig, store_levels: &[Level]) -> Result<Level, TrainError> {
    let seg = cfg.seg.clone().unwrap_or_default();
    let setup = |e: String| TrainError::Setup(e);
    if !seg.eval_level.trim().is_empty() {
        let l = Level::parse_list(&seg.eval_level)
            .map_err(|e| setup(format!("seg.eval_level: {e}")))?;
        return l
            .first()
            .copied()
            .ok_or_else(|| setup("seg.eval_level is empty".into()));
    }
    if let Some(l) = trained_levels(cfg)?.first() {
        return Ok(*l);
    }
    store_levels
        .iter()
        .min_by_key(|l| l.spacing_m())
        .copied()
        .ok_or_else(|| setup("the store has no level".into()))
}

/// The levels `cfg` trains at (`data.levels`, finest first); empty when it names none (a
/// run then trains at every level of its store).
pub fn trained_levels(cfg: &TrainConfig) -> Result<Vec<Level>, TrainError> {
    if cfg.data.levels.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut l: Vec<Level> = parse_level_weights(&cfg.data.levels)?
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    l.sort_by_key(|l| l.spacing_m());
    Ok(l)
}

/// Inference options of a fine-tuning configuration at `level`.
pub fn infer_options(cfg: &TrainConfig, level: Level) -> InferOptions {
    let seg = cfg.seg.clone().unwrap_or_default();
    let crop = cfg.data.crop as usize;
    InferOptions {
        level,
        crop,
        stride: if seg.eval_stride > 0 {
            seg.eval_stride as usize
        } else {
            (crop / 2).max(1)
        },
        batch: cfg.data.batch_size.max(1),
        blend: Blend::parse(&seg.eval_blend).unwrap_or(Blend::Taper),
        progress: None,
    }
}

/// Evaluate `model` on `scenes`: pooled metrics and one result per scene. `on_scene` sees
/// each scene's result and maps as it is done.
pub fn evaluate_scenes(
    model: &SegModel,
    reader: &SceneReader,
    scenes: &[Arc<str>],
    opts: &InferOptions,
    score_level: Level,
    dev: &Device,
    on_scene: &mut dyn FnMut(&SceneResult, &crate::evaluate::ScoredMaps) -> Result<(), TrainError>,
) -> Result<(Evaluation, Vec<SceneResult>), TrainError> {
    let mut total = Evaluation::new();
    let mut results = Vec::with_capacity(scenes.len());
    for s in scenes {
        let (r, maps) = evaluate_scene(model, reader, s, opts, score_level, dev)?;
        total
            .merge(&r.evaluation)
            .map_err(|e| TrainError::Setup(e.to_string()))?;
        on_scene(&r, &maps)?;
        results.push(r);
    }
    Ok((total, results))
}

/// What [`evaluate_run`] may change of a run's own inference settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalOverrides {
    /// Inference level (default: the run's `seg.eval_level` rule, [`eval_level`]).
    pub level: Option<Level>,
    /// Window stride in pixels (default: the run's `seg.eval_stride`, or half the crop).
    pub stride: Option<usize>,
    /// Blending (default: the run's `seg.eval_blend`).
    pub blend: Option<Blend>,
    /// Windows per forward pass (default: the run's `data.batch_size`).
    pub batch: Option<usize>,
    /// Told each scene's windows as they run ([`crate::evaluate::WindowProgress`]).
    pub progress: Option<crate::evaluate::WindowProgress>,
}

/// A whole evaluation of a fine-tuned model.
#[derive(Debug, Clone)]
pub struct RunEvaluation {
    /// The run's configuration.
    pub cfg: TrainConfig,
    /// The weights evaluated.
    pub weights: PathBuf,
    /// Inference settings used.
    pub opts: InferOptions,
    /// The grid scored on (the store's finest level, 80 m for AI4Arctic stores).
    pub score_level: Level,
    /// All scenes' pixels pooled.
    pub pooled: Evaluation,
    /// Per scene.
    pub scenes: Vec<SceneResult>,
}

/// Evaluate the model at `model` (a run folder: its best checkpoint, else its newest; or a
/// checkpoint folder or weights file inside a run) on the scenes of `regime` in `store` (all
/// its complete scenes when `None`). `on_scene` sees each scene as it is done.
pub fn evaluate_run(
    model: &Path,
    store: &Path,
    regime: Option<&str>,
    overrides: &EvalOverrides,
    dev: &Device,
    on_scene: &mut dyn FnMut(&SceneResult, &crate::evaluate::ScoredMaps) -> Result<(), TrainError>,
) -> Result<RunEvaluation, TrainError> {
    let weights = resolve_weights(model)?;
    let (cfg, seg) = load_seg_model(model, dev)?;
    let reader = SceneReader::open(store, &cfg.data.channels)?;
    let regime = regime.map(|r| Regime::open(Some(store), r)).transpose()?;
    let scenes = reader.scenes(regime.as_ref())?;
    let have = reader.levels();
    let level = match overrides.level {
        Some(l) => l,
        None => eval_level(&cfg, &have)?,
    };
    if !have.contains(&level) {
        return Err(TrainError::Setup(format!(
            "level {level} is not in the store {} (it has {})",
            store.display(),
            have.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
        )));
    }
    let mut opts = infer_options(&cfg, level);
    if let Some(s) = overrides.stride {
        opts.stride = s;
    }
    if let Some(b) = overrides.blend {
        opts.blend = b;
    }
    if let Some(b) = overrides.batch {
        opts.batch = b.max(1);
    }
    opts.progress.clone_from(&overrides.progress);
    let score_level = reader
        .levels()
        .first()
        .copied()
        .ok_or_else(|| TrainError::Setup("the store has no level".into()))?;
    let (pooled, results) =
        evaluate_scenes(&seg, &reader, &scenes, &opts, score_level, dev, on_scene)?;
    Ok(RunEvaluation {
        cfg,
        weights,
        opts,
        score_level,
        pooled,
        scenes: results,
    })
}

/// A fine-tuned model and its configuration from a run folder, a checkpoint folder (inside a
/// run) or a run's `checkpoints/best`. Weights are plain tensors (no gradient tracking).
pub fn load_seg_model(path: &Path, dev: &Device) -> Result<(TrainConfig, SegModel), TrainError> {
    let weights = resolve_weights(path)?;
    let cfg = run_config(path)?;
    let scfg = cfg.seg_config().map_err(|e| TrainError::Setup(e.0))?;
    let vb = tensors_varbuilder(&weights, dev)?;
    let mut model = SegModel::new(vb, &scfg)?;
    if cfg.train.precision == "bf16" && dev.is_cuda() {
        model.compute_dtype = DType::BF16;
    }
    Ok((cfg, model))
}

/// The configuration of a fine-tuning run: `config.toml` of the run folder `path`, or of the
/// run a checkpoint folder or weights file belongs to.
pub fn run_config(path: &Path) -> Result<TrainConfig, TrainError> {
    let (run, cfg) = config_of_run(path)?;
    if !cfg.is_seg() {
        return Err(TrainError::Setup(format!(
            "{}: not a fine-tuning run (its config has no [seg] section)",
            run.display()
        )));
    }
    Ok(cfg)
}

/// A VarBuilder over the tensors of a safetensors file, read into memory.
fn tensors_varbuilder(file: &Path, dev: &Device) -> Result<VarBuilder<'static>, TrainError> {
    let tensors: HashMap<String, Tensor> =
        crate::files::load_checked(file, dev).map_err(|e| io_err(file, e))?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, dev))
}
