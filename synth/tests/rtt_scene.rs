//! The RTT 80 m scene: labels, standard scaling, aligned invalid masks, attributes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use icefm_schemas::norm::{AMSR2_VARIABLES, ERA5_VARIABLES, mean_std};
use icefm_synth::{SceneKind, Service, SynthOptions};

const H: usize = 260;
const W: usize = 300;

fn rtt(seed: u64) -> SynthOptions {
    SynthOptions::new(SceneKind::Rtt, H, W, seed)
}

fn unscaled(file: &netcdf::File, name: &str) -> Vec<f64> {
    let ms = mean_std(name).unwrap();
    decoded(file, name).iter().map(|&v| ms.unscale(v)).collect()
}

#[test]
fn attributes_and_names_follow_the_rtt_release() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let mut o = rtt(3);
        o.service = Service::Cis;
        o.index = 7;
        let (_d, p) = write(&o);
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.ends_with("_cis_prep.nc") && name.len() == "20180124T194759_cis_prep.nc".len()
        );
        let f = open(&p);
        let mut raw = o.clone();
        raw.kind = SceneKind::Raw;
        assert_eq!(global_str(&f, "original_id"), raw.file_name());
        assert_eq!(&raw.file_name()[17..32], &name[..15]);
        assert_eq!(global_str(&f, "scene_id"), name);
        assert_eq!(global_str(&f, "ice_service"), "cis");
        let att = |n: &str| f64::try_from(f.attribute(n).unwrap().value().unwrap()).unwrap();
        assert_eq!(att("pixel_spacing"), 80.0);
        assert!(att("flip") == 0.0 || att("flip") == 1.0);
        assert_eq!(
            var_f64(&f, "sar_incidenceangle", "variable_fill_value"),
            0.0
        );
    });
}

#[test]
fn invalid_pixels_are_zero_everywhere_and_ignored_in_labels() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        for seed in [1, 2] {
            let (_d, p) = write(&rtt(seed));
            let f = open(&p);
            let full = [
                "nersc_sar_primary",
                "nersc_sar_secondary",
                "sar_incidenceangle",
                "distance_map",
            ];
            let planes: Vec<Vec<f64>> = full.iter().map(|v| decoded(&f, v)).collect();
            let charts: Vec<Vec<f64>> = ["SIC", "SOD", "FLOE"]
                .iter()
                .map(|v| decoded(&f, v))
                .collect();
            let mut invalid = 0;
            for k in 0..H * W {
                let zero = planes[0][k] == 0.0;
                for (v, plane) in full.iter().zip(&planes) {
                    assert_eq!(plane[k] == 0.0, zero, "{v} pixel {k}: masks not aligned");
                    assert!(!plane[k].is_nan());
                }
                if zero {
                    invalid += 1;
                    for c in &charts {
                        assert_eq!(c[k], 255.0);
                    }
                }
            }
            // The slanted no-data borders at both ends of each row.
            assert!(invalid >= 4 * H, "{invalid}");
            for y in 0..H {
                assert_eq!(planes[0][y * W], 0.0);
                assert_eq!(planes[0][y * W + W - 1], 0.0);
            }
            // Classes in range; every task has labelled pixels.
            for (c, max) in charts.iter().zip([10.0, 5.0, 6.0]) {
                assert!(c.iter().all(|&v| v <= max || v == 255.0));
                assert!(c.iter().filter(|&&v| v != 255.0).count() > H * W / 4);
            }
            // SIC 0 ⇒ SOD = FLOE = 0 (open water).
            let [sic, sod, floe] = [&charts[0], &charts[1], &charts[2]];
            for ((s, d), f) in sic.iter().zip(sod).zip(floe) {
                if *s == 0.0 {
                    assert_eq!((*d, *f), (0.0, 0.0));
                }
            }
        }
    });
}

#[test]
fn inputs_are_standard_scaled_from_plausible_raw_units() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let (_d, p) = write(&rtt(4));
        let f = open(&p);
        let valid: Vec<bool> = decoded(&f, "nersc_sar_primary")
            .iter()
            .map(|&v| v != 0.0)
            .collect();
        let check = |name: &str, lo: f64, hi: f64| {
            let x = unscaled(&f, name);
            for (k, v) in x.iter().enumerate() {
                if valid[k] {
                    assert!((lo..=hi).contains(v), "{name} pixel {k}: {v}");
                }
            }
            x
        };
        check("nersc_sar_primary", -60.0, 20.0);
        check("nersc_sar_secondary", -60.0, 20.0);
        let inc = check("sar_incidenceangle", 19.0 - 1e-4, 47.0 + 1e-4);
        assert!((inc[H / 2 * W + W / 2] - 33.0).abs() < 0.5);
        let dist = check("distance_map", -1e-4, 41.0 + 1e-4);
        for (k, z) in dist.iter().enumerate() {
            if valid[k] {
                assert!((z - z.round()).abs() < 1e-3, "zone {z} is not whole");
            }
        }
        assert!(
            dist.iter()
                .zip(&valid)
                .any(|(&z, &v)| v && z.round() == 0.0),
            "no land"
        );
        assert_eq!(
            (dim(&f, "2km_grid_lines"), dim(&f, "2km_grid_samples")),
            (H / 25, W / 25)
        );
        for v in AMSR2_VARIABLES {
            let x = unscaled(&f, v);
            assert!(x.iter().all(|t| (80.0..270.0).contains(t)), "{v}");
        }
        let era5_ranges = [
            (-15.0, 15.0),
            (-15.0, 15.0),
            (240.0, 280.0),
            (235.0, 280.0),
            (0.0, 25.0),
            (0.0, 0.5),
        ];
        for (v, (lo, hi)) in ERA5_VARIABLES.iter().zip(era5_ranges) {
            let x = unscaled(&f, v);
            assert!(x.iter().all(|t| (lo..=hi).contains(t)), "{v}: {x:?}");
        }
        let lat = decoded(&f, "sar_grid2d_latitude");
        assert_eq!(lat.len(), 441);
        assert!(lat.iter().all(|l| (50.0..85.0).contains(l)));
    });
}

#[test]
fn rtt_labels_are_learnable_and_deterministic() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let (_a, pa) = write(&rtt(5));
        let (_b, pb) = write(&rtt(5));
        let (fa, fb) = (open(&pa), open(&pb));
        for v in ["SIC", "SOD", "FLOE", "nersc_sar_primary", "btemp_6_9h"] {
            assert!(same_bits(&decoded(&fa, v), &decoded(&fb, v)), "{v}");
        }
        let sod = decoded(&fa, "SOD");
        let hh = unscaled(&fa, "nersc_sar_primary");
        let mut sums: BTreeMap<i64, (f64, u32)> = BTreeMap::new();
        for k in 0..H * W {
            if sod[k] != 255.0 {
                let e = sums.entry(sod[k] as i64).or_default();
                e.0 += hh[k];
                e.1 += 1;
            }
        }
        let mean = |c| sums.get(&c).map(|e| e.0 / f64::from(e.1)).unwrap();
        assert!(mean(0) < mean(5) - 6.0, "{sums:?}");
    });
}
