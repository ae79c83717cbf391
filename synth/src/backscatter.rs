//! Rendering a scene to pixels: HH / HV sigma0 in dB, the polygon index and the distance zone.
//!
//! Each row draws its speckle from its own seeded stream, so the output does not depend on the
//! number of threads.

use rayon::prelude::*;

use crate::chart::Look;
use crate::rng::{FIELD_OCTAVES, Noise2, RowField, SplitMix64, hash, tag};
use crate::scene::{NO_POLYGON, Scene};

/// Incidence angle at the near edge of the swath (first column), degrees.
pub(crate) const INCIDENCE_NEAR: f64 = 19.0;
/// Incidence angle at the far edge (last column), degrees.
pub(crate) const INCIDENCE_FAR: f64 = 47.0;
/// Incidence of the class means in [`Look::means_db`].
const INCIDENCE_REF: f64 = 34.0;
/// HH / HV slope against incidence, dB per degree.
const SLOPE_HH: f64 = -0.2;
const SLOPE_HV: f64 = -0.1;
/// Wind speed at which open water has its nominal mean, m/s.
const NOMINAL_WIND: f32 = 6.0;
/// Sigma0 is clipped to this range (dB); the int16 packing covers it.
const DB_RANGE: (f32, f32) = (-60.0, 20.0);
/// Scale (metres) of the within-class texture, of land topography, and of the stage pattern.
const TEXTURE_M: f64 = 200.0;
const LAND_TEXTURE_M: f64 = 1_500.0;
const STAGE_M: f64 = 3_000.0;

/// Incidence angle (degrees) of column `x` of a `width`-wide swath: linear near → far.
pub(crate) fn incidence_deg(x: f64, width: usize) -> f64 {
    INCIDENCE_NEAR + (INCIDENCE_FAR - INCIDENCE_NEAR) * x / (width.max(2) - 1) as f64
}

/// The full-resolution planes of one scene.
#[derive(Debug, Clone)]
pub(crate) struct Planes {
    /// HH sigma0, dB, NaN invalid.
    pub hh: Vec<f32>,
    /// HV sigma0, dB, NaN invalid.
    pub hv: Vec<f32>,
    /// Polygon index into `Scene::polygons`, [`NO_POLYGON`] on land.
    pub poly: Vec<u8>,
    /// Distance zone, 0 on land.
    pub zone: Vec<u8>,
}

/// `10 log10(1 + 10^(d / 10))`: the dB gain of adding a floor `d` dB above the signal,
/// tabulated on [-40, 40] dB (exact to ~1e-4 dB; it saves a pow and a log per pixel).
struct FloorGain {
    table: Vec<f32>,
}

impl FloorGain {
    const LO: f32 = -40.0;
    const STEP: f32 = 1.0 / 32.0;

    fn new() -> Self {
        let n = (80.0 / Self::STEP) as usize + 1;
        let table = (0..n)
            .map(|i| {
                let d = f64::from(Self::LO) + i as f64 * f64::from(Self::STEP);
                (10.0 * (1.0 + 10f64.powf(d / 10.0)).log10()) as f32
            })
            .collect();
        Self { table }
    }

    #[inline]
    fn at(&self, d: f32) -> f32 {
        let f = (d - Self::LO) / Self::STEP;
        if f <= 0.0 {
            return 0.0;
        }
        let i = f as usize;
        if i + 1 >= self.table.len() {
            return d;
        }
        let t = f - i as f32;
        self.table[i] + (self.table[i + 1] - self.table[i]) * t
    }
}

/// Per-column terms shared by all rows.
struct Columns {
    hh_trend: Vec<f32>,
    hv_trend: Vec<f32>,
    /// Residual HV noise floor after denoising (dB), scalloped per EW sub-swath.
    hv_floor: Vec<f32>,
    floor_gain: FloorGain,
}

impl Columns {
    fn new(width: usize) -> Self {
        let inc: Vec<f64> = (0..width).map(|x| incidence_deg(x as f64, width)).collect();
        let floor_db = |x: usize| {
            let phase = std::f64::consts::PI * 5.0 * x as f64 / width as f64;
            -32.0 + 1.5 * phase.cos().abs()
        };
        Self {
            hh_trend: inc
                .iter()
                .map(|t| (SLOPE_HH * (t - INCIDENCE_REF)) as f32)
                .collect(),
            hv_trend: inc
                .iter()
                .map(|t| (SLOPE_HV * (t - INCIDENCE_REF)) as f32)
                .collect(),
            hv_floor: (0..width).map(|x| floor_db(x) as f32).collect(),
            floor_gain: FloorGain::new(),
        }
    }
}

impl Scene {
    /// Render every plane. Without `sar`, both SAR channels are all NaN (and cost nothing).
    pub(crate) fn render(&self, sar: bool) -> Planes {
        let (h, w) = (self.height, self.width);
        let mut planes = Planes {
            hh: vec![f32::NAN; h * w],
            hv: vec![f32::NAN; h * w],
            poly: vec![NO_POLYGON; h * w],
            zone: vec![0; h * w],
        };
        let cols = Columns::new(w);
        planes
            .hh
            .par_chunks_mut(w)
            .zip(planes.hv.par_chunks_mut(w))
            .zip(planes.poly.par_chunks_mut(w))
            .zip(planes.zone.par_chunks_mut(w))
            .enumerate()
            .for_each(|(y, (((hh, hv), poly), zone))| {
                self.render_row(y, sar, &cols, [hh, hv], poly, zone);
            });
        planes
    }

    fn render_row(
        &self,
        y: usize,
        sar: bool,
        cols: &Columns,
        [hh, hv]: [&mut [f32]; 2],
        poly: &mut [u8],
        zone: &mut [u8],
    ) {
        let w = self.width;
        let mut rng = SplitMix64::new(hash(&[self.seed, tag::SPECKLE, y as u64]));
        let px = |m: f64| m / self.spacing_m;
        let yf = y as f64;
        let mut texture = RowField::new(
            Noise2::new(hash(&[self.seed, tag::TEXTURE])),
            yf,
            px(TEXTURE_M).max(2.0),
            2,
        );
        let mut land_texture = RowField::new(
            Noise2::new(hash(&[self.seed, tag::TEXTURE, 1])),
            yf,
            px(LAND_TEXTURE_M),
            3,
        );
        // Each polygon's fields along this row, made when first met.
        let mut fields: Vec<Option<(RowField, RowField)>> = vec![None; self.polygons.len()];
        let (left, right) = self.geo.borders(y);
        for x in 0..w {
            let land = self.geo.is_land(x, y);
            let p = if land {
                NO_POLYGON
            } else {
                self.partition_at(x, y)
            };
            poly[x] = p;
            zone[x] = if land { 0 } else { self.geo.zone(x, y) };
            if !sar || x < left || x >= w - right {
                continue; // stays NaN
            }
            let xf = x as f64;
            let look = if land {
                Look::Land
            } else {
                let s = &self.polygons[usize::from(p)].surface;
                let (ice_field, stage_field) = fields[usize::from(p)].get_or_insert_with(|| {
                    (
                        // Features below 2 pixels would alias into salt and pepper.
                        RowField::new(s.ice_field, yf, px(s.texture_m).max(2.0), FIELD_OCTAVES),
                        RowField::new(s.stage_field, yf, px(STAGE_M), FIELD_OCTAVES),
                    )
                });
                if ice_field.at(xf) < s.ice_threshold {
                    let [t0, t1] = s.stage_thresholds;
                    if t0.is_infinite() {
                        s.looks[0]
                    } else {
                        let m = stage_field.at(xf);
                        if m < t0 {
                            s.looks[0]
                        } else if m < t1 {
                            s.looks[1]
                        } else {
                            s.looks[2]
                        }
                    }
                } else {
                    Look::OpenWater
                }
            };
            let (mut mh, mut mv) = look.means_db();
            if look == Look::OpenWater {
                // Rougher sea under stronger wind.
                let dw = self.wind_speed(x, y) - NOMINAL_WIND;
                mh += dw.clamp(-6.0, 7.0);
                mv += (0.3 * dw).clamp(-2.0, 3.0);
            }
            let t = if land {
                land_texture.at(xf)
            } else {
                texture.at(xf)
            };
            let amp = 2.0 * look.texture_db();
            mh += amp * t;
            mv += 0.7 * amp * t;
            let (speckle_hh, speckle_hv) = rng.speckle_db_pair();
            let hh_db = mh + cols.hh_trend[x] + speckle_hh;
            // The noise floor adds in linear power and is speckled with the signal.
            let hv_signal = mv + cols.hv_trend[x];
            let hv_db = hv_signal + cols.floor_gain.at(cols.hv_floor[x] - hv_signal) + speckle_hv;
            hh[x] = hh_db.clamp(DB_RANGE.0, DB_RANGE.1);
            hv[x] = hv_db.clamp(DB_RANGE.0, DB_RANGE.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_gain_matches_the_exact_sum() {
        let g = FloorGain::new();
        for i in -600..600 {
            let d = i as f32 * 0.1 + 0.013;
            let exact = (10.0 * (1.0 + 10f64.powf(f64::from(d) / 10.0)).log10()) as f32;
            assert!(
                (g.at(d) - exact).abs() < 2e-3,
                "{d}: {} vs {exact}",
                g.at(d)
            );
        }
    }

    #[test]
    fn incidence_spans_the_swath() {
        assert_eq!(incidence_deg(0.0, 320), INCIDENCE_NEAR);
        assert!((incidence_deg(319.0, 320) - INCIDENCE_FAR).abs() < 1e-12);
    }
}
