//! The store's content against brute-force computations from the NetCDF files, in every encoding and release.

use super::*;

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
    // Distance zones come back as the integers they are (the file stores them standard-scaled
    // in float32, which alone gives 2.000002 and land as ±7e-7), land among them.
    let store = dir.path().join("train.zarr");
    let shape = array_shape(&store, &format!("/scenes/{id}/80m/aux")).unwrap();
    let distance = read_f32(
        &store,
        &format!("/scenes/{id}/80m/aux"),
        [1..2, 0..shape[1], 0..shape[2]],
    )
    .unwrap();
    let zones: Vec<f32> = distance.into_iter().filter(|d| !d.is_nan()).collect();
    assert!(zones.len() > 1000, "{}", zones.len());
    assert!(
        zones
            .iter()
            .all(|z| z.fract() == 0.0 && (0.0..=41.0).contains(z))
    );
    assert!(zones.contains(&0.0) && zones.iter().any(|&z| z > 1.0));
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
