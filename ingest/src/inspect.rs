//! A store's summary from its manifests: scenes, levels, patches, class balance per task.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use arrow_array::{
    Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use icefm_schemas::Task;
use icefm_schemas::manifest::{PATCHES_FILE, RELEASE_COLUMN, SCENES_FILE};
use icefm_schemas::names::Release;
use icefm_schemas::store::{CLAIMS_DIR, MANIFESTS_DIR, SCENES_GROUP, StoreAttrs};

use crate::error::StoreError;
use crate::manifest::{committed_scenes, read_parquet};
use crate::shard::{list_shards, shard_runs};
use crate::store::Store;

/// One scene as listed by `inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneSummary {
    /// Scene id.
    pub scene_id: String,
    /// `raw` / `rtt`.
    pub kind: String,
    /// Native rows × columns.
    pub shape: (u32, u32),
    /// Valid HH share of native pixels.
    pub valid_fraction: f64,
    /// Codes outside the tables.
    pub unknown_codes: u32,
    /// Share of the valid-HH pixels with a SIC label (0 for a scene without a chart).
    pub labelled_fraction: f64,
    /// Its release (test scenes are held out of training regimes).
    pub release: Release,
    /// Latitude and longitude of its centre (`None` where its file has none, or the store was
    /// ingested before footprints were recorded).
    pub centre: Option<(f64, f64)>,
}

/// Summary of a store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreSummary {
    /// Scenes, by id.
    pub scenes: Vec<SceneSummary>,
    /// Level name → (patches, patches with valid fraction ≥ 0.5).
    pub patches_per_level: BTreeMap<String, (u64, u64)>,
    /// Native class pixel counts per task, summed over scenes (classes, then 255).
    pub class_pixels: [Vec<u64>; 3],
    /// Level names in store order.
    pub levels: Vec<String>,
    /// Patch edge.
    pub patch: u32,
    /// How the levels resample HH and HV.
    pub sar_resample: icefm_schemas::store::SarResample,
    /// Complete scenes (committed parts), merged into the manifests or not.
    pub committed: usize,
    /// Sharded ingests with shards that have not finished: N and the missing shards.
    pub unfinished_shards: Vec<(usize, Vec<usize>)>,
    /// Scene folders without a committed scene: writes of stopped runs (redone when their
    /// file is ingested again), or of a running ingest.
    pub partial_scenes: Vec<String>,
    /// Scene ids claimed by an ingest: running, or killed before it released them.
    pub claims: Vec<String>,
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T, StoreError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            StoreError::parquet(path, format!("column {name} missing or of another type"))
        })
}

/// Sorted names of the folders (`dirs`) or files in `dir`; none if it does not exist.
fn folder_names(dir: &Path, dirs: bool) -> Result<Vec<String>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(dir, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| StoreError::io(dir, e))?;
        if e.path().is_dir() == dirs {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Read a store's summary: its manifests, and the records of ingests that have not finished.
pub fn summarize(store_path: &Path) -> Result<StoreSummary, StoreError> {
    let store = Store::open(store_path)?;
    let dir = store_path.join(MANIFESTS_DIR);
    let (scenes_path, patches_path) = (dir.join(SCENES_FILE), dir.join(PATCHES_FILE));
    let mut s = if scenes_path.exists() {
        summarize_manifests(
            &store.attrs,
            (&read_parquet(&scenes_path)?, &scenes_path),
            (&read_parquet(&patches_path)?, &patches_path),
        )?
    } else {
        summarize_manifests(&store.attrs, (&[], &scenes_path), (&[], &patches_path))?
    };
    let committed = committed_scenes(store_path)?;
    s.committed = committed.len();
    s.partial_scenes = folder_names(&store_path.join(SCENES_GROUP), true)?
        .into_iter()
        .filter(|id| {
            committed
                .binary_search_by(|c| c.scene_id.as_str().cmp(id))
                .is_err()
        })
        .collect();
    s.claims = folder_names(&store_path.join(CLAIMS_DIR), false)?
        .into_iter()
        .filter_map(|n| n.strip_suffix(".claim").map(String::from))
        .collect();
    s.unfinished_shards = shard_runs(store_path)?
        .into_iter()
        .filter(|r| !r.complete())
        .map(|r| (r.of, r.missing))
        .collect();
    Ok(s)
}

/// The summary of a store's root attributes and manifests alone (`scenes.parquet`,
/// `patches.parquet`, read elsewhere: from object storage, say), each with its path for
/// errors. Ingest records are not looked at: every listed scene counts as committed.
pub fn summarize_manifests(
    attrs: &StoreAttrs,
    (scenes, scenes_path): (&[RecordBatch], &Path),
    (patches, patches_path): (&[RecordBatch], &Path),
) -> Result<StoreSummary, StoreError> {
    let mut s = StoreSummary {
        class_pixels: Task::ALL.map(|t| vec![0; t.hist_len()]),
        levels: attrs.levels.iter().map(|l| l.name()).collect(),
        patch: attrs.patch,
        sar_resample: attrs.sar_resample,
        ..Default::default()
    };
    for b in scenes {
        let id: &StringArray = col(b, "scene_id", scenes_path)?;
        let kind: &StringArray = col(b, "kind", scenes_path)?;
        let h: &UInt32Array = col(b, "height", scenes_path)?;
        let w: &UInt32Array = col(b, "width", scenes_path)?;
        let valid: &UInt64Array = col(b, "valid_pixels", scenes_path)?;
        let unknown: &UInt32Array = col(b, "unknown_code_count", scenes_path)?;
        // Stores ingested before the column: the release from the scene's record.
        let release = b
            .column_by_name(RELEASE_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());
        let has_release = release.is_some();
        let float = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<arrow_array::Float64Array>())
        };
        let (lat, lon) = (float("centre_latitude"), float("centre_longitude"));
        for i in 0..b.num_rows() {
            let centre = match (lat, lon) {
                (Some(a), Some(o)) if a.is_valid(i) && o.is_valid(i) => {
                    Some((a.value(i), o.value(i)))
                }
                _ => None,
            };
            let px = f64::from(h.value(i)) * f64::from(w.value(i));
            // Stores ingested before the column: set below from the labels.
            let release = release
                .and_then(|r| Release::parse(r.value(i)))
                .unwrap_or_else(|| Release::of_id(id.value(i)));
            s.scenes.push(SceneSummary {
                scene_id: id.value(i).to_string(),
                kind: kind.value(i).to_string(),
                shape: (h.value(i), w.value(i)),
                valid_fraction: valid.value(i) as f64 / px.max(1.0),
                unknown_codes: unknown.value(i),
                labelled_fraction: 0.0,
                release,
                centre,
            });
        }
        let first = s.scenes.len() - b.num_rows();
        for t in Task::ALL {
            let name = icefm_schemas::manifest::hist_column(t, "pixels");
            let l: &FixedSizeListArray = col(b, &name, scenes_path)?;
            let vals = l
                .values()
                .as_any()
                .downcast_ref::<UInt64Array>()
                .ok_or_else(|| {
                    StoreError::parquet(scenes_path, format!("{name} is not a list of u64"))
                })?;
            let n = t.hist_len();
            for i in 0..b.num_rows() {
                for k in 0..n {
                    s.class_pixels[t.channel()][k] += vals.value(i * n + k);
                }
                if t == Task::Sic {
                    let labelled: u64 = (0..n - 1).map(|k| vals.value(i * n + k)).sum();
                    let sc = &mut s.scenes[first + i];
                    let valid_px =
                        sc.valid_fraction * f64::from(sc.shape.0) * f64::from(sc.shape.1);
                    sc.labelled_fraction = labelled as f64 / valid_px.max(1.0);
                    if !has_release {
                        let hist = &vals.values()[i * n..(i + 1) * n];
                        sc.release = Release::of_record(&sc.scene_id, hist);
                    }
                }
            }
        }
    }
    for b in patches {
        let level: &StringArray = col(b, "level", patches_path)?;
        let vf: &Float32Array = col(b, "valid_fraction", patches_path)?;
        for i in 0..b.num_rows() {
            let e = s
                .patches_per_level
                .entry(level.value(i).to_string())
                .or_default();
            e.0 += 1;
            if vf.value(i) >= 0.5 {
                e.1 += 1;
            }
        }
    }
    s.committed = s.scenes.len();
    Ok(s)
}

impl StoreSummary {
    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} scene(s); levels {}; patch {} px{}",
            self.scenes.len(),
            self.levels.join(", "),
            self.patch,
            match self.sar_resample {
                icefm_schemas::store::SarResample::Area => "",
                icefm_schemas::store::SarResample::Bilinear =>
                    "; HH and HV resampled bilinearly, as SAR-IceFM made its levels",
            }
        );
        for (of, missing) in &self.unfinished_shards {
            let _ = writeln!(
                o,
                "a sharded ingest ({of} shards) is not finished: shard(s) {} have no record yet",
                list_shards(missing)
            );
        }
        if !self.partial_scenes.is_empty() {
            let _ = writeln!(
                o,
                "{} scene folder(s) without a committed scene (a running ingest, or a stopped \
                 one: ingesting their files again redoes them): {}",
                self.partial_scenes.len(),
                self.partial_scenes.join(", ")
            );
        }
        if !self.claims.is_empty() {
            let _ = writeln!(
                o,
                "{} scene(s) claimed by an ingest (running, or killed: `manifests/claims/`): {}",
                self.claims.len(),
                self.claims.join(", ")
            );
        }
        if self.committed != self.scenes.len() {
            let _ = writeln!(
                o,
                "{} scene(s) are complete but the manifests list {}: `icefm manifest merge` \
                 merges them",
                self.committed,
                self.scenes.len()
            );
        }
        let _ = writeln!(
            o,
            "\nscene                      kind  release  native shape    valid HH  labelled  centre            unknown codes"
        );
        for sc in &self.scenes {
            let centre = match sc.centre {
                Some((a, o)) => format!(
                    "{:>5.2}{} {:>6.2}{}",
                    a.abs(),
                    if a < 0.0 { 'S' } else { 'N' },
                    o.abs(),
                    if o < 0.0 { 'W' } else { 'E' }
                ),
                None => "-".into(),
            };
            let _ = writeln!(
                o,
                "{:<26} {:<5} {:<8} {:>6} x {:<6} {:>7.1}%  {:>7.1}%  {:<16}  {}",
                sc.scene_id,
                sc.kind,
                sc.release.name(),
                sc.shape.0,
                sc.shape.1,
                100.0 * sc.valid_fraction,
                100.0 * sc.labelled_fraction,
                centre,
                sc.unknown_codes
            );
        }
        let unlabelled = self
            .scenes
            .iter()
            .filter(|sc| sc.labelled_fraction == 0.0)
            .count();
        if unlabelled > 0 {
            let _ = writeln!(
                o,
                "{unlabelled} scene(s) have no label (test-release files without their charts)"
            );
        }
        let test = self
            .scenes
            .iter()
            .filter(|sc| sc.release == Release::Test)
            .count();
        if test > 0 {
            let _ = writeln!(
                o,
                "{test} scene(s) of the test release: held out of every regime but test ones \
                 (unless drawn with --include-test) and of training without a regime"
            );
        }
        let _ = writeln!(o, "\nlevel    patches  with >= 50% valid SAR");
        let mut levels: Vec<_> = self.patches_per_level.iter().collect();
        levels.sort_by_key(|(l, _)| l.trim_end_matches('m').parse::<u32>().unwrap_or(u32::MAX));
        for (l, (n, good)) in levels {
            let _ = writeln!(o, "{l:<8} {n:>7}  {good:>7}");
        }
        if self.class_pixels.iter().all(|h| h.iter().sum::<u64>() == 0) {
            let _ = writeln!(o, "\nclass balance: no scene in the manifests yet");
            return o;
        }
        if self.scenes.iter().any(|s| s.kind == "raw")
            && self.scenes.iter().any(|s| s.kind == "rtt")
        {
            let _ = writeln!(
                o,
                "\nnote: the class pixels below are native pixels of raw (40 m) and RTT (80 m) \
                 scenes together: a raw pixel covers a quarter of an RTT pixel's area"
            );
        }
        o.push_str(&render_class_balance(&self.class_pixels));
        o
    }
}

/// The class balance of each task: native pixels per class (the last entry 255), with each
/// class's share of the labelled pixels and the classes missing.
pub fn render_class_balance(class_pixels: &[Vec<u64>; 3]) -> String {
    let mut o = String::new();
    for t in Task::ALL {
        let h = &class_pixels[t.channel()];
        let total: u64 = h.iter().sum();
        let valid: u64 = h[..t.n_classes()].iter().sum();
        let _ = writeln!(
            o,
            "\n{} class balance (native pixels; {:.1}% of {} are 255):",
            t.name(),
            100.0 * h[t.n_classes()] as f64 / total.max(1) as f64,
            total
        );
        for (k, name) in t.class_names().iter().enumerate() {
            let _ = writeln!(
                o,
                "  {k:>2} {name:<12} {:>12} {:>6.2}%{}",
                h[k],
                100.0 * h[k] as f64 / valid.max(1) as f64,
                if h[k] == 0 { "  (missing)" } else { "" }
            );
        }
    }
    o
}
