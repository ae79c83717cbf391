//! Land, coastline, distance-to-land zones and the swath's no-data borders.
//!
//! Large structures are laid out in scene-relative units (a fraction of the longer side), so a
//! raw scene and an RTT scene of half its size with the same seed look alike.

use rayon::prelude::*;

use crate::rng::{Noise2, SplitMix64, hash, tag};

/// Largest distance zone (> 300 km from land).
pub(crate) const MAX_ZONE: u8 = 41;

/// Zone of a distance to land: 1 … 41, zone `k + 1` from `300 (k / 40)²` km, so zones are
/// narrow near the coast and wide offshore; land itself is zone 0.
pub(crate) fn zone_of_km(d: f32) -> u8 {
    let k = (40.0 * (d.max(0.0) / 300.0).sqrt()).floor();
    1 + k.min(f32::from(MAX_ZONE - 1)) as u8
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    Top,
    Bottom,
    Left,
    Right,
}

#[derive(Debug, Clone)]
struct Island {
    cx: f64,
    cy: f64,
    r: f64,
    shape: Noise2,
}

impl Island {
    fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let d2 = dx * dx + dy * dy;
        if d2 > (1.4 * self.r).powi(2) {
            return false;
        }
        if d2 < (0.6 * self.r).powi(2) {
            return true;
        }
        let a = dy.atan2(dx);
        let rr = self.r
            * (1.0 + 0.4 * f64::from(self.shape.at(2.0 * a.cos() + 9.0, 2.0 * a.sin() + 9.0)));
        d2 < rr * rr
    }
}

/// Distance to land on a coarse grid (cell centres), in km.
#[derive(Debug, Clone)]
struct DistanceField {
    cell: usize,
    rows: usize,
    cols: usize,
    km: Vec<f32>,
}

impl DistanceField {
    /// Bilinear interpolation at pixel `(x, y)`.
    fn at(&self, x: usize, y: usize) -> f32 {
        let c = self.cell as f32;
        let fy = ((y as f32 + 0.5) / c - 0.5).clamp(0.0, (self.rows - 1) as f32);
        let fx = ((x as f32 + 0.5) / c - 0.5).clamp(0.0, (self.cols - 1) as f32);
        let (y0, x0) = (fy as usize, fx as usize);
        let (y1, x1) = ((y0 + 1).min(self.rows - 1), (x0 + 1).min(self.cols - 1));
        let (ty, tx) = (fy - y0 as f32, fx - x0 as f32);
        let v = |r: usize, q: usize| self.km[r * self.cols + q];
        let top = v(y0, x0) + (v(y0, x1) - v(y0, x0)) * tx;
        let bottom = v(y1, x0) + (v(y1, x1) - v(y1, x0)) * tx;
        top + (bottom - top) * ty
    }
}

/// Land mask, distance zones and no-data borders of one scene.
#[derive(Debug, Clone)]
pub(crate) struct Geography {
    height: usize,
    width: usize,
    edge: Edge,
    /// Land depth (pixels inward from the edge) at each position along the edge.
    coast_depth: Vec<f32>,
    islands: Vec<Island>,
    /// No-data width at the left / right of each row.
    left: Vec<u32>,
    right: Vec<u32>,
    distance: DistanceField,
}

impl Geography {
    /// Lay out land and borders; `cell` is the coarse grid step used for distances.
    pub(crate) fn new(seed: u64, height: usize, width: usize, spacing_m: f64, cell: usize) -> Self {
        let mut rng = SplitMix64::new(hash(&[seed, tag::COAST]));
        let d = height.max(width) as f64;
        let edge = [Edge::Top, Edge::Bottom, Edge::Left, Edge::Right]
            [rng.weighted(&[0.35, 0.35, 0.15, 0.15])];
        let len = match edge {
            Edge::Top | Edge::Bottom => width,
            Edge::Left | Edge::Right => height,
        };
        let t0 = rng.range(-0.3, 0.35);
        let t1 = rng.range(0.65, 1.3);
        let dmax = rng.range(0.08, 0.22);
        let coarse = Noise2::new(rng.next_u64());
        let fine = Noise2::new(rng.next_u64());
        let coast_depth = (0..len)
            .map(|p| {
                let tn = p as f64 / len as f64;
                if tn <= t0 || tn >= t1 {
                    return 0.0;
                }
                let env = (std::f64::consts::PI * (tn - t0) / (t1 - t0)).sin().sqrt();
                let t = p as f64 / d;
                let shape = dmax * (0.75 + 0.45 * f64::from(coarse.fbm(t * 6.0, 0.5, 3)))
                    + 0.006 * f64::from(fine.fbm(t * 40.0, 3.3, 2));
                (d * env * shape).max(0.0) as f32
            })
            .collect();
        let islands = (0..rng.below(3))
            .map(|_| Island {
                cx: rng.range(0.15, 0.85) * width as f64,
                cy: rng.range(0.15, 0.85) * height as f64,
                r: rng.range(0.008, 0.025) * d,
                shape: Noise2::new(rng.next_u64()),
            })
            .collect();
        let mut brng = SplitMix64::new(hash(&[seed, tag::BORDER]));
        let left = border(&mut brng, height, width);
        let right = border(&mut brng, height, width);
        let mut geo = Self {
            height,
            width,
            edge,
            coast_depth,
            islands,
            left,
            right,
            distance: DistanceField {
                cell,
                rows: 0,
                cols: 0,
                km: Vec::new(),
            },
        };
        geo.distance = geo.distance_field(cell, spacing_m);
        geo
    }

    /// Whether pixel `(x, y)` is land.
    #[inline]
    pub(crate) fn is_land(&self, x: usize, y: usize) -> bool {
        let (along, inward) = match self.edge {
            Edge::Top => (x, y),
            Edge::Bottom => (x, self.height - 1 - y),
            Edge::Left => (y, x),
            Edge::Right => (y, self.width - 1 - x),
        };
        (inward as f32) < self.coast_depth[along]
            || self
                .islands
                .iter()
                .any(|i| i.contains(x as f64 + 0.5, y as f64 + 0.5))
    }

    /// Width of the no-data border at the left and right of row `y`.
    #[inline]
    pub(crate) fn borders(&self, y: usize) -> (usize, usize) {
        (self.left[y] as usize, self.right[y] as usize)
    }

    /// Whether pixel `(x, y)` lies in a no-data border.
    pub(crate) fn is_nodata(&self, x: usize, y: usize) -> bool {
        let (l, r) = self.borders(y);
        x < l || x >= self.width - r
    }

    /// Distance zone of a non-land pixel (1 … 41).
    #[inline]
    pub(crate) fn zone(&self, x: usize, y: usize) -> u8 {
        zone_of_km(self.distance.at(x, y))
    }

    /// Distance to land in km at pixel `(x, y)` (coarse, interpolated).
    pub(crate) fn distance_km(&self, x: usize, y: usize) -> f32 {
        self.distance.at(x, y)
    }

    fn distance_field(&self, cell: usize, spacing_m: f64) -> DistanceField {
        let rows = self.height.div_ceil(cell);
        let cols = self.width.div_ceil(cell);
        let centre = |i: usize, n: usize| (i * cell + cell / 2).min(n - 1);
        let land: Vec<bool> = (0..rows * cols)
            .into_par_iter()
            .map(|k| self.is_land(centre(k % cols, self.width), centre(k / cols, self.height)))
            .collect();
        let d2 = squared_distance_transform(&land, rows, cols);
        let km_per_cell = (cell as f64 * spacing_m / 1000.0) as f32;
        let km = d2.iter().map(|&v| v.sqrt() * km_per_cell).collect();
        DistanceField {
            cell,
            rows,
            cols,
            km,
        }
    }
}

/// A slanted, irregular no-data border: a linear trend, a smooth wiggle and a stair-step jitter
/// every 40 rows (EW GRDM swath edges are ragged).
fn border(rng: &mut SplitMix64, height: usize, width: usize) -> Vec<u32> {
    let a = rng.range(0.008, 0.035);
    let b = rng.range(-0.02, 0.02);
    let wiggle = Noise2::new(rng.next_u64());
    let step_seed = rng.next_u64();
    let w = width as f64;
    (0..height)
        .map(|y| {
            let t = y as f64 / height as f64;
            let step = (hash(&[step_seed, (y / 40) as u64]) % 7) as f64 - 3.0;
            let v = w * (a + b * t) + w * 0.004 * f64::from(wiggle.fbm(t * 12.0, 0.0, 2)) + step;
            v.clamp(2.0, w / 5.0) as u32
        })
        .collect()
}

/// Exact squared Euclidean distance (in cells) to the nearest `true` cell
/// (Felzenszwalb & Huttenlocher's separable transform). Without any `true` cell all are 1e12.
fn squared_distance_transform(mask: &[bool], rows: usize, cols: usize) -> Vec<f32> {
    const INF: f64 = 1e12;
    let mut g: Vec<f64> = mask.iter().map(|&m| if m { 0.0 } else { INF }).collect();
    // Columns, then rows.
    let mut col = vec![0.0; rows];
    for c in 0..cols {
        for r in 0..rows {
            col[r] = g[r * cols + c];
        }
        let out = dt1d(&col);
        for r in 0..rows {
            g[r * cols + c] = out[r];
        }
    }
    g.par_chunks_mut(cols).for_each(|row| {
        let out = dt1d(row);
        row.copy_from_slice(&out);
    });
    g.iter().map(|&v| v.min(INF) as f32).collect()
}

/// One-dimensional squared distance transform of a sampled function (lower envelope of
/// parabolas rooted at each sample).
fn dt1d(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    let mut v = vec![0usize; n];
    let mut z = vec![0.0f64; n + 1];
    let mut k = 0usize;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    let intersect = |q: usize, p: usize| {
        ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q - p) as f64)
    };
    for q in 1..n {
        let mut s = intersect(q, v[k]);
        // z[0] = -inf stops the loop at k = 0.
        while s <= z[k] {
            k -= 1;
            s = intersect(q, v[k]);
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    k = 0;
    (0..n)
        .map(|q| {
            while z[k + 1] < q as f64 {
                k += 1;
            }
            let p = v[k];
            (q as f64 - p as f64).powi(2) + f[p]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_transform_matches_brute_force() {
        let (rows, cols) = (23, 31);
        let mut rng = SplitMix64::new(4);
        let mask: Vec<bool> = (0..rows * cols).map(|_| rng.chance(0.03)).collect();
        let d2 = squared_distance_transform(&mask, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                let mut best = f64::INFINITY;
                for (k, &m) in mask.iter().enumerate() {
                    if m {
                        let (dr, dc) = ((k / cols) as f64 - r as f64, (k % cols) as f64 - c as f64);
                        best = best.min(dr * dr + dc * dc);
                    }
                }
                assert_eq!(f64::from(d2[r * cols + c]), best, "({r}, {c})");
            }
        }
    }

    #[test]
    fn zones_grow_with_distance() {
        assert_eq!(zone_of_km(0.0), 1);
        assert_eq!(zone_of_km(0.18), 1);
        assert_eq!(zone_of_km(0.19), 2);
        assert_eq!(zone_of_km(300.0), MAX_ZONE);
        assert_eq!(zone_of_km(1e9), MAX_ZONE);
        let mut last = 0;
        for i in 0..4000 {
            let z = zone_of_km(i as f32 * 0.1);
            assert!(z >= last);
            last = z;
        }
    }

    #[test]
    fn land_lies_along_one_edge_and_borders_are_slanted_strips() {
        let g = Geography::new(11, 400, 420, 40.0, 4);
        let land = (0..400)
            .flat_map(|y| (0..420).map(move |x| (x, y)))
            .filter(|&(x, y)| g.is_land(x, y))
            .count();
        let frac = land as f64 / (400.0 * 420.0);
        assert!(frac > 0.005 && frac < 0.35, "{frac}");
        for y in 0..400 {
            let (l, r) = g.borders(y);
            assert!(l >= 2 && r >= 2 && l + r < 420 / 2);
            assert!(g.is_nodata(0, y) && g.is_nodata(419, y) && !g.is_nodata(210, y));
        }
    }
}
