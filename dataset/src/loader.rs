//! The multi-scale patch loader: host batches of normalised inputs, labels, validity masks and
//! per-sample windows, from a store and a regime.
//!
//! A batch is computed in two parallel phases on the loader's own rayon pool: first the chunks
//! its windows touch that the cache does not hold are decoded (each chunk once), then every
//! sample is cut, normalised and augmented into its slot. Which windows a batch holds depends
//! only on the seed and the batch index ([`crate::sampler`]), so batches are identical whatever
//! the thread count, and [`Loader::batch`] gives random access (an exact resume). [`Loader::iter`]
//! computes batches ahead on a background thread, at most `prefetch` of them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type};
use icefm_schemas::manifest::{PATCHES_FILE, SCENES_FILE, hist_column};
use icefm_schemas::store::MANIFESTS_DIR;
use icefm_schemas::{IGNORE, Level, Task};
use rayon::prelude::*;

use crate::cache::{CacheStats, ChunkCache, ChunkKey};
use crate::error::DatasetError;
use crate::regime::Regime;
use crate::rng::Rng;
use crate::sampler::{Augment, Sampler, Transform, pick_cumulative, tile_starts};
use crate::store::{ArrayKind, Chunk, StoreReader};
use crate::table::read_batches;

/// What to load.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Levels and their sampling weights; empty = every level of the store, equal weights.
    pub levels: Vec<(Level, f64)>,
    /// Crop edge in pixels (square); 0 = the store's patch size.
    pub crop: u32,
    /// Samples per batch.
    pub batch_size: usize,
    /// Input channels, from the store's `sar` and `aux` channels (`HH`, `HV`,
    /// `incidence_angle`, `distance_map`).
    pub channels: Vec<String>,
    /// Seed of every random choice.
    pub seed: u64,
    /// How samples are drawn.
    pub sampler: Sampler,
    /// Host augmentations (ignored by the sequential sampler).
    pub augment: Augment,
    /// Patches whose valid-SAR fraction (manifest `valid_fraction`, of the full patch area) is
    /// below this are never drawn (random samplers only). 1.0 is SAR-IceFM's rule (no NaN).
    pub min_valid: f32,
    /// Decoding threads; 0 = all cores.
    pub threads: usize,
    /// Batches computed ahead by [`Loader::iter`].
    pub prefetch: usize,
    /// Decoded-chunk cache, bytes.
    pub cache_bytes: usize,
    /// Leave `inputs` raw: the store's values (NaN where invalid, also outside the scene) in
    /// the scene's orientation, for a device that normalises and turns the batch itself
    /// (`icefm_model::fused::normalise_augment`, with [`Loader::channel_norms`] and each
    /// sample's transform). Labels are still turned on the host; `valid` then marks only the
    /// pixels inside the scene.
    pub raw_inputs: bool,
    /// This process's share of each batch in data-parallel training: `(rank, world)`. Batch
    /// `i` is drawn whole (`batch_size` samples, the same as in one process) and rank `r`
    /// reads samples `r·b/w .. (r+1)·b/w` of it, so `w` ranks together see exactly the samples
    /// one process would. `batch_size` must be a multiple of `world`; random samplers only.
    pub part: (usize, usize),
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            levels: Vec::new(),
            crop: 0,
            batch_size: 32,
            channels: vec!["HH".into(), "HV".into()],
            seed: 0,
            sampler: Sampler::LevelWeighted,
            augment: Augment::default(),
            min_valid: 0.5,
            threads: 0,
            prefetch: 2,
            cache_bytes: 512 << 20,
            raw_inputs: false,
            part: (0, 1),
        }
    }
}

/// Where a sample came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleInfo {
    /// Scene id.
    pub scene: Arc<str>,
    /// Level.
    pub level: Level,
    /// Top row of the window, in the level's pixels (may be negative or run past the scene
    /// edge only where the scene is smaller than the crop).
    pub y0: i64,
    /// Left column of the window.
    pub x0: i64,
    /// Augmentation applied to the window ([`Transform::IDENTITY`] when none).
    pub transform: Transform,
}

/// A host batch. Planes are row-major, `n = crop`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Index of the batch in the loader's sequence.
    pub index: u64,
    /// Input channels `C`.
    pub channels: usize,
    /// Crop edge.
    pub size: usize,
    /// `f32 [B, C, n, n]`: `(x − mean) / std` with the store's constants, 0 where invalid.
    pub inputs: Vec<f32>,
    /// `u8 [B, 3, n, n]`: SIC, SOD, FLOE classes; 255 = ignore (also outside the scene).
    pub labels: Vec<u8>,
    /// `u8 [B, n, n]`: 1 where every input channel is valid, 0 elsewhere.
    pub valid: Vec<u8>,
    /// Per-sample origin, `B` entries.
    pub samples: Vec<SampleInfo>,
}

impl Batch {
    /// Samples in the batch (the last batch of a sequential pass may be short).
    pub fn len(&self) -> usize {
        self.samples.len()
    }
    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A patch the random samplers may draw.
#[derive(Debug, Clone, Copy)]
struct PatchRef {
    scene: u32,
    y0: u32,
    x0: u32,
}

/// A window to cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    scene: u32,
    level: u16,
    y0: i64,
    x0: i64,
    transform: Transform,
}

/// Where each input channel comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelSource {
    pub(crate) kind: ArrayKind,
    pub(crate) index: usize,
    pub(crate) mean: f32,
    pub(crate) inv_std: f32,
}

/// The loader. Cheap to share: [`Loader::iter`] runs on a clone of the inner state.
pub struct Loader {
    inner: Arc<Inner>,
}

struct Inner {
    reader: StoreReader,
    opts: LoaderOptions,
    scenes: Vec<Arc<str>>,
    levels: Vec<Level>,
    /// `[scene][level]` → level size `(H, W)`.
    extents: Vec<Vec<(u32, u32)>>,
    /// Eligible patches per level (random samplers).
    patches: Vec<Vec<PatchRef>>,
    /// Cumulative level weights (level-weighted and class-balanced samplers).
    level_cum: Vec<f64>,
    /// Cumulative patch weights per level (class-balanced sampler).
    patch_cum: Vec<Vec<f64>>,
    /// Cumulative patch counts over levels (uniform sampler).
    uniform_cum: Vec<f64>,
    /// Sequential tiles.
    tiles: Vec<Window>,
    channels: Vec<ChannelSource>,
    kinds: Vec<ArrayKind>,
    patch: u32,
    crop: u32,
    cache: ChunkCache,
    pool: rayon::ThreadPool,
    /// Buffers of recycled batches ([`Loader::recycle`]).
    spare: std::sync::Mutex<Vec<Buffers>>,
}

/// The three buffers of a batch.
struct Buffers {
    inputs: Vec<f32>,
    labels: Vec<u8>,
    valid: Vec<u8>,
}

fn loader_error(msg: impl Into<String>) -> DatasetError {
    DatasetError::Loader(msg.into())
}

impl Loader {
    /// Open a loader on `store`, over the scenes of `regime` (all complete scenes of the store
    /// when `None`).
    pub fn open(
        store: &Path,
        regime: Option<&Regime>,
        opts: LoaderOptions,
    ) -> Result<Self, DatasetError> {
        let reader = StoreReader::open(store)?;
        let patch = reader.attrs.patch;
        let crop = if opts.crop == 0 { patch } else { opts.crop };
        if opts.batch_size == 0 {
            return Err(loader_error("batch size must be at least 1"));
        }
        let (rank, world) = opts.part;
        if world == 0 || rank >= world {
            return Err(loader_error(format!(
                "rank {rank} of {world} does not exist"
            )));
        }
        if world > 1 {
            if !opts.batch_size.is_multiple_of(world) {
                return Err(loader_error(format!(
                    "batch size {} is not a multiple of the {world} ranks: each rank takes an \
                     equal share of every batch",
                    opts.batch_size
                )));
            }
            if let Sampler::Sequential { .. } = opts.sampler {
                return Err(loader_error(
                    "the sequential sampler does not split batches between ranks",
                ));
            }
        }
        if !(0.0..=1.0).contains(&opts.min_valid) {
            return Err(loader_error(format!(
                "minimum valid fraction {} is not in 0–1",
                opts.min_valid
            )));
        }
        let weighted = resolve_levels(&reader, store, &opts.levels)?;
        let levels: Vec<Level> = weighted.iter().map(|(l, _)| *l).collect();
        let channels = resolve_channels(&reader, &opts.channels)?;
        let mut kinds: Vec<ArrayKind> = channels.iter().map(|c| c.kind).collect();
        kinds.push(ArrayKind::Labels);
        kinds.sort();
        kinds.dedup();

        let scenes = resolve_scenes(store, regime)?;

        let balanced = match opts.sampler {
            Sampler::ClassBalanced(t) => Some(t),
            _ => None,
        };
        let manifest = read_patches(store, &scenes, &levels, balanced)?;
        let extents = manifest.extents;
        let mut patches: Vec<Vec<PatchRef>> = vec![Vec::new(); levels.len()];
        let mut hists: Vec<Vec<Vec<u32>>> = vec![Vec::new(); levels.len()];
        // A regime that lists patches restricts the random samplers to them.
        let listed: Option<std::collections::HashSet<(u32, Level, u32, u32)>> =
            regime.and_then(|r| r.patches.as_ref()).map(|lists| {
                lists
                    .iter()
                    .enumerate()
                    .flat_map(|(s, l)| l.iter().map(move |p| (s as u32, p.level, p.row, p.col)))
                    .collect()
            });
        for p in manifest.rows {
            let allowed = listed.as_ref().is_none_or(|set| {
                set.contains(&(p.patch.scene, levels[p.level as usize], p.row, p.col))
            });
            if allowed && p.valid >= opts.min_valid {
                patches[p.level as usize].push(p.patch);
                hists[p.level as usize].push(p.hist);
            }
        }
        let sequential = matches!(opts.sampler, Sampler::Sequential { .. });
        if !sequential {
            for (li, p) in patches.iter().enumerate() {
                if p.is_empty() && weighted[li].1 > 0.0 {
                    return Err(loader_error(format!(
                        "level {}: no {}patch of the {} scenes has at least {:.0} % valid SAR; \
                         lower the minimum valid fraction or give this level weight 0",
                        levels[li],
                        if listed.is_some() { "listed " } else { "" },
                        scenes.len(),
                        100.0 * opts.min_valid
                    )));
                }
            }
        }
        let level_cum = cumulative(weighted.iter().map(|(_, w)| *w));
        if !sequential && level_cum.last().is_none_or(|&t| t <= 0.0) {
            return Err(loader_error("every level has weight 0"));
        }
        let uniform_cum = cumulative(
            patches
                .iter()
                .zip(&weighted)
                .map(|(p, (_, w))| if *w > 0.0 { p.len() as f64 } else { 0.0 }),
        );
        let patch_cum = match balanced {
            Some(task) => balanced_weights(&hists, &weighted, task)?,
            None => Vec::new(),
        };
        let tiles = match opts.sampler {
            Sampler::Sequential { overlap } => tiles(&extents, crop, overlap)?,
            _ => Vec::new(),
        };
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("icefm-loader-{i}"))
            .build()
            .map_err(|e| loader_error(format!("cannot start the loader threads: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                cache: ChunkCache::new(opts.cache_bytes),
                reader,
                opts,
                scenes,
                levels,
                extents,
                patches,
                level_cum,
                patch_cum,
                uniform_cum,
                tiles,
                channels,
                kinds,
                patch,
                crop,
                pool,
                spare: std::sync::Mutex::new(Vec::new()),
            }),
        })
    }

    /// Mean and inverse standard deviation of each input channel (the normalisation of
    /// [`LoaderOptions::raw_inputs`] batches).
    pub fn channel_norms(&self) -> Vec<(f32, f32)> {
        self.inner
            .channels
            .iter()
            .map(|c| (c.mean, c.inv_std))
            .collect()
    }

    /// Batches in one pass: `Some` for the sequential sampler, `None` (endless) otherwise.
    pub fn len(&self) -> Option<u64> {
        let i = &self.inner;
        matches!(i.opts.sampler, Sampler::Sequential { .. })
            .then(|| (i.tiles.len() as u64).div_ceil(i.opts.batch_size as u64))
    }

    /// Whether a sequential pass holds no batch (never true for the random samplers).
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// Eligible patches per level (after the valid-fraction threshold), in level order.
    pub fn eligible_patches(&self) -> Vec<(Level, usize)> {
        let i = &self.inner;
        i.levels
            .iter()
            .zip(&i.patches)
            .map(|(l, p)| (*l, p.len()))
            .collect()
    }

    /// The scenes, in regime order.
    pub fn scenes(&self) -> &[Arc<str>] {
        &self.inner.scenes
    }

    /// Crop edge in pixels.
    pub fn crop(&self) -> u32 {
        self.inner.crop
    }

    /// Cache hits and misses so far.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// Batch `index` (the same for a seed whatever the thread count or call order). For the
    /// sequential sampler, an index past the end is an error.
    pub fn batch(&self, index: u64) -> Result<Batch, DatasetError> {
        self.inner.batch(index)
    }

    /// Hand a batch's buffers back for reuse by later batches. Optional: without it every batch
    /// gets fresh memory, which the system must map and zero (about a third of the time of a
    /// 32 × 2 × 384² batch on the benchmark machine).
    pub fn recycle(&self, batch: Batch) {
        self.inner.recycle(batch);
    }

    /// The windows of batch `index`, without reading anything (benchmarks use it to decode the
    /// same chunks by other means).
    pub fn windows(&self, index: u64) -> Result<Vec<SampleInfo>, DatasetError> {
        let i = &self.inner;
        Ok(i.plan(index)?.iter().map(|w| i.info(w)).collect())
    }

    /// The windows of the whole batch `index`, every rank's share in rank order
    /// ([`LoaderOptions::part`]; [`Loader::windows`] with one rank), without reading anything.
    pub fn whole_windows(&self, index: u64) -> Result<Vec<SampleInfo>, DatasetError> {
        let i = &self.inner;
        let b = i.opts.batch_size as u64;
        if let Sampler::Sequential { .. } = i.opts.sampler {
            return self.windows(index);
        }
        Ok((0..b)
            .map(|j| i.info(&i.draw(&mut Rng::new(i.opts.seed, index * b + j))))
            .collect())
    }

    /// Batches `start, start + 1, …`, computed ahead on a background thread (at most
    /// `prefetch` waiting). Ends after a sequential pass, or after the first error.
    pub fn iter(&self, start: u64) -> Batches {
        let inner = self.inner.clone();
        let (tx, rx) = crossbeam_channel::bounded(inner.opts.prefetch.max(1));
        let end = self.len();
        let handle = std::thread::Builder::new()
            .name("icefm-prefetch".into())
            .spawn(move || {
                let mut i = start;
                while end.is_none_or(|e| i < e) {
                    let b = inner.batch(i);
                    let failed = b.is_err();
                    if tx.send(b).is_err() || failed {
                        break;
                    }
                    i += 1;
                }
            });
        match handle {
            Ok(_) => Batches {
                rx: Some(rx),
                inner: self.inner.clone(),
            },
            Err(e) => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                // The receiver is alive: this send cannot fail.
                let _ = tx.send(Err(loader_error(format!(
                    "cannot start the prefetch thread: {e}"
                ))));
                Batches {
                    rx: Some(rx),
                    inner: self.inner.clone(),
                }
            }
        }
    }
}

/// Batches computed ahead ([`Loader::iter`]). Dropping it stops the background thread after
/// the batch in progress.
pub struct Batches {
    rx: Option<crossbeam_channel::Receiver<Result<Batch, DatasetError>>>,
    inner: Arc<Inner>,
}

impl Batches {
    /// [`Loader::recycle`].
    pub fn recycle(&self, batch: Batch) {
        self.inner.recycle(batch);
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, DatasetError>;
    fn next(&mut self) -> Option<Self::Item> {
        let b = self.rx.as_ref()?.recv().ok();
        if b.is_none() {
            self.rx = None;
        }
        b
    }
}

fn cumulative(w: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut acc = 0.0;
    w.map(|x| {
        acc += x;
        acc
    })
    .collect()
}

/// The levels asked for with their weights (every store level, equal weights, when none).
fn resolve_levels(
    reader: &StoreReader,
    store: &Path,
    asked: &[(Level, f64)],
) -> Result<Vec<(Level, f64)>, DatasetError> {
    let have = &reader.attrs.levels;
    let weighted: Vec<(Level, f64)> = if asked.is_empty() {
        have.iter().map(|&l| (l, 1.0)).collect()
    } else {
        asked.to_vec()
    };
    let missing: Vec<String> = weighted
        .iter()
        .filter(|(l, _)| !have.contains(l))
        .map(|(l, _)| l.name())
        .collect();
    if !missing.is_empty() {
        return Err(loader_error(format!(
            "{}: the store has no level {} (it has {})",
            store.display(),
            missing.join(", "),
            have.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(weighted)
}

/// Where each named input channel comes from, with its normalisation.
pub(crate) fn resolve_channels(
    reader: &StoreReader,
    names: &[String],
) -> Result<Vec<ChannelSource>, DatasetError> {
    let attrs = &reader.attrs;
    let mut channels = Vec::new();
    for name in names {
        let (kind, index) = if let Some(i) = attrs.sar_channels.iter().position(|c| c == name) {
            (ArrayKind::Sar, i)
        } else if let Some(i) = attrs.aux_channels.iter().position(|c| c == name) {
            (ArrayKind::Aux, i)
        } else {
            return Err(loader_error(format!(
                "unknown input channel `{name}` (the store has {} and {})",
                attrs.sar_channels.join(", "),
                attrs.aux_channels.join(", ")
            )));
        };
        let (mean, std) = reader.mean_std(name)?;
        channels.push(ChannelSource {
            kind,
            index,
            mean,
            inv_std: 1.0 / std,
        });
    }
    if channels.is_empty() {
        return Err(loader_error("no input channel asked for"));
    }
    Ok(channels)
}

/// The regime's scenes in its order, all complete in the store (every complete scene without a
/// regime).
pub(crate) fn resolve_scenes(
    store: &Path,
    regime: Option<&Regime>,
) -> Result<Vec<Arc<str>>, DatasetError> {
    let complete = complete_scenes(store)?;
    let scenes: Vec<Arc<str>> = match regime {
        Some(r) => {
            if r.scenes.is_empty() {
                return Err(loader_error(format!("regime `{}` has no scene", r.name)));
            }
            let known: std::collections::HashSet<&str> =
                complete.iter().map(String::as_str).collect();
            let absent: Vec<&str> = r
                .scenes
                .iter()
                .map(String::as_str)
                .filter(|s| !known.contains(s))
                .collect();
            if !absent.is_empty() {
                return Err(loader_error(format!(
                    "regime `{}`: {} of its scenes are not in {}: {}{}",
                    r.name,
                    absent.len(),
                    store.display(),
                    absent[..absent.len().min(5)].join(", "),
                    if absent.len() > 5 { ", …" } else { "" }
                )));
            }
            r.scenes.iter().map(|s| Arc::from(s.as_str())).collect()
        }
        None => complete.iter().map(|s| Arc::from(s.as_str())).collect(),
    };
    if scenes.is_empty() {
        return Err(loader_error(format!(
            "{}: the store has no complete scene",
            store.display()
        )));
    }
    Ok(scenes)
}

/// Cumulative class-balanced weights of each level's eligible patches (`hists[level][patch]`,
/// the task's class counts): `Σ_c hist[c] / total[c]`.
fn balanced_weights(
    hists: &[Vec<Vec<u32>>],
    weighted: &[(Level, f64)],
    task: Task,
) -> Result<Vec<Vec<f64>>, DatasetError> {
    let mut out = Vec::new();
    for (h, (level, weight)) in hists.iter().zip(weighted) {
        let mut total = vec![0u64; task.n_classes()];
        for ph in h {
            for (t, &c) in total.iter_mut().zip(ph.iter()) {
                *t += u64::from(c);
            }
        }
        let cum = cumulative(h.iter().map(|ph| {
            ph.iter()
                .zip(&total)
                .filter(|(_, t)| **t > 0)
                .map(|(&c, &t)| f64::from(c) / t as f64)
                .sum::<f64>()
        }));
        if *weight > 0.0 && cum.last().is_none_or(|&t| t <= 0.0) {
            return Err(loader_error(format!(
                "level {level}: no eligible patch has a {} label to balance",
                task.name()
            )));
        }
        out.push(cum);
    }
    Ok(out)
}

/// The sequential sampler's windows: every scene, level by level, row-major.
fn tiles(
    extents: &[Vec<(u32, u32)>],
    crop: u32,
    overlap: u32,
) -> Result<Vec<Window>, DatasetError> {
    if overlap >= crop {
        return Err(loader_error(format!(
            "overlap {overlap} must be smaller than the crop {crop}"
        )));
    }
    let mut t = Vec::new();
    for (si, ext) in extents.iter().enumerate() {
        for (li, &(h, w)) in ext.iter().enumerate() {
            for y in tile_starts(h, crop, overlap) {
                for x in tile_starts(w, crop, overlap) {
                    t.push(Window {
                        scene: si as u32,
                        level: li as u16,
                        y0: i64::from(y),
                        x0: i64::from(x),
                        transform: Transform::IDENTITY,
                    });
                }
            }
        }
    }
    Ok(t)
}

/// Scene ids of the store's scenes manifest (complete scenes only are listed there).
fn complete_scenes(store: &Path) -> Result<Vec<String>, DatasetError> {
    let path = store.join(MANIFESTS_DIR).join(SCENES_FILE);
    if !path.exists() {
        return Err(crate::error::no_scenes_manifest(store));
    }
    let mut out = Vec::new();
    for b in read_batches(&path, &["scene_id"])? {
        out.extend(
            b.column(0)
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(String::from),
        );
    }
    Ok(out)
}

struct ManifestRow {
    level: u16,
    row: u32,
    col: u32,
    valid: f32,
    patch: PatchRef,
    hist: Vec<u32>,
}

struct PatchManifest {
    /// `[scene][level]` → `(H, W)`.
    extents: Vec<Vec<(u32, u32)>>,
    /// Rows of the loader's scenes and levels, sorted by scene, level, row, column.
    rows: Vec<ManifestRow>,
}

fn read_patches(
    store: &Path,
    scenes: &[Arc<str>],
    levels: &[Level],
    hist: Option<Task>,
) -> Result<PatchManifest, DatasetError> {
    let path = store.join(MANIFESTS_DIR).join(PATCHES_FILE);
    let scene_ix: HashMap<&str, u32> = scenes
        .iter()
        .enumerate()
        .map(|(i, s)| (&**s, i as u32))
        .collect();
    let level_ix: HashMap<String, u16> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name(), i as u16))
        .collect();
    let hist_col = hist.map(|t| hist_column(t, "hist"));
    let mut cols = vec![
        "scene_id", "level", "row", "col", "y0", "x0", "height", "width",
    ];
    cols.push("valid_fraction");
    if let Some(h) = &hist_col {
        cols.push(h);
    }
    let mut extents = vec![vec![(0u32, 0u32); levels.len()]; scenes.len()];
    let mut rows: Vec<(u32, u32, u32, ManifestRow)> = Vec::new();
    let bad =
        |what: &str| DatasetError::manifest(&path, format!("column `{what}` has the wrong type"));
    for b in read_batches(&path, &cols)? {
        let ids = b.column(0).as_string::<i32>();
        let lv = b.column(1).as_string::<i32>();
        let u32s = |i: usize, name: &str| {
            b.column(i)
                .as_primitive_opt::<UInt32Type>()
                .ok_or_else(|| bad(name))
        };
        let (r, c, y0, x0, h, w) = (
            u32s(2, "row")?,
            u32s(3, "col")?,
            u32s(4, "y0")?,
            u32s(5, "x0")?,
            u32s(6, "height")?,
            u32s(7, "width")?,
        );
        let valid = b
            .column(8)
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| bad("valid_fraction"))?;
        let hists = hist_col
            .as_ref()
            .map(|_| {
                b.column(9)
                    .as_fixed_size_list_opt()
                    .ok_or_else(|| bad("hist"))
            })
            .transpose()?;
        for i in 0..b.num_rows() {
            let (Some(&s), Some(&l)) = (scene_ix.get(ids.value(i)), level_ix.get(lv.value(i)))
            else {
                continue;
            };
            let e = &mut extents[s as usize][l as usize];
            e.0 = e.0.max(y0.value(i) + h.value(i));
            e.1 = e.1.max(x0.value(i) + w.value(i));
            let hist = match (&hists, hist) {
                (Some(hs), Some(t)) => {
                    let v = hs.value(i);
                    let v = v
                        .as_primitive_opt::<UInt32Type>()
                        .ok_or_else(|| bad("hist"))?;
                    v.values()[..t.n_classes()].to_vec()
                }
                _ => Vec::new(),
            };
            rows.push((
                s,
                r.value(i),
                c.value(i),
                ManifestRow {
                    level: l,
                    row: r.value(i),
                    col: c.value(i),
                    valid: valid.value(i),
                    patch: PatchRef {
                        scene: s,
                        y0: y0.value(i),
                        x0: x0.value(i),
                    },
                    hist,
                },
            ));
        }
    }
    for (si, ext) in extents.iter().enumerate() {
        for (li, e) in ext.iter().enumerate() {
            if e.0 == 0 || e.1 == 0 {
                return Err(DatasetError::manifest(
                    &path,
                    format!("scene {} has no patch at level {}", scenes[si], levels[li]),
                ));
            }
        }
    }
    rows.sort_by_key(|(s, r, c, m)| (*s, m.level, *r, *c));
    Ok(PatchManifest {
        extents,
        rows: rows.into_iter().map(|(_, _, _, m)| m).collect(),
    })
}

impl Inner {
    /// The windows of batch `index`.
    fn plan(&self, index: u64) -> Result<Vec<Window>, DatasetError> {
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
    fn draw(&self, rng: &mut Rng) -> Window {
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

    fn batch(&self, index: u64) -> Result<Batch, DatasetError> {
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

    fn recycle(&self, batch: Batch) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < self.opts.prefetch + 2 {
            spare.push(Buffers {
                inputs: batch.inputs,
                labels: batch.labels,
                valid: batch.valid,
            });
        }
    }

    fn info(&self, w: &Window) -> SampleInfo {
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
