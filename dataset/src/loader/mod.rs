//! The multi-scale patch loader: host batches of normalised inputs, labels, validity masks and
//! per-sample windows, from a store and a regime.
//!
//! A batch is computed in two parallel phases on the loader's own rayon pool: first the chunks
//! its windows touch that the cache does not hold are decoded (each chunk once), then every
//! sample is cut, normalised and augmented into its slot. Which windows a batch holds depends
//! only on the seed and the batch index ([`crate::sampler`]), so batches are identical whatever
//! the thread count, and [`Loader::batch`] gives random access (an exact resume). [`Loader::iter`]
//! computes batches ahead on a background thread, at most `prefetch` of them.

use std::path::Path;
use std::sync::Arc;

use icefm_schemas::Level;

use crate::cache::{CacheStats, ChunkCache};
use crate::error::DatasetError;
use crate::regime::Regime;
use crate::rng::Rng;
use crate::sampler::{Augment, Sampler, Transform};
use crate::store::{ArrayKind, StoreReader};

mod cut;
mod resolve;

pub(crate) use cut::normalise;
use resolve::{balanced_weights, cumulative, read_patches, resolve_levels, tiles};
pub(crate) use resolve::{complete_scenes, resolve_channels, resolve_scenes};

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
    /// Decoding threads; 0 = all cores, and at least [`REMOTE_THREADS`] for a store in object
    /// storage.
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
    /// Read the charts (`labels` arrays). Off, the batches' labels are all 255 and the label
    /// chunks are never read: MAE pre-training uses none, and over object storage they were
    /// half its requests.
    pub labels: bool,
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
            labels: true,
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

/// Loader threads for a store in object storage unless told otherwise: each request waits on the
/// network (10–30 ms to the first byte), so threads beyond the cores keep requests in flight
/// while others decode (`docs/object-store.md`).
pub const REMOTE_THREADS: usize = 32;

/// "All cores" for reading `store`: the cores, and at least [`REMOTE_THREADS`] for a store in
/// object storage.
pub(crate) fn all_threads(store: &Path) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if crate::location::is_url(store) {
        cores.max(REMOTE_THREADS)
    } else {
        cores
    }
}

fn loader_error(msg: impl Into<String>) -> DatasetError {
    DatasetError::Loader(msg.into())
}

impl Loader {
    /// Open a loader on `store` (a folder, or a URL into object storage: [`crate::location`]),
    /// over the scenes of `regime` (all complete scenes of the store when `None`).
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
                "minimum valid fraction (data.min_valid) {} is not in 0–1",
                opts.min_valid
            )));
        }
        let weighted = resolve_levels(&reader, store, &opts.levels)?;
        let levels: Vec<Level> = weighted.iter().map(|(l, _)| *l).collect();
        let channels = resolve_channels(&reader, &opts.channels)?;
        let mut kinds: Vec<ArrayKind> = channels.iter().map(|c| c.kind).collect();
        if opts.labels {
            kinds.push(ArrayKind::Labels);
        }
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
            // Levels the regime's patch list does not cover at all.
            let listed_levels: Option<Vec<Level>> = regime
                .and_then(|r| r.patch_filter.as_ref())
                .map(|f| f.levels.clone());
            for (li, p) in patches.iter().enumerate() {
                if let (true, Some(r), Some(ls)) = (
                    p.is_empty() && weighted[li].1 > 0.0,
                    regime,
                    listed_levels.as_ref(),
                ) && !ls.contains(&levels[li])
                {
                    return Err(loader_error(format!(
                        "level {}: regime `{}` lists patches at {} only; draw it again with \
                         --levels covering {}, or give this level weight 0",
                        levels[li],
                        r.name,
                        ls.iter().map(|l| l.name()).collect::<Vec<_>>().join(", "),
                        levels[li]
                    )));
                }
                if p.is_empty() && weighted[li].1 > 0.0 {
                    // A patch's valid fraction is over its whole area: at a coarse level a
                    // scene smaller than one patch has none that passes, however valid its SAR.
                    let (h, w) = extents
                        .iter()
                        .map(|e| e[li])
                        .max_by_key(|&(h, w)| u64::from(h) * u64::from(w))
                        .unwrap_or((0, 0));
                    let small = if h < patch && w < patch {
                        format!(
                            " (the largest scene is {h} x {w} px there, inside one {patch}-px \
                             patch whose valid fraction counts its area outside the scene as \
                             invalid: a smaller `ingest --patch` fits such levels)"
                        )
                    } else {
                        String::new()
                    };
                    return Err(loader_error(format!(
                        "level {}: no {}patch of the {} scene(s) has at least {:.0} % valid \
                         SAR{small}; lower the minimum valid fraction (data.min_valid) or give \
                         this level weight 0",
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
            return Err(loader_error("every level has weight 0 (data.levels)"));
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
        let threads = match opts.threads {
            0 => all_threads(store),
            n => n,
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

    /// A line per drawn level at which some of the scenes the random samplers draw from are
    /// smaller than the crop along an edge: their windows reach past the scene, and that part
    /// is padding (no valid SAR, no label), which a patch's valid fraction does not see (it is
    /// the stored patch's). Empty for the sequential sampler, whose tiles are the scenes'.
    pub fn padding_notes(&self) -> Vec<String> {
        let i = &self.inner;
        if matches!(i.opts.sampler, Sampler::Sequential { .. }) {
            return Vec::new();
        }
        let crop = u64::from(i.crop);
        let mut notes = Vec::new();
        for (li, patches) in i.patches.iter().enumerate() {
            let below = if li == 0 { 0.0 } else { i.level_cum[li - 1] };
            if i.level_cum[li] <= below {
                continue; // weight 0: never drawn
            }
            let drawn: std::collections::BTreeSet<u32> = patches.iter().map(|p| p.scene).collect();
            let small: Vec<(u32, u32)> = drawn
                .iter()
                .map(|&s| i.extents[s as usize][li])
                .filter(|&(h, w)| h < i.crop || w < i.crop)
                .collect();
            // The smallest share of a window inside its scene.
            let Some(&(h, w)) = small
                .iter()
                .min_by_key(|(h, w)| u64::from(*h).min(crop) * u64::from(*w).min(crop))
            else {
                continue;
            };
            let inside = (u64::from(h).min(crop) * u64::from(w).min(crop)) as f64;
            let padded = 100.0 * (1.0 - inside / (crop * crop) as f64);
            notes.push(format!(
                "level {}: {} of the {} scenes drawn there are smaller than the {} px crop (the \
                 smallest {h} x {w} px): their windows are padded with no-data pixels, up to \
                 {padded:.0} % of a window; a smaller data.crop, or weight 0 for the level, \
                 avoids it",
                i.levels[li],
                small.len(),
                drawn.len(),
                i.crop
            ));
        }
        notes
    }

    /// The scenes, in regime order.
    pub fn scenes(&self) -> &[Arc<str>] {
        &self.inner.scenes
    }

    /// Crop edge in pixels.
    pub fn crop(&self) -> u32 {
        self.inner.crop
    }

    /// Threads the loader decodes on.
    pub fn threads(&self) -> usize {
        self.inner.pool.current_num_threads()
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
