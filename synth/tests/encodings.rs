//! Every named encoding writes a file that reopens through the netcdf crate with the expected
//! dimensions, types, attributes and storage, and decodes to the same values.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icefm_synth::{
    Chunking, CodesEncoding, Encoding, POLYGON_ID_FILL, PolygonIdEncoding, SAR_ADD_OFFSET,
    SAR_FILL, SAR_SCALE_FACTOR, SarPacking, SceneKind, SynthError, SynthOptions, write_scene,
};
use netcdf::types::{FloatType, IntType, NcVariableType};

const F32: NcVariableType = NcVariableType::Float(FloatType::F32);
const F64: NcVariableType = NcVariableType::Float(FloatType::F64);
const U8: NcVariableType = NcVariableType::Int(IntType::U8);

fn expected_chunks(enc: &Encoding, h: usize, w: usize) -> Option<Vec<usize>> {
    match enc.chunking {
        Chunking::Contiguous => None,
        Chunking::Chunked { rows, cols } => Some(vec![rows.min(h), cols.min(w)]),
    }
}

#[test]
fn every_named_encoding_writes_the_expected_raw_file() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let base = raw(5);
        let (_d0, p0) = write(&base);
        let f0 = open(&p0);
        let reference = |name: &str| decoded(&f0, name);
        let ref_rows = code_rows(&f0);
        let ref_ids = polygon_ids(&f0);
        let mut sizes = Vec::new();
        for (name, enc) in Encoding::all_named() {
            let mut opts = base.clone();
            opts.encoding = enc;
            let (_dir, path) = write(&opts);
            assert_eq!(
                path.file_name().unwrap().to_str().unwrap(),
                base.raw_file_name()
            );
            let f = open(&path);

            for v in SceneKind::Raw.variables() {
                assert!(f.variable(v).is_some(), "{name}: no {v}");
            }
            assert_eq!(dim(&f, "sar_lines"), 300);
            assert_eq!(dim(&f, "sar_samples"), 320);
            assert_eq!(dim(&f, "sar_grid_points"), 441);
            assert_eq!(dim(&f, "2km_grid_lines"), 6);
            assert_eq!(dim(&f, "2km_grid_samples"), 6);
            assert_eq!(dim(&f, "polygon_codes"), ref_rows.len());
            for g in [
                "title",
                "geometric_info",
                "sar_denoise_by_nersc_documentation",
            ] {
                assert!(!global_str(&f, g).is_empty(), "{name}: {g}");
            }

            // Types and encoding attributes.
            let sar_type = f.variable("nersc_sar_primary").unwrap().vartype();
            match enc.sar_packing {
                SarPacking::Float32 => assert_eq!(sar_type, F32, "{name}"),
                SarPacking::Int16Scaled => {
                    assert_eq!(sar_type, NcVariableType::Int(IntType::I16), "{name}");
                    for v in ["nersc_sar_primary", "nersc_sar_secondary"] {
                        assert_eq!(var_f64(&f, v, "scale_factor"), f64::from(SAR_SCALE_FACTOR));
                        assert_eq!(var_f64(&f, v, "add_offset"), f64::from(SAR_ADD_OFFSET));
                        assert_eq!(var_f64(&f, v, "_FillValue"), f64::from(SAR_FILL));
                    }
                }
            }
            let ids_type = f.variable("polygon_icechart").unwrap().vartype();
            match enc.polygon_ids {
                PolygonIdEncoding::Float32Nan => assert_eq!(ids_type, F32),
                PolygonIdEncoding::Int32Fill => {
                    assert_eq!(ids_type, NcVariableType::Int(IntType::I32));
                    assert_eq!(
                        var_f64(&f, "polygon_icechart", "_FillValue"),
                        f64::from(POLYGON_ID_FILL)
                    );
                }
            }
            let codes = f.variable("polygon_codes").unwrap();
            match enc.codes {
                CodesEncoding::VlenString => assert_eq!(codes.vartype(), NcVariableType::String),
                CodesEncoding::CharArray => {
                    assert_eq!(codes.vartype(), NcVariableType::Char);
                    assert_eq!(codes.dimensions().len(), 2);
                    let longest = ref_rows.iter().map(String::len).max().unwrap();
                    assert_eq!(codes.dimensions()[1].len(), longest);
                }
            }
            assert_eq!(f.variable("distance_map").unwrap().vartype(), F32);
            assert_eq!(f.variable("sar_grid_latitude").unwrap().vartype(), F64);
            assert_eq!(f.variable("btemp_89_0v").unwrap().vartype(), F64);
            assert_eq!(f.variable("amsr2_swath_map").unwrap().vartype(), U8);
            assert_eq!(f.variable("swath_segmentation").unwrap().vartype(), U8);

            // Attributes a reader looks for.
            assert_eq!(var_str(&f, "nersc_sar_primary", "polarisation"), "HH");
            assert_eq!(var_str(&f, "nersc_sar_secondary", "polarisation"), "HV");
            assert!(var_str(&f, "nersc_sar_primary", "description").contains("dB"));
            let hh_ref = reference("nersc_sar_primary");
            let valid_min = hh_ref
                .iter()
                .copied()
                .filter(|v| !v.is_nan())
                .fold(f64::INFINITY, f64::min);
            assert!((var_f64(&f, "nersc_sar_primary", "min") - valid_min).abs() < 1e-4);
            assert!(var_f64(&f, "nersc_sar_primary", "max") > valid_min);
            let chart = var_str(&f, "polygon_icechart", "icechart_id");
            assert!(
                base.raw_file_name().ends_with(&format!("{chart}.nc")),
                "{chart}"
            );

            // Storage: chunking on SAR-grid variables as asked.
            for v in ["nersc_sar_primary", "polygon_icechart", "distance_map"] {
                let chunks = f.variable(v).unwrap().chunking().unwrap();
                assert_eq!(chunks, expected_chunks(&enc, 300, 320), "{name}: {v}");
            }

            // Same decoded content whatever the encoding.
            for v in ["nersc_sar_primary", "nersc_sar_secondary"] {
                let (a, b) = (decoded(&f, v), reference(v));
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(x.is_nan(), y.is_nan(), "{name}: {v}");
                    if !x.is_nan() {
                        assert!((x - y).abs() <= f64::from(SAR_SCALE_FACTOR), "{name}: {v}");
                    }
                }
            }
            assert_eq!(polygon_ids(&f), ref_ids, "{name}");
            assert_eq!(code_rows(&f), ref_rows, "{name}");
            for v in [
                "distance_map",
                "btemp_6_9h",
                "t2m",
                "sar_grid_latitude",
                "swath_segmentation",
            ] {
                assert!(same_bits(&decoded(&f, v), &reference(v)), "{name}: {v}");
            }
            sizes.push((
                name,
                enc.deflate.is_some(),
                std::fs::metadata(&path).unwrap().len(),
            ));
        }
        // Deflated files are smaller than any uncompressed one of the same content.
        let smallest_plain = sizes.iter().filter(|s| !s.1).map(|s| s.2).min().unwrap();
        let largest_deflated = sizes.iter().filter(|s| s.1).map(|s| s.2).max().unwrap();
        assert!(largest_deflated < smallest_plain, "{sizes:?}");
    });
}

#[test]
fn every_named_encoding_writes_the_expected_rtt_file() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let base = SynthOptions::new(SceneKind::Rtt, 260, 300, 6);
        let (_d0, p0) = write(&base);
        let f0 = open(&p0);
        for (name, enc) in Encoding::all_named() {
            let mut opts = base.clone();
            opts.encoding = enc;
            let (_dir, path) = write(&opts);
            assert_eq!(
                path.file_name().unwrap().to_str().unwrap(),
                base.rtt_file_name()
            );
            let f = open(&path);
            for v in SceneKind::Rtt.variables() {
                assert!(f.variable(v).is_some(), "{name}: no {v}");
            }
            assert_eq!(dim(&f, "sar_lines"), 260);
            assert_eq!(dim(&f, "sar_samples"), 300);
            assert_eq!(dim(&f, "2km_grid_lines"), 10);
            assert_eq!(dim(&f, "2km_grid_samples"), 12);
            assert_eq!(dim(&f, "sar_grid2d_lines"), 21);
            assert_eq!(dim(&f, "sar_grid2d_samples"), 21);
            for v in ["SIC", "SOD", "FLOE"] {
                assert_eq!(f.variable(v).unwrap().vartype(), U8);
                assert_eq!(var_f64(&f, v, "chart_fill_value"), 255.0);
            }
            // RTT SAR is always float32, whatever the packing asked for raw files.
            for v in [
                "nersc_sar_primary",
                "nersc_sar_secondary",
                "sar_incidenceangle",
                "distance_map",
            ] {
                assert_eq!(f.variable(v).unwrap().vartype(), F32, "{name}: {v}");
                let chunks = f.variable(v).unwrap().chunking().unwrap();
                assert_eq!(chunks, expected_chunks(&enc, 260, 300), "{name}: {v}");
            }
            assert_eq!(f.variable("btemp_36_5h").unwrap().vartype(), F32);
            assert_eq!(f.variable("sar_grid2d_latitude").unwrap().vartype(), F64);
            for v in [
                "SIC",
                "SOD",
                "FLOE",
                "nersc_sar_primary",
                "distance_map",
                "tclw",
                "sar_grid2d_longitude",
            ] {
                assert!(same_bits(&decoded(&f, v), &decoded(&f0, v)), "{name}: {v}");
            }
        }
    });
}

#[test]
fn impossible_options_are_rejected_before_writing() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = raw(1);
        opts.encoding.chunking = Chunking::Contiguous;
        opts.encoding.deflate = Some(4);
        assert!(matches!(
            write_scene(dir.path(), &opts),
            Err(SynthError::Options { .. })
        ));
        let mut opts = raw(1);
        opts.encoding.deflate = Some(11);
        assert!(matches!(
            write_scene(dir.path(), &opts),
            Err(SynthError::Options { .. })
        ));
        let opts = SynthOptions::new(SceneKind::Raw, 40, 320, 1);
        assert!(matches!(
            write_scene(dir.path(), &opts),
            Err(SynthError::Options { .. })
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A file where the directory should be.
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = write_scene(&file, &raw(1)).unwrap_err();
        assert!(matches!(err, SynthError::Io { .. }), "{err}");
        assert!(err.to_string().contains("not-a-dir"));
    });
}
