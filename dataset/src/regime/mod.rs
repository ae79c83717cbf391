//! Data regimes: which scenes a run may use, drawn by a stated rule from a store (or a
//! class-count table), written as `STORE/regimes/<name>.parquet`.
//!
//! Every rule first orders the candidate scenes; a regime of P % is the first
//! `⌊P / 100 × N⌋` of that order, N the scenes a study draws from (the test release and excluded
//! validation and test regimes left out). So the regimes of a ladder are nested by
//! construction, and the same table, rule and seed give the same file, byte for byte. Scenes of
//! the test release are held out of every regime but test ones unless asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use icefm_schemas::manifest::PATCHES_FILE;
use icefm_schemas::names::parse_scene_name;
use icefm_schemas::store::MANIFESTS_DIR;
use icefm_schemas::{Level, Task};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::error::DatasetError;
use crate::table::{SceneTable, read_batches};

mod draw;
mod held_out;

use draw::list_of;
pub use draw::{draw, draw_ladder, percent_label, share_count};
pub use held_out::{EVERY_SCENE, HeldOut, TrainingScenes, training_scenes};

/// Folder of a store that holds its regimes.
pub const REGIMES_DIR: &str = "regimes";
/// Parquet key-value metadata key holding a regime's description (JSON).
pub const REGIME_META_KEY: &str = "icefm.regime";

/// How scenes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Every candidate scene.
    All,
    /// A seeded random share of the scenes.
    Fraction,
    /// A seeded random share, balanced over ice service × season.
    Stratified,
    /// SAR-IceFM's greedy class coverage, then seeded random scenes up to the share.
    Coverage,
    /// The scenes of a list file (text, one name per line, or a JSON array).
    Import,
}

impl Rule {
    /// Parse a rule name.
    pub fn parse(s: &str) -> Result<Self, DatasetError> {
        Ok(match s.to_lowercase().as_str() {
            "all" => Self::All,
            "fraction" => Self::Fraction,
            "stratified" => Self::Stratified,
            "coverage" => Self::Coverage,
            "import" => Self::Import,
            other => {
                return Err(DatasetError::Regime(format!(
                    "unknown rule `{other}` (all, fraction, stratified, coverage, import)"
                )));
            }
        })
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Fraction => "fraction",
            Self::Stratified => "stratified",
            Self::Coverage => "coverage",
            Self::Import => "import",
        }
    }
}

/// What a regime is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Self-supervised pre-training.
    Pretrain,
    /// Supervised fine-tuning.
    Finetune,
    /// Validation (model selection).
    Val,
    /// Test.
    Test,
}

impl Role {
    /// Parse a role name.
    pub fn parse(s: &str) -> Result<Self, DatasetError> {
        Ok(match s.to_lowercase().as_str() {
            "pretrain" => Self::Pretrain,
            "finetune" => Self::Finetune,
            "val" => Self::Val,
            "test" => Self::Test,
            other => {
                return Err(DatasetError::Regime(format!(
                    "unknown role `{other}` (pretrain, finetune, val, test)"
                )));
            }
        })
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pretrain => "pretrain",
            Self::Finetune => "finetune",
            Self::Val => "val",
            Self::Test => "test",
        }
    }
}

/// A request for a regime (or, with a ladder, a family of them).
#[derive(Debug, Clone)]
pub struct RegimeSpec {
    /// Name (ladder members get `_<percent>` appended).
    pub name: String,
    /// The rule.
    pub rule: Rule,
    /// Share of all scenes of the table, in percent (fraction, stratified, coverage).
    pub percent: Option<f64>,
    /// Seed of the random choices.
    pub seed: u64,
    /// Role written into the regime.
    pub role: Role,
    /// Scene list (import).
    pub list: Option<PathBuf>,
    /// Regimes whose scenes are excluded from the candidates (disjoint by construction).
    pub exclude: Vec<Regime>,
    /// Regimes whose scenes alone are candidates (their union; none: every scene), and the
    /// base of `percent`: a subset to draw within, such as a region's scenes imported from a
    /// list.
    pub within: Vec<Regime>,
    /// Draw from the test release's scenes too. A test regime always may; other roles hold
    /// them out unless this is set.
    pub include_test: bool,
}

/// A regime: its scenes in the order the rule picked them, and how it was drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Regime {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Rule.
    pub rule: Rule,
    /// Share asked for, percent.
    pub percent: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Imported list file (as given).
    pub list: Option<String>,
    /// Names of the excluded regimes.
    pub excluded: Vec<String>,
    /// Names of the regimes it was drawn within (`--within`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub within: Vec<String>,
    /// The store or table drawn from.
    pub source: String,
    /// BLAKE3 of the manifests (or table) drawn from.
    pub source_hash: String,
    /// Scene ids in pick order.
    pub scenes: Vec<String>,
    /// Remarks made while drawing (e.g. coverage needing more than the share).
    pub notes: Vec<String>,
    /// Drawn with `--include-test`: a non-test regime that may hold test-release scenes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_test: bool,
    /// How the patches were chosen, when the regime lists patches ([`list_patches`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_filter: Option<PatchFilter>,
    /// The listed patches of each scene (aligned with `scenes`), when asked; the loader's
    /// random samplers then draw only these.
    #[serde(skip)]
    pub patches: Option<Vec<Vec<PatchKey>>>,
}

/// A patch (chunk) of a scene's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatchKey {
    /// Level.
    pub level: Level,
    /// Chunk row.
    pub row: u32,
    /// Chunk column.
    pub col: u32,
}

/// Which patches of its scenes a regime lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchFilter {
    /// Levels listed.
    pub levels: Vec<Level>,
    /// Least valid-SAR fraction (manifest `valid_fraction`) of a listed patch.
    pub min_valid: f32,
}

/// Make `regime` list the patches of its scenes at `levels` (empty: every level of the store)
/// whose valid-SAR fraction is at least `min_valid`, from the store's patches manifest.
pub fn list_patches(
    regime: &mut Regime,
    store: &Path,
    levels: &[Level],
    min_valid: f32,
) -> Result<(), DatasetError> {
    if !(0.0..=1.0).contains(&min_valid) {
        return Err(regime_error(format!(
            "--min-valid {min_valid} is not in 0–1"
        )));
    }
    let attrs = crate::store::read_attrs(store)?;
    let levels: Vec<Level> = if levels.is_empty() {
        attrs.levels.clone()
    } else {
        levels.to_vec()
    };
    if let Some(l) = levels.iter().find(|l| !attrs.levels.contains(l)) {
        return Err(regime_error(format!(
            "{}: the store has no level {l}",
            store.display()
        )));
    }
    let index: BTreeMap<&str, usize> = regime
        .scenes
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let names: BTreeMap<String, Level> = levels.iter().map(|l| (l.name(), *l)).collect();
    let path = store.join(MANIFESTS_DIR).join(PATCHES_FILE);
    let mut lists: Vec<Vec<PatchKey>> = vec![Vec::new(); regime.scenes.len()];
    let bad = |c: &str| DatasetError::manifest(&path, format!("column `{c}` has the wrong type"));
    for b in read_batches(
        &path,
        &["scene_id", "level", "row", "col", "valid_fraction"],
    )? {
        let ids = b.column(0).as_string::<i32>();
        let lv = b.column(1).as_string::<i32>();
        let rows = b
            .column(2)
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| bad("row"))?;
        let cols = b
            .column(3)
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| bad("col"))?;
        let valid = b
            .column(4)
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| bad("valid_fraction"))?;
        for i in 0..b.num_rows() {
            if let (Some(&s), Some(&level)) = (index.get(ids.value(i)), names.get(lv.value(i)))
                && valid.value(i) >= min_valid
            {
                lists[s].push(PatchKey {
                    level,
                    row: rows.value(i),
                    col: cols.value(i),
                });
            }
        }
    }
    for l in &mut lists {
        l.sort_unstable();
    }
    regime.patches = Some(lists);
    regime.patch_filter = Some(PatchFilter { levels, min_valid });
    Ok(())
}

fn regime_error(msg: impl Into<String>) -> DatasetError {
    DatasetError::Regime(msg.into())
}

/// The scene ids of a list file: text with one name per line (`#` comments and blank lines
/// ignored), a JSON array of names, or a regime's `.parquet` file (its scenes, in its order).
/// Raw file names, RTT file names and scene ids are all accepted and mapped to scene ids; a
/// UTF-8 byte-order mark at the start of a text file (as some Windows editors write) is not
/// part of the first name.
pub fn read_scene_list(path: &Path) -> Result<Vec<String>, DatasetError> {
    read_scene_list_with_repeats(path).map(|(ids, _)| ids)
}

/// [`read_scene_list`], and the scene ids named more than once (two names of one scene, such
/// as its raw and RTT file names, or a line given twice), which the list counts once.
pub fn read_scene_list_with_repeats(
    path: &Path,
) -> Result<(Vec<String>, Vec<String>), DatasetError> {
    // A local file, or an object by its URL.
    let bytes = crate::location::read(path)
        .map(|b| b.to_vec())
        .map_err(|e| DatasetError::table(path, 0, e.to_string()))?;
    if bytes.starts_with(b"PAR1") {
        // A regime file: its scene ids, which it holds once each.
        return Ok((Regime::read(path)?.scenes, Vec::new()));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        DatasetError::table(
            path,
            0,
            format!("not UTF-8 text, JSON or a regime .parquet ({e})"),
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let names: Vec<(usize, String)> = if text.trim_start().starts_with('[') {
        let v: Vec<String> = serde_json::from_str(text).map_err(|e| {
            DatasetError::table(path, e.line(), format!("not a JSON array of names ({e})"))
        })?;
        v.into_iter().map(|n| (0, n)).collect()
    } else {
        text.lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim().to_string()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
            .collect()
    };
    let mut seen = BTreeSet::new();
    let mut ids = Vec::new();
    let mut repeats = Vec::new();
    for (line, n) in names {
        let id = match parse_scene_name(&n) {
            Some(p) => p.scene_id,
            None => {
                return Err(DatasetError::table(
                    path,
                    line,
                    format!("`{n}` is not a raw or RTT file name or a scene id"),
                ));
            }
        };
        if seen.insert(id.clone()) {
            ids.push(id);
        } else if !repeats.contains(&id) {
            repeats.push(id);
        }
    }
    Ok((ids, repeats))
}

fn regime_schema(with_patches: bool) -> Schema {
    let mut f = vec![
        Field::new("scene_id", DataType::Utf8, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("role", DataType::Utf8, false),
    ];
    if with_patches {
        f.push(Field::new("patch_level", list_of(DataType::Utf8), false));
        f.push(Field::new("patch_row", list_of(DataType::UInt32), false));
        f.push(Field::new("patch_col", list_of(DataType::UInt32), false));
    }
    Schema::new(f)
}

impl Regime {
    /// BLAKE3 (hex) of the scene ids in pick order, one per line: what tells two regimes of
    /// one name apart in a run's log.
    pub fn scenes_hash(&self) -> String {
        blake3::hash(self.scenes.join("\n").as_bytes())
            .to_hex()
            .to_string()
    }

    /// Path of regime `name` in `store`.
    pub fn path_in(store: &Path, name: &str) -> PathBuf {
        store.join(REGIMES_DIR).join(format!("{name}.parquet"))
    }

    /// Write as Parquet (scene_id, rank, role; the description as key-value metadata), whole
    /// ([`crate::location::write`]: a temporary file and a rename, or one upload into object
    /// storage), so a reader never sees half a regime.
    pub fn write(&self, path: &Path) -> Result<(), DatasetError> {
        let bytes = self.to_bytes(path)?;
        crate::location::write(path, bytes).map_err(|e| DatasetError::write(path, e))
    }

    /// [`Regime::write`], but only where no file is: of two processes drawing the same new
    /// name at once, one writes it and the other gets an error saying so.
    pub fn write_new(&self, path: &Path) -> Result<(), DatasetError> {
        let bytes = self.to_bytes(path)?;
        crate::location::write_new(path, bytes).map_err(|e| DatasetError::write(path, e))
    }

    /// [`Regime::write`], but only where the file is still what `seen` read
    /// ([`crate::location::write_replacing`]): of two draws replacing one regime in object
    /// storage at once, the second to write is refused and writes nothing. Returns what was
    /// written.
    pub fn write_replacing(
        &self,
        path: &Path,
        seen: &crate::location::Seen,
    ) -> Result<crate::location::Seen, DatasetError> {
        let bytes = self.to_bytes(path)?;
        crate::location::write_replacing(path, bytes, seen)
            .map_err(|e| DatasetError::write(path, e))
    }

    /// The regime as the bytes of its Parquet file (`path` for errors).
    fn to_bytes(&self, path: &Path) -> Result<Vec<u8>, DatasetError> {
        let meta = serde_json::to_string(self).map_err(|e| DatasetError::write(path, e))?;
        let n = self.scenes.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(&self.scenes)),
            Arc::new(UInt32Array::from_iter_values(0..n as u32)),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                self.role.name(),
                n,
            ))),
        ];
        let mut columns = columns;
        if let Some(lists) = &self.patches {
            let mut level = ListBuilder::new(StringBuilder::new());
            let mut row = ListBuilder::new(UInt32Builder::new());
            let mut col = ListBuilder::new(UInt32Builder::new());
            for l in lists {
                for p in l {
                    level.values().append_value(p.level.name());
                    row.values().append_value(p.row);
                    col.values().append_value(p.col);
                }
                level.append(true);
                row.append(true);
                col.append(true);
            }
            columns.push(Arc::new(level.finish()));
            columns.push(Arc::new(row.finish()));
            columns.push(Arc::new(col.finish()));
        }
        let batch = RecordBatch::try_new(Arc::new(regime_schema(self.patches.is_some())), columns)
            .map_err(|e| DatasetError::write(path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(Default::default()))
            .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
                REGIME_META_KEY.to_string(),
                meta,
            )]))
            .build();
        let mut w = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props))
            .map_err(|e| DatasetError::write(path, e))?;
        w.write(&batch).map_err(|e| DatasetError::write(path, e))?;
        w.into_inner().map_err(|e| DatasetError::write(path, e))
    }

    /// Read a regime file written by [`Regime::write`]; the scene column is authoritative.
    pub fn read(path: &Path) -> Result<Self, DatasetError> {
        let bytes =
            crate::location::read(path).map_err(|e| DatasetError::manifest(path, e.to_string()))?;
        Self::from_bytes(path, bytes)
    }

    /// A regime from the bytes of its file, read from `path` (named in errors).
    pub fn from_bytes(path: &Path, bytes: bytes::Bytes) -> Result<Self, DatasetError> {
        let err = |e: &dyn std::fmt::Display| DatasetError::manifest(path, e.to_string());
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| err(&e))?;
        let meta = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == REGIME_META_KEY))
            .and_then(|k| k.value.clone())
            .ok_or_else(|| err(&"not an icefm regime (no description)"))?;
        let mut regime: Regime = serde_json::from_str(&meta).map_err(|e| err(&e))?;
        let mut scenes = Vec::new();
        let mut patches: Option<Vec<Vec<PatchKey>>> = None;
        for b in builder.build().map_err(|e| err(&e))? {
            let b = b.map_err(|e| err(&e))?;
            let ids = b
                .column_by_name("scene_id")
                .ok_or_else(|| err(&"no scene_id column"))?
                .as_string::<i32>();
            scenes.extend(ids.iter().flatten().map(str::to_string));
            let lists = ["patch_level", "patch_row", "patch_col"].map(|c| b.column_by_name(c));
            if let [Some(level), Some(row), Some(col)] = lists {
                let bad = || err(&"malformed patch columns");
                let (level, row, col) = (
                    level.as_list_opt::<i32>().ok_or_else(bad)?,
                    row.as_list_opt::<i32>().ok_or_else(bad)?,
                    col.as_list_opt::<i32>().ok_or_else(bad)?,
                );
                let out = patches.get_or_insert_with(Vec::new);
                for i in 0..b.num_rows() {
                    let (l, r, c) = (level.value(i), row.value(i), col.value(i));
                    let l = l.as_string_opt::<i32>().ok_or_else(bad)?;
                    let r = r.as_primitive_opt::<UInt32Type>().ok_or_else(bad)?;
                    let c = c.as_primitive_opt::<UInt32Type>().ok_or_else(bad)?;
                    let mut v = Vec::with_capacity(l.len());
                    for k in 0..l.len() {
                        v.push(PatchKey {
                            level: l.value(k).parse().map_err(|e| err(&e))?,
                            row: r.value(k),
                            col: c.value(k),
                        });
                    }
                    out.push(v);
                }
            }
        }
        regime.scenes = scenes;
        regime.patches = patches;
        Ok(regime)
    }

    /// Find a regime by name in a store, or by path; the error lists the store's regimes.
    pub fn open(store: Option<&Path>, name_or_path: &str) -> Result<Self, DatasetError> {
        let as_path = Path::new(name_or_path);
        if name_or_path.ends_with(".parquet") && as_path.exists() {
            return Self::read(as_path);
        }
        // A regime file in object storage, by its URL.
        if name_or_path.ends_with(".parquet") && crate::location::is_url(as_path) {
            return Self::read(as_path);
        }
        // No regime's name ends in `.parquet`: this names a file, which is not there.
        if name_or_path.ends_with(".parquet") {
            return Err(regime_error(format!("{name_or_path}: no such regime file")));
        }
        let Some(store) = store else {
            return Err(regime_error(format!(
                "regime `{name_or_path}`: no such file (give a .parquet path or --store)"
            )));
        };
        let path = Self::path_in(store, name_or_path);
        if crate::table::exists(&path)? {
            return Self::read(&path);
        }
        // Not a store at all (a wrong path, a missing bucket): say that, not "unknown regime".
        crate::store::read_attrs(store)?;
        let known = list_regimes(store);
        Err(regime_error(format!(
            "unknown regime `{name_or_path}` in {} (known: {})",
            store.display(),
            if known.is_empty() {
                "none yet; create one with `icefm regime`".to_string()
            } else {
                known.join(", ")
            }
        )))
    }
}

/// Names of the regimes of a store, sorted (none when they cannot be listed).
pub fn list_regimes(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = crate::location::list(&store.join(REGIMES_DIR))
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n.strip_suffix(".parquet").map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Scenes two regimes share, sorted.
pub fn shared_scenes(a: &Regime, b: &Regime) -> Vec<String> {
    let sa: BTreeSet<&String> = a.scenes.iter().collect();
    let mut v: Vec<String> = b
        .scenes
        .iter()
        .filter(|s| sa.contains(s))
        .cloned()
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A readable summary: scenes, patches, pixels per class per task, classes missing (classes the
/// table has that the regime lacks).
pub fn summary(regime: &Regime, table: &SceneTable) -> String {
    let idx: Vec<usize> = regime
        .scenes
        .iter()
        .filter_map(|s| table.index_of(s))
        .collect();
    let totals = table.class_totals(idx.iter().copied());
    let all = table.class_totals(0..table.scenes.len());
    let patches: u64 = idx.iter().map(|&i| table.scenes[i].patches).sum();
    let mut s = format!(
        "regime {} ({}, rule {}{}, seed {}{}): {} of {} scenes",
        regime.name,
        regime.role.name(),
        regime.rule.name(),
        regime
            .percent
            .map(|p| format!(" {p} %"))
            .unwrap_or_default(),
        regime.seed,
        if regime.within.is_empty() {
            String::new()
        } else {
            format!(", within {}", regime.within.join(" + "))
        },
        regime.scenes.len(),
        table.scenes.len()
    );
    if table.has_patches {
        s.push_str(&format!(", {patches} patches"));
    }
    if let (Some(lists), Some(f)) = (&regime.patches, &regime.patch_filter) {
        s.push_str(&format!(
            "; lists {} patches (valid SAR ≥ {} % at {})",
            lists.iter().map(Vec::len).sum::<usize>(),
            // 0.995 is 99.5 %, not a rounded 100 %.
            format!("{:.2}", 100.0 * f.min_valid)
                .trim_end_matches('0')
                .trim_end_matches('.'),
            f.levels
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    s.push('\n');
    for t in Task::ALL {
        let ch = t.channel();
        let cells: Vec<String> = (0..t.n_classes())
            .map(|c| format!("{c}:{}", totals[ch][c]))
            .collect();
        let missing: Vec<String> = (0..t.n_classes())
            .filter(|&c| all[ch][c] > 0 && totals[ch][c] == 0)
            .map(|c| c.to_string())
            .collect();
        s.push_str(&format!(
            "  {:<4} pixels per class {}; no label {}; missing: {}\n",
            t.name(),
            cells.join(" "),
            totals[ch][t.n_classes()],
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            }
        ));
    }
    if let Some(lists) = &regime.patches {
        // The class pixels above are the scenes' whole; the loader draws the listed patches only.
        let empty: Vec<&str> = regime
            .scenes
            .iter()
            .zip(lists)
            .filter(|(_, l)| l.is_empty())
            .map(|(s, _)| s.as_str())
            .collect();
        s.push_str(
            "  note: the class pixels are of the scenes' whole; the loader draws the listed \
             patches only\n",
        );
        if !empty.is_empty() {
            s.push_str(&format!(
                "  warning: {} of the {} scenes have no listed patch, so training never draws \
                 them ({}); lower --min-valid or give other --levels\n",
                empty.len(),
                regime.scenes.len(),
                icefm_schemas::names::first_few(&empty, 5)
            ));
        }
    }
    for n in &regime.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}

/// Classes (task, class) the table has that the regime lacks.
pub fn missing_classes(regime: &Regime, table: &SceneTable) -> Vec<(Task, usize)> {
    let idx = regime.scenes.iter().filter_map(|s| table.index_of(s));
    let totals = table.class_totals(idx);
    let all = table.class_totals(0..table.scenes.len());
    let mut v = Vec::new();
    for t in Task::ALL {
        for c in 0..t.n_classes() {
            if all[t.channel()][c] > 0 && totals[t.channel()][c] == 0 {
                v.push((t, c));
            }
        }
    }
    v
}
