//! Reading AI4Arctic NetCDF scenes (raw 40 m and ready-to-train 80 m) in row bands.
//!
//! Every encoding a real file may use is accepted: any storage type (netCDF-C converts), `_FillValue`
//! / `missing_value`, `scale_factor` / `add_offset`, polygon ids as float32-with-NaN or integers with
//! a fill value, `polygon_codes` as variable-length strings or a char array, any chunking.
//! SAR comes out in dB with NaN for invalid, whatever the input (RTT's standard scaling is undone).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use netcdf::Variable;
use rayon::prelude::*;

use crate::error::SceneError;

mod decode;
mod open;
mod scene;

use decode::{Decode, attr_f64, global_f64};
use open::{
    band_rows_for, detect_kind, identify, open_reference, read_codes, read_grid2km,
    read_tie_points, rtt_geolocation,
};
pub use scene::{Band, BandLabels, Grid2km, InputKind, SceneInfo, TiePoints};

/// Default band height for unchunked (contiguous) variables.
pub const DEFAULT_BAND_ROWS: usize = 512;

/// Ground spacing of the raw AI4Arctic scenes' grid, metres: the finest grid of the dataset (the
/// ready-to-train release is at 80 m).
pub const RAW_SPACING_M: u32 = 40;

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
        let geolocation = match &tie_points {
            Some(t) => t.geolocation.clone(),
            None => rtt_geolocation(&file, path),
        };
        let native_spacing_m = match kind {
            InputKind::Raw => f64::from(RAW_SPACING_M),
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
            geolocation,
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

    /// Decode `name`'s values in place ([`Decode`]); distance zones are then snapped to their
    /// integers ([`snap_zones`]).
    fn apply_f32(&self, name: &str, v: &mut [f32]) {
        let Some(d) = self.decodes.get(name) else {
            return;
        };
        match *d {
            d if d.is_identity() => {}
            // The RTT case (no fill value, no packing): a loop the compiler vectorises, with
            // the arithmetic of `Decode::apply` (f64, rounded once), so that a file with a
            // `_FillValue` (as xarray writes one) decodes to the same bits.
            Decode {
                fill: None,
                missing: None,
                scale,
                offset,
                unscale: Some((mean, std)),
            } if scale == 1.0 && offset == 0.0 => {
                v.par_chunks_mut(1 << 16).for_each(|v| {
                    for x in v {
                        *x = if *x == 0.0 {
                            f32::NAN
                        } else {
                            (f64::from(*x) * std + mean) as f32
                        };
                    }
                });
            }
            d => v.par_chunks_mut(1 << 16).for_each(|v| {
                for x in v {
                    *x = d.apply(*x);
                }
            }),
        }
        if name == "distance_map" {
            v.par_chunks_mut(1 << 16).for_each(snap_zones);
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

/// How far from an integer a decoded distance zone may be and still be that zone.
pub const ZONE_SNAP: f32 = 1e-3;

/// Distance-to-land zones are integers (0 land … 41), but an RTT file stores them standard-scaled
/// in float32, whose rounding brings them back as 2.000002 or, for land, ±7e-7, by encoding.
/// Values within [`ZONE_SNAP`] of an integer are taken to be it; others (a mean across a zone
/// edge) stay as they are.
fn snap_zones(v: &mut [f32]) {
    for x in v {
        let r = x.round();
        if (*x - r).abs() < ZONE_SNAP {
            // `+ 0.0`: land rounded from a small negative value is 0, not -0.
            *x = r + 0.0;
        }
    }
}
