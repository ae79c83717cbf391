//! Reading a whole store back to find damage: every chunk of every level array of every
//! complete scene is decoded (its CRC-32C checked, its shard file required where the array
//! records writing them all), the merged manifests are checked to come from one merge, and the
//! committed parts they are merged from to be whole.
//! What `icefm inspect STORE --verify` runs, e.g. after copying a store to a cluster.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use icefm_schemas::Level;
use rayon::prelude::*;

use icefm_schemas::manifest::{PART_KINDS, PATCHES_FILE, POLYGONS_FILE, SCENES_FILE};
use icefm_schemas::store::{MANIFESTS_DIR, PARTS_DIR};

use crate::error::DatasetError;
use crate::store::{ArrayKind, StoreReader};

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verified {
    /// Complete scenes read.
    pub scenes: usize,
    /// Chunks of the level arrays decoded (what [`chunk_count`] counts and `progress` is told).
    pub chunks: u64,
    /// One-chunk arrays decoded besides: each scene's 2 km grid and the coordinate arrays of the
    /// scene and its levels (channel names and positions).
    pub small_arrays: u64,
    /// Bytes the level arrays' chunks decoded to.
    pub decoded_bytes: u64,
    /// Bytes the small arrays decoded to (strings with their offsets).
    pub small_bytes: u64,
    /// The damage: scene id and what is wrong, one entry per damaged array (its first bad
    /// chunk and how many are bad), in scene order. Scene id empty for the manifests.
    pub damaged: Vec<(String, String)>,
    /// The manifests are behind the committed scenes ([`crate::merged::unmerged`]).
    pub unmerged: Option<String>,
}

/// One array to read: scene, level, kind and its chunk grid.
struct ArrayJob {
    scene: String,
    level: Level,
    kind: ArrayKind,
    rows: u64,
    cols: u64,
}

/// The number of chunks [`verify`] will decode (for a progress bar), and the jobs.
fn plan(reader: &StoreReader, scenes: &[String]) -> (Vec<ArrayJob>, Vec<(String, String)>) {
    let patch = u64::from(reader.attrs.patch);
    let mut jobs = Vec::new();
    let mut damaged = Vec::new();
    for scene in scenes {
        for &level in &reader.attrs.levels {
            for kind in [ArrayKind::Sar, ArrayKind::Aux, ArrayKind::Labels] {
                match reader.shape(scene, level, kind) {
                    Ok([_, h, w]) => jobs.push(ArrayJob {
                        scene: scene.clone(),
                        level,
                        kind,
                        rows: h.div_ceil(patch),
                        cols: w.div_ceil(patch),
                    }),
                    Err(e) => damaged.push((scene.clone(), e.to_string())),
                }
            }
        }
    }
    (jobs, damaged)
}

/// Chunks a verification of `store` decodes; the count a progress bar needs before it starts.
pub fn chunk_count(store: &Path) -> Result<u64, DatasetError> {
    let reader = StoreReader::open(store)?;
    let scenes = crate::loader::complete_scenes(store)?;
    let (jobs, _) = plan(&reader, &scenes);
    Ok(jobs.iter().map(|j| j.rows * j.cols).sum())
}

/// A level group's coordinate arrays: the channel names of each level array's first
/// dimension, and the rows' and columns' positions.
const LEVEL_COORDINATES: [&str; 5] = ["sar_channel", "aux_channel", "task", "y", "x"];
/// A scene group's coordinate arrays: the 2 km grid's variable names and positions, and its
/// cells' latitude and longitude (raw scenes whose files have them).
const SCENE_COORDINATES: [&str; 5] = ["variable", "y_2km", "x_2km", "latitude", "longitude"];

/// The rest of a scene read back: the one-chunk arrays decoded, the bytes they decoded to, and
/// what is wrong.
#[derive(Default)]
struct SceneRest {
    arrays: u64,
    bytes: u64,
    wrong: Vec<String>,
}

/// Read the rest of a scene back: its group and level-group metadata, its 2 km grid (one chunk,
/// checksummed; it must be there where the array records writing it) and its coordinate arrays
/// (the 2 km grid's variable names, positions, latitude and longitude, each level's channel
/// names and positions), which stores ingested before they were added lack.
fn check_scene_rest(reader: &StoreReader, scene: &str) -> SceneRest {
    use icefm_schemas::store::{GRID2KM_ARRAY, SCENES_GROUP};
    let mut rest = SceneRest::default();
    let group = format!("{SCENES_GROUP}/{scene}");
    let mut groups = vec![group.clone()];
    groups.extend(reader.attrs.levels.iter().map(|l| format!("{group}/{l}")));
    for g in &groups {
        let path = reader.path.join(g).join("zarr.json");
        let ok = crate::location::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            });
        if let Err(e) = ok {
            rest.wrong.push(format!("{}: {e}", path.display()));
        }
    }
    // Stores of every version have the 2 km grid; a missing one is damage. So is a missing
    // array its `coordinates` attribute names (the cells' latitude and longitude).
    let grid = format!("{group}/{GRID2KM_ARRAY}");
    let named: Vec<String> = crate::location::read(&reader.path.join(&grid).join("zarr.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| {
            let c = m
                .get("attributes")?
                .get("coordinates")?
                .as_str()?
                .to_string();
            Some(c.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default();
    let mut names = vec![(grid, true)];
    names.extend(
        SCENE_COORDINATES
            .iter()
            .map(|d| (format!("{group}/{d}"), named.iter().any(|n| n == d))),
    );
    for g in &groups[1..] {
        names.extend(
            LEVEL_COORDINATES
                .iter()
                .map(|d| (format!("{g}/{d}"), false)),
        );
    }
    for (node, required) in names {
        match check_one_chunk(reader, &node, required) {
            Ok(Some(bytes)) => {
                rest.arrays += 1;
                rest.bytes += bytes;
            }
            Ok(None) => {}
            Err(what) => rest.wrong.push(what),
        }
    }
    rest
}

/// Read an array stored in one chunk at `node` (relative to the store) back: its metadata, and
/// its chunk, which must be there where the array records writing it. The bytes it decoded to;
/// `None` where it is empty, or absent and not `required`. An error says what is wrong.
fn check_one_chunk(
    reader: &StoreReader,
    node: &str,
    required: bool,
) -> Result<Option<u64>, String> {
    use icefm_schemas::store::ALL_SHARDS_ATTR;
    use zarrs::array::{Array, ArrayBytes, CodecOptions};
    let path = reader.path.join(node);
    if !required {
        match crate::location::exists(&path.join("zarr.json")) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    let array = Array::open(reader.storage(), &format!("/{node}"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if array.shape().contains(&0) {
        return Ok(None);
    }
    let written = array.attributes().get(ALL_SHARDS_ATTR) == Some(&serde_json::Value::Bool(true));
    let origin = vec![0; array.dimensionality()];
    let path = reader.path.join(array.chunk_key(&origin).as_str());
    match array.retrieve_encoded_chunk(&origin) {
        Ok(None) if written => Err(format!(
            "{}: the chunk file is missing, and this array was written with it",
            path.display()
        )),
        Ok(_) => array
            .retrieve_chunk_opt::<ArrayBytes<'static>>(
                &origin,
                &CodecOptions::default().with_concurrent_target(1),
            )
            .map(|b| Some(b.size() as u64))
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// What is wrong with the committed parts in `manifests/parts/` (what the next merge reads):
/// each committed scene (one with a `.scene.parquet` part) needs all its parts, each a whole
/// Parquet file. One entry per damaged scene.
fn check_parts(store: &Path) -> Result<Vec<(String, String)>, DatasetError> {
    let parts = store.join(PARTS_DIR);
    let names =
        crate::location::list(&parts).map_err(|e| DatasetError::manifest(&parts, e.to_string()))?;
    let mut wrong = Vec::new();
    for id in names
        .iter()
        .filter_map(|n| n.strip_suffix(".scene.parquet"))
    {
        for kind in PART_KINDS {
            let name = format!("{id}.{kind}.parquet");
            let path = parts.join(&name);
            let what = if !names.contains(&name) {
                format!("{} is missing", path.display())
            } else if let Err(e) = crate::table::read_manifest(&path) {
                e.to_string()
            } else {
                continue;
            };
            wrong.push((
                id.to_string(),
                format!(
                    "{what}: the next `icefm manifest merge` would fail; {}",
                    crate::store::REDO
                ),
            ));
            break;
        }
    }
    Ok(wrong)
}

/// Decode every chunk of every complete scene of `store` on the current rayon pool, calling
/// `progress(n)` as chunks are done. Damage is reported in [`Verified::damaged`], not as an
/// error; an error is a store that cannot be read at all.
pub fn verify(store: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<Verified, DatasetError> {
    let reader = StoreReader::open(store)?;
    let scenes = crate::loader::complete_scenes(store)?;
    let mut out = Verified {
        scenes: scenes.len(),
        ..Verified::default()
    };
    out.damaged.extend(check_parts(store)?);
    // Whether the manifests are behind the parts means nothing while a part is damaged (listed).
    if out.damaged.is_empty() {
        out.unmerged = crate::merged::unmerged(store)?;
    }
    if let Err(e) = crate::merged::check_manifests(store) {
        out.damaged.push((String::new(), e.to_string()));
    }
    for file in [SCENES_FILE, PATCHES_FILE, POLYGONS_FILE] {
        let path = store.join(MANIFESTS_DIR).join(file);
        if !crate::table::exists(&path)? {
            out.damaged.push((
                String::new(),
                format!(
                    "{} is missing; `icefm manifest merge --store {}` writes it again",
                    path.display(),
                    store.display()
                ),
            ));
        }
    }
    let (jobs, missing) = plan(&reader, &scenes);
    out.damaged.extend(missing);
    for scene in &scenes {
        let rest = check_scene_rest(&reader, scene);
        out.small_arrays += rest.arrays;
        out.small_bytes += rest.bytes;
        for what in rest.wrong {
            out.damaged
                .push((scene.clone(), format!("{what}; {}", crate::store::REDO)));
        }
    }
    let decoded = AtomicU64::new(0);
    let chunks = AtomicU64::new(0);
    let found: Vec<Option<(String, String)>> = jobs
        .par_iter()
        .map(|j| {
            let mut first = None;
            let mut bad = 0u64;
            for row in 0..j.rows {
                let results: Vec<_> = (0..j.cols)
                    .into_par_iter()
                    .map(|col| reader.decode(&j.scene, j.level, j.kind, row, col))
                    .collect();
                for r in results {
                    match r {
                        Ok(c) => {
                            decoded.fetch_add(c.bytes() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            bad += 1;
                            first.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                chunks.fetch_add(j.cols, Ordering::Relaxed);
                progress(j.cols);
            }
            first.map(|e| {
                let more = if bad > 1 {
                    format!(" ({bad} chunks of this array are bad)")
                } else {
                    String::new()
                };
                (j.scene.clone(), format!("{e}{more}"))
            })
        })
        .collect();
    out.damaged.extend(found.into_iter().flatten());
    out.chunks = chunks.into_inner();
    out.decoded_bytes = decoded.into_inner();
    Ok(out)
}
