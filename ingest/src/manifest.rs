//! Parquet manifests: per-scene parts (the commit record of a complete scene) and their merge.
//!
//! A scene's rows are written to `manifests/parts/<id>.{polygons,patches,scene}.parquet`, each
//! through a temporary file and a rename; the `scene` part goes last and is what marks the scene
//! complete. `manifests/{scenes,polygons,patches}.parquet` are rebuilt from the committed parts in
//! scene-id order, so an interrupted and resumed run writes the same files as one that was not.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::builder::{
    FixedSizeListBuilder, Float32Builder, Float64Builder, ListBuilder, StringBuilder,
    TimestampMicrosecondBuilder, UInt8Builder, UInt32Builder, UInt64Builder,
};
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::Schema;

use crate::geo::Footprint;
use icefm_schemas::Task;
use icefm_schemas::manifest::{
    FOOTPRINT_COLUMNS, MERGE_STAMP_KEY, MergeStamp, PART_KINDS, PATCHES_FILE, POLYGONS_FILE,
    RELEASE_COLUMN, SCENES_FILE, patches_schema, polygons_schema, scenes_schema,
};
use icefm_schemas::names::Release;
use icefm_schemas::store::{MANIFESTS_DIR, PARTS_DIR};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::StoreError;

/// One row of `scenes.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneRecord {
    /// Scene id.
    pub scene_id: String,
    /// Ice service.
    pub ice_service: Option<String>,
    /// Acquisition start (µs, UTC).
    pub acquired_us: Option<i64>,
    /// Satellite.
    pub satellite: Option<String>,
    /// Source file name (no directory).
    pub source_name: String,
    /// Source size in bytes.
    pub source_size: u64,
    /// BLAKE3 of the source file, hex.
    pub source_checksum: String,
    /// `raw` / `rtt`.
    pub kind: String,
    /// Native spacing (m).
    pub native_spacing_m: f64,
    /// Native rows.
    pub height: u32,
    /// Native columns.
    pub width: u32,
    /// Level names.
    pub levels: Vec<String>,
    /// Level rows.
    pub level_heights: Vec<u32>,
    /// Level columns.
    pub level_widths: Vec<u32>,
    /// 2 km grid rows.
    pub grid2km_height: u32,
    /// 2 km grid columns.
    pub grid2km_width: u32,
    /// Native pixels with valid HH.
    pub valid_pixels: u64,
    /// Polygons in the code table.
    pub polygons: u32,
    /// Codes found in no table (count of occurrences) plus orphan ids / out-of-table chart values.
    pub unknown_code_count: u32,
    /// Human-readable list of those codes.
    pub unknown_codes: String,
    /// Native class pixel counts per task (classes, then 255).
    pub class_pixels: [Vec<u64>; 3],
    /// The release the scene belongs to.
    pub release: Release,
    /// Where the scene lies; `None` where its file has no latitude and longitude.
    pub footprint: Option<Footprint>,
}

/// One row of `polygons.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolygonRecord {
    /// Polygon id.
    pub poly_id: i64,
    /// The 14 SIGRID fields after `poly_id`, as read.
    pub fields: Vec<String>,
    /// Derived SIC.
    pub sic: u8,
    /// Derived SOD.
    pub sod: u8,
    /// Derived FLOE.
    pub floe: u8,
    /// Native pixels of the polygon.
    pub pixels: u64,
    /// Codes in no table.
    pub unknown_codes: String,
}

/// One row of `patches.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchRecord {
    /// Level name.
    pub level: String,
    /// Chunk row.
    pub row: u32,
    /// Chunk column.
    pub col: u32,
    /// First level row.
    pub y0: u32,
    /// First level column.
    pub x0: u32,
    /// Rows inside the array.
    pub height: u32,
    /// Columns inside the array.
    pub width: u32,
    /// Valid-HH cells / P².
    pub valid_fraction: f32,
    /// Land share of the patch (area-weighted, over P²).
    pub land_fraction: f32,
    /// Label histograms per task (classes, then 255), cells inside the array.
    pub hist: [Vec<u32>; 3],
}

fn props(stamp: Option<&str>) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(
            stamp.map(|s| vec![KeyValue::new(MERGE_STAMP_KEY.to_string(), s.to_string())]),
        )
        .build()
}

fn fixed_list_u64(values: &[&[u64]], n: i32) -> ArrayRef {
    let mut b = FixedSizeListBuilder::new(UInt64Builder::new(), n).with_field(Arc::new(
        arrow_schema::Field::new("item", arrow_schema::DataType::UInt64, false),
    ));
    for v in values {
        b.values().append_slice(v);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn fixed_list_u32(values: &[&[u32]], n: i32) -> ArrayRef {
    let mut b = FixedSizeListBuilder::new(UInt32Builder::new(), n).with_field(Arc::new(
        arrow_schema::Field::new("item", arrow_schema::DataType::UInt32, false),
    ));
    for v in values {
        b.values().append_slice(v);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn non_null_item<T: arrow_array::builder::ArrayBuilder>(
    b: ListBuilder<T>,
    dt: arrow_schema::DataType,
) -> ListBuilder<T> {
    b.with_field(Arc::new(arrow_schema::Field::new("item", dt, false)))
}

/// Build the scenes batch.
pub fn scenes_batch(rows: &[SceneRecord]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let s = |f: fn(&SceneRecord) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let mut acquired = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut size = UInt64Builder::new();
    let mut spacing = Float64Builder::new();
    let (mut h, mut w, mut gh, mut gw, mut np, mut uc) = (
        UInt32Builder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
    );
    let mut valid = UInt64Builder::new();
    let mut levels = non_null_item(
        ListBuilder::new(StringBuilder::new()),
        arrow_schema::DataType::Utf8,
    );
    let mut lh = non_null_item(
        ListBuilder::new(UInt32Builder::new()),
        arrow_schema::DataType::UInt32,
    );
    let mut lw = non_null_item(
        ListBuilder::new(UInt32Builder::new()),
        arrow_schema::DataType::UInt32,
    );
    for r in rows {
        acquired.append_option(r.acquired_us);
        size.append_value(r.source_size);
        spacing.append_value(r.native_spacing_m);
        h.append_value(r.height);
        w.append_value(r.width);
        gh.append_value(r.grid2km_height);
        gw.append_value(r.grid2km_width);
        valid.append_value(r.valid_pixels);
        np.append_value(r.polygons);
        uc.append_value(r.unknown_code_count);
        for l in &r.levels {
            levels.values().append_value(l);
        }
        levels.append(true);
        lh.values().append_slice(&r.level_heights);
        lh.append(true);
        lw.values().append_slice(&r.level_widths);
        lw.append(true);
    }
    let mut cols: Vec<ArrayRef> = vec![
        s(|r| Some(&r.scene_id)),
        s(|r| r.ice_service.as_deref()),
        Arc::new(acquired.finish()),
        s(|r| r.satellite.as_deref()),
        s(|r| Some(&r.source_name)),
        Arc::new(size.finish()),
        s(|r| Some(&r.source_checksum)),
        s(|r| Some(&r.kind)),
        Arc::new(spacing.finish()),
        Arc::new(h.finish()),
        Arc::new(w.finish()),
        Arc::new(levels.finish()),
        Arc::new(lh.finish()),
        Arc::new(lw.finish()),
        Arc::new(gh.finish()),
        Arc::new(gw.finish()),
        Arc::new(valid.finish()),
        Arc::new(np.finish()),
        Arc::new(uc.finish()),
        s(|r| Some(&r.unknown_codes)),
    ];
    for t in Task::ALL {
        let v: Vec<&[u64]> = rows
            .iter()
            .map(|r| r.class_pixels[t.channel()].as_slice())
            .collect();
        cols.push(fixed_list_u64(&v, t.hist_len() as i32));
    }
    cols.push(s(|r| Some(r.release.name())));
    let corners: [fn(&Footprint) -> f64; 6] = [
        |f| f.centre_latitude,
        |f| f.centre_longitude,
        |f| f.min_latitude,
        |f| f.max_latitude,
        |f| f.west_longitude,
        |f| f.east_longitude,
    ];
    for get in corners {
        let values: Float64Array = rows.iter().map(|r| r.footprint.as_ref().map(get)).collect();
        cols.push(Arc::new(values));
    }
    RecordBatch::try_new(Arc::new(scenes_schema()), cols)
}

/// A scene part as the current scenes schema has it: parts committed before the `release`
/// column get it from their records ([`Release::of_record`]: the id, and whether the scene has
/// a labelled pixel); parts committed before the footprint columns get nulls there (their
/// files' tie points were not read; `ingest --redo` reads them).
fn current_scene_part(path: &Path, batch: RecordBatch) -> Result<RecordBatch, StoreError> {
    if batch.column_by_name(FOOTPRINT_COLUMNS[0]).is_some() {
        return Ok(batch);
    }
    let batch = with_release(path, batch)?;
    let rows = batch.num_rows();
    let mut cols = batch.columns().to_vec();
    for _ in FOOTPRINT_COLUMNS {
        cols.push(Arc::new(Float64Array::new_null(rows)));
    }
    RecordBatch::try_new(Arc::new(scenes_schema()), cols).map_err(|e| StoreError::parquet(path, e))
}

/// A scene part with the `release` column, as [`current_scene_part`] (which adds the columns
/// after it).
fn with_release(path: &Path, batch: RecordBatch) -> Result<RecordBatch, StoreError> {
    if batch.column_by_name(RELEASE_COLUMN).is_some() {
        return Ok(batch);
    }
    let ids = batch
        .column_by_name("scene_id")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| StoreError::parquet(path, "no string column scene_id"))?;
    let sic = icefm_schemas::manifest::hist_column(Task::Sic, "pixels");
    let hist = batch
        .column_by_name(&sic)
        .and_then(|c| c.as_any().downcast_ref::<arrow_array::FixedSizeListArray>())
        .ok_or_else(|| StoreError::parquet(path, format!("no column {sic}")))?;
    let release: StringArray = (0..batch.num_rows())
        .map(|i| {
            let counts = hist.value(i);
            let counts = counts.as_any().downcast_ref::<UInt64Array>()?;
            Some(Release::of_record(ids.value(i), counts.values()).name())
        })
        .collect();
    let mut cols = batch.columns().to_vec();
    cols.push(Arc::new(release));
    let mut fields: Vec<_> = batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(
        scenes_schema()
            .field_with_name(RELEASE_COLUMN)
            .map_err(|e| StoreError::parquet(path, e))?
            .clone(),
    ));
    RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), cols)
        .map_err(|e| StoreError::parquet(path, e))
}

/// Build the polygons batch of one scene.
pub fn polygons_batch(
    scene_id: &str,
    rows: &[PolygonRecord],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![scene_id; rows.len()])),
        Arc::new(
            rows.iter()
                .map(|r| r.poly_id)
                .collect::<arrow_array::Int64Array>(),
        ),
    ];
    for f in 0..14 {
        cols.push(Arc::new(
            rows.iter()
                .map(|r| Some(r.fields[f].as_str()))
                .collect::<StringArray>(),
        ));
    }
    let mut sic = UInt8Builder::new();
    let mut sod = UInt8Builder::new();
    let mut floe = UInt8Builder::new();
    let mut px = UInt64Builder::new();
    for r in rows {
        sic.append_value(r.sic);
        sod.append_value(r.sod);
        floe.append_value(r.floe);
        px.append_value(r.pixels);
    }
    cols.extend([
        Arc::new(sic.finish()) as ArrayRef,
        Arc::new(sod.finish()),
        Arc::new(floe.finish()),
        Arc::new(px.finish()),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.unknown_codes.as_str()))
                .collect::<StringArray>(),
        ),
    ]);
    RecordBatch::try_new(Arc::new(polygons_schema()), cols)
}

/// Build the patches batch of one scene.
pub fn patches_batch(
    scene_id: &str,
    rows: &[PatchRecord],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let u32s = |f: fn(&PatchRecord) -> u32| -> ArrayRef {
        Arc::new(
            rows.iter()
                .map(|r| Some(f(r)))
                .collect::<arrow_array::UInt32Array>(),
        )
    };
    let mut vf = Float32Builder::new();
    let mut lf = Float32Builder::new();
    for r in rows {
        vf.append_value(r.valid_fraction);
        lf.append_value(r.land_fraction);
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![scene_id; rows.len()])),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.level.as_str()))
                .collect::<StringArray>(),
        ),
        u32s(|r| r.row),
        u32s(|r| r.col),
        u32s(|r| r.y0),
        u32s(|r| r.x0),
        u32s(|r| r.height),
        u32s(|r| r.width),
        Arc::new(vf.finish()),
        Arc::new(lf.finish()),
    ];
    for t in Task::ALL {
        let v: Vec<&[u32]> = rows
            .iter()
            .map(|r| r.hist[t.channel()].as_slice())
            .collect();
        cols.push(fixed_list_u32(&v, t.hist_len() as i32));
    }
    RecordBatch::try_new(Arc::new(patches_schema()), cols)
}

/// A temporary file beside `path` for an atomic write, unique to this process and write: several
/// processes may write the same file (the merged manifests of a sharded ingest) at once.
pub fn temporary_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        "{name}.{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Write batches to `path` atomically (temporary file, fsync, rename).
pub fn write_parquet(
    path: &Path,
    schema: &Schema,
    batches: &[RecordBatch],
) -> Result<(), StoreError> {
    write_stamped(path, schema, batches, None)
}

/// [`write_parquet`], the footer stamped with a merge's [`MERGE_STAMP_KEY`].
fn write_stamped(
    path: &Path,
    schema: &Schema,
    batches: &[RecordBatch],
    stamp: Option<&str>,
) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let tmp = temporary_path(path);
    let file = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    let mut w = ArrowWriter::try_new(file, Arc::new(schema.clone()), Some(props(stamp)))
        .map_err(|e| StoreError::parquet(path, e))?;
    for b in batches {
        w.write(b).map_err(|e| StoreError::parquet(path, e))?;
    }
    let file = w.into_inner().map_err(|e| StoreError::parquet(path, e))?;
    file.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))
}

/// Read every batch of a Parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>, StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    parquet_batches(path, file)
}

/// Every batch of the Parquet file `path` as read through `input`.
fn parquet_batches<R: parquet::file::reader::ChunkReader + 'static>(
    path: &Path,
    input: R,
) -> Result<Vec<RecordBatch>, StoreError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(input)
        .map_err(|e| StoreError::parquet(path, e))?
        .build()
        .map_err(|e| StoreError::parquet(path, e))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::parquet(path, e))
}

/// Paths of a scene's parts: (polygons, patches, scene).
pub fn part_paths(store: &Path, scene_id: &str) -> [PathBuf; 3] {
    let d = store.join(PARTS_DIR);
    PART_KINDS.map(|kind| d.join(format!("{scene_id}.{kind}.parquet")))
}

/// Commit a scene: polygons and patches first, the scene row last.
pub fn commit_scene(
    store: &Path,
    scene: &SceneRecord,
    polygons: &[PolygonRecord],
    patches: &[PatchRecord],
) -> Result<(), StoreError> {
    let [pp, pa, ps] = part_paths(store, &scene.scene_id);
    let b = polygons_batch(&scene.scene_id, polygons).map_err(|e| StoreError::parquet(&pp, e))?;
    write_parquet(&pp, &polygons_schema(), &[b])?;
    let b = patches_batch(&scene.scene_id, patches).map_err(|e| StoreError::parquet(&pa, e))?;
    write_parquet(&pa, &patches_schema(), &[b])?;
    let b = scenes_batch(std::slice::from_ref(scene)).map_err(|e| StoreError::parquet(&ps, e))?;
    write_parquet(&ps, &scenes_schema(), &[b])
}

/// Remove a scene's parts (un-commit), scene row first.
pub fn remove_scene_parts(store: &Path, scene_id: &str) -> Result<(), StoreError> {
    let [pp, pa, ps] = part_paths(store, scene_id);
    for p in [ps, pp, pa] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&p, e)),
        }
    }
    Ok(())
}

/// What identifies a committed scene for the skip check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedScene {
    /// Scene id.
    pub scene_id: String,
    /// Source file name.
    pub source_name: String,
    /// Source size.
    pub source_size: u64,
    /// Source checksum.
    pub source_checksum: String,
}

/// Every committed scene of the store, sorted by id. Err if a scene's part cannot be read.
pub fn committed_scenes(store: &Path) -> Result<Vec<CommittedScene>, StoreError> {
    let (scenes, mut damaged) = readable_committed_scenes(store)?;
    match damaged.pop() {
        Some(e) => Err(e),
        None => Ok(scenes),
    }
}

/// The committed scenes of the store whose scene part can be read, sorted by id, and the errors
/// of those that cannot (a damaged part: Parquet that does not parse).
pub fn readable_committed_scenes(
    store: &Path,
) -> Result<(Vec<CommittedScene>, Vec<StoreError>), StoreError> {
    let dir = store.join(PARTS_DIR);
    let mut out = Vec::new();
    let mut damaged = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((out, damaged)),
        Err(e) => return Err(StoreError::io(&dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| StoreError::io(&dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".scene.parquet") {
            match read_committed(&path) {
                Ok(c) => out.extend(c),
                Err(e @ StoreError::Parquet { .. }) => damaged.push(e),
                Err(e) => return Err(e),
            }
        }
    }
    out.sort_by(|a, b| a.scene_id.cmp(&b.scene_id));
    Ok((out, damaged))
}

/// The committed scene `scene_id` as it is on disk now (`None` if it is not committed).
pub fn committed_scene(store: &Path, scene_id: &str) -> Result<Option<CommittedScene>, StoreError> {
    let [_, _, path] = part_paths(store, scene_id);
    if !path.exists() {
        return Ok(None);
    }
    Ok(read_committed(&path)?.into_iter().next())
}

fn read_committed(path: &Path) -> Result<Vec<CommittedScene>, StoreError> {
    let mut out = Vec::new();
    for b in read_parquet(path)? {
        let col = |n: &str| -> Result<&StringArray, StoreError> {
            b.column_by_name(n)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| StoreError::parquet(path, format!("no string column {n}")))
        };
        let size = b
            .column_by_name("source_size")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .ok_or_else(|| StoreError::parquet(path, "no source_size column"))?;
        let (id, name, sum) = (
            col("scene_id")?,
            col("source_name")?,
            col("source_checksum")?,
        );
        for i in 0..b.num_rows() {
            out.push(CommittedScene {
                scene_id: id.value(i).to_string(),
                source_name: name.value(i).to_string(),
                source_size: size.value(i),
                source_checksum: sum.value(i).to_string(),
            });
        }
    }
    Ok(out)
}

/// Temporary files older than this in `manifests/` and `manifests/parts/` are left by killed
/// writers: a manifest is written in seconds. (Their process ids cannot tell: the store may be
/// shared by the nodes of a sharded ingest.)
pub const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Remove the temporary files (`….tmp`) of `dir` older than [`STALE_TEMPORARY`].
fn sweep_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMPORARY);
        if old && e.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Rebuild `manifests/{scenes,polygons,patches}.parquet` from the committed parts, removing
/// temporary files that killed writers left there.
pub fn merge_manifests(store: &Path) -> Result<usize, StoreError> {
    let dir = store.join(MANIFESTS_DIR);
    sweep_stale_temporaries(&dir);
    sweep_stale_temporaries(&store.join(PARTS_DIR));
    let scenes = committed_scenes(store)?;
    let mut by_kind: [Vec<RecordBatch>; 3] = Default::default();
    // The stamp of this merge, in all three files: what they were built from.
    let mut stamp = MergeStamp::default();
    for s in &scenes {
        let parts = part_paths(store, &s.scene_id);
        // parts = [polygons, patches, scene]; output order = [scenes, polygons, patches].
        for (slot, part) in [(1, &parts[0]), (2, &parts[1]), (0, &parts[2])] {
            let bytes = std::fs::read(part).map_err(|e| StoreError::io(part, e))?;
            stamp.add_part(&bytes);
            let batches = parquet_batches(part, bytes::Bytes::from(bytes))?;
            if slot == 0 {
                for b in batches {
                    by_kind[0].push(current_scene_part(part, b)?);
                }
            } else {
                by_kind[slot].extend(batches);
            }
        }
    }
    let stamp = stamp.finish();
    let stamp = Some(stamp.as_str());
    let [s, p, q] = by_kind;
    // Renamed one after another: a merge stopped between them leaves files of two merges,
    // which readers tell by their stamps.
    write_stamped(&dir.join(SCENES_FILE), &scenes_schema(), &s, stamp)?;
    write_stamped(&dir.join(POLYGONS_FILE), &polygons_schema(), &p, stamp)?;
    write_stamped(&dir.join(PATCHES_FILE), &patches_schema(), &q, stamp)?;
    Ok(scenes.len())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use icefm_schemas::names::AUTOICE_TEST_SCENES;

    fn scene(id: &str) -> SceneRecord {
        SceneRecord {
            scene_id: id.into(),
            ice_service: Some("dmi".into()),
            acquired_us: Some(1),
            satellite: None,
            source_name: format!("{id}.nc"),
            source_size: 10,
            source_checksum: "ab".into(),
            kind: "raw".into(),
            native_spacing_m: 40.0,
            height: 3,
            width: 4,
            levels: vec!["80m".into()],
            level_heights: vec![2],
            level_widths: vec![2],
            grid2km_height: 0,
            grid2km_width: 0,
            valid_pixels: 12,
            polygons: 1,
            unknown_code_count: 0,
            unknown_codes: String::new(),
            class_pixels: [vec![1; 12], vec![2; 7], vec![3; 8]],
            release: Release::Train,
            footprint: Some(Footprint {
                centre_latitude: 71.5,
                centre_longitude: -45.25,
                min_latitude: 70.0,
                max_latitude: 73.0,
                west_longitude: 179.5,
                east_longitude: -178.0,
            }),
        }
    }

    /// A scenes manifest's column of floats, null as NaN.
    fn floats(batches: &[RecordBatch], name: &str) -> Vec<f64> {
        batches
            .iter()
            .flat_map(|b| {
                let c = b
                    .column_by_name(name)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .unwrap()
                    .clone();
                (0..c.len())
                    .map(move |i| if c.is_null(i) { f64::NAN } else { c.value(i) })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn parts_committed_before_the_footprint_columns_get_nulls_there_when_merged() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = ("20200101T000000_dmi", "20200202T000000_dmi");
        for id in [old, new] {
            commit_scene(dir.path(), &scene(id), &[], &[]).unwrap();
        }
        // The older part as an icefm with the release column but not the footprint wrote it.
        let [_, _, part] = part_paths(dir.path(), old);
        let b = scenes_batch(&[scene(old)]).unwrap();
        let cut = b
            .project(&(0..b.num_columns() - FOOTPRINT_COLUMNS.len()).collect::<Vec<_>>())
            .unwrap();
        assert!(cut.column_by_name(RELEASE_COLUMN).is_some());
        write_parquet(&part, cut.schema().as_ref(), &[cut]).unwrap();
        assert_eq!(merge_manifests(dir.path()).unwrap(), 2);
        let s = read_parquet(&dir.path().join("manifests/scenes.parquet")).unwrap();
        let centre = floats(&s, "centre_latitude");
        assert!(centre[0].is_nan() && centre[1] == 71.5, "{centre:?}");
        let west = floats(&s, "west_longitude");
        assert!(west[0].is_nan() && west[1] == 179.5, "{west:?}");
        assert_eq!(floats(&s, "east_longitude")[1], -178.0);
    }

    #[test]
    fn commit_merge_and_uncommit() {
        let dir = tempfile::tempdir().unwrap();
        let patch = PatchRecord {
            level: "80m".into(),
            row: 0,
            col: 0,
            y0: 0,
            x0: 0,
            height: 2,
            width: 2,
            valid_fraction: 0.5,
            land_fraction: 0.0,
            hist: [vec![0; 12], vec![0; 7], vec![4, 0, 0, 0, 0, 0, 0, 0]],
        };
        let poly = PolygonRecord {
            poly_id: 7,
            fields: vec!["-9".into(); 14],
            sic: 1,
            sod: 2,
            floe: 3,
            pixels: 9,
            unknown_codes: String::new(),
        };
        for id in ["b", "a"] {
            commit_scene(
                dir.path(),
                &scene(id),
                std::slice::from_ref(&poly),
                std::slice::from_ref(&patch),
            )
            .unwrap();
        }
        let c = committed_scenes(dir.path()).unwrap();
        assert_eq!(
            c.iter().map(|s| s.scene_id.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(merge_manifests(dir.path()).unwrap(), 2);
        let s = read_parquet(&dir.path().join("manifests/scenes.parquet")).unwrap();
        assert_eq!(s.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        let ids = s[0]
            .column_by_name("scene_id")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        assert_eq!(ids.value(0), "a");
        assert_eq!(
            committed_scene(dir.path(), "a").unwrap().as_ref(),
            Some(&c[0])
        );
        assert_eq!(c[0].source_name, "a.nc");
        remove_scene_parts(dir.path(), "a").unwrap();
        assert_eq!(committed_scene(dir.path(), "a").unwrap(), None);
        assert_eq!(merge_manifests(dir.path()).unwrap(), 1);
        let p = read_parquet(&dir.path().join("manifests/patches.parquet")).unwrap();
        assert_eq!(p.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    }

    #[test]
    fn parts_committed_before_the_release_column_get_it_from_their_ids_when_merged() {
        let dir = tempfile::tempdir().unwrap();
        // An AutoICE test scene and another, committed by an icefm without the column.
        // And one without a labelled pixel (a test file without its charts).
        let ids = [
            AUTOICE_TEST_SCENES[0],
            "20200101T000000_dmi",
            "20200202T000000_dmi",
        ];
        for id in ids {
            let mut record = scene(id);
            if id == ids[2] {
                for h in &mut record.class_pixels {
                    let n = h.len();
                    h.iter_mut().for_each(|c| *c = 0);
                    h[n - 1] = 12;
                }
            }
            commit_scene(dir.path(), &record, &[], &[]).unwrap();
            let [_, _, part] = part_paths(dir.path(), id);
            let b = scenes_batch(std::slice::from_ref(&record)).unwrap();
            let old = b
                .project(&(0..b.num_columns() - 1 - FOOTPRINT_COLUMNS.len()).collect::<Vec<_>>())
                .unwrap();
            assert!(old.column_by_name(RELEASE_COLUMN).is_none());
            write_parquet(&part, old.schema().as_ref(), &[old]).unwrap();
        }
        assert_eq!(merge_manifests(dir.path()).unwrap(), 3);
        let s = read_parquet(&dir.path().join("manifests/scenes.parquet")).unwrap();
        let release = s[0]
            .column_by_name(RELEASE_COLUMN)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        let all: Vec<&str> = (0..s.iter().map(|b| b.num_rows()).sum())
            .map(|i| release.value(i))
            .collect();
        assert_eq!(
            all,
            ["test", "train", "test"],
            "sorted by id: the test scene (2018), a labelled one, one without labels"
        );
    }

    #[test]
    fn merge_removes_temporary_files_of_killed_writers_only_once_they_are_old() {
        let dir = tempfile::tempdir().unwrap();
        commit_scene(dir.path(), &scene("a"), &[], &[]).unwrap();
        let manifests = dir.path().join("manifests");
        let old = [
            manifests.join("polygons.parquet.4242-1.tmp"),
            manifests.join("parts/b.scene.parquet.4242-7.tmp"),
        ];
        let fresh = manifests.join("patches.parquet.4243-0.tmp");
        let two_hours_ago = std::time::SystemTime::now() - 2 * STALE_TEMPORARY;
        for p in &old {
            std::fs::write(p, b"cut short").unwrap();
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        // Another node's merge may be writing this one right now.
        std::fs::write(&fresh, b"being written").unwrap();
        assert_eq!(merge_manifests(dir.path()).unwrap(), 1);
        for p in &old {
            assert!(!p.exists(), "{} was kept", p.display());
        }
        assert!(fresh.exists());
        assert!(manifests.join("scenes.parquet").exists());
    }
}
