//! Whether a store's merged manifests are whole and current: the files of one merge (their
//! footers carry the same [`MERGE_STAMP_KEY`]), and the scenes they list the scenes committed.
//!
//! `manifests/{scenes,polygons,patches}.parquet` are each renamed into place, one after another,
//! from `manifests/parts/`; an ingest stopped between those renames leaves files of two merges,
//! and one stopped between committing scenes and merging leaves them behind the parts. Readers
//! refuse the first (patches of scenes the scenes manifest lacks, or the reverse) and report the
//! second ([`unmerged`]).

use std::collections::BTreeSet;
use std::path::Path;

use bytes::Bytes;
use icefm_schemas::manifest::{
    MERGE_STAMP_KEY, MergeStamp, PART_KINDS, PATCHES_FILE, POLYGONS_FILE, SCENES_FILE,
};
use icefm_schemas::names::first_few;
use icefm_schemas::store::{MANIFESTS_DIR, PARTS_DIR};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::error::DatasetError;

/// The merge stamp in a manifest's footer; `None` for manifests merged before icefm stamped
/// them.
pub(crate) fn stamp(meta: &ParquetMetaData) -> Option<String> {
    meta.file_metadata()
        .key_value_metadata()?
        .iter()
        .find(|kv| kv.key == MERGE_STAMP_KEY)?
        .value
        .clone()
}

/// The stamp of the manifest whose whole content is `bytes`.
pub(crate) fn stamp_of_bytes(path: &Path, bytes: &Bytes) -> Result<Option<String>, DatasetError> {
    let meta = ParquetMetaDataReader::new()
        .parse_and_finish(bytes)
        .map_err(|e| DatasetError::manifest(path, e.to_string()))?;
    Ok(stamp(&meta))
}

/// The stamp of the manifest at `path`; a local file's footer alone is read.
fn stamp_at(path: &Path) -> Result<Option<String>, DatasetError> {
    let err = |e: &dyn std::fmt::Display| DatasetError::manifest(path, e.to_string());
    if crate::location::is_url(path) {
        let bytes = crate::location::read(path).map_err(|e| err(&e))?;
        return stamp_of_bytes(path, &bytes);
    }
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    let meta = ParquetMetaDataReader::new()
        .parse_and_finish(&file)
        .map_err(|e| err(&e))?;
    Ok(stamp(&meta))
}

/// Err unless the stamps of `store`'s merged manifests (those of `files` that exist, each with
/// its stamp if already known) agree. Manifests without stamps (merged by an older icefm) pass.
pub(crate) fn check_one_merge(
    store: &Path,
    known: &[(&str, Option<String>)],
) -> Result<(), DatasetError> {
    let dir = store.join(MANIFESTS_DIR);
    let mut seen: Vec<(&str, Option<String>)> = Vec::new();
    for file in [SCENES_FILE, PATCHES_FILE, POLYGONS_FILE] {
        let stamp = match known.iter().find(|(f, _)| *f == file) {
            Some((_, s)) => s.clone(),
            None => {
                let path = dir.join(file);
                if !crate::table::exists(&path)? {
                    continue;
                }
                stamp_at(&path)?
            }
        };
        seen.push((file, stamp));
    }
    // All unstamped (merged before stamps) passes; a stamped file beside an unstamped one is a
    // merge stopped between its renames in such a store.
    if let Some((first, a)) = seen.first()
        && let Some((other, _)) = seen.iter().find(|(_, b)| b != a)
    {
        return Err(DatasetError::Store(format!(
            "{}: manifests/{first} and manifests/{other} come from different merges (one was \
             stopped between writing them); `icefm manifest merge --store {}` rebuilds them from \
             the committed scenes",
            store.display(),
            store.display()
        )));
    }
    Ok(())
}

/// Err unless `store`'s merged manifests come from one merge.
pub fn check_manifests(store: &Path) -> Result<(), DatasetError> {
    check_one_merge(store, &[])
}

/// The stamp that merging the parts committed in the local store `store` now would write
/// ([`MergeStamp`], as ingest's merge computes it).
fn parts_stamp(store: &Path, committed: &BTreeSet<String>) -> Result<String, DatasetError> {
    let parts = store.join(PARTS_DIR);
    let mut stamp = MergeStamp::default();
    for id in committed {
        for kind in PART_KINDS {
            let path = parts.join(format!("{id}.{kind}.parquet"));
            let bytes =
                std::fs::read(&path).map_err(|e| DatasetError::manifest(&path, e.to_string()))?;
            stamp.add_part(&bytes);
        }
    }
    Ok(stamp.finish())
}

/// A line for the user when the scenes committed in `store` are not the scenes its merged
/// manifests list: an ingest is running, or was stopped between committing scenes and merging,
/// and what is read now leaves out (or still lists) those scenes. `None` when they agree.
pub fn unmerged(store: &Path) -> Result<Option<String>, DatasetError> {
    let parts = store.join(PARTS_DIR);
    let committed: BTreeSet<String> = crate::location::list(&parts)
        .map_err(|e| DatasetError::manifest(&parts, e.to_string()))?
        .into_iter()
        .filter_map(|n| n.strip_suffix(".scene.parquet").map(String::from))
        .collect();
    if !crate::table::exists(&store.join(MANIFESTS_DIR).join(SCENES_FILE))? {
        return Ok(None);
    }
    let merged: BTreeSet<String> = crate::loader::complete_scenes(store)?.into_iter().collect();
    let new: Vec<&String> = committed.difference(&merged).collect();
    let gone: Vec<&String> = merged.difference(&committed).collect();
    if new.is_empty() && gone.is_empty() {
        // The same scenes; for a local store, also the same parts (a scene written again from
        // a changed file keeps its id).
        let path = store.join(MANIFESTS_DIR).join(SCENES_FILE);
        if crate::location::is_url(store) {
            return Ok(None);
        }
        return Ok(match stamp_at(&path)? {
            Some(s) if s != parts_stamp(store, &committed)? => Some(format!(
                "{}: the manifests are behind the store: scenes were written again since they \
                 were merged. An ingest is running, or stopped before its merge; once none runs, \
                 `icefm manifest merge --store {}` brings them up to date",
                store.display(),
                store.display()
            )),
            _ => None,
        });
    }
    let list = |v: &[&String]| first_few(v, 3);
    let mut what = Vec::new();
    if !new.is_empty() {
        what.push(format!(
            "{} committed scene(s) are not in them yet ({})",
            new.len(),
            list(&new)
        ));
    }
    if !gone.is_empty() {
        what.push(format!(
            "{} scene(s) they list are no longer committed (being written again, or removed) ({})",
            gone.len(),
            list(&gone)
        ));
    }
    Ok(Some(format!(
        "{}: the manifests are behind the store: {}. An ingest is running, or stopped before its \
         merge; once none runs, `icefm manifest merge --store {}` brings them up to date",
        store.display(),
        what.join("; "),
        store.display()
    )))
}
