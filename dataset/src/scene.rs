//! Whole scene levels, for full-scene evaluation and prediction: the normalised inputs, the
//! validity mask and the labels of one scene at one level, decoded chunk by chunk in parallel.
//!
//! Inputs are normalised exactly as the loader does ((x − mean) / std with the store's
//! constants, 0 where invalid), so a model sees the same numbers in training and evaluation.

use std::path::Path;
use std::sync::Arc;

use icefm_schemas::Level;
use rayon::prelude::*;

use crate::error::DatasetError;
use crate::loader::{ChannelSource, normalise, resolve_channels, resolve_scenes};
use crate::regime::Regime;
use crate::store::{ArrayKind, StoreReader};

/// One scene at one level, row-major planes of `height × width`.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneLevel {
    /// Scene id.
    pub scene: Arc<str>,
    /// Level.
    pub level: Level,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Input channels `C`.
    pub channels: usize,
    /// `f32 [C, H, W]`, normalised, 0 where invalid.
    pub inputs: Vec<f32>,
    /// `u8 [H, W]`: 1 where every input channel is valid.
    pub valid: Vec<u8>,
    /// `u8 [3, H, W]`: SIC, SOD, FLOE; 255 = ignore.
    pub labels: Vec<u8>,
}

/// Reads whole scene levels of a store.
pub struct SceneReader {
    reader: StoreReader,
    channels: Vec<ChannelSource>,
    /// For a store in object storage: threads that wait on its requests
    /// ([`crate::loader::REMOTE_THREADS`]); a local store decodes on rayon's global pool.
    remote_pool: Option<rayon::ThreadPool>,
}

impl SceneReader {
    /// Open `store` (a folder, or a URL into object storage) for the input `channels` (names
    /// from the store's `sar` and `aux` channels).
    pub fn open(store: &Path, channels: &[String]) -> Result<Self, DatasetError> {
        let reader = StoreReader::open(store)?;
        let channels = resolve_channels(&reader, channels)?;
        let remote_pool = if crate::location::is_url(store) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(crate::loader::all_threads(store))
                .thread_name(|i| format!("icefm-scene-{i}"))
                .build()
                .map_err(|e| {
                    DatasetError::Store(format!("cannot start the reading threads: {e}"))
                })?;
            Some(pool)
        } else {
            None
        };
        Ok(Self {
            reader,
            channels,
            remote_pool,
        })
    }

    /// The store's levels, finest first.
    pub fn levels(&self) -> Vec<Level> {
        let mut l = self.reader.attrs.levels.clone();
        l.sort_by_key(|l| l.spacing_m());
        l
    }

    /// The complete scenes of a regime (all complete scenes of the store when `None`), in the
    /// regime's order.
    pub fn scenes(&self, regime: Option<&Regime>) -> Result<Vec<Arc<str>>, DatasetError> {
        resolve_scenes(&self.reader.path, regime)
    }

    /// Inputs, validity and labels of `scene` at `level`.
    pub fn read(&self, scene: &str, level: Level) -> Result<SceneLevel, DatasetError> {
        let [_, h, w] = self
            .reader
            .shape(scene, level, ArrayKind::Sar)?
            .map(|d| d as usize);
        let plane = h * w;
        let mut inputs = vec![0f32; self.channels.len() * plane];
        let mut valid = vec![1u8; plane];
        let mut cached: Vec<(ArrayKind, Vec<u8>)> = Vec::new();
        for (k, ch) in self.channels.iter().enumerate() {
            if !cached.iter().any(|(kind, _)| *kind == ch.kind) {
                let (bytes, _) = self.read_bytes(scene, level, ch.kind)?;
                cached.push((ch.kind, bytes));
            }
            let src = cached
                .iter()
                .find(|(kind, _)| *kind == ch.kind)
                .map(|(_, b)| &b[4 * ch.index * plane..4 * (ch.index + 1) * plane])
                .ok_or_else(|| DatasetError::Loader("channel array not read".into()))?;
            normalise(
                src,
                &mut inputs[k * plane..(k + 1) * plane],
                &mut valid,
                ch.mean,
                ch.inv_std,
            );
        }
        let (labels, shape) = self.read_bytes(scene, level, ArrayKind::Labels)?;
        if shape != [3, h, w] {
            return Err(DatasetError::Store(format!(
                "{scene} {level}: labels are {shape:?}, SAR is {h} x {w}"
            )));
        }
        Ok(SceneLevel {
            scene: scene.into(),
            level,
            height: h,
            width: w,
            channels: self.channels.len(),
            inputs,
            valid,
            labels,
        })
    }

    /// The labels `u8 [3, H, W]` of `scene` at `level` and their `(H, W)`.
    pub fn read_labels(
        &self,
        scene: &str,
        level: Level,
    ) -> Result<(Vec<u8>, (usize, usize)), DatasetError> {
        let (labels, [_, h, w]) = self.read_bytes(scene, level, ArrayKind::Labels)?;
        Ok((labels, (h, w)))
    }

    /// A whole `f32` array `[C, H, W]` in raw units (SAR in dB, NaN invalid).
    pub fn read_f32(
        &self,
        scene: &str,
        level: Level,
        kind: ArrayKind,
    ) -> Result<(Vec<f32>, [usize; 3]), DatasetError> {
        let (bytes, shape) = self.read_bytes(scene, level, kind)?;
        let values = bytes
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((values, shape))
    }

    /// A whole array's native-endian bytes and its shape `[C, H, W]`.
    fn read_bytes(
        &self,
        scene: &str,
        level: Level,
        kind: ArrayKind,
    ) -> Result<(Vec<u8>, [usize; 3]), DatasetError> {
        let [c, h, w] = self.reader.shape(scene, level, kind)?.map(|d| d as usize);
        let p = self.reader.attrs.patch as usize;
        let (rows, cols) = (h.div_ceil(p), w.div_ceil(p));
        let decode_all = || {
            (0..rows * cols)
                .into_par_iter()
                .map(|i| {
                    let (r, q) = (i / cols, i % cols);
                    let chunk = self.reader.decode(scene, level, kind, r as u64, q as u64)?;
                    Ok(((r, q), chunk.0.to_vec()))
                })
                .collect::<Result<Vec<((usize, usize), Vec<u8>)>, DatasetError>>()
        };
        let chunks = match &self.remote_pool {
            Some(pool) => pool.install(decode_all)?,
            None => decode_all()?,
        };
        let Some(first) = chunks.first() else {
            return Ok((Vec::new(), [c, h, w]));
        };
        let elem = first.1.len() / (c * p * p).max(1);
        if elem == 0 || first.1.len() != elem * c * p * p {
            return Err(DatasetError::Store(format!(
                "{scene} {level} {}: chunk of {} bytes is not [{c}, {p}, {p}]",
                kind.name(),
                first.1.len()
            )));
        }
        let mut out = vec![0u8; c * h * w * elem];
        for ((r, q), bytes) in &chunks {
            let (y0, x0) = (r * p, q * p);
            let (nh, nw) = (p.min(h - y0), p.min(w - x0));
            for ch in 0..c {
                for y in 0..nh {
                    let src = ((ch * p + y) * p) * elem;
                    let dst = ((ch * h + y0 + y) * w + x0) * elem;
                    out[dst..dst + nw * elem].copy_from_slice(&bytes[src..src + nw * elem]);
                }
            }
        }
        Ok((out, [c, h, w]))
    }
}
