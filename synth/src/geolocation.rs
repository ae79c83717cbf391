//! Where the scene lies on Earth, and its 21 × 21 tie-point grid.

use crate::backscatter::incidence_deg;
use crate::options::Service;
use crate::rng::{Noise2, SplitMix64, hash, tag};
use crate::scene::Scene;

/// Tie points per axis (21 × 21 = 441 = `sar_grid_points`).
pub(crate) const TIE_POINTS: usize = 21;

/// The tie-point grid, row-major, each value per point.
#[derive(Debug, Clone)]
pub(crate) struct TiePoints {
    pub line: Vec<f64>,
    pub sample: Vec<f64>,
    pub latitude: Vec<f64>,
    pub longitude: Vec<f64>,
    pub incidence: Vec<f64>,
    pub height: Vec<f64>,
}

impl Scene {
    /// Tie points on a regular grid of pixel rows / columns spanning `[0, h-1] × [0, w-1]`
    /// (`line_i = i (h-1) / 20`, not rounded, so bilinear interpolation between them is exact);
    /// latitude / longitude from a local tangent plane around a centre in the service's waters.
    pub(crate) fn tie_points(&self) -> TiePoints {
        let mut rng = SplitMix64::new(hash(&[self.seed, tag::GEO]));
        let (lat0, lon0) = match self.service {
            Service::Dmi => (rng.range(60.0, 79.0), rng.range(-58.0, -15.0)),
            Service::Cis => (rng.range(52.0, 78.0), rng.range(-95.0, -55.0)),
        };
        let heading = rng.range(0.0, std::f64::consts::TAU);
        let relief = Noise2::new(rng.next_u64());
        let km = self.spacing_m / 1000.0;
        let (h, w) = (self.height, self.width);
        let step = |i: usize, n: usize| (i * (n - 1)) as f64 / (TIE_POINTS - 1) as f64;
        let mut t = TiePoints {
            line: Vec::with_capacity(TIE_POINTS * TIE_POINTS),
            sample: Vec::new(),
            latitude: Vec::new(),
            longitude: Vec::new(),
            incidence: Vec::new(),
            height: Vec::new(),
        };
        for i in 0..TIE_POINTS {
            for j in 0..TIE_POINTS {
                let (line, sample) = (step(i, h), step(j, w));
                // Image axes (right, down) in km from the centre, rotated to (east, north).
                let dx = (sample - (w as f64 - 1.0) / 2.0) * km;
                let dy = -(line - (h as f64 - 1.0) / 2.0) * km;
                let (s, c) = heading.sin_cos();
                let (east, north) = (dx * c - dy * s, dx * s + dy * c);
                let lat = lat0 + north / 111.2;
                let lon = lon0 + east / (111.2 * lat0.to_radians().cos());
                let on_land = self
                    .geo
                    .is_land(sample.round() as usize, line.round() as usize);
                t.line.push(line);
                t.sample.push(sample);
                t.latitude.push(lat);
                t.longitude.push(lon);
                t.incidence.push(incidence_deg(sample, w));
                t.height.push(if on_land {
                    30.0 + 400.0 * (1.0 + f64::from(relief.at(sample / 300.0, line / 300.0)))
                } else {
                    0.0
                });
            }
        }
        t
    }
}
