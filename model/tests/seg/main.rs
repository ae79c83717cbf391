//! Segmentation: every parameter of both heads trains and its gradient matches finite
//! differences; resampling matches PyTorch; `--init` sets every encoder weight, the patch
//! embedding included; fine-tuning runs resume exactly and keep the best checkpoint by
//! validation; sliding-window inference equals the model on each window and skips empty ones.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::{SceneLevel, SceneReader};
use icefm_model::config::TrainConfig;
use icefm_model::evaluate::{Blend, InferOptions, predict_level, upsample_nearest, window_starts};
use icefm_model::finetune::{load_init, read_validation, train_seg};
use icefm_model::mae::{Mae, MaeConfig};
use icefm_model::seg::{
    HeadKind, Resample, SegConfig, SegModel, SicLoss, class_of, label_counts, resize, seg_loss,
};
use icefm_model::train::{RunOptions, StepRecord, checkpoints, init_weights, named_vars};
use icefm_schemas::{IGNORE, Level, Task};

#[path = "../common/mod.rs"]
mod common;
mod model;
mod runs;

use common::{check_var, max_rel, random, values};

fn micro(head: HeadKind, sic_loss: SicLoss) -> SegConfig {
    SegConfig {
        encoder: MaeConfig::micro().encoder,
        layers: [0, 0, 1, 1],
        head,
        channels: 8,
        tasks: Task::ALL.to_vec(),
        sic_loss,
        task_weights: [1.0, 3.0, 3.0],
    }
}

fn model(dtype: DType, cfg: &SegConfig, seed: u64) -> (VarMap, SegModel) {
    let vars = VarMap::new();
    let m = SegModel::new(VarBuilder::from_varmap(&vars, dtype, &Device::Cpu), cfg).unwrap();
    init_weights(&vars, seed).unwrap();
    (vars, m)
}

/// Labels `[B, 3, H, W]`: classes of each task, with a band of 255.
fn labels(b: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(b * 3 * h * w);
    for s in 0..b {
        for t in Task::ALL {
            for y in 0..h {
                for x in 0..w {
                    out.push(if y == 3 {
                        IGNORE
                    } else {
                        ((s * 7 + y * 3 + x * 5 + t.channel()) % t.n_classes()) as u8
                    });
                }
            }
        }
    }
    out
}

/// The tensors of a micro MAE with `depth` encoder blocks and seeded weights, by name.
fn mae_weights(depth: usize, seed: u64) -> std::collections::HashMap<String, Tensor> {
    let vars = VarMap::new();
    let mut c = MaeConfig::micro();
    c.encoder.depth = depth;
    Mae::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), &c).unwrap();
    init_weights(&vars, seed).unwrap();
    named_vars(&vars)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// A whole fine-tuning run of [`CONFIG`] with `sets` into `out`.
fn fine_tune(sets: &[String], out: &Path) {
    let cfg = TrainConfig::parse(CONFIG, sets).unwrap();
    let opts = RunOptions {
        device: Device::Cpu,
        store: store().to_path_buf(),
        out: out.to_path_buf(),
        resume: false,
    };
    train_seg(&cfg, &opts, &AtomicBool::new(false), &|_| {}, &|_| {}).unwrap();
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = common::rtt_store("seg-tests", 3, (200, 240), 31);
        common::write_val_regime(&store, "v", 34.0);
        store
    })
}

const CONFIG: &str = r#"
[model]
preset = "micro"
[seg]
head = "fcn"
channels = 8
val_regime = "v"
val_every = 3
eval_level = "160"
[data]
levels = "80,160"
crop = 32
batch_size = 4
min_valid = 0.3
threads = 2
[train]
steps = 6
lr = 2e-3
warmup_steps = 2
checkpoint_every = 3
keep_last = 5
seed = 4
"#;
