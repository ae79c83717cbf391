//! AutoICE evaluation metrics, exactly as scikit-learn computes them.
//!
//! - SIC: R² of the class indices 0–10 (`sklearn.metrics.r2_score`);
//! - SOD, FLOE: support-weighted F1 (`f1_score(average="weighted", zero_division=0)`);
//! - combined score: (2·R²(SIC) + 2·F1(SOD) + F1(FLOE)) / 5 × 100.
//!
//! Each chart is masked by its own reference [`IGNORE`]: a pixel counts for a task only where that
//! task's truth is a class. The pixels of all scenes are pooled before one score is computed, so the
//! accumulators ([`Confusion`], [`R2`], [`Evaluation`]) hold exact integer sums that can be added to
//! scene by scene, merged across workers, and turned into scores once at the end.
//!
//! ```
//! use icefm_model::metrics::Evaluation;
//! let mut eval = Evaluation::new();
//! // One tiny scene: SIC, SOD and FLOE charts; 255 = ignore.
//! let truth: [&[u8]; 3] = [&[0, 5, 10, 255], &[1, 1, 3, 255], &[255, 2, 2, 2]];
//! eval.add(truth, truth).unwrap();
//! let scores = eval.scores();
//! assert_eq!(scores.combined, 100.0);
//! assert_eq!(scores.pixels, [3, 3, 3]);
//! ```

use serde::Serialize;

use icefm_schemas::{IGNORE, Task};

/// Why a chart could not be scored. Nothing was counted when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// Truth and prediction of one chart have different pixel counts.
    #[error("truth has {truth} pixels but the prediction has {pred}")]
    Length {
        /// Pixels in the truth.
        truth: usize,
        /// Pixels in the prediction.
        pred: usize,
    },
    /// A truth value is neither a class nor [`IGNORE`].
    #[error("truth value {value} at pixel {pixel} is neither a class below {classes} nor 255")]
    TruthValue {
        /// The offending value.
        value: u8,
        /// Its first position in the chart.
        pixel: usize,
        /// The number of classes of the chart.
        classes: usize,
    },
    /// Two confusion matrices of different sizes cannot be merged.
    #[error("cannot merge a {right}-class confusion matrix into a {left}-class one")]
    Classes {
        /// Classes of the matrix merged into.
        left: usize,
        /// Classes of the matrix merged from.
        right: usize,
    },
    /// An error in the chart of one task.
    #[error("{task} chart")]
    Task {
        /// The task: `SIC`, `SOD` or `FLOE`.
        task: &'static str,
        /// What was wrong with it.
        #[source]
        source: Box<MetricsError>,
    },
}

fn check_length(truth: &[u8], pred: &[u8]) -> Result<(), MetricsError> {
    if truth.len() == pred.len() {
        Ok(())
    } else {
        Err(MetricsError::Length {
            truth: truth.len(),
            pred: pred.len(),
        })
    }
}

/// A confusion matrix `counts[true][pred]` of one task, with one extra "none" column.
///
/// The none column counts pixels whose truth is a class but whose prediction is not: [`IGNORE`]
/// (the model gave no prediction) or any other value ≥ `classes`. In scikit-learn such a value is
/// a label with no support: it has weight 0 in the weighted F1 but is a miss (a false negative)
/// for the true class, which is exactly what the none column does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confusion {
    classes: usize,
    /// Row-major, `classes` rows × `classes + 1` columns.
    counts: Vec<u64>,
}

impl Confusion {
    /// An empty matrix for `classes` classes (labels `0..classes`).
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * (classes + 1)],
        }
    }

    /// Number of classes (rows; the columns are one more).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Counts in row-major order: `classes` rows (true class) × `classes + 1` columns (predicted
    /// class, then none).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Pixels of true class `truth` predicted as `pred`; `pred == classes` is the none column.
    /// Zero outside the matrix.
    pub fn count(&self, truth: usize, pred: usize) -> u64 {
        if truth < self.classes && pred <= self.classes {
            self.counts[truth * (self.classes + 1) + pred]
        } else {
            0
        }
    }

    /// Pixels whose truth is `class` (its support); zero for a class outside the matrix.
    pub fn support(&self, class: usize) -> u64 {
        self.row(class).iter().sum()
    }

    /// Pixels predicted as `class` whose truth is a class; `class == classes` gives the none
    /// column. Zero outside the matrix.
    pub fn predicted(&self, class: usize) -> u64 {
        if class > self.classes {
            return 0;
        }
        (0..self.classes).map(|t| self.count(t, class)).sum()
    }

    /// All scored pixels (truth not [`IGNORE`]).
    pub fn pixels(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn row(&self, class: usize) -> &[u64] {
        let cols = self.classes + 1;
        self.counts
            .get(class * cols..(class + 1) * cols)
            .unwrap_or(&[])
    }

    /// Checks a chart without counting it.
    fn check(&self, truth: &[u8], pred: &[u8]) -> Result<(), MetricsError> {
        check_length(truth, pred)?;
        match truth
            .iter()
            .position(|&t| t != IGNORE && usize::from(t) >= self.classes)
        {
            None => Ok(()),
            Some(pixel) => Err(MetricsError::TruthValue {
                value: truth[pixel],
                pixel,
                classes: self.classes,
            }),
        }
    }

    /// Counts a checked chart.
    fn count_checked(&mut self, truth: &[u8], pred: &[u8]) {
        let classes = self.classes;
        let cols = classes + 1;
        for (&t, &p) in truth.iter().zip(pred) {
            if t == IGNORE {
                continue;
            }
            let col = usize::from(p).min(classes);
            // `check` proved t < classes, so the index is in bounds.
            if let Some(c) = self.counts.get_mut(usize::from(t) * cols + col) {
                *c += 1;
            }
        }
    }

    /// Counts one chart: `truth` and `pred` hold the same pixels in the same order.
    ///
    /// Pixels whose truth is [`IGNORE`] are skipped, whatever their prediction. A prediction that
    /// is not a class goes to the none column.
    ///
    /// # Errors
    /// [`MetricsError::Length`] when the slices differ in length and [`MetricsError::TruthValue`]
    /// for a truth value that is neither a class nor [`IGNORE`]; nothing is counted then.
    pub fn add(&mut self, truth: &[u8], pred: &[u8]) -> Result<(), MetricsError> {
        self.check(truth, pred)?;
        self.count_checked(truth, pred);
        Ok(())
    }

    /// Adds the counts of `other` (e.g. another worker's scenes).
    ///
    /// # Errors
    /// [`MetricsError::Classes`] when the matrices have different class counts.
    pub fn merge(&mut self, other: &Confusion) -> Result<(), MetricsError> {
        if other.classes != self.classes {
            return Err(MetricsError::Classes {
                left: self.classes,
                right: other.classes,
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    /// F1 of each class, as scikit-learn's `f1_score(average=None, zero_division=0)`:
    /// 2·TP / (support + predicted), 0 when the class is neither true nor predicted.
    pub fn f1_per_class(&self) -> Vec<f64> {
        (0..self.classes)
            .map(|c| {
                let denom = self.support(c) + self.predicted(c);
                if denom == 0 {
                    0.0
                } else {
                    2.0 * self.count(c, c) as f64 / denom as f64
                }
            })
            .collect()
    }

    /// Support-weighted F1, as scikit-learn's
    /// `f1_score(y_true, y_pred, average="weighted", zero_division=0)`.
    ///
    /// Classes that are only predicted (and the none column) have weight 0; a class that is true
    /// but never predicted scores 0. NaN when no pixel was scored (scikit-learn raises there).
    pub fn f1_weighted(&self) -> f64 {
        let total = self.pixels();
        if total == 0 {
            return f64::NAN;
        }
        let weighted: f64 = self
            .f1_per_class()
            .iter()
            .enumerate()
            .map(|(c, f1)| self.support(c) as f64 * f1)
            .sum();
        weighted / total as f64
    }

    /// The matrix as CSV: a header `true\pred,0,1,…,none`, then one row per true class, led by
    /// the class.
    pub fn to_csv(&self) -> String {
        let mut csv = String::from("true\\pred");
        for c in 0..self.classes {
            csv.push_str(&format!(",{c}"));
        }
        csv.push_str(",none\n");
        for t in 0..self.classes {
            csv.push_str(&t.to_string());
            for n in self.row(t) {
                csv.push_str(&format!(",{n}"));
            }
            csv.push('\n');
        }
        csv
    }
}

/// Accumulated R² of class indices, as scikit-learn's `r2_score(y_true, y_pred)`.
///
/// The sums are exact integers (n, Σy, Σy², Σ(y−ŷ)²), so adding scenes in any order or merging
/// accumulators gives the same value, and the textbook Σy² − (Σy)²/n loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct R2 {
    n: u64,
    sum: u64,
    sum_sq: u64,
    sum_sq_err: u64,
}

impl R2 {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scored pixels (truth not [`IGNORE`]).
    pub fn pixels(&self) -> u64 {
        self.n
    }

    /// Counts a chart without checking it.
    fn count_checked(&mut self, truth: &[u8], pred: &[u8]) {
        // Per-chart sums fit u64 for any chart of under 2^47 pixels (255² per pixel at most).
        let (mut n, mut sum, mut sum_sq, mut sum_sq_err) = (0u64, 0u64, 0u64, 0u64);
        for (&t, &p) in truth.iter().zip(pred) {
            if t == IGNORE {
                continue;
            }
            let (y, e) = (u64::from(t), u64::from(t.abs_diff(p)));
            n += 1;
            sum += y;
            sum_sq += y * y;
            sum_sq_err += e * e;
        }
        self.n += n;
        self.sum += sum;
        self.sum_sq += sum_sq;
        self.sum_sq_err += sum_sq_err;
    }

    /// Counts one chart: `truth` and `pred` hold the same pixels in the same order.
    ///
    /// Pixels whose truth is [`IGNORE`] are skipped. Values are taken as numbers, as
    /// scikit-learn does: a prediction of [`IGNORE`] where the truth is valid counts as 255 and
    /// makes R² collapse, so predict every pixel (the SIC [`Confusion`] shows such pixels in its
    /// none column).
    ///
    /// # Errors
    /// [`MetricsError::Length`] when the slices differ in length; nothing is counted then.
    pub fn add(&mut self, truth: &[u8], pred: &[u8]) -> Result<(), MetricsError> {
        check_length(truth, pred)?;
        self.count_checked(truth, pred);
        Ok(())
    }

    /// Adds the sums of `other`.
    pub fn merge(&mut self, other: &R2) {
        self.n += other.n;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.sum_sq_err += other.sum_sq_err;
    }

    /// 1 − SS_res / SS_tot with scikit-learn's edge cases: NaN for fewer than two pixels; for a
    /// constant truth (SS_tot = 0), 1.0 when every prediction is right and 0.0 otherwise.
    pub fn value(&self) -> f64 {
        if self.n < 2 {
            return f64::NAN;
        }
        // n·SS_tot = n·Σy² − (Σy)², exactly, so R² = 1 − n·SS_res / (n·SS_tot).
        let n = u128::from(self.n);
        // Never negative (Cauchy–Schwarz); saturating only so that no input can panic.
        let n_ss_tot = (n * u128::from(self.sum_sq)).saturating_sub(u128::from(self.sum).pow(2));
        let n_ss_res = n * u128::from(self.sum_sq_err);
        match (n_ss_tot, n_ss_res) {
            (0, 0) => 1.0,
            (0, _) => 0.0,
            _ => 1.0 - n_ss_res as f64 / n_ss_tot as f64,
        }
    }
}

/// A score for people to read: `decimals` places, or `-` for a task that has none (NaN: not
/// trained, or no labelled pixel).
pub fn score_text(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// The combined AutoICE score: (2·R²(SIC) + 2·F1(SOD) + F1(FLOE)) / 5 × 100.
pub fn combined(sic_r2: f64, sod_f1: f64, floe_f1: f64) -> f64 {
    (2.0 * sic_r2 + 2.0 * sod_f1 + floe_f1) / 5.0 * 100.0
}

/// The scores of an [`Evaluation`], ready for `metrics.json`. A score with no pixels is NaN,
/// which serde_json writes as `null`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    /// R² of the SIC class indices.
    pub sic_r2: f64,
    /// Support-weighted F1 of SOD.
    pub sod_f1: f64,
    /// Support-weighted F1 of FLOE.
    pub floe_f1: f64,
    /// [`combined`] of the three, × 100.
    pub combined: f64,
    /// Scored pixels per task (SIC, SOD, FLOE).
    pub pixels: [u64; 3],
}

/// The AutoICE evaluation of any number of scenes: add each scene's charts, then take
/// [`Evaluation::scores`] once.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// SIC R².
    pub sic: R2,
    /// SIC confusion matrix (not scored; for reports).
    pub sic_confusion: Confusion,
    /// SOD confusion matrix.
    pub sod: Confusion,
    /// FLOE confusion matrix.
    pub floe: Confusion,
}

impl Default for Evaluation {
    fn default() -> Self {
        Self::new()
    }
}

impl Evaluation {
    /// An empty evaluation.
    pub fn new() -> Self {
        Self {
            sic: R2::new(),
            sic_confusion: Confusion::new(Task::Sic.n_classes()),
            sod: Confusion::new(Task::Sod.n_classes()),
            floe: Confusion::new(Task::Floe.n_classes()),
        }
    }

    fn confusions(&self) -> [&Confusion; 3] {
        [&self.sic_confusion, &self.sod, &self.floe]
    }

    /// Counts one scene: `truth` and `pred` are its SIC, SOD and FLOE charts (label-channel
    /// order), each truth with the same pixels as its prediction. Each chart is masked by its
    /// own truth's [`IGNORE`].
    ///
    /// # Errors
    /// [`MetricsError::Task`] naming the first chart that is wrong (see [`Confusion::add`]);
    /// all charts are checked before any is counted, so nothing is counted then.
    pub fn add(&mut self, truth: [&[u8]; 3], pred: [&[u8]; 3]) -> Result<(), MetricsError> {
        for (i, confusion) in self.confusions().into_iter().enumerate() {
            confusion
                .check(truth[i], pred[i])
                .map_err(|e| MetricsError::Task {
                    task: Task::ALL[i].name(),
                    source: Box::new(e),
                })?;
        }
        self.sic.count_checked(truth[0], pred[0]);
        self.sic_confusion.count_checked(truth[0], pred[0]);
        self.sod.count_checked(truth[1], pred[1]);
        self.floe.count_checked(truth[2], pred[2]);
        Ok(())
    }

    /// Adds everything counted by `other` (another worker's or another scene's evaluation).
    ///
    /// # Errors
    /// None for evaluations made by [`Evaluation::new`]; [`MetricsError::Task`] wrapping
    /// [`MetricsError::Classes`] if a public matrix was replaced by one of another size.
    pub fn merge(&mut self, other: &Evaluation) -> Result<(), MetricsError> {
        for (i, (mine, theirs)) in self
            .confusions()
            .into_iter()
            .zip(other.confusions())
            .enumerate()
        {
            if mine.classes != theirs.classes {
                return Err(MetricsError::Task {
                    task: Task::ALL[i].name(),
                    source: Box::new(MetricsError::Classes {
                        left: mine.classes,
                        right: theirs.classes,
                    }),
                });
            }
        }
        self.sic.merge(&other.sic);
        self.sic_confusion.merge(&other.sic_confusion)?;
        self.sod.merge(&other.sod)?;
        self.floe.merge(&other.floe)?;
        Ok(())
    }

    /// The scores of everything counted so far (pixels pooled over all scenes).
    pub fn scores(&self) -> Scores {
        let (sic_r2, sod_f1, floe_f1) = (
            self.sic.value(),
            self.sod.f1_weighted(),
            self.floe.f1_weighted(),
        );
        Scores {
            sic_r2,
            sod_f1,
            floe_f1,
            combined: combined(sic_r2, sod_f1, floe_f1),
            pixels: [self.sic.pixels(), self.sod.pixels(), self.floe.pixels()],
        }
    }
}

#[cfg(test)]
mod tests;
