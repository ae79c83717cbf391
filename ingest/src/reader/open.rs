//! What is read once when a scene opens: its kind, name, SIGRID-3 code table, tie points, 2 km
//! grids, band height and a test scene's reference file.

use std::path::Path;

use icefm_schemas::norm::{AMSR2_VARIABLES, ERA5_VARIABLES};
use icefm_schemas::sigrid::PolygonCode;
use netcdf::Variable;
use netcdf::types::NcVariableType;

use crate::error::SceneError;
use crate::names::{parse_scene_name, timestamp_micros};

use super::decode::{Decode, global_str};
use super::{CHARTS, DEFAULT_BAND_ROWS, Grid2km, InputKind, TiePoints};
use crate::geo::Geolocation;

/// Open a reference file and check that it holds the three charts on the scene's grid.
pub(super) fn open_reference(path: &Path, shape: &[usize]) -> Result<netcdf::File, SceneError> {
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

pub(super) fn detect_kind(file: &netcdf::File) -> InputKind {
    let rtt = file.variable("SIC").is_some()
        || file.variable("sar_incidenceangle").is_some()
        || file.attribute("pixel_spacing").is_some();
    if rtt { InputKind::Rtt } else { InputKind::Raw }
}

pub(super) fn band_rows_for(var: &Variable<'_>, height: usize) -> usize {
    let chunk_rows = match var.chunking() {
        Ok(Some(c)) if !c.is_empty() && c[0] > 0 => c[0],
        _ => return DEFAULT_BAND_ROWS.min(height),
    };
    // A whole number of chunk rows, at least DEFAULT_BAND_ROWS, so no chunk is inflated twice.
    let k = DEFAULT_BAND_ROWS.div_ceil(chunk_rows).max(1);
    (chunk_rows * k).min(height)
}

pub(super) fn identify(
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

pub(super) fn read_codes(file: &netcdf::File, path: &Path) -> Result<Vec<PolygonCode>, SceneError> {
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

pub(super) fn read_tie_points(file: &netcdf::File, path: &Path) -> Result<TiePoints, SceneError> {
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
        geolocation: raw_geolocation(file, path, &line, &sample, &lines, &samples),
        lines,
        samples,
        incidence,
    })
}

/// Whether `file` has the variable `name`.
fn has_variable(file: &netcdf::File, name: &str) -> bool {
    file.variable(name).is_some()
}

/// A raw file's latitude and longitude at its tie points (`sar_grid_latitude`,
/// `sar_grid_longitude`), placed on the regular grid of `lines × samples` the points'
/// positions `line`, `sample` make. `Ok(None)` where the file has neither; an error says why
/// they cannot be used.
fn raw_geolocation(
    file: &netcdf::File,
    path: &Path,
    line: &[f64],
    sample: &[f64],
    lines: &[f64],
    samples: &[f64],
) -> Result<Option<Geolocation>, String> {
    let (lat, lon) = ("sar_grid_latitude", "sar_grid_longitude");
    if !has_variable(file, lat) && !has_variable(file, lon) {
        return Ok(None);
    }
    let read = |name| read_f64_all(file, path, name).map_err(|e| e.to_string());
    let (la, lo) = (read(lat)?, read(lon)?);
    if la.len() != line.len() || lo.len() != line.len() {
        return Err(format!(
            "{} latitude(s) and {} longitude(s) for {} tie points",
            la.len(),
            lo.len(),
            line.len()
        ));
    }
    let n = lines.len() * samples.len();
    let (mut latitude, mut longitude) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    for k in 0..line.len() {
        let i = lines.partition_point(|&a| a < line[k]);
        let j = samples.partition_point(|&a| a < sample[k]);
        latitude[i * samples.len() + j] = la[k];
        longitude[i * samples.len() + j] = lo[k];
    }
    Geolocation::new(
        lines.len(),
        samples.len(),
        Some((lines.to_vec(), samples.to_vec())),
        latitude,
        longitude,
    )
    .map(Some)
}

/// A ready-to-train file's latitude and longitude grid (`sar_grid2d_latitude`,
/// `sar_grid2d_longitude`), which it gives without the points' positions. As
/// [`raw_geolocation`].
pub(super) fn rtt_geolocation(
    file: &netcdf::File,
    path: &Path,
) -> Result<Option<Geolocation>, String> {
    let (lat, lon) = ("sar_grid2d_latitude", "sar_grid2d_longitude");
    if !has_variable(file, lat) && !has_variable(file, lon) {
        return Ok(None);
    }
    let shape = |name: &str| -> Result<Vec<usize>, String> {
        let var = file
            .variable(name)
            .ok_or_else(|| format!("{name} is missing beside the other"))?;
        Ok(var.dimensions().iter().map(|d| d.len()).collect())
    };
    let (s, t) = (shape(lat)?, shape(lon)?);
    let [rows, cols] = s[..] else {
        return Err(format!("{lat} is {}-D, not 2-D", s.len()));
    };
    if s != t {
        return Err(format!("{lat} is {s:?} and {lon} {t:?}"));
    }
    let read = |name| read_f64_all(file, path, name).map_err(|e| e.to_string());
    Geolocation::new(rows, cols, None, read(lat)?, read(lon)?).map(Some)
}

pub(super) fn read_grid2km(
    file: &netcdf::File,
    path: &Path,
    kind: InputKind,
) -> Result<Grid2km, SceneError> {
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
