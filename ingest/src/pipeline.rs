//! The ingest pipeline: scenes in parallel, each streamed in bands through a reader thread
//! (netCDF-C is single-threaded, so reading overlaps with resampling, compressing and writing).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use icefm_schemas::sigrid::MergeMode;
use icefm_schemas::store::{
    AUX_CHANNELS, GRID2KM_ARRAY, LABEL_CHANNELS, Level, SAR_CHANNELS, SCENES_GROUP, StoreAttrs,
};
use icefm_schemas::{IGNORE, Task};
use rayon::prelude::*;
use serde_json::{Map, Value, json};
use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

use crate::error::{IngestError, SceneError, StoreError};
use crate::labels::{NativeLabels, PolygonTable, count_classes, native_labels};
use crate::manifest::{
    CommittedScene, PatchRecord, PolygonRecord, SceneRecord, commit_scene, committed_scenes,
    merge_manifests, remove_scene_parts,
};
use crate::netcdf_thread::on_netcdf_thread;
use crate::reader::{Band, InputKind, SceneInfo, SceneReader, TiePoints};
use crate::resample::{ChunkRow, LevelAccumulator, Run, runs_of};
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
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            jobs: DEFAULT_JOBS,
            merge_mode: MergeMode::Sum,
            band_rows: None,
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
    /// Scenes in the manifests after the run.
    pub scenes_in_store: usize,
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
    let committed = committed_scenes(store_path)?;
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
    summary.scenes_in_store = merge_manifests(store_path)?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
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
        let checksum = file_checksum(path)
            .map_err(|e| SceneError::file(path, format!("cannot read ({e})")))?;
        if let Some(c) = self
            .committed
            .values()
            .find(|c| c.source_checksum == checksum)
        {
            return Ok(SceneOutcome::Skipped {
                scene_id: c.scene_id.clone(),
            });
        }
        let owned = path.to_path_buf();
        let reader = Arc::new(on_netcdf_thread(move || SceneReader::open(&owned))?);
        let info = reader.info().clone();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(c) = self.committed.get(&info.scene_id)
            && c.source_name != name
        {
            return Err(SceneError::file(
                path,
                format!(
                    "scene {} is already in the store from {}; one store holds one file per scene",
                    info.scene_id, c.source_name
                ),
            )
            .into());
        }
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
        let written = write_scene(&self.store, &reader, &self.options, |n| {
            reporter.rows_done(path, n)
        });
        // Close the file on the netCDF thread too.
        on_netcdf_thread(move || drop(reader));
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
            warnings: written.warnings,
        })
    }
}

/// What writing a scene produced besides its arrays.
struct Written {
    table: Option<PolygonTable>,
    polygon_pixels: Vec<u64>,
    class_pixels: [Vec<u64>; 3],
    valid_pixels: u64,
    level_shapes: Vec<(usize, usize)>,
    patches: Vec<PatchRecord>,
    unknown_count: u32,
    unknown_text: String,
    warnings: Vec<String>,
}

/// Continuous channels carried through the pyramid, in this order.
const CH_HH: usize = 0;
const CH_HV: usize = 1;
const CH_DIST: usize = 2;
const CH_LAND: usize = 3;
const CH_INC: usize = 4;

struct LevelOut {
    level: Level,
    acc: LevelAccumulator,
    sar: Array<FilesystemStore>,
    aux: Array<FilesystemStore>,
    labels: Array<FilesystemStore>,
    patches: Vec<PatchRecord>,
    error: Option<StoreError>,
}

fn scene_attrs(info: &SceneInfo) -> Map<String, Value> {
    let name = info
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let mut m = Map::new();
    m.insert("scene_id".into(), json!(info.scene_id));
    m.insert("ice_service".into(), json!(info.service));
    m.insert("acquired_us".into(), json!(info.acquired_us));
    m.insert("satellite".into(), json!(info.satellite));
    m.insert("source_name".into(), json!(name));
    m.insert("kind".into(), json!(info.kind.name()));
    m.insert("native_spacing_m".into(), json!(info.native_spacing_m));
    m.insert("native_shape".into(), json!([info.height, info.width]));
    m
}

fn write_scene(
    store: &Store,
    reader: &Arc<SceneReader>,
    options: &IngestOptions,
    progress: impl Fn(usize),
) -> Result<Written, IngestError> {
    let info = reader.info().clone();
    let path = info.path.clone();
    let zerr = |e: StoreError| IngestError::Store(e);
    let scene_node = format!("/{SCENES_GROUP}/{}", info.scene_id);
    store
        .write_group(&scene_node, scene_attrs(&info))
        .map_err(zerr)?;
    // 2 km grids, natively, with their pixel mapping.
    let g = &info.grid2km;
    let mut gattrs = Map::new();
    gattrs.insert("variables".into(), json!(g.variables));
    gattrs.insert("cell_size_m".into(), json!(2000));
    gattrs.insert(
        "native_pixels_per_cell".into(),
        json!(g.native_pixels_per_cell),
    );
    gattrs.insert(
        "pixel_mapping".into(),
        json!(format!(
            "cell (i, j) covers native pixels [{n}i, {n}i+{n}) x [{n}j, {n}j+{n}) of the {s} m SAR grid",
            n = g.native_pixels_per_cell,
            s = info.native_spacing_m
        )),
    );
    store
        .write_small_array(
            &format!("{scene_node}/{GRID2KM_ARRAY}"),
            [g.variables.len(), g.height, g.width],
            &g.data,
            gattrs,
        )
        .map_err(zerr)?;

    let channels = if info.kind == InputKind::Rtt { 5 } else { 4 };
    let patch = store.attrs.patch as usize;
    let mut levels = Vec::new();
    for &level in &store.attrs.levels {
        let ratio = f64::from(level.spacing_m()) / info.native_spacing_m;
        let acc = LevelAccumulator::new(info.height, info.width, ratio, channels, patch);
        let (h, w) = acc.shape();
        let node = format!("{scene_node}/{}", level.name());
        let mut la = Map::new();
        la.insert("spacing_m".into(), json!(level.spacing_m()));
        la.insert("ratio".into(), json!(ratio));
        la.insert("shape".into(), json!([h, w]));
        store.write_group(&node, la).map_err(zerr)?;
        let attrs = |units: &str| {
            let mut m = Map::new();
            m.insert("units".into(), json!(units));
            m
        };
        let sar = store
            .create_level_array(
                &format!("{node}/sar"),
                "sar_channel",
                &SAR_CHANNELS,
                h,
                w,
                true,
                attrs("dB"),
            )
            .map_err(zerr)?;
        let aux = store
            .create_level_array(
                &format!("{node}/aux"),
                "aux_channel",
                &AUX_CHANNELS,
                h,
                w,
                true,
                attrs("degrees, zone"),
            )
            .map_err(zerr)?;
        let labels = store
            .create_level_array(
                &format!("{node}/labels"),
                "task",
                &LABEL_CHANNELS,
                h,
                w,
                false,
                attrs("class"),
            )
            .map_err(zerr)?;
        levels.push(LevelOut {
            level,
            acc,
            sar,
            aux,
            labels,
            patches: Vec::new(),
            error: None,
        });
    }

    let table = (info.kind == InputKind::Raw && info.has_chart)
        .then(|| PolygonTable::new(&info.polygons, options.merge_mode));
    let mut polygon_pixels = vec![0u64; info.polygons.len()];
    let mut class_pixels: [Vec<u64>; 3] = Task::ALL.map(|t| vec![0u64; t.hist_len()]);
    let mut valid_pixels = 0u64;
    let (mut orphans, mut out_of_table) = (0u64, 0u64);

    let band_rows = options.band_rows.unwrap_or(info.band_rows).max(1);
    let (tx, rx) = crossbeam_channel::bounded::<Result<Band, SceneError>>(1);
    let height = info.height;
    std::thread::scope(|s| -> Result<(), IngestError> {
        let reader = Arc::clone(reader);
        s.spawn(move || {
            let mut row0 = 0;
            while row0 < height {
                let rows = band_rows.min(height - row0);
                let r = Arc::clone(&reader);
                let band = on_netcdf_thread(move || r.read_band(row0, rows));
                let failed = band.is_err();
                if tx.send(band).is_err() || failed {
                    break;
                }
                row0 += rows;
            }
        });
        for band in rx.iter() {
            let band = band?;
            let w = info.width;
            let nl = labels_parallel(&band, table.as_ref(), w);
            for (a, b) in polygon_pixels.iter_mut().zip(&nl.polygon_pixels) {
                *a += b;
            }
            orphans += nl.orphan_pixels;
            out_of_table += nl.out_of_table_pixels;
            count_classes(&nl.packed, &mut class_pixels);
            valid_pixels += band.hh.iter().filter(|v| !v.is_nan()).count() as u64;
            let land: Vec<f32> = band
                .distance
                .iter()
                .map(|&d| {
                    if d.is_nan() {
                        f32::NAN
                    } else if d <= 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let runs: Vec<Vec<Run>> = nl
                .packed
                .par_chunks(w)
                .map(|row| {
                    let mut r = Vec::new();
                    runs_of(row, &mut r);
                    r
                })
                .collect();
            let tie = info.tie_points.as_ref();
            levels.par_iter_mut().for_each(|lv| {
                if lv.error.is_some() {
                    return;
                }
                for (r, row_runs) in runs.iter().enumerate() {
                    let span = r * w..(r + 1) * w;
                    let mut vals: Vec<&[f32]> = vec![
                        &band.hh[span.clone()],
                        &band.hv[span.clone()],
                        &band.distance[span.clone()],
                        &land[span.clone()],
                    ];
                    if let Some(inc) = &band.incidence {
                        vals.push(&inc[span]);
                    }
                    lv.acc.push_row(band.row0 + r, &vals, row_runs);
                }
                flush_level(lv, tie, patch);
            });
            if let Some(e) = levels.iter_mut().find_map(|l| l.error.take()) {
                return Err(e.into());
            }
            progress(band.rows);
        }
        Ok(())
    })?;
    for lv in &mut levels {
        lv.acc.finish();
        flush_level(lv, info.tie_points.as_ref(), patch);
        if let Some(e) = lv.error.take() {
            return Err(e.into());
        }
    }
    if info.kind == InputKind::Raw
        && info.has_chart
        && polygon_pixels.iter().sum::<u64>() == 0
        && orphans == 0
    {
        // Not an error: a chart may be all land. Reported below via warnings if SAR is empty too.
    }
    if valid_pixels == 0 {
        return Err(SceneError::variable(
            &path,
            "nersc_sar_primary",
            "every pixel is invalid (no valid HH)",
        )
        .into());
    }
    let mut warnings = Vec::new();
    let mut unknown: Vec<String> = Vec::new();
    let mut unknown_count = 0u32;
    if let Some(t) = &table {
        for (code, d) in info.polygons.iter().zip(&t.derived) {
            for u in &d.unknown {
                unknown_count += 1;
                unknown.push(format!("polygon {}: {u}", code.poly_id));
            }
        }
    }
    if orphans > 0 {
        unknown_count += 1;
        unknown.push(format!(
            "{orphans} pixels with polygon ids not in polygon_codes"
        ));
    }
    if out_of_table > 0 {
        unknown_count += 1;
        unknown.push(format!(
            "{out_of_table} chart pixels with values in no class table"
        ));
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "{} code(s) outside the SIGRID-3 tables set to 255: {}",
            unknown_count,
            unknown.join("; ")
        ));
    }
    if !info.has_chart {
        warnings.push("no ice chart in the file: labels are all 255".into());
    }
    let level_shapes = levels.iter().map(|l| l.acc.shape()).collect();
    let patches = levels.into_iter().flat_map(|l| l.patches).collect();
    Ok(Written {
        table,
        polygon_pixels,
        class_pixels,
        valid_pixels,
        level_shapes,
        patches,
        unknown_count,
        unknown_text: unknown.join("; "),
        warnings,
    })
}

/// Native labels for a band, computed on all cores in row blocks.
fn labels_parallel(band: &Band, table: Option<&PolygonTable>, width: usize) -> NativeLabels {
    let block = 64usize;
    let parts: Vec<NativeLabels> = (0..band.rows.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let r0 = b * block;
            let r1 = ((b + 1) * block).min(band.rows);
            let sub = band.slice_rows(r0, r1, width);
            native_labels(&sub, table)
        })
        .collect();
    let mut out = NativeLabels {
        packed: Vec::with_capacity(band.rows * width),
        polygon_pixels: vec![0; table.map_or(0, |t| t.derived.len())],
        orphan_pixels: 0,
        out_of_table_pixels: 0,
    };
    for p in parts {
        out.packed.extend_from_slice(&p.packed);
        for (a, b) in out.polygon_pixels.iter_mut().zip(&p.polygon_pixels) {
            *a += b;
        }
        out.orphan_pixels += p.orphan_pixels;
        out.out_of_table_pixels += p.out_of_table_pixels;
    }
    out
}

fn flush_level(lv: &mut LevelOut, tie: Option<&TiePoints>, patch: usize) {
    for chunk in lv.acc.take_chunks() {
        if let Err(e) = store_chunk_row(lv, &chunk, tie, patch) {
            lv.error = Some(e);
            return;
        }
    }
}

fn store_chunk_row(
    lv: &mut LevelOut,
    chunk: &ChunkRow,
    tie: Option<&TiePoints>,
    p: usize,
) -> Result<(), StoreError> {
    let (h, w) = lv.acc.shape();
    let pw = lv.acc.padded_width();
    let plane = p * pw;
    let ratio = lv.acc_ratio();
    let idx = chunk.index as u64;
    let zerr = |e: zarrs::array::ArrayError| StoreError::zarr(lv.sar.path().as_str(), e);
    lv.sar
        .store_chunk(&[0, idx, 0], &chunk.values[..2 * plane])
        .map_err(zerr)?;
    let mut aux = vec![f32::NAN; 2 * plane];
    match tie {
        Some(t) => {
            for r in 0..chunk.rows {
                let y = (chunk.index * p + r) as f64;
                for x in 0..w {
                    if !chunk.values[r * pw + x].is_nan() {
                        aux[r * pw + x] = t
                            .incidence_at((y + 0.5) * ratio - 0.5, (x as f64 + 0.5) * ratio - 0.5)
                            as f32;
                    }
                }
            }
        }
        None => aux[..plane].copy_from_slice(&chunk.values[CH_INC * plane..(CH_INC + 1) * plane]),
    }
    aux[plane..].copy_from_slice(&chunk.values[CH_DIST * plane..(CH_DIST + 1) * plane]);
    lv.aux.store_chunk(&[0, idx, 0], &aux[..]).map_err(zerr)?;
    lv.labels
        .store_chunk(&[0, idx, 0], &chunk.labels[..])
        .map_err(zerr)?;
    // Patch statistics for the manifest.
    let name = lv.level.name();
    let y0 = chunk.index * p;
    for col in 0..pw / p {
        let x0 = col * p;
        let x1 = (x0 + p).min(w);
        if x0 >= w {
            break;
        }
        let mut valid = 0u32;
        let mut land = 0.0f64;
        let mut hist: [Vec<u32>; 3] = Task::ALL.map(|t| vec![0u32; t.hist_len()]);
        for r in 0..chunk.rows {
            let row = r * pw;
            for x in x0..x1 {
                if !chunk.values[CH_HH * plane + row + x].is_nan() {
                    valid += 1;
                }
                let l = chunk.values[CH_LAND * plane + row + x];
                if !l.is_nan() {
                    land += f64::from(l);
                }
            }
            for t in Task::ALL {
                let c = t.channel();
                for &v in &chunk.labels[c * plane + row + x0..c * plane + row + x1] {
                    hist[c][t.hist_bin(v)] += 1;
                }
            }
        }
        let area = (p * p) as f64;
        lv.patches.push(PatchRecord {
            level: name.clone(),
            row: chunk.index as u32,
            col: col as u32,
            y0: y0 as u32,
            x0: x0 as u32,
            height: chunk.rows.min(h - y0) as u32,
            width: (x1 - x0) as u32,
            valid_fraction: (f64::from(valid) / area) as f32,
            land_fraction: (land / area) as f32,
            hist,
        });
    }
    let _ = (CH_HV, IGNORE);
    Ok(())
}

impl LevelOut {
    fn acc_ratio(&self) -> f64 {
        self.acc.ratio()
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
