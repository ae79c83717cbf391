//! Deterministic randomness: SplitMix64 streams, hashing, and hashed lattice (value) noise.
//!
//! Every random quantity of a scene is a pure function of the scene seed and *where* it is used
//! (a stream tag, a row, a polygon), never of the order in which threads run.

use std::sync::OnceLock;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a bijective 64-bit mixer.
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash a list of words into one (order-sensitive).
pub(crate) fn hash(parts: &[u64]) -> u64 {
    parts.iter().fold(GOLDEN, |h, &p| {
        mix64(h ^ p.wrapping_mul(GOLDEN).rotate_left(17))
    })
}

/// Stream tags, so that every use of the seed draws from its own stream.
pub(crate) mod tag {
    pub const TIME: u64 = 1;
    pub const NAME: u64 = 2;
    pub const SEEDS: u64 = 3;
    pub const WARP: u64 = 4;
    pub const CODES: u64 = 5;
    pub const COAST: u64 = 6;
    pub const BORDER: u64 = 7;
    pub const SPECKLE: u64 = 8;
    pub const TEXTURE: u64 = 9;
    pub const GRID2KM: u64 = 10;
    pub const GEO: u64 = 11;
    pub const CONTENT: u64 = 12;
}

/// SplitMix64: tiny, fast, statistically fine for synthetic data.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in [0, n); `n` must be > 0.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// One item of a non-empty slice.
    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// Index drawn with the given (non-negative, not all zero) weights.
    pub(crate) fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut r = self.next_f64() * total;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return i;
            }
            r -= w;
        }
        weights.len() - 1
    }

    /// Speckle of a 4-look intensity image in dB for two channels, `10 log10(G / 4)` with
    /// `G ~ Gamma(4, 1)`: one draw, each half looked up in a quantile table.
    #[inline]
    pub(crate) fn speckle_db_pair(&mut self) -> (f32, f32) {
        let r = self.next_u64();
        (
            speckle_quantile((r >> 32) as u32),
            speckle_quantile(r as u32),
        )
    }
}

/// Entries of the speckle quantile table (its tails end at p = 1 / (2 × 65536)).
const SPECKLE_TABLE: usize = 1 << 16;

/// `10 log10(G / 4)`, `G ~ Gamma(4, 1)`, at the quantile given by 32 random bits
/// (16 pick the table entry, 16 interpolate to the next).
#[inline]
fn speckle_quantile(bits: u32) -> f32 {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        // Gamma(4, 1) CDF in closed form; invert by bisection.
        let cdf = |x: f64| 1.0 - (-x).exp() * (1.0 + x + x * x / 2.0 + x * x * x / 6.0);
        let n = SPECKLE_TABLE as f64;
        (0..=SPECKLE_TABLE)
            .map(|i| {
                let p = (i as f64).clamp(0.5, n - 0.5) / n;
                let (mut lo, mut hi) = (0.0f64, 64.0f64);
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if cdf(mid) < p { lo = mid } else { hi = mid }
                }
                (10.0 * (0.5 * (lo + hi) / 4.0).log10()) as f32
            })
            .collect()
    });
    let i = (bits >> 16) as usize;
    let f = (bits & 0xFFFF) as f32 * (1.0 / 65_536.0);
    t[i] + (t[i + 1] - t[i]) * f
}

/// Floor of a finite `f64` as an integer (libm's `floor` is a call without SSE 4.1).
#[inline]
fn floor_i64(x: f64) -> i64 {
    let i = x as i64;
    if (i as f64) > x { i - 1 } else { i }
}

/// 2-D value noise: uniform random values on the integer lattice, smoothstep-interpolated.
/// Output lies in [-1, 1]; one unit of input is one lattice cell (the feature size).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Noise2 {
    seed: u64,
}

impl Noise2 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { seed: mix64(seed) }
    }

    #[inline]
    fn lattice(&self, ix: i64, iy: i64) -> f32 {
        // Two multiplies suffice for lattice values (a full mix64 costs a third of the render).
        let h = (self.seed ^ (ix as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add((iy as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
        let h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (h >> 40) as f32 * (2.0 / 16_777_216.0) - 1.0
    }

    /// Noise at `(x, y)`.
    #[inline]
    pub(crate) fn at(&self, x: f64, y: f64) -> f32 {
        let (ix, iy) = (floor_i64(x), floor_i64(y));
        let (tx, ty) = ((x - ix as f64) as f32, (y - iy as f64) as f32);
        let sx = tx * tx * (3.0 - 2.0 * tx);
        let sy = ty * ty * (3.0 - 2.0 * ty);
        let v00 = self.lattice(ix, iy);
        let v10 = self.lattice(ix + 1, iy);
        let v01 = self.lattice(ix, iy + 1);
        let v11 = self.lattice(ix + 1, iy + 1);
        let top = v00 + (v10 - v00) * sx;
        let bottom = v01 + (v11 - v01) * sx;
        top + (bottom - top) * sy
    }

    /// Fractal sum of `octaves` octaves (each twice the frequency, half the amplitude),
    /// normalised so the amplitudes sum to 1.
    pub(crate) fn fbm(&self, x: f64, y: f64, octaves: u32) -> f32 {
        let mut sum = 0.0;
        let mut amp = 1.0;
        let mut norm = 0.0;
        let mut f = 1.0;
        for o in 0..octaves {
            // Shift each octave so lattice points of different octaves do not line up.
            let shift = f64::from(o) * 17.31;
            sum += amp * self.at(x * f + shift, y * f + 2.0 * shift);
            norm += amp;
            amp *= 0.5;
            f *= 2.0;
        }
        sum / norm
    }
}

/// One octave of a [`Noise2`] along a row of fixed `y`: lattice columns are interpolated in `y`
/// once and reused while `x` stays in the same cell (features span several pixels), which makes
/// a row several times cheaper than independent [`Noise2::at`] calls. Same values up to rounding.
#[derive(Debug, Clone, Copy)]
struct RowOctave {
    noise: Noise2,
    iy: i64,
    sy: f32,
    ix: i64,
    a0: f32,
    a1: f32,
}

impl RowOctave {
    fn new(noise: Noise2, y: f64) -> Self {
        let iy = floor_i64(y);
        let ty = (y - iy as f64) as f32;
        Self {
            noise,
            iy,
            sy: ty * ty * (3.0 - 2.0 * ty),
            ix: i64::MIN,
            a0: 0.0,
            a1: 0.0,
        }
    }

    #[inline]
    fn column(&self, ix: i64) -> f32 {
        let v0 = self.noise.lattice(ix, self.iy);
        let v1 = self.noise.lattice(ix, self.iy + 1);
        v0 + (v1 - v0) * self.sy
    }

    #[inline]
    fn at(&mut self, x: f64) -> f32 {
        let ix = floor_i64(x);
        if ix != self.ix {
            if ix == self.ix.wrapping_add(1) {
                self.a0 = self.a1;
            } else {
                self.a0 = self.column(ix);
            }
            self.a1 = self.column(ix + 1);
            self.ix = ix;
        }
        let tx = (x - ix as f64) as f32;
        let sx = tx * tx * (3.0 - 2.0 * tx);
        self.a0 + (self.a1 - self.a0) * sx
    }
}

/// [`Noise2::fbm`] along one row, at feature size `scale` (pixels): `at(x)` equals
/// `noise.fbm(x / scale, y / scale, octaves)` up to rounding. At most 3 octaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowField {
    octaves: [RowOctave; 3],
    n: usize,
    inv_scale: f64,
}

impl RowField {
    pub(crate) fn new(noise: Noise2, y: f64, scale: f64, octaves: u32) -> Self {
        let n = (octaves as usize).clamp(1, 3);
        let inv_scale = 1.0 / scale;
        let octaves = std::array::from_fn(|o| {
            let (f, shift) = (f64::from(1u32 << o), o as f64 * 17.31);
            RowOctave::new(noise, y * inv_scale * f + 2.0 * shift)
        });
        Self {
            octaves,
            n,
            inv_scale,
        }
    }

    #[inline]
    pub(crate) fn at(&mut self, x: f64) -> f32 {
        let x = x * self.inv_scale;
        let mut sum = 0.0;
        let mut amp = 1.0;
        let mut norm = 0.0;
        let mut f = 1.0;
        for (o, oct) in self.octaves.iter_mut().take(self.n).enumerate() {
            sum += amp * oct.at(x * f + o as f64 * 17.31);
            norm += amp;
            amp *= 0.5;
            f *= 2.0;
        }
        sum / norm
    }
}

/// Octaves of the fields thresholded into ice / water and into stages.
pub(crate) const FIELD_OCTAVES: u32 = 2;

/// Empirical quantiles of [`Noise2::fbm`] with [`FIELD_OCTAVES`] octaves, so that thresholding
/// the field at `quantile(p)` marks a fraction `p` of an area (in expectation).
pub(crate) fn field_quantile(p: f64) -> f32 {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let noise = Noise2::new(0x51CE);
        let mut rng = SplitMix64::new(0xF1E1D);
        let mut v: Vec<f32> = (0..65_536)
            .map(|_| {
                let x = rng.range(0.0, 4096.0);
                let y = rng.range(0.0, 4096.0);
                noise.fbm(x, y, FIELD_OCTAVES)
            })
            .collect();
        v.sort_by(f32::total_cmp);
        v
    });
    if p <= 0.0 {
        return f32::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f32::INFINITY;
    }
    let i = ((p * table.len() as f64) as usize).min(table.len() - 1);
    table[i]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_uniform() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut r = SplitMix64::new(1);
        let mean: f64 = (0..100_000).map(|_| r.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let counts = (0..30_000).fold([0u32; 3], |mut c, _| {
            c[r.below(3) as usize] += 1;
            c
        });
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn speckle_has_unit_mean_in_linear_power() {
        let mut r = SplitMix64::new(3);
        let n = 200_000;
        let lin: Vec<f64> = (0..n)
            .flat_map(|_| {
                let (a, b) = r.speckle_db_pair();
                [a, b].map(|v| 10f64.powf(f64::from(v) / 10.0))
            })
            .collect();
        let mean = lin.iter().sum::<f64>() / lin.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        // 4-look speckle: std of intensity = 1/sqrt(4) = 0.5.
        let var = lin.iter().map(|v| (v - 1.0).powi(2)).sum::<f64>() / lin.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.02, "{}", var.sqrt());
        // The two halves of one draw are independent.
        let pairs: Vec<(f32, f32)> = (0..n).map(|_| r.speckle_db_pair()).collect();
        let corr = pairs.iter().map(|(a, b)| f64::from(a * b)).sum::<f64>() / f64::from(n)
            - pairs.iter().map(|p| f64::from(p.0)).sum::<f64>()
                * pairs.iter().map(|p| f64::from(p.1)).sum::<f64>()
                / (f64::from(n) * f64::from(n));
        assert!(corr.abs() < 0.05, "{corr}");
        assert_eq!(floor_i64(-0.5), -1);
        assert_eq!(floor_i64(2.0), 2);
        assert_eq!(floor_i64(2.7), 2);
    }

    #[test]
    fn noise_is_bounded_smooth_and_seeded() {
        let n = Noise2::new(1);
        let m = Noise2::new(2);
        let mut differ = 0;
        for i in 0..1000 {
            let x = f64::from(i) * 0.37;
            let v = n.at(x, x * 0.5);
            assert!((-1.0..=1.0).contains(&v));
            // Smooth: a small step changes the value a little.
            assert!((n.at(x + 0.01, x * 0.5) - v).abs() < 0.05);
            if (m.at(x, x * 0.5) - v).abs() > 1e-3 {
                differ += 1;
            }
        }
        assert!(differ > 900);
    }

    #[test]
    fn quantiles_mark_the_asked_fraction() {
        let noise = Noise2::new(99);
        // The row evaluator agrees with the point evaluator.
        let mut row = RowField::new(noise, 37.3, 2.5, FIELD_OCTAVES);
        for i in 0..500 {
            let x = f64::from(i) * 0.7;
            let d = row.at(x) - noise.fbm(x / 2.5, 37.3 / 2.5, FIELD_OCTAVES);
            assert!(d.abs() < 1e-5, "{d}");
        }
        for p in [0.1, 0.5, 0.9] {
            let t = field_quantile(p);
            let mut inside = 0;
            let n = 40_000;
            for i in 0..n {
                let x = f64::from(i % 200) * 0.9;
                let y = f64::from(i / 200) * 0.9;
                if noise.fbm(x, y, FIELD_OCTAVES) < t {
                    inside += 1;
                }
            }
            let frac = f64::from(inside) / f64::from(n);
            assert!((frac - p).abs() < 0.05, "p {p} got {frac}");
        }
        assert_eq!(field_quantile(0.0), f32::NEG_INFINITY);
        assert_eq!(field_quantile(1.0), f32::INFINITY);
    }
}
