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
