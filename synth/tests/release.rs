//! The test release: files without their charts, and an RTT scene's reference charts.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icefm_synth::{Release, SceneKind, SynthOptions};

fn opts(kind: SceneKind, release: Release) -> SynthOptions {
    let mut o = SynthOptions::new(kind, 240, 260, 23);
    o.release = release;
    o
}

#[test]
fn a_raw_test_file_has_everything_but_its_chart() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let o = opts(SceneKind::Raw, Release::Test);
        assert_eq!(o.reference_file_name(), None);
        let (dir, p) = write(&o);
        let f = open(&p);
        for v in SceneKind::Raw.variables() {
            let chart = v == "polygon_icechart" || v == "polygon_codes";
            assert_eq!(f.variable(v).is_some(), !chart, "{v}");
        }
        // Nothing else was written beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    });
}

#[test]
fn an_rtt_test_file_has_its_charts_in_its_reference_file() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let test = opts(SceneKind::Rtt, Release::Test);
        assert_eq!(
            opts(SceneKind::Rtt, Release::Train).reference_file_name(),
            None
        );
        let name = test.reference_file_name().unwrap();
        assert_eq!(
            name,
            test.file_name().replace("_prep.nc", "_prep_reference.nc")
        );
        let (dir, p) = write(&test);
        let (_train_dir, train_path) = write(&opts(SceneKind::Rtt, Release::Train));
        let (f, train) = (open(&p), open(&train_path));
        let charts = ["SIC", "SOD", "FLOE"];
        for v in SceneKind::Rtt.variables() {
            assert_eq!(f.variable(v).is_some(), !charts.contains(&v), "{v}");
        }
        let reference = open(&dir.path().join(&name));
        let mut names: Vec<String> = reference.variables().map(|v| v.name()).collect();
        names.sort();
        assert_eq!(names, ["FLOE", "SIC", "SOD"]);
        for c in charts {
            let read = |file: &netcdf::File| {
                let v = file.variable(c).unwrap();
                let dims: Vec<usize> = v.dimensions().iter().map(|d| d.len()).collect();
                (dims, v.get_values::<u8, _>(..).unwrap())
            };
            let (dims, values) = read(&reference);
            assert_eq!(dims, [240, 260]);
            assert_eq!((dims, values), read(&train), "{c}");
        }
    });
}
