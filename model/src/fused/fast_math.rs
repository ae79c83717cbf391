//! Vectorisable f32 math of the CPU paths: row reductions over independent lanes, `e^x`, and the
//! standard normal's `Φ` and `φ` (in f64 and in f32).

/// Independent accumulators of the row reductions below: a single running maximum or sum is
/// one dependent chain of 4-cycle operations per value; 16 lanes let them vectorise.
const LANES: usize = 16;

/// Largest value of `v` (−∞ for an empty slice; NaN ignored as `f32::max` does).
#[inline(always)]
pub(super) fn max_f32(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    acc.iter().fold(tail, |a, &b| a.max(b))
}

/// `Σ v` in f64.
#[inline(always)]
pub(super) fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(x);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ a·b` in f64.
#[inline(always)]
pub(super) fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += f64::from(u) * f64::from(v);
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&u, &v)| f64::from(u) * f64::from(v))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `Φ(x)` and `φ(x)` of the standard normal.
pub(super) fn normal_cdf_pdf(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf, pdf)
}

/// `e^x` in f32 to about 2 ulp, written so that loops over slices vectorise (glibc's `exp` is
/// a scalar call per value, about a tenth of a CPU training step in attention's softmax):
/// `2^k · p(r)` with `k = round(x / ln 2)`, `r = x − k·ln 2` (two-part ln 2) and Cephes' `expf`
/// polynomial on `|r| ≤ ln 2 / 2`. Inputs are clamped to the finite range.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = (p * r * r) + r + 1.0;
    e * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// `Φ(x)` and `φ(x)` in f32: `erf` by Abramowitz and Stegun 7.1.26 (absolute error below
/// 1.5e-7) with [`exp_f32`]; `Φ` is within 3e-7 (2 ulp at 1) of the f64 value.
#[inline(always)]
pub(super) fn normal_cdf_pdf_f32(x: f32) -> (f32, f32) {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let e = exp_f32(-a * a);
    let erf = (1.0 - poly * e).copysign(z);
    // e^{-x²/2} = e^{-z²}
    (0.5 * (1.0 + erf), e * 0.398_942_3)
}

#[cfg(test)]
mod fast_math_tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * f64::from(i) / 200_000.0;
            let got = f64::from(exp_f32(x as f32));
            let want = f64::from(x as f32).exp();
            worst = worst.max((got - want).abs() / want);
        }
        // f32's unit roundoff is 6e-8.
        assert!(worst < 2.5e-7, "{worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-200.0) < 1e-37 && exp_f32(-200.0) >= 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn f32_normal_cdf_and_pdf_match_f64() {
        let (mut cdf_err, mut pdf_err) = (0f64, 0f64);
        for i in 0..=40_000 {
            let x = -10.0 + 20.0 * f64::from(i) / 40_000.0;
            let (c, p) = normal_cdf_pdf_f32(x as f32);
            let (cw, pw) = normal_cdf_pdf(f64::from(x as f32));
            cdf_err = cdf_err.max((f64::from(c) - cw).abs());
            pdf_err = pdf_err.max((f64::from(p) - pw).abs());
        }
        // A&S's 1.5e-7 on erf, halved, plus f32 rounding near 1 (one ulp is 1.2e-7).
        assert!(
            cdf_err < 3e-7 && pdf_err < 1e-7,
            "cdf {cdf_err}, pdf {pdf_err}"
        );
    }
}
