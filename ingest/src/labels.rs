//! Native-resolution labels: polygon ids or RTT charts → packed (SIC, SOD, FLOE) per pixel,
//! 255 wherever HH is invalid, with per-scene class and polygon pixel counts.

use std::collections::HashMap;

use icefm_schemas::sigrid::{DerivedLabels, MergeMode, PolygonCode};
use icefm_schemas::{IGNORE, Task};

use crate::reader::{Band, BandLabels};

/// Packed label triple: SIC | SOD << 8 | FLOE << 16.
pub type Packed = u32;

/// All three tasks ignored.
pub const PACKED_IGNORE: Packed = pack(IGNORE, IGNORE, IGNORE);

/// Pack SIC, SOD, FLOE into one word.
pub const fn pack(sic: u8, sod: u8, floe: u8) -> Packed {
    sic as u32 | (sod as u32) << 8 | (floe as u32) << 16
}

/// The label of one task from a packed word.
#[inline]
pub const fn unpack(p: Packed, task: usize) -> u8 {
    (p >> (8 * task)) as u8
}

/// The scene's polygons with their derived classes.
#[derive(Debug, Clone)]
pub struct PolygonTable {
    /// Derived labels, in code-table order.
    pub derived: Vec<DerivedLabels>,
    ids: HashMap<i64, usize>,
    /// Dense id → index table when ids are small (the usual case), for speed.
    dense: Vec<u32>,
}

const NO_POLYGON: u32 = u32::MAX;
const DENSE_LIMIT: i64 = 1 << 20;

impl PolygonTable {
    /// Derive every polygon's classes.
    pub fn new(codes: &[PolygonCode], mode: MergeMode) -> Self {
        let derived: Vec<DerivedLabels> = codes.iter().map(|c| c.derive(mode)).collect();
        let ids: HashMap<i64, usize> = codes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.poly_id, i))
            .collect();
        let max = codes.iter().map(|c| c.poly_id).max().unwrap_or(0);
        let min = codes.iter().map(|c| c.poly_id).min().unwrap_or(0);
        let dense = if min >= 0 && max < DENSE_LIMIT {
            let mut d = vec![NO_POLYGON; max as usize + 1];
            for (id, &i) in &ids {
                d[*id as usize] = i as u32;
            }
            d
        } else {
            Vec::new()
        };
        Self {
            derived,
            ids,
            dense,
        }
    }

    /// Index in the code table of a pixel's polygon id (`None`: NaN, fractional or unknown id).
    #[inline]
    pub fn index_of(&self, id: f64) -> Option<usize> {
        if !id.is_finite() || id.fract() != 0.0 {
            return None;
        }
        let i = id as i64;
        if !self.dense.is_empty() {
            if i < 0 || i as usize >= self.dense.len() {
                return None;
            }
            let v = self.dense[i as usize];
            return (v != NO_POLYGON).then_some(v as usize);
        }
        self.ids.get(&i).copied()
    }
}

/// Pixel counts found while deriving native labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelCounts {
    /// Pixels per polygon (code-table order).
    pub polygon_pixels: Vec<u64>,
    /// Pixels whose polygon id is not in the code table (become 255).
    pub orphan_pixels: u64,
    /// RTT pixels whose chart value is in no class table (become 255).
    pub out_of_table_pixels: u64,
}

impl LabelCounts {
    /// Add another block's counts.
    pub fn add(&mut self, other: &LabelCounts) {
        if self.polygon_pixels.len() < other.polygon_pixels.len() {
            self.polygon_pixels.resize(other.polygon_pixels.len(), 0);
        }
        for (a, b) in self.polygon_pixels.iter_mut().zip(&other.polygon_pixels) {
            *a += b;
        }
        self.orphan_pixels += other.orphan_pixels;
        self.out_of_table_pixels += other.out_of_table_pixels;
    }
}

/// Derive the packed labels of the band's pixels `range` into `out` (`range.len()` long, filled
/// with [`PACKED_IGNORE`] by the caller). `table` is required for raw bands with a chart.
pub fn native_labels_into(
    band: &Band,
    range: std::ops::Range<usize>,
    table: Option<&PolygonTable>,
    out: &mut [Packed],
) -> LabelCounts {
    let hh = &band.hh[range.clone()];
    let n = hh.len();
    let mut counts = LabelCounts {
        polygon_pixels: vec![0; table.map_or(0, |t| t.derived.len())],
        ..LabelCounts::default()
    };
    match (&band.labels, table) {
        (BandLabels::PolygonIds(ids), Some(table)) => {
            let ids = &ids[range];
            let lut: Vec<Packed> = table
                .derived
                .iter()
                .map(|d| pack(d.sic, d.sod, d.floe))
                .collect();
            // Polygons are large: resolve each run of equal ids once.
            let mut i = 0;
            while i < n {
                let id = ids[i];
                let mut j = i + 1;
                while j < n && ids[j].to_bits() == id.to_bits() {
                    j += 1;
                }
                match table.index_of(id) {
                    Some(p) => {
                        counts.polygon_pixels[p] += (j - i) as u64;
                        let v = lut[p];
                        for (o, h) in out[i..j].iter_mut().zip(&hh[i..j]) {
                            if !h.is_nan() {
                                *o = v;
                            }
                        }
                    }
                    None if !id.is_nan() => counts.orphan_pixels += (j - i) as u64,
                    None => {}
                }
                i = j;
            }
        }
        (BandLabels::Charts([sic, sod, floe]), _) => {
            let (sic, sod, floe) = (&sic[range.clone()], &sod[range.clone()], &floe[range]);
            for k in 0..n {
                if hh[k].is_nan() {
                    continue;
                }
                let mut v = [sic[k], sod[k], floe[k]];
                for (t, x) in Task::ALL.iter().zip(v.iter_mut()) {
                    if *x != IGNORE && usize::from(*x) >= t.n_classes() {
                        *x = IGNORE;
                        counts.out_of_table_pixels += 1;
                    }
                }
                out[k] = pack(v[0], v[1], v[2]);
            }
        }
        _ => {}
    }
    counts
}

/// Packed labels of a whole band and its counts.
pub fn native_labels(band: &Band, table: Option<&PolygonTable>) -> (Vec<Packed>, LabelCounts) {
    let mut packed = vec![PACKED_IGNORE; band.hh.len()];
    let counts = native_labels_into(band, 0..band.hh.len(), table, &mut packed);
    (packed, counts)
}

/// Add a band's labels to per-task class histograms (bins: classes, then 255).
pub fn count_classes(packed: &[Packed], hist: &mut [Vec<u64>; 3]) {
    let mut i = 0;
    while i < packed.len() {
        let v = packed[i];
        let mut j = i + 1;
        while j < packed.len() && packed[j] == v {
            j += 1;
        }
        for t in Task::ALL {
            hist[t.channel()][t.hist_bin(unpack(v, t.channel()))] += (j - i) as u64;
        }
        i = j;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn band(hh: Vec<f32>, labels: BandLabels) -> Band {
        let n = hh.len();
        Band {
            row0: 0,
            rows: 1,
            hh,
            hv: vec![0.0; n],
            distance: vec![1.0; n],
            incidence: None,
            labels,
        }
    }

    #[test]
    fn polygon_ids_map_to_classes_and_invalid_hh_is_ignored() {
        let codes = [
            PolygonCode::parse("28;90;-9;93;07;-9;-9;-9;-9;-9;-9;-9;-9;07-9;I").unwrap(),
            PolygonCode::parse("76;02;-9;98;10;-9;-9;-9;-9;-9;-9;-9;-9;10-9;W").unwrap(),
        ];
        let table = PolygonTable::new(&codes, MergeMode::Sum);
        let ids = vec![28.0, 28.0, 76.0, f64::NAN, 5.0, 76.0];
        let hh = vec![-10.0, f32::NAN, -20.0, -20.0, -20.0, -21.0];
        let (packed, l) = native_labels(&band(hh, BandLabels::PolygonIds(ids)), Some(&table));
        assert_eq!(
            packed,
            vec![
                pack(9, 4, 5),
                PACKED_IGNORE,
                0,
                PACKED_IGNORE,
                PACKED_IGNORE,
                0
            ]
        );
        assert_eq!(l.polygon_pixels, vec![2, 2]);
        assert_eq!(l.orphan_pixels, 1);
        let mut hist = [vec![0; 12], vec![0; 7], vec![0; 8]];
        count_classes(&packed, &mut hist);
        assert_eq!(hist[0][9], 1);
        assert_eq!(hist[0][0], 2);
        assert_eq!(hist[0][11], 3);
        assert_eq!(hist[2][5], 1);
    }

    #[test]
    fn rtt_charts_out_of_table_values_become_ignore() {
        let charts = BandLabels::Charts([vec![10, 3, 12], vec![5, 6, 0], vec![6, 2, 0]]);
        let (packed, l) = native_labels(&band(vec![-10.0; 3], charts), None);
        assert_eq!(
            packed,
            vec![pack(10, 5, 6), pack(3, 255, 2), pack(255, 0, 0)]
        );
        assert_eq!(l.out_of_table_pixels, 2);
    }
}
