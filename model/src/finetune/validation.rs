//! Validation passes as `validation.parquet`, and the best checkpoint by score
//! (`checkpoints/best/`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use candle_core::Var;
use serde::{Deserialize, Serialize};

use crate::metrics::Scores;
use crate::train::{TrainError, io_err, write_parquet};

/// One validation pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ValRecord {
    /// Steps done when it ran.
    pub step: u64,
    /// Pooled R² of SIC.
    pub sic_r2: f64,
    /// Pooled weighted F1 of SOD.
    pub sod_f1: f64,
    /// Pooled weighted F1 of FLOE.
    pub floe_f1: f64,
    /// AutoICE combined score × 100.
    pub combined: f64,
    /// The selection score ([`selection_score`]: the combined score for three tasks).
    pub score: f64,
    /// Seconds the pass took.
    pub seconds: f64,
}

/// `checkpoints/best/state.json`.
#[derive(Debug, Clone, Serialize)]
struct BestState<'a> {
    step: u64,
    score: f64,
    scores: &'a Scores,
    /// BLAKE3 of `model.safetensors`, checked when it is loaded.
    blake3: std::collections::BTreeMap<String, String>,
}

/// What a run reads back of `checkpoints/best/state.json`.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct BestSeen {
    pub(super) step: u64,
    pub(super) score: f64,
}

pub(super) fn save_best(
    out: &Path,
    step: u64,
    score: f64,
    scores: &Scores,
    named: &[(String, Var)],
) -> Result<PathBuf, TrainError> {
    let dir = out.join("checkpoints").join("best");
    let weights = crate::train::tensors_of(named);
    crate::train::write_checkpoint_folder(&dir, &[("model.safetensors", &weights)], |blake3| {
        serde_json::to_string_pretty(&BestState {
            step,
            score,
            scores,
            blake3,
        })
    })?;
    Ok(dir)
}

pub(super) fn read_best(out: &Path) -> Option<BestSeen> {
    let text = std::fs::read_to_string(out.join("checkpoints/best/state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Write `validation.parquet`.
pub fn write_validation(path: &Path, records: &[ValRecord]) -> Result<(), TrainError> {
    let f = |name: &str| Field::new(name, DataType::Float64, false);
    let schema = Schema::new(vec![
        Field::new("step", DataType::UInt64, false),
        f("sic_r2"),
        f("sod_f1"),
        f("floe_f1"),
        f("combined"),
        f("score"),
        f("seconds"),
    ]);
    let col = |g: fn(&ValRecord) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(records.iter().map(g)))
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            records.iter().map(|r| r.step),
        )),
        col(|r| r.sic_r2),
        col(|r| r.sod_f1),
        col(|r| r.floe_f1),
        col(|r| r.combined),
        col(|r| r.score),
        col(|r| r.seconds),
    ];
    let batch = RecordBatch::try_new(Arc::new(schema), cols).map_err(|e| io_err(path, e))?;
    write_parquet(path, &batch)
}

/// Read `validation.parquet` (empty when absent).
pub fn read_validation(path: &Path) -> Result<Vec<ValRecord>, TrainError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, UInt64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| io_err(path, e))?;
        let bad = || io_err(path, "unexpected columns");
        let c = |n: &str| {
            b.column_by_name(n)
                .and_then(|c| c.as_primitive_opt::<Float64Type>())
                .ok_or_else(bad)
        };
        let step = b
            .column_by_name("step")
            .and_then(|c| c.as_primitive_opt::<UInt64Type>())
            .ok_or_else(bad)?;
        let (r2, sod, floe) = (c("sic_r2")?, c("sod_f1")?, c("floe_f1")?);
        let (comb, score, secs) = (c("combined")?, c("score")?, c("seconds")?);
        for i in 0..b.num_rows() {
            out.push(ValRecord {
                step: step.value(i),
                sic_r2: r2.value(i),
                sod_f1: sod.value(i),
                floe_f1: floe.value(i),
                combined: comb.value(i),
                score: score.value(i),
                seconds: secs.value(i),
            });
        }
    }
    Ok(out)
}
