//! The confusion matrix of one chart as a PNG: cells shaded by their share of the truth row.

use std::path::Path;

use icefm_schemas::Task;

use super::{COLUMN_GAP, invalid_input};
use crate::canvas::{
    BLACK, Canvas, GRID_COLOUR, LINE_HEIGHT, MARGIN, TEXT_SCALE, WHITE, text_width, write_png,
};
use crate::error::StoreError;

/// Confusion-matrix colour of a cell holding its whole row (the ramp starts at white).
pub const CONFUSION_DARKEST: [u8; 3] = [8, 48, 107];
/// Confusion-matrix colour of the cells of a row without support (no pixel of that class).
pub const NO_SUPPORT_COLOUR: [u8; 3] = [176, 176, 176];

/// Render the confusion matrix of `task` into the PNG file `out`. `counts` is row-major
/// `[true class][predicted column]`, `classes` rows of `columns` counts; `columns` is `classes`
/// or `classes + 1`, the last then counting pixels without a prediction ("none"). Each row is
/// normalised by its support: cells run from white (0 %) to [`CONFUSION_DARKEST`] (100 %) and
/// show their percentage of the row; rows without support are [`NO_SUPPORT_COLOUR`]. The support
/// of each row is written beside it, the class names in a key. Returns (image width, image
/// height).
///
/// Counts of another shape are an [`StoreError::Io`] of kind `InvalidInput`; nothing is
/// written then.
pub fn write_confusion_png(
    out: &Path,
    task: Task,
    counts: &[u64],
    classes: usize,
    columns: usize,
) -> Result<(usize, usize), StoreError> {
    let extra = columns.checked_sub(classes);
    if !matches!(extra, Some(0 | 1)) || classes.checked_mul(columns) != Some(counts.len()) {
        return Err(invalid_input(
            out,
            format!(
                "{} confusion: {} counts for {classes} classes x {columns} columns \
                 (columns must be classes or classes + 1)",
                task.name(),
                counts.len()
            ),
        ));
    }
    let canvas = render_confusion(task, counts, classes, columns);
    write_png(out, &canvas)?;
    Ok((canvas.width, canvas.height))
}

/// Confusion-matrix colour of a cell holding `share` (0–1, clamped) of its row: linear from
/// white to [`CONFUSION_DARKEST`].
pub fn confusion_colour(share: f64) -> [u8; 3] {
    let t = if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    };
    CONFUSION_DARKEST.map(|c| (255.0 - t * (255.0 - f64::from(c))).round() as u8)
}

/// Side of a confusion cell, grid line included: room for "100" or "none" and a border.
const CELL: usize = 48;

/// `n` in at most 4 characters: 999, 1.2k, 12k, 123k, 1.2M, …
fn compact_count(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    let mut value = n as f64;
    for unit in ["k", "M", "G", "T", "P", "E"] {
        value /= 1000.0;
        // Rounding may carry into the next unit (999.6k is 1.0M).
        if value < 9.95 {
            return format!("{value:.1}{unit}");
        }
        if value < 999.5 {
            return format!("{value:.0}{unit}");
        }
    }
    format!("{value:.0}E")
}

/// Text of a confusion cell holding `count` of a row's `support` pixels: the rounded
/// percentage, "<1" and ">99" where rounding would hide that the share is not 0 or all.
fn percent_label(count: u64, support: u64) -> String {
    if count == 0 || support == 0 {
        return String::new();
    }
    let percent = 100.0 * count as f64 / support as f64;
    match percent {
        p if p < 0.5 => "<1".into(),
        p if p >= 99.5 && count < support => ">99".into(),
        p => format!("{p:.0}"),
    }
}

/// Where everything of a confusion matrix of `classes` rows and `columns` columns goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConfusionLayout {
    /// "prediction", centred over the matrix.
    axis_title_y: usize,
    /// Column labels (predicted class, "none", "support").
    column_label_y: usize,
    /// "truth", written downwards left of the row labels.
    truth_x: usize,
    truth_y: usize,
    /// Right edge of the row labels (true class).
    row_label_right: usize,
    /// Top-left corner of the matrix: the grid line above and left of cell (0, 0).
    matrix_x: usize,
    matrix_y: usize,
    support_x: usize,
    key_x: usize,
    width: usize,
    height: usize,
}

impl ConfusionLayout {
    const SUPPORT: &str = "support";
    const NONE: &str = "none";

    fn new(title: &str, classes: usize, columns: usize, key: &[String]) -> Self {
        let axis_title_y = MARGIN + LINE_HEIGHT + 12;
        let column_label_y = axis_title_y + LINE_HEIGHT;
        let matrix_y = column_label_y + LINE_HEIGHT;
        let truth_x = MARGIN;
        let row_label_width = text_width(&classes.saturating_sub(1).to_string());
        let row_label_right = truth_x + 5 * TEXT_SCALE + 12 + row_label_width;
        let matrix_x = row_label_right + 8;
        let matrix_height = classes * CELL + 1;
        let truth_height = "truth".len() * LINE_HEIGHT;
        let truth_y = matrix_y + matrix_height.saturating_sub(truth_height) / 2;
        let support_x = matrix_x + columns * CELL + 1 + 12;
        let key_x = support_x + text_width(Self::SUPPORT) + COLUMN_GAP;
        let key_width = key.iter().map(|k| text_width(k)).max().unwrap_or(0);
        let width = (key_x + key_width + MARGIN).max(2 * MARGIN + text_width(title));
        let bottom = (matrix_y + matrix_height)
            .max(truth_y + truth_height)
            .max(matrix_y + key.len() * LINE_HEIGHT);
        Self {
            axis_title_y,
            column_label_y,
            truth_x,
            truth_y,
            row_label_right,
            matrix_x,
            matrix_y,
            support_x,
            key_x,
            width,
            height: bottom + MARGIN,
        }
    }

    /// Top-left pixel of cell (row, column), inside the grid lines; cells are `CELL - 1` wide.
    fn cell(&self, row: usize, column: usize) -> (usize, usize) {
        (
            self.matrix_x + column * CELL + 1,
            self.matrix_y + row * CELL + 1,
        )
    }
}

/// The title line and the class key of a confusion matrix.
fn confusion_text(
    task: Task,
    counts: &[u64],
    classes: usize,
    columns: usize,
) -> (String, Vec<String>) {
    let total: u64 = counts.iter().sum();
    let title = format!(
        "{} confusion: % of each truth row, {} px",
        task.name(),
        compact_count(total)
    );
    let names = task.class_names();
    let mut key: Vec<String> = (0..classes)
        .map(|k| format!("{k} {}", names.get(k).copied().unwrap_or("")))
        .collect();
    if columns > classes {
        key.push(format!("{}: no prediction", ConfusionLayout::NONE));
    }
    (title, key)
}

/// Draw the confusion matrix of `task` (see [`write_confusion_png`]; the shape is checked).
fn render_confusion(task: Task, counts: &[u64], classes: usize, columns: usize) -> Canvas {
    let (title, key) = confusion_text(task, counts, classes, columns);
    let layout = ConfusionLayout::new(&title, classes, columns, &key);
    let mut canvas = Canvas::new(layout.width, layout.height, WHITE);
    canvas.text(MARGIN, MARGIN, &title, BLACK);
    let prediction = "prediction";
    let matrix_width = columns * CELL + 1;
    let x = layout.matrix_x + matrix_width.saturating_sub(text_width(prediction)) / 2;
    canvas.text(x, layout.axis_title_y, prediction, BLACK);
    canvas.text_down(layout.truth_x, layout.truth_y, "truth", BLACK);
    let inside = CELL - 1;
    let centred = |text: &str| inside.saturating_sub(text_width(text)) / 2;
    let middle = inside.saturating_sub(7 * TEXT_SCALE) / 2;
    for column in 0..columns {
        let label = if column < classes {
            column.to_string()
        } else {
            ConfusionLayout::NONE.to_string()
        };
        let (x, _) = layout.cell(0, column);
        canvas.text(x + centred(&label), layout.column_label_y, &label, BLACK);
    }
    canvas.text(
        layout.support_x,
        layout.column_label_y,
        ConfusionLayout::SUPPORT,
        BLACK,
    );
    canvas.fill_rect(
        layout.matrix_x,
        layout.matrix_y,
        matrix_width,
        classes * CELL + 1,
        GRID_COLOUR,
    );
    for (row, counts) in counts.chunks_exact(columns.max(1)).enumerate() {
        let support: u64 = counts.iter().sum();
        let (_, y) = layout.cell(row, 0);
        let label = row.to_string();
        let x = layout.row_label_right.saturating_sub(text_width(&label));
        canvas.text(x, y + middle, &label, BLACK);
        canvas.text(layout.support_x, y + middle, &compact_count(support), BLACK);
        for (column, &count) in counts.iter().enumerate() {
            let (x, y) = layout.cell(row, column);
            if support == 0 {
                canvas.fill_rect(x, y, inside, inside, NO_SUPPORT_COLOUR);
                continue;
            }
            let share = count as f64 / support as f64;
            canvas.fill_rect(x, y, inside, inside, confusion_colour(share));
            let text = percent_label(count, support);
            if text_width(&text) + 4 <= inside {
                let ink = if share > 0.5 { WHITE } else { BLACK };
                canvas.text(x + centred(&text), y + middle, &text, ink);
            }
        }
    }
    for (line, text) in key.iter().enumerate() {
        let y = layout.matrix_y + line * LINE_HEIGHT;
        canvas.text(layout.key_x, y, text, BLACK);
    }
    canvas
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::canvas::TEXT_HEIGHT;

    #[test]
    fn confusion_cells_shade_by_row_share_and_rows_without_support_are_grey() {
        // SOD-like, 3 classes and "none": row 0 all right, row 1 empty, row 2 split 1:2:0:1.
        let counts = [10, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 1];
        let canvas = render_confusion(Task::Sod, &counts, 3, 4);
        let (title, key) = confusion_text(Task::Sod, &counts, 3, 4);
        assert_eq!(title, "SOD confusion: % of each truth row, 14 px");
        assert_eq!(
            key,
            [
                "0 open water",
                "1 new ice",
                "2 young ice",
                "none: no prediction"
            ]
        );
        let layout = ConfusionLayout::new(&title, 3, 4, &key);
        assert_eq!((canvas.width, canvas.height), (layout.width, layout.height));
        let cell = |row, column| {
            let (x, y) = layout.cell(row, column);
            let pixels = (y..y + CELL - 1).flat_map(|y| (x..x + CELL - 1).map(move |x| (x, y)));
            pixels.map(|(x, y)| canvas.get(x, y)).collect::<Vec<_>>()
        };
        // A cell is its share's colour at the corner, with text only where the count is not 0.
        let share = [[1.0, 0.0, 0.0, 0.0], [0.0; 4], [0.25, 0.5, 0.0, 0.25]];
        for (row, shares) in share.iter().enumerate() {
            for (column, &s) in shares.iter().enumerate() {
                let pixels = cell(row, column);
                let fill = match row {
                    1 => NO_SUPPORT_COLOUR,
                    _ => confusion_colour(s),
                };
                assert_eq!(pixels[0], fill, "cell ({row}, {column})");
                let ink = if s > 0.5 { WHITE } else { BLACK };
                let inked = pixels.iter().filter(|&&p| p == ink).count();
                assert_eq!(
                    inked > 0,
                    s > 0.0,
                    "cell ({row}, {column}): {inked} px of text"
                );
                assert!(pixels.iter().all(|&p| p == fill || p == ink));
            }
        }
        assert_eq!(cell(0, 0)[0], CONFUSION_DARKEST);
        // Grid lines around and between cells.
        assert_eq!(canvas.get(layout.matrix_x, layout.matrix_y), GRID_COLOUR);
        let (x, y) = layout.cell(2, 3);
        assert_eq!(canvas.get(x - 1, y + 5), GRID_COLOUR);
        assert_eq!(canvas.get(x + CELL - 1, y + CELL - 1), GRID_COLOUR);
        // "truth" runs down the left; row labels, "none" and "support" are drawn.
        let inked = |xs: Range<usize>, ys: Range<usize>| {
            ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
                .any(|(x, y)| canvas.get(x, y) == BLACK)
        };
        let (tx, ty) = (layout.truth_x, layout.truth_y);
        assert!(inked(tx..tx + 10, ty..ty + TEXT_HEIGHT));
        assert!(inked(
            tx..tx + 10,
            ty + 4 * LINE_HEIGHT..ty + 5 * LINE_HEIGHT
        ));
        let label_y = layout.column_label_y..layout.column_label_y + TEXT_HEIGHT;
        let none_x = layout.cell(0, 3).0;
        assert!(inked(none_x..none_x + CELL - 1, label_y.clone()));
        assert!(inked(layout.support_x..layout.key_x, label_y));
        assert!(inked(
            layout.matrix_x - 20..layout.matrix_x,
            y..y + CELL - 1
        ));
    }

    #[test]
    fn confusion_colours_labels_and_counts_round_as_documented() {
        assert_eq!(confusion_colour(0.0), WHITE);
        assert_eq!(confusion_colour(1.0), CONFUSION_DARKEST);
        assert_eq!(confusion_colour(f64::NAN), WHITE);
        assert_eq!(confusion_colour(2.0), CONFUSION_DARKEST);
        assert_eq!(confusion_colour(0.5), [132, 152, 181]);
        let labels = [
            (0, 10),
            (1, 1000),
            (1, 3),
            (2, 3),
            (999, 1000),
            (1000, 1000),
            (1, 0),
        ];
        let labels = labels.map(|(c, s)| percent_label(c, s));
        assert_eq!(labels, ["", "<1", "33", "67", ">99", "100", ""]);
        let counts = [
            0,
            999,
            1000,
            1_234,
            9_960,
            123_456,
            999_600,
            13_100_000_000,
            u64::MAX,
        ];
        let counts = counts.map(compact_count);
        let want = [
            "0", "999", "1.0k", "1.2k", "10k", "123k", "1.0M", "13G", "18E",
        ];
        assert_eq!(counts, want);
    }
}
