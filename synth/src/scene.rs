//! The scene model: geography, the chart's polygons on a warped Voronoi partition, weather, and
//! where it lies on Earth. Everything is derived from the content seed; rendering it to pixels is
//! in `backscatter`, writing it in `raw` / `rtt`.

use rayon::prelude::*;

use crate::chart::{Polygon, PolygonKind, draw_polygon};
use crate::geography::Geography;
use crate::options::{Acquisition, Service, SynthOptions};
use crate::rng::{Noise2, SplitMix64, hash, tag};

/// Partition value of "no polygon" (land).
pub(crate) const NO_POLYGON: u8 = u8::MAX;

/// Smooth 10 m wind over the scene (m/s), shared by ERA5 and the open-water backscatter.
#[derive(Debug, Clone)]
pub(crate) struct Wind {
    u0: f64,
    v0: f64,
    u: Noise2,
    v: Noise2,
}

impl Wind {
    /// Wind components at scene-relative position `(qx, qy)`.
    pub(crate) fn at(&self, qx: f64, qy: f64) -> (f64, f64) {
        (
            self.u0 + 4.5 * f64::from(self.u.fbm(qx * 3.0, qy * 3.0, 2)),
            self.v0 + 4.5 * f64::from(self.v.fbm(qx * 3.0, qy * 3.0, 2)),
        )
    }
}

/// One scene, ready to render.
#[derive(Debug, Clone)]
pub(crate) struct Scene {
    pub height: usize,
    pub width: usize,
    pub spacing_m: f64,
    pub seed: u64,
    pub service: Service,
    pub acquisition: Acquisition,
    pub geo: Geography,
    /// Coarse partition step (pixels) and grid.
    pub cell: usize,
    coarse_cols: usize,
    coarse_poly: Vec<u8>,
    /// Wind speed on the coarse grid (m/s).
    coarse_wind: Vec<f32>,
    pub polygons: Vec<Polygon>,
    pub wind: Wind,
}

impl Scene {
    pub(crate) fn build(opts: &SynthOptions) -> Self {
        let (h, w) = (opts.height, opts.width);
        let seed = opts.content_seed();
        let spacing_m = opts.kind.pixel_spacing_m();
        let cell = (h.max(w) / 1250).clamp(2, 8);
        let geo = Geography::new(seed, h, w, spacing_m, cell);
        let (coarse_rows, coarse_cols) = (h.div_ceil(cell), w.div_ceil(cell));
        let d = h.max(w) as f64;

        // Polygon seed points: spread out (a minimum spacing) and off land.
        let mut rng = SplitMix64::new(hash(&[seed, tag::SEEDS]));
        let n = 10 + rng.below(31) as usize;
        let (qw, qh) = (w as f64 / d, h as f64 / d);
        let min_gap = 0.6 * (qw * qh / n as f64).sqrt();
        let mut points: Vec<(f64, f64)> = Vec::with_capacity(n);
        while points.len() < n {
            let mut cand = (0.0, 0.0);
            for _ in 0..40 {
                cand = (rng.range(0.0, qw), rng.range(0.0, qh));
                let (px, py) = ((cand.0 * d) as usize, (cand.1 * d) as usize);
                let on_land = geo.is_land(px.min(w - 1), py.min(h - 1));
                let crowded = points
                    .iter()
                    .any(|p| (p.0 - cand.0).hypot(p.1 - cand.1) < min_gap);
                if !on_land && !crowded {
                    break;
                }
            }
            points.push(cand);
        }

        // Warped Voronoi on the coarse grid: the warp bends straight cell borders into
        // irregular chart boundaries.
        let mut wrng = SplitMix64::new(hash(&[seed, tag::WARP]));
        let warps: [Noise2; 4] = std::array::from_fn(|_| Noise2::new(wrng.next_u64()));
        let coarse_poly: Vec<u8> = (0..coarse_rows * coarse_cols)
            .into_par_iter()
            .map(|k| {
                let qx = ((k % coarse_cols) * cell + cell / 2) as f64 / d;
                let qy = ((k / coarse_cols) * cell + cell / 2) as f64 / d;
                let wx = qx
                    + 0.06 * f64::from(warps[0].fbm(qx * 4.0, qy * 4.0, 3))
                    + 0.012 * f64::from(warps[2].at(qx * 25.0, qy * 25.0));
                let wy = qy
                    + 0.06 * f64::from(warps[1].fbm(qx * 4.0, qy * 4.0, 3))
                    + 0.012 * f64::from(warps[3].at(qx * 25.0, qy * 25.0));
                let mut best = (f64::INFINITY, 0usize);
                for (i, p) in points.iter().enumerate() {
                    let dd = (p.0 - wx).powi(2) + (p.1 - wy).powi(2);
                    if dd < best.0 {
                        best = (dd, i);
                    }
                }
                best.1 as u8
            })
            .collect();

        let mut scene = Self {
            height: h,
            width: w,
            spacing_m,
            seed,
            service: opts.service,
            acquisition: opts.acquisition(),
            geo,
            cell,
            coarse_cols,
            coarse_poly,
            coarse_wind: Vec::new(),
            polygons: Vec::new(),
            wind: {
                let mut r = SplitMix64::new(hash(&[seed, tag::GRID2KM, 1]));
                Wind {
                    u0: r.range(-5.0, 5.0),
                    v0: r.range(-5.0, 5.0),
                    u: Noise2::new(r.next_u64()),
                    v: Noise2::new(r.next_u64()),
                }
            },
        };
        scene.coarse_wind = (0..coarse_rows * coarse_cols)
            .map(|k| {
                let (x, y) = scene.coarse_centre(k);
                let (u, v) = scene.wind.at(x as f64 / d, y as f64 / d);
                u.hypot(v) as f32
            })
            .collect();
        scene.polygons = scene.draw_chart(n);
        scene
    }

    /// Pixel centre of coarse cell `k`.
    fn coarse_centre(&self, k: usize) -> (usize, usize) {
        let x = ((k % self.coarse_cols) * self.cell + self.cell / 2).min(self.width - 1);
        let y = ((k / self.coarse_cols) * self.cell + self.cell / 2).min(self.height - 1);
        (x, y)
    }

    /// Polygon index at pixel `(x, y)` ignoring land.
    #[inline]
    pub(crate) fn partition_at(&self, x: usize, y: usize) -> u8 {
        self.coarse_poly[(y / self.cell) * self.coarse_cols + x / self.cell]
    }

    /// Polygon index at pixel `(x, y)`, [`NO_POLYGON`] on land.
    pub(crate) fn polygon_at(&self, x: usize, y: usize) -> u8 {
        if self.geo.is_land(x, y) {
            NO_POLYGON
        } else {
            self.partition_at(x, y)
        }
    }

    /// Wind speed (m/s) at pixel `(x, y)`, from the coarse grid.
    #[inline]
    pub(crate) fn wind_speed(&self, x: usize, y: usize) -> f32 {
        self.coarse_wind[(y / self.cell) * self.coarse_cols + x / self.cell]
    }

    /// Fraction of ice the radar sees in polygon `i` (the surface, not the chart).
    pub(crate) fn ice_fraction(&self, i: u8) -> f64 {
        self.polygons
            .get(usize::from(i))
            .map_or(0.0, |p| p.surface.ice_fraction)
    }

    /// Assign kinds and ids to the `n` partition cells and draw their code rows.
    fn draw_chart(&self, n: usize) -> Vec<Polygon> {
        // Per polygon: visible coarse cells (not land, not no-data) and their distance to land.
        let mut visible = vec![0usize; n];
        let mut dist = vec![0.0f64; n];
        for (k, &p) in self.coarse_poly.iter().enumerate() {
            let (x, y) = self.coarse_centre(k);
            if !self.geo.is_land(x, y) && !self.geo.is_nodata(x, y) {
                visible[usize::from(p)] += 1;
                dist[usize::from(p)] += f64::from(self.geo.distance_km(x, y));
            }
        }
        let mut rng = SplitMix64::new(hash(&[self.seed, tag::CODES]));
        let mut kinds: Vec<Option<(PolygonKind, bool)>> = vec![None; n];
        let mut by_size: Vec<usize> = (0..n).filter(|&i| visible[i] > 0).collect();
        by_size.sort_by_key(|&i| std::cmp::Reverse(visible[i]));
        // Fast ice hugs the coast: the visible polygon closest to land (mean distance).
        if let Some(&fast) = by_size
            .iter()
            .filter(|&&i| visible[i] * 20 >= visible[by_size[0]])
            .min_by(|&&a, &&b| {
                (dist[a] / visible[a] as f64).total_cmp(&(dist[b] / visible[b] as f64))
            })
        {
            kinds[fast] = Some((PolygonKind::FastIce, false));
        }
        let free: Vec<usize> = by_size
            .iter()
            .copied()
            .filter(|&i| kinds[i].is_none())
            .collect();
        let mut free = free.into_iter();
        for forced in [
            (PolygonKind::Water, false),
            (PolygonKind::SingleStage, true),
            (PolygonKind::MultiStage, false),
        ] {
            if let Some(i) = free.next() {
                kinds[i] = Some(forced);
            }
        }
        // Unknown polygons tend to be small ones.
        if let Some(&i) = by_size.iter().rev().find(|&&i| kinds[i].is_none()) {
            kinds[i] = Some((PolygonKind::Unknown, false));
        }
        let mut id = 1 + rng.below(40) as i64;
        (0..n)
            .map(|i| {
                let (kind, old) = kinds[i].unwrap_or_else(|| {
                    let k = [
                        PolygonKind::Water,
                        PolygonKind::SingleStage,
                        PolygonKind::MultiStage,
                        PolygonKind::Unknown,
                    ][rng.weighted(&[0.3, 0.4, 0.25, 0.05])];
                    (k, false)
                });
                let poly = draw_polygon(id, kind, old, self.service, &mut rng);
                id += 1 + rng.below(3) as i64;
                poly
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::options::SceneKind;

    #[test]
    fn every_scene_holds_every_kind_visibly() {
        for seed in 0..12 {
            for kind in [SceneKind::Raw, SceneKind::Rtt] {
                let mut opts = SynthOptions::new(kind, 300, 320, seed);
                opts.service = if seed % 2 == 0 {
                    Service::Dmi
                } else {
                    Service::Cis
                };
                let scene = Scene::build(&opts);
                let n = scene.polygons.len();
                assert!((10..=40).contains(&n), "{n}");
                let planes = scene.render(true);
                let mut visible = vec![0usize; n];
                for (k, &p) in planes.poly.iter().enumerate() {
                    if p != NO_POLYGON && !planes.hh[k].is_nan() {
                        visible[usize::from(p)] += 1;
                    }
                }
                for want in [
                    PolygonKind::Water,
                    PolygonKind::SingleStage,
                    PolygonKind::MultiStage,
                    PolygonKind::FastIce,
                    PolygonKind::Unknown,
                ] {
                    assert!(
                        scene
                            .polygons
                            .iter()
                            .zip(&visible)
                            .any(|(p, &v)| p.kind == want && v > 0),
                        "seed {seed} {kind:?}: no visible {want:?}"
                    );
                }
                // The forced old-ice polygon.
                assert!(
                    scene
                        .polygons
                        .iter()
                        .zip(&visible)
                        .any(|(p, &v)| p.labels[1] == 5
                            && p.kind == PolygonKind::SingleStage
                            && v > 0)
                );
                let ids: std::collections::BTreeSet<i64> =
                    scene.polygons.iter().map(|p| p.id).collect();
                assert_eq!(ids.len(), n);
            }
        }
    }

    #[test]
    fn rendering_does_not_depend_on_the_thread_count() {
        let opts = SynthOptions::new(SceneKind::Raw, 200, 240, 3);
        let scene = Scene::build(&opts);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| scene.render(true));
        let many = rayon::ThreadPoolBuilder::new()
            .num_threads(5)
            .build()
            .unwrap()
            .install(|| Scene::build(&opts).render(true));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.hh), bits(&many.hh));
        assert_eq!(bits(&one.hv), bits(&many.hv));
        assert_eq!(one.poly, many.poly);
        assert_eq!(one.zone, many.zone);
    }
}

/// Timing of the generation alone (no NetCDF) at full size; run with
/// `cargo test --release -p icefm-synth -- --ignored --nocapture full_size_generation`.
#[cfg(test)]
mod timing {
    use std::time::Instant;

    use super::*;
    use crate::options::SceneKind;

    #[test]
    #[ignore = "full-size timing, about ten seconds"]
    fn full_size_generation() {
        let opts = SynthOptions::new(SceneKind::Raw, 10_000, 10_400, 7);
        let t = Instant::now();
        let scene = Scene::build(&opts);
        let built = t.elapsed();
        let planes = scene.render(true);
        let rendered = t.elapsed();
        let grid = scene.grid2km(50);
        let ties = scene.tie_points();
        println!(
            "threads {}: build {:.2} s, render {:.2} s, 2 km grid + ties {:.2} s ({} px, {} cells, {} ties)",
            rayon::current_num_threads(),
            built.as_secs_f64(),
            (rendered - built).as_secs_f64(),
            (t.elapsed() - rendered).as_secs_f64(),
            planes.hh.len(),
            grid.rows * grid.cols,
            ties.line.len()
        );
        assert_eq!(planes.hh.len(), 104_000_000);
    }
}
