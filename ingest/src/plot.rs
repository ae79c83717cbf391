//! Line plots as PNG: values against a share, one line per series, drawn with the quicklook's
//! bitmap font (no plotting dependency). `icefm ablate` draws the combined score against the
//! labelled fraction with it, scratch against pre-trained.
//!
//! ```no_run
//! use icefm_ingest::plot::{Dash, LinePlot, Marker, Scale, Series, write_line_plot};
//! let plot = LinePlot {
//!     title: "combined score vs labelled fraction".into(),
//!     x_label: "labelled scenes (%)".into(),
//!     y_label: "combined score".into(),
//!     x_scale: Scale::Log,
//!     x_ticks: vec![],
//!     series: vec![Series {
//!         label: "MAE".into(),
//!         colour: [0, 114, 178],
//!         dash: Dash::Solid,
//!         marker: Marker::Disc,
//!         points: vec![(1.0, 40.0), (10.0, 70.0)],
//!     }],
//! };
//! let (w, h) = write_line_plot(std::path::Path::new("plot.png"), &plot).unwrap();
//! assert_eq!((w, h), (icefm_ingest::plot::PLOT_WIDTH, icefm_ingest::plot::PLOT_HEIGHT));
//! ```

use std::path::Path;

use crate::canvas::{
    ADVANCE, BLACK, Canvas, FRAME_COLOUR, GRID_COLOUR, LEGEND_ROW, LINE_HEIGHT, MARGIN,
    TEXT_HEIGHT, WHITE, text_width, write_png,
};
use crate::error::StoreError;

/// Width of every plot, pixels.
pub const PLOT_WIDTH: usize = 1000;
/// Height of every plot, pixels.
pub const PLOT_HEIGHT: usize = 600;
/// Room on the right for the legend.
const LEGEND_WIDTH: usize = 380;
/// Length of the line sample in front of a legend label.
const LEGEND_SAMPLE: usize = 36;
/// Length of a tick mark.
const TICK: usize = 5;
/// Half the side of a point marker.
const MARKER_RADIUS: i64 = 5;
/// Lines are this many pixels thick.
const PEN: usize = 2;
/// Target number of y ticks (the step is rounded to 1, 2 or 5 × 10^k).
const Y_TICKS: f64 = 6.0;

/// How the x axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Evenly spaced values.
    Linear,
    /// Evenly spaced decades (values must be positive; others are left out).
    Log,
}

impl Scale {
    /// Log when the values are positive and span more than 10×, else linear.
    pub fn auto(values: &[f64]) -> Self {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if lo > 0.0 && hi / lo > 10.0 {
            Self::Log
        } else {
            Self::Linear
        }
    }
}

/// Shape drawn at each point of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Filled circle.
    Disc,
    /// Filled square.
    Square,
    /// Filled diamond.
    Diamond,
    /// Filled triangle, point up.
    Triangle,
    /// Nothing: a bare line (curves of many points).
    None,
}

impl Marker {
    /// The markers in the order series take them.
    pub const ALL: [Marker; 4] = [Self::Disc, Self::Square, Self::Diamond, Self::Triangle];

    /// Whether the offset (dx, dy) from the centre is inside the marker.
    fn covers(self, dx: i64, dy: i64) -> bool {
        let r = MARKER_RADIUS;
        match self {
            Self::Disc => dx * dx + dy * dy <= r * r,
            Self::Square => dx.abs() < r && dy.abs() < r,
            Self::Diamond => dx.abs() + dy.abs() <= r,
            // Apex at -r, base at r - 1; half-width grows by one every two rows.
            Self::Triangle => (-r..r).contains(&dy) && 2 * dx.abs() <= dy + r,
            Self::None => false,
        }
    }
}

/// Colour of runs fine-tuned from scratch, in every plot (Okabe–Ito vermillion).
pub const SCRATCH_COLOUR: [u8; 3] = [213, 94, 0];
/// Colour of runs fine-tuned from an MAE encoder, in every plot (Okabe–Ito blue).
pub const MAE_COLOUR: [u8; 3] = [0, 114, 178];

/// Line pattern of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dash {
    /// Unbroken.
    Solid,
    /// Long dashes.
    Dashed,
    /// Dots.
    Dotted,
}

impl Dash {
    /// The patterns in the order series take them.
    pub const ALL: [Dash; 3] = [Self::Solid, Self::Dashed, Self::Dotted];

    /// Whether the pen is down `at` pixels along a line.
    fn on(self, at: usize) -> bool {
        match self {
            Self::Solid => true,
            Self::Dashed => at % 16 < 10,
            Self::Dotted => at % 7 < 3,
        }
    }
}

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// RGB colour of the line, markers and legend sample.
    pub colour: [u8; 3],
    /// Line pattern.
    pub dash: Dash,
    /// Point marker.
    pub marker: Marker,
    /// (x, y) points, joined in x order; a point with a non-finite value breaks the line.
    pub points: Vec<(f64, f64)>,
}

/// A line plot of one or more series.
#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    /// Title, centred at the top.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label above the y axis.
    pub y_label: String,
    /// X mapping.
    pub x_scale: Scale,
    /// X tick values; empty: the distinct x values of the points.
    pub x_ticks: Vec<f64>,
    /// The lines, drawn in order (the last on top).
    pub series: Vec<Series>,
}

/// A tick label: integers without decimals, others with up to three significant decimals.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if (v - v.round()).abs() < 1e-9 * v.abs().max(1.0) {
        return format!("{}", v.round() as i64);
    }
    let decimals = (3 - v.abs().log10().floor() as i64 - 1).clamp(1, 6) as usize;
    let s = format!("{v:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A tick step of 1, 2 or 5 × 10^k near `span / Y_TICKS`.
fn nice_step(span: f64) -> f64 {
    let raw = (span / Y_TICKS).max(f64::MIN_POSITIVE);
    let decade = 10f64.powf(raw.log10().floor());
    let m = raw / decade;
    decade
        * if m <= 1.0 {
            1.0
        } else if m <= 2.0 {
            2.0
        } else if m <= 5.0 {
            5.0
        } else {
            10.0
        }
}

/// Ticks at multiples of a step of 1, 2 or 5 × 10^k, about six between `lo` and `hi`
/// (for an x axis of many values, such as training steps).
pub fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi < lo {
        return Vec::new();
    }
    if hi - lo <= 1e-9 * hi.abs().max(1.0) {
        return vec![lo];
    }
    let step = nice_step(hi - lo);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// The y axis: its range and ticks, covering every finite y (0–100 with none).
fn y_axis(values: &[f64]) -> (f64, f64, Vec<f64>) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = match (lo.is_finite(), hi.is_finite()) {
        (true, true) if hi - lo > 1e-9 * hi.abs().max(1.0) => (lo, hi),
        (true, true) => (lo - 1.0, hi + 1.0),
        _ => (0.0, 100.0),
    };
    let step = nice_step(hi - lo);
    let (a, b) = ((lo / step).floor() as i64, (hi / step).ceil() as i64);
    let ticks: Vec<f64> = (a..=b).map(|k| k as f64 * step).collect();
    (a as f64 * step, b as f64 * step, ticks)
}

/// The x axis in mapped units (log10 for [`Scale::Log`]): the range, padded so that points
/// stay off the frame.
fn x_range(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let pad = if hi - lo > 1e-12 {
        0.06 * (hi - lo)
    } else {
        0.1 * hi.abs().max(1.0)
    };
    (lo - pad, hi + pad)
}

/// Where the plot area is.
struct Frame {
    left: usize,
    right: usize,
    top: usize,
    bottom: usize,
}

impl Frame {
    fn px(&self, t: f64) -> f64 {
        self.left as f64 + t * (self.right - self.left) as f64
    }

    fn py(&self, t: f64) -> f64 {
        self.bottom as f64 - t * (self.bottom - self.top) as f64
    }
}

/// Draw a `PEN`-thick line from (x0, y0) to (x1, y1) with `dash`, `at` pixels into the
/// pattern; returns the pattern position at its end.
#[allow(clippy::too_many_arguments)]
fn line(
    canvas: &mut Canvas,
    (x0, y0): (f64, f64),
    (x1, y1): (f64, f64),
    colour: [u8; 3],
    dash: Dash,
    at: usize,
    clip: &Frame,
) -> usize {
    let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        if dash.on(at + i) && x >= clip.left as f64 && y <= clip.bottom as f64 {
            let (x, y) = (x.round() as usize, y.round() as usize);
            if x < clip.right && y >= clip.top {
                canvas.fill_rect(x, y, PEN, PEN, colour);
            }
        }
    }
    at + steps
}

fn marker(canvas: &mut Canvas, (x, y): (f64, f64), m: Marker, colour: [u8; 3]) {
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    let r = MARKER_RADIUS + 1;
    for dy in -r..=r {
        for dx in -r..=r {
            let (px, py) = (cx + dx, cy + dy);
            if px < 0 || py < 0 {
                continue;
            }
            // A white rim keeps markers of crossing lines apart.
            let colour = if m.covers(dx, dy) {
                colour
            } else if m.covers(dx.signum() * (dx.abs() - 1), dy.signum() * (dy.abs() - 1)) {
                WHITE
            } else {
                continue;
            };
            canvas.set(px as usize, py as usize, colour);
        }
    }
}

/// `text` cut to `width` pixels ("..": cut).
fn fit(text: &str, width: usize) -> String {
    if text_width(text) <= width {
        return text.to_string();
    }
    let keep = (width / ADVANCE).saturating_sub(2);
    let mut s: String = text.chars().take(keep).collect();
    s.push_str("..");
    s
}

/// `text` in at most two lines of `width` px, broken between words; what the second cannot
/// hold is cut with `..`.
fn wrap2(text: &str, width: usize) -> Vec<String> {
    if text_width(text) <= width {
        return vec![text.to_string()];
    }
    let words: Vec<&str> = text.split(' ').collect();
    let mut first = String::new();
    let mut taken = 0;
    for w in &words {
        let next = if first.is_empty() {
            (*w).to_string()
        } else {
            format!("{first} {w}")
        };
        if text_width(&next) > width {
            break;
        }
        first = next;
        taken += 1;
    }
    if taken == 0 {
        return vec![fit(text, width)];
    }
    vec![first, fit(&words[taken..].join(" "), width)]
}

/// Draw `plot` on a [`PLOT_WIDTH`] × [`PLOT_HEIGHT`] canvas.
pub(crate) fn render(plot: &LinePlot) -> Canvas {
    let mut canvas = Canvas::new(PLOT_WIDTH, PLOT_HEIGHT, WHITE);
    let log = plot.x_scale == Scale::Log;
    let map_x = |x: f64| if log { x.log10() } else { x };
    let usable = |x: f64| x.is_finite() && (!log || x > 0.0);
    let xs: Vec<f64> = plot
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|&x| usable(x))
        .collect();
    let ys: Vec<f64> = plot
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| usable(p.0) && p.1.is_finite())
        .map(|p| p.1)
        .collect();
    let (y_lo, y_hi, y_ticks) = y_axis(&ys);
    let (x_lo, x_hi) = x_range(&xs.iter().map(|&x| map_x(x)).collect::<Vec<_>>());
    let y_labels: Vec<String> = y_ticks.iter().map(|&v| tick_label(v)).collect();
    let label_w = y_labels.iter().map(|l| text_width(l)).max().unwrap_or(0);

    // Title, then the y label above the axis; the x label and tick labels below.
    let title = wrap2(&plot.title, PLOT_WIDTH - 2 * MARGIN);
    for (i, line) in title.iter().enumerate() {
        let x = (PLOT_WIDTH - text_width(line)) / 2;
        canvas.text(x, MARGIN + i * LINE_HEIGHT, line, BLACK);
    }
    let frame = Frame {
        left: MARGIN + label_w + TICK + 6,
        right: PLOT_WIDTH - LEGEND_WIDTH - MARGIN,
        top: MARGIN + (1 + title.len()) * LINE_HEIGHT + 24,
        bottom: PLOT_HEIGHT - MARGIN - 2 * LINE_HEIGHT - TICK - 10,
    };
    let y_label = fit(&plot.y_label, PLOT_WIDTH - LEGEND_WIDTH - 2 * MARGIN);
    canvas.text(MARGIN, frame.top - LINE_HEIGHT - 6, &y_label, BLACK);
    let x_label = fit(&plot.x_label, frame.right - frame.left);
    let x_label_x = frame.left + (frame.right - frame.left - text_width(&x_label)) / 2;
    canvas.text(
        x_label_x,
        PLOT_HEIGHT - MARGIN - TEXT_HEIGHT,
        &x_label,
        BLACK,
    );

    let to_px = |x: f64| frame.px((map_x(x) - x_lo) / (x_hi - x_lo));
    let to_py = |y: f64| frame.py((y - y_lo) / (y_hi - y_lo));
    let (w, h) = (frame.right - frame.left, frame.bottom - frame.top);

    // Grid and ticks: y.
    for (v, label) in y_ticks.iter().zip(&y_labels) {
        let y = to_py(*v).round() as usize;
        canvas.fill_rect(frame.left, y, w, 1, GRID_COLOUR);
        canvas.fill_rect(frame.left - TICK, y, TICK, 1, BLACK);
        let lx = frame.left - TICK - 4 - text_width(label);
        canvas.text(lx, y.saturating_sub(TEXT_HEIGHT / 2 - 1), label, BLACK);
    }
    // Grid and ticks: x, leaving out labels that would overlap the one before.
    let mut x_ticks: Vec<f64> = if plot.x_ticks.is_empty() {
        xs.clone()
    } else {
        plot.x_ticks
            .iter()
            .copied()
            .filter(|&x| usable(x))
            .collect()
    };
    x_ticks.sort_by(f64::total_cmp);
    x_ticks.dedup_by(|a, b| (*a - *b).abs() <= 1e-12 * a.abs().max(1.0));
    let mut free_from = 0usize;
    for v in x_ticks {
        let x = to_px(v);
        if !(frame.left as f64..=frame.right as f64).contains(&x) {
            continue;
        }
        let x = x.round() as usize;
        canvas.fill_rect(x, frame.top, 1, h, GRID_COLOUR);
        canvas.fill_rect(x, frame.bottom, 1, TICK, BLACK);
        let label = tick_label(v);
        let lx = x.saturating_sub(text_width(&label) / 2);
        if lx >= free_from {
            canvas.text(lx, frame.bottom + TICK + 4, &label, BLACK);
            free_from = lx + text_width(&label) + ADVANCE;
        }
    }
    // Frame: the axes in black, the other two sides grey.
    canvas.fill_rect(frame.left, frame.top, w, 1, FRAME_COLOUR);
    canvas.fill_rect(frame.right, frame.top, 1, h + 1, FRAME_COLOUR);
    canvas.fill_rect(frame.left, frame.bottom, w + 1, 1, BLACK);
    canvas.fill_rect(frame.left, frame.top, 1, h + 1, BLACK);

    for s in &plot.series {
        let mut points: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|p| usable(p.0)).collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut at = 0;
        for pair in points.windows(2) {
            if let [a, b] = pair
                && a.1.is_finite()
                && b.1.is_finite()
            {
                let (pa, pb) = ((to_px(a.0), to_py(a.1)), (to_px(b.0), to_py(b.1)));
                at = line(&mut canvas, pa, pb, s.colour, s.dash, at, &frame);
            }
        }
        for p in points.iter().filter(|p| p.1.is_finite()) {
            marker(&mut canvas, (to_px(p.0), to_py(p.1)), s.marker, s.colour);
        }
    }

    // Legend: a line sample with its marker, then the label.
    let legend_x = frame.right + 24;
    let room = PLOT_WIDTH - MARGIN - legend_x - LEGEND_SAMPLE - 8;
    let all = Frame {
        left: 0,
        right: PLOT_WIDTH,
        top: 0,
        bottom: PLOT_HEIGHT,
    };
    for (row, s) in plot.series.iter().enumerate() {
        let y = frame.top + row * (LEGEND_ROW + 4);
        if y + LINE_HEIGHT > PLOT_HEIGHT - MARGIN {
            break;
        }
        let mid = (y + TEXT_HEIGHT / 2 - 2) as f64;
        let (a, b) = (legend_x as f64, (legend_x + LEGEND_SAMPLE) as f64);
        line(&mut canvas, (a, mid), (b, mid), s.colour, s.dash, 0, &all);
        marker(&mut canvas, ((a + b) / 2.0, mid), s.marker, s.colour);
        let label = fit(&s.label, room);
        canvas.text(legend_x + LEGEND_SAMPLE + 8, y, &label, BLACK);
    }
    canvas
}

/// Draw `plot` and write it as an 8-bit RGB PNG at `path`; returns its (width, height).
pub fn write_line_plot(path: &Path, plot: &LinePlot) -> Result<(usize, usize), StoreError> {
    let canvas = render(plot);
    write_png(path, &canvas)?;
    Ok((canvas.width, canvas.height))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn two_series(scale: Scale) -> LinePlot {
        LinePlot {
            title: "combined score vs labelled fraction".into(),
            x_label: "labelled scenes (%)".into(),
            y_label: "combined score".into(),
            x_scale: scale,
            x_ticks: vec![],
            series: vec![
                Series {
                    label: "scratch".into(),
                    colour: [213, 94, 0],
                    dash: Dash::Dashed,
                    marker: Marker::Square,
                    points: vec![(1.0, 10.0), (10.0, 30.0), (100.0, 50.0)],
                },
                Series {
                    label: "MAE".into(),
                    colour: [0, 114, 178],
                    dash: Dash::Solid,
                    marker: Marker::Disc,
                    points: vec![(100.0, 70.0), (1.0, 40.0), (10.0, f64::NAN)],
                },
            ],
        }
    }

    #[test]
    fn scale_is_log_only_for_positive_values_spanning_more_than_ten_times() {
        assert_eq!(Scale::auto(&[1.0, 5.0, 10.0]), Scale::Linear);
        assert_eq!(Scale::auto(&[1.0, 5.0, 20.0]), Scale::Log);
        assert_eq!(Scale::auto(&[0.0, 50.0]), Scale::Linear);
        assert_eq!(Scale::auto(&[f64::NAN, 2.0, 40.0]), Scale::Log);
        assert_eq!(Scale::auto(&[]), Scale::Linear);
    }

    #[test]
    fn long_titles_take_two_lines_broken_between_words() {
        let width = 40 * ADVANCE;
        assert_eq!(wrap2("short title", width), ["short title"]);
        let long = "ablate_tiny: combined score vs labelled fraction (3-task, 80m, test regime \
                    challenge_test)";
        let lines = wrap2(long, width);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| text_width(l) <= width), "{lines:?}");
        assert_eq!(lines[0], "ablate_tiny: combined score vs labelled");
        assert!(
            lines[1].starts_with("fraction (3-task, 80m") && lines[1].ends_with(".."),
            "{lines:?}"
        );
        // Nothing is lost when two lines hold it.
        let two = "ablate_tiny: combined score vs labelled fraction (3-task)";
        assert_eq!(wrap2(two, width).join(" "), two);
        // A first word wider than the line is cut.
        assert_eq!(wrap2(&"x".repeat(60), width).len(), 1);
    }

    #[test]
    fn ticks_are_round_and_cover_the_values() {
        assert_eq!(nice_step(60.0), 10.0);
        assert_eq!(nice_step(9.0), 2.0);
        assert_eq!(nice_step(0.3), 0.05);
        let (lo, hi, ticks) = y_axis(&[12.0, 47.0]);
        assert_eq!((lo, hi), (10.0, 50.0));
        assert_eq!(ticks, vec![10.0, 20.0, 30.0, 40.0, 50.0]);
        let (lo, hi, _) = y_axis(&[]);
        assert_eq!((lo, hi), (0.0, 100.0));
        let (lo, hi, _) = y_axis(&[5.0]);
        assert!(lo <= 4.0 && hi >= 6.0, "{lo} {hi}");
        assert_eq!(tick_label(20.0), "20");
        assert_eq!(tick_label(-150.0), "-150");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.05), "0.05");
        assert_eq!(tick_label(0.0), "0");
    }

    #[test]
    fn points_land_where_the_axes_say_in_their_series_colour() {
        for scale in [Scale::Linear, Scale::Log] {
            let plot = two_series(scale);
            let c = render(&plot);
            assert_eq!((c.width, c.height), (PLOT_WIDTH, PLOT_HEIGHT));
            let count = |colour: [u8; 3]| {
                (0..c.height)
                    .flat_map(|y| (0..c.width).map(move |x| (x, y)))
                    .filter(|&(x, y)| c.get(x, y) == colour)
                    .count()
            };
            // Both colours are drawn, and the title is dark text in the top rows.
            assert!(count([213, 94, 0]) > 100 && count([0, 114, 178]) > 100);
            let dark_in_title = (MARGIN..MARGIN + TEXT_HEIGHT)
                .flat_map(|y| (0..c.width).map(move |x| (x, y)))
                .filter(|&(x, y)| c.get(x, y) == BLACK)
                .count();
            assert!(dark_in_title > 100, "{dark_in_title}");
            // Points sit at their mapped places (markers on top of the grid); the MAE line
            // breaks at its NaN point, so nothing joins its points at x = 1 and x = 100.
            let ys = [10.0, 30.0, 50.0, 70.0, 40.0];
            let (y_lo, y_hi, _) = y_axis(&ys);
            let map = |x: f64| if scale == Scale::Log { x.log10() } else { x };
            let (x_lo, x_hi) = x_range(&[map(1.0), map(10.0), map(100.0)]);
            let left = MARGIN + text_width(&tick_label(y_lo)).max(text_width(&tick_label(y_hi)));
            let left = left + TICK + 6;
            let right = PLOT_WIDTH - LEGEND_WIDTH - MARGIN;
            let top = MARGIN + 2 * LINE_HEIGHT + 24;
            let bottom = PLOT_HEIGHT - MARGIN - 2 * LINE_HEIGHT - TICK - 10;
            let px = |x: f64| left as f64 + (map(x) - x_lo) / (x_hi - x_lo) * (right - left) as f64;
            let py = |y: f64| bottom as f64 - (y - y_lo) / (y_hi - y_lo) * (bottom - top) as f64;
            let at = |x: f64, y: f64| c.get(px(x).round() as usize, py(y).round() as usize);
            assert_eq!(at(1.0, 40.0), [0, 114, 178], "{scale:?}");
            assert_eq!(at(100.0, 70.0), [0, 114, 178], "{scale:?}");
            assert_eq!(at(10.0, 30.0), [213, 94, 0], "{scale:?}");
            // On a log axis x = 10 is halfway: a line from (1, 40) to (100, 70) would pass here.
            assert_ne!(at(10.0, 55.0), [0, 114, 178], "{scale:?}");
        }
    }

    #[test]
    fn long_labels_are_cut_to_fit() {
        let s = fit(&"x".repeat(100), 120);
        assert!(text_width(&s) <= 120 && s.ends_with(".."), "{s}");
        assert_eq!(fit("short", 120), "short");
    }

    #[test]
    fn nice_ticks_fall_on_round_steps() {
        assert_eq!(
            nice_ticks(1.0, 1000.0),
            [200.0, 400.0, 600.0, 800.0, 1000.0]
        );
        assert_eq!(nice_ticks(0.0, 3.0), [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
        assert_eq!(nice_ticks(5.0, 5.0), [5.0]);
        assert!(nice_ticks(2.0, 1.0).is_empty());
        assert!(nice_ticks(f64::NAN, 1.0).is_empty());
    }

    #[test]
    fn markers_have_their_shapes() {
        assert!(Marker::Disc.covers(0, 5) && !Marker::Disc.covers(4, 4));
        assert!(Marker::Square.covers(4, 4) && !Marker::Square.covers(5, 0));
        assert!(Marker::Diamond.covers(0, 5) && !Marker::Diamond.covers(3, 3));
        assert!(Marker::Triangle.covers(0, -5) && !Marker::Triangle.covers(2, -5));
        assert!(Marker::Triangle.covers(4, 4));
        assert!(!Marker::None.covers(0, 0));
    }
}
