//! Tests of `resample`.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::labels::pack;

/// Brute-force reference: area-weighted mean and majority over the cell's footprint.
fn reference(
    h: usize,
    w: usize,
    x: &[f32],
    lab: &[Packed],
    ratio: f64,
) -> (Vec<f32>, Vec<u8>, usize, usize) {
    let oh = (h as f64 / ratio - 1e-9).ceil() as usize;
    let ow = (w as f64 / ratio - 1e-9).ceil() as usize;
    let mut mean = vec![f32::NAN; oh * ow];
    let mut sod = vec![IGNORE; oh * ow];
    for a in 0..oh {
        for b in 0..ow {
            let (mut s, mut n) = (0.0f64, 0.0f64);
            let mut votes = [0.0f64; 6];
            for i in 0..h {
                let wy =
                    ((i + 1) as f64).min((a + 1) as f64 * ratio) - (i as f64).max(a as f64 * ratio);
                if wy <= 0.0 {
                    continue;
                }
                for j in 0..w {
                    let wx = ((j + 1) as f64).min((b + 1) as f64 * ratio)
                        - (j as f64).max(b as f64 * ratio);
                    if wx <= 0.0 {
                        continue;
                    }
                    let v = x[i * w + j];
                    if !v.is_nan() {
                        s += wy * wx * f64::from(v);
                        n += wy * wx;
                    }
                    let l = unpack(lab[i * w + j], 1);
                    if l != IGNORE {
                        votes[l as usize] += wy * wx;
                    }
                }
            }
            if n > 0.0 {
                mean[a * ow + b] = (s / n) as f32;
            }
            let total: f64 = votes.iter().sum();
            if total > 0.0 && total >= 0.5 * ratio * ratio - 1e-4 {
                let mut best = 0;
                for c in 1..6 {
                    if votes[c] > votes[best] {
                        best = c;
                    }
                }
                sod[a * ow + b] = best as u8;
            }
        }
    }
    (mean, sod, oh, ow)
}

fn run(h: usize, w: usize, ratio: f64, patch: usize) {
    // Deterministic pseudo-random field with NaNs and label blocks.
    let mut x = vec![0.0f32; h * w];
    let mut lab = vec![PACKED_IGNORE; h * w];
    let mut s = 12345u64;
    for i in 0..h * w {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = (s >> 33) as u32;
        x[i] = if u.is_multiple_of(7) {
            f32::NAN
        } else {
            (u % 1000) as f32 / 10.0 - 50.0
        };
        let (r, c) = (i / w, i % w);
        let class = ((r / 3 + c / 4) % 7) as u8;
        lab[i] = if class == 6 {
            PACKED_IGNORE
        } else {
            pack(0, class, 0)
        };
    }
    let mut acc = LevelAccumulator::new(h, w, ratio, 2, patch);
    let mut runs = Vec::new();
    let mut pieces = Vec::new();
    let mut chunks = Vec::new();
    for i in 0..h {
        runs_of(&lab[i * w..(i + 1) * w], &mut runs);
        // The same values as a piecewise channel must give the same means.
        piece_runs_of(&x[i * w..(i + 1) * w], &mut pieces);
        let dense = [&x[i * w..(i + 1) * w]];
        let piecewise = [pieces.as_slice()];
        acc.push_row(
            i,
            NativeRow {
                dense: &dense,
                piecewise: &piecewise,
                labels: &runs,
            },
        );
        chunks.extend(acc.take_chunks());
    }
    acc.finish();
    chunks.extend(acc.take_chunks());
    let (mean, sod, oh, ow) = reference(h, w, &x, &lab, ratio);
    assert_eq!(acc.shape(), (oh, ow));
    assert_eq!(chunks.len(), oh.div_ceil(patch));
    let pw = acc.padded_width();
    for a in 0..oh {
        let c = &chunks[a / patch];
        let r = a % patch;
        for b in 0..ow {
            let got = c.values[r * pw + b];
            let want = mean[a * ow + b];
            assert!(
                (got.is_nan() && want.is_nan()) || (got - want).abs() < 1e-3,
                "ratio {ratio} cell ({a},{b}): {got} vs {want}"
            );
            let piece = c.values[(patch + r) * pw + b];
            assert!(
                (piece.is_nan() && want.is_nan()) || (piece - want).abs() < 1e-3,
                "ratio {ratio} piecewise cell ({a},{b}): {piece} vs {want}"
            );
            assert_eq!(
                c.labels[(patch + r) * pw + b],
                sod[a * ow + b],
                "ratio {ratio} ({a},{b})"
            );
        }
        // Padding stays fill.
        for b in ow..pw {
            assert!(c.values[r * pw + b].is_nan());
        }
    }
}

#[test]
fn integer_ratios_match_brute_force() {
    for ratio in [1.0, 2.0, 3.0, 5.0] {
        run(37, 41, ratio, 4);
    }
}

#[test]
fn fractional_ratios_match_brute_force() {
    for ratio in [2.5, 1.5, 3.75] {
        run(37, 41, ratio, 4);
    }
}

#[test]
fn axis_map_weights_sum_to_one_per_pixel_and_ratio_per_cell() {
    let m = AxisMap::new(10, 2.5);
    assert_eq!(m.out_len, 4);
    let mut per_cell = vec![0.0f32; 4];
    for i in 0..10 {
        let (a, w0, w1) = m.at(i);
        assert!((w0 + w1 - 1.0).abs() < 1e-6);
        per_cell[a] += w0;
        if w1 > 0.0 {
            per_cell[a + 1] += w1;
        }
    }
    assert_eq!(per_cell, vec![2.5; 4]);
}

/// PyTorch's `interpolate(mode="bilinear", align_corners=False)` with `scale_factor = 1/ratio`,
/// written out cell by cell from its source-index rule; a NaN with a weight gives NaN.
fn bilinear_reference(h: usize, w: usize, x: &[f32], ratio: f64, oh: usize, ow: usize) -> Vec<f32> {
    let tap = |k: usize, n: usize| {
        let src = ((k as f64 + 0.5) * ratio - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        (i0, i1, if i1 == i0 { 0.0 } else { src - i0 as f64 })
    };
    let mut out = vec![0.0f32; oh * ow];
    for a in 0..oh {
        let (y0, y1, ly) = tap(a, h);
        for b in 0..ow {
            let (x0, x1, lx) = tap(b, w);
            let mut v = 0.0f64;
            let mut nan = false;
            for (yy, wy) in [(y0, 1.0 - ly), (y1, ly)] {
                for (xx, wx) in [(x0, 1.0 - lx), (x1, lx)] {
                    let wgt = wy * wx;
                    if wgt > 0.0 {
                        let p = x[yy * w + xx];
                        nan |= p.is_nan();
                        v += wgt * f64::from(p);
                    }
                }
            }
            out[a * ow + b] = if nan { f32::NAN } else { v as f32 };
        }
    }
    out
}

/// Bilinear levels: the first dense channel sampled as PyTorch's bilinear `interpolate` does,
/// the second still the area mean, the labels unchanged; streamed row by row, in chunk-rows.
fn run_bilinear(h: usize, w: usize, ratio: f64, patch: usize) {
    let mut x = vec![0.0f32; h * w];
    let mut s = 99u64;
    for (i, v) in x.iter_mut().enumerate() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = (s >> 33) as u32;
        // NaN blocks, as invalid SAR comes (land, scene edges), and a few lone ones.
        let (r, c) = (i / w, i % w);
        *v = if (r / 6 + c / 5) % 9 == 0 || u.is_multiple_of(97) {
            f32::NAN
        } else {
            (u % 1000) as f32 / 10.0 - 50.0
        };
    }
    let lab = vec![pack(3, 2, 1); h * w];
    let mut plain = LevelAccumulator::new(h, w, ratio, 2, patch);
    let mut bil = LevelAccumulator::with_bilinear(h, w, ratio, 2, patch, 1);
    let (mut runs, mut chunks, mut plain_chunks) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..h {
        runs_of(&lab[i * w..(i + 1) * w], &mut runs);
        let row = &x[i * w..(i + 1) * w];
        let dense = [row, row];
        for (acc, out) in [(&mut bil, &mut chunks), (&mut plain, &mut plain_chunks)] {
            acc.push_row(
                i,
                NativeRow {
                    dense: &dense,
                    piecewise: &[],
                    labels: &runs,
                },
            );
            out.extend(acc.take_chunks());
        }
    }
    for (acc, out) in [(&mut bil, &mut chunks), (&mut plain, &mut plain_chunks)] {
        acc.finish();
        out.extend(acc.take_chunks());
    }
    let (oh, ow) = bil.shape();
    assert_eq!((oh, ow), plain.shape());
    let want = bilinear_reference(h, w, &x, ratio, oh, ow);
    let pw = bil.padded_width();
    let mut nan = 0;
    for a in 0..oh {
        let (c, p) = (&chunks[a / patch], &plain_chunks[a / patch]);
        let r = a % patch;
        for b in 0..ow {
            let (got, want) = (c.values[r * pw + b], want[a * ow + b]);
            nan += usize::from(want.is_nan());
            assert!(
                (got.is_nan() && want.is_nan()) || (got - want).abs() < 1e-4,
                "ratio {ratio} cell ({a},{b}): {got} vs {want}"
            );
            // The second channel and the labels are the area mode's.
            let (mean, plain_mean) = (
                c.values[(patch + r) * pw + b],
                p.values[(patch + r) * pw + b],
            );
            assert!(mean.to_bits() == plain_mean.to_bits(), "({a},{b})");
        }
    }
    assert_eq!(
        chunks.iter().map(|c| &c.labels).collect::<Vec<_>>(),
        plain_chunks.iter().map(|c| &c.labels).collect::<Vec<_>>()
    );
    assert!(
        nan > 0 && nan < oh * ow,
        "ratio {ratio}: {nan} NaN cells of {}",
        oh * ow
    );
}

#[test]
fn bilinear_levels_match_pytorchs_rule() {
    for ratio in [2.0, 2.5, 1.5, 3.75, 5.0, 10.0] {
        run_bilinear(53, 61, ratio, 4);
        run_bilinear(53, 61, ratio, 64);
    }
}

/// What the rule means at the AI4Arctic ratios: at 2 (80 m from 40 m) the mean of each 2 × 2
/// block, as the area mean; at an odd ratio (200 m from 40 m) the cell's centre pixel.
#[test]
fn bilinear_taps_at_even_and_odd_ratios() {
    assert_eq!(
        bilinear_taps(8, 4, 2.0),
        [(0, 1, 0.5), (2, 3, 0.5), (4, 5, 0.5), (6, 7, 0.5)]
    );
    assert_eq!(
        bilinear_taps(12, 3, 5.0),
        [(2, 3, 0.0), (7, 8, 0.0), (11, 11, 0.0)]
    );
}
