//! Training configuration: a TOML file with sections `[model]`, `[mae]`, `[data]`, `[train]`,
//! and `--set section.key=value` overrides (as researchers do from Slurm scripts). Unknown keys
//! are errors, so a typo cannot silently fall back to a default.

use serde::{Deserialize, Serialize};

use icefm_schemas::Task;

use crate::mae::MaeConfig;
use crate::seg::{HeadKind, SegConfig, SicLoss};
use crate::vit::VitConfig;

/// `[model]`: the encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `tiny`, `small`, `base`, `large`, `huge`, or `micro` (the 16-wide test model).
    pub preset: String,
    /// Input channels (must match `data.channels`).
    pub in_channels: usize,
    /// Patch edge.
    pub patch: usize,
    /// Stochastic depth of the last block.
    pub drop_path: f64,
    /// Override the preset's depth (0: keep).
    pub depth: usize,
    /// Override the preset's width (0: keep); a multiple of 4 and of the heads.
    pub dim: usize,
    /// Override the preset's attention heads (0: keep).
    pub heads: usize,
}

impl ModelSection {
    /// The encoder in words: the preset, and what overrides it (`tiny, 512 wide, 8 heads`).
    pub fn describe(&self) -> String {
        let mut out = self.preset.clone();
        for (v, what) in [
            (self.dim, "wide"),
            (self.heads, "heads"),
            (self.depth, "blocks"),
        ] {
            if v > 0 {
                out.push_str(&format!(", {v} {what}"));
            }
        }
        out
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "tiny".into(),
            in_channels: 2,
            patch: 16,
            drop_path: 0.0,
            depth: 0,
            dim: 0,
            heads: 0,
        }
    }
}

/// `[mae]`: masking and decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaeSection {
    /// Share of tokens hidden from the encoder.
    pub mask_ratio: f64,
    /// Decoder width.
    pub decoder_dim: usize,
    /// Decoder blocks.
    pub decoder_depth: usize,
    /// Decoder heads.
    pub decoder_heads: usize,
}

impl Default for MaeSection {
    fn default() -> Self {
        Self {
            mask_ratio: 0.75,
            decoder_dim: 512,
            decoder_depth: 8,
            decoder_heads: 16,
        }
    }
}

/// `[data]`: what the loader feeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Levels and weights, `80,200,400` (equal) or `80:2,200:1`; empty: every store level.
    pub levels: String,
    /// Crop edge (a multiple of the patch).
    pub crop: u32,
    /// Samples per step.
    pub batch_size: usize,
    /// Regime name in the store (or a .parquet path); empty: every scene.
    pub regime: String,
    /// Input channels.
    pub channels: Vec<String>,
    /// Least valid-SAR fraction of a drawn patch.
    pub min_valid: f32,
    /// Crop jitter, pixels.
    pub jitter: u32,
    /// Random flips.
    pub flips: bool,
    /// Random 90° rotations.
    pub rot90: bool,
    /// Loader threads (0: all cores).
    pub threads: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            levels: String::new(),
            crop: 384,
            batch_size: 32,
            regime: String::new(),
            channels: vec!["HH".into(), "HV".into()],
            min_valid: 0.5,
            jitter: 0,
            flips: true,
            rot90: false,
            threads: 0,
        }
    }
}

/// `[train]`: optimisation and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Steps in the run.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Share of `lr` the warm-up starts from, in [0, 1): 0 rises from nothing, 1/3 from a third
    /// as mmengine's `LinearLR(start_factor=1/3)` in SAR-IceFM's recipes.
    pub warmup_start: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub clip_grad: f64,
    /// Seed of batches, masks and initialisation.
    pub seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest).
    pub keep_last: usize,
    /// Write a PNG panel (inputs, masks, reconstructions) every this many steps (0: never).
    pub panel_every: u64,
    /// Arithmetic of the model: `f32`, or `bf16` (matrix products and activations in bf16,
    /// master weights, optimizer, norms' statistics, softmax and the loss in f32).
    pub precision: String,
    /// Micro-batches per step: each step's batch (each rank's share of it) runs forward and
    /// backward in this many equal parts, their gradients added up before one AdamW update,
    /// the same update as the whole batch's (activation memory of one part). `data.batch_size`
    /// stays the whole batch and must be a multiple of it (times the ranks).
    pub accumulate: u32,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 1000,
            lr: 2e-4,
            min_lr: 0.0,
            warmup_steps: 100,
            warmup_start: 0.0,
            weight_decay: 0.05,
            clip_grad: 3.0,
            seed: 0,
            checkpoint_every: 500,
            keep_last: 3,
            panel_every: 500,
            precision: "f32".into(),
            accumulate: 1,
        }
    }
}

/// `[seg]`: fine-tuning for SIC, SOD and FLOE. A configuration with this section fine-tunes a
/// segmentation model; one without it pre-trains an MAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegSection {
    /// Head per task: `upernet` (SAR-IceFM) or `fcn` (light, for CPU runs).
    pub head: String,
    /// Head width (channels).
    pub channels: usize,
    /// Tasks trained, any of `SIC`, `SOD`, `FLOE` (one = single-task).
    pub tasks: Vec<String>,
    /// SIC loss: `mse` (regression on the class index, SAR-IceFM) or `ce` (11 classes).
    pub sic_loss: String,
    /// Loss weights of SIC, SOD, FLOE (SAR-IceFM: 1, 3, 3).
    pub task_weights: [f64; 3],
    /// The four encoder blocks (0-based) feeding the pyramid; empty = evenly spaced
    /// (2, 5, 8, 11 for 12 blocks).
    pub layers: Vec<usize>,
    /// Train only the neck and heads (linear probing).
    pub freeze_encoder: bool,
    /// Encoder weights to start from: an MAE run, checkpoint folder or `.safetensors` file
    /// (`icefm import` output); empty = from scratch. `--init` sets it.
    pub init: String,
    /// Regime of validation scenes; empty = no validation during training.
    pub val_regime: String,
    /// Validate every this many steps (0: only after the last step).
    pub val_every: u64,
    /// Level of sliding-window inference (validation and `icefm eval`); empty = the finest
    /// level of `data.levels`.
    pub eval_level: String,
    /// Window stride of sliding-window inference in pixels; 0 = half the crop.
    pub eval_stride: u32,
    /// Blending of overlapping windows: `mean` or `taper` (weights falling towards the
    /// window edges).
    pub eval_blend: String,
}

impl Default for SegSection {
    fn default() -> Self {
        Self {
            head: "upernet".into(),
            channels: 256,
            tasks: vec!["SIC".into(), "SOD".into(), "FLOE".into()],
            sic_loss: "mse".into(),
            task_weights: [1.0, 3.0, 3.0],
            layers: Vec::new(),
            freeze_encoder: false,
            init: String::new(),
            val_regime: String::new(),
            val_every: 0,
            eval_level: String::new(),
            eval_stride: 0,
            eval_blend: "taper".into(),
        }
    }
}

/// A whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[mae]`.
    pub mae: MaeSection,
    /// `[data]`.
    pub data: DataSection,
    /// `[train]`.
    pub train: TrainSection,
    /// Fine-tuning (absent: MAE pre-training).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seg: Option<SegSection>,
}

/// A configuration problem, one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Whether a TOML table holds a key with a value anywhere (section headers alone do not count).
fn has_key(t: &toml::Table) -> bool {
    t.values().any(|v| match v {
        toml::Value::Table(inner) => has_key(inner),
        _ => true,
    })
}

impl TrainConfig {
    /// Parse TOML text, then apply `section.key=value` overrides (values in TOML syntax; bare
    /// words are strings). A value of the wrong type or an unknown key is blamed on the
    /// override that brought it (`--set train.steps=abc: …`) or on its line of the text
    /// (`config line 4 (steps = "abc"): …`).
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let base: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| located(text, &e))?;
        // Every key has a default, so an empty file (one cut short, say) would run as the
        // defaults without a word.
        if !has_key(&base) && overrides.is_empty() {
            return Err(ConfigError(
                "the configuration is empty (no key): a file cut short? start from one of \
                 configs/*.toml"
                    .into(),
            ));
        }
        let mut doc = base.clone();
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let mut cfg = match decode(&doc) {
            Ok(c) => c,
            Err(message) => return Err(blame(text, &base, overrides, message)),
        };
        // The micro preset's patch is 4 whatever `model.patch` says; the configuration then
        // says so too (its `config.toml` records what the run uses).
        if cfg.model.preset == "micro" {
            let p = cfg.model.patch;
            if p != MaeConfig::micro().encoder.patch && p != ModelSection::default().patch {
                return Err(ConfigError(format!(
                    "model.patch {p}: the micro preset's patch is {} (leave model.patch out, or \
                     take another preset)",
                    MaeConfig::micro().encoder.patch
                )));
            }
            cfg.model.patch = MaeConfig::micro().encoder.patch;
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Settings this configuration holds but its kind of run does not use, one line each: a
    /// fine-tuning run has no MAE masking or decoder (`[mae]`) and writes no reconstruction
    /// panels (`train.panel_every`). Values left at their defaults are not named, so that a
    /// run's own resolved `config.toml` gives none.
    pub fn ignored_settings(&self) -> Vec<String> {
        if !self.is_seg() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let (mae, default) = (
            toml::Value::try_from(&self.mae),
            toml::Value::try_from(MaeSection::default()),
        );
        if let (Ok(toml::Value::Table(mae)), Ok(toml::Value::Table(default))) = (mae, default) {
            for (key, value) in &mae {
                if default.get(key) != Some(value) {
                    out.push(format!(
                        "mae.{key} = {value} is for MAE pre-training; fine-tuning ignores it"
                    ));
                }
            }
        }
        let panels = self.train.panel_every;
        if panels != 0 && panels != TrainSection::default().panel_every {
            out.push(format!(
                "train.panel_every = {panels}: fine-tuning writes no reconstruction panels \
                 (`icefm eval` draws its chart panels)"
            ));
        }
        out
    }

    /// The bytes of the largest attention matrix one forward pass of `images` images makes
    /// (images × heads × tokens² values, the class token included; 4 bytes each, 2 in
    /// bf16): a floor under the step's memory, since the backward keeps it and more. MAE: the
    /// encoder's visible tokens or the decoder's all; fine-tuning: the encoder's all.
    pub fn largest_attention_bytes(&self, images: usize) -> Result<u64, ConfigError> {
        let size = if self.train.precision == "bf16" { 2 } else { 4 };
        let square = |heads: usize, tokens: usize| {
            images as u64 * heads as u64 * (tokens as u64 + 1).pow(2) * size
        };
        Ok(if self.is_seg() {
            let s = self.seg_config()?;
            let tokens = (self.data.crop as usize / s.encoder.patch).pow(2);
            square(s.encoder.heads, tokens)
        } else {
            let m = self.mae_config()?;
            let tokens = (self.data.crop as usize / m.encoder.patch).pow(2);
            let visible = crate::mae::kept_tokens(tokens, m.mask_ratio);
            square(m.encoder.heads, visible).max(square(m.decoder_heads, tokens))
        })
    }

    /// The resolved configuration as TOML (written to the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Whether a run of `self` may continue as a run of `other` (`--resume`): the same
    /// configuration but for `train.steps`, which may grow, and `train.accumulate`, whose
    /// micro-batches take the same steps (to rounding).
    pub fn continues_as(&self, other: &TrainConfig) -> bool {
        let (mut a, mut b) = (self.clone(), other.clone());
        for c in [&mut a, &mut b] {
            c.train.steps = 0;
            c.train.accumulate = 1;
        }
        a == b
    }

    /// The keys whose values differ between `self` and `other`, but for those `--resume` may
    /// change ([`TrainConfig::continues_as`]): `key (self's value, not other's value)`, in key
    /// order.
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        self.differing_values(other, &["train.steps", "train.accumulate"])
            .into_iter()
            .map(|(k, a, b)| format!("{k} ({a}, not {b})"))
            .collect()
    }

    /// Every key whose value differs between `self` and `other`, with `self`'s value and
    /// `other`'s (`(none)` where one lacks it), in key order: the ranks of a data-parallel run
    /// must agree on all.
    pub fn all_differences(&self, other: &TrainConfig) -> Vec<(String, String, String)> {
        self.differing_values(other, &[])
    }

    fn differing_values(
        &self,
        other: &TrainConfig,
        skip: &[&str],
    ) -> Vec<(String, String, String)> {
        use std::collections::BTreeMap;
        fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let table = |c: &TrainConfig| {
            let mut out = BTreeMap::new();
            if let Ok(v) = toml::Value::try_from(c) {
                flatten("", &v, &mut out);
            }
            for k in skip {
                out.remove(*k);
            }
            out
        };
        let (a, b) = (table(self), table(other));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let show = |m: &BTreeMap<String, String>, k: &str| {
            m.get(k).cloned().unwrap_or_else(|| "(none)".into())
        };
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| (k.clone(), show(&a, k), show(&b, k)))
            .collect()
    }

    /// The model shape this configuration asks for.
    pub fn mae_config(&self) -> Result<MaeConfig, ConfigError> {
        let m = &self.model;
        let mut enc = if m.preset == "micro" {
            MaeConfig::micro().encoder
        } else {
            VitConfig::preset(&m.preset).ok_or_else(|| {
                ConfigError(format!(
                    "model.preset `{}`: expected tiny, small, base, large, huge or micro",
                    m.preset
                ))
            })?
        };
        if m.preset != "micro" {
            enc.patch = m.patch;
        }
        enc.in_channels = m.in_channels;
        enc.drop_path = m.drop_path;
        if m.depth > 0 {
            enc.depth = m.depth;
        }
        if m.dim > 0 {
            enc.dim = m.dim;
        }
        if m.heads > 0 {
            enc.heads = m.heads;
        }
        let a = &self.mae;
        Ok(MaeConfig {
            encoder: enc,
            decoder_dim: a.decoder_dim,
            decoder_depth: a.decoder_depth,
            decoder_heads: a.decoder_heads,
            mask_ratio: a.mask_ratio,
        })
    }

    /// Whether this configuration fine-tunes (has a `[seg]` section).
    pub fn is_seg(&self) -> bool {
        self.seg.is_some()
    }

    /// The segmentation model of a `[seg]` configuration.
    pub fn seg_config(&self) -> Result<SegConfig, ConfigError> {
        let s = self
            .seg
            .as_ref()
            .ok_or_else(|| ConfigError("the configuration has no [seg] section".into()))?;
        let encoder = self.mae_config()?.encoder;
        let head = HeadKind::parse(&s.head).ok_or_else(|| {
            ConfigError(format!("seg.head `{}`: expected upernet or fcn", s.head))
        })?;
        let sic_loss = match s.sic_loss.as_str() {
            "mse" => SicLoss::Mse,
            "ce" => SicLoss::CrossEntropy,
            o => {
                return Err(ConfigError(format!(
                    "seg.sic_loss `{o}`: expected mse or ce"
                )));
            }
        };
        let mut tasks = Vec::new();
        for name in &s.tasks {
            let t = Task::ALL
                .into_iter()
                .find(|t| t.name().eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    ConfigError(format!("seg.tasks: `{name}` is not SIC, SOD or FLOE"))
                })?;
            if tasks.contains(&t) {
                return Err(ConfigError(format!("seg.tasks names {name} twice")));
            }
            tasks.push(t);
        }
        if tasks.is_empty() {
            return Err(ConfigError("seg.tasks is empty".into()));
        }
        let layers = match s.layers.as_slice() {
            [] => SegConfig::default_layers(encoder.depth),
            [a, b, c, d] => [*a, *b, *c, *d],
            l => {
                return Err(ConfigError(format!(
                    "seg.layers has {} entries; give four block indices or none",
                    l.len()
                )));
            }
        };
        if let Some(l) = layers.iter().find(|&&l| l >= encoder.depth) {
            return Err(ConfigError(format!(
                "seg.layers: block {l} is not below the encoder's {} blocks",
                encoder.depth
            )));
        }
        // Blocks after the last one read would take no part in the loss: no gradient, and
        // the optimizer refuses a trained parameter without one.
        let last = layers.iter().max().copied().unwrap_or(0);
        if last + 1 < encoder.depth && !s.freeze_encoder {
            return Err(ConfigError(format!(
                "seg.layers {layers:?}: blocks {} to {} of the encoder come after the last block \
                 read and would learn nothing; end the list at block {} (the last), or give \
                 model.depth = {} to build the encoder without them",
                last + 1,
                encoder.depth - 1,
                encoder.depth - 1,
                last + 1
            )));
        }
        if s.task_weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(ConfigError(format!(
                "seg.task_weights {:?} must be finite and not negative",
                s.task_weights
            )));
        }
        // Weights in SIC, SOD, FLOE order: a run whose tasks all weigh 0 learns nothing.
        let weighs = |name: &str| {
            ["SIC", "SOD", "FLOE"]
                .iter()
                .position(|t| t.eq_ignore_ascii_case(name))
                .is_some_and(|i| s.task_weights[i] > 0.0)
        };
        if !s.tasks.iter().any(|t| weighs(t)) {
            return Err(ConfigError(format!(
                "seg.task_weights {:?} give every task of seg.tasks {:?} weight 0: nothing \
                 would be learnt",
                s.task_weights, s.tasks
            )));
        }
        // A trained task of weight 0 has a head that learns nothing (no gradient).
        if let Some(t) = s.tasks.iter().find(|t| !weighs(t)) {
            return Err(ConfigError(format!(
                "seg.task_weights {:?} give {t} weight 0: its head would learn nothing; leave \
                 {t} out of seg.tasks instead",
                s.task_weights
            )));
        }
        if s.eval_stride > self.data.crop {
            return Err(ConfigError(format!(
                "seg.eval_stride {} is longer than data.crop {}: the strips between windows \
                 would have no prediction (0 = half the crop)",
                s.eval_stride, self.data.crop
            )));
        }
        if !s.eval_level.trim().is_empty() {
            icefm_schemas::Level::parse_list(&s.eval_level)
                .map_err(|e| ConfigError(format!("seg.eval_level `{}`: {e}", s.eval_level)))?;
        }
        if s.channels == 0 {
            return Err(ConfigError("seg.channels must be at least 1".into()));
        }
        if !matches!(s.eval_blend.as_str(), "mean" | "taper") {
            return Err(ConfigError(format!(
                "seg.eval_blend `{}`: expected mean or taper",
                s.eval_blend
            )));
        }
        Ok(SegConfig {
            encoder,
            layers,
            head,
            channels: s.channels,
            tasks,
            sic_loss,
            task_weights: s.task_weights,
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.is_seg() {
            self.seg_config()?;
        }
        if !matches!(self.train.precision.as_str(), "f32" | "bf16") {
            return Err(ConfigError(format!(
                "train.precision `{}`: expected f32 or bf16",
                self.train.precision
            )));
        }
        let k = self.train.accumulate as usize;
        if k == 0 || !self.data.batch_size.is_multiple_of(k) {
            return Err(ConfigError(format!(
                "train.accumulate {k}: expected at least 1, dividing data.batch_size {}",
                self.data.batch_size
            )));
        }
        let e = |m: String| Err(ConfigError(m));
        let mae = self.mae_config()?;
        let p = mae.encoder.patch as u32;
        if self.data.crop == 0 || !self.data.crop.is_multiple_of(p) {
            return e(format!(
                "data.crop {} must be a positive multiple of the patch {p}",
                self.data.crop
            ));
        }
        if self.data.channels.len() != self.model.in_channels {
            return e(format!(
                "data.channels has {} channels but model.in_channels is {}",
                self.data.channels.len(),
                self.model.in_channels
            ));
        }
        if !(0.0..1.0).contains(&self.mae.mask_ratio) {
            return e(format!(
                "mae.mask_ratio {} is not in [0, 1)",
                self.mae.mask_ratio
            ));
        }
        if mae.encoder.dim % 4 != 0 || mae.encoder.dim % mae.encoder.heads.max(1) != 0 {
            return e(format!(
                "encoder width {} must be a multiple of 4 and of its {} heads (model.dim, \
                 model.heads)",
                mae.encoder.dim, mae.encoder.heads
            ));
        }
        if !self
            .mae
            .decoder_dim
            .is_multiple_of(self.mae.decoder_heads.max(1))
            || !self.mae.decoder_dim.is_multiple_of(4)
        {
            return e(format!(
                "mae.decoder_dim {} must be a multiple of 4 and of decoder_heads {}",
                self.mae.decoder_dim, self.mae.decoder_heads
            ));
        }
        if self.train.steps == 0 || self.data.batch_size == 0 {
            return e("train.steps and data.batch_size must be at least 1".into());
        }
        if self.mae.decoder_heads == 0 {
            return e("mae.decoder_heads must be at least 1".into());
        }
        let t = &self.train;
        // 0 is allowed: a step that changes nothing (a test of what a run loads).
        if !(t.lr.is_finite() && t.lr >= 0.0) {
            return e(format!("train.lr {} must be a number of at least 0", t.lr));
        }
        if !(t.min_lr.is_finite() && (0.0..=t.lr).contains(&t.min_lr)) {
            return e(format!(
                "train.min_lr {} must be from 0 to train.lr {}",
                t.min_lr, t.lr
            ));
        }
        for (key, v) in [
            ("train.weight_decay", t.weight_decay),
            ("train.clip_grad", t.clip_grad),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return e(format!("{key} {v} must be a number of at least 0"));
            }
        }
        if !(0.0..1.0).contains(&self.model.drop_path) {
            return e(format!(
                "model.drop_path {} is not in [0, 1)",
                self.model.drop_path
            ));
        }
        if !(0.0..1.0).contains(&t.warmup_start) {
            return e(format!(
                "train.warmup_start {}: expected a share of train.lr in [0, 1)",
                t.warmup_start
            ));
        }
        if t.keep_last == 0 {
            return e("train.keep_last must be at least 1 (the checkpoint to resume from)".into());
        }
        if let Some(c) = self
            .data
            .channels
            .iter()
            .enumerate()
            .find_map(|(i, c)| self.data.channels[..i].contains(c).then_some(c))
        {
            return e(format!("data.channels names {c} twice"));
        }
        if !self.is_seg() {
            // MAE: at least one token seen and one to reconstruct in every crop.
            let side = (self.data.crop / p) as usize;
            let n = side * side;
            let keep = crate::mae::kept_tokens(n, self.mae.mask_ratio);
            if keep == 0 || keep >= n {
                return e(format!(
                    "mae.mask_ratio {} of a {}-px crop ({n} tokens of {p} px) keeps {keep} \
                     token(s) visible: at least one must be seen and one masked",
                    self.mae.mask_ratio, self.data.crop
                ));
            }
        }
        Ok(())
    }
}

/// Apply one `section.key=value` override to `doc`.
fn apply_override(doc: &mut toml::Table, o: &str) -> Result<(), ConfigError> {
    let (path, raw) = o
        .split_once('=')
        .ok_or_else(|| ConfigError(format!("--set {o}: expected section.key=value")))?;
    let (section, key) = path.trim().split_once('.').ok_or_else(|| {
        ConfigError(format!(
            "--set {o}: expected section.key=value (e.g. train.steps=40)"
        ))
    })?;
    // Keys whose value is text take the raw text (`data.levels=80` is "80").
    let all = TrainConfig {
        seg: Some(SegSection::default()),
        ..TrainConfig::default()
    };
    let text_key = toml::Value::try_from(all)
        .ok()
        .and_then(|d| d.get(section)?.get(key).map(toml::Value::is_str))
        .unwrap_or(false);
    let raw = raw.trim();
    let value = if text_key && !raw.starts_with(['"', '\'']) {
        toml::Value::String(raw.to_string())
    } else {
        parse_value(raw)
    };
    let table = doc
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| ConfigError(format!("--set {o}: `{section}` is not a section")))?;
    table.insert(key.to_string(), value);
    Ok(())
}

fn decode(doc: &toml::Table) -> Result<TrainConfig, String> {
    toml::Value::Table(doc.clone())
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())
}

/// The error of a configuration that does not decode, blamed on the text's line when the
/// text alone fails, else on the first override that makes it fail.
fn blame(text: &str, base: &toml::Table, overrides: &[String], message: String) -> ConfigError {
    if let Err(e) = toml::from_str::<TrainConfig>(text) {
        return located(text, &e);
    }
    let mut doc = base.clone();
    for o in overrides {
        if apply_override(&mut doc, o).is_err() {
            break;
        }
        if let Err(m) = decode(&doc) {
            return ConfigError(format!("--set {o}: {m}"));
        }
    }
    ConfigError(format!("config: {message}"))
}

/// A TOML error of `text` with the line it points at, on one line.
fn located(text: &str, e: &toml::de::Error) -> ConfigError {
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return ConfigError(format!("config: {}", e.message()));
    };
    let number = text[..at].matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or("").trim();
    ConfigError(format!("config line {number} ({line}): {}", e.message()))
}

fn parse_value(raw: &str) -> toml::Value {
    // A TOML literal (number, bool, array, quoted string), else a bare string.
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests;
