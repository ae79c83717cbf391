//! Streaming pyramid resampling from the native grid, one native row at a time.
//!
//! Continuous inputs: exact area-weighted, NaN-aware means, also for non-integer ratios (a native
//! pixel straddling two cells is split by its overlap). Labels: per task, the area-weighted
//! majority of valid native pixels; 255 where those cover less than half of the cell.
//! Rows are consumed in order and each output row is finalised as soon as its last native row has
//! arrived, so memory is a few rows per level plus one chunk-row of output.

use icefm_schemas::{IGNORE, Task};

use crate::labels::{PACKED_IGNORE, Packed, unpack};

/// Offsets of each task's class bins in a cell histogram.
const BIN_OFFSET: [usize; 3] = [0, 11, 17];
/// Bins per cell (11 + 6 + 7 classes).
const BINS: usize = 24;
/// Fraction of a cell's area that valid pixels must cover for a label.
pub const MIN_VALID_LABEL_FRACTION: f32 = 0.5;

/// How native indices along one axis fall into output cells of `ratio` native pixels.
#[derive(Debug, Clone)]
pub struct AxisMap {
    /// Output length, `ceil(native / ratio)`.
    pub out_len: usize,
    /// Native pixels per output cell.
    pub ratio: f64,
    integer: Option<usize>,
    first: Vec<u32>,
    w0: Vec<f32>,
    w1: Vec<f32>,
    /// Per output cell (fractional ratios): native span `[j0, j1)` and the overlap weights of its
    /// first and last pixel (interior pixels weigh 1).
    spans: Vec<(u32, u32, f32, f32)>,
}

/// Cells of `ratio ≥ 1` native pixels that `native_len` pixels make: the last one partial.
pub fn out_len(native_len: usize, ratio: f64) -> usize {
    let rounded = ratio.round();
    if (ratio - rounded).abs() < 1e-9 {
        native_len.div_ceil(rounded as usize)
    } else {
        (native_len as f64 / ratio - 1e-9).ceil() as usize
    }
}

impl AxisMap {
    /// Map `native_len` pixels into cells of `ratio ≥ 1` pixels.
    pub fn new(native_len: usize, ratio: f64) -> Self {
        assert!(
            ratio >= 1.0,
            "levels finer than the native grid are rejected before this"
        );
        let rounded = ratio.round();
        let integer = ((ratio - rounded).abs() < 1e-9).then_some(rounded as usize);
        let out_len = out_len(native_len, ratio);
        let mut first = Vec::with_capacity(native_len);
        let mut w0 = Vec::with_capacity(native_len);
        let mut w1 = Vec::with_capacity(native_len);
        for i in 0..native_len {
            let a = match integer {
                Some(f) => i / f,
                None => ((i as f64 + 1e-9) / ratio).floor() as usize,
            };
            let boundary = (a + 1) as f64 * ratio;
            let end = (i + 1) as f64;
            if integer.is_none() && boundary < end - 1e-9 && a + 1 < out_len {
                first.push(a as u32);
                w0.push((boundary - i as f64) as f32);
                w1.push((end - boundary) as f32);
            } else {
                first.push(a as u32);
                w0.push(1.0);
                w1.push(0.0);
            }
        }
        let spans = if integer.is_some() {
            Vec::new()
        } else {
            (0..out_len)
                .map(|k| {
                    let lo = k as f64 * ratio;
                    let hi = ((k + 1) as f64 * ratio).min(native_len as f64);
                    let j0 = (lo + 1e-9).floor() as usize;
                    let j1 = ((hi - 1e-9).ceil() as usize).clamp(j0 + 1, native_len);
                    let ov = |j: usize| ((j + 1) as f64).min(hi) - (j as f64).max(lo);
                    (j0 as u32, j1 as u32, ov(j0) as f32, ov(j1 - 1) as f32)
                })
                .collect()
        };
        Self {
            out_len,
            ratio,
            integer,
            first,
            w0,
            w1,
            spans,
        }
    }

    /// (first cell, weight in it, weight in the next cell).
    #[inline]
    pub fn at(&self, i: usize) -> (usize, f32, f32) {
        (self.first[i] as usize, self.w0[i], self.w1[i])
    }

    /// Overlap of native span `[s, e)` with cell `k`.
    #[inline]
    fn overlap(&self, s: usize, e: usize, k: usize) -> f32 {
        match self.integer {
            Some(f) => (e.min((k + 1) * f) - s.max(k * f)) as f32,
            None => {
                let lo = (s as f64).max(k as f64 * self.ratio);
                let hi = (e as f64).min((k + 1) as f64 * self.ratio);
                (hi - lo).max(0.0) as f32
            }
        }
    }

    /// Call `f(cell, wy × overlap)` for every cell touched by native span `[s, e)`. Cells strictly
    /// inside the span are fully covered (overlap = ratio), so only the two end cells compute one.
    #[inline]
    fn for_each_overlap(&self, s: usize, e: usize, wy: f32, mut f: impl FnMut(usize, f32)) {
        let cells = self.cells(s, e);
        let (k0, k1) = (cells.start, cells.end);
        f(k0, wy * self.overlap(s, e, k0));
        if k1 - k0 > 1 {
            let full = wy * self.ratio as f32;
            for k in k0 + 1..k1 - 1 {
                f(k, full);
            }
            f(k1 - 1, wy * self.overlap(s, e, k1 - 1));
        }
    }

    /// Cells touched by native span `[s, e)`.
    #[inline]
    fn cells(&self, s: usize, e: usize) -> std::ops::Range<usize> {
        self.first[s] as usize..(self.first[e - 1] as usize + usize::from(self.w1[e - 1] > 0.0) + 1)
    }
}

/// Sum `vs` and `vw` over consecutive groups of `F` columns into `sum` and `weight` (the last
/// group may be shorter). `F` is a constant so the inner sums unroll.
#[inline]
fn reduce_fixed<const F: usize>(vs: &[f32], vw: &[f32], sum: &mut [f32], weight: &mut [f32]) {
    let full = vs.len() / F;
    for (((sk, wk), s), n) in sum
        .iter_mut()
        .zip(weight.iter_mut())
        .zip(vs.chunks_exact(F))
        .zip(vw.chunks_exact(F))
    {
        let s: &[f32; F] = s.try_into().unwrap_or(&[0.0; F]);
        let n: &[f32; F] = n.try_into().unwrap_or(&[0.0; F]);
        *sk += s.iter().sum::<f32>();
        *wk += n.iter().sum::<f32>();
    }
    if full < sum.len() {
        sum[full] += vs[full * F..].iter().sum::<f32>();
        weight[full] += vw[full * F..].iter().sum::<f32>();
    }
}

/// Runs of equal packed labels along a native row: `(start, len, value)`.
pub type Run = (u32, u32, Packed);

/// Runs of equal values of a piecewise-constant channel (distance zone, land): `(start, len, value)`.
pub type PieceRun = (u32, u32, f32);

/// Run-length encode one row of a piecewise-constant channel (NaN runs included).
pub fn piece_runs_of(row: &[f32], out: &mut Vec<PieceRun>) {
    out.clear();
    let mut i = 0;
    while i < row.len() {
        let v = row[i];
        let mut j = i + 1;
        while j < row.len() && row[j].to_bits() == v.to_bits() {
            j += 1;
        }
        out.push((i as u32, (j - i) as u32, v));
        i = j;
    }
}

/// One native row as the accumulator takes it. Channels are numbered dense first, then piecewise.
#[derive(Debug, Clone, Copy)]
pub struct NativeRow<'a> {
    /// Channels that change from pixel to pixel (SAR, incidence angle).
    pub dense: &'a [&'a [f32]],
    /// Piecewise-constant channels as runs (distance zone, land): cost follows runs, not pixels.
    pub piecewise: &'a [&'a [PieceRun]],
    /// Packed labels as runs.
    pub labels: &'a [Run],
}

/// Run-length encode one row of packed labels.
pub fn runs_of(row: &[Packed], out: &mut Vec<Run>) {
    out.clear();
    let mut i = 0;
    while i < row.len() {
        let v = row[i];
        let mut j = i + 1;
        while j < row.len() && row[j] == v {
            j += 1;
        }
        out.push((i as u32, (j - i) as u32, v));
        i = j;
    }
}

/// `RowAcc::mono` of a cell that has received no labels yet.
const MONO_EMPTY: Packed = u32::MAX;
/// `RowAcc::mono` of a cell whose labels differ: its votes are in `hist`.
const MONO_MIXED: Packed = u32::MAX - 1;

/// Accumulators of one output row. Most cells lie inside one polygon, so labels are first kept as
/// one packed value with its weight (`mono`); only cells that receive a second value pay for the
/// per-class histogram.
#[derive(Debug, Clone)]
struct RowAcc {
    sum: Vec<f32>,
    weight: Vec<f32>,
    /// Dense channels summed down the native rows first, at native width (`[channel][native
    /// column]`): a row-weighted add of whole rows, which vectorises; the sums across columns
    /// are taken once per output row in `finish_row`.
    vsum: Vec<f32>,
    /// Valid (non-NaN) weight of `vsum`.
    vweight: Vec<f32>,
    mono: Vec<Packed>,
    mono_weight: Vec<f32>,
    hist: Vec<f32>,
}

impl RowAcc {
    fn new(channels: usize, width: usize, native_width: usize) -> Self {
        Self {
            sum: vec![0.0; channels * width],
            weight: vec![0.0; channels * width],
            vsum: vec![0.0; channels * native_width],
            vweight: vec![0.0; channels * native_width],
            mono: vec![MONO_EMPTY; width],
            mono_weight: vec![0.0; width],
            hist: vec![0.0; BINS * width],
        }
    }

    fn clear(&mut self) {
        self.sum.fill(0.0);
        self.weight.fill(0.0);
        self.vsum.fill(0.0);
        self.vweight.fill(0.0);
        self.mono.fill(MONO_EMPTY);
        self.mono_weight.fill(0.0);
    }

    #[inline]
    fn add_hist(hist: &mut [f32], p: Packed, w: f32) {
        for (t, off) in BIN_OFFSET.iter().enumerate() {
            let v = unpack(p, t);
            if v != IGNORE {
                hist[off + usize::from(v)] += w;
            }
        }
    }

    #[inline]
    fn vote(&mut self, k: usize, p: Packed, w: f32) {
        let m = self.mono[k];
        if m == p {
            self.mono_weight[k] += w;
        } else if m == MONO_EMPTY {
            self.mono[k] = p;
            self.mono_weight[k] = w;
        } else {
            let h = &mut self.hist[k * BINS..(k + 1) * BINS];
            if m != MONO_MIXED {
                h.fill(0.0);
                Self::add_hist(h, m, self.mono_weight[k]);
                self.mono[k] = MONO_MIXED;
            }
            Self::add_hist(h, p, w);
        }
    }
}

/// One chunk-row of a level (`P` output rows, padded to whole chunks), ready to be stored.
#[derive(Debug, Clone)]
pub struct ChunkRow {
    /// Chunk-row index.
    pub index: usize,
    /// Output rows of the level in this chunk-row (< P for the last).
    pub rows: usize,
    /// Continuous channels, `[channels][P][padded_width]`, NaN padded.
    pub values: Vec<f32>,
    /// Labels, `[3][P][padded_width]`, 255 padded.
    pub labels: Vec<u8>,
}

/// Streaming resampler of one level.
#[derive(Debug)]
pub struct LevelAccumulator {
    rows: AxisMap,
    cols: AxisMap,
    channels: usize,
    patch: usize,
    padded_width: usize,
    cur: usize,
    acc: [RowAcc; 2],
    /// Dense channels of the rows pushed so far.
    dense: usize,
    chunk: ChunkRow,
    out: Vec<ChunkRow>,
    spare: Vec<ChunkRow>,
    /// Bilinear sampling of the first dense channels instead of area means, when asked.
    bilinear: Option<Bilinear>,
}

/// Where one output index samples the native axis under bilinear interpolation: the two
/// native indices and the weight of the second (0 where they are one pixel).
type Tap = (u32, u32, f32);

/// The taps of `out_len` outputs over `native_len` pixels at `ratio` native pixels per output,
/// as PyTorch's `interpolate(mode="bilinear", align_corners=False, antialias=False)` with
/// `scale_factor = 1 / ratio` places them: source `max((k + ½)·ratio − ½, 0)`, its two
/// neighbours, the second clamped to the last pixel (so cells past the scene edge repeat it).
pub fn bilinear_taps(native_len: usize, out_len: usize, ratio: f64) -> Vec<Tap> {
    let last = native_len.saturating_sub(1);
    (0..out_len)
        .map(|k| {
            let src = ((k as f64 + 0.5) * ratio - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(last);
            let i1 = (i0 + 1).min(last);
            let lambda = if i1 == i0 { 0.0 } else { src - i0 as f64 };
            (i0 as u32, i1 as u32, lambda as f32)
        })
        .collect()
}

/// `(1 − λ)·a + λ·b`, `a` alone where `λ` is 0: a NaN with a weight makes the result NaN (an
/// invalid pixel spreads into every output it touches), one without weight does not.
#[inline]
fn blend(a: f32, b: f32, lambda: f32) -> f32 {
    if lambda > 0.0 {
        (1.0 - lambda) * a + lambda * b
    } else {
        a
    }
}

/// Bilinear sampling of a level's first `channels` dense channels (SAR-IceFM's resampling of
/// HH and HV), streamed: each output row is sampled when its second native row arrives, from
/// that row and the one before it.
#[derive(Debug)]
struct Bilinear {
    channels: usize,
    rows: Vec<Tap>,
    cols: Vec<Tap>,
    /// The next output row to sample.
    next: usize,
    /// The previous native row's sampled channels, `[channel][native column]`.
    prev: Vec<f32>,
    /// Sampled output rows waiting for `finish_row`: (row, `[channel][column]`).
    ready: std::collections::VecDeque<(usize, Vec<f32>)>,
    spare: Vec<Vec<f32>>,
}

impl Bilinear {
    /// Sample every output row whose second native row is `i`, from `dense` (row `i`) and the
    /// previous row; then keep row `i` as the previous.
    fn push(&mut self, i: usize, dense: &[&[f32]]) {
        let nw = dense.first().map_or(0, |d| d.len());
        let w = self.cols.len();
        while let Some(&(r0, r1, ly)) = self.rows.get(self.next) {
            if r1 as usize != i {
                break;
            }
            let mut out = self.spare.pop().unwrap_or_default();
            out.clear();
            out.resize(self.channels * w, f32::NAN);
            for c in 0..self.channels {
                let cur = dense[c];
                let first: &[f32] = if r0 as usize == i {
                    cur
                } else {
                    &self.prev[c * nw..(c + 1) * nw]
                };
                for (o, &(c0, c1, lx)) in out[c * w..(c + 1) * w].iter_mut().zip(&self.cols) {
                    let (c0, c1) = (c0 as usize, c1 as usize);
                    let top = blend(first[c0], first[c1], lx);
                    let bottom = blend(cur[c0], cur[c1], lx);
                    *o = blend(top, bottom, ly);
                }
            }
            self.ready.push_back((self.next, out));
            self.next += 1;
        }
        self.prev.resize(self.channels * nw, f32::NAN);
        for (prev, row) in self.prev.chunks_exact_mut(nw.max(1)).zip(dense) {
            prev.copy_from_slice(row);
        }
    }
}

impl LevelAccumulator {
    /// [`LevelAccumulator::new`], the first `channels` dense channels sampled bilinearly
    /// ([`bilinear_taps`]) instead of averaged over each cell; the others as before.
    pub fn with_bilinear(
        height: usize,
        width: usize,
        ratio: f64,
        channels_total: usize,
        patch: usize,
        channels: usize,
    ) -> Self {
        let mut acc = Self::new(height, width, ratio, channels_total, patch);
        let (oh, ow) = acc.shape();
        acc.bilinear = Some(Bilinear {
            channels,
            rows: bilinear_taps(height, oh, ratio),
            cols: bilinear_taps(width, ow, ratio),
            next: 0,
            prev: Vec::new(),
            ready: std::collections::VecDeque::new(),
            spare: Vec::new(),
        });
        acc
    }

    /// A level of `ratio` native pixels per cell over a `height × width` native grid with
    /// `channels` continuous channels, emitting chunk-rows of `patch` rows.
    pub fn new(height: usize, width: usize, ratio: f64, channels: usize, patch: usize) -> Self {
        let rows = AxisMap::new(height, ratio);
        let cols = AxisMap::new(width, ratio);
        let w = cols.out_len;
        let padded_width = w.div_ceil(patch) * patch;
        Self {
            chunk: Self::empty_chunk(0, channels, patch, padded_width),
            rows,
            cols,
            channels,
            patch,
            padded_width,
            cur: 0,
            acc: [
                RowAcc::new(channels, w, width),
                RowAcc::new(channels, w, width),
            ],
            dense: 0,
            out: Vec::new(),
            spare: Vec::new(),
            bilinear: None,
        }
    }

    fn empty_chunk(index: usize, channels: usize, patch: usize, padded_width: usize) -> ChunkRow {
        ChunkRow {
            index,
            rows: 0,
            values: vec![f32::NAN; channels * patch * padded_width],
            labels: vec![IGNORE; 3 * patch * padded_width],
        }
    }

    /// Output shape (rows, columns).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows.out_len, self.cols.out_len)
    }

    /// Native pixels per cell.
    pub fn ratio(&self) -> f64 {
        self.rows.ratio
    }

    /// Width padded to whole patches.
    pub fn padded_width(&self) -> usize {
        self.padded_width
    }

    /// Add native row `i` (rows must come in order).
    pub fn push_row(&mut self, i: usize, row: NativeRow<'_>) {
        if self.rows.integer == Some(1) && self.cols.integer == Some(1) {
            self.copy_row(i, row);
            return;
        }
        self.dense = row.dense.len();
        let (a, wa, wb) = self.rows.at(i);
        while self.cur < a {
            self.finish_row();
        }
        if let Some(b) = &mut self.bilinear {
            b.push(i, row.dense);
        }
        self.accumulate(0, wa, row);
        if wb > 0.0 {
            self.accumulate(1, wb, row);
        }
    }

    /// Finalise every remaining output row (call once after the last native row).
    pub fn finish(&mut self) {
        while self.cur < self.rows.out_len {
            self.finish_row();
        }
    }

    /// Give back a chunk-row that has been stored, so the next one reuses its memory (fresh
    /// allocations of this size cost page faults on every chunk-row).
    pub fn recycle(&mut self, chunk: ChunkRow) {
        if self.spare.is_empty() {
            self.spare.push(chunk);
        }
    }

    /// Completed chunk-rows since the last call.
    pub fn take_chunks(&mut self) -> Vec<ChunkRow> {
        std::mem::take(&mut self.out)
    }

    /// Dense channels that take their values from the bilinear sampler (none in area mode):
    /// the area sums skip them.
    fn sampled(&self) -> usize {
        self.bilinear.as_ref().map_or(0, |b| b.channels)
    }

    fn accumulate(&mut self, slot: usize, wy: f32, row: NativeRow<'_>) {
        let w = self.cols.out_len;
        let sampled = self.sampled();
        let acc = &mut self.acc[slot];
        let nd = row.dense.len();
        for (c, runs) in row.piecewise.iter().enumerate() {
            let c = nd + c;
            let sum = &mut acc.sum[c * w..(c + 1) * w];
            let weight = &mut acc.weight[c * w..(c + 1) * w];
            for &(s, len, v) in runs.iter() {
                if v.is_nan() {
                    continue;
                }
                let (s, e) = (s as usize, (s + len) as usize);
                self.cols.for_each_overlap(s, e, wy, |k, ov| {
                    sum[k] += ov * v;
                    weight[k] += ov;
                });
            }
        }
        let nw = self.cols.first.len();
        for (c, x) in row.dense.iter().enumerate().skip(sampled) {
            let vs = &mut acc.vsum[c * nw..(c + 1) * nw];
            let vw = &mut acc.vweight[c * nw..(c + 1) * nw];
            // Branch-free NaN skipping: NaN-heavy borders cost no mispredictions.
            for ((s, n), &v) in vs.iter_mut().zip(vw.iter_mut()).zip(x.iter()) {
                let ok = !v.is_nan();
                *s += if ok { wy * v } else { 0.0 };
                *n += if ok { wy } else { 0.0 };
            }
        }
        let runs = row.labels;
        for &(s, len, p) in runs {
            if p == PACKED_IGNORE {
                continue;
            }
            let (s, e) = (s as usize, (s + len) as usize);
            self.cols
                .for_each_overlap(s, e, wy, |k, ov| acc.vote(k, p, ov));
        }
    }

    /// A level at the native spacing: the row is the output row.
    fn copy_row(&mut self, i: usize, row: NativeRow<'_>) {
        debug_assert_eq!(i, self.cur);
        let (p, pw, w) = (self.patch, self.padded_width, self.cols.out_len);
        let r = i % p;
        for (c, x) in row.dense.iter().enumerate() {
            self.chunk.values[(c * p + r) * pw..(c * p + r) * pw + w].copy_from_slice(x);
        }
        let nd = row.dense.len();
        for (c, runs) in row.piecewise.iter().enumerate() {
            let base = ((nd + c) * p + r) * pw;
            for &(s, len, v) in runs.iter() {
                self.chunk.values[base + s as usize..base + (s + len) as usize].fill(v);
            }
        }
        for &(s, len, v) in row.labels {
            let (s, e) = (s as usize, (s + len) as usize);
            for t in 0..3 {
                let row = (t * p + r) * pw;
                self.chunk.labels[row + s..row + e].fill(unpack(v, t));
            }
        }
        self.advance_row(r);
    }

    /// Count output row `r` of the chunk as done; emit the chunk when full or last.
    fn advance_row(&mut self, r: usize) {
        let (p, pw) = (self.patch, self.padded_width);
        self.chunk.rows = r + 1;
        self.cur += 1;
        if r + 1 == p || self.cur == self.rows.out_len {
            let next = match self.spare.pop() {
                Some(mut c) => {
                    c.index = self.chunk.index + 1;
                    c.rows = 0;
                    c.values.fill(f32::NAN);
                    c.labels.fill(IGNORE);
                    c
                }
                None => Self::empty_chunk(self.chunk.index + 1, self.channels, p, pw),
            };
            self.out.push(std::mem::replace(&mut self.chunk, next));
        }
    }

    /// Add the column sums of the dense channels' vertical sums into the output row's cells.
    fn reduce_columns(&mut self) {
        let (w, nw) = (self.cols.out_len, self.cols.first.len());
        let sampled = self.sampled();
        let acc = &mut self.acc[0];
        for c in sampled..self.dense {
            let vs = &acc.vsum[c * nw..(c + 1) * nw];
            let vw = &acc.vweight[c * nw..(c + 1) * nw];
            let sum = &mut acc.sum[c * w..(c + 1) * w];
            let weight = &mut acc.weight[c * w..(c + 1) * w];
            match self.cols.integer {
                Some(2) => reduce_fixed::<2>(vs, vw, sum, weight),
                Some(3) => reduce_fixed::<3>(vs, vw, sum, weight),
                Some(4) => reduce_fixed::<4>(vs, vw, sum, weight),
                Some(5) => reduce_fixed::<5>(vs, vw, sum, weight),
                Some(f) => {
                    for (((sk, wk), s), n) in sum
                        .iter_mut()
                        .zip(weight.iter_mut())
                        .zip(vs.chunks(f))
                        .zip(vw.chunks(f))
                    {
                        *sk += s.iter().sum::<f32>();
                        *wk += n.iter().sum::<f32>();
                    }
                }
                None => {
                    for (k, &(j0, j1, wf, wl)) in self.cols.spans.iter().enumerate() {
                        let (j0, j1) = (j0 as usize, j1 as usize);
                        let (mut s, mut n) = (wf * vs[j0], wf * vw[j0]);
                        if j1 - j0 > 1 {
                            s += vs[j0 + 1..j1 - 1].iter().sum::<f32>() + wl * vs[j1 - 1];
                            n += vw[j0 + 1..j1 - 1].iter().sum::<f32>() + wl * vw[j1 - 1];
                        }
                        sum[k] += s;
                        weight[k] += n;
                    }
                }
            }
        }
    }

    fn finish_row(&mut self) {
        let k = self.cur;
        let w = self.cols.out_len;
        let p = self.patch;
        let pw = self.padded_width;
        let r = k % p;
        let cell_area = (self.rows.ratio * self.cols.ratio) as f32;
        let min_valid = MIN_VALID_LABEL_FRACTION * cell_area;
        self.reduce_columns();
        let acc = &self.acc[0];
        // Bilinear channels take their sampled row (every output row is sampled by the time it
        // is finished: its second native row lies inside its cell).
        let sampled = match &mut self.bilinear {
            Some(b) => {
                let (row, values) = b
                    .ready
                    .pop_front()
                    .expect("an output row is sampled before it is finished");
                debug_assert_eq!(row, k);
                for c in 0..b.channels {
                    self.chunk.values[(c * p + r) * pw..(c * p + r) * pw + w]
                        .copy_from_slice(&values[c * w..(c + 1) * w]);
                }
                b.spare.push(values);
                b.channels
            }
            None => 0,
        };
        for c in sampled..self.channels {
            let dst = &mut self.chunk.values[(c * p + r) * pw..(c * p + r) * pw + w];
            let sum = &acc.sum[c * w..(c + 1) * w];
            let weight = &acc.weight[c * w..(c + 1) * w];
            for j in 0..w {
                dst[j] = if weight[j] > 0.0 {
                    sum[j] / weight[j]
                } else {
                    f32::NAN
                };
            }
        }
        for t in Task::ALL {
            let ch = t.channel();
            let dst = &mut self.chunk.labels[(ch * p + r) * pw..(ch * p + r) * pw + w];
            for (j, d) in dst.iter_mut().enumerate() {
                let (best, total) = match acc.mono[j] {
                    MONO_EMPTY => (IGNORE, 0.0),
                    MONO_MIXED => {
                        let off = j * BINS + BIN_OFFSET[ch];
                        let h = &acc.hist[off..off + t.n_classes()];
                        let mut total = 0.0;
                        let mut best = 0;
                        for (b, &x) in h.iter().enumerate() {
                            total += x;
                            if x > h[best] {
                                best = b;
                            }
                        }
                        (best as u8, total)
                    }
                    m => match unpack(m, ch) {
                        IGNORE => (IGNORE, 0.0),
                        v => (v, acc.mono_weight[j]),
                    },
                };
                *d = if total > 0.0 && total >= min_valid - 1e-4 {
                    best
                } else {
                    IGNORE
                };
            }
        }
        self.acc.swap(0, 1);
        self.acc[1].clear();
        self.advance_row(r);
    }
}

#[cfg(test)]
mod tests;
