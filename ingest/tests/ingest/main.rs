//! End-to-end ingest of generated AI4Arctic-format scenes, checked against independent
//! brute-force computations from the NetCDF content.
#![allow(clippy::unwrap_used, clippy::too_many_arguments, missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::{
    Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use icefm_ingest::manifest::read_parquet;
use icefm_ingest::netcdf_thread::on_netcdf_thread;
use icefm_ingest::pipeline::{IngestOptions, NoReporter, Summary, ingest};
use icefm_ingest::reader::{Band, BandLabels, SceneReader};
use icefm_ingest::store::{array_shape, new_attrs, read_f32, read_u8};
use icefm_schemas::sigrid::{MergeMode, PolygonCode};
use icefm_schemas::store::Codec;
use icefm_schemas::{IGNORE, Level};
use icefm_synth::{Defect, Encoding, Release, SceneKind, SynthOptions, write_scene};

mod content;
mod geolocation;
mod runs;
#[path = "../../../tests/support/tree.rs"]
mod tree;
use tree::tree_bytes;

const H: usize = 260;
const W: usize = 300;

/// A manifest column of a given Arrow type.
fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
}

fn synth(dir: &Path, kind: SceneKind, seed: u64, index: u32, encoding: &str) -> PathBuf {
    let (h, w) = if kind == SceneKind::Raw {
        (H, W)
    } else {
        (H / 2 + 10, W / 2 + 10)
    };
    let mut o = SynthOptions::new(kind, h, w, seed);
    o.index = index;
    o.encoding = Encoding::named(encoding).unwrap();
    write(dir, o)
}

fn write(dir: &Path, o: SynthOptions) -> PathBuf {
    write_scene(dir, &o).unwrap()
}

fn run(inputs: &[PathBuf], store: &Path, levels: &str, patch: u32) -> Summary {
    let attrs = new_attrs(
        &Level::parse_list(levels).unwrap(),
        patch,
        Codec::Zstd { level: 3 },
    );
    ingest(inputs, store, attrs, &IngestOptions::default(), &NoReporter).unwrap()
}

/// Native HH (dB, NaN invalid) and labels derived by brute force from the NetCDF file.
fn native_truth(path: &Path) -> (usize, usize, Vec<f32>, [Vec<u8>; 3]) {
    let path = path.to_path_buf();
    on_netcdf_thread(move || native_truth_here(&path))
}

fn native_truth_here(path: &Path) -> (usize, usize, Vec<f32>, [Vec<u8>; 3]) {
    let f = netcdf::open(path).unwrap();
    let hh_var = f.variable("nersc_sar_primary").unwrap();
    let dims: Vec<usize> = hh_var.dimensions().iter().map(|d| d.len()).collect();
    let (h, w) = (dims[0], dims[1]);
    let mut hh: Vec<f32> = hh_var.get_values::<f32, _>(..).unwrap();
    let attr = |name: &str| {
        hh_var.attribute_value(name).map(|v| match v.unwrap() {
            netcdf::AttributeValue::Float(x) => f64::from(x),
            netcdf::AttributeValue::Double(x) => x,
            netcdf::AttributeValue::Short(x) => f64::from(x),
            other => panic!("{other:?}"),
        })
    };
    let (fill, scale, offset) = (attr("_FillValue"), attr("scale_factor"), attr("add_offset"));
    let rtt = f.variable("SIC").is_some();
    for x in &mut hh {
        if fill.is_some_and(|fv| f64::from(*x) == fv) {
            *x = f32::NAN;
        } else {
            *x = (f64::from(*x) * scale.unwrap_or(1.0) + offset.unwrap_or(0.0)) as f32;
            if rtt {
                *x = if *x == 0.0 {
                    f32::NAN
                } else {
                    *x * 5.659746 - 14.508255
                };
            }
        }
    }
    let mut labels = [
        vec![IGNORE; h * w],
        vec![IGNORE; h * w],
        vec![IGNORE; h * w],
    ];
    if rtt {
        for (t, name) in ["SIC", "SOD", "FLOE"].iter().enumerate() {
            labels[t] = f.variable(name).unwrap().get_values::<u8, _>(..).unwrap();
        }
    } else {
        let ids: Vec<f64> = f
            .variable("polygon_icechart")
            .unwrap()
            .get_values::<f64, _>(..)
            .unwrap();
        let ids_var = f.variable("polygon_icechart").unwrap();
        let id_fill = ids_var
            .attribute_value("_FillValue")
            .map(|v| match v.unwrap() {
                netcdf::AttributeValue::Int(x) => f64::from(x),
                netcdf::AttributeValue::Float(x) => f64::from(x),
                other => panic!("{other:?}"),
            });
        let codes = f.variable("polygon_codes").unwrap();
        let n = codes.dimensions()[0].len();
        let rows: Vec<String> = match codes.vartype() {
            netcdf::types::NcVariableType::String => {
                (0..n).map(|i| codes.get_string(i).unwrap()).collect()
            }
            _ => {
                let len = codes.dimensions()[1].len();
                let b = codes.get_raw_values(..).unwrap();
                (0..n)
                    .map(|i| {
                        String::from_utf8_lossy(&b[i * len..(i + 1) * len])
                            .trim_end_matches('\0')
                            .to_string()
                    })
                    .collect()
            }
        };
        let table: HashMap<i64, (u8, u8, u8)> = rows[1..]
            .iter()
            .map(|r| {
                let c = PolygonCode::parse(r).unwrap();
                let d = c.derive(MergeMode::Sum);
                (c.poly_id, (d.sic, d.sod, d.floe))
            })
            .collect();
        for k in 0..h * w {
            let id = ids[k];
            if id.is_nan() || id_fill == Some(id) || hh[k].is_nan() {
                continue;
            }
            if let Some(&(a, b, c)) = table.get(&(id as i64)) {
                labels[0][k] = a;
                labels[1][k] = b;
                labels[2][k] = c;
            }
        }
    }
    for k in 0..h * w {
        if hh[k].is_nan() {
            for l in &mut labels {
                l[k] = IGNORE;
            }
        }
    }
    (h, w, hh, labels)
}

/// Brute-force integer-factor resampling of one cell.
fn cell(
    h: usize,
    w: usize,
    f: usize,
    a: usize,
    b: usize,
    hh: &[f32],
    lab: &[u8],
    n_classes: usize,
) -> (f32, u8) {
    let (mut s, mut n) = (0.0f64, 0.0f64);
    let mut votes = vec![0usize; n_classes];
    for i in a * f..((a + 1) * f).min(h) {
        for j in b * f..((b + 1) * f).min(w) {
            let v = hh[i * w + j];
            if !v.is_nan() {
                s += f64::from(v);
                n += 1.0;
            }
            if lab[i * w + j] != IGNORE {
                votes[lab[i * w + j] as usize] += 1;
            }
        }
    }
    let total: usize = votes.iter().sum();
    let mut best = 0;
    for c in 1..n_classes {
        if votes[c] > votes[best] {
            best = c;
        }
    }
    let label = if total > 0 && 2 * total >= f * f {
        best as u8
    } else {
        IGNORE
    };
    (if n > 0.0 { (s / n) as f32 } else { f32::NAN }, label)
}
