//! The ready-to-train 80 m file (reference §1 "RTT file"): labels as rasters, inputs
//! standard-scaled with the toolbox's global mean / std, invalid inputs exactly 0.0.

use std::path::Path;

use icefm_schemas::IGNORE;
use icefm_schemas::norm::{MeanStd, mean_std};
use netcdf::AttributeValue;

use crate::backscatter::Planes;
use crate::backscatter::incidence_deg;
use crate::error::SynthError;
use crate::geolocation::TIE_POINTS;
use crate::options::{Defect, Release, SceneKind, SynthOptions};
use crate::rng::{hash, tag};
use crate::scene::{NO_POLYGON, Scene};
use crate::writer::{GridVar, SceneWriter};

const SAR: [&str; 2] = ["sar_lines", "sar_samples"];
const GRID2KM: [&str; 2] = ["2km_grid_lines", "2km_grid_samples"];
const GRID2D: [&str; 2] = ["sar_grid2d_lines", "sar_grid2d_samples"];

/// Standard-scaled value of a valid input; never exactly 0.0, which marks invalid pixels.
pub(crate) fn scaled(ms: MeanStd, v: f64) -> f32 {
    let s = ms.scale(v) as f32;
    if s == 0.0 { f32::EPSILON } else { s }
}

fn norm(name: &str) -> Result<MeanStd, SynthError> {
    mean_std(name).ok_or_else(|| SynthError::options(format!("no mean/std for {name}")))
}

const CHARTS: [&str; 3] = ["SIC", "SOD", "FLOE"];

/// `SIC`, `SOD` and `FLOE`: each pixel's polygon's classes, 255 off the chart and where the
/// SAR is invalid.
fn write_charts(
    out: &mut SceneWriter,
    opts: &SynthOptions,
    scene: &Scene,
    planes: &Planes,
) -> Result<(), SynthError> {
    let (h, w) = (opts.height, opts.width);
    let labels: Vec<[u8; 3]> = scene.polygons.iter().map(|p| p.labels).collect();
    for (task, name) in CHARTS.into_iter().enumerate() {
        out.grid(
            GridVar {
                name,
                dims: SAR,
                shape: [h, w],
                sar_grid: true,
                attrs: vec![("chart_fill_value", AttributeValue::from(IGNORE))],
            },
            None,
            |y, o: &mut [u8]| {
                for (x, d) in o.iter_mut().enumerate() {
                    let k = y * w + x;
                    let p = planes.poly[k];
                    // "NaN masks aligned across full-resolution variables": HH decides.
                    *d = if p == NO_POLYGON || planes.hh[k].is_nan() {
                        IGNORE
                    } else {
                        labels[usize::from(p)][task]
                    };
                }
            },
        )?;
    }
    Ok(())
}

/// The reference file of a test scene: its charts alone, on the SAR grid, in the same encoding.
pub(crate) fn write_reference(
    path: &Path,
    opts: &SynthOptions,
    scene: &Scene,
) -> Result<(), SynthError> {
    let planes = scene.render(opts.defect != Some(Defect::AllInvalid));
    let mut out = SceneWriter::create(path, opts.encoding, Vec::new())?;
    out.global("scene_id", opts.rtt_file_name())?;
    out.dim(SAR[0], opts.height)?;
    out.dim(SAR[1], opts.width)?;
    write_charts(&mut out, opts, scene, &planes)?;
    out.close()
}

pub(crate) fn write(path: &Path, opts: &SynthOptions, scene: &Scene) -> Result<(), SynthError> {
    let (h, w) = (opts.height, opts.width);
    let planes = scene.render(opts.defect != Some(Defect::AllInvalid));
    let grid = scene.grid2km(SceneKind::Rtt.grid2km_factor());
    let ties = scene.tie_points();
    let mut skip: Vec<&'static str> = match opts.defect {
        Some(Defect::MissingVariable(v)) => vec![v],
        _ => Vec::new(),
    };
    if opts.release == Release::Test {
        skip.extend(CHARTS);
    }
    let short = opts.defect == Some(Defect::MismatchedShape);
    // "NaN masks aligned across full-resolution variables": HH decides validity for all.
    let valid = |k: usize| !planes.hh[k].is_nan();

    let mut out = SceneWriter::create(path, opts.encoding, skip)?;
    out.global("scene_id", opts.rtt_file_name())?;
    out.global("original_id", opts.raw_file_name())?;
    out.global("ice_service", opts.service.name())?;
    out.global("flip", (hash(&[scene.seed, tag::GEO, 2]) % 2) as i32)?;
    out.global("pixel_spacing", 80i32)?;
    out.dim(SAR[0], h)?;
    out.dim(SAR[1], w)?;
    out.dim(GRID2KM[0], grid.rows)?;
    out.dim(GRID2KM[1], grid.cols)?;
    out.dim(GRID2D[0], TIE_POINTS)?;
    out.dim(GRID2D[1], TIE_POINTS)?;

    write_charts(&mut out, opts, scene, &planes)?;

    let fill_attr = || vec![("variable_fill_value", AttributeValue::from(0.0f32))];
    // `_FillValue` of the float variables: NaN under an xarray-like encoding, none otherwise.
    let nan_fill = opts.encoding.float_fill.then_some(f32::NAN);
    let full = |name, attrs| GridVar {
        name,
        dims: SAR,
        shape: [h, w],
        sar_grid: true,
        attrs,
    };
    for (name, plane) in [
        ("nersc_sar_primary", &planes.hh),
        ("nersc_sar_secondary", &planes.hv),
    ] {
        let ms = norm(name)?;
        out.grid(full(name, fill_attr()), nan_fill, |y, o: &mut [f32]| {
            for (d, &v) in o.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                *d = if v.is_nan() {
                    0.0
                } else {
                    scaled(ms, f64::from(v))
                };
            }
        })?;
    }
    let inc = norm("sar_incidenceangle")?;
    let inc_row: Vec<f32> = (0..w)
        .map(|x| scaled(inc, incidence_deg(x as f64, w)))
        .collect();
    out.grid(
        full("sar_incidenceangle", fill_attr()),
        nan_fill,
        |y, o: &mut [f32]| {
            for (x, d) in o.iter_mut().enumerate() {
                *d = if valid(y * w + x) { inc_row[x] } else { 0.0 };
            }
        },
    )?;

    let dist = norm("distance_map")?;
    let (dist_rows, dist_dim) = out.distance_rows(short, h, SAR[0])?;
    out.grid(
        GridVar {
            name: "distance_map",
            dims: [dist_dim, SAR[1]],
            shape: [dist_rows, w],
            sar_grid: true,
            attrs: fill_attr(),
        },
        nan_fill,
        |y, o: &mut [f32]| {
            for (x, d) in o.iter_mut().enumerate() {
                let k = y * w + x;
                *d = if valid(k) {
                    scaled(dist, f64::from(planes.zone[k]))
                } else {
                    0.0
                };
            }
        },
    )?;

    out.small_grid("sar_grid2d_latitude", GRID2D, &ties.latitude)?;
    out.small_grid("sar_grid2d_longitude", GRID2D, &ties.longitude)?;

    for (name, values) in &grid.fields {
        let ms = norm(name)?;
        out.grid(
            GridVar {
                name,
                dims: GRID2KM,
                shape: [grid.rows, grid.cols],
                sar_grid: false,
                attrs: Vec::new(),
            },
            nan_fill,
            |y, o: &mut [f32]| {
                for (d, &v) in o
                    .iter_mut()
                    .zip(&values[y * grid.cols..(y + 1) * grid.cols])
                {
                    *d = scaled(ms, v);
                }
            },
        )?;
    }
    out.close()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::options::Service;

    /// RTT files carry no polygon raster, so compare against the scene model directly.
    #[test]
    fn labels_are_the_derived_class_of_each_pixels_polygon() {
        icefm_netcdf_thread::on_netcdf_thread(|| {
            let dir = tempfile::tempdir().unwrap();
            for (seed, service) in [(1, Service::Dmi), (2, Service::Cis)] {
                let mut opts = SynthOptions::new(SceneKind::Rtt, 240, 260, seed);
                opts.service = service;
                let path = crate::write_scene(dir.path(), &opts).unwrap();
                let scene = Scene::build(&opts);
                let planes = scene.render(true);
                let file = netcdf::open(&path).unwrap();
                let read = |n: &str| file.variable(n).unwrap().get_values::<u8, _>(..).unwrap();
                let (sic, sod, floe) = (read("SIC"), read("SOD"), read("FLOE"));
                let hh = file
                    .variable("nersc_sar_primary")
                    .unwrap()
                    .get_values::<f32, _>(..)
                    .unwrap();
                let mut labelled = 0;
                for k in 0..planes.poly.len() {
                    let p = planes.poly[k];
                    let got = [sic[k], sod[k], floe[k]];
                    // Land has valid SAR but no polygon; the no-data border has polygons but no SAR.
                    assert_eq!(hh[k] == 0.0, planes.hh[k].is_nan(), "pixel {k}");
                    if p == NO_POLYGON || planes.hh[k].is_nan() {
                        assert_eq!(got, [IGNORE; 3], "pixel {k}");
                    } else {
                        assert_eq!(got, scene.polygons[usize::from(p)].labels, "pixel {k}");
                        labelled += usize::from(got[0] != IGNORE);
                    }
                }
                assert!(labelled > planes.poly.len() / 3, "{labelled}");
            }
        });
    }

    #[test]
    fn scaled_values_are_never_exactly_zero() {
        icefm_netcdf_thread::on_netcdf_thread(|| {
            let ms = mean_std("nersc_sar_primary").unwrap();
            assert_eq!(scaled(ms, ms.mean), f32::EPSILON);
            assert!((scaled(ms, -20.0) - ((-20.0 - ms.mean) / ms.std) as f32).abs() < 1e-6);
        });
    }
}
