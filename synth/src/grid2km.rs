//! The 2 km grid: AMSR2 brightness temperatures and ERA5 fields, smooth and consistent with the
//! scene (ice raises low-frequency brightness, the ERA5 wind is the wind that roughens the sea).

use icefm_schemas::norm::{AMSR2_VARIABLES, ERA5_VARIABLES};

use crate::rng::{Noise2, SplitMix64, hash, tag};
use crate::scene::{NO_POLYGON, Scene};

/// Brightness temperature (K) of open water, sea ice and land per AMSR2 channel, in
/// [`AMSR2_VARIABLES`] order (6.9 h, 6.9 v, 7.3 h, …, 89.0 v).
const TB_WATER: [f64; 14] = [
    88.0, 160.0, 90.0, 162.0, 95.0, 170.0, 112.0, 188.0, 135.0, 205.0, 148.0, 212.0, 200.0, 240.0,
];
const TB_ICE: [f64; 14] = [
    235.0, 250.0, 235.0, 250.0, 233.0, 249.0, 228.0, 246.0, 225.0, 243.0, 212.0, 232.0, 205.0,
    222.0,
];
const TB_LAND: [f64; 14] = [
    245.0, 255.0, 245.0, 255.0, 244.0, 254.0, 242.0, 252.0, 240.0, 250.0, 236.0, 246.0, 230.0,
    240.0,
];

/// Footprint half-width in 2 km cells per AMSR2 frequency (6.9, 7.3, 10.7, 18.7, 23.8, 36.5,
/// 89.0 GHz): low frequencies see 35 × 62 km, 89 GHz about 5 km, so ice edges blur accordingly.
const FOOTPRINT_CELLS: [usize; 7] = [12, 12, 8, 5, 5, 2, 1];

/// Box mean of radius `r` (clamped at the edges), separably.
fn box_blur(v: &[f64], rows: usize, cols: usize, r: usize) -> Vec<f64> {
    let pass = |src: &[f64], n: usize, m: usize, at: &dyn Fn(usize, usize) -> usize| {
        let mut out = vec![0.0; src.len()];
        for i in 0..n {
            for j in 0..m {
                let (lo, hi) = (j.saturating_sub(r), (j + r).min(m - 1));
                let sum: f64 = (lo..=hi).map(|q| src[at(i, q)]).sum();
                out[at(i, j)] = sum / (hi - lo + 1) as f64;
            }
        }
        out
    };
    let horizontal = pass(v, rows, cols, &|i, j| i * cols + j);
    pass(&horizontal, cols, rows, &|j, i| i * cols + j)
}

/// Every field of the 2 km grid, row-major `rows × cols`.
#[derive(Debug, Clone)]
pub(crate) struct Grid2km {
    pub rows: usize,
    pub cols: usize,
    /// AMSR2 then ERA5 variables, in [`AMSR2_VARIABLES`], [`ERA5_VARIABLES`] order.
    pub fields: Vec<(&'static str, Vec<f64>)>,
    /// AMSR2 swath coverage (1 everywhere: the scene lies inside the swath).
    pub swath_map: Vec<u8>,
    /// EW sub-swath number 1 … 5 by column.
    pub segmentation: Vec<u8>,
}

impl Scene {
    /// The 2 km grid for `factor` SAR pixels per cell: `floor(h / factor) × floor(w / factor)`.
    pub(crate) fn grid2km(&self, factor: usize) -> Grid2km {
        let (rows, cols) = (self.height / factor, self.width / factor);
        let d = self.height.max(self.width) as f64;
        let mut rng = SplitMix64::new(hash(&[self.seed, tag::GRID2KM]));
        let noises: Vec<Noise2> = (0..20).map(|_| Noise2::new(rng.next_u64())).collect();
        // Seasonal warmth: 0 in late January, 1 in late July.
        let doy = f64::from(self.acquisition.day_of_year());
        let warm = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * (doy - 20.0) / 365.25).cos();

        let n = rows * cols;
        // Per cell: land, ice over sea, position.
        let mut land = Vec::with_capacity(n);
        let mut ice = Vec::with_capacity(n);
        for i in 0..rows {
            for j in 0..cols {
                let p = self.polygon_at(j * factor + factor / 2, i * factor + factor / 2);
                land.push(if p == NO_POLYGON { 1.0 } else { 0.0 });
                ice.push(self.ice_fraction(p));
            }
        }
        let q = |k: usize| {
            let (i, j) = (k / cols, k % cols);
            (
                (j * factor + factor / 2) as f64 / d,
                (i * factor + factor / 2) as f64 / d,
            )
        };
        let smooth = |k: usize, noise: usize, f: f64| {
            let (qx, qy) = q(k);
            f64::from(noises[noise].fbm(qx * f, qy * f, 2))
        };
        let tcwv: Vec<f64> = (0..n)
            .map(|k| (1.5 + 12.0 * warm + 2.0 * smooth(k, 14, 3.0)).max(0.2))
            .collect();
        let mut fields: Vec<(&'static str, Vec<f64>)> = Vec::with_capacity(20);
        for (c, name) in AMSR2_VARIABLES.iter().enumerate() {
            let r = FOOTPRINT_CELLS[c / 2];
            let l = box_blur(&land, rows, cols, r);
            let i = box_blur(&ice, rows, cols, r);
            let values = (0..n)
                .map(|k| {
                    let (fl, fi) = (l[k], i[k] * (1.0 - l[k]));
                    let fw = (1.0 - fl - fi).max(0.0);
                    let mut tb = fl * TB_LAND[c] + fi * TB_ICE[c] + fw * TB_WATER[c];
                    // Water vapour brightens the sea at high frequencies.
                    if c >= 8 {
                        tb += fw * 0.8 * tcwv[k];
                    }
                    tb + 3.0 * smooth(k, c, 6.0)
                })
                .collect();
            fields.push((name, values));
        }
        let t2m: Vec<f64> = (0..n)
            .map(|k| 250.0 + 23.0 * warm - 5.0 * ice[k] * (1.0 - warm) + 2.5 * smooth(k, 15, 2.0))
            .collect();
        let era5: [Vec<f64>; 6] = [
            (0..n).map(|k| self.wind.at(q(k).0, q(k).1).0).collect(),
            (0..n).map(|k| self.wind.at(q(k).0, q(k).1).1).collect(),
            t2m.clone(),
            (0..n)
                .map(|k| t2m[k] - 0.8 - 3.0 * ice[k] * (1.0 - warm) + 0.8 * smooth(k, 16, 4.0))
                .collect(),
            tcwv,
            (0..n)
                .map(|k| (0.04 + 0.05 * warm + 0.06 * smooth(k, 17, 4.0)).max(0.0))
                .collect(),
        ];
        fields.extend(ERA5_VARIABLES.iter().copied().zip(era5));
        Grid2km {
            rows,
            cols,
            fields,
            swath_map: vec![1; n],
            segmentation: (0..n).map(|k| 1 + (5 * (k % cols) / cols) as u8).collect(),
        }
    }
}
