//! The raw 40 m file (reference §1 "Raw file").

use std::path::Path;

use netcdf::AttributeValue;

use crate::chart::{CODES_HEADER, PolygonKind};
use crate::encoding::{
    CodesEncoding, POLYGON_ID_FILL, PolygonIdEncoding, SAR_ADD_OFFSET, SAR_FILL, SAR_SCALE_FACTOR,
    SarPacking,
};
use crate::error::SynthError;
use crate::geolocation::TIE_POINTS;
use crate::options::{Defect, Release, SceneKind, SynthOptions};
use crate::scene::{NO_POLYGON, Scene};
use crate::writer::{GridVar, SceneWriter};

const SAR: [&str; 2] = ["sar_lines", "sar_samples"];
const GRID2KM: [&str; 2] = ["2km_grid_lines", "2km_grid_samples"];

/// NERSC's documentation of the thermal-noise removal (the attribute of the real files).
pub(crate) const DENOISE_DOC: &str = "https://github.com/nansencenter/sentinel1denoised";

/// The `polygon_codes` rows: header, then one row per polygon; the `BadCodeRow` defect breaks
/// the CT field of the first ice polygon's row (`12;92;…` → `12;9x;…`), so a reader that
/// skips it loses real labels.
pub(crate) fn code_rows(scene: &Scene, bad_row: bool) -> Vec<String> {
    let mut rows = vec![CODES_HEADER.to_string()];
    rows.extend(scene.polygons.iter().map(|p| p.row.clone()));
    let victim = scene
        .polygons
        .iter()
        .position(|p| p.kind != PolygonKind::Water)
        .unwrap_or(0)
        + 1;
    if bad_row && rows.len() > victim {
        let mut fields: Vec<String> = rows[victim].split(';').map(str::to_string).collect();
        let first = fields[1].trim().chars().next().unwrap_or('9');
        fields[1] = format!("{first}x");
        rows[victim] = fields.join(";");
    }
    rows
}

fn pack(v: f32) -> i16 {
    if v.is_nan() {
        SAR_FILL
    } else {
        ((v - SAR_ADD_OFFSET) / SAR_SCALE_FACTOR)
            .round()
            .clamp(-32_767.0, 32_767.0) as i16
    }
}

fn valid_range(plane: &[f32]) -> (f32, f32) {
    plane
        .iter()
        .filter(|v| !v.is_nan())
        .fold((f32::NAN, f32::NAN), |(lo, hi), &v| (v.min(lo), v.max(hi)))
}

pub(crate) fn write(path: &Path, opts: &SynthOptions, scene: &Scene) -> Result<(), SynthError> {
    let (h, w) = (opts.height, opts.width);
    let enc = opts.encoding;
    let planes = scene.render(opts.defect != Some(Defect::AllInvalid));
    let grid = scene.grid2km(SceneKind::Raw.grid2km_factor());
    let ties = scene.tie_points();
    let rows = code_rows(scene, opts.defect == Some(Defect::BadCodeRow));
    let mut skip: Vec<&'static str> = match opts.defect {
        Some(Defect::MissingVariable(v)) => vec![v],
        _ => Vec::new(),
    };
    if opts.release == Release::Test {
        skip.extend(["polygon_icechart", "polygon_codes"]);
    }
    let short = opts.defect == Some(Defect::MismatchedShape);
    let centre = (TIE_POINTS * TIE_POINTS) / 2;

    let mut out = SceneWriter::create(path, enc, skip)?;
    out.global(
        "title",
        "Sentinel-1 EW GRDM scene with AI4Arctic ice chart (synthetic, icefm-synth)",
    )?;
    out.global(
        "geometric_info",
        format!(
            "Sentinel-1 EW GRDM, {h} lines x {w} samples at 40 m pixel spacing; scene centre \
             latitude {:.4}, longitude {:.4}; geolocation on a {TIE_POINTS} x {TIE_POINTS} \
             tie-point grid (sar_grid_*); AMSR2 and ERA5 on a 2 km grid of 50 x 50 pixels",
            ties.latitude[centre], ties.longitude[centre]
        ),
    )?;
    out.global("sar_denoise_by_nersc_documentation", DENOISE_DOC)?;
    out.dim(SAR[0], h)?;
    out.dim(SAR[1], w)?;
    out.dim("sar_grid_points", TIE_POINTS * TIE_POINTS)?;
    out.dim("polygon_codes", rows.len())?;
    out.dim(GRID2KM[0], grid.rows)?;
    out.dim(GRID2KM[1], grid.cols)?;

    for (name, plane, pol) in [
        ("nersc_sar_primary", &planes.hh, "HH"),
        ("nersc_sar_secondary", &planes.hv, "HV"),
    ] {
        let (lo, hi) = valid_range(plane);
        let attrs = vec![
            ("polarisation", AttributeValue::from(pol)),
            ("min", lo.into()),
            ("max", hi.into()),
            (
                "description",
                format!(
                    "Sentinel-1 {pol} normalised radar cross-section (sigma nought, dB), \
                     thermal noise removed by NERSC; NaN outside the valid swath"
                )
                .into(),
            ),
        ];
        let spec = |attrs| GridVar {
            name,
            dims: SAR,
            shape: [h, w],
            sar_grid: true,
            attrs,
        };
        match enc.sar_packing {
            SarPacking::Float32 => {
                out.grid(spec(attrs), Some(f32::NAN), |y, o: &mut [f32]| {
                    o.copy_from_slice(&plane[y * w..(y + 1) * w]);
                })?;
            }
            SarPacking::Int16Scaled => {
                let mut attrs = attrs;
                attrs.push(("scale_factor", SAR_SCALE_FACTOR.into()));
                attrs.push(("add_offset", SAR_ADD_OFFSET.into()));
                out.grid(spec(attrs), Some(SAR_FILL), |y, o: &mut [i16]| {
                    for (d, &v) in o.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                        *d = pack(v);
                    }
                })?;
            }
        }
    }

    let chart_attrs = || vec![("icechart_id", AttributeValue::from(opts.chart_id()))];
    let ids: Vec<i64> = scene.polygons.iter().map(|p| p.id).collect();
    let poly_row = |y: usize| &planes.poly[y * w..(y + 1) * w];
    let spec = |name, attrs| GridVar {
        name,
        dims: SAR,
        shape: [h, w],
        sar_grid: true,
        attrs,
    };
    match enc.polygon_ids {
        PolygonIdEncoding::Float32Nan => out.grid(
            spec("polygon_icechart", chart_attrs()),
            Some(f32::NAN),
            |y, o: &mut [f32]| {
                for (d, &p) in o.iter_mut().zip(poly_row(y)) {
                    *d = if p == NO_POLYGON {
                        f32::NAN
                    } else {
                        ids[usize::from(p)] as f32
                    };
                }
            },
        )?,
        PolygonIdEncoding::Int32Fill => out.grid(
            spec("polygon_icechart", chart_attrs()),
            Some(POLYGON_ID_FILL),
            |y, o: &mut [i32]| {
                for (d, &p) in o.iter_mut().zip(poly_row(y)) {
                    *d = if p == NO_POLYGON {
                        POLYGON_ID_FILL
                    } else {
                        ids[usize::from(p)] as i32
                    };
                }
            },
        )?,
    }

    match enc.codes {
        CodesEncoding::VlenString => out.strings("polygon_codes", "polygon_codes", &rows)?,
        CodesEncoding::CharArray => {
            out.chars(
                "polygon_codes",
                ["polygon_codes", "polygon_codes_strlen"],
                &rows,
            )?;
        }
    }

    let (dist_rows, dist_dim) = out.distance_rows(short, h, SAR[0])?;
    out.grid(
        GridVar {
            name: "distance_map",
            dims: [dist_dim, SAR[1]],
            shape: [dist_rows, w],
            sar_grid: true,
            attrs: vec![(
                "description",
                "distance to land zone: 0 land, 1 … 41 growing offshore (41: > 300 km)".into(),
            )],
        },
        Some(f32::NAN),
        |y, o: &mut [f32]| {
            for (d, &z) in o.iter_mut().zip(&planes.zone[y * w..(y + 1) * w]) {
                *d = f32::from(z);
            }
        },
    )?;

    for (name, values, units) in [
        ("sar_grid_line", &ties.line, "pixel row"),
        ("sar_grid_sample", &ties.sample, "pixel column"),
        ("sar_grid_latitude", &ties.latitude, "degrees_north"),
        ("sar_grid_longitude", &ties.longitude, "degrees_east"),
        ("sar_grid_incidenceangle", &ties.incidence, "degrees"),
        ("sar_grid_height", &ties.height, "m"),
    ] {
        out.vector(
            name,
            "sar_grid_points",
            values,
            vec![("units", units.into())],
        )?;
    }

    let grid_spec = |name| GridVar {
        name,
        dims: GRID2KM,
        shape: [grid.rows, grid.cols],
        sar_grid: false,
        attrs: Vec::new(),
    };
    for (name, values) in &grid.fields {
        out.grid(grid_spec(name), None, |y, o: &mut [f64]| {
            o.copy_from_slice(&values[y * grid.cols..(y + 1) * grid.cols]);
        })?;
    }
    for (name, values) in [
        ("amsr2_swath_map", &grid.swath_map),
        ("swath_segmentation", &grid.segmentation),
    ] {
        out.grid(grid_spec(name), None, |y, o: &mut [u8]| {
            o.copy_from_slice(&values[y * grid.cols..(y + 1) * grid.cols]);
        })?;
    }
    out.close()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_within_half_a_step() {
        for v in [-45.0f32, -22.3, -10.0, 0.0, 12.5] {
            let back = f32::from(pack(v)) * SAR_SCALE_FACTOR + SAR_ADD_OFFSET;
            assert!(
                (back - v).abs() <= SAR_SCALE_FACTOR / 2.0 + 1e-5,
                "{v} {back}"
            );
        }
        assert_eq!(pack(f32::NAN), SAR_FILL);
        assert_eq!(valid_range(&[f32::NAN, -3.0, 2.0, f32::NAN]), (-3.0, 2.0));
    }
}
