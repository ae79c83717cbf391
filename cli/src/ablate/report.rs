//! What `icefm ablate` writes: each cell's `result.json`, the table `ablation.parquet` and the
//! plot `ablation.png`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use icefm_ingest::plot::{
    Dash, LinePlot, MAE_COLOUR, Marker, SCRATCH_COLOUR, Scale, Series, write_line_plot,
};
use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};

use super::grid::{Init, Plan, TaskMode, levels_key};

/// The table of results in the output folder.
pub(super) const TABLE_FILE: &str = "ablation.parquet";
/// The plot in the output folder.
pub(super) const PLOT_FILE: &str = "ablation.png";

/// What `result.json` holds: a cell, or one run of a single-task cell. Scores without
/// pixels are `null`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CellResult {
    /// The cell's key (a single-task run's: `<key>/<TASK>`).
    pub(super) key: String,
    /// The fine-tuning regime.
    pub(super) regime: String,
    /// The regime's scenes over the pool's (the grid's `pool` regime, else the store's scenes
    /// outside the test and validation regimes).
    pub(super) labelled_fraction: f64,
    /// Scenes in the regime.
    pub(super) scenes: u64,
    /// `scratch` or `mae`.
    pub(super) init: String,
    /// `multi` or `single` (a single-task run's: its task).
    pub(super) tasks: String,
    /// `data.levels`.
    pub(super) levels: String,
    /// `train.steps`.
    pub(super) steps: u64,
    /// The regime scored on.
    pub(super) test_regime: String,
    /// [`icefm_dataset::regime::Regime::scenes_hash`] of the test regime's scenes (absent in
    /// results of older icefm): a result scored on other scenes under the same name is not
    /// this grid's.
    #[serde(default)]
    pub(super) test_scenes_hash: Option<String>,
    /// Pooled R² of SIC on the test scenes.
    pub(super) sic_r2: Option<f64>,
    /// Support-weighted F1 of SOD.
    pub(super) sod_f1: Option<f64>,
    /// Support-weighted F1 of FLOE.
    pub(super) floe_f1: Option<f64>,
    /// AutoICE combined score × 100.
    pub(super) combined: Option<f64>,
    /// Wall seconds of training (summed over resumes) and scoring.
    pub(super) seconds: f64,
    /// The weights scored.
    pub(super) weights: Vec<String>,
}

impl CellResult {
    pub(super) fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub(super) fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())
    }

    pub(super) fn combined(&self) -> f64 {
        self.combined.unwrap_or(f64::NAN)
    }
}

/// Write `bytes` to `path` through a temporary file beside it, renamed into place: readers
/// (other workers, `--dry-run`) never see half a file.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Rewrite the table and the plot from the cells done so far, in grid order.
pub(super) fn write_outputs(out: &Path, plan: &Plan, results: &[Option<CellResult>]) -> Result<()> {
    let rows: Vec<&CellResult> = results.iter().flatten().collect();
    write_table(&out.join(TABLE_FILE), &rows)?;
    write_plot(&out.join(PLOT_FILE), plan, &rows)
}

/// `ablation.parquet`: one row a cell; scores without pixels are NaN.
pub(super) fn write_table(path: &Path, rows: &[&CellResult]) -> Result<()> {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let float = |name: &str| Field::new(name, DataType::Float64, false);
    let int = |name: &str| Field::new(name, DataType::UInt64, false);
    let schema = Schema::new(vec![
        text("key"),
        text("regime"),
        float("labelled_fraction"),
        int("scenes"),
        text("init"),
        text("tasks"),
        text("levels"),
        int("steps"),
        float("sic_r2"),
        float("sod_f1"),
        float("floe_f1"),
        float("combined"),
        float("seconds"),
    ]);
    let strings = |f: fn(&CellResult) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| f(r))))
    };
    let floats = |f: fn(&CellResult) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| f(r))))
    };
    let ints = |f: fn(&CellResult) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| f(r))))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(|r| &r.key),
        strings(|r| &r.regime),
        floats(|r| r.labelled_fraction),
        ints(|r| r.scenes),
        strings(|r| &r.init),
        strings(|r| &r.tasks),
        strings(|r| &r.levels),
        ints(|r| r.steps),
        floats(|r| r.sic_r2.unwrap_or(f64::NAN)),
        floats(|r| r.sod_f1.unwrap_or(f64::NAN)),
        floats(|r| r.floe_f1.unwrap_or(f64::NAN)),
        floats(|r| r.combined.unwrap_or(f64::NAN)),
        floats(|r| r.seconds),
    ];
    let batch = RecordBatch::try_new(Arc::new(schema), columns)?;
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// `80,200,400` → `80+200+400m`; `80:2,200:1` → `80m x2+200m x1`; "" → `all levels`.
fn level_label(levels: &str) -> String {
    if levels.contains(':') {
        let parts: Vec<String> = levels
            .split(',')
            .map(|p| match p.trim().split_once(':') {
                Some((l, w)) => format!("{}m x{}", l.trim().trim_end_matches('m'), w.trim()),
                None => format!("{}m", p.trim().trim_end_matches('m')),
            })
            .collect();
        return parts.join("+");
    }
    match levels_key(levels).as_str() {
        "all" => "all levels".into(),
        k => format!("{k}m"),
    }
}

/// `ablation.png`: combined score against the labelled fraction, one line per (init, tasks,
/// levels); scratch and MAE in two colours, the other axes as line pattern and marker. Only
/// axes with more than one value appear in the legend; the others go into the title.
pub(super) fn write_plot(path: &Path, plan: &Plan, rows: &[&CellResult]) -> Result<()> {
    let mut variants: Vec<(TaskMode, String)> = Vec::new();
    for c in &plan.cells {
        let v = (c.tasks, c.levels.clone());
        if !variants.contains(&v) {
            variants.push(v);
        }
    }
    let first = variants.first().cloned();
    let many_tasks = variants
        .iter()
        .any(|v| first.as_ref().is_some_and(|f| f.0 != v.0));
    let many_levels = variants
        .iter()
        .any(|v| first.as_ref().is_some_and(|f| f.1 != v.1));
    let mut series: Vec<(Init, usize, Series)> = Vec::new();
    for c in &plan.cells {
        let k = variants
            .iter()
            .position(|v| v.0 == c.tasks && v.1 == c.levels)
            .unwrap_or(0);
        if series.iter().any(|(i, j, _)| *i == c.init && *j == k) {
            continue;
        }
        let mut label = c.init.legend().to_string();
        if many_tasks {
            label.push_str(&format!(" {}", c.tasks.name()));
        }
        if many_levels {
            label.push_str(&format!(" {}", level_label(&c.levels)));
        }
        let points = plan
            .cells
            .iter()
            .filter(|d| d.init == c.init && d.tasks == c.tasks && d.levels == c.levels)
            .filter_map(|d| rows.iter().find(|r| r.key == d.key))
            .map(|r| (100.0 * r.labelled_fraction, r.combined()))
            .collect();
        series.push((
            c.init,
            k,
            Series {
                label,
                colour: match c.init {
                    Init::Scratch => SCRATCH_COLOUR,
                    Init::Mae => MAE_COLOUR,
                },
                dash: Dash::ALL[k % Dash::ALL.len()],
                marker: Marker::ALL[k % Marker::ALL.len()],
                points,
            },
        ));
    }
    let fractions: Vec<f64> = plan.cells.iter().map(|c| 100.0 * c.fraction).collect();
    let mut fixed = Vec::new();
    if let (false, Some(v)) = (many_tasks, &first) {
        fixed.push(format!("{}-task", v.0.name()));
    }
    if let (false, Some(v)) = (many_levels, &first) {
        fixed.push(level_label(&v.1));
    }
    let plot = LinePlot {
        title: format!(
            "{}: combined score vs labelled fraction ({}test regime {})",
            plan.name,
            fixed.iter().map(|f| format!("{f}, ")).collect::<String>(),
            plan.test_regime
        ),
        x_label: "labelled scenes (% of the fine-tuning pool)".into(),
        y_label: "combined score (x100)".into(),
        x_scale: Scale::auto(&fractions),
        x_ticks: Vec::new(),
        series: series.into_iter().map(|(_, _, s)| s).collect(),
    };
    write_line_plot(path, &plot).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_labels_read_as_levels_and_weights() {
        assert_eq!(level_label("80,200,400"), "80+200+400m");
        assert_eq!(level_label("200"), "200m");
        assert_eq!(level_label(""), "all levels");
        assert_eq!(level_label("80:2, 200:1"), "80m x2+200m x1");
        assert_eq!(level_label("80m:2,200m:1"), "80m x2+200m x1");
    }
}
