//! What a reader hands out: the scene's facts read once at open (`SceneInfo`, tie points, the
//! 2 km grids) and its bands of decoded rows.

use std::path::PathBuf;

use icefm_schemas::sigrid::PolygonCode;

use crate::geo::Geolocation;

/// Which release a file belongs to, detected from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Raw 40 m scene: polygon chart + SIGRID-3 codes (or no chart, as in the raw test files).
    Raw,
    /// Ready-to-train 80 m scene: SIC/SOD/FLOE rasters, standard-scaled inputs.
    Rtt,
}

impl InputKind {
    /// `raw` or `rtt`.
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Raw => "raw",
            InputKind::Rtt => "rtt",
        }
    }
}

/// Tie-point grid of a raw scene (incidence angle at pixel rows/cols).
#[derive(Debug, Clone)]
pub struct TiePoints {
    /// Distinct tie-point rows (ascending).
    pub lines: Vec<f64>,
    /// Distinct tie-point columns (ascending).
    pub samples: Vec<f64>,
    /// Incidence angle, `[lines.len() * samples.len()]` row-major.
    pub incidence: Vec<f64>,
    /// Latitude and longitude at the same points; `Ok(None)` where the file has none, an
    /// error where they cannot be used (why).
    pub geolocation: Result<Option<Geolocation>, String>,
}

impl TiePoints {
    /// Bilinear incidence angle at a native pixel position (row, col), clamped to the grid.
    pub fn incidence_at(&self, row: f64, col: f64) -> f64 {
        self.interpolate(self.row_bracket(row), self.col_bracket(col))
    }

    /// Tie-point row interval and fraction of a native row position.
    pub fn row_bracket(&self, row: f64) -> (usize, f64) {
        bracket(&self.lines, row)
    }

    /// Tie-point column interval and fraction of a native column position.
    pub fn col_bracket(&self, col: f64) -> (usize, f64) {
        bracket(&self.samples, col)
    }

    /// Bilinear interpolation between brackets (precompute them to interpolate whole rows fast).
    pub fn interpolate(&self, (i, fy): (usize, f64), (j, fx): (usize, f64)) -> f64 {
        let n = self.samples.len();
        let v = |a: usize, b: usize| self.incidence[a * n + b];
        let top = v(i, j) * (1.0 - fx) + v(i, j + 1) * fx;
        let bot = v(i + 1, j) * (1.0 - fx) + v(i + 1, j + 1) * fx;
        top * (1.0 - fy) + bot * fy
    }
}

fn bracket(axis: &[f64], x: f64) -> (usize, f64) {
    let last = axis.len() - 2;
    let i = axis
        .partition_point(|&a| a <= x)
        .saturating_sub(1)
        .min(last);
    let span = axis[i + 1] - axis[i];
    let f = if span > 0.0 {
        ((x - axis[i]) / span).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (i, f)
}

/// AMSR2 / ERA5 variables on the 2 km grid, in raw units, NaN for missing.
#[derive(Debug, Clone, Default)]
pub struct Grid2km {
    /// Variable names, in channel order.
    pub variables: Vec<String>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `[variables, height, width]`.
    pub data: Vec<f32>,
    /// Native pixels per 2 km cell edge (50 raw, 25 RTT).
    pub native_pixels_per_cell: usize,
}

/// Everything about a scene that is read once, before its bands.
#[derive(Debug, Clone)]
pub struct SceneInfo {
    /// Input file.
    pub path: PathBuf,
    /// `<YYYYMMDDTHHMMSS>_<service>`, or the file stem if no name parses.
    pub scene_id: String,
    /// `dmi` / `cis`.
    pub service: Option<String>,
    /// Acquisition start, µs since the epoch (UTC).
    pub acquired_us: Option<i64>,
    /// `S1A` / `S1B`.
    pub satellite: Option<String>,
    /// Release kind.
    pub kind: InputKind,
    /// SAR-grid rows.
    pub height: usize,
    /// SAR-grid columns.
    pub width: usize,
    /// Ground spacing of the SAR grid in metres (40 raw, 80 RTT).
    pub native_spacing_m: f64,
    /// SIGRID-3 code rows (raw scenes with a chart).
    pub polygons: Vec<PolygonCode>,
    /// Whether the scene carries a chart at all.
    pub has_chart: bool,
    /// The reference file its charts were read from (an RTT test scene).
    pub reference: Option<PathBuf>,
    /// Tie points (raw).
    pub tie_points: Option<TiePoints>,
    /// Latitude and longitude: a raw file's at its tie points, a ready-to-train file's grid of
    /// them without positions. `Ok(None)` where the file has none; an error says why they
    /// cannot be used (ingest goes on without them, and warns).
    pub geolocation: Result<Option<Geolocation>, String>,
    /// The 2 km grids.
    pub grid2km: Grid2km,
    /// Rows per band that match the file's chunking.
    pub band_rows: usize,
}

/// One band of rows, decoded.
#[derive(Debug, Clone)]
pub struct Band {
    /// First row.
    pub row0: usize,
    /// Number of rows.
    pub rows: usize,
    /// HH in dB, NaN invalid.
    pub hh: Vec<f32>,
    /// HV in dB, NaN invalid.
    pub hv: Vec<f32>,
    /// Distance-to-land zone (0 = land), NaN invalid.
    pub distance: Vec<f32>,
    /// Incidence angle in degrees (RTT: full-resolution variable; raw: `None`, from tie points).
    pub incidence: Option<Vec<f32>>,
    /// Labels of the band.
    pub labels: BandLabels,
}

/// Label information of a band.
#[derive(Debug, Clone)]
pub enum BandLabels {
    /// Raw: polygon id per pixel (NaN = no polygon).
    PolygonIds(Vec<f64>),
    /// RTT: SIC, SOD, FLOE rasters (255 = ignore).
    Charts([Vec<u8>; 3]),
    /// No chart in the file.
    None,
}
