//! Reading AI4Arctic NetCDF scenes (raw 40 m and ready-to-train 80 m) in row bands.
//!
//! Every encoding a real file may use is accepted: any storage type (netCDF-C converts), `_FillValue`
//! / `missing_value`, `scale_factor` / `add_offset`, polygon ids as float32-with-NaN or integers with
//! a fill value, `polygon_codes` as variable-length strings or a char array, any chunking.
//! SAR comes out in dB with NaN for invalid, whatever the input (RTT's standard scaling is undone).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use icefm_schemas::norm::{AMSR2_VARIABLES, ERA5_VARIABLES, mean_std};
use icefm_schemas::sigrid::PolygonCode;
use netcdf::types::NcVariableType;
use netcdf::{AttributeValue, Variable};
use rayon::prelude::*;

use crate::error::SceneError;
use crate::names::{parse_scene_name, timestamp_micros};

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

/// Default band height for unchunked (contiguous) variables.
pub const DEFAULT_BAND_ROWS: usize = 512;

/// An open scene file.
pub struct SceneReader {
    /// Variables read as raw HDF5 chunks and inflated off the netCDF thread (declared before
    /// `file` so these handles close first).
    chunked: HashMap<&'static str, icefm_h5chunk::Dataset>,
    /// The HDF5 handle those datasets belong to (none if the file could not be opened so).
    _h5: Option<icefm_h5chunk::File>,
    /// Decoding of each band variable (fill values, packing, RTT scaling), read at open.
    decodes: HashMap<&'static str, Decode>,
    /// Chart fill values other than 255, per chart variable.
    chart_fills: HashMap<&'static str, f64>,
    /// The HDF5 handle of the reference file's chart datasets.
    _h5_reference: Option<icefm_h5chunk::File>,
    /// A test scene's reference file, where its charts are read from.
    reference: Option<netcdf::File>,
    file: netcdf::File,
    info: SceneInfo,
}

/// The bytes of one band as the netCDF thread hands them over: raw chunks where the variable
/// takes the fast path, values read through netCDF-C where it does not.
pub struct RawBand {
    row0: usize,
    rows: usize,
    parts: Vec<(&'static str, RawPart)>,
}

enum RawPart {
    Chunks(icefm_h5chunk::RawRows),
    F32(Vec<f32>),
    F64(Vec<f64>),
    U8(Vec<u8>),
}

/// The SAR-grid variables a band holds, by input kind (charts last).
fn band_variables(kind: InputKind, has_chart: bool) -> &'static [&'static str] {
    match (kind, has_chart) {
        (InputKind::Rtt, true) => &[
            "nersc_sar_primary",
            "nersc_sar_secondary",
            "distance_map",
            "sar_incidenceangle",
            "SIC",
            "SOD",
            "FLOE",
        ],
        (InputKind::Rtt, false) => &[
            "nersc_sar_primary",
            "nersc_sar_secondary",
            "distance_map",
            "sar_incidenceangle",
        ],
        (InputKind::Raw, true) => &[
            "nersc_sar_primary",
            "nersc_sar_secondary",
            "distance_map",
            "polygon_icechart",
        ],
        (InputKind::Raw, false) => &["nersc_sar_primary", "nersc_sar_secondary", "distance_map"],
    }
}

/// Element type a band variable is read as.
#[derive(Clone, Copy)]
enum Want {
    F32,
    F64,
    U8,
}

fn want_of(name: &str) -> Want {
    match name {
        "polygon_icechart" => Want::F64,
        "SIC" | "SOD" | "FLOE" => Want::U8,
        _ => Want::F32,
    }
}

const RAW_REQUIRED: [&str; 3] = ["nersc_sar_primary", "nersc_sar_secondary", "distance_map"];
const RTT_REQUIRED: [&str; 4] = [
    "nersc_sar_primary",
    "nersc_sar_secondary",
    "sar_incidenceangle",
    "distance_map",
];
/// An RTT scene's charts: all in the file (training release), or none (test release: in the
/// reference file `<stem>_reference.nc`, or unknown).
const CHARTS: [&str; 3] = ["SIC", "SOD", "FLOE"];

fn is_chart(name: &str) -> bool {
    CHARTS.contains(&name)
}

/// The reference file a test scene's charts are in, if there is one: `<stem>_reference.nc`
/// beside the scene file, else in one of `dirs` (the AutoICE test release names them
/// `<id>_prep_reference.nc`). A file that is itself a reference has none.
pub fn reference_file(path: &Path, dirs: &[PathBuf]) -> Option<PathBuf> {
    if is_reference_file(path) {
        return None;
    }
    let stem = path.file_stem()?.to_string_lossy().into_owned();
    let name = format!("{stem}_reference.nc");
    path.parent()
        .into_iter()
        .map(Path::to_path_buf)
        .chain(dirs.iter().cloned())
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
}

/// Whether `path` is a test scene's reference file (`…_reference.nc`), not a scene.
pub fn is_reference_file(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with("_reference.nc"))
}

/// Decoding of one variable: fill values, then scale and offset, then (RTT) standard scaling.
#[derive(Debug, Clone, Copy)]
struct Decode {
    fill: Option<f64>,
    missing: Option<f64>,
    scale: f64,
    offset: f64,
    /// RTT: `0.0` is invalid, then `x * std + mean`.
    unscale: Option<(f64, f64)>,
}

fn attr_f64(var: &Variable<'_>, name: &str) -> Option<f64> {
    match var.attribute_value(name)?.ok()? {
        AttributeValue::Uchar(v) => Some(f64::from(v)),
        AttributeValue::Schar(v) => Some(f64::from(v)),
        AttributeValue::Ushort(v) => Some(f64::from(v)),
        AttributeValue::Short(v) => Some(f64::from(v)),
        AttributeValue::Uint(v) => Some(f64::from(v)),
        AttributeValue::Int(v) => Some(f64::from(v)),
        AttributeValue::Ulonglong(v) => Some(v as f64),
        AttributeValue::Longlong(v) => Some(v as f64),
        AttributeValue::Float(v) => Some(f64::from(v)),
        AttributeValue::Double(v) => Some(v),
        AttributeValue::Floats(v) => v.first().map(|&x| f64::from(x)),
        AttributeValue::Doubles(v) => v.first().copied(),
        AttributeValue::Shorts(v) => v.first().map(|&x| f64::from(x)),
        AttributeValue::Ints(v) => v.first().map(|&x| f64::from(x)),
        AttributeValue::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn global_str(file: &netcdf::File, name: &str) -> Option<String> {
    match file.attribute(name)?.value().ok()? {
        AttributeValue::Str(s) => Some(s),
        AttributeValue::Strs(v) => v.into_iter().next(),
        other => Some(format!("{other:?}")),
    }
}

fn global_f64(file: &netcdf::File, name: &str) -> Option<f64> {
    match file.attribute(name)?.value().ok()? {
        AttributeValue::Str(s) => s.trim().trim_end_matches('m').trim().parse().ok(),
        AttributeValue::Double(v) => Some(v),
        AttributeValue::Float(v) => Some(f64::from(v)),
        AttributeValue::Int(v) => Some(f64::from(v)),
        AttributeValue::Short(v) => Some(f64::from(v)),
        AttributeValue::Longlong(v) => Some(v as f64),
        AttributeValue::Uint(v) => Some(f64::from(v)),
        _ => None,
    }
}

impl Decode {
    fn of(var: &Variable<'_>, rtt_scaled: bool) -> Self {
        let unscale = if rtt_scaled {
            mean_std(&var.name()).map(|m| (m.mean, m.std))
        } else {
            None
        };
        Self {
            fill: attr_f64(var, "_FillValue"),
            missing: attr_f64(var, "missing_value"),
            scale: attr_f64(var, "scale_factor").unwrap_or(1.0),
            offset: attr_f64(var, "add_offset").unwrap_or(0.0),
            unscale,
        }
    }

    fn apply(&self, raw: f32) -> f32 {
        self.apply_f64(f64::from(raw)) as f32
    }

    fn apply_f64(&self, x: f64) -> f64 {
        if self.fill.is_some_and(|f| x == f) || self.missing.is_some_and(|m| x == m) {
            return f64::NAN;
        }
        let v = x * self.scale + self.offset;
        match self.unscale {
            Some(_) if v == 0.0 => f64::NAN,
            Some((mean, std)) => v * std + mean,
            None => v,
        }
    }

    fn is_identity(&self) -> bool {
        self.fill.is_none()
            && self.missing.is_none()
            && self.scale == 1.0
            && self.offset == 0.0
            && self.unscale.is_none()
    }
}

impl SceneReader {
    /// Open a scene, validate its variables and shapes and read everything but the bands.
    pub fn open(path: &Path) -> Result<Self, SceneError> {
        Self::open_with_reference(path, None)
    }

    /// [`Self::open`], reading an RTT scene's charts from `reference` when the scene file has
    /// none (the test release: [`reference_file`] finds it).
    pub fn open_with_reference(path: &Path, reference: Option<&Path>) -> Result<Self, SceneError> {
        let meta = std::fs::metadata(path).map_err(|e| SceneError::file(path, e.to_string()))?;
        if meta.len() == 0 {
            return Err(SceneError::file(path, "empty file"));
        }
        let file = netcdf::open(path).map_err(|e| {
            SceneError::file(path, format!("not a readable NetCDF-4/HDF5 file ({e})"))
        })?;
        let kind = detect_kind(&file);
        let required: &[&str] = match kind {
            InputKind::Raw => &RAW_REQUIRED,
            InputKind::Rtt => &RTT_REQUIRED,
        };
        for name in required {
            if file.variable(name).is_none() {
                return Err(SceneError::variable(
                    path,
                    *name,
                    format!("missing (required in a {} scene)", kind.name()),
                ));
            }
        }
        let hh = file
            .variable("nersc_sar_primary")
            .ok_or_else(|| SceneError::variable(path, "nersc_sar_primary", "missing"))?;
        let shape: Vec<usize> = hh.dimensions().iter().map(|d| d.len()).collect();
        if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
            return Err(SceneError::variable(
                path,
                "nersc_sar_primary",
                format!("expected a non-empty 2-D SAR grid, found shape {shape:?}"),
            ));
        }
        let (height, width) = (shape[0], shape[1]);
        let mut reference_file = None;
        let has_chart = match kind {
            InputKind::Rtt => {
                let present: Vec<&str> = CHARTS
                    .into_iter()
                    .filter(|n| file.variable(n).is_some())
                    .collect();
                match (present.len(), reference) {
                    (3, _) => true,
                    (0, None) => false,
                    (0, Some(r)) => {
                        reference_file = Some(open_reference(r, &shape)?);
                        true
                    }
                    _ => {
                        let missing = CHARTS.into_iter().find(|n| !present.contains(n));
                        return Err(SceneError::variable(
                            path,
                            missing.unwrap_or("SIC"),
                            format!(
                                "missing while {} is present (an RTT file holds all three \
                                 charts or none)",
                                present.join(", ")
                            ),
                        ));
                    }
                }
            }
            InputKind::Raw => {
                let ids = file.variable("polygon_icechart").is_some();
                let codes = file.variable("polygon_codes").is_some();
                match (ids, codes) {
                    (true, true) => true,
                    (false, false) => false,
                    (true, false) => {
                        return Err(SceneError::variable(
                            path,
                            "polygon_codes",
                            "missing while polygon_icechart is present",
                        ));
                    }
                    (false, true) => {
                        return Err(SceneError::variable(
                            path,
                            "polygon_icechart",
                            "missing while polygon_codes is present",
                        ));
                    }
                }
            }
        };
        let mut grid_vars: Vec<&str> = vec!["nersc_sar_secondary", "distance_map"];
        match kind {
            InputKind::Rtt => {
                grid_vars.push("sar_incidenceangle");
                if has_chart && reference_file.is_none() {
                    grid_vars.extend(CHARTS);
                }
            }
            InputKind::Raw if has_chart => grid_vars.push("polygon_icechart"),
            InputKind::Raw => {}
        }
        for name in &grid_vars {
            let var = file
                .variable(name)
                .ok_or_else(|| SceneError::variable(path, *name, "missing"))?;
            let s: Vec<usize> = var.dimensions().iter().map(|d| d.len()).collect();
            if s != shape {
                return Err(SceneError::variable(
                    path,
                    *name,
                    format!("shape {s:?} does not match nersc_sar_primary {shape:?}"),
                ));
            }
        }
        let polygons = if kind == InputKind::Raw && has_chart {
            read_codes(&file, path)?
        } else {
            Vec::new()
        };
        let tie_points = if kind == InputKind::Raw {
            Some(read_tie_points(&file, path)?)
        } else {
            None
        };
        let native_spacing_m = match kind {
            InputKind::Raw => 40.0,
            InputKind::Rtt => global_f64(&file, "pixel_spacing").unwrap_or(80.0),
        };
        let grid2km = read_grid2km(&file, path, kind)?;
        let band_rows = band_rows_for(&hh, height);
        let (scene_id, service, acquired_us, satellite) = identify(&file, path, kind);
        let info = SceneInfo {
            path: path.to_path_buf(),
            scene_id,
            service,
            acquired_us,
            satellite,
            kind,
            height,
            width,
            native_spacing_m,
            polygons,
            has_chart,
            reference: reference
                .filter(|_| reference_file.is_some())
                .map(Path::to_path_buf),
            tie_points,
            grid2km,
            band_rows,
        };
        let rtt = kind == InputKind::Rtt;
        let mut decodes = HashMap::new();
        let mut chart_fills = HashMap::new();
        let source = |name: &str| match &reference_file {
            Some(r) if is_chart(name) => r,
            _ => &file,
        };
        for &name in band_variables(kind, has_chart) {
            let var = source(name)
                .variable(name)
                .ok_or_else(|| SceneError::variable(path, name, "missing"))?;
            let scaled = rtt && !matches!(want_of(name), Want::U8);
            decodes.insert(name, Decode::of(&var, scaled && name != "polygon_icechart"));
            if matches!(want_of(name), Want::U8) {
                let fill =
                    attr_f64(&var, "chart_fill_value").or_else(|| attr_f64(&var, "_FillValue"));
                if let Some(f) = fill.filter(|f| *f != 255.0) {
                    chart_fills.insert(name, f);
                }
            }
        }
        // Raw-chunk path for every band variable HDF5 stores in a way decoded here; the rest
        // (contiguous, other filters, big-endian, …) is read through netCDF-C.
        let h5 = icefm_h5chunk::File::open(path).ok();
        let h5_reference = reference
            .filter(|_| reference_file.is_some())
            .and_then(|r| icefm_h5chunk::File::open(r).ok());
        let mut chunked = HashMap::new();
        for &name in band_variables(kind, has_chart) {
            let h = if reference_file.is_some() && is_chart(name) {
                &h5_reference
            } else {
                &h5
            };
            if let Some(h) = h
                && let Ok(d) = h.dataset(name)
            {
                let accepts = match want_of(name) {
                    Want::F32 => <f32 as icefm_h5chunk::Element>::accepts(d.layout().dtype),
                    Want::F64 => <f64 as icefm_h5chunk::Element>::accepts(d.layout().dtype),
                    Want::U8 => <u8 as icefm_h5chunk::Element>::accepts(d.layout().dtype),
                };
                if accepts && d.layout().shape == [height, width] {
                    chunked.insert(name, d);
                }
            }
        }
        Ok(Self {
            chunked,
            _h5: h5,
            decodes,
            chart_fills,
            _h5_reference: h5_reference,
            reference: reference_file,
            file,
            info,
        })
    }

    /// Band variables read as raw chunks and inflated on all cores (the others go through
    /// netCDF-C on its thread), sorted.
    pub fn raw_chunk_variables(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.chunked.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// What was read at open.
    pub fn info(&self) -> &SceneInfo {
        &self.info
    }

    /// Read and decode rows `[row0, row0 + rows)` of every SAR-grid variable through netCDF-C
    /// alone, all on the calling thread (the netCDF thread). This is the ingest floor the
    /// benchmark compares with; ingest itself uses [`Self::read_band_raw`] + [`Self::decode_band`].
    pub fn read_band_netcdf(&self, row0: usize, rows: usize) -> Result<Band, SceneError> {
        let raw = self.read_band_with(row0, rows, false)?;
        self.decode_band(raw)
    }

    /// The netCDF-thread half of reading a band: the stored chunks of the fast-path variables
    /// (a plain file read) and the netCDF-C read of the others. Call on the netCDF thread.
    pub fn read_band_raw(&self, row0: usize, rows: usize) -> Result<RawBand, SceneError> {
        self.read_band_with(row0, rows, true)
    }

    fn read_band_with(&self, row0: usize, rows: usize, raw: bool) -> Result<RawBand, SceneError> {
        let names = band_variables(self.info.kind, self.info.has_chart);
        let mut parts = Vec::with_capacity(names.len());
        for &name in names {
            let fast = raw
                .then(|| self.chunked.get(name))
                .flatten()
                .and_then(|d| d.read_rows(row0, rows).ok());
            let part = match (fast, want_of(name)) {
                (Some(c), _) => RawPart::Chunks(c),
                (None, Want::F32) => RawPart::F32(self.get_values(name, row0, rows)?),
                (None, Want::F64) => RawPart::F64(self.get_values(name, row0, rows)?),
                (None, Want::U8) => RawPart::U8(self.get_values(name, row0, rows)?),
            };
            parts.push((name, part));
        }
        Ok(RawBand { row0, rows, parts })
    }

    /// The other half: inflate raw chunks on the rayon pool and apply fill values, packing and
    /// the RTT scaling. Runs on any thread; makes no netCDF call.
    pub fn decode_band(&self, raw: RawBand) -> Result<Band, SceneError> {
        let RawBand { row0, rows, parts } = raw;
        let mut f32s: HashMap<&str, Vec<f32>> = HashMap::new();
        let mut f64s: HashMap<&str, Vec<f64>> = HashMap::new();
        let mut u8s: HashMap<&str, Vec<u8>> = HashMap::new();
        let decoded: Vec<(&'static str, RawPart)> = parts
            .into_par_iter()
            .map(|(name, part)| {
                let err = |e: icefm_h5chunk::DecodeError| {
                    SceneError::variable(
                        self.path_of(name),
                        name,
                        format!("rows {row0}..{}: {e}; the file may be corrupt", row0 + rows),
                    )
                };
                Ok((
                    name,
                    match (part, want_of(name)) {
                        (RawPart::Chunks(c), Want::F32) => RawPart::F32(c.decode().map_err(err)?),
                        (RawPart::Chunks(c), Want::F64) => RawPart::F64(c.decode().map_err(err)?),
                        (RawPart::Chunks(c), Want::U8) => RawPart::U8(c.decode().map_err(err)?),
                        (p, _) => p,
                    },
                ))
            })
            .collect::<Result<_, SceneError>>()?;
        for (name, part) in decoded {
            match part {
                RawPart::F32(mut v) => {
                    self.apply_f32(name, &mut v);
                    f32s.insert(name, v);
                }
                RawPart::F64(mut v) => {
                    self.apply_ids(name, &mut v);
                    f64s.insert(name, v);
                }
                RawPart::U8(mut v) => {
                    if let Some(&f) = self.chart_fills.get(name) {
                        for x in &mut v {
                            if f64::from(*x) == f {
                                *x = icefm_schemas::IGNORE;
                            }
                        }
                    }
                    u8s.insert(name, v);
                }
                RawPart::Chunks(_) => unreachable!("every chunk part was decoded above"),
            }
        }
        let mut take = |n: &str| f32s.remove(n).unwrap_or_default();
        let (hh, hv, distance) = (
            take("nersc_sar_primary"),
            take("nersc_sar_secondary"),
            take("distance_map"),
        );
        let incidence = f32s.remove("sar_incidenceangle");
        let labels = match (self.info.kind, self.info.has_chart) {
            (InputKind::Rtt, true) => {
                let mut chart = |n: &str| u8s.remove(n).unwrap_or_default();
                BandLabels::Charts([chart("SIC"), chart("SOD"), chart("FLOE")])
            }
            (InputKind::Raw, true) => {
                BandLabels::PolygonIds(f64s.remove("polygon_icechart").unwrap_or_default())
            }
            (_, false) => BandLabels::None,
        };
        Ok(Band {
            row0,
            rows,
            hh,
            hv,
            distance,
            incidence,
            labels,
        })
    }

    fn var(&self, name: &str) -> Result<Variable<'_>, SceneError> {
        let file = match &self.reference {
            Some(r) if is_chart(name) => r,
            _ => &self.file,
        };
        file.variable(name)
            .ok_or_else(|| SceneError::variable(self.path_of(name), name, "missing"))
    }

    /// The file a band variable is read from.
    fn path_of(&self, name: &str) -> &Path {
        match &self.info.reference {
            Some(r) if is_chart(name) => r,
            _ => &self.info.path,
        }
    }

    fn read_err(&self, name: &str, row0: usize, rows: usize, e: netcdf::Error) -> SceneError {
        SceneError::variable(
            self.path_of(name),
            name,
            format!(
                "reading rows {row0}..{} failed ({e}); the file may be truncated",
                row0 + rows
            ),
        )
    }

    fn get_values<T: netcdf::NcTypeDescriptor + Copy>(
        &self,
        name: &str,
        row0: usize,
        rows: usize,
    ) -> Result<Vec<T>, SceneError> {
        let var = self.var(name)?;
        let ext = [row0..row0 + rows, 0..self.info.width];
        var.get_values::<T, _>(&ext)
            .map_err(|e| self.read_err(name, row0, rows, e))
    }

    fn apply_f32(&self, name: &str, v: &mut [f32]) {
        let Some(d) = self.decodes.get(name) else {
            return;
        };
        match *d {
            d if d.is_identity() => {}
            // The RTT case (no fill value, no packing): a loop the compiler vectorises.
            Decode {
                fill: None,
                missing: None,
                scale,
                offset,
                unscale: Some((mean, std)),
            } if scale == 1.0 && offset == 0.0 => {
                let (mean, std) = (mean as f32, std as f32);
                v.par_chunks_mut(1 << 16).for_each(|v| {
                    for x in v {
                        *x = if *x == 0.0 { f32::NAN } else { *x * std + mean };
                    }
                });
            }
            d => v.par_chunks_mut(1 << 16).for_each(|v| {
                for x in v {
                    *x = d.apply(*x);
                }
            }),
        }
    }

    fn apply_ids(&self, name: &str, v: &mut [f64]) {
        let Some(d) = self.decodes.get(name) else {
            return;
        };
        for x in v {
            if d.fill.is_some_and(|f| *x == f) || d.missing.is_some_and(|m| *x == m) {
                *x = f64::NAN;
            } else if d.scale != 1.0 || d.offset != 0.0 {
                *x = (*x * d.scale + d.offset).round();
            }
        }
    }
}

/// Open a reference file and check that it holds the three charts on the scene's grid.
fn open_reference(path: &Path, shape: &[usize]) -> Result<netcdf::File, SceneError> {
    let file = netcdf::open(path).map_err(|e| {
        SceneError::file(
            path,
            format!("reference charts: not a readable NetCDF-4/HDF5 file ({e})"),
        )
    })?;
    for name in CHARTS {
        let var = file
            .variable(name)
            .ok_or_else(|| SceneError::variable(path, name, "missing in the reference file"))?;
        let s: Vec<usize> = var.dimensions().iter().map(|d| d.len()).collect();
        if s != shape {
            return Err(SceneError::variable(
                path,
                name,
                format!("shape {s:?} does not match the scene's SAR grid {shape:?}"),
            ));
        }
    }
    Ok(file)
}

fn detect_kind(file: &netcdf::File) -> InputKind {
    let rtt = file.variable("SIC").is_some()
        || file.variable("sar_incidenceangle").is_some()
        || file.attribute("pixel_spacing").is_some();
    if rtt { InputKind::Rtt } else { InputKind::Raw }
}

fn band_rows_for(var: &Variable<'_>, height: usize) -> usize {
    let chunk_rows = match var.chunking() {
        Ok(Some(c)) if !c.is_empty() && c[0] > 0 => c[0],
        _ => return DEFAULT_BAND_ROWS.min(height),
    };
    // A whole number of chunk rows, at least DEFAULT_BAND_ROWS, so no chunk is inflated twice.
    let k = DEFAULT_BAND_ROWS.div_ceil(chunk_rows).max(1);
    (chunk_rows * k).min(height)
}

fn identify(
    file: &netcdf::File,
    path: &Path,
    kind: InputKind,
) -> (String, Option<String>, Option<i64>, Option<String>) {
    let fname = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut candidates = vec![fname.clone()];
    if kind == InputKind::Rtt {
        candidates.insert(0, global_str(file, "original_id").unwrap_or_default());
        candidates.push(global_str(file, "scene_id").unwrap_or_default());
    }
    let parsed = candidates.iter().find_map(|c| parse_scene_name(c));
    // The satellite is only in raw names; an RTT file may carry it in `original_id`.
    let satellite = candidates
        .iter()
        .find_map(|c| parse_scene_name(c).and_then(|n| n.satellite));
    match parsed {
        Some(n) => {
            let service = global_str(file, "ice_service")
                .map(|s| s.to_lowercase())
                .filter(|s| !s.is_empty())
                .unwrap_or(n.service.clone());
            (
                n.scene_id,
                Some(service),
                timestamp_micros(&n.start),
                satellite,
            )
        }
        None => {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or(fname);
            let stem = stem.trim_end_matches("_prep").to_string();
            (stem, global_str(file, "ice_service"), None, satellite)
        }
    }
}

fn read_codes(file: &netcdf::File, path: &Path) -> Result<Vec<PolygonCode>, SceneError> {
    let name = "polygon_codes";
    let var = file
        .variable(name)
        .ok_or_else(|| SceneError::variable(path, name, "missing"))?;
    let dims: Vec<usize> = var.dimensions().iter().map(|d| d.len()).collect();
    let bad = |reason: String| SceneError::variable(path, name, reason);
    let rows: Vec<String> = match var.vartype() {
        NcVariableType::String => (0..dims.first().copied().unwrap_or(0))
            .map(|i| var.get_string(i).map_err(|e| bad(format!("row {i}: {e}"))))
            .collect::<Result<_, _>>()?,
        NcVariableType::Char => {
            let (n, len) = match dims.as_slice() {
                [n, len] => (*n, *len),
                [len] => (1, *len),
                other => return Err(bad(format!("char array of unexpected shape {other:?}"))),
            };
            let bytes = var.get_raw_values(..).map_err(|e| bad(e.to_string()))?;
            (0..n)
                .map(|i| {
                    let row = &bytes[i * len..(i + 1) * len];
                    let end = row.iter().position(|&b| b == 0).unwrap_or(len);
                    String::from_utf8_lossy(&row[..end]).into_owned()
                })
                .collect()
        }
        other => return Err(bad(format!("expected strings or chars, found {other:?}"))),
    };
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let t = row.trim();
        if t.is_empty() {
            continue;
        }
        // Row 0 is the header (`poly_id;CT;…`, or `id;CT;…` in older files).
        if i == 0 || t.to_ascii_lowercase().starts_with("poly_id") || t.starts_with("id;") {
            continue;
        }
        out.push(PolygonCode::parse(t).map_err(|e| bad(format!("row {i}: {e}")))?);
    }
    Ok(out)
}

fn read_f64_all(file: &netcdf::File, path: &Path, name: &str) -> Result<Vec<f64>, SceneError> {
    let var = file
        .variable(name)
        .ok_or_else(|| SceneError::variable(path, name, "missing"))?;
    let mut v = var
        .get_values::<f64, _>(..)
        .map_err(|e| SceneError::variable(path, name, e.to_string()))?;
    let d = Decode::of(&var, false);
    if !d.is_identity() {
        for x in &mut v {
            *x = d.apply_f64(*x);
        }
    }
    Ok(v)
}

fn read_tie_points(file: &netcdf::File, path: &Path) -> Result<TiePoints, SceneError> {
    let line = read_f64_all(file, path, "sar_grid_line")?;
    let sample = read_f64_all(file, path, "sar_grid_sample")?;
    let inc = read_f64_all(file, path, "sar_grid_incidenceangle")?;
    if line.len() != sample.len() || line.len() != inc.len() || line.len() < 4 {
        return Err(SceneError::variable(
            path,
            "sar_grid_incidenceangle",
            format!(
                "tie points disagree in length (line {}, sample {}, incidence {})",
                line.len(),
                sample.len(),
                inc.len()
            ),
        ));
    }
    let mut lines: Vec<f64> = line.clone();
    lines.sort_by(f64::total_cmp);
    lines.dedup();
    let mut samples: Vec<f64> = sample.clone();
    samples.sort_by(f64::total_cmp);
    samples.dedup();
    if lines.len() < 2 || samples.len() < 2 || lines.len() * samples.len() != inc.len() {
        return Err(SceneError::variable(
            path,
            "sar_grid_line",
            format!(
                "tie points are not a regular grid ({} rows × {} columns for {} points)",
                lines.len(),
                samples.len(),
                inc.len()
            ),
        ));
    }
    let mut incidence = vec![f64::NAN; inc.len()];
    for k in 0..inc.len() {
        let i = lines.partition_point(|&a| a < line[k]);
        let j = samples.partition_point(|&a| a < sample[k]);
        incidence[i * samples.len() + j] = inc[k];
    }
    Ok(TiePoints {
        lines,
        samples,
        incidence,
    })
}

fn read_grid2km(file: &netcdf::File, path: &Path, kind: InputKind) -> Result<Grid2km, SceneError> {
    let mut g = Grid2km {
        native_pixels_per_cell: if kind == InputKind::Raw { 50 } else { 25 },
        ..Grid2km::default()
    };
    let mut shape: Option<(usize, usize)> = None;
    for name in AMSR2_VARIABLES.iter().chain(ERA5_VARIABLES.iter()) {
        let Some(var) = file.variable(name) else {
            continue;
        };
        let s: Vec<usize> = var.dimensions().iter().map(|d| d.len()).collect();
        let [h, w] = s.as_slice() else {
            return Err(SceneError::variable(
                path,
                *name,
                format!("expected 2-D, found {s:?}"),
            ));
        };
        match shape {
            None => shape = Some((*h, *w)),
            Some(sh) if sh != (*h, *w) => {
                return Err(SceneError::variable(
                    path,
                    *name,
                    format!("shape {s:?} differs from the other 2 km variables {sh:?}"),
                ));
            }
            Some(_) => {}
        }
        let raw: Vec<f32> = var
            .get_values::<f32, _>(..)
            .map_err(|e| SceneError::variable(path, *name, e.to_string()))?;
        let d = Decode::of(&var, kind == InputKind::Rtt);
        g.data.extend(raw.into_iter().map(|x| d.apply(x)));
        g.variables.push((*name).to_string());
    }
    if let Some((h, w)) = shape {
        g.height = h;
        g.width = w;
    }
    Ok(g)
}
