//! What a batch holds: samplers (which patch, which level), crop windows with jitter, and the
//! host augmentations (flips, 90° rotations). Every choice for sample `j` of batch `i` comes from
//! its own random stream, so a batch is a pure function of the seed and its index: the same with
//! any number of threads, and a resumed run asks for batch `i` and gets it.

use icefm_schemas::{Level, Task};

use crate::error::DatasetError;
use crate::rng::Rng;

/// How samples are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// Every eligible patch of the levels with weight > 0 equally likely, whatever its level
    /// (coarse levels have fewer patches, so they are drawn less often).
    Uniform,
    /// A level by its weight, then a patch of that level uniformly (SAR-IceFM's multi-scale
    /// training with equal weights).
    #[default]
    LevelWeighted,
    /// A level by its weight, then a patch with probability proportional to
    /// `Σ_c hist[c] / total[c]` over the labelled classes of `task` (`total` summed over that
    /// level's eligible patches): rare classes are drawn about as often as common ones. Patches
    /// with no label of the task are never drawn.
    ClassBalanced(Task),
    /// Every scene of the regime, level by level, tiled row-major by crop windows that overlap by
    /// `overlap` pixels (the last window of a row or column is moved to end at the scene edge).
    /// Finite, in order, no augmentation, nothing skipped: for evaluation.
    Sequential {
        /// Overlap of neighbouring windows, pixels (< crop).
        overlap: u32,
    },
}

impl Sampler {
    /// Parse `uniform`, `level`, `balanced:sod` or `sequential:64` (overlap in pixels).
    pub fn parse(s: &str) -> Result<Self, DatasetError> {
        let err = || {
            DatasetError::Loader(format!(
                "unknown sampler `{s}` (expected uniform, level, balanced:<sic|sod|floe>, sequential[:overlap])"
            ))
        };
        let (name, arg) = s.split_once(':').map_or((s, None), |(a, b)| (a, Some(b)));
        Ok(match (name.trim(), arg) {
            ("uniform", None) => Self::Uniform,
            ("level", None) => Self::LevelWeighted,
            ("balanced", Some(t)) => Self::ClassBalanced(
                Task::ALL
                    .into_iter()
                    .find(|k| k.name().eq_ignore_ascii_case(t.trim()))
                    .ok_or_else(err)?,
            ),
            ("sequential", None) => Self::Sequential { overlap: 0 },
            ("sequential", Some(o)) => Self::Sequential {
                overlap: o.trim().parse().map_err(|_| err())?,
            },
            _ => return Err(err()),
        })
    }
}

/// Host augmentations, each optional; all drawn from the sample's own stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augment {
    /// Random horizontal and vertical flips.
    pub flips: bool,
    /// Random 90° rotations.
    pub rot90: bool,
    /// Move each crop window by up to this many pixels in each direction (uniform), across chunk
    /// borders; windows stay inside the scene where the scene is at least a crop wide.
    pub jitter: u32,
}

/// One of the 8 symmetries of the square: output pixel `(i, j)` reads input `(y, x)` where
/// `(a, b) = transpose ? (j, i) : (i, j)`, `y = flip_y ? n-1-a : a`, `x = flip_x ? n-1-b : b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Transform {
    /// Swap rows and columns first.
    pub transpose: bool,
    /// Then read rows bottom-up.
    pub flip_y: bool,
    /// And columns right-to-left.
    pub flip_x: bool,
}

impl Transform {
    /// No change.
    pub const IDENTITY: Self = Self {
        transpose: false,
        flip_y: false,
        flip_x: false,
    };

    /// Whether this is the identity.
    pub fn is_identity(self) -> bool {
        self == Self::IDENTITY
    }

    /// Draw one: flips alone give the 4 flips (identity, vertical, horizontal, both = 180°);
    /// rotations alone the 4 rotations; both all 8 symmetries; neither the identity.
    pub fn draw(rng: &mut Rng, aug: Augment) -> Self {
        match (aug.flips, aug.rot90) {
            (false, false) => Self::IDENTITY,
            (true, false) => {
                let k = rng.below(4);
                Self {
                    transpose: false,
                    flip_y: k & 1 != 0,
                    flip_x: k & 2 != 0,
                }
            }
            (false, true) => match rng.below(4) {
                0 => Self::IDENTITY,
                // 90° anticlockwise: out(i, j) = in(j, n-1-i).
                1 => Self {
                    transpose: true,
                    flip_y: false,
                    flip_x: true,
                },
                2 => Self {
                    transpose: false,
                    flip_y: true,
                    flip_x: true,
                },
                _ => Self {
                    transpose: true,
                    flip_y: true,
                    flip_x: false,
                },
            },
            (true, true) => {
                let k = rng.below(8);
                Self {
                    transpose: k & 1 != 0,
                    flip_y: k & 2 != 0,
                    flip_x: k & 4 != 0,
                }
            }
        }
    }

    /// Source pixel of output pixel `(i, j)` in an `n × n` plane.
    #[inline]
    pub fn source(self, i: usize, j: usize, n: usize) -> (usize, usize) {
        let (a, b) = if self.transpose { (j, i) } else { (i, j) };
        (
            if self.flip_y { n - 1 - a } else { a },
            if self.flip_x { n - 1 - b } else { b },
        )
    }

    /// Apply to one `n × n` plane.
    pub fn apply<T: Copy>(self, src: &[T], dst: &mut [T], n: usize) {
        for i in 0..n {
            let row = &mut dst[i * n..(i + 1) * n];
            if !self.transpose {
                let y = if self.flip_y { n - 1 - i } else { i };
                let s = &src[y * n..(y + 1) * n];
                if self.flip_x {
                    for (d, v) in row.iter_mut().zip(s.iter().rev()) {
                        *d = *v;
                    }
                } else {
                    row.copy_from_slice(s);
                }
            } else {
                for (j, d) in row.iter_mut().enumerate() {
                    let (y, x) = self.source(i, j, n);
                    *d = src[y * n + x];
                }
            }
        }
    }

    /// Short name: `id`, or the letters of the steps (`t`, `y`, `x`).
    pub fn name(self) -> String {
        if self.is_identity() {
            return "id".into();
        }
        [
            (self.transpose, 't'),
            (self.flip_y, 'y'),
            (self.flip_x, 'x'),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, c)| *c)
        .collect()
    }
}

/// Parse level weights: `80,200,400` (equal) or `80:2,200:1,400:1`.
pub fn parse_level_weights(s: &str) -> Result<Vec<(Level, f64)>, DatasetError> {
    let mut out: Vec<(Level, f64)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (l, w) = part.split_once(':').unwrap_or((part, "1"));
        let level: Level = l
            .parse()
            .map_err(|e: icefm_schemas::store::LevelError| DatasetError::Loader(e.to_string()))?;
        let weight: f64 = w
            .trim()
            .parse()
            .ok()
            .filter(|w: &f64| w.is_finite() && *w >= 0.0)
            .ok_or_else(|| {
                DatasetError::Loader(format!(
                    "level weight `{w}` of {level}: expected a number ≥ 0"
                ))
            })?;
        if out.iter().any(|(o, _)| *o == level) {
            return Err(DatasetError::Loader(format!("level {level} given twice")));
        }
        out.push((level, weight));
    }
    if out.is_empty() {
        return Err(DatasetError::Loader(format!("no levels in `{s}`")));
    }
    Ok(out)
}

/// Index of `u · total` in increasing cumulative weights.
pub(crate) fn pick_cumulative(cum: &[f64], rng: &mut Rng) -> usize {
    let total = cum.last().copied().unwrap_or(0.0);
    let x = rng.unit() * total;
    cum.partition_point(|&c| c <= x)
        .min(cum.len().saturating_sub(1))
}

/// Start positions of windows of `crop` along an axis of `len` pixels, `overlap` apart.
pub fn tile_starts(len: u32, crop: u32, overlap: u32) -> Vec<u32> {
    if len <= crop {
        return vec![0];
    }
    let stride = crop.saturating_sub(overlap).max(1);
    let mut v: Vec<u32> = (0..)
        .map(|k| k * stride)
        .take_while(|&s| s + crop < len)
        .collect();
    v.push(len - crop);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms_are_the_eight_symmetries() {
        let n = 3;
        let src: Vec<u8> = (0..9).collect();
        let mut seen = std::collections::HashSet::new();
        for k in 0..8u8 {
            let t = Transform {
                transpose: k & 1 != 0,
                flip_y: k & 2 != 0,
                flip_x: k & 4 != 0,
            };
            let mut dst = vec![0u8; 9];
            t.apply(&src, &mut dst, n);
            for i in 0..n {
                for j in 0..n {
                    let (y, x) = t.source(i, j, n);
                    assert_eq!(dst[i * n + j], src[y * n + x]);
                }
            }
            seen.insert(dst);
        }
        assert_eq!(seen.len(), 8);
        // 90° anticlockwise: the first output row is the last input column, top to bottom.
        let mut r = Rng::new(0, 0);
        let rots: std::collections::HashSet<String> = (0..64)
            .map(|_| {
                Transform::draw(
                    &mut r,
                    Augment {
                        rot90: true,
                        ..Augment::default()
                    },
                )
                .name()
            })
            .collect();
        assert_eq!(rots.len(), 4);
        let t = Transform {
            transpose: true,
            flip_y: false,
            flip_x: true,
        };
        let mut dst = vec![0u8; 9];
        t.apply(&src, &mut dst, n);
        assert_eq!(dst, vec![2, 5, 8, 1, 4, 7, 0, 3, 6]);
    }

    #[test]
    fn tiles_cover_the_axis() {
        assert_eq!(tile_starts(100, 384, 0), vec![0]);
        assert_eq!(tile_starts(1000, 384, 0), vec![0, 384, 616]);
        assert_eq!(tile_starts(1000, 384, 64), vec![0, 320, 616]);
        assert_eq!(tile_starts(768, 384, 0), vec![0, 384]);
    }

    #[test]
    fn parse_samplers_and_weights() {
        assert_eq!(
            Sampler::parse("balanced:SOD").unwrap(),
            Sampler::ClassBalanced(Task::Sod)
        );
        assert_eq!(
            Sampler::parse("sequential:32").unwrap(),
            Sampler::Sequential { overlap: 32 }
        );
        assert!(Sampler::parse("balanced:x").is_err());
        let w = parse_level_weights("80:2, 200").unwrap();
        assert_eq!(w[0].0.spacing_m(), 80);
        assert_eq!((w[0].1, w[1].1), (2.0, 1.0));
        assert!(parse_level_weights("80:-1").is_err());
        assert!(parse_level_weights("80,80").is_err());
        let cum = [1.0, 1.0, 3.0];
        let mut r = Rng::new(5, 0);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[pick_cumulative(&cum, &mut r)] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((900..1100).contains(&counts[0]), "{counts:?}");
    }
}
