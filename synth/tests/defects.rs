//! Each `Defect` produces exactly its fault.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icefm_schemas::sigrid::PolygonCode;
use icefm_synth::{Defect, SceneKind, SynthError, SynthOptions, write_scene};

fn with(kind: SceneKind, defect: Option<Defect>) -> SynthOptions {
    let mut o = SynthOptions::new(kind, 240, 260, 17);
    o.defect = defect;
    o
}

#[test]
fn missing_variable_leaves_out_that_variable_only() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        for (kind, victim) in [
            (SceneKind::Raw, "distance_map"),
            (SceneKind::Raw, "polygon_codes"),
            (SceneKind::Rtt, "SOD"),
            (SceneKind::Rtt, "btemp_89_0v"),
        ] {
            let (_d, p) = write(&with(kind, Some(Defect::MissingVariable(victim))));
            let f = open(&p);
            for v in kind.variables() {
                assert_eq!(f.variable(v).is_some(), v != victim, "{kind:?} {v}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let bad = with(
            SceneKind::Rtt,
            Some(Defect::MissingVariable("polygon_codes")),
        );
        assert!(matches!(
            write_scene(dir.path(), &bad),
            Err(SynthError::Options { .. })
        ));
    });
}

#[test]
fn mismatched_shape_makes_distance_map_one_row_short() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        for kind in [SceneKind::Raw, SceneKind::Rtt] {
            let (_d, p) = write(&with(kind, Some(Defect::MismatchedShape)));
            let f = open(&p);
            let dims: Vec<usize> = f
                .variable("distance_map")
                .unwrap()
                .dimensions()
                .iter()
                .map(|d| d.len())
                .collect();
            assert_eq!(dims, vec![239, 260], "{kind:?}");
            assert_eq!(dim(&f, "sar_lines"), 240);
            let hh = f.variable("nersc_sar_primary").unwrap();
            assert_eq!(hh.dimensions()[0].len(), 240);
            // The rows that are there hold the same zones as an intact file.
            let (_e, q) = write(&with(kind, None));
            let intact = decoded(&open(&q), "distance_map");
            assert!(same_bits(
                &decoded(&f, "distance_map"),
                &intact[..239 * 260]
            ));
        }
    });
}

#[test]
fn bad_code_row_breaks_exactly_one_row() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let (_d, p) = write(&with(SceneKind::Raw, Some(Defect::BadCodeRow)));
        let (_e, q) = write(&with(SceneKind::Raw, None));
        let (rows, intact) = (code_rows(&open(&p)), code_rows(&open(&q)));
        assert_eq!(rows.len(), intact.len());
        let broken: Vec<usize> = (1..rows.len())
            .filter(|&i| PolygonCode::parse(&rows[i]).is_err())
            .collect();
        assert_eq!(broken.len(), 1, "{rows:?}");
        let i = broken[0];
        assert_ne!(rows[i], intact[i]);
        let fields: Vec<&str> = rows[i].split(';').collect();
        assert_eq!(fields.len(), 15);
        assert!(fields[1].ends_with('x'), "{}", rows[i]);
        assert_eq!(
            fields[0],
            intact[i].split(';').next().unwrap(),
            "the id survives"
        );
        assert!(intact.iter().skip(1).all(|r| PolygonCode::parse(r).is_ok()));
        let dir = tempfile::tempdir().unwrap();
        let rtt = with(SceneKind::Rtt, Some(Defect::BadCodeRow));
        assert!(matches!(
            write_scene(dir.path(), &rtt),
            Err(SynthError::Options { .. })
        ));
    });
}

#[test]
fn all_invalid_blanks_every_sar_pixel() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let (_d, p) = write(&with(SceneKind::Raw, Some(Defect::AllInvalid)));
        let f = open(&p);
        for v in ["nersc_sar_primary", "nersc_sar_secondary"] {
            assert!(decoded(&f, v).iter().all(|x| x.is_nan()), "{v}");
        }
        // The chart is still there.
        assert!(polygon_ids(&f).iter().any(Option::is_some));

        let (_e, q) = write(&with(SceneKind::Rtt, Some(Defect::AllInvalid)));
        let f = open(&q);
        for v in [
            "nersc_sar_primary",
            "nersc_sar_secondary",
            "sar_incidenceangle",
            "distance_map",
        ] {
            assert!(decoded(&f, v).iter().all(|&x| x == 0.0), "{v}");
        }
        for v in ["SIC", "SOD", "FLOE"] {
            assert!(decoded(&f, v).iter().all(|&x| x == 255.0), "{v}");
        }
    });
}

#[test]
fn without_a_defect_nothing_is_broken() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let (_d, p) = write(&with(SceneKind::Raw, None));
        let f = open(&p);
        assert!(
            code_rows(&f)
                .iter()
                .skip(1)
                .all(|r| PolygonCode::parse(r).is_ok())
        );
        assert_eq!(
            f.variable("distance_map").unwrap().dimensions()[0].len(),
            240
        );
        assert!(decoded(&f, "nersc_sar_primary").iter().any(|x| !x.is_nan()));
    });
}
