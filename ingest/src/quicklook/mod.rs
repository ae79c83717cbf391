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
    let header = format!("{scene_id}  {level}  {width}x{height} px, stride {stride}");
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A `height × width` scene: HH ramps left to right across its grey range, HV top to bottom,
    /// a diagonal pattern of NaN; each label plane cycles through all classes and 255.
    fn synthetic(height: usize, width: usize) -> SceneRaster {
        let mut raster = SceneRaster::empty(width);
        raster.height = height;
        for (y, x) in (0..height).flat_map(|y| (0..width).map(move |x| (y, x))) {
            let hh = -32.0 + 34.0 * x as f32 / width as f32;
            let hh = if (x + y) % 17 == 0 { f32::NAN } else { hh };
            let hv = -36.0 + 28.0 * y as f32 / height as f32;
            for (plane, db) in raster.sar.iter_mut().zip([hh, hv]) {
                plane.push(db);
            }
            for task in Task::ALL {
                let n = task.n_classes();
                let v = (x / 4 + 3 * (y / 5) + task.channel()) % (n + 1);
                raster.labels[task.channel()].push(if v == n { IGNORE } else { v as u8 });
            }
        }
        raster
    }

    #[test]
    fn class_colours_are_distinct_per_task_and_grey_for_ignore() {
        for task in Task::ALL {
            let classes = (0..task.n_classes() as u8).chain([IGNORE]);
            let colours: Vec<_> = classes.map(|k| class_colour(task, k)).collect();
            for (i, a) in colours.iter().enumerate() {
                assert!(!colours[i + 1..].contains(a), "{} class {i}", task.name());
            }
            assert_eq!(class_colour(task, IGNORE), [64, 64, 64]);
            assert_eq!(class_colour(task, task.n_classes() as u8), IGNORE_COLOUR);
        }
        // Open water is the same dark blue in every task; SIC 100 % is white.
        assert_eq!(class_colour(Task::Sod, 0), class_colour(Task::Sic, 0));
        assert_eq!(class_colour(Task::Floe, 0), class_colour(Task::Sic, 0));
        assert_eq!(class_colour(Task::Sic, 10), WHITE);
    }

    #[test]
    fn db_to_grey_maps_endpoints_clamps_and_blacks_out_nan() {
        let (lo, hi) = HH_DB_RANGE;
        let grey = |db| db_to_grey(db, lo, hi);
        assert_eq!(
            [-30.0, 0.0, -15.0, -45.0, 12.0].map(grey),
            [0, 255, 128, 0, 255]
        );
        let odd = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        assert_eq!(odd.map(grey), [255, 0, 0]);
        let (lo, hi) = HV_DB_RANGE;
        let grey = |db| db_to_grey(db, lo, hi);
        assert_eq!([-35.0, -10.0, -22.5].map(grey), [0, 255, 128]);
    }

    #[test]
    fn stride_and_read_bands_follow_max_width_and_shard_rows() {
        let cases = [(50, 20), (600, 600), (601, 600), (0, 600), (10, 0)];
        assert_eq!(cases.map(|(w, m)| stride_for(w, m)), [3, 1, 2, 1, 10]);
        assert_eq!(QuicklookOptions::default().max_width, DEFAULT_MAX_WIDTH);
        let bands: Vec<_> = read_bands(40, 16, 3).collect();
        assert_eq!(bands, [0..16, 18..32, 33..40]);
        // A band holding no sampled row (8..10 with stride 6) is not read.
        let bands: Vec<_> = read_bands(10, 4, 6).collect();
        assert_eq!(bands, [0..4, 6..8]);
        assert_eq!(read_bands(0, 4, 1).count(), 0);
        assert!(SceneRaster::from_planes(2, 2, vec![0.0; 7], vec![0; 12]).is_err());
    }

    #[test]
    fn render_draws_sampled_pixels_titles_and_legends_where_the_layout_says() {
        let (full, width, stride) = (synthetic(40, 50), 50, 3);
        let header = "S1A_TEST_scene  200m";
        let canvas = render(header, &full.subsample(stride));
        let layout = Layout::new(17, 14, header);
        assert_eq!((canvas.width, canvas.height), (layout.width, layout.height));
        assert_eq!(canvas.rgb.len(), 3 * layout.width * layout.height);
        let ((hh_lo, hh_hi), (hv_lo, hv_hi)) = (HH_DB_RANGE, HV_DB_RANGE);
        for (py, px) in (0..14).flat_map(|y| (0..17).map(move |x| (y, x))) {
            let (i, y) = (py * stride * width + px * stride, layout.panel_y + py);
            let hh = db_to_grey(full.sar[0][i], hh_lo, hh_hi);
            let hv = db_to_grey(full.sar[1][i], hv_lo, hv_hi);
            assert_eq!(canvas.get(layout.column_x[0] + px, y), [hh; 3]);
            assert_eq!(canvas.get(layout.column_x[1] + px, y), [hv; 3]);
            for task in Task::ALL {
                let c = task.channel();
                let want = class_colour(task, full.labels[c][i]);
                let at = (layout.column_x[2 + c] + px, y);
                assert_eq!(canvas.get(at.0, at.1), want, "{} {at:?}", task.name());
            }
        }
        for &x in &layout.column_x {
            assert_eq!(canvas.get(x - 1, layout.panel_y - 1), FRAME_COLOUR);
            assert_eq!(canvas.get(x + 17, layout.panel_y + 14), FRAME_COLOUR);
            assert!((0..TEXT_HEIGHT).any(|dy| canvas.get(x, layout.title_y + dy) == BLACK));
        }
        for task in Task::ALL {
            let x = layout.column_x[2 + task.channel()];
            let entries = legend_entries(task);
            assert_eq!(entries.len(), task.n_classes() + 1);
            assert_eq!(entries.last().unwrap(), &(IGNORE, "255 ignore".to_string()));
            for (row, (class, _)) in entries.iter().enumerate() {
                let (y, centre) = (layout.legend_y + row * LEGEND_ROW, SWATCH / 2);
                assert_eq!(canvas.get(x, y), BLACK);
                assert_eq!(
                    canvas.get(x + centre, y + centre),
                    class_colour(task, *class)
                );
            }
        }
        // The header's 'S' starts its left column in its second row; the bottom margin is blank.
        assert_eq!(canvas.get(MARGIN, MARGIN + TEXT_SCALE - 1), WHITE);
        assert_eq!(canvas.get(MARGIN, MARGIN + TEXT_SCALE), BLACK);
        assert!((0..canvas.width).all(|x| canvas.get(x, canvas.height - 1) == WHITE));
    }

    /// Write `raster` as scene `s1` at `level` into a new store of 16-pixel patches.
    fn write_store(path: &Path, raster: &SceneRaster, level: Level) {
        use zarrs::array::ArraySubset;
        let codec = icefm_schemas::store::Codec::Zstd { level: 1 };
        let store = Store::open_or_create(path, crate::store::new_attrs(&[level], 16, codec));
        let (store, node) = (store.unwrap(), format!("/{SCENES_GROUP}/s1/{level}"));
        let (h, w) = (raster.height, raster.width);
        let new = |name: &str, channels: &[&str], float| {
            let node = format!("{node}/{name}");
            store.create_level_array(&node, "channel", channels, h, w, float, Default::default())
        };
        let all = |c| ArraySubset::new_with_ranges(&[0..c, 0..h as u64, 0..w as u64]);
        let sar = new("sar", &["HH", "HV"], true).unwrap();
        sar.store_array_subset(&all(2), &raster.sar.concat()[..])
            .unwrap();
        let labels = new("labels", &["SIC", "SOD", "FLOE"], false).unwrap();
        labels
            .store_array_subset(&all(3), &raster.labels.concat()[..])
            .unwrap();
    }

    #[test]
    fn write_quicklook_reads_bands_of_the_store_and_writes_the_rendered_png() {
        let dir = tempfile::tempdir().unwrap();
        let (store, out) = (dir.path().join("store"), dir.path().join("quicklook.png"));
        let (full, level) = (synthetic(40, 50), Level::new(200).unwrap());
        write_store(&store, &full, level);
        // Stride 3 over bands of 16 rows: the reads start at rows 0, 18 and 33.
        let options = QuicklookOptions { max_width: 20 };
        let size = write_quicklook(&store, "s1", level, &out, &options).unwrap();
        let want = render("s1  200m  50x40 px, stride 3", &full.subsample(3));
        assert_eq!(size, (want.width, want.height));
        let file = std::io::BufReader::new(std::fs::File::open(&out).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width as usize, info.height as usize), size);
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &want.rgb[..]);
        let run =
            |store: &Path, scene, out: &Path| write_quicklook(store, scene, level, out, &options);
        let no_scene = run(&store, "nope", &out);
        assert!(
            matches!(no_scene, Err(StoreError::Zarr { .. })),
            "{no_scene:?}"
        );
        let no_store = run(dir.path(), "s1", &out);
        assert!(
            matches!(no_store, Err(StoreError::Incompatible { .. })),
            "{no_store:?}"
        );
        let no_dir = run(&store, "s1", &dir.path().join("no/such/dir/q.png"));
        assert!(matches!(no_dir, Err(StoreError::Io { .. })), "{no_dir:?}");
    }

    /// `raster`'s labels with every class moved to the next (the last to 0) and 255 to 0.
    fn shifted_labels(raster: &SceneRaster) -> [Vec<u8>; 3] {
        Task::ALL.map(|task| {
            let n = task.n_classes();
            let next = |v: &u8| match usize::from(*v) {
                v if v < n => ((v + 1) % n) as u8,
                _ => 0,
            };
            raster.labels[task.channel()].iter().map(next).collect()
        })
    }

    #[test]
    fn eval_panel_draws_truth_and_pred_pairs_with_one_legend_per_chart() {
        let (full, width, stride) = (synthetic(40, 50), 50, 3);
        let pred = shifted_labels(&full);
        let planes = EvalPlanes {
            height: 40,
            width,
            sar: [&full.sar[0], &full.sar[1]],
            truth: full.labels.each_ref().map(Vec::as_slice),
            pred: pred.each_ref().map(Vec::as_slice),
        };
        assert_eq!(planes.validate(), Ok(()));
        let header = "S1A_TEST_scene  80m  eval";
        let canvas = render_eval(header, &planes, stride);
        let layout = Layout::eval(17, 14, header);
        assert_eq!((canvas.width, canvas.height), (layout.width, layout.height));
        // Equal columns; pairs PAIR_GAP apart, everything else COLUMN_GAP.
        let x = &layout.column_x;
        let column_width = x[1] - x[0] - COLUMN_GAP;
        let gaps: Vec<_> = x.windows(2).map(|p| p[1] - p[0] - column_width).collect();
        let (g, p) = (COLUMN_GAP, PAIR_GAP);
        assert_eq!(gaps, [g, g, p, g, p, g, p]);
        assert_eq!(layout.width, x[7] + column_width + MARGIN);
        let ((hh_lo, hh_hi), (hv_lo, hv_hi)) = (HH_DB_RANGE, HV_DB_RANGE);
        for (py, px) in (0..14).flat_map(|y| (0..17).map(move |x| (y, x))) {
            let (i, y) = (py * stride * width + px * stride, layout.panel_y + py);
            let hh = db_to_grey(full.sar[0][i], hh_lo, hh_hi);
            let hv = db_to_grey(full.sar[1][i], hv_lo, hv_hi);
            assert_eq!(canvas.get(x[0] + px, y), [hh; 3]);
            assert_eq!(canvas.get(x[1] + px, y), [hv; 3]);
            for task in Task::ALL {
                let c = task.channel();
                let truth = class_colour(task, full.labels[c][i]);
                let predicted = class_colour(task, pred[c][i]);
                assert_eq!(canvas.get(x[2 + 2 * c] + px, y), truth, "{}", task.name());
                assert_eq!(
                    canvas.get(x[3 + 2 * c] + px, y),
                    predicted,
                    "{}",
                    task.name()
                );
            }
        }
        for &x in x {
            assert_eq!(canvas.get(x - 1, layout.panel_y - 1), FRAME_COLOUR);
            assert_eq!(canvas.get(x + 17, layout.panel_y + 14), FRAME_COLOUR);
            assert!((0..TEXT_HEIGHT).any(|dy| canvas.get(x, layout.title_y + dy) == BLACK));
        }
        for task in Task::ALL {
            let (truth_x, pred_x) = (x[2 + 2 * task.channel()], x[3 + 2 * task.channel()]);
            let entries = eval_legend_entries(task);
            assert_eq!(entries.last().unwrap().1, "255 ignore / none");
            // The legend stays under its pair; none is drawn under the prediction column.
            assert!(truth_x + legend_width(&entries) <= pred_x + column_width);
            for (row, (class, _)) in entries.iter().enumerate() {
                let (y, centre) = (layout.legend_y + row * LEGEND_ROW, SWATCH / 2);
                assert_eq!(canvas.get(truth_x, y), BLACK);
                let colour = class_colour(task, *class);
                assert_eq!(canvas.get(truth_x + centre, y + centre), colour);
                assert_eq!(canvas.get(pred_x + column_width - 1, y + centre), WHITE);
            }
        }
        assert!((0..canvas.width).all(|x| canvas.get(x, canvas.height - 1) == WHITE));
    }

    #[test]
    fn eval_planes_of_the_wrong_length_are_named() {
        let (sar, labels, short) = (vec![0.0; 6], vec![0; 6], vec![0; 5]);
        let planes = EvalPlanes {
            height: 2,
            width: 3,
            sar: [&sar, &sar],
            truth: [&labels, &labels, &labels],
            pred: [&labels, &labels, &short],
        };
        let err = planes.validate().unwrap_err();
        assert_eq!(err, "plane `FLOE pred` has 5 values, expected 2 x 3 = 6");
        let planes = EvalPlanes {
            sar: [&sar, &sar[..4]],
            ..planes
        };
        assert!(planes.validate().unwrap_err().contains("`HV (dB)` has 4"));
    }
}
