//! Where a scene lies on Earth: its tie points' latitude and longitude, interpolated between
//! them in 3-D (as unit vectors from the Earth's centre, so a scene across the antimeridian or
//! near the pole interpolates along the surface, not through a jump of 360° in longitude), and
//! its footprint (centre and bounds) for the scenes manifest.

/// A scene's grid of tie points with latitude and longitude.
#[derive(Debug, Clone, PartialEq)]
pub struct Geolocation {
    /// Tie-point rows and columns.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The native pixel row of each tie-point row and the column of each tie-point column
    /// (ascending), where the file gives them (raw files: `sar_grid_line`, `sar_grid_sample`).
    /// Ready-to-train files give the grid without positions.
    pub positions: Option<(Vec<f64>, Vec<f64>)>,
    /// Latitude in degrees, `[rows * cols]` row-major; NaN where the file has none.
    pub latitude: Vec<f64>,
    /// Longitude in degrees, as `latitude`.
    pub longitude: Vec<f64>,
}

/// A scene's centre and bounds, in degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footprint {
    /// Latitude of the image's centre.
    pub centre_latitude: f64,
    /// Longitude of the image's centre, in [-180, 180).
    pub centre_longitude: f64,
    /// Southernmost tie point (the centre may lie further north or south, between tie points
    /// near the pole).
    pub min_latitude: f64,
    /// Northernmost tie point.
    pub max_latitude: f64,
    /// Westernmost tie point's longitude, in [-180, 180); greater than `east_longitude` where
    /// the scene crosses the antimeridian. -180 where the tie points go round the pole.
    pub west_longitude: f64,
    /// Easternmost, as `west_longitude`; 180 where the tie points go round the pole.
    pub east_longitude: f64,
}

/// The unit vector of a latitude and longitude in degrees.
pub fn unit(latitude: f64, longitude: f64) -> [f64; 3] {
    let (sl, cl) = latitude.to_radians().sin_cos();
    let (so, co) = longitude.to_radians().sin_cos();
    [cl * co, cl * so, sl]
}

/// The latitude and longitude (in [-180, 180]) of a vector, which need not be of unit length.
pub fn degrees([x, y, z]: [f64; 3]) -> (f64, f64) {
    (z.atan2(x.hypot(y)).to_degrees(), y.atan2(x).to_degrees())
}

/// `longitude` in [-180, 180).
fn wrap(longitude: f64) -> f64 {
    (longitude + 180.0).rem_euclid(360.0) - 180.0
}

/// The interval of `axis` (ascending) that holds `x`, and `x`'s fraction along it: below 0 or
/// above 1 outside the axis, where the outer intervals are extended.
fn bracket(axis: &[f64], x: f64) -> (usize, f64) {
    let last = axis.len().saturating_sub(2);
    let i = axis
        .partition_point(|&a| a <= x)
        .saturating_sub(1)
        .min(last);
    let span = axis[i + 1] - axis[i];
    (
        i,
        if span > 0.0 {
            (x - axis[i]) / span
        } else {
            0.0
        },
    )
}

impl Geolocation {
    /// A grid of `rows × cols` tie points, or why it cannot be one: latitude and longitude of
    /// another size, a latitude outside ±90° or a longitude outside ±360°, positions not
    /// ascending or not one per row and column. Values that are NaN (the file's fill) are kept.
    pub fn new(
        rows: usize,
        cols: usize,
        positions: Option<(Vec<f64>, Vec<f64>)>,
        latitude: Vec<f64>,
        longitude: Vec<f64>,
    ) -> Result<Self, String> {
        if rows < 2 || cols < 2 {
            return Err(format!("a {rows} × {cols} grid of tie points is too small"));
        }
        if latitude.len() != rows * cols || longitude.len() != rows * cols {
            return Err(format!(
                "{} latitude(s) and {} longitude(s) for a {rows} × {cols} grid",
                latitude.len(),
                longitude.len()
            ));
        }
        if let Some(bad) = latitude.iter().find(|v| v.abs() > 90.0) {
            return Err(format!("latitude {bad} is outside ±90°"));
        }
        if let Some(bad) = longitude.iter().find(|v| v.abs() > 360.0) {
            return Err(format!("longitude {bad} is outside ±360°"));
        }
        if !latitude
            .iter()
            .zip(&longitude)
            .any(|(a, o)| a.is_finite() && o.is_finite())
        {
            return Err("no tie point has a latitude and longitude (all are fill values)".into());
        }
        if let Some((lines, samples)) = &positions {
            let ascending = |a: &[f64]| a.windows(2).all(|w| w[0] < w[1]);
            if lines.len() != rows || samples.len() != cols || !ascending(lines) {
                return Err("tie-point rows are not one ascending position per row".into());
            }
            if !ascending(samples) {
                return Err("tie-point columns are not one ascending position per column".into());
            }
        }
        Ok(Self {
            rows,
            cols,
            positions,
            latitude,
            longitude,
        })
    }

    /// The vector of tie point (i, j); NaN components where it has no position.
    fn vector(&self, i: usize, j: usize) -> [f64; 3] {
        let k = i * self.cols + j;
        unit(self.latitude[k], self.longitude[k])
    }

    /// Latitude and longitude at fractional tie-point indices `(u, v)` (row, column): bilinear
    /// between the four tie points around it in 3-D, extended linearly beyond the grid's edge.
    /// NaN where one of the four has none.
    pub fn at_index(&self, u: f64, v: f64) -> (f64, f64) {
        let clamp = |x: f64, n: usize| (x.floor().max(0.0) as usize).min(n - 2);
        let (i, j) = (clamp(u, self.rows), clamp(v, self.cols));
        self.blend((i, u - i as f64), (j, v - j as f64))
    }

    /// Latitude and longitude at a native pixel position (row, column), as [`Self::at_index`];
    /// `None` where the file gives no positions.
    pub fn at_pixel(&self, row: f64, col: f64) -> Option<(f64, f64)> {
        let (lines, samples) = self.positions.as_ref()?;
        Some(self.blend(bracket(lines, row), bracket(samples, col)))
    }

    fn blend(&self, (i, fy): (usize, f64), (j, fx): (usize, f64)) -> (f64, f64) {
        let corners = [
            (self.vector(i, j), (1.0 - fy) * (1.0 - fx)),
            (self.vector(i, j + 1), (1.0 - fy) * fx),
            (self.vector(i + 1, j), fy * (1.0 - fx)),
            (self.vector(i + 1, j + 1), fy * fx),
        ];
        let mut p = [0.0; 3];
        // A corner of no weight is left out, so that a missing one beside a point on the grid
        // does not make it missing (0 × NaN).
        for (c, w) in corners.into_iter().filter(|(_, w)| *w != 0.0) {
            for (a, b) in p.iter_mut().zip(c) {
                *a += w * b;
            }
        }
        let (lat, lon) = degrees(p);
        (lat, wrap(lon))
    }

    /// The scene's centre and bounds: the centre at native pixel (`(height − 1) / 2`,
    /// `(width − 1) / 2`) where the file gives positions, else at the grid's middle (for any
    /// flip of a ready-to-train file's grid the same point); the bounds of the tie points with
    /// a position. `None` where the centre has none.
    pub fn footprint(&self, height: usize, width: usize) -> Option<Footprint> {
        let (lat, lon) = match self.positions {
            Some(_) => self.at_pixel((height as f64 - 1.0) / 2.0, (width as f64 - 1.0) / 2.0)?,
            None => self.at_index(
                (self.rows as f64 - 1.0) / 2.0,
                (self.cols as f64 - 1.0) / 2.0,
            ),
        };
        if !(lat.is_finite() && lon.is_finite()) {
            return None;
        }
        let mut out = Footprint {
            centre_latitude: lat,
            centre_longitude: lon,
            min_latitude: f64::INFINITY,
            max_latitude: f64::NEG_INFINITY,
            west_longitude: 0.0,
            east_longitude: 0.0,
        };
        // Longitudes as offsets from the centre's, so an antimeridian between them is no jump.
        let (mut west, mut east) = (0.0f64, 0.0f64);
        for (&a, &o) in self.latitude.iter().zip(&self.longitude) {
            if !(a.is_finite() && o.is_finite()) {
                continue;
            }
            out.min_latitude = out.min_latitude.min(a);
            out.max_latitude = out.max_latitude.max(a);
            let d = wrap(o - lon);
            west = west.min(d);
            east = east.max(d);
        }
        if east - west >= 180.0 {
            (out.west_longitude, out.east_longitude) = (-180.0, 180.0);
        } else {
            out.west_longitude = wrap(lon + west);
            out.east_longitude = wrap(lon + east);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grid whose points lie on a plane in latitude and longitude, with positions.
    fn planar(lat0: f64, lon0: f64, dlat: f64, dlon: f64) -> Geolocation {
        let (rows, cols) = (3, 4);
        let mut latitude = Vec::new();
        let mut longitude = Vec::new();
        for i in 0..rows {
            for j in 0..cols {
                latitude.push(lat0 + dlat * i as f64);
                longitude.push(lon0 + dlon * j as f64);
            }
        }
        let lines = vec![0.0, 100.0, 199.0];
        let samples = vec![0.0, 50.0, 100.0, 149.0];
        Geolocation::new(rows, cols, Some((lines, samples)), latitude, longitude).unwrap()
    }

    #[test]
    fn unit_vectors_round_trip() {
        for (lat, lon) in [(0.0, 0.0), (72.5, -45.25), (-33.0, 179.5), (89.9, 10.0)] {
            let (a, o) = degrees(unit(lat, lon));
            assert!(
                (a - lat).abs() < 1e-12 && (o - lon).abs() < 1e-12,
                "{a} {o}"
            );
        }
        // Not of unit length: the same direction.
        let (a, o) = degrees(unit(60.0, -30.0).map(|c| c * 0.5));
        assert!((a - 60.0).abs() < 1e-12 && (o + 30.0).abs() < 1e-12);
    }

    #[test]
    fn tie_points_are_given_back_and_between_them_is_near_the_plane() {
        let g = planar(70.0, -40.0, 0.05, 0.08);
        // On a tie point, exactly (to rounding) that point.
        let (a, o) = g.at_pixel(100.0, 100.0).unwrap();
        assert!(
            (a - 70.05).abs() < 1e-9 && (o + 39.84).abs() < 1e-9,
            "{a} {o}"
        );
        let (a, o) = g.at_index(1.0, 2.0);
        assert!(
            (a - 70.05).abs() < 1e-9 && (o + 39.84).abs() < 1e-9,
            "{a} {o}"
        );
        // Half-way between rows 0 and 1 (pixel row 50) and columns 1 and 2 (pixel column 75):
        // within a few metres of the plane at these small spans.
        let (a, o) = g.at_pixel(50.0, 75.0).unwrap();
        assert!(
            (a - 70.025).abs() < 1e-4 && (o + 39.88).abs() < 1e-4,
            "{a} {o}"
        );
        // Beyond the last row (pixel 199) the last interval is extended.
        let (a, _) = g.at_pixel(298.0, 0.0).unwrap();
        assert!((a - 70.1495).abs() < 1e-3, "{a}");
    }

    #[test]
    fn across_the_antimeridian_interpolates_along_the_surface() {
        // Columns at 179.8, 179.9, 180.0 (= -180) and -179.9.
        let mut g = planar(65.0, 179.8, 0.1, 0.1);
        for o in &mut g.longitude {
            *o = wrap(*o);
        }
        // Pixel column 125 is 25/49 of the way from column 100 (-180) to 149 (-179.9).
        let (_, o) = g.at_pixel(0.0, 125.0).unwrap();
        assert!((o - (-180.0 + 0.1 * 25.0 / 49.0)).abs() < 1e-4, "{o}");
        let f = g.footprint(200, 150).unwrap();
        assert!(f.west_longitude > f.east_longitude, "{f:?}");
        assert!((f.west_longitude - 179.8).abs() < 1e-9, "{f:?}");
        assert!((f.east_longitude + 179.9).abs() < 1e-9, "{f:?}");
        assert!((f.min_latitude - 65.0).abs() < 1e-12 && (f.max_latitude - 65.2).abs() < 1e-12);
    }

    #[test]
    fn footprint_centre_is_the_image_centre_or_the_grid_middle() {
        let g = planar(70.0, -40.0, 0.05, 0.08);
        let f = g.footprint(200, 150).unwrap();
        let (a, o) = g.at_pixel(99.5, 74.5).unwrap();
        assert_eq!((f.centre_latitude, f.centre_longitude), (a, o));
        assert!((f.min_latitude - 70.0).abs() < 1e-12 && (f.max_latitude - 70.1).abs() < 1e-12);
        assert!((f.west_longitude + 40.0).abs() < 1e-12 && (f.east_longitude + 39.76).abs() < 1e-9);
        // Without positions, the middle of the grid, whichever way it is flipped.
        let mut rtt = g.clone();
        rtt.positions = None;
        let mid = rtt.footprint(1, 1).unwrap();
        let mut flipped = rtt.clone();
        for v in [&mut flipped.latitude, &mut flipped.longitude] {
            let rows: Vec<Vec<f64>> = v.chunks(4).rev().map(|r| r.to_vec()).collect();
            *v = rows.concat();
        }
        let f2 = flipped.footprint(1, 1).unwrap();
        assert!((mid.centre_latitude - f2.centre_latitude).abs() < 1e-12);
        assert!((mid.centre_longitude - f2.centre_longitude).abs() < 1e-12);
        // Half-way between two points of one latitude: on the great circle, a little poleward.
        assert!((mid.centre_latitude - 70.05).abs() < 1e-5, "{mid:?}");
        // A missing tie point is left out of the bounds; the grid around the pole spans all
        // longitudes.
        let mut holed = g.clone();
        for k in [0, 4, 8] {
            holed.latitude[k] = f64::NAN;
        }
        let f = holed.footprint(200, 150).unwrap();
        assert!((f.west_longitude + 39.92).abs() < 1e-9, "{f:?}");
        // One beside the points the centre lies between (of no weight there: the middle of
        // row 1) changes nothing.
        let mut beside = rtt.clone();
        beside.latitude[2 * 4 + 1] = f64::NAN;
        let f = beside.footprint(1, 1).unwrap();
        assert!(
            (f.centre_latitude - mid.centre_latitude).abs() < 1e-12,
            "{f:?}"
        );
        let (a, _) = g.at_index(1.0, 1.0);
        let mut on = g.clone();
        on.latitude[4 + 2] = f64::NAN;
        assert_eq!(on.at_index(1.0, 1.0).0, a);
        // The bounds are the tie points', not the centre's: a grid round the pole whose
        // centre is the pole.
        let ring =
            Geolocation::new(2, 2, None, vec![89.0; 4], vec![-135.0, 135.0, -45.0, 45.0]).unwrap();
        let f = ring.footprint(1, 1).unwrap();
        assert!((f.centre_latitude - 90.0).abs() < 1e-9, "{f:?}");
        assert_eq!((f.min_latitude, f.max_latitude), (89.0, 89.0));
        assert_eq!((f.west_longitude, f.east_longitude), (-180.0, 180.0));
        // Without the point the centre lies on, no footprint.
        let mut missing = rtt.clone();
        missing.latitude[4 + 1] = f64::NAN;
        assert_eq!(missing.footprint(1, 1), None);
        let round = Geolocation::new(
            2,
            3,
            None,
            vec![88.0; 6],
            vec![-170.0, -50.0, 70.0, -170.0, -50.0, 70.0],
        )
        .unwrap();
        let f = round.footprint(1, 1).unwrap();
        assert_eq!((f.west_longitude, f.east_longitude), (-180.0, 180.0));
    }

    #[test]
    fn malformed_grids_are_refused_with_the_reason() {
        let e = Geolocation::new(2, 2, None, vec![0.0; 3], vec![0.0; 4]).unwrap_err();
        assert!(e.contains("3 latitude(s)"), "{e}");
        let e = Geolocation::new(2, 2, None, vec![0.0, 0.0, 91.0, 0.0], vec![0.0; 4]).unwrap_err();
        assert!(e.contains("outside ±90°"), "{e}");
        let e = Geolocation::new(2, 2, None, vec![f64::NAN; 4], vec![0.0; 4]).unwrap_err();
        assert!(
            e.contains("no tie point has a latitude and longitude"),
            "{e}"
        );
        let positions = Some((vec![0.0, 0.0], vec![0.0, 1.0]));
        let e = Geolocation::new(2, 2, positions, vec![0.0; 4], vec![0.0; 4]).unwrap_err();
        assert!(e.contains("rows"), "{e}");
    }
}
