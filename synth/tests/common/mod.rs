//! Decoding helpers shared by the integration tests: they read files the way a careful reader
//! must (apply `_FillValue`, `scale_factor`, `add_offset`; accept vlen or char code tables).

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use icefm_synth::{SceneKind, SynthOptions, write_scene};
use netcdf::types::NcVariableType;

/// Write `opts` into a fresh temporary directory.
pub fn write(opts: &SynthOptions) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_scene(dir.path(), opts).unwrap();
    (dir, path)
}

pub fn open(path: &Path) -> netcdf::File {
    netcdf::open(path).unwrap()
}

/// A small raw scene with defaults.
pub fn raw(seed: u64) -> SynthOptions {
    SynthOptions::new(SceneKind::Raw, 300, 320, seed)
}

fn attr_f64(var: &netcdf::Variable<'_>, name: &str) -> Option<f64> {
    var.attribute_value(name)
        .map(|v| f64::try_from(v.unwrap()).unwrap())
}

/// A numeric variable decoded to f64: `_FillValue` → NaN, then `scale_factor`, `add_offset`.
pub fn decoded(file: &netcdf::File, name: &str) -> Vec<f64> {
    let var = file
        .variable(name)
        .unwrap_or_else(|| panic!("no variable {name}"));
    let raw: Vec<f64> = var.get_values::<f64, _>(..).unwrap();
    let fill = attr_f64(&var, "_FillValue");
    let scale = attr_f64(&var, "scale_factor").unwrap_or(1.0);
    let offset = attr_f64(&var, "add_offset").unwrap_or(0.0);
    raw.into_iter()
        .map(|v| match fill {
            Some(f) if v == f || (f.is_nan() && v.is_nan()) => f64::NAN,
            _ => v * scale + offset,
        })
        .collect()
}

/// Polygon id per pixel, `None` outside every polygon, whatever the encoding.
pub fn polygon_ids(file: &netcdf::File) -> Vec<Option<i64>> {
    decoded(file, "polygon_icechart")
        .into_iter()
        .map(|v| (!v.is_nan()).then_some(v as i64))
        .collect()
}

/// The `polygon_codes` rows, header included, whatever the encoding.
pub fn code_rows(file: &netcdf::File) -> Vec<String> {
    let var = file.variable("polygon_codes").unwrap();
    match var.vartype() {
        NcVariableType::String => (0..var.len())
            .map(|i| var.get_string([i]).unwrap())
            .collect(),
        NcVariableType::Char => {
            let dims = var.dimensions();
            let len = dims[1].len();
            let bytes = var.get_raw_values(..).unwrap();
            bytes
                .chunks(len)
                .map(|r| {
                    let end = r.iter().position(|&b| b == 0).unwrap_or(r.len());
                    String::from_utf8(r[..end].to_vec()).unwrap()
                })
                .collect()
        }
        other => panic!("polygon_codes has type {other:?}"),
    }
}

pub fn dim(file: &netcdf::File, name: &str) -> usize {
    file.dimension_len(name)
        .unwrap_or_else(|| panic!("no dimension {name}"))
}

pub fn global_str(file: &netcdf::File, name: &str) -> String {
    String::try_from(file.attribute(name).unwrap().value().unwrap()).unwrap()
}

pub fn var_str(file: &netcdf::File, var: &str, name: &str) -> String {
    let v = file.variable(var).unwrap();
    String::try_from(v.attribute_value(name).unwrap().unwrap()).unwrap()
}

pub fn var_f64(file: &netcdf::File, var: &str, name: &str) -> f64 {
    let v = file.variable(var).unwrap();
    attr_f64(&v, name).unwrap_or_else(|| panic!("no attribute {var}:{name}"))
}

/// Bit-exact comparison of f64 vectors (NaN equal to NaN).
pub fn same_bits(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
