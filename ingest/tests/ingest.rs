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

#[test]
fn raw_scene_pyramid_matches_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let nc = synth(dir.path(), SceneKind::Raw, 7, 0, "default");
    let store = dir.path().join("s.zarr");
    let s = run(std::slice::from_ref(&nc), &store, "80,120,200", 64);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert_eq!(s.done.len(), 1);
    let id = &s.done[0];
    let (h, w, hh, labels) = native_truth(&nc);
    for (level, f) in [("80m", 2usize), ("120m", 3), ("200m", 5)] {
        let oh = h.div_ceil(f) as u64;
        let ow = w.div_ceil(f) as u64;
        assert_eq!(
            array_shape(&store, &format!("/scenes/{id}/{level}/sar")).unwrap(),
            vec![2, oh, ow]
        );
        let sar = read_f32(
            &store,
            &format!("/scenes/{id}/{level}/sar"),
            [0..1, 0..oh, 0..ow],
        )
        .unwrap();
        let lab = read_u8(
            &store,
            &format!("/scenes/{id}/{level}/labels"),
            [0..3, 0..oh, 0..ow],
        )
        .unwrap();
        let plane = (oh * ow) as usize;
        let mut labelled = 0;
        for a in 0..oh as usize {
            for b in 0..ow as usize {
                for (t, nc) in [(0usize, 11usize), (1, 6), (2, 7)] {
                    let (mean, want) = cell(h, w, f, a, b, &hh, &labels[t], nc);
                    let got = lab[t * plane + a * ow as usize + b];
                    assert_eq!(got, want, "{level} task {t} cell ({a},{b})");
                    if t == 0 {
                        let g = sar[a * ow as usize + b];
                        assert!(
                            (g.is_nan() && mean.is_nan()) || (g - mean).abs() < 1e-4,
                            "{level} HH ({a},{b}): {g} vs {mean}"
                        );
                        labelled += usize::from(got != IGNORE);
                    }
                }
            }
        }
        assert!(
            labelled > plane / 4,
            "{level}: only {labelled} of {plane} cells labelled"
        );
    }
    // Manifests: one scene, its polygons, and one patch row per chunk of every level.
    let m = store.join("manifests");
    let scenes = read_parquet(&m.join("scenes.parquet")).unwrap();
    assert_eq!(scenes[0].num_rows(), 1);
    let kind = col::<StringArray>(&scenes[0], "kind");
    assert_eq!(kind.value(0), "raw");
    let valid = col::<UInt64Array>(&scenes[0], "valid_pixels");
    assert_eq!(
        valid.value(0),
        hh.iter().filter(|v| !v.is_nan()).count() as u64
    );
    let sod_px = col::<FixedSizeListArray>(&scenes[0], "sod_pixels");
    let sod_vals = sod_px
        .values()
        .as_any()
        .downcast_ref::<UInt64Array>()
        .unwrap();
    for c in 0..6u8 {
        let want = labels[1].iter().filter(|&&v| v == c).count() as u64;
        assert_eq!(sod_vals.value(c as usize), want, "SOD class {c}");
    }
    let polygons = read_parquet(&m.join("polygons.parquet")).unwrap();
    let px = col::<UInt64Array>(&polygons[0], "pixels");
    assert!(px.len() >= 5);
    let patches = read_parquet(&m.join("patches.parquet")).unwrap();
    let n: usize = patches.iter().map(|b| b.num_rows()).sum();
    let want: usize = [2usize, 3, 5]
        .iter()
        .map(|f| h.div_ceil(*f).div_ceil(64) * w.div_ceil(*f).div_ceil(64))
        .sum();
    assert_eq!(n, want);
    let b = &patches[0];
    let ph = col::<UInt32Array>(b, "height");
    let pw = col::<UInt32Array>(b, "width");
    let vf = col::<Float32Array>(b, "valid_fraction");
    let hist = col::<FixedSizeListArray>(b, "sic_hist");
    let hv = hist
        .values()
        .as_any()
        .downcast_ref::<UInt32Array>()
        .unwrap();
    for i in 0..b.num_rows() {
        let total: u32 = (0..12).map(|k| hv.value(i * 12 + k)).sum();
        assert_eq!(
            total,
            ph.value(i) * pw.value(i),
            "patch {i}: histogram covers the patch"
        );
        assert!((0.0..=1.0).contains(&vf.value(i)));
    }
}

#[test]
fn every_encoding_gives_the_same_store_content() {
    let dir = tempfile::tempdir().unwrap();
    let mut reference: Option<(Vec<u8>, Vec<f32>)> = None;
    for (i, (name, _)) in Encoding::all_named().into_iter().enumerate() {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let nc = synth(&sub, SceneKind::Raw, 11, 0, name);
        let store = sub.join("s.zarr");
        let s = run(&[nc], &store, "80,200", 64);
        assert!(s.failed.is_empty(), "{name}: {:?}", s.failed);
        let id = &s.done[0];
        let shape = array_shape(&store, &format!("/scenes/{id}/80m/labels")).unwrap();
        let lab = read_u8(
            &store,
            &format!("/scenes/{id}/80m/labels"),
            [0..3, 0..shape[1], 0..shape[2]],
        )
        .unwrap();
        let sar = read_f32(
            &store,
            &format!("/scenes/{id}/80m/sar"),
            [0..2, 0..shape[1], 0..shape[2]],
        )
        .unwrap();
        match &reference {
            None => reference = Some((lab, sar)),
            Some((l0, s0)) => {
                assert_eq!(&lab, l0, "encoding {name} (#{i}) changes the labels");
                for (a, b) in sar.iter().zip(s0) {
                    // int16 packing quantises dB to its scale factor.
                    assert!(
                        (a.is_nan() && b.is_nan()) || (a - b).abs() < 0.02,
                        "{name}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Every array of a scene's level, labels as bytes and SAR/aux as bits.
fn level_arrays(store: &Path, id: &str, level: &str) -> (Vec<u8>, Vec<u32>) {
    let node = |a: &str| format!("/scenes/{id}/{level}/{a}");
    let shape = array_shape(store, &node("labels")).unwrap();
    let (h, w) = (shape[1], shape[2]);
    let labels = read_u8(store, &node("labels"), [0..3, 0..h, 0..w]).unwrap();
    let mut bits: Vec<u32> = Vec::new();
    for a in ["sar", "aux"] {
        let v = read_f32(store, &node(a), [0..2, 0..h, 0..w]).unwrap();
        bits.extend(v.iter().map(|x| x.to_bits()));
    }
    (labels, bits)
}

/// The test release: an RTT scene file without charts and its `<stem>_reference.nc` holding
/// them. In every encoding, ingest reads the charts from the reference (beside the scene or in
/// a `--reference` folder) and writes exactly the store of the training-release file. Without
/// its reference a scene is ingested with every label 255 and a warning; once the reference is
/// there, the scene is new again (not skipped). A reference on another grid fails the scene.
#[test]
fn test_release_scenes_take_their_charts_from_reference_files() {
    let dir = tempfile::tempdir().unwrap();
    let opts = |encoding: &str, release: Release| {
        let mut o = SynthOptions::new(SceneKind::Rtt, H / 2 + 10, W / 2 + 10, 31);
        o.index = 4;
        o.encoding = Encoding::named(encoding).unwrap();
        o.release = release;
        o
    };
    let ingest_with = |inputs: &[PathBuf], store: &Path, dirs: Vec<PathBuf>| {
        let attrs = new_attrs(
            &Level::parse_list("80,200").unwrap(),
            64,
            Codec::Zstd { level: 3 },
        );
        let o = IngestOptions {
            reference_dirs: dirs,
            ..IngestOptions::default()
        };
        ingest(inputs, store, attrs, &o, &NoReporter).unwrap()
    };
    let train = write(&dir.path().join("train"), opts("default", Release::Train));
    let s = run(
        std::slice::from_ref(&train),
        &dir.path().join("train.zarr"),
        "80,200",
        64,
    );
    let id = s.done[0].clone();
    let want = [
        level_arrays(&dir.path().join("train.zarr"), &id, "80m"),
        level_arrays(&dir.path().join("train.zarr"), &id, "200m"),
    ];
    assert!(want[0].0.iter().filter(|&&l| l != IGNORE).count() > want[0].0.len() / 3);
    for (name, _) in Encoding::all_named() {
        let sub = dir.path().join(name);
        let nc = write(&sub, opts(name, Release::Test));
        let reference = sub.join(opts(name, Release::Test).reference_file_name().unwrap());
        assert!(reference.is_file());
        let f = netcdf::open(&nc).unwrap();
        assert!(f.variable("SIC").is_none() && f.variable("nersc_sar_primary").is_some());
        drop(f);
        let store = sub.join("s.zarr");
        let s = ingest_with(std::slice::from_ref(&nc), &store, Vec::new());
        assert_eq!(s.done, vec![id.clone()], "{name}: {:?}", s.failed);
        assert!(s.warnings.is_empty(), "{name}: {:?}", s.warnings);
        for (k, level) in ["80m", "200m"].into_iter().enumerate() {
            let got = level_arrays(&store, &id, level);
            assert!(got.0 == want[k].0, "{name} {level}: labels differ");
            assert!(got.1 == want[k].1, "{name} {level}: SAR or aux differ");
        }
    }
    // The scene alone: ingested, every label 255, and said.
    let alone = dir.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let sub = dir.path().join("default");
    let nc_name = opts("default", Release::Test).file_name();
    let ref_name = opts("default", Release::Test)
        .reference_file_name()
        .unwrap();
    std::fs::copy(sub.join(&nc_name), alone.join(&nc_name)).unwrap();
    let nc = alone.join(&nc_name);
    let store = dir.path().join("alone.zarr");
    let s = ingest_with(std::slice::from_ref(&nc), &store, Vec::new());
    assert_eq!(s.done, vec![id.clone()]);
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(
        s.warnings[0].1.contains(&format!("no {}", ref_name)),
        "{:?}",
        s.warnings
    );
    let (labels, _) = level_arrays(&store, &id, "80m");
    assert!(labels.iter().all(|&l| l == IGNORE));
    // Its reference in another folder, given: the scene is new again and gets its charts.
    let refs = dir.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::copy(sub.join(&ref_name), refs.join(&ref_name)).unwrap();
    let s = ingest_with(std::slice::from_ref(&nc), &store, vec![refs.clone()]);
    assert_eq!((s.done.clone(), s.skipped.len()), (vec![id.clone()], 0));
    assert_eq!(level_arrays(&store, &id, "80m"), want[0]);
    let s = ingest_with(std::slice::from_ref(&nc), &store, vec![refs.clone()]);
    assert_eq!(s.skipped, vec![id.clone()]);
    // A reference on another grid fails the scene, naming the reference.
    let mut other = opts("default", Release::Test);
    other.height += 6;
    let odd = dir.path().join("odd");
    write(&odd, other);
    std::fs::rename(odd.join(&ref_name), refs.join(&ref_name)).unwrap();
    let s = ingest_with(
        std::slice::from_ref(&nc),
        &dir.path().join("odd.zarr"),
        vec![refs],
    );
    assert_eq!(s.failed.len(), 1);
    let msg = &s.failed[0].1;
    assert!(
        msg.starts_with(&format!(
            "{}: variable `SIC`: shape",
            refs_path(dir.path(), &ref_name)
        )) && msg.contains("does not match the scene's SAR grid"),
        "{msg}"
    );
}

fn refs_path(dir: &Path, name: &str) -> String {
    dir.join("refs").join(name).display().to_string()
}

/// Bands read as raw HDF5 chunks inflated off the netCDF thread equal netCDF-C's own read,
/// bit for bit, in every encoding and both releases; chunked deflate files take that path,
/// contiguous ones do not.
#[test]
fn raw_chunk_reading_equals_netcdf_reading_in_every_encoding() {
    fn bits(b: &Band) -> Vec<u64> {
        let mut v: Vec<u64> = [&b.hh, &b.hv, &b.distance]
            .into_iter()
            .chain(b.incidence.as_ref())
            .flat_map(|x| x.iter().map(|f| u64::from(f.to_bits())))
            .collect();
        match &b.labels {
            BandLabels::PolygonIds(ids) => v.extend(ids.iter().map(|f| f.to_bits())),
            BandLabels::Charts(c) => v.extend(c.iter().flatten().map(|&x| u64::from(x))),
            BandLabels::None => {}
        }
        v
    }
    let dir = tempfile::tempdir().unwrap();
    for kind in [SceneKind::Raw, SceneKind::Rtt] {
        for (name, _) in Encoding::all_named() {
            let sub = dir.path().join(format!("{kind:?}-{name}"));
            std::fs::create_dir_all(&sub).unwrap();
            let nc = synth(&sub, kind, 5, 0, name);
            let (fast, bands_equal) = on_netcdf_thread(move || {
                let r = SceneReader::open(&nc).unwrap();
                let h = r.info().height;
                let mut equal = Vec::new();
                // A chunk-aligned band, an unaligned one and the last rows.
                for (row0, rows) in [(0, h.min(64)), (7, 50), (h - 3, 3)] {
                    let netcdf = r.read_band_netcdf(row0, rows).unwrap();
                    let raw = r.read_band_raw(row0, rows).unwrap();
                    let chunks = r.decode_band(raw).unwrap();
                    equal.push(
                        bits(&netcdf) == bits(&chunks) && netcdf.hh.len() == rows * r.info().width,
                    );
                }
                (r.raw_chunk_variables(), equal)
            });
            assert!(
                bands_equal.iter().all(|&e| e),
                "{kind:?} {name}: {bands_equal:?}"
            );
            let expected = match (name, kind) {
                ("contiguous-uncompressed", _) => 0,
                (_, SceneKind::Raw) => 4,
                (_, SceneKind::Rtt) => 7,
            };
            assert_eq!(fast.len(), expected, "{kind:?} {name}: {fast:?}");
        }
    }
}

#[test]
fn rtt_scene_keeps_native_values_at_80m_and_resamples_fractionally() {
    let dir = tempfile::tempdir().unwrap();
    let nc = synth(dir.path(), SceneKind::Rtt, 5, 1, "default");
    let store = dir.path().join("s.zarr");
    let s = run(std::slice::from_ref(&nc), &store, "80,200", 64);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    let id = &s.done[0];
    let (h, w, hh, labels) = native_truth(&nc);
    let sar = read_f32(
        &store,
        &format!("/scenes/{id}/80m/sar"),
        [0..1, 0..h as u64, 0..w as u64],
    )
    .unwrap();
    for (a, b) in sar.iter().zip(&hh) {
        assert!(
            (a.is_nan() && b.is_nan()) || (a - b).abs() < 1e-4,
            "{a} vs {b}"
        );
    }
    let lab = read_u8(
        &store,
        &format!("/scenes/{id}/80m/labels"),
        [0..3, 0..h as u64, 0..w as u64],
    )
    .unwrap();
    for t in 0..3 {
        assert_eq!(&lab[t * h * w..(t + 1) * h * w], &labels[t][..], "task {t}");
    }
    // 200 m from 80 m is a ratio of 2.5.
    let shape = array_shape(&store, &format!("/scenes/{id}/200m/sar")).unwrap();
    assert_eq!(
        shape,
        vec![
            2,
            (h as f64 / 2.5).ceil() as u64,
            (w as f64 / 2.5).ceil() as u64
        ]
    );
    let scenes = read_parquet(&store.join("manifests/scenes.parquet")).unwrap();
    let kind = col::<StringArray>(&scenes[0], "kind");
    assert_eq!(kind.value(0), "rtt");
}

fn tree_bytes(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn rerun_skips_and_interrupted_run_resumes_to_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(dir.path(), SceneKind::Raw, 1, 0, "default");
    let b = synth(dir.path(), SceneKind::Raw, 2, 1, "row-chunks");
    let inputs = vec![a.clone(), b.clone()];
    let clean = dir.path().join("clean.zarr");
    let s = run(&inputs, &clean, "80,200", 64);
    assert_eq!(s.done.len(), 2);
    let again = run(&inputs, &clean, "80,200", 64);
    assert_eq!(again.skipped.len(), 2);
    assert!(again.done.is_empty());

    // Simulate a kill: scene A complete, scene B's arrays half written and not committed.
    let resumed = dir.path().join("resumed.zarr");
    run(std::slice::from_ref(&a), &resumed, "80,200", 64);
    let s_b = run(
        std::slice::from_ref(&b),
        &dir.path().join("tmp.zarr"),
        "80,200",
        64,
    );
    let b_id = &s_b.done[0];
    let src = dir.path().join("tmp.zarr/scenes").join(b_id);
    let dst = resumed.join("scenes").join(b_id);
    std::fs::create_dir_all(dst.join("80m")).unwrap();
    std::fs::copy(src.join("zarr.json"), dst.join("zarr.json")).unwrap();
    std::fs::write(dst.join("80m/zarr.json"), b"{ truncated").unwrap();
    std::fs::write(
        resumed.join("manifests/parts/junk.scene.parquet.tmp"),
        b"partial",
    )
    .unwrap();
    let s = run(&inputs, &resumed, "80,200", 64);
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.done, vec![b_id.clone()]);
    std::fs::remove_file(resumed.join("manifests/parts/junk.scene.parquet.tmp")).unwrap();
    let (x, y) = (tree_bytes(&clean), tree_bytes(&resumed));
    assert_eq!(x.len(), y.len());
    for ((pa, da), (pb, db)) in x.iter().zip(&y) {
        assert_eq!(pa, pb);
        assert!(
            da == db,
            "{} differs between the clean and the resumed store",
            pa.display()
        );
    }
}

#[test]
fn bad_inputs_fail_alone_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = synth(dir.path(), SceneKind::Raw, 3, 0, "default");
    let mut inputs = vec![good];
    let mut expect: Vec<(&str, &str)> = Vec::new();
    // Truncated copy of a good file.
    let t = synth(&dir.path().join("t"), SceneKind::Raw, 4, 1, "default");
    let bytes = std::fs::read(&t).unwrap();
    let truncated = dir.path().join("truncated.nc");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    inputs.push(truncated);
    expect.push(("truncated.nc", ""));
    let junk = dir.path().join("notes.nc");
    std::fs::write(&junk, b"this is not a NetCDF file\n").unwrap();
    inputs.push(junk);
    expect.push(("notes.nc", "not a readable NetCDF"));
    for (i, (defect, var)) in [
        (
            Defect::MissingVariable("nersc_sar_secondary"),
            "nersc_sar_secondary",
        ),
        (Defect::MismatchedShape, "distance_map"),
        (Defect::BadCodeRow, "polygon_codes"),
        (Defect::AllInvalid, "nersc_sar_primary"),
    ]
    .into_iter()
    .enumerate()
    {
        let sub = dir.path().join(format!("d{i}"));
        let mut o = SynthOptions::new(SceneKind::Raw, 200, 220, 20 + i as u64);
        o.index = 10 + i as u32;
        o.defect = Some(defect);
        let p = write(&sub, o);
        expect.push((
            Box::leak(
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
                    .into_boxed_str(),
            ),
            var,
        ));
        inputs.push(p);
    }
    let store = dir.path().join("s.zarr");
    let s = run(&inputs, &store, "80,200", 64);
    assert_eq!(s.done.len(), 1, "{:?}", s.failed);
    assert_eq!(s.failed.len(), expect.len(), "{:?}", s.failed);
    for ((path, msg), (file, var)) in s.failed.iter().zip(&expect) {
        assert!(path.to_string_lossy().ends_with(file));
        assert!(msg.contains(file), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(var), "{msg} should name {var}");
    }
    // The store stays valid: manifests list exactly the good scene, no stray scene folders.
    let scenes = read_parquet(&store.join("manifests/scenes.parquet")).unwrap();
    assert_eq!(scenes.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    let dirs = std::fs::read_dir(store.join("scenes"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(dirs, 1);
}

/// One store holds one file per scene: a second file of a scene in the same run, or in a later
/// one, is refused, and so is a scene claimed by another ingest (another process's claim);
/// the other inputs go on, and nothing is left of a refused scene.
#[test]
fn one_file_per_scene_and_other_ingests_claims_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let raw = synth(&dir.path().join("raw"), SceneKind::Raw, 5, 0, "default");
    let rtt = synth(&dir.path().join("rtt"), SceneKind::Rtt, 5, 0, "default");
    let other = synth(&dir.path().join("o"), SceneKind::Raw, 6, 1, "default");
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let store = dir.path().join("s.zarr");
    let s = run(&[raw.clone(), rtt.clone()], &store, "80,200", 64);
    assert_eq!(s.done.len(), 1, "{:?}", s.failed);
    let id = s.done[0].clone();
    assert_eq!(s.failed.len(), 1);
    // The two files run at once: whichever opens second is refused.
    let (second, first) = if s.failed[0].0 == rtt {
        (&rtt, &raw)
    } else {
        (&raw, &rtt)
    };
    assert_eq!(&s.failed[0].0, second);
    let want = format!("scene {id} is also given as {}", first.display());
    assert!(s.failed[0].1.contains(&want), "{}", s.failed[0].1);
    // A later run with the scene's other file.
    let s = run(std::slice::from_ref(second), &store, "80,200", 64);
    let want = format!("scene {id} is already in the store from {}", name(first));
    assert!(s.failed[0].1.contains(&want), "{:?}", s.failed);
    // Another store where an ingest of another file holds the scene (its process is gone).
    let store = dir.path().join("claimed.zarr");
    let s = run(std::slice::from_ref(&other), &store, "80,200", 64);
    assert_eq!(s.done.len(), 1, "{:?}", s.failed);
    let claims = store.join("manifests/claims");
    std::fs::create_dir_all(&claims).unwrap();
    let claim = claims.join(format!("{id}.claim"));
    std::fs::write(&claim, "ghost.nc\nnode-3\n12345\n").unwrap();
    let s = run(&[raw.clone(), other.clone()], &store, "80,200", 64);
    assert_eq!((s.done.len(), s.skipped.len()), (0, 1));
    assert_eq!(s.failed.len(), 1);
    let want = format!(
        "{}: scene {id} is claimed by an ingest of ghost.nc (host node-3, process 12345); if no \
         ingest of it is running, remove {}",
        raw.display(),
        claim.display()
    );
    assert_eq!(s.failed[0].1, want);
    assert!(!store.join("scenes").join(&id).exists());
    assert_eq!(s.scenes_in_store, 1);
    // Once the claim is gone the scene goes in; the run leaves no claim behind.
    std::fs::remove_file(&claim).unwrap();
    let s = run(&[raw, other], &store, "80,200", 64);
    assert_eq!((s.done.clone(), s.skipped.len()), (vec![id], 1));
    assert_eq!(s.scenes_in_store, 2);
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
}

/// A code in no SIGRID-3 table (CT range code 12) becomes 255 for that polygon, and is counted
/// and reported per scene instead of passed through.
#[test]
fn out_of_table_code_is_ignored_counted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let nc = synth(dir.path(), SceneKind::Raw, 9, 0, "default");
    // Rewrite the first ice polygon's CT to 12 in place.
    let path = nc.clone();
    let poly_id = on_netcdf_thread(move || {
        let mut f = netcdf::append(&path).unwrap();
        let mut v = f.variable_mut("polygon_codes").unwrap();
        let n = v.dimensions()[0].len();
        for i in 1..n {
            let row = v.get_string(i).unwrap();
            let fields: Vec<&str> = row.split(';').collect();
            if fields[14].trim() == "I" && fields[1].trim() != "99" {
                let mut new = fields.clone();
                new[1] = "12";
                v.put_string(&new.join(";"), i).unwrap();
                return fields[0].trim().parse::<i64>().unwrap();
            }
        }
        panic!("no ice polygon");
    });
    let store = dir.path().join("s.zarr");
    let s = run(std::slice::from_ref(&nc), &store, "80", 64);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    let warning = &s
        .warnings
        .iter()
        .find(|(_, w)| w.contains("outside the SIGRID-3 tables"))
        .unwrap()
        .1;
    assert!(
        warning.contains(&format!("polygon {poly_id}: CT=12")),
        "{warning}"
    );
    let scenes = read_parquet(&store.join("manifests/scenes.parquet")).unwrap();
    let count = col::<UInt32Array>(&scenes[0], "unknown_code_count");
    assert_eq!(count.value(0), 1);
    let polygons = read_parquet(&store.join("manifests/polygons.parquet")).unwrap();
    let b = &polygons[0];
    let ids = col::<arrow_array::Int64Array>(b, "poly_id");
    let sic = col::<arrow_array::UInt8Array>(b, "sic");
    let ct = col::<StringArray>(b, "ct");
    let unknown = col::<StringArray>(b, "unknown_codes");
    let i = (0..b.num_rows())
        .find(|&i| ids.value(i) == poly_id)
        .unwrap();
    assert_eq!(
        (sic.value(i), ct.value(i), unknown.value(i)),
        (255, "12", "CT=12")
    );
    // Every pixel of that polygon is 255 for SIC: the scene's ignore bin holds at least them.
    let px = col::<UInt64Array>(b, "pixels");
    let sic_px = col::<FixedSizeListArray>(&scenes[0], "sic_pixels");
    let sic_px = sic_px
        .values()
        .as_any()
        .downcast_ref::<UInt64Array>()
        .unwrap();
    assert!(px.value(i) > 0);
    assert!(
        sic_px.value(11) >= px.value(i),
        "{} < {}",
        sic_px.value(11),
        px.value(i)
    );
    let id = &s.done[0];
    let shape = array_shape(&store, &format!("/scenes/{id}/80m/labels")).unwrap();
    let lab = read_u8(
        &store,
        &format!("/scenes/{id}/80m/labels"),
        [0..1, 0..shape[1], 0..shape[2]],
    )
    .unwrap();
    assert!(lab.iter().all(|&v| v <= 10 || v == IGNORE));
}
