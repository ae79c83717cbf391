//! `icefm regime` (draw, ladder, check) and `icefm inspect --regime`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use icefm_dataset::regime::{
    Regime, RegimeSpec, Role, Rule, draw, draw_ladder, list_patches, list_regimes, shared_scenes,
    summary,
};
use icefm_dataset::table::SceneTable;
use icefm_schemas::Level;

/// Arguments of `icefm regime`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RegimeArgs {
    #[command(subcommand)]
    sub: Option<RegimeSub>,
    #[command(flatten)]
    draw: DrawArgs,
}

#[derive(clap::Subcommand, Debug)]
enum RegimeSub {
    /// Exit non-zero (and list them) if two regimes share a scene.
    Check {
        /// First regime: a name in --store, or a .parquet path.
        a: String,
        /// Second regime.
        b: String,
        /// Store holding the regimes named.
        #[arg(long)]
        store: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct DrawArgs {
    /// Store to draw from; the regime is written to STORE/regimes/NAME.parquet.
    #[arg(long, conflicts_with = "counts")]
    store: Option<PathBuf>,
    /// Plan from a per-scene class-count CSV (scene, chart, class, pixels) instead of a store.
    #[arg(long, requires = "out")]
    counts: Option<PathBuf>,
    /// Output file with --counts (with --ladder: a folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Regime name (with --counts, default: the --out file stem).
    #[arg(long)]
    name: Option<String>,
    /// all, fraction, stratified, coverage or import.
    #[arg(long, default_value = "fraction")]
    rule: String,
    /// Share, percent, of the scenes a study draws from: the store's (or table's, or those of
    /// --within), less the test release's and those of excluded val and test regimes (at least
    /// one scene).
    #[arg(long)]
    percent: Option<f64>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Scene list for --rule import (text, one name per line, a JSON array, or a regime .parquet).
    #[arg(long)]
    list: Option<PathBuf>,
    /// Leave out the scenes of these regimes (name in the store, or .parquet path).
    #[arg(long, visible_alias = "disjoint-from")]
    exclude: Vec<String>,
    /// Draw only from the scenes of these regimes (name in the store, or .parquet path), e.g. a
    /// region's scenes imported from a list; --percent is then a share of them.
    #[arg(long)]
    within: Vec<String>,
    /// pretrain, finetune, val or test.
    #[arg(long, default_value = "finetune")]
    role: String,
    /// Draw from the test release's scenes too (a test regime always does; others hold them
    /// out, so that no training sees the AutoICE test scenes).
    #[arg(long)]
    include_test: bool,
    /// Write nested regimes NAME_01, NAME_05, … for these percents in one go (with --counts,
    /// --out is then a folder).
    #[arg(long, value_delimiter = ',')]
    ladder: Vec<f64>,
    /// Also list the regime's patches (with --store): the loader then draws only these.
    #[arg(long, requires = "store")]
    patches: bool,
    /// With --patches: least valid-SAR fraction of a listed patch (1.0 = no NaN, SAR-IceFM).
    #[arg(long, default_value_t = 0.5, requires = "patches")]
    min_valid: f32,
    /// With --patches: levels to list (default: every level of the store), e.g. 80,200.
    #[arg(long, requires = "patches")]
    levels: Option<String>,
    /// Replace a regime of the same name that lists other scenes (runs name regimes, so
    /// this changes what they refer to).
    #[arg(long)]
    force: bool,
}

/// Run `icefm regime`.
pub fn cmd_regime(a: RegimeArgs) -> Result<ExitCode> {
    match a.sub {
        Some(RegimeSub::Check { a, b, store }) => check(&a, &b, store.as_deref()),
        None => draw_args(a.draw).map(|_| ExitCode::SUCCESS),
    }
}

fn check(a: &str, b: &str, store: Option<&Path>) -> Result<ExitCode> {
    let ra = Regime::open(store, a)?;
    let rb = Regime::open(store, b)?;
    let shared = shared_scenes(&ra, &rb);
    if shared.is_empty() {
        let n = |r: &Regime| {
            let k = r.scenes.len();
            format!("{k} scene{}", if k == 1 { "" } else { "s" })
        };
        println!(
            "{} ({}) and {} ({}) are disjoint",
            ra.name,
            n(&ra),
            rb.name,
            n(&rb)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{} and {} share {} scene(s): {}",
            ra.name,
            rb.name,
            shared.len(),
            shared.join(", ")
        );
        Ok(ExitCode::from(1))
    }
}

fn draw_args(a: DrawArgs) -> Result<()> {
    let (table, store) = match (&a.store, &a.counts) {
        (Some(s), None) => {
            crate::manifest::warn_if_unmerged(s);
            (SceneTable::from_store(s)?, Some(s.as_path()))
        }
        (None, Some(c)) => (SceneTable::from_counts_csv(c)?, None),
        _ => bail!("give --store STORE, or --counts CSV with --out FILE"),
    };
    let name = match (&a.name, &a.out) {
        (Some(n), _) => n.clone(),
        (None, Some(o)) if store.is_none() => o
            .file_stem()
            .and_then(|s| s.to_str())
            .context("--out has no file name")?
            .to_string(),
        _ => bail!("--name is required"),
    };
    // A name is a file name and an argument of other commands: letters, digits, `_-.+`.
    if name.is_empty()
        || name.starts_with('.')
        || name.ends_with(".parquet")
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'))
    {
        bail!(
            "regime name {name:?}: use letters, digits and _ - . + (not first a dot, no \
             .parquet ending)"
        );
    }
    // Options that would be ignored are refused: they would be recorded, or taken as done.
    if a.list.is_some() && Rule::parse(&a.rule)? != Rule::Import {
        bail!(
            "--list is for --rule import (this regime draws by rule {})",
            a.rule
        );
    }
    if store.is_some() && a.out.is_some() {
        bail!(
            "--out is for planning with --counts: a regime of a store is written to \
             STORE/regimes/NAME.parquet"
        );
    }
    if store.is_none() && (a.patches || a.levels.is_some()) {
        bail!("--patches and --levels list a store's patches: give --store, not --counts");
    }
    if let (None, Some(o)) = (store, &a.out)
        && a.ladder.is_empty()
        && o.extension().is_none_or(|e| e != "parquet")
    {
        bail!(
            "--out {}: a regime file ends in .parquet (other commands take it by that ending)",
            o.display()
        );
    }
    if let Some(p) = a
        .ladder
        .iter()
        .enumerate()
        .find_map(|(i, p)| a.ladder[..i].contains(p).then_some(p))
    {
        bail!("--ladder names {p} twice");
    }
    let exclude = a
        .exclude
        .iter()
        .map(|e| Regime::open(store, e))
        .collect::<Result<Vec<_>, _>>()?;
    let mut within: Vec<Regime> = Vec::new();
    for w in &a.within {
        let r = Regime::open(store, w)?;
        // Named twice (or by name and by path): once.
        if !within
            .iter()
            .any(|o| o.name == r.name && o.scenes == r.scenes)
        {
            within.push(r);
        }
    }
    let spec = RegimeSpec {
        name,
        rule: Rule::parse(&a.rule)?,
        percent: a.percent,
        seed: a.seed,
        role: Role::parse(&a.role)?,
        list: a.list.clone(),
        exclude,
        within,
        include_test: a.include_test,
    };
    let percents: Vec<Option<f64>> = if a.ladder.is_empty() {
        vec![a.percent]
    } else {
        if a.percent.is_some() {
            bail!("give --percent or --ladder, not both");
        }
        a.ladder.iter().map(|&p| Some(p)).collect()
    };
    let mut regimes = if a.ladder.is_empty() {
        vec![draw(&table, &spec)?]
    } else {
        draw_ladder(&table, &spec, &percents)?
    };
    if let Some(s) = store {
        warn_of_held_out_overlap(s, &regimes, &a.exclude);
    }
    if let (true, Some(s)) = (a.patches, store) {
        let levels = match &a.levels {
            Some(l) => Level::parse_list(l)?,
            None => Vec::new(),
        };
        for r in &mut regimes {
            list_patches(r, s, &levels, a.min_valid)?;
        }
    }
    let mut paths = Vec::with_capacity(regimes.len());
    for r in &regimes {
        paths.push(match (store, &a.out) {
            (Some(s), _) => Regime::path_in(s, &r.name),
            (None, Some(o)) if !a.ladder.is_empty() => o.join(format!("{}.parquet", r.name)),
            (None, Some(o)) => o.clone(),
            (None, None) => bail!("--out is required with --counts"),
        });
    }
    // One draw at a time writes a local store's regimes: another's files are not compared,
    // replaced or restored under it (held to the end of this function).
    let _lock = match store {
        Some(s) => lock_regimes(s)?,
        None => None,
    };
    // The files there now, read once: compared with the new regimes, and kept to restore.
    let before = paths
        .iter()
        .map(|p| icefm_dataset::location::read_seen(p))
        .collect::<std::io::Result<Vec<_>>>()
        .context("reading the regime files to be replaced")?;
    // Nothing is written unless every regime may be.
    let replaced = replaced_regimes(&regimes, &paths, &before, a.force)?;
    // Every file is written before any summary is printed; a write that fails takes back what
    // this command wrote (new files removed, replaced ones restored), so a ladder is written
    // whole or not at all. A new name is created only where no file is, and a file is
    // replaced only while it is what was read (in object storage; a local store's draws take
    // turns): of two commands drawing one name at once, the second to write fails.
    let mut wrote = Vec::with_capacity(regimes.len());
    for (k, (r, path)) in regimes.iter().zip(&paths).enumerate() {
        let written = match &before[k] {
            Some(seen) => r.write_replacing(path, seen).map(Some),
            None => r.write_new(path).map(|()| None),
        };
        match written {
            Ok(w) => wrote.push(w),
            Err(e) => {
                let mut lost = Vec::new();
                for ((p, old), ours) in paths.iter().zip(&before).zip(&wrote) {
                    // A replaced file is restored only while it is what this command wrote.
                    let undone = match (old, ours) {
                        (Some(old), Some(ours)) => {
                            icefm_dataset::location::write_replacing(p, old.bytes.to_vec(), ours)
                                .map(|_| ())
                        }
                        _ => icefm_dataset::location::remove(p),
                    };
                    if let Err(u) = undone {
                        lost.push(format!("{}: {u}", p.display()));
                    }
                }
                return Err(anyhow::Error::new(e).context(match (k, lost.is_empty()) {
                    (0, _) => "nothing was written".to_string(),
                    (_, true) => format!(
                        "the {k} regime file(s) written before it were taken back (new ones \
                     removed, replaced ones restored)"
                    ),
                    (_, false) => format!(
                        "the {k} regime file(s) written before it could not all be taken back: {}",
                        lost.join("; ")
                    ),
                }));
            }
        }
    }
    // Said once they are replaced: a draw that fails has replaced nothing.
    for name in &replaced {
        eprintln!("replaced regime {name} (--force)");
    }
    for (r, path) in regimes.iter().zip(&paths) {
        print!("{}", summary(r, &table));
        println!("  written: {}", path.display());
    }
    if let Some(s) = store {
        for name in &replaced {
            for other in list_regimes(s) {
                if replaced.contains(&other) {
                    continue;
                }
                let Ok(o) = Regime::open(Some(s), &other) else {
                    continue;
                };
                if o.excluded.iter().any(|e| e == name) {
                    eprintln!(
                        "warning: regime {other} was drawn excluding {name}'s old scenes; \
                         `icefm regime check {other} {name}` says whether they are still disjoint"
                    );
                }
                if o.within.iter().any(|e| e == name) {
                    eprintln!(
                        "warning: regime {other} was drawn within {name}'s old scenes, and may \
                         now hold scenes outside it; draw it again (--force) to draw it within \
                         the new ones"
                    );
                }
            }
        }
    }
    Ok(())
}

/// A warning for each drawn regime that `icefm train` would refuse for sharing scenes with a
/// test or validation regime of the store (not excluded with `--exclude`): said now, not when
/// a run starts.
fn warn_of_held_out_overlap(store: &Path, regimes: &[Regime], excluded: &[String]) {
    for other in list_regimes(store) {
        let Ok(o) = Regime::open(Some(store), &other) else {
            continue;
        };
        if excluded.contains(&other) || !matches!(o.role, Role::Test | Role::Val) {
            continue;
        }
        let theirs: std::collections::BTreeSet<&str> =
            o.scenes.iter().map(String::as_str).collect();
        for r in regimes
            .iter()
            .filter(|r| r.name != o.name && r.role != Role::Test)
        {
            if r.role == Role::Val && o.role == Role::Val {
                continue;
            }
            let n = r
                .scenes
                .iter()
                .filter(|s| theirs.contains(s.as_str()))
                .count();
            if n > 0 {
                // What training makes of it depends on the other regime's role.
                let train = if o.role == Role::Test {
                    "`icefm train` refuses it".to_string()
                } else {
                    format!(
                        "`icefm train` refuses it with seg.val_regime = {}, and warns otherwise",
                        o.name
                    )
                };
                eprintln!(
                    "warning: regime {} shares {n} scene(s) with the {} regime {}: {train}; draw \
                     it with --exclude {}",
                    r.name,
                    o.role.name(),
                    o.name,
                    o.name
                );
            }
        }
    }
}

/// The lock file of a local store's regime draws, in its regimes folder.
pub(crate) const REGIMES_LOCK: &str = ".lock";

/// An exclusive lock on a local store's regimes (`regimes/.lock`), taken before a draw reads the
/// files it replaces and held until its files are written (or restored): two draws of one name
/// at once run one after the other, so neither restores or replaces the other's files unseen.
/// A draw that finds it taken says so and waits. None for a store in object storage (but a
/// `file://` one, a local folder), which has no such lock.
fn lock_regimes(store: &Path) -> Result<Option<std::fs::File>> {
    // A `file://` URL names a local folder: its draws take turns on the same lock.
    let store = match icefm_dataset::location::file_url_path(store) {
        Some(local) => local,
        None if icefm_dataset::location::is_url(store) => return Ok(None),
        None => store.to_path_buf(),
    };
    let dir = store.join(icefm_dataset::regime::REGIMES_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(REGIMES_LOCK);
    let file = icefm_model::files::open_lock_file(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!(
                "waiting for another regime draw on {} to finish ({})",
                store.display(),
                path.display()
            );
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(e)) => {
            // A file system without locks: draw as before, unguarded.
            eprintln!(
                "warning: {} cannot be locked ({e}): a regime draw running at the same time \
                 could replace this one's files",
                path.display()
            );
        }
    }
    Ok(Some(file))
}

/// The names of the regimes among `regimes` whose files (`paths`, what was read of them
/// `before`, none where no file is) exist with other scenes, role or patches: an error unless
/// `force`. A file that reads back as the same regime (drawn again with the same rule and seed)
/// is no change.
fn replaced_regimes(
    regimes: &[Regime],
    paths: &[PathBuf],
    before: &[Option<icefm_dataset::location::Seen>],
    force: bool,
) -> Result<Vec<String>> {
    let mut replaced = Vec::new();
    let mut differences = Vec::new();
    for ((r, path), old) in regimes.iter().zip(paths).zip(before) {
        let Some(old) = old else {
            continue;
        };
        // What differs, in words: the scenes, the role, the patch lists.
        let differs: Vec<String> = match Regime::from_bytes(path, old.bytes.clone()) {
            Ok(old) => [
                (old.scenes != r.scenes).then(|| "other scenes".to_string()),
                (old.role != r.role)
                    .then(|| format!("another role ({}, not {})", old.role.name(), r.role.name())),
                (old.patches != r.patches).then(|| "other patches".to_string()),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Err(e) => vec![format!("a file that does not read as a regime ({e})")],
        };
        if !differs.is_empty() {
            differences.push(format!("{} exists with {}", r.name, differs.join(" and ")));
            replaced.push(r.name.clone());
        }
    }
    if !replaced.is_empty() && !force {
        bail!(
            "{} (runs and other regimes may name {}); choose another --name, or --force to \
             replace {}",
            differences.join("; "),
            if replaced.len() == 1 { "it" } else { "them" },
            if replaced.len() == 1 { "it" } else { "them" },
        );
    }
    Ok(replaced)
}

/// `icefm inspect STORE --regime NAME`: the regime's summary against its store.
pub fn inspect_regime(store: &Path, name: &str) -> Result<()> {
    let table = SceneTable::from_store(store)?;
    let r = Regime::open(Some(store), name)?;
    // A regime of another store (or a plan) is refused before a summary of it would mislead.
    let missing: Vec<&String> = r
        .scenes
        .iter()
        .filter(|s| table.index_of(s).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "regime {name} names {} scene(s) not in the store ({}): drawn from another store \
             or a class-count table ({})",
            missing.len(),
            icefm_schemas::names::first_few(&missing, 5),
            r.source
        );
    }
    print!("{}", summary(&r, &table));
    if r.source_hash != table.source_hash {
        println!(
            "  note: the store's manifests changed since this regime was drawn (scenes added, \
             removed or ingested again)"
        );
    }
    let others = list_regimes(store);
    println!("  regimes in the store: {}", others.join(", "));
    Ok(())
}

/// The demo's regimes, pairwise disjoint: `test` (a quarter of the scenes, held out), `val`
/// (a quarter of the rest, for model selection), `ft` (half of what is left then, by
/// SAR-IceFM's class coverage: the labelled scenes) and `pt` (the rest, for pre-training). Of
/// 12 scenes: 3, 2, 3 and 4. Shares count the scenes left once test and validation are held
/// out.
pub fn demo_regimes(store: &Path) -> Result<()> {
    let table = SceneTable::from_store(store)?;
    let mut drawn: Vec<Regime> = Vec::new();
    for (name, rule, percent, role) in [
        ("test", Rule::Fraction, Some(25.0), Role::Test),
        ("val", Rule::Fraction, Some(25.0), Role::Val),
        ("ft", Rule::Coverage, Some(50.0), Role::Finetune),
        ("pt", Rule::All, None, Role::Pretrain),
    ] {
        let spec = RegimeSpec {
            name: name.into(),
            rule,
            percent,
            seed: 0,
            role,
            list: None,
            exclude: drawn.clone(),
            within: Vec::new(),
            include_test: false,
        };
        let r = draw(&table, &spec)?;
        r.write(&Regime::path_in(store, &r.name))?;
        print!("{}", summary(&r, &table));
        drawn.push(r);
    }
    for (i, a) in drawn.iter().enumerate() {
        for b in &drawn[i + 1..] {
            if !shared_scenes(a, b).is_empty() {
                bail!("demo regimes {} and {} overlap", a.name, b.name);
            }
        }
    }
    println!("  test, val, ft and pt are pairwise disjoint (icefm regime check A B --store …)");
    Ok(())
}

/// The names of a store's regimes, sorted; or, where they cannot be listed, the line that says
/// why (`regimes: …`).
pub fn regime_names(store: &Path) -> Result<Vec<String>, String> {
    let dir = store.join(icefm_dataset::regime::REGIMES_DIR);
    if !icefm_dataset::location::lists_folders(store) {
        return Err(
            "regimes: not listed over HTTP, which lists no folder; `icefm inspect STORE \
                --regime NAME` reads one by name"
                .to_string(),
        );
    }
    match icefm_dataset::location::list(&dir) {
        Ok(files) => {
            let mut names: Vec<String> = files
                .iter()
                .filter_map(|f| f.strip_suffix(".parquet").map(str::to_string))
                .collect();
            names.sort();
            Ok(names)
        }
        Err(e) => {
            // The first line only: a server's error may quote its whole HTML page.
            let e = e.to_string();
            let first: String = e.lines().next().unwrap_or("").chars().take(160).collect();
            Err(format!(
                "regimes: cannot be listed at {} ({}); `icefm inspect STORE --regime NAME` \
                 reads one by name",
                dir.display(),
                first.trim_end_matches([':', ' '])
            ))
        }
    }
}

/// The regimes of `store`, one line each (name, role, rule, scenes), for `icefm inspect
/// STORE`; empty when it has none. A regime that cannot be read is listed as such.
pub fn regimes_block(store: &Path) -> String {
    use std::fmt::Write as _;
    let names = match regime_names(store) {
        Ok(names) => names,
        Err(line) => return format!("\n{line}\n"),
    };
    if names.is_empty() {
        return String::new();
    }
    let mut o = format!(
        "\nregimes ({}; `icefm inspect STORE --regime NAME` for one):\n  {:<20} {:<9} {:<20} {:>6}\n",
        names.len(),
        "name",
        "role",
        "rule",
        "scenes"
    );
    for name in names {
        match Regime::open(Some(store), &name) {
            Ok(r) => {
                let mut rule = r.rule.name().to_string();
                if let Some(p) = r.percent {
                    let _ = write!(rule, " {p}%");
                }
                if r.patch_filter.is_some() {
                    rule.push_str(", patches");
                }
                let _ = writeln!(
                    o,
                    "  {:<20} {:<9} {:<20} {:>6}",
                    r.name,
                    r.role.name(),
                    rule,
                    r.scenes.len()
                );
            }
            Err(e) => {
                let _ = writeln!(o, "  {name:<20} cannot be read: {e}");
            }
        }
    }
    o
}
