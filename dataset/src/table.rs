//! Per-scene facts the regime rules work from: a store's manifests, or a class-count table so a
//! study can be planned before ingest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMicrosecondType, UInt64Type};
use arrow_array::{Array, RecordBatch};
use icefm_schemas::Task;
use icefm_schemas::manifest::{PATCHES_FILE, RELEASE_COLUMN, SCENES_FILE, hist_column};
use icefm_schemas::names::Release;
use icefm_schemas::names::parse_scene_name;
use icefm_schemas::store::MANIFESTS_DIR;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::DatasetError;

/// One scene as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneEntry {
    /// Scene id, `20180124T194759_dmi`.
    pub id: String,
    /// Ice service (`dmi`, `cis`), empty if unknown.
    pub service: String,
    /// Acquisition month 1–12, 0 if unknown.
    pub month: u8,
    /// Pixels per class and task; the last bin of each counts 255 (no label).
    pub pixels: [Vec<u64>; 3],
    /// Patches of the scene in the store, all levels (0 for a class-count table).
    pub patches: u64,
    /// Its release: test scenes are held out of training regimes unless asked for.
    pub release: Release,
}

impl SceneEntry {
    fn new(id: &str) -> Self {
        let parsed = parse_scene_name(id);
        Self {
            id: id.to_string(),
            service: parsed
                .as_ref()
                .map(|p| p.service.clone())
                .unwrap_or_default(),
            month: parsed
                .and_then(|p| p.start.get(4..6).and_then(|m| m.parse().ok()))
                .unwrap_or(0),
            pixels: Task::ALL.map(|t| vec![0; t.hist_len()]),
            patches: 0,
            release: Release::of_id(id),
        }
    }

    /// Whether the scene is of the test release (held out of training regimes).
    pub fn is_test(&self) -> bool {
        self.release == Release::Test
    }

    /// Meteorological season of the acquisition: `DJF`, `MAM`, `JJA`, `SON` (`unknown`).
    pub fn season(&self) -> &'static str {
        match self.month {
            12 | 1 | 2 => "DJF",
            3..=5 => "MAM",
            6..=8 => "JJA",
            9..=11 => "SON",
            _ => "unknown",
        }
    }

    /// Whether the scene has labelled pixels of `class` for `task`.
    pub fn holds(&self, task: Task, class: usize) -> bool {
        self.pixels[task.channel()][class] > 0
    }
}

/// The scenes a regime is drawn from, sorted by id, with where they came from.
#[derive(Debug, Clone)]
pub struct SceneTable {
    /// Scenes, sorted by id.
    pub scenes: Vec<SceneEntry>,
    /// The store or table file.
    pub source: PathBuf,
    /// BLAKE3 of the manifests (or table) read, so a regime says what it was drawn from.
    pub source_hash: String,
    /// Whether patch counts are known (a store) or not (a class-count table).
    pub has_patches: bool,
}

/// Whether the manifest at `path` exists (a file, or an object of a store in object storage).
pub(crate) fn exists(path: &Path) -> Result<bool, DatasetError> {
    crate::location::exists(path).map_err(|e| DatasetError::manifest(path, e.to_string()))
}

/// Every row and column of the Parquet manifest at `path` (a file, or an object of a store in
/// object storage).
pub fn read_manifest(path: &Path) -> Result<Vec<RecordBatch>, DatasetError> {
    let err = |e: &dyn std::fmt::Display| DatasetError::manifest(path, e.to_string());
    let bytes = crate::location::read(path).map_err(|e| err(&e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| err(&e))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))
}

/// Whether the Parquet manifest at `path` has the column `name`.
pub(crate) fn has_column(path: &Path, name: &str) -> Result<bool, DatasetError> {
    let err = |e: &dyn std::fmt::Display| DatasetError::manifest(path, e.to_string());
    let bytes = crate::location::read(path).map_err(|e| err(&e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| err(&e))?;
    Ok(builder.schema().index_of(name).is_ok())
}

pub(crate) fn read_batches(
    path: &Path,
    columns: &[&str],
) -> Result<Vec<RecordBatch>, DatasetError> {
    let err = |e: &dyn std::fmt::Display| DatasetError::manifest(path, e.to_string());
    let bytes = crate::location::read(path).map_err(|e| err(&e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| err(&e))?;
    let schema = builder.parquet_schema();
    let mut roots = Vec::new();
    for c in columns {
        roots.push(
            builder
                .schema()
                .index_of(c)
                .map_err(|_| err(&format!("no column `{c}`")))?,
        );
    }
    let mask = ProjectionMask::roots(schema, roots);
    let reader = builder.with_projection(mask).build().map_err(|e| err(&e))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))
}

/// BLAKE3 (hex) of a store's manifests, `scenes.parquet` then `patches.parquet`, each after
/// its length: the `source_hash` that regimes drawn from the store record, and what a
/// training run logs of its store. Err when they come from different merges
/// ([`crate::merged`]).
pub fn manifests_hash(store: &Path) -> Result<String, DatasetError> {
    let dir = store.join(MANIFESTS_DIR);
    let scenes_path = dir.join(SCENES_FILE);
    if !exists(&scenes_path)? {
        return Err(crate::error::no_scenes_manifest(store));
    }
    let mut hasher = blake3::Hasher::new();
    let mut stamps = Vec::new();
    for (file, p) in [
        (SCENES_FILE, &scenes_path),
        (PATCHES_FILE, &dir.join(PATCHES_FILE)),
    ] {
        let bytes =
            crate::location::read(p).map_err(|e| DatasetError::manifest(p, e.to_string()))?;
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
        stamps.push((file, crate::merged::stamp_of_bytes(p, &bytes)?));
    }
    crate::merged::check_one_merge(store, &stamps)?;
    Ok(hasher.finalize().to_hex().to_string())
}

impl SceneTable {
    /// The complete scenes of an ingested store (`manifests/scenes.parquet`, `patches.parquet`).
    pub fn from_store(store: &Path) -> Result<Self, DatasetError> {
        let dir = store.join(MANIFESTS_DIR);
        let scenes_path = dir.join(SCENES_FILE);
        let patches_path = dir.join(PATCHES_FILE);
        if !exists(&scenes_path)? {
            return Err(crate::error::no_scenes_manifest(store));
        }
        let source_hash = manifests_hash(store)?;
        let mut cols = vec!["scene_id", "ice_service", "acquired"];
        let hists: Vec<String> = Task::ALL
            .iter()
            .map(|&t| hist_column(t, "pixels"))
            .collect();
        cols.extend(hists.iter().map(String::as_str));
        let mut scenes = BTreeMap::new();
        for b in read_batches(&scenes_path, &cols)? {
            let column = |name: &str| {
                b.column_by_name(name).ok_or_else(|| {
                    DatasetError::manifest(&scenes_path, format!("no column `{name}`"))
                })
            };
            let ids = column("scene_id")?.as_string::<i32>();
            let services = column("ice_service")?.as_string::<i32>();
            let acquired = column("acquired")?.as_primitive::<TimestampMicrosecondType>();
            for i in 0..b.num_rows() {
                let mut e = SceneEntry::new(ids.value(i));
                if services.is_valid(i) {
                    e.service = services.value(i).to_string();
                }
                if acquired.is_valid(i) {
                    e.month = month_of_micros(acquired.value(i));
                }
                for (t, name) in Task::ALL.iter().zip(&hists) {
                    let v = column(name)?.as_fixed_size_list().value(i);
                    e.pixels[t.channel()] = v.as_primitive::<UInt64Type>().values().to_vec();
                }
                scenes.insert(e.id.clone(), e);
            }
        }
        // Stores ingested before the column: each scene's release from its record (its id,
        // and whether it has a labelled pixel), as their next merge writes it.
        if !has_column(&scenes_path, RELEASE_COLUMN)? {
            for e in scenes.values_mut() {
                e.release = Release::of_record(&e.id, &e.pixels[Task::Sic.channel()]);
            }
        } else {
            for b in read_batches(&scenes_path, &["scene_id", RELEASE_COLUMN])? {
                let (ids, releases) = (
                    b.column(0).as_string::<i32>(),
                    b.column(1).as_string::<i32>(),
                );
                for i in 0..b.num_rows() {
                    let release = Release::parse(releases.value(i)).ok_or_else(|| {
                        DatasetError::manifest(
                            &scenes_path,
                            format!("release `{}` is not train or test", releases.value(i)),
                        )
                    })?;
                    if let Some(e) = scenes.get_mut(ids.value(i)) {
                        e.release = release;
                    }
                }
            }
        }
        if exists(&patches_path)? {
            for b in read_batches(&patches_path, &["scene_id"])? {
                let ids = b.column(0).as_string::<i32>();
                for i in 0..b.num_rows() {
                    if let Some(e) = scenes.get_mut(ids.value(i)) {
                        e.patches += 1;
                    }
                }
            }
        }
        Ok(Self {
            scenes: scenes.into_values().collect(),
            source: store.to_path_buf(),
            source_hash,
            has_patches: true,
        })
    }

    /// A per-scene class-count table: CSV with the columns `scene`, `chart` (SIC, SOD, FLOE),
    /// `class` (0…n−1, 255 = no label) and `pixels`, e.g. the real counts of the AI4Arctic
    /// ready-to-train scenes in `shared/data/ai4arctic_rtt_train_class_pixels.csv`.
    pub fn from_counts_csv(path: &Path) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DatasetError::table(path, 0, e.to_string()))?;
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let header: Vec<String> = lines
            .next()
            .map(|(_, l)| l.split(',').map(|h| h.trim().to_lowercase()).collect())
            .ok_or_else(|| DatasetError::table(path, 1, "empty file".into()))?;
        let col = |name: &str| {
            header.iter().position(|h| h == name).ok_or_else(|| {
                DatasetError::table(
                    path,
                    1,
                    format!("no `{name}` column (need scene, chart, class, pixels)"),
                )
            })
        };
        let (cs, cc, ck, cp) = (col("scene")?, col("chart")?, col("class")?, col("pixels")?);
        let mut scenes: BTreeMap<String, SceneEntry> = BTreeMap::new();
        for (n, line) in lines {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let bad = |why: String| DatasetError::table(path, n + 1, why);
            let get = |i: usize| {
                f.get(i)
                    .copied()
                    .ok_or_else(|| bad(format!("only {} fields", f.len())))
            };
            // The scene id as a store names it: a raw or ready-to-train file name, or an id
            // with its service in capitals, is the same scene (and a test scene is known as one).
            let given = get(cs)?;
            let scene = icefm_schemas::names::parse_scene_name(given)
                .map(|n| n.scene_id)
                .ok_or_else(|| {
                    bad(format!(
                        "scene `{given}` is not a scene id (<YYYYMMDDTHHMMSS>_<service>) or an \
                         AI4Arctic file name"
                    ))
                })?;
            let scene = scene.as_str();
            let task = match get(cc)?.to_uppercase().as_str() {
                "SIC" => Task::Sic,
                "SOD" => Task::Sod,
                "FLOE" => Task::Floe,
                other => return Err(bad(format!("chart `{other}` is not SIC, SOD or FLOE"))),
            };
            let class: u8 = get(ck)?
                .parse()
                .map_err(|_| bad(format!("class `{}` is not 0-255", f[ck])))?;
            if usize::from(class) >= task.n_classes() && class != icefm_schemas::IGNORE {
                return Err(bad(format!(
                    "class {class} is outside {} (0-{} or 255)",
                    task.name(),
                    task.n_classes() - 1
                )));
            }
            let pixels: u64 = get(cp)?
                .parse()
                .map_err(|_| bad(format!("pixels `{}` is not a count", f[cp])))?;
            let e = scenes
                .entry(scene.to_string())
                .or_insert_with(|| SceneEntry::new(scene));
            e.pixels[task.channel()][task.hist_bin(class)] += pixels;
        }
        Ok(Self {
            scenes: scenes.into_values().collect(),
            source: path.to_path_buf(),
            source_hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
            has_patches: false,
        })
    }

    /// Scenes known by id only (no counts), e.g. to check scene lists against each other.
    pub fn from_ids<'a>(ids: impl IntoIterator<Item = &'a str>, source: &Path) -> Self {
        let mut scenes: BTreeMap<String, SceneEntry> = BTreeMap::new();
        let mut hasher = blake3::Hasher::new();
        for id in ids {
            scenes
                .entry(id.to_string())
                .or_insert_with(|| SceneEntry::new(id));
        }
        for id in scenes.keys() {
            hasher.update(id.as_bytes());
            hasher.update(b"\n");
        }
        Self {
            scenes: scenes.into_values().collect(),
            source: source.to_path_buf(),
            source_hash: hasher.finalize().to_hex().to_string(),
            has_patches: false,
        }
    }

    /// Index of a scene id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.scenes.binary_search_by(|e| e.id.as_str().cmp(id)).ok()
    }

    /// Total pixels per class and task over `which` scenes.
    pub fn class_totals(&self, which: impl IntoIterator<Item = usize>) -> [Vec<u64>; 3] {
        let mut t = Task::ALL.map(|t| vec![0u64; t.hist_len()]);
        for i in which {
            for (acc, p) in t.iter_mut().zip(&self.scenes[i].pixels) {
                for (a, b) in acc.iter_mut().zip(p) {
                    *a += b;
                }
            }
        }
        t
    }
}

/// Month (1–12) of a UTC timestamp in microseconds.
fn month_of_micros(us: i64) -> u8 {
    icefm_schemas::calendar::civil_from_days(us.div_euclid(86_400_000_000)).1 as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_seasons() {
        // 2018-01-24T19:47:59Z and 2020-08-07T10:42:19Z.
        assert_eq!(month_of_micros(1_516_823_279_000_000), 1);
        assert_eq!(month_of_micros(1_596_796_939_000_000), 8);
        let e = SceneEntry::new("20200807T104219_cis");
        assert_eq!((e.month, e.season(), e.service.as_str()), (8, "JJA", "cis"));
        assert_eq!(SceneEntry::new("odd-name").season(), "unknown");
    }
}
