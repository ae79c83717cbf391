//! The ingest pipeline: scenes in parallel, each streamed in bands through a reader thread
//! (netCDF-C is single-threaded, so reading overlaps with resampling, compressing and writing).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use icefm_schemas::names::Release;
use icefm_schemas::sigrid::MergeMode;
use icefm_schemas::store::{Level, StoreAttrs};

use crate::claim::Claim;
use crate::error::{IngestError, SceneError, StoreError};
use crate::file_name;
use crate::manifest::{
    CommittedScene, PolygonRecord, SceneRecord, commit_scene, committed_scene, committed_scenes,
    merge_manifests, readable_committed_scenes, remove_scene_parts,
};
use crate::netcdf_thread::on_netcdf_thread;
use crate::reader::{SceneInfo, SceneReader, reference_file};
use crate::scene_writer::{Written, write_scene};
use crate::shard::{self, ShardPlan, ShardRecord};
use crate::store::Store;

/// Runtime knobs of an ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Scenes processed at once.
    pub jobs: usize,
    /// How equal partials merge (see [`MergeMode`]).
    pub merge_mode: MergeMode,
    /// Rows per band; `None` follows the file's chunking.
    pub band_rows: Option<usize>,
    /// More folders to look for test scenes' reference charts in (`<stem>_reference.nc`),
    /// after the scene file's own folder.
    pub reference_dirs: Vec<PathBuf>,
    /// This run is one shard of a sharded ingest: its inputs are the shard's share, and the
    /// merged manifests are rebuilt only once every shard has finished.
    pub shard: Option<ShardPlan>,
    /// Write the scenes again even where the store holds them from the same file (a scene
    /// whose chunks a read found damaged); by default those are skipped.
    pub redo: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            jobs: DEFAULT_JOBS,
            merge_mode: MergeMode::Sum,
            band_rows: None,
            reference_dirs: Vec::new(),
            shard: None,
            redo: false,
        }
    }
}

/// Default number of scenes processed at once.
pub const DEFAULT_JOBS: usize = 2;

/// Progress callbacks; the binary draws bars from them, libraries and tests ignore them.
pub trait Reporter: Sync {
    /// A scene starts (`rows` native rows to read).
    fn scene_started(&self, _path: &Path, _rows: usize) {}
    /// `rows` more native rows of a scene were processed.
    fn rows_done(&self, _path: &Path, _rows: usize) {}
    /// A scene ended.
    fn scene_finished(&self, _path: &Path, _outcome: &SceneOutcome) {}
}

/// A reporter that reports nothing.
pub struct NoReporter;
impl Reporter for NoReporter {}

/// How one input ended.
#[derive(Debug)]
pub enum SceneOutcome {
    /// Ingested.
    Done {
        /// Scene id.
        scene_id: String,
        /// Native pixels.
        pixels: u64,
        /// Input bytes.
        bytes: u64,
        /// Warnings (unknown codes, orphan polygon ids).
        warnings: Vec<String>,
    },
    /// Already complete with the same checksum.
    Skipped {
        /// Scene id.
        scene_id: String,
    },
    /// Failed; the store is unchanged for this scene.
    Failed(IngestError),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Scenes ingested.
    pub done: Vec<String>,
    /// Scenes skipped as complete.
    pub skipped: Vec<String>,
    /// Inputs that failed, with the one-line reason.
    pub failed: Vec<(PathBuf, String)>,
    /// Warnings per scene.
    pub warnings: Vec<(String, String)>,
    /// Native pixels ingested.
    pub pixels: u64,
    /// Input bytes ingested.
    pub bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Complete scenes in the store after the run: those of the merged manifests, unless a
    /// sharded run still waits for other shards (`shard.waiting_for`).
    pub scenes_in_store: usize,
    /// How a sharded run ended.
    pub shard: Option<ShardOutcome>,
}

/// The end of one shard's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOutcome {
    /// The run's plan.
    pub plan: ShardPlan,
    /// Shards of the run that have not finished (empty: this shard merged the manifests).
    pub waiting_for: Vec<usize>,
    /// Shards with `N` records whose inputs were other files: an older run's, or shards of
    /// this run given other files (every shard must be given the same inputs).
    pub other_inputs: Vec<usize>,
}

/// Ingest `inputs` into the store at `store_path` (created with `attrs` if new).
pub fn ingest(
    inputs: &[PathBuf],
    store_path: &Path,
    attrs: StoreAttrs,
    options: &IngestOptions,
    reporter: &dyn Reporter,
) -> Result<Summary, StoreError> {
    let start = Instant::now();
    let store = Store::open_or_create(store_path, attrs)?;
    if let Some(plan) = &options.shard {
        // Until this run ends, this shard has not finished.
        shard::remove_record(store_path, plan.shard)?;
    }
    // A scene whose committed part is damaged is not skipped: given again, it is written again.
    let (committed, _) = readable_committed_scenes(store_path)?;
    let state = RunState {
        store,
        options: options.clone(),
        committed: committed
            .into_iter()
            .map(|c| (c.scene_id.clone(), c))
            .collect(),
        claimed: Mutex::new(HashMap::new()),
    };
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<(usize, SceneOutcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..options.jobs.max(1).min(inputs.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(path) = inputs.get(i) else { break };
                    let outcome = state.scene(path, reporter);
                    reporter.scene_finished(path, &outcome);
                    if let Ok(mut o) = outcomes.lock() {
                        o.push((i, outcome));
                    }
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap_or_default();
    outcomes.sort_by_key(|(i, _)| *i);
    let mut summary = Summary::default();
    for (i, o) in outcomes {
        match o {
            SceneOutcome::Done {
                scene_id,
                pixels,
                bytes,
                warnings,
            } => {
                summary.pixels += pixels;
                summary.bytes += bytes;
                summary
                    .warnings
                    .extend(warnings.into_iter().map(|w| (scene_id.clone(), w)));
                summary.done.push(scene_id);
            }
            SceneOutcome::Skipped { scene_id } => summary.skipped.push(scene_id),
            SceneOutcome::Failed(e) => summary.failed.push((inputs[i].clone(), e.to_string())),
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    match &options.shard {
        None => summary.scenes_in_store = merge_manifests(store_path)?,
        Some(plan) => {
            let outcome = end_shard(store_path, plan, inputs, &summary)?;
            summary.scenes_in_store = if outcome.waiting_for.is_empty() {
                merge_manifests(store_path)?
            } else {
                committed_scenes(store_path)?.len()
            };
            summary.shard = Some(outcome);
        }
    }
    Ok(summary)
}

/// Write a shard's record, then see whether it was the last of its run.
fn end_shard(
    store: &Path,
    plan: &ShardPlan,
    inputs: &[PathBuf],
    summary: &Summary,
) -> Result<ShardOutcome, StoreError> {
    shard::write_record(
        store,
        &ShardRecord {
            shard: plan.shard.index,
            of: plan.shard.count,
            inputs_digest: plan.digest.clone(),
            inputs_total: plan.total,
            assigned: inputs.iter().map(|p| file_name(p)).collect(),
            done: summary.done.clone(),
            skipped: summary.skipped.clone(),
            failed: summary
                .failed
                .iter()
                .map(|(p, why)| (file_name(p), why.clone()))
                .collect(),
            seconds: summary.seconds,
        },
    )?;
    let runs = shard::shard_runs(store)?;
    let same_count = runs.iter().filter(|r| r.of == plan.shard.count);
    let (mine, others): (Vec<_>, Vec<_>) = same_count.partition(|r| r.digest == plan.digest);
    let waiting_for = mine
        .first()
        .map(|r| r.missing.clone())
        .unwrap_or_else(|| (0..plan.shard.count).collect());
    let mut other_inputs: Vec<usize> = others.iter().flat_map(|r| r.finished.clone()).collect();
    other_inputs.sort_unstable();
    Ok(ShardOutcome {
        plan: plan.clone(),
        waiting_for,
        other_inputs,
    })
}

/// BLAKE3 of a file, hex.
pub fn file_checksum(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

struct RunState {
    store: Store,
    options: IngestOptions,
    committed: HashMap<String, CommittedScene>,
    /// Scene ids taken by inputs of this run → their file.
    claimed: Mutex<HashMap<String, PathBuf>>,
}

impl RunState {
    fn scene(&self, path: &Path, reporter: &dyn Reporter) -> SceneOutcome {
        match self.try_scene(path, reporter) {
            Ok(o) => o,
            Err(e) => SceneOutcome::Failed(e),
        }
    }

    fn try_scene(&self, path: &Path, reporter: &dyn Reporter) -> Result<SceneOutcome, IngestError> {
        let size = std::fs::metadata(path)
            .map_err(|e| SceneError::file(path, format!("cannot read ({e})")))?
            .len();
        let mut checksum = file_checksum(path)
            .map_err(|e| SceneError::file(path, format!("cannot read ({e})")))?;
        // A test scene's charts are part of its source: a reference added or changed later
        // makes the scene new again.
        let reference = reference_file(path, &self.options.reference_dirs);
        if let Some(r) = &reference {
            let sum =
                file_checksum(r).map_err(|e| SceneError::file(r, format!("cannot read ({e})")))?;
            checksum = blake3::hash(format!("{checksum}+{sum}").as_bytes())
                .to_hex()
                .to_string();
        }
        if let Some(c) = self
            .committed
            .values()
            .find(|c| c.source_checksum == checksum)
            .filter(|_| !self.options.redo)
        {
            return Ok(SceneOutcome::Skipped {
                scene_id: c.scene_id.clone(),
            });
        }
        let owned = path.to_path_buf();
        let reader = Arc::new(on_netcdf_thread(move || {
            SceneReader::open_with_reference(&owned, reference.as_deref())
        })?);
        let outcome = self.write(path, size, checksum, &reader, reporter);
        // Close the file on the netCDF thread too, however the scene ended.
        on_netcdf_thread(move || drop(reader));
        outcome
    }

    /// The rest of a scene once its file is open.
    fn write(
        &self,
        path: &Path,
        size: u64,
        checksum: String,
        reader: &Arc<SceneReader>,
        reporter: &dyn Reporter,
    ) -> Result<SceneOutcome, IngestError> {
        let info = reader.info().clone();
        let name = file_name(path);
        {
            let mut claimed = self
                .claimed
                .lock()
                .map_err(|_| SceneError::file(path, "internal lock poisoned"))?;
            if let Some(other) = claimed.get(&info.scene_id) {
                return Err(SceneError::file(
                    path,
                    format!(
                        "scene {} is also given as {}",
                        info.scene_id,
                        other.display()
                    ),
                )
                .into());
            }
            claimed.insert(info.scene_id.clone(), path.to_path_buf());
        }
        // Held until the scene is committed or has failed: no other process writes it meanwhile.
        let _claim = Claim::take(&self.store.path, &info.scene_id, path)?;
        // The same file (by content) committed under another id: a copy under another name, which
        // would be a second scene of the same data.
        if let Some(c) = self
            .committed
            .values()
            .find(|c| c.source_checksum == checksum && c.scene_id != info.scene_id)
        {
            return Err(SceneError::file(
                path,
                format!(
                    "this file is already in the store as scene {} (from {}); one store holds \
                     each file once. To write that scene again, give the file under its \
                     recorded name with --redo",
                    c.scene_id, c.source_name
                ),
            )
            .into());
        }
        // What is committed now, not when this run started: another process may have written it.
        // A committed scene part that no longer parses is damage: the scene is written again.
        let mut warnings = Vec::new();
        let committed = match committed_scene(&self.store.path, &info.scene_id) {
            Err(e @ StoreError::Parquet { .. }) => {
                warnings.push(format!(
                    "its committed record could not be read ({e}); the scene is written again"
                ));
                None
            }
            other => other?,
        };
        if let Some(c) = committed {
            if c.source_name != name {
                return Err(SceneError::file(
                    path,
                    format!(
                        "scene {} is already in the store from {}; one store holds one file per scene",
                        info.scene_id, c.source_name
                    ),
                )
                .into());
            }
            if c.source_checksum == checksum && !self.options.redo {
                return Ok(SceneOutcome::Skipped {
                    scene_id: c.scene_id,
                });
            }
        }
        for level in &self.store.attrs.levels {
            if f64::from(level.spacing_m()) < info.native_spacing_m - 1e-9 {
                return Err(SceneError::file(
                    path,
                    format!(
                        "level {} is finer than the scene's native {} m grid",
                        level.name(),
                        info.native_spacing_m
                    ),
                )
                .into());
            }
        }
        // Un-commit an older version of this scene (changed source), remove any partial write.
        remove_scene_parts(&self.store.path, &info.scene_id)?;
        let dir = self.store.scene_dir(&info.scene_id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        reporter.scene_started(path, info.height);
        let written = write_scene(&self.store, reader, &self.options, |n| {
            reporter.rows_done(path, n)
        });
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                // Leave nothing a reader could take for a scene.
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let record = scene_record(
            &info,
            &name,
            size,
            checksum,
            &written,
            &self.store.attrs.levels,
        );
        let polygons = polygon_records(&info, &written);
        commit_scene(&self.store.path, &record, &polygons, &written.patches)?;
        Ok(SceneOutcome::Done {
            scene_id: info.scene_id.clone(),
            pixels: (info.height * info.width) as u64,
            bytes: size,
            warnings: warnings.into_iter().chain(written.warnings).collect(),
        })
    }
}

fn scene_record(
    info: &SceneInfo,
    name: &str,
    size: u64,
    checksum: String,
    w: &Written,
    levels: &[Level],
) -> SceneRecord {
    SceneRecord {
        scene_id: info.scene_id.clone(),
        ice_service: info.service.clone(),
        acquired_us: info.acquired_us,
        satellite: info.satellite.clone(),
        source_name: name.to_string(),
        source_size: size,
        source_checksum: checksum,
        kind: info.kind.name().to_string(),
        native_spacing_m: info.native_spacing_m,
        height: info.height as u32,
        width: info.width as u32,
        levels: levels.iter().map(|l| l.name()).collect(),
        level_heights: w.level_shapes.iter().map(|s| s.0 as u32).collect(),
        level_widths: w.level_shapes.iter().map(|s| s.1 as u32).collect(),
        grid2km_height: info.grid2km.height as u32,
        grid2km_width: info.grid2km.width as u32,
        valid_pixels: w.valid_pixels,
        polygons: info.polygons.len() as u32,
        unknown_code_count: w.unknown_count,
        unknown_codes: w.unknown_text.clone(),
        class_pixels: w.class_pixels.clone(),
        release: release_of(info),
        footprint: match &info.geolocation {
            Ok(Some(g)) => g.footprint(info.height, info.width),
            _ => None,
        },
    }
}

/// The release of a scene: test for the AutoICE test scenes, for charts read from a test
/// release's reference file, and for a scene without charts of its own (the raw test release
/// has none); train otherwise.
fn release_of(info: &SceneInfo) -> Release {
    if info.reference.is_some() || !info.has_chart {
        Release::Test
    } else {
        Release::of_id(&info.scene_id)
    }
}

fn polygon_records(info: &SceneInfo, w: &Written) -> Vec<PolygonRecord> {
    let Some(t) = &w.table else { return Vec::new() };
    info.polygons
        .iter()
        .zip(&t.derived)
        .zip(&w.polygon_pixels)
        .map(|((c, d), &px)| PolygonRecord {
            poly_id: c.poly_id,
            fields: c.raw[1..].to_vec(),
            sic: d.sic,
            sod: d.sod,
            floe: d.floe,
            pixels: px,
            unknown_codes: d
                .unknown
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        })
        .collect()
}
