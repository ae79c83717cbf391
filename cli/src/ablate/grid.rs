//! The grid file of `icefm ablate` and its cells: parsing, checking everything before a run
//! starts, and the keys and run folders of the cells.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use icefm_dataset::regime::{Regime, shared_scenes};
use icefm_dataset::sampler::parse_level_weights;
use icefm_dataset::table::SceneTable;
use icefm_model::config::TrainConfig;
use icefm_model::finetune::resolve_weights;
use icefm_model::train::checkpoints;
use icefm_schemas::Task;
use serde::Deserialize;

/// Version of the grid file format (`version = 1`, the default).
const GRID_VERSION: u32 = 1;
/// Keys a grid sets itself: `set` may not touch them.
const AXIS_KEYS: [(&str, &str); 4] = [
    ("data.regime", "grid.regimes"),
    ("data.levels", "grid.levels"),
    ("seg.init", "grid.init and mae"),
    ("seg.tasks", "grid.tasks"),
];

/// The grid file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    /// [`GRID_VERSION`].
    #[serde(default = "grid_version")]
    version: u32,
    /// Fine-tuning configuration every run starts from (relative to the grid file or the
    /// working directory).
    base: PathBuf,
    /// MAE run, checkpoint folder or safetensors file for `init = "mae"`: one path, or a
    /// table of one path per regime.
    #[serde(default)]
    mae: Option<toml::Value>,
    /// Regime whose scenes count as 100 % of the labelled fraction; default: every scene of
    /// the store outside the test and validation regimes.
    #[serde(default)]
    pool: Option<String>,
    /// Regime of the scenes every run is scored on.
    test_regime: String,
    /// `section.key=value` overrides of every run (`--set` syntax).
    #[serde(default)]
    set: Vec<String>,
    /// The axes.
    grid: Axes,
}

fn grid_version() -> u32 {
    GRID_VERSION
}

/// `[grid]`: the axes; the cells are their product, regimes varying slowest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Axes {
    /// Fine-tuning regimes of the store (e.g. `icefm regime --ladder` rungs).
    regimes: Vec<String>,
    /// Encoder initialisations.
    #[serde(default = "default_init")]
    init: Vec<Init>,
    /// One model for all three tasks, or one model per task.
    #[serde(default = "default_tasks")]
    tasks: Vec<TaskMode>,
    /// `data.levels` values; empty: the base configuration's.
    #[serde(default)]
    levels: Vec<String>,
}

fn default_init() -> Vec<Init> {
    vec![Init::Scratch, Init::Mae]
}

fn default_tasks() -> Vec<TaskMode> {
    vec![TaskMode::Multi]
}

/// Encoder initialisation of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Init {
    /// Random weights.
    Scratch,
    /// The grid's MAE encoder.
    Mae,
}

impl Init {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Scratch => "scratch",
            Self::Mae => "mae",
        }
    }

    pub(super) fn legend(self) -> &'static str {
        match self {
            Self::Scratch => "scratch",
            Self::Mae => "MAE",
        }
    }
}

/// Tasks of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum TaskMode {
    /// One model with SIC, SOD and FLOE heads.
    Multi,
    /// One model per task; the three scores make one row.
    Single,
}

impl TaskMode {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Multi => "multi",
            Self::Single => "single",
        }
    }
}

/// One fine-tuning run of a cell.
#[derive(Debug, Clone)]
pub(super) struct Run {
    /// The task of a single-task run.
    pub(super) task: Option<Task>,
    /// Its run folder.
    pub(super) dir: PathBuf,
    /// Its resolved configuration.
    pub(super) cfg: TrainConfig,
}

/// One cell of the grid.
#[derive(Debug, Clone)]
pub(super) struct Cell {
    /// `<regime>-<init>-<tasks>-<levels>`, the name of its folder.
    pub(super) key: String,
    /// The regime's name.
    pub(super) regime: String,
    /// The regime's scenes over the pool's.
    pub(super) fraction: f64,
    /// Scenes in the regime.
    pub(super) scenes: usize,
    /// [`Regime::scenes_hash`] of the regime (its scenes in pick order).
    pub(super) scenes_hash: String,
    /// The regime's scene ids, sorted, one per line: two regimes of one set of scenes have
    /// one.
    pub(super) scene_set: String,
    pub(super) init: Init,
    pub(super) tasks: TaskMode,
    /// `data.levels` as given ("" = every store level).
    pub(super) levels: String,
    pub(super) steps: u64,
    pub(super) dir: PathBuf,
    pub(super) runs: Vec<Run>,
}

/// A whole checked grid.
pub(super) struct Plan {
    pub(super) cells: Vec<Cell>,
    pub(super) test_regime: String,
    /// [`Regime::scenes_hash`] of the test regime.
    pub(super) test_hash: String,
    /// Grid file stem, for titles.
    pub(super) name: String,
}

/// `80,200,400` → `80+200+400`, `80:2,200:1` → `80w2+200w1`, "" → `all`: a file-name-safe key part.
pub(super) fn levels_key(levels: &str) -> String {
    let parts: Vec<String> = levels
        .split(',')
        .map(|p| {
            p.trim()
                .chars()
                .filter_map(|c| match c {
                    ':' => Some('w'),
                    c if c.is_ascii_alphanumeric() || c == '.' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .filter(|p: &String| !p.is_empty())
        .collect();
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join("+")
    }
}

/// `data.levels` for people: "" is every level of the store.
pub(super) fn levels_text(levels: &str) -> String {
    if levels.trim().is_empty() {
        "(every store level)".into()
    } else {
        levels.replace(' ', "")
    }
}

/// A path of the grid file: relative to the grid's folder if it is there, else to the working
/// directory.
fn resolve(grid_dir: &Path, p: &Path, what: &str) -> Result<PathBuf> {
    let candidates = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        vec![grid_dir.join(p), p.to_path_buf()]
    };
    candidates
        .iter()
        .find(|c| c.exists())
        .map(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()))
        .ok_or_else(|| {
            anyhow!(
                "{what} {}: not found (looked beside the grid file, in {}, and in the working directory)",
                p.display(),
                grid_dir.display()
            )
        })
}

/// The grid file parsed, with its version, axes and overrides checked.
fn read_grid(g: &str, text: &str) -> Result<GridFile> {
    let grid: GridFile = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let at = text.lines().nth(line - 1).unwrap_or("").trim();
            anyhow!("{g}: line {line} ({at}): {}", e.message())
        }
        None => anyhow!("{g}: {}", e.message()),
    })?;
    if grid.version != GRID_VERSION {
        bail!(
            "{g}: version {} is not supported (this icefm reads version {GRID_VERSION})",
            grid.version
        );
    }
    let axes = &grid.grid;
    for (name, len) in [
        ("regimes", axes.regimes.len()),
        ("init", axes.init.len()),
        ("tasks", axes.tasks.len()),
    ] {
        if len == 0 {
            bail!("{g}: grid.{name} is empty");
        }
    }
    check_unique(g, "regimes", &axes.regimes)?;
    check_unique(g, "init", &axes.init)?;
    check_unique(g, "tasks", &axes.tasks)?;
    check_unique(g, "levels", &axes.levels)?;
    for s in &grid.set {
        let key = s.split_once('=').map_or(s.as_str(), |(k, _)| k).trim();
        if let Some((_, axis)) = AXIS_KEYS.iter().find(|(k, _)| *k == key) {
            bail!("{g}: set {s:?}: {key} is an axis of the grid (set it with {axis})");
        }
    }
    Ok(grid)
}

/// The MAE weights of each regime (by its name in `grid.regimes`): `mae = "PATH"` for all,
/// or `[mae]` with one path per regime (SAR-IceFM pre-trains on the complement of each
/// fine-tuning list). Empty when no cell starts from an MAE.
fn mae_paths(g: &str, grid_dir: &Path, grid: &GridFile) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    if !grid.grid.init.contains(&Init::Mae) {
        return Ok(out);
    }
    let given: Vec<(String, &toml::Value)> = match &grid.mae {
        None => bail!(
            "{g}: grid.init has \"mae\" but the grid names no `mae` run (mae = \"runs/mae_vit_tiny\")"
        ),
        Some(v @ toml::Value::String(_)) => {
            grid.grid.regimes.iter().map(|r| (r.clone(), v)).collect()
        }
        Some(toml::Value::Table(t)) => {
            if let Some(extra) = t.keys().find(|k| !grid.grid.regimes.contains(k)) {
                bail!("{g}: mae.{extra}: {extra} is not one of grid.regimes");
            }
            let mut v = Vec::new();
            for r in &grid.grid.regimes {
                let p = t
                    .get(r)
                    .ok_or_else(|| anyhow!("{g}: [mae] names no MAE run for regime {r}"))?;
                v.push((r.clone(), p));
            }
            v
        }
        Some(_) => bail!("{g}: mae must be a path, or a table of one path per regime"),
    };
    for (regime, v) in given {
        let p = v
            .as_str()
            .ok_or_else(|| anyhow!("{g}: the MAE run of {regime} must be a path (text)"))?;
        let p = resolve(grid_dir, Path::new(p), "mae")?;
        resolve_weights(&p).map_err(|e| anyhow!("{g}: mae of {regime}: {e}"))?;
        out.insert(regime, p);
    }
    Ok(out)
}

/// Every `levels` value must be a level list of the store.
fn check_levels(g: &str, store: &Path, levels: &[String]) -> Result<()> {
    let attrs = icefm_dataset::store::read_attrs(store)?;
    for l in levels.iter().filter(|l| !l.trim().is_empty()) {
        let parsed = parse_level_weights(l).map_err(|e| anyhow!("{g}: levels {l:?}: {e}"))?;
        if let Some((missing, _)) = parsed.iter().find(|(l, _)| !attrs.levels.contains(l)) {
            bail!(
                "{g}: levels {l:?}: the store has no level {missing} (it has {})",
                attrs
                    .levels
                    .iter()
                    .map(|l| l.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// Parse and check the whole grid before anything runs: the grid file, the base
/// configuration with every cell's overrides, the store's regimes and levels, the MAE weights,
/// and the run folders already there.
pub(super) fn plan(grid_path: &Path, text: &str, store: &Path, out: &Path) -> Result<Plan> {
    let g = grid_path.display().to_string();
    let g = g.as_str();
    let grid = read_grid(g, text)?;
    let axes = &grid.grid;
    let grid_dir = grid_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base_path = resolve(grid_dir, &grid.base, "base")?;
    let base_text = std::fs::read_to_string(&base_path)
        .map_err(|e| anyhow!("cannot read {}: {e}", base_path.display()))?;
    let b = base_path.display();
    TrainConfig::parse(&base_text, &[]).map_err(|e| anyhow!("{b}: {e}"))?;
    // The base reads; an error now is of the grid's `set`.
    let base = TrainConfig::parse(&base_text, &grid.set).map_err(|e| {
        let e = e.to_string();
        anyhow!("{g}: set: {}", e.strip_prefix("--set ").unwrap_or(&e))
    })?;
    let Some(seg) = &base.seg else {
        bail!(
            "{b}: no [seg] section: the base must be a fine-tuning configuration (configs/seg_vit_tiny.toml)"
        );
    };

    // The store: its scenes, regimes and levels.
    crate::manifest::warn_if_unmerged(store);
    let table = SceneTable::from_store(store)
        .map_err(|e| anyhow!("{}: not a readable store ({e})", store.display()))?;
    let open = |name: &str| Regime::open(Some(store), name).map_err(|e| anyhow!("{g}: {e}"));
    let test_arg = regime_arg(grid_dir, &grid.test_regime);
    let test = open(&test_arg)?;
    let val = if seg.val_regime.is_empty() {
        None
    } else {
        let v = Regime::open(Some(store), &seg.val_regime)
            .map_err(|e| anyhow!("{b}: seg.val_regime: {e}"))?;
        Some(v)
    };
    let held_out = icefm_dataset::regime::HeldOut::of_store(store)
        .map_err(|e| anyhow!("{}: not a readable store ({e})", store.display()))?;
    // The best checkpoint is chosen on the validation scenes: never on those scored.
    if let Some(v) = &val {
        let shared = shared_scenes(v, &test);
        if !shared.is_empty() {
            bail!(
                "{g}: the test regime {} shares {} scene(s) with seg.val_regime {}: each run's \
                 best checkpoint would be chosen on scenes it is scored on",
                test.name,
                shared.len(),
                v.name
            );
        }
    }
    if test.role != icefm_dataset::regime::Role::Test {
        eprintln!(
            "warning: test_regime {} is a {} regime, not a test one: are these the held-out \
             scenes?",
            test.name,
            test.role.name()
        );
    }
    let regime_args: Vec<String> = axes
        .regimes
        .iter()
        .map(|r| regime_arg(grid_dir, r))
        .collect();
    let mut regimes = Vec::new();
    for name in &regime_args {
        let r = open(name)?;
        // What training would refuse (a test or val regime, one sharing the validation or a
        // test regime's scenes, test-release scenes not drawn to), refused before anything runs.
        held_out
            .training_scenes(Some(r.clone()), val.as_ref())
            .map_err(|e| anyhow!("{g}: regimes: {e}"))?;
        let shared = shared_scenes(&r, &test);
        if !shared.is_empty() {
            eprintln!(
                "warning: regime {} shares {} scene(s) with the test regime {}: its scores are not held out",
                r.name,
                shared.len(),
                test.name
            );
        }
        regimes.push(r);
    }
    // The labelled fraction's 100 %: the pool regime, else every scene of the store that is
    // neither of the test release nor a test or validation scene.
    let pool = match &grid.pool {
        Some(name) => {
            let p = open(&regime_arg(grid_dir, name))?;
            // A fraction of the pool is of scenes in it.
            let inside: BTreeSet<&str> = p.scenes.iter().map(String::as_str).collect();
            for r in &regimes {
                let outside = r
                    .scenes
                    .iter()
                    .filter(|s| !inside.contains(s.as_str()))
                    .count();
                if outside > 0 {
                    bail!(
                        "{g}: regime {} has {outside} scene(s) outside the pool regime {}: its \
                         labelled fraction would not be a share of the pool",
                        r.name,
                        p.name
                    );
                }
            }
            p.scenes.len()
        }
        None => {
            let held: BTreeSet<&str> = test
                .scenes
                .iter()
                .chain(val.iter().flat_map(|v| v.scenes.iter()))
                .map(String::as_str)
                .collect();
            let n = table
                .scenes
                .iter()
                .filter(|s| !s.is_test() && !held.contains(s.id.as_str()));
            n.count()
        }
    };
    if pool == 0 {
        bail!(
            "{g}: no scenes to fine-tune on: every scene of {} is a test or validation scene",
            store.display()
        );
    }
    let levels: Vec<String> = if axes.levels.is_empty() {
        vec![base.data.levels.clone()]
    } else {
        axes.levels.clone()
    };
    check_levels(g, store, &levels)?;
    let mae = mae_paths(g, grid_dir, &grid)?;
    for (regime, path) in &mae {
        check_mae(g, regime, path, &base, &test)?;
    }

    let mut cells = Vec::new();
    for ((regime_arg, given), regime) in regime_args.iter().zip(&axes.regimes).zip(&regimes) {
        for &init in &axes.init {
            for &tasks in &axes.tasks {
                for lv in &levels {
                    let key = format!(
                        "{}-{}-{}-{}",
                        regime.name,
                        init.name(),
                        tasks.name(),
                        levels_key(lv)
                    );
                    let dir = out.join("runs").join(&key);
                    let init_path = match init {
                        Init::Mae => mae.get(given).map(|p| p.display().to_string()),
                        Init::Scratch => None,
                    };
                    let mut set = grid.set.clone();
                    set.push(format!("data.regime={}", regime_setting(regime_arg)));
                    set.push(format!("data.levels={lv}"));
                    set.push(format!(
                        "seg.init={}",
                        toml_string(init_path.as_deref().unwrap_or(""))
                    ));
                    let runs = cell_runs(&key, &dir, tasks, (&base_path, &base_text), &set)?;
                    cells.push(Cell {
                        key,
                        regime: regime.name.clone(),
                        fraction: regime.scenes.len() as f64 / pool as f64,
                        scenes: regime.scenes.len(),
                        scenes_hash: regime.scenes_hash(),
                        scene_set: {
                            let mut ids = regime.scenes.clone();
                            ids.sort();
                            ids.join("\n")
                        },
                        init,
                        tasks,
                        levels: lv.clone(),
                        steps: base.train.steps,
                        dir,
                        runs,
                    });
                }
            }
        }
    }
    let mut keys: Vec<&str> = cells.iter().map(|c| c.key.as_str()).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        bail!(
            "{g}: two cells have the key {} (regime names or levels collide)",
            w[0]
        );
    }
    Ok(Plan {
        cells,
        test_regime: test_arg,
        test_hash: test.scenes_hash(),
        name: grid_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

/// A regime named in the grid as the store knows it: its name, or a `.parquet` file given
/// relative to the grid's folder (as every path of the grid may be) made absolute.
fn regime_arg(grid_dir: &Path, regime: &str) -> String {
    let p = Path::new(regime);
    if regime.ends_with(".parquet") && !p.is_absolute() && grid_dir.join(p).is_file() {
        return grid_dir.join(p).display().to_string();
    }
    regime.to_string()
}

/// The MAE weights at `path` (for `regime`'s cells) must be an encoder the base's model can
/// take: not a fine-tuning run, of the base's width, depth and patch input; and a warning when
/// the MAE was pre-trained on scenes of the test regime (its scores would not be held out).
fn check_mae(g: &str, regime: &str, path: &Path, base: &TrainConfig, test: &Regime) -> Result<()> {
    let what = || format!("{g}: mae of {regime} ({})", path.display());
    if let Some((cfg, seen)) = crate::eval::trained_scenes_of(path) {
        if cfg.seg.is_some() {
            bail!(
                "{}: a fine-tuning run, not an MAE: give the MAE run it started from",
                what()
            );
        }
        if let Some(seen) = seen {
            let n = test.scenes.iter().filter(|s| seen.contains(*s)).count();
            if n > 0 {
                eprintln!(
                    "warning: {}: pre-trained on {n} scene(s) of the test regime {}: the MAE \
                     cells' scores are not held out from pre-training",
                    what(),
                    test.name
                );
            }
        }
    }
    let file = resolve_weights(path).map_err(|e| anyhow!("{}: {e}", what()))?;
    let (dim, depth, patch_in) =
        encoder_shape(&file).map_err(|e| anyhow!("{}: {}: {e}", what(), file.display()))?;
    let enc = base
        .mae_config()
        .map_err(|e| anyhow!("{g}: base: {e}"))?
        .encoder;
    let want = (enc.dim, enc.depth, enc.in_channels * enc.patch * enc.patch);
    if (dim, depth, patch_in) != want {
        bail!(
            "{}: its encoder is {dim} wide with {depth} blocks and {patch_in} values per patch; \
             the base's model is {} wide with {} blocks and {}: make model.preset / model.depth \
             (and the channels and patch) of the base match it",
            what(),
            want.0,
            want.1,
            want.2
        );
    }
    Ok(())
}

/// Width, blocks and values per patch of the encoder in a safetensors file, from its header
/// alone (`encoder.cls_token` [1, 1, D], `encoder.patch_embed.weight` [D, C·p·p],
/// `encoder.blocks.{i}.…`).
fn encoder_shape(file: &Path) -> Result<(usize, usize, usize)> {
    use std::io::Read;
    let mut f = std::fs::File::open(file)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| anyhow!("not a safetensors file (shorter than its header)"))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!("not a safetensors file (a header of {len} bytes)");
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| anyhow!("not a safetensors file (its header is cut short)"))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| anyhow!("not a safetensors file (header: {e})"))?;
    let shape = |name: &str| -> Option<Vec<usize>> {
        header
            .get(name)?
            .get("shape")?
            .as_array()?
            .iter()
            .map(|v| v.as_u64().map(|v| v as usize))
            .collect()
    };
    let embed = shape("encoder.patch_embed.weight")
        .filter(|s| s.len() == 2)
        .ok_or_else(|| anyhow!("holds no encoder (no encoder.patch_embed.weight)"))?;
    let depth = header.as_object().map_or(0, |o| {
        icefm_model::finetune::encoder_blocks(o.keys().map(String::as_str))
    });
    Ok((embed[0], depth, embed[1]))
}

/// `data.regime` of a regime named in the grid: a regime given as a file is named by its
/// absolute path, so that a resume from another working directory sees the same configuration.
fn regime_setting(regime: &str) -> String {
    let p = Path::new(regime);
    if regime.ends_with(".parquet") && p.is_file() {
        std::fs::canonicalize(p).map_or(regime.to_string(), |p| p.display().to_string())
    } else {
        regime.to_string()
    }
}

/// The runs of a cell: one with the three tasks, or one per task in `<dir>/<TASK>`; each
/// configuration is the base with `set`, and a run folder already there must hold that run.
fn cell_runs(
    key: &str,
    dir: &Path,
    tasks: TaskMode,
    (base_path, base_text): (&Path, &str),
    set: &[String],
) -> Result<Vec<Run>> {
    let task_sets: Vec<Option<Task>> = match tasks {
        TaskMode::Multi => vec![None],
        TaskMode::Single => Task::ALL.into_iter().map(Some).collect(),
    };
    let mut runs = Vec::new();
    for task in task_sets {
        let names: Vec<String> = match task {
            Some(t) => vec![toml_string(t.name())],
            None => Task::ALL.iter().map(|t| toml_string(t.name())).collect(),
        };
        let mut set = set.to_vec();
        set.push(format!("seg.tasks=[{}]", names.join(", ")));
        let cfg = TrainConfig::parse(base_text, &set)
            .map_err(|e| anyhow!("cell {key}: {}: {e}", base_path.display()))?;
        let run_dir = match task {
            Some(t) => dir.join(t.name()),
            None => dir.to_path_buf(),
        };
        check_run_dir(key, &run_dir, &cfg)?;
        runs.push(Run {
            task,
            dir: run_dir,
            cfg,
        });
    }
    Ok(runs)
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// An axis may not name a value twice.
fn check_unique<T: PartialEq + std::fmt::Debug>(g: &str, axis: &str, v: &[T]) -> Result<()> {
    for (i, x) in v.iter().enumerate() {
        if v[..i].contains(x) {
            bail!("{g}: grid.{axis} names {x:?} twice");
        }
    }
    Ok(())
}

/// A run folder with checkpoints left by an earlier invocation must hold this very run (only
/// `train.steps` may grow), else resuming it would mix two configurations. One without
/// checkpoints holds nothing to resume: the run starts over in it.
fn check_run_dir(key: &str, dir: &Path, cfg: &TrainConfig) -> Result<()> {
    let newest = checkpoints(dir).last().map(|(s, _)| *s);
    let saved = dir.join("config.toml");
    let (Some(step), Ok(text)) = (newest, std::fs::read_to_string(&saved)) else {
        return Ok(());
    };
    let other = |why: String| {
        anyhow!(
            "cell {key}: {} {why}: delete that folder to re-run the cell, or give another --out",
            dir.display()
        )
    };
    let saved = TrainConfig::parse(&text, &[])
        .map_err(|e| other(format!("holds an unreadable config.toml ({e})")))?;
    if step > cfg.train.steps {
        return Err(other(format!(
            "was trained for {step} steps, more than the {} asked",
            cfg.train.steps
        )));
    }
    if !saved.continues_as(cfg) {
        return Err(other(format!(
            "holds a run with another configuration (the run's value first: {})",
            saved.differences(cfg).join(", ")
        )));
    }
    Ok(())
}
