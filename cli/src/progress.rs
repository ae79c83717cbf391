//! Progress bars for ingest (indicatif draws only on a terminal).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use icefm_ingest::pipeline::{Reporter, SceneOutcome};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Draws one bar for the run (scenes) and one per scene in flight (rows).
pub struct IngestBars {
    multi: MultiProgress,
    total: ProgressBar,
    scenes: Mutex<HashMap<PathBuf, ProgressBar>>,
}

impl IngestBars {
    /// Bars for `n` inputs.
    pub fn new(n: usize) -> Self {
        let multi = MultiProgress::new();
        let total = multi.add(ProgressBar::new(n as u64));
        total.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} scenes  {elapsed_precise}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        total.set_prefix("ingest");
        total.enable_steady_tick(Duration::from_millis(500));
        Self {
            multi,
            total,
            scenes: Mutex::new(HashMap::new()),
        }
    }

    /// Remove the bars.
    pub fn finish(&self) {
        self.total.finish_and_clear();
    }
}

fn short(path: &Path) -> String {
    let n = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if n.len() > 40 {
        format!("…{}", &n[n.len() - 39..])
    } else {
        n
    }
}

impl Reporter for IngestBars {
    fn scene_started(&self, path: &Path, rows: usize) {
        let bar = self.multi.add(ProgressBar::new(rows as u64));
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix:40} [{bar:30}] {percent:>3}%  {per_sec} rows  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(short(path));
        if let Ok(mut m) = self.scenes.lock() {
            m.insert(path.to_path_buf(), bar);
        }
    }

    fn rows_done(&self, path: &Path, rows: usize) {
        if let Ok(m) = self.scenes.lock()
            && let Some(b) = m.get(path)
        {
            b.inc(rows as u64);
        }
    }

    fn scene_finished(&self, path: &Path, outcome: &SceneOutcome) {
        if let Ok(mut m) = self.scenes.lock()
            && let Some(b) = m.remove(path)
        {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
        self.total.inc(1);
        let line = match outcome {
            SceneOutcome::Done {
                scene_id, warnings, ..
            } => {
                let mut s = format!("done     {scene_id}");
                for w in warnings {
                    s.push_str(&format!("\n  warning: {scene_id}: {w}"));
                }
                s
            }
            SceneOutcome::Skipped { scene_id } => {
                format!("skipped  {scene_id} (already complete, same checksum)")
            }
            SceneOutcome::Failed(e) => format!("FAILED   {e}"),
        };
        // Hidden bars (not a terminal: Slurm logs, pipes) drop println; the lines must not be lost.
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}
