//! Computing one batch: the chunks its windows touch decoded (each once, in parallel), then each
//! sample cut, normalised and augmented into its slot.

use icefm_schemas::IGNORE;
use rayon::prelude::*;

use crate::cache::ChunkKey;
use crate::error::DatasetError;
use crate::rng::Rng;
use crate::sampler::{Sampler, Transform, pick_cumulative};
use crate::store::{ArrayKind, Chunk};

use super::{Batch, Buffers, Inner, SampleInfo, Window, loader_error};

impl Inner {
    /// The windows of batch `index`.
    pub(super) fn plan(&self, index: u64) -> Result<Vec<Window>, DatasetError> {
        let b = self.opts.batch_size;
        if let Sampler::Sequential { .. } = self.opts.sampler {
            let start = index as usize * b;
            if start >= self.tiles.len() {
                return Err(loader_error(format!(
                    "batch {index} is past the end of the sequential pass ({} batches)",
                    self.tiles.len().div_ceil(b)
                )));
            }
            return Ok(self.tiles[start..(start + b).min(self.tiles.len())].to_vec());
        }
        let (rank, world) = self.opts.part;
        let share = (b / world) as u64;
        let first = rank as u64 * share;
        Ok((first..first + share)
            .map(|j| self.draw(&mut Rng::new(self.opts.seed, index * b as u64 + j)))
            .collect())
    }

    /// One random window: level, patch, jitter, transform, in that order.
    pub(super) fn draw(&self, rng: &mut Rng) -> Window {
        let (level, k) = match self.opts.sampler {
            Sampler::Uniform => {
                // Patch k of all eligible patches of the levels with weight > 0.
                let total = self.uniform_cum.last().copied().unwrap_or(0.0) as u64;
                let k = rng.below(total.max(1)) as f64;
                let level = self.uniform_cum.partition_point(|&c| c <= k);
                let before = if level == 0 {
                    0.0
                } else {
                    self.uniform_cum[level - 1]
                };
                (level, (k - before) as usize)
            }
            Sampler::ClassBalanced(_) => {
                let level = pick_cumulative(&self.level_cum, rng);
                (level, pick_cumulative(&self.patch_cum[level], rng))
            }
            _ => {
                let level = pick_cumulative(&self.level_cum, rng);
                (level, rng.below(self.patches[level].len() as u64) as usize)
            }
        };
        let p = self.patches[level][k];
        let (h, w) = self.extents[p.scene as usize][level];
        let centre = (i64::from(self.patch) - i64::from(self.crop)) / 2;
        let j = i64::from(self.opts.augment.jitter);
        let mut jitter = || {
            if j == 0 {
                0
            } else {
                rng.below(2 * j as u64 + 1) as i64 - j
            }
        };
        let (jy, jx) = (jitter(), jitter());
        let clamp = |v: i64, len: u32| {
            let max = i64::from(len) - i64::from(self.crop);
            if max <= 0 { 0 } else { v.clamp(0, max) }
        };
        Window {
            scene: p.scene,
            level: level as u16,
            y0: clamp(i64::from(p.y0) + centre + jy, h),
            x0: clamp(i64::from(p.x0) + centre + jx, w),
            transform: Transform::draw(rng, self.opts.augment),
        }
    }

    /// Chunk rows (or columns) a window touches along an axis of `len` pixels.
    fn chunk_span(&self, start: i64, len: u32) -> std::ops::Range<u32> {
        let p = i64::from(self.patch);
        let end = (start + i64::from(self.crop)).min(i64::from(len));
        let start = start.max(0);
        if end <= start {
            return 0..0;
        }
        (start / p) as u32..((end - 1) / p + 1) as u32
    }

    pub(super) fn batch(&self, index: u64) -> Result<Batch, DatasetError> {
        let windows = self.plan(index)?;
        // Every sample is cut in its own task, chunk by chunk: a chunk comes from the cache or is
        // decoded, then cut at once, while it is still in the core's cache.
        let n = self.crop as usize;
        let plane = n * n;
        let c = self.channels.len();
        let b = windows.len();
        let Buffers {
            mut inputs,
            mut labels,
            mut valid,
        } = self.buffers(b * c * plane, b * 3 * plane, b * plane);
        self.pool.install(|| {
            inputs
                .par_chunks_mut(c * plane)
                .zip(labels.par_chunks_mut(3 * plane))
                .zip(valid.par_chunks_mut(plane))
                .zip(windows.par_iter())
                .try_for_each(|(((inp, lab), val), w)| self.cut(w, inp, lab, val))
        })?;
        Ok(Batch {
            index,
            channels: c,
            size: n,
            inputs,
            labels,
            valid,
            samples: windows.iter().map(|w| self.info(w)).collect(),
        })
    }

    /// Buffers of the given lengths, recycled where possible; their contents are arbitrary
    /// (every sample writes or fills its whole slot).
    fn buffers(&self, inputs: usize, labels: usize, valid: usize) -> Buffers {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut b = spare.unwrap_or(Buffers {
            inputs: Vec::new(),
            labels: Vec::new(),
            valid: Vec::new(),
        });
        b.inputs.resize(inputs, 0.0);
        b.labels.resize(labels, IGNORE);
        b.valid.resize(valid, 0);
        b
    }

    pub(super) fn recycle(&self, batch: Batch) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < self.opts.prefetch + 2 {
            spare.push(Buffers {
                inputs: batch.inputs,
                labels: batch.labels,
                valid: batch.valid,
            });
        }
    }

    pub(super) fn info(&self, w: &Window) -> SampleInfo {
        SampleInfo {
            scene: self.scenes[w.scene as usize].clone(),
            level: self.levels[w.level as usize],
            y0: w.y0,
            x0: w.x0,
            transform: w.transform,
        }
    }

    /// A chunk, from the cache or decoded (and then cached).
    fn chunk(&self, k: ChunkKey) -> Result<Chunk, DatasetError> {
        if let Some(c) = self.cache.get(&k) {
            return Ok(c);
        }
        let c = self.reader.decode(
            &self.scenes[k.scene as usize],
            self.levels[k.level as usize],
            k.kind,
            u64::from(k.row),
            u64::from(k.col),
        )?;
        self.cache.insert([(k, c.clone())]);
        Ok(c)
    }

    /// Cut one window into its slot (whatever the slot held before).
    fn cut(
        &self,
        w: &Window,
        inp: &mut [f32],
        lab: &mut [u8],
        val: &mut [u8],
    ) -> Result<(), DatasetError> {
        let raw = self.opts.raw_inputs;
        if w.transform.is_identity() {
            return self.cut_plain(w, inp, lab, val);
        }
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<u8>, Vec<u8>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
        }
        let n = self.crop as usize;
        let plane = n * n;
        SCRATCH.with_borrow_mut(|(ti, tl, tv)| {
            ti.resize(inp.len(), 0.0);
            tl.resize(lab.len(), IGNORE);
            tv.resize(val.len(), 0);
            self.cut_plain(w, ti, tl, tv)?;
            if raw {
                inp.copy_from_slice(ti);
            } else {
                for (s, d) in ti.chunks(plane).zip(inp.chunks_mut(plane)) {
                    w.transform.apply(s, d, n);
                }
            }
            for (s, d) in tl.chunks(plane).zip(lab.chunks_mut(plane)) {
                w.transform.apply(s, d, n);
            }
            w.transform.apply(tv, val, n);
            Ok(())
        })
    }

    fn cut_plain(
        &self,
        w: &Window,
        inp: &mut [f32],
        lab: &mut [u8],
        val: &mut [u8],
    ) -> Result<(), DatasetError> {
        let n = self.crop as i64;
        let p = i64::from(self.patch);
        let pu = self.patch as usize;
        let plane = pu * pu;
        let nu = n as usize;
        let (h, wd) = self.extents[w.scene as usize][w.level as usize];
        // Pixels outside the scene are written by no chunk: fill the slot first, unless the
        // window lies inside the scene (every pixel is then written below).
        let raw = self.opts.raw_inputs;
        if w.y0 < 0 || w.x0 < 0 || w.y0 + n > i64::from(h) || w.x0 + n > i64::from(wd) {
            inp.fill(if raw { f32::NAN } else { 0.0 });
            lab.fill(IGNORE);
            val.fill(0);
        }
        let key = |kind, row: u32, col: u32| ChunkKey {
            scene: w.scene,
            level: w.level,
            kind,
            row,
            col,
        };
        for row in self.chunk_span(w.y0, h) {
            for col in self.chunk_span(w.x0, wd) {
                let (cy, cx) = (i64::from(row) * p, i64::from(col) * p);
                // The part of the window inside this chunk and the scene.
                let y_a = w.y0.max(cy).max(0);
                let y_b = (w.y0 + n).min(cy + p).min(i64::from(h));
                let x_a = w.x0.max(cx).max(0);
                let x_b = (w.x0 + n).min(cx + p).min(i64::from(wd));
                if y_b <= y_a || x_b <= x_a {
                    continue;
                }
                let len = (x_b - x_a) as usize;
                let (sx, dx) = ((x_a - cx) as usize, (x_a - w.x0) as usize);
                for y in y_a..y_b {
                    let at = (y - w.y0) as usize * nu + dx;
                    val[at..at + len].fill(1);
                }
                let mut got: [Option<Chunk>; 3] = [None, None, None];
                for &kind in &self.kinds {
                    got[kind as usize] = Some(self.chunk(key(kind, row, col))?);
                }
                // A chunk shorter than the array's chunk shape (a damaged store) reads as
                // invalid pixels, never as another batch's leftovers.
                for (ci, ch) in self.channels.iter().enumerate() {
                    let src = got[ch.kind as usize]
                        .as_ref()
                        .and_then(|c| c.0.get(ch.index * plane * 4..(ch.index + 1) * plane * 4));
                    let dst = &mut inp[ci * nu * nu..(ci + 1) * nu * nu];
                    for y in y_a..y_b {
                        let (sy, dy) = ((y - cy) as usize, (y - w.y0) as usize);
                        let d = &mut dst[dy * nu + dx..dy * nu + dx + len];
                        let v = &mut val[dy * nu + dx..dy * nu + dx + len];
                        let Some(src) = src else {
                            d.fill(if raw { f32::NAN } else { 0.0 });
                            v.fill(0);
                            continue;
                        };
                        let s = &src[(sy * pu + sx) * 4..(sy * pu + sx + len) * 4];
                        if raw {
                            for (d, b) in d.iter_mut().zip(s.chunks_exact(4)) {
                                *d = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                            }
                        } else {
                            normalise(s, d, v, ch.mean, ch.inv_std);
                        }
                    }
                }
                let labels = got[ArrayKind::Labels as usize]
                    .as_ref()
                    .filter(|c| c.0.len() >= 3 * plane)
                    .map(|c| &c.0);
                for t in 0..3 {
                    let dst = &mut lab[t * nu * nu..(t + 1) * nu * nu];
                    for y in y_a..y_b {
                        let (sy, dy) = ((y - cy) as usize, (y - w.y0) as usize);
                        let d = &mut dst[dy * nu + dx..dy * nu + dx + len];
                        match labels {
                            Some(src) => d.copy_from_slice(
                                &src[t * plane + sy * pu + sx..t * plane + sy * pu + sx + len],
                            ),
                            None => d.fill(IGNORE),
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `dst = (x − mean) · inv_std` for the native-endian f32 bytes `src`, 0 where `x` is not finite;
/// `valid &= finite(x)`. Blocks of 16 so the compiler turns it into vector code.
pub(crate) fn normalise(src: &[u8], dst: &mut [f32], valid: &mut [u8], mean: f32, inv_std: f32) {
    const K: usize = 16;
    let one = |b: &[u8], d: &mut f32, v: &mut u8| {
        let x = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let ok = x.is_finite();
        *d = if ok { (x - mean) * inv_std } else { 0.0 };
        *v &= u8::from(ok);
    };
    let mut s = src.chunks_exact(4 * K);
    let mut d = dst.chunks_exact_mut(K);
    let mut v = valid.chunks_exact_mut(K);
    for ((s, d), v) in (&mut s).zip(&mut d).zip(&mut v) {
        let mut x = [0f32; K];
        for (k, x) in x.iter_mut().enumerate() {
            *x = f32::from_ne_bytes([s[4 * k], s[4 * k + 1], s[4 * k + 2], s[4 * k + 3]]);
        }
        for k in 0..K {
            let ok = x[k].is_finite();
            d[k] = if ok { (x[k] - mean) * inv_std } else { 0.0 };
            v[k] &= u8::from(ok);
        }
    }
    for ((s, d), v) in s
        .remainder()
        .chunks_exact(4)
        .zip(d.into_remainder())
        .zip(v.into_remainder())
    {
        one(s, d, v);
    }
}
