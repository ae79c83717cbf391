//! PNG renderings of scenes and evaluations: the quicklook of one stored scene (HH, HV, SIC, SOD
//! and FLOE side by side), the evaluation panel of one scene (HH, HV, then truth and prediction of
//! each chart) and the confusion matrix of one chart. Panels have titles, label panels a legend,
//! under a header line.
//!
//! The machines that run icefm have no fonts, so text is drawn with an embedded 5×7 bitmap font
//! (printable ASCII, with descenders) at twice its size.

mod confusion;

use std::ops::Range;
use std::path::Path;

use icefm_schemas::store::SCENES_GROUP;
use icefm_schemas::{IGNORE, Level, Task};

use crate::error::StoreError;
use crate::store::{Store, array_shape, read_f32, read_u8};

use crate::canvas::{
    BLACK, Canvas, FRAME_COLOUR, LEGEND_ROW, LINE_HEIGHT, MARGIN, TEXT_HEIGHT, TEXT_SCALE, WHITE,
    text_width, write_png,
};
pub use confusion::{CONFUSION_DARKEST, NO_SUPPORT_COLOUR, confusion_colour, write_confusion_png};

/// Default [`QuicklookOptions::max_width`], pixels.
pub const DEFAULT_MAX_WIDTH: usize = 600;
/// HH grey scale: dB drawn black and white.
pub const HH_DB_RANGE: (f32, f32) = (-30.0, 0.0);
/// HV grey scale: dB drawn black and white (HV is ~10 dB darker than HH over ice).
pub const HV_DB_RANGE: (f32, f32) = (-35.0, -10.0);

/// Options of a quicklook or an evaluation panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicklookOptions {
    /// Greatest width of one panel, pixels: the level is subsampled (nearest, every `stride`-th
    /// pixel) with the smallest whole stride that makes a panel at most this wide.
    pub max_width: usize,
}

impl Default for QuicklookOptions {
    fn default() -> Self {
        Self {
            max_width: DEFAULT_MAX_WIDTH,
        }
    }
}

/// Render the quicklook of `scene_id` at `level` from the store at `store` into the PNG file
/// `out`. Returns (image width, image height).
pub fn write_quicklook(
    store: &Path,
    scene_id: &str,
    level: Level,
    out: &Path,
    options: &QuicklookOptions,
) -> Result<(usize, usize), StoreError> {
    let opened = Store::open(store)?;
    let level_node = format!("/{SCENES_GROUP}/{scene_id}/{}", level.name());
    let sar_node = format!("{level_node}/sar");
    let labels_node = format!("{level_node}/labels");
    let sar_shape = array_shape(store, &sar_node)?;
    let labels_shape = array_shape(store, &labels_node)?;
    let (height, width) = match (sar_shape.as_slice(), labels_shape.as_slice()) {
        ([2, h, w], [3, lh, lw]) if (h, w) == (lh, lw) => (*h, *w),
        _ => {
            return Err(StoreError::Incompatible {
                path: store.join(level_node.trim_start_matches('/')),
                reason: format!(
                    "expected sar [2, H, W] and labels [3, H, W], found {sar_shape:?} and {labels_shape:?}"
                ),
            });
        }
    };
    let stride = stride_for(width as usize, options.max_width);
    // Read one shard row (patch rows) at a time: memory stays bounded and no shard is decoded
    // twice.
    let band = u64::from(opened.attrs.patch);
    let node_path = store.join(level_node.trim_start_matches('/'));
    let mut raster = SceneRaster::empty((width as usize).div_ceil(stride));
    for rows in read_bands(height, band, stride as u64) {
        let n = (rows.end - rows.start) as usize;
        let sar = read_f32(store, &sar_node, [0..2, rows.clone(), 0..width])?;
        let labels = read_u8(store, &labels_node, [0..3, rows, 0..width])?;
        let rows = SceneRaster::from_planes(n, width as usize, sar, labels)
            .map_err(|reason| StoreError::zarr(&node_path, reason))?;
        raster.append(rows.subsample(stride));
    }
    // Rows x columns, as `inspect` gives scene shapes.
    let header = format!("{scene_id}  {level}  {height} x {width} px, stride {stride}");
    let canvas = render(&header, &raster);
    write_png(out, &canvas)?;
    Ok((canvas.width, canvas.height))
}

/// Render the evaluation panel of one scene into the PNG file `out`: the line `header`, then
/// eight titled panels — HH, HV, and the truth and prediction of SIC, SOD and FLOE — with one
/// legend per chart under its pair. Every plane is `height × width`, row-major, on one grid:
/// HH and HV in dB (NaN where invalid), `truth` and `pred` label planes in chart order (SIC,
/// SOD, FLOE) with [`IGNORE`] for ignored truth or no prediction. Panels are subsampled as in
/// the quicklook ([`QuicklookOptions::max_width`]). Returns (image width, image height).
///
/// A plane of another length is an [`StoreError::Io`] of kind `InvalidInput` naming the plane;
/// nothing is written then.
#[allow(clippy::too_many_arguments)] // one scene's planes, as `icefm eval` holds them
pub fn write_eval_panel(
    out: &Path,
    header: &str,
    height: usize,
    width: usize,
    hh_db: &[f32],
    hv_db: &[f32],
    truth: [&[u8]; 3],
    pred: [&[u8]; 3],
    options: &QuicklookOptions,
) -> Result<(usize, usize), StoreError> {
    let planes = EvalPlanes {
        height,
        width,
        sar: [hh_db, hv_db],
        truth,
        pred,
    };
    planes
        .validate()
        .map_err(|reason| invalid_input(out, reason))?;
    let canvas = render_eval(header, &planes, stride_for(width, options.max_width));
    write_png(out, &canvas)?;
    Ok((canvas.width, canvas.height))
}

/// Colour of a class of a task (RGB); [`IGNORE`] and any value out of the task's range give a
/// neutral dark grey. SIC is a ramp from dark blue (0 %) to white (100 %); SOD and FLOE have
/// qualitative palettes (SOD after the WMO stage colours) sharing the dark blue of open water.
pub fn class_colour(task: Task, class: u8) -> [u8; 3] {
    const OPEN_WATER: [u8; 3] = [16, 40, 120];
    #[rustfmt::skip]
    const SOD: [[u8; 3]; 6] =
        [OPEN_WATER, [240, 150, 230], [150, 60, 220], [70, 190, 60], [240, 220, 40], [150, 80, 30]];
    #[rustfmt::skip]
    const FLOE: [[u8; 3]; 7] = [
        OPEN_WATER, [255, 127, 14], [214, 39, 40], [44, 160, 44], [148, 103, 189], [227, 119, 194],
        [188, 189, 34],
    ];
    let k = usize::from(class);
    if k >= task.n_classes() {
        return IGNORE_COLOUR;
    }
    match task {
        Task::Sic => {
            let t = k as f32 / (task.n_classes() - 1) as f32;
            OPEN_WATER.map(|c| (f32::from(c) + t * (255.0 - f32::from(c))).round() as u8)
        }
        Task::Sod => SOD[k],
        Task::Floe => FLOE[k],
    }
}

/// Map dB to grey: `lo` and below black, `hi` and above white, linear between; NaN → black.
/// Quicklooks use [`HH_DB_RANGE`] for HH and [`HV_DB_RANGE`] for HV.
pub fn db_to_grey(db: f32, lo: f32, hi: f32) -> u8 {
    if db.is_nan() {
        return 0;
    }
    (((db - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Colour of [`IGNORE`] labels.
const IGNORE_COLOUR: [u8; 3] = [64, 64, 64];
const TITLES: [&str; 5] = ["HH (dB)", "HV (dB)", "SIC", "SOD", "FLOE"];
/// Evaluation-panel columns: HH, HV, then truth and prediction of each chart in channel order.
const EVAL_TITLES: [&str; 8] = [
    "HH (dB)",
    "HV (dB)",
    "SIC truth",
    "SIC pred",
    "SOD truth",
    "SOD pred",
    "FLOE truth",
    "FLOE pred",
];

pub(super) const COLUMN_GAP: usize = 24;
/// Between the truth and prediction columns of one chart in the evaluation panel.
const PAIR_GAP: usize = 16;
/// Legend swatches are as tall as capitals.
const SWATCH: usize = 7 * TEXT_SCALE;
const SWATCH_GAP: usize = 8;

/// An `InvalidInput` error about the rendering to `out`.
fn invalid_input(out: &Path, reason: String) -> StoreError {
    StoreError::io(
        out,
        std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
    )
}

/// The panels' inputs: HH and HV in dB and the three label planes (label-channel order), each
/// `height × width`, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
struct SceneRaster {
    height: usize,
    width: usize,
    sar: [Vec<f32>; 2],
    labels: [Vec<u8>; 3],
}

impl SceneRaster {
    /// No rows yet, `width` columns.
    fn empty(width: usize) -> Self {
        Self {
            width,
            ..Self::default()
        }
    }

    /// Split a `sar [2, H, W]` and a `labels [3, H, W]` read into planes.
    fn from_planes(
        height: usize,
        width: usize,
        sar: Vec<f32>,
        labels: Vec<u8>,
    ) -> Result<Self, String> {
        let plane = height * width;
        if sar.len() != 2 * plane || labels.len() != 3 * plane {
            return Err(format!(
                "read {} sar and {} label values for {height} x {width} pixels",
                sar.len(),
                labels.len()
            ));
        }
        fn split<T: Copy, const N: usize>(v: &[T], plane: usize) -> [Vec<T>; N] {
            std::array::from_fn(|c| v[c * plane..(c + 1) * plane].to_vec())
        }
        let (sar, labels) = (split(&sar, plane), split(&labels, plane));
        Ok(Self {
            height,
            width,
            sar,
            labels,
        })
    }

    /// Every `stride`-th row and column, starting with the first.
    fn subsample(&self, stride: usize) -> Self {
        let stride = stride.max(1);
        let mut kept = vec![];
        for y in (0..self.height).step_by(stride) {
            kept.extend((0..self.width).step_by(stride).map(|x| y * self.width + x));
        }
        fn pick<T: Copy>(plane: &[T], kept: &[usize]) -> Vec<T> {
            kept.iter().map(|&i| plane[i]).collect()
        }
        Self {
            height: self.height.div_ceil(stride),
            width: self.width.div_ceil(stride),
            sar: self.sar.each_ref().map(|plane| pick(plane, &kept)),
            labels: self.labels.each_ref().map(|plane| pick(plane, &kept)),
        }
    }

    /// Append the rows of `below` (same width).
    fn append(&mut self, below: Self) {
        self.height += below.height;
        for (plane, more) in self.sar.iter_mut().zip(below.sar) {
            plane.extend(more);
        }
        for (plane, more) in self.labels.iter_mut().zip(below.labels) {
            plane.extend(more);
        }
    }
}

/// The evaluation panel's inputs at full resolution, borrowed: HH and HV in dB, truth and
/// prediction label planes in channel order, each `height × width`, row-major.
#[derive(Debug, Clone, Copy)]
struct EvalPlanes<'a> {
    height: usize,
    width: usize,
    sar: [&'a [f32]; 2],
    truth: [&'a [u8]; 3],
    pred: [&'a [u8]; 3],
}

impl EvalPlanes<'_> {
    /// Check that every plane holds `height × width` values; the error names the first that
    /// does not.
    fn validate(&self) -> Result<(), String> {
        let (h, w) = (self.height, self.width);
        let expected = h
            .checked_mul(w)
            .ok_or_else(|| format!("{h} x {w} pixels overflow"))?;
        let sar = self.sar.iter().map(|p| p.len());
        let labels = self.truth.iter().chain(&self.pred).map(|p| p.len());
        for (title, len) in EVAL_TITLES.iter().zip(sar.chain(labels)) {
            if len != expected {
                return Err(format!(
                    "plane `{title}` has {len} values, expected {h} x {w} = {expected}"
                ));
            }
        }
        Ok(())
    }
}

/// Row ranges to read of a level `height` rows high in bands of `band` rows: each band from its
/// first row that is a multiple of `stride`; bands without such a row are left out.
fn read_bands(height: u64, band: u64, stride: u64) -> impl Iterator<Item = Range<u64>> {
    let band = band.max(1);
    (0..height.div_ceil(band)).filter_map(move |b| {
        let (y0, y1) = (b * band, ((b + 1) * band).min(height));
        let first = y0.div_ceil(stride) * stride;
        (first < y1).then_some(first..y1)
    })
}

/// Smallest stride that makes `width` at most `max_width` (at least 1).
fn stride_for(width: usize, max_width: usize) -> usize {
    width.div_ceil(max_width.max(1)).max(1)
}

/// Legend entries of a task: (class value, "value name"), then the ignore value.
fn legend_entries(task: Task) -> Vec<(u8, String)> {
    legend_entries_with(task, "ignore")
}

/// Legend entries of a task, the ignore value's named `ignore_label`.
fn legend_entries_with(task: Task, ignore_label: &str) -> Vec<(u8, String)> {
    (0u8..)
        .zip(task.class_names())
        .map(|(k, name)| (k, format!("{k} {name}")))
        .chain(std::iter::once((
            IGNORE,
            format!("{IGNORE} {ignore_label}"),
        )))
        .collect()
}

/// Evaluation-panel legend entries: 255 is ignored truth or no prediction.
fn eval_legend_entries(task: Task) -> Vec<(u8, String)> {
    legend_entries_with(task, "ignore / none")
}

/// Width in pixels of the widest legend line of `entries`, swatch included.
fn legend_width(entries: &[(u8, String)]) -> usize {
    entries
        .iter()
        .map(|(_, label)| SWATCH + SWATCH_GAP + text_width(label))
        .max()
        .unwrap_or(0)
}

/// Where everything goes, for columns of `panel_width × panel_height` panels under a header
/// line: titles above the panels, legends below.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    panel_width: usize,
    panel_height: usize,
    /// Left edge of each column's title, panel and legend.
    column_x: Vec<usize>,
    title_y: usize,
    panel_y: usize,
    legend_y: usize,
    width: usize,
    height: usize,
}

impl Layout {
    /// The quicklook's: [`TITLES`], each column as wide as the widest legend.
    fn new(panel_width: usize, panel_height: usize, header: &str) -> Self {
        let legend = Task::ALL
            .iter()
            .map(|&t| legend_width(&legend_entries(t)))
            .max()
            .unwrap_or(0);
        let gaps = [COLUMN_GAP; TITLES.len() - 1];
        Self::columns(panel_width, panel_height, header, &TITLES, legend, &gaps)
    }

    /// The evaluation panel's: [`EVAL_TITLES`], each chart's truth and prediction columns
    /// [`PAIR_GAP`] apart and together as wide as its legend.
    fn eval(panel_width: usize, panel_height: usize, header: &str) -> Self {
        let legend = Task::ALL
            .iter()
            .map(|&t| legend_width(&eval_legend_entries(t)))
            .max()
            .unwrap_or(0);
        let min_width = legend.saturating_sub(PAIR_GAP).div_ceil(2);
        #[rustfmt::skip]
        let gaps = [COLUMN_GAP, COLUMN_GAP, PAIR_GAP, COLUMN_GAP, PAIR_GAP, COLUMN_GAP, PAIR_GAP];
        Self::columns(
            panel_width,
            panel_height,
            header,
            &EVAL_TITLES,
            min_width,
            &gaps,
        )
    }

    /// Columns titled `titles`, all equally wide — at least `min_width`, the panel and every
    /// title — with `gaps[i]` pixels between column `i` and the next.
    fn columns(
        panel_width: usize,
        panel_height: usize,
        header: &str,
        titles: &[&str],
        min_width: usize,
        gaps: &[usize],
    ) -> Self {
        let title_width = titles.iter().map(|t| text_width(t)).max().unwrap_or(0);
        let column_width = panel_width.max(min_width).max(title_width);
        let mut column_x = Vec::with_capacity(titles.len());
        let mut x = MARGIN;
        for i in 0..titles.len() {
            column_x.push(x);
            x += column_width + gaps.get(i).copied().unwrap_or(0);
        }
        let right = column_x.last().map_or(MARGIN, |&x| x + column_width);
        // One legend row per class and one for 255, as many as histogram bins.
        let legend_rows = Task::ALL.map(Task::hist_len).into_iter().max().unwrap_or(0);
        let title_y = MARGIN + LINE_HEIGHT + 12;
        let panel_y = title_y + TEXT_HEIGHT + 6;
        let legend_y = panel_y + panel_height + 12;
        let width = (right + MARGIN).max(2 * MARGIN + text_width(header));
        let height = legend_y + legend_rows * LEGEND_ROW - (LEGEND_ROW - SWATCH) + MARGIN;
        Self {
            panel_width,
            panel_height,
            column_x,
            title_y,
            panel_y,
            legend_y,
            width,
            height,
        }
    }
}

impl Canvas {
    /// Titles above and a 1-pixel frame just outside each panel of `layout`.
    fn titles_and_frames(&mut self, layout: &Layout, titles: &[&str]) {
        for (title, &x) in titles.iter().zip(&layout.column_x) {
            self.text(x, layout.title_y, title, BLACK);
            let (w, h) = (layout.panel_width + 2, layout.panel_height + 2);
            self.fill_rect(x - 1, layout.panel_y - 1, w, h, FRAME_COLOUR);
        }
    }

    /// Fill the panel of `column` of `layout`; `colour(x, y)` is the colour of its pixel (x, y).
    fn panel(&mut self, layout: &Layout, column: usize, colour: impl Fn(usize, usize) -> [u8; 3]) {
        let Some(&x0) = layout.column_x.get(column) else {
            return;
        };
        for y in 0..layout.panel_height {
            for x in 0..layout.panel_width {
                self.set(x0 + x, layout.panel_y + y, colour(x, y));
            }
        }
    }

    /// A legend of `task` with its top-left corner at (x, y): a framed swatch and a label a row.
    fn legend(&mut self, x: usize, y: usize, task: Task, entries: &[(u8, String)]) {
        for (row, (class, label)) in entries.iter().enumerate() {
            let y = y + row * LEGEND_ROW;
            self.fill_rect(x, y, SWATCH, SWATCH, BLACK);
            let colour = class_colour(task, *class);
            self.fill_rect(x + 1, y + 1, SWATCH - 2, SWATCH - 2, colour);
            self.text(x + SWATCH + SWATCH_GAP, y, label, BLACK);
        }
    }
}

/// Draw the quicklook of `raster` (already at panel resolution) under the line `header`.
fn render(header: &str, raster: &SceneRaster) -> Canvas {
    let layout = Layout::new(raster.width, raster.height, header);
    let mut canvas = Canvas::new(layout.width, layout.height, WHITE);
    canvas.text(MARGIN, MARGIN, header, BLACK);
    canvas.titles_and_frames(&layout, &TITLES);
    let at = |x: usize, y: usize| y * raster.width + x;
    let ((hh_lo, hh_hi), (hv_lo, hv_hi)) = (HH_DB_RANGE, HV_DB_RANGE);
    canvas.panel(&layout, 0, |x, y| {
        [db_to_grey(raster.sar[0][at(x, y)], hh_lo, hh_hi); 3]
    });
    canvas.panel(&layout, 1, |x, y| {
        [db_to_grey(raster.sar[1][at(x, y)], hv_lo, hv_hi); 3]
    });
    for task in Task::ALL {
        let c = task.channel();
        canvas.panel(&layout, 2 + c, |x, y| {
            class_colour(task, raster.labels[c][at(x, y)])
        });
        let x = layout.column_x[2 + c];
        canvas.legend(x, layout.legend_y, task, &legend_entries(task));
    }
    canvas
}

/// Draw the evaluation panel of `planes`, every `stride`-th pixel, under the line `header`.
fn render_eval(header: &str, planes: &EvalPlanes<'_>, stride: usize) -> Canvas {
    let stride = stride.max(1);
    let (width, height) = (
        planes.width.div_ceil(stride),
        planes.height.div_ceil(stride),
    );
    let layout = Layout::eval(width, height, header);
    let mut canvas = Canvas::new(layout.width, layout.height, WHITE);
    canvas.text(MARGIN, MARGIN, header, BLACK);
    canvas.titles_and_frames(&layout, &EVAL_TITLES);
    let at = |x: usize, y: usize| y * stride * planes.width + x * stride;
    let ((hh_lo, hh_hi), (hv_lo, hv_hi)) = (HH_DB_RANGE, HV_DB_RANGE);
    canvas.panel(&layout, 0, |x, y| {
        [db_to_grey(planes.sar[0][at(x, y)], hh_lo, hh_hi); 3]
    });
    canvas.panel(&layout, 1, |x, y| {
        [db_to_grey(planes.sar[1][at(x, y)], hv_lo, hv_hi); 3]
    });
    for task in Task::ALL {
        let c = task.channel();
        let (truth, pred) = (planes.truth[c], planes.pred[c]);
        canvas.panel(&layout, 2 + 2 * c, |x, y| {
            class_colour(task, truth[at(x, y)])
        });
        canvas.panel(&layout, 3 + 2 * c, |x, y| {
            class_colour(task, pred[at(x, y)])
        });
        let x = layout.column_x[2 + 2 * c];
        canvas.legend(x, layout.legend_y, task, &eval_legend_entries(task));
    }
    canvas
}

#[cfg(test)]
mod tests;
