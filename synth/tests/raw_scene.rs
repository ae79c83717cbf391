//! The raw 40 m scene: determinism, the chart, land and distance zones, no-data borders,
//! learnable backscatter, tie points and the 2 km grid.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use icefm_schemas::sigrid::{MergeMode, PolyType, PolygonCode};
use icefm_synth::{Service, SynthOptions};

const H: usize = 300;
const W: usize = 320;

/// Parsed code table: id → (code, derived SIC/SOD/FLOE).
fn chart(file: &netcdf::File) -> BTreeMap<i64, (PolygonCode, [u8; 3])> {
    let rows = code_rows(file);
    assert_eq!(
        rows[0],
        "poly_id;CT;CA;SA;FA;CB;SB;FB;CC;SC;FC;CN;CD;CF;POLY_TYPE"
    );
    rows[1..]
        .iter()
        .map(|r| {
            let c = PolygonCode::parse(r).unwrap_or_else(|e| panic!("{e}"));
            let d = c.derive(MergeMode::Sum);
            (c.poly_id, (c.clone(), [d.sic, d.sod, d.floe]))
        })
        .collect()
}

fn with_service(seed: u64, service: Service) -> SynthOptions {
    let mut o = raw(seed);
    o.service = service;
    o
}

#[test]
fn same_seed_same_scene_different_seed_different_scene() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let vars = [
            "nersc_sar_primary",
            "nersc_sar_secondary",
            "polygon_icechart",
            "distance_map",
            "sar_grid_latitude",
            "btemp_18_7v",
            "u10m_rotated",
        ];
        let (_a, pa) = write(&raw(21));
        let (_b, pb) = write(&raw(21));
        let (_c, pc) = write(&raw(22));
        let (fa, fb, fc) = (open(&pa), open(&pb), open(&pc));
        assert_eq!(pa.file_name(), pb.file_name());
        assert_ne!(pa.file_name(), pc.file_name());
        for v in vars {
            assert!(same_bits(&decoded(&fa, v), &decoded(&fb, v)), "{v}");
            assert!(!same_bits(&decoded(&fa, v), &decoded(&fc, v)), "{v}");
        }
        assert_eq!(code_rows(&fa), code_rows(&fb));
        assert_ne!(code_rows(&fa), code_rows(&fc));
        // `index` changes the acquisition (name) and the content.
        let mut other = raw(21);
        other.index = 1;
        let (_d, pd) = write(&other);
        assert_ne!(pa.file_name(), pd.file_name());
        assert!(!same_bits(
            &decoded(&fa, "nersc_sar_primary"),
            &decoded(&open(&pd), "nersc_sar_primary")
        ));
    });
}

#[test]
fn code_table_holds_every_kind_and_parses() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        for (seed, service) in [(1, Service::Dmi), (2, Service::Cis), (3, Service::Dmi)] {
            let (_d, p) = write(&with_service(seed, service));
            let table = chart(&open(&p));
            assert!((10..=40).contains(&table.len()), "{}", table.len());
            let mut kinds = BTreeSet::new();
            for (code, labels) in table.values() {
                let kind = if code.poly_type == PolyType::Water {
                    assert_eq!(*labels, [0, 0, 0]);
                    "water"
                } else if code.ct == Some(99) {
                    assert_eq!(*labels, [255, 255, 255]);
                    "unknown"
                } else if code.f[0] == Some(8) {
                    assert_eq!((labels[0], labels[2]), (10, 255));
                    "fast ice"
                } else if code.c[1].is_some() {
                    "multi-stage"
                } else {
                    assert!(code.c[0].is_none() && code.s[0].is_some());
                    "single-stage"
                };
                kinds.insert(kind);
            }
            assert_eq!(kinds.len(), 5, "seed {seed}: {kinds:?}");
        }
    });
}

#[test]
fn every_pixel_is_in_a_charted_polygon_or_on_land() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        for seed in [4, 5] {
            let (_d, p) = write(&raw(seed));
            let f = open(&p);
            let table = chart(&f);
            let ids = polygon_ids(&f);
            let dist = decoded(&f, "distance_map");
            let mut land = 0;
            for (k, id) in ids.iter().enumerate() {
                match id {
                    Some(id) => {
                        assert!(
                            table.contains_key(id),
                            "pixel {k}: id {id} not in the table"
                        );
                        assert!(
                            dist[k] >= 1.0,
                            "pixel {k}: polygon {id} on zone {}",
                            dist[k]
                        );
                    }
                    None => {
                        assert_eq!(dist[k], 0.0, "pixel {k}: no polygon but not land");
                        land += 1;
                    }
                }
            }
            let frac = f64::from(land) / (H * W) as f64;
            assert!(frac > 0.001 && frac < 0.4, "land fraction {frac}");
        }
    });
}

#[test]
fn distance_zones_grow_away_from_land() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let mut o = raw(8);
        o.height = 400;
        o.width = 420;
        let (_d, p) = write(&o);
        let f = open(&p);
        let dist = decoded(&f, "distance_map");
        let w = 420;
        let land: Vec<(usize, usize)> = (0..dist.len())
            .filter(|&k| dist[k] == 0.0)
            .map(|k| (k % w, k / w))
            .step_by(3)
            .collect();
        assert!(!land.is_empty());
        // Mean zone per band of true distance to land (km at 40 m).
        let mut bands = [(0.0, 0u32); 4];
        for k in (0..dist.len()).step_by(37) {
            if dist[k] == 0.0 {
                continue;
            }
            let (x, y) = (k % w, k / w);
            let d2 = land
                .iter()
                .map(|&(lx, ly)| (lx as f64 - x as f64).powi(2) + (ly as f64 - y as f64).powi(2))
                .fold(f64::INFINITY, f64::min);
            let km = d2.sqrt() * 0.04;
            let band = [0.5, 2.0, 5.0, f64::INFINITY]
                .iter()
                .position(|&e| km < e)
                .unwrap();
            bands[band].0 += dist[k];
            bands[band].1 += 1;
            assert!((1.0..=41.0).contains(&dist[k]));
        }
        let means: Vec<f64> = bands
            .iter()
            .filter(|b| b.1 > 0)
            .map(|b| b.0 / f64::from(b.1))
            .collect();
        assert!(means.len() >= 3, "{bands:?}");
        assert!(means.windows(2).all(|m| m[0] < m[1]), "{means:?}");
    });
}

#[test]
fn no_data_borders_are_nan_in_both_channels() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        for seed in [9, 10] {
            let (_d, p) = write(&raw(seed));
            let f = open(&p);
            let hh = decoded(&f, "nersc_sar_primary");
            let hv = decoded(&f, "nersc_sar_secondary");
            let mut widths = BTreeSet::new();
            for y in 0..H {
                let row = |v: &[f64]| v[y * W..(y + 1) * W].to_vec();
                let (rh, rv) = (row(&hh), row(&hv));
                for x in 0..W {
                    assert_eq!(rh[x].is_nan(), rv[x].is_nan(), "({x}, {y})");
                }
                // NaN exactly as a run at each end of the row.
                let left = rh.iter().take_while(|v| v.is_nan()).count();
                let right = rh.iter().rev().take_while(|v| v.is_nan()).count();
                assert!(left >= 2 && right >= 2, "row {y}: {left} {right}");
                assert_eq!(
                    rh.iter().filter(|v| v.is_nan()).count(),
                    left + right,
                    "row {y}"
                );
                widths.insert(left);
            }
            // Slanted and irregular: the border width varies along the scene.
            assert!(widths.len() >= 3, "{widths:?}");
            let valid = hh.iter().filter(|v| !v.is_nan()).count();
            assert!(valid as f64 > 0.8 * (H * W) as f64);
            // Land has valid SAR.
            let dist = decoded(&f, "distance_map");
            assert!((0..H * W).any(|k| dist[k] == 0.0 && !hh[k].is_nan()));
        }
    });
}

#[test]
fn backscatter_separates_open_water_from_old_ice() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        for seed in 0..4 {
            let (_d, p) = write(&with_service(
                seed,
                if seed % 2 == 0 {
                    Service::Dmi
                } else {
                    Service::Cis
                },
            ));
            let f = open(&p);
            let table = chart(&f);
            let ids = polygon_ids(&f);
            let hh = decoded(&f, "nersc_sar_primary");
            let hv = decoded(&f, "nersc_sar_secondary");
            // Mean per SOD class of the pixel's polygon.
            let mut sums: BTreeMap<u8, (f64, f64, u32)> = BTreeMap::new();
            for k in 0..ids.len() {
                if let Some(id) = ids[k]
                    && !hh[k].is_nan()
                {
                    let e = sums.entry(table[&id].1[1]).or_default();
                    e.0 += hh[k];
                    e.1 += hv[k];
                    e.2 += 1;
                }
            }
            let mean = |c: u8| {
                sums.get(&c)
                    .map(|e| (e.0 / f64::from(e.2), e.1 / f64::from(e.2)))
            };
            let (water, old) = (mean(0).unwrap(), mean(5).unwrap());
            assert!(
                water.0 < old.0 - 6.0,
                "seed {seed}: HH water {water:?} old {old:?}"
            );
            assert!(
                water.1 < old.1 - 4.0,
                "seed {seed}: HV water {water:?} old {old:?}"
            );
            assert!((-26.0..-16.0).contains(&water.0), "{water:?}");
            assert!((-14.0..-7.0).contains(&old.0), "{old:?}");
            let all: Vec<f64> = hh.iter().copied().filter(|v| !v.is_nan()).collect();
            assert!(all.iter().all(|v| (-60.0..=20.0).contains(v)));
        }
    });
}

#[test]
fn tie_points_cover_the_scene_on_a_regular_grid() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let (_d, p) = write(&with_service(12, Service::Cis));
        let f = open(&p);
        let line = decoded(&f, "sar_grid_line");
        let sample = decoded(&f, "sar_grid_sample");
        let inc = decoded(&f, "sar_grid_incidenceangle");
        let lat = decoded(&f, "sar_grid_latitude");
        let lon = decoded(&f, "sar_grid_longitude");
        let height = decoded(&f, "sar_grid_height");
        assert_eq!(line.len(), 441);
        for k in 0..441 {
            let (i, j) = (k / 21, k % 21);
            assert_eq!(
                line[k],
                line[i * 21],
                "row-major: line constant along a row"
            );
            assert_eq!(
                sample[k], sample[j],
                "row-major: sample constant down a column"
            );
            assert!((inc[k] - (19.0 + 28.0 * sample[k] / (W - 1) as f64)).abs() < 1e-9);
            assert!((50.0..85.0).contains(&lat[k]) && (-110.0..-40.0).contains(&lon[k]));
            assert!(height[k] >= 0.0);
        }
        assert_eq!((line[0], line[440]), (0.0, (H - 1) as f64));
        assert_eq!((sample[0], sample[20]), (0.0, (W - 1) as f64));
        assert_eq!((inc[0], inc[20]), (19.0, 47.0));
        for i in 0..21 {
            assert!((line[i * 21] - i as f64 * (H - 1) as f64 / 20.0).abs() < 1e-9);
            assert!((sample[i] - i as f64 * (W - 1) as f64 / 20.0).abs() < 1e-9);
        }
        // Neighbouring tie points are 0.64 km apart (15.95 pixels × 40 m).
        let step = ((lat[1] - lat[0]).powi(2)
            + ((lon[1] - lon[0]) * lat[0].to_radians().cos()).powi(2))
        .sqrt();
        assert!((step * 111.2 - 0.64).abs() < 0.05, "{}", step * 111.2);
    });
}

#[test]
fn two_km_grid_has_plausible_smooth_fields() {
    icefm_netcdf_thread::on_netcdf_thread(|| {
        let mut o = raw(13);
        o.height = 1000;
        o.width = 1040;
        let (_d, p) = write(&o);
        let f = open(&p);
        assert_eq!(
            (dim(&f, "2km_grid_lines"), dim(&f, "2km_grid_samples")),
            (20, 20)
        );
        let range = |v: &str, lo: f64, hi: f64| {
            let x = decoded(&f, v);
            assert_eq!(x.len(), 400);
            assert!(x.iter().all(|v| (lo..=hi).contains(v)), "{v}: {x:?}");
            x
        };
        // Smooth: neighbouring cells along a row differ far less than the range.
        let smooth = |v: &str, lo: f64, hi: f64| {
            let x = range(v, lo, hi);
            let jump = x
                .chunks(20)
                .flat_map(|row| row.windows(2).map(|p| (p[1] - p[0]).abs()))
                .fold(0.0, f64::max);
            assert!(jump < 0.1 * (hi - lo), "{v}: jump {jump}");
        };
        for v in icefm_schemas::norm::AMSR2_VARIABLES {
            range(v, 80.0, 270.0);
        }
        for v in ["btemp_6_9h", "btemp_6_9v", "btemp_7_3h", "btemp_10_7v"] {
            smooth(v, 80.0, 270.0);
        }
        // Ice and land are bright at 36.5 GHz H, water dark: the channel spans a wide range.
        let tb = range("btemp_36_5h", 80.0, 270.0);
        let (lo, hi) = tb
            .iter()
            .fold((f64::MAX, f64::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
        assert!(hi - lo > 30.0, "{lo} {hi}");
        smooth("u10m_rotated", -15.0, 15.0);
        smooth("v10m_rotated", -15.0, 15.0);
        range("t2m", 240.0, 280.0);
        range("skt", 235.0, 280.0);
        smooth("tcwv", 0.0, 25.0);
        range("tclw", 0.0, 0.5);
        assert!(decoded(&f, "amsr2_swath_map").iter().all(|&v| v == 1.0));
        let seg: BTreeSet<i64> = decoded(&f, "swath_segmentation")
            .iter()
            .map(|&v| v as i64)
            .collect();
        assert_eq!(seg, (1..=5).collect());
    });
}
