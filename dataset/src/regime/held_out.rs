//! What a training run may read and select on: never the test release (unless its regime was
//! drawn to hold it), never a test regime's scenes, never its own validation scenes; and no
//! model selection on test scenes.

use std::collections::BTreeSet;
use std::path::Path;

use icefm_schemas::names::first_few;

use crate::error::DatasetError;
use crate::table::SceneTable;

use super::{Regime, Role, Rule, regime_error};

/// The scenes a training run reads, and what was held out of them.
#[derive(Debug, Clone)]
pub struct TrainingScenes {
    /// The regime the loader reads: the run's own, or (without one) every scene of the store
    /// but the held-out ones, as a regime named [`EVERY_SCENE`].
    pub regime: Regime,
    /// Scenes of the test release left out (without a regime of the run's own).
    pub held_out_test: usize,
    /// Other scenes of the store's test regimes left out (without a regime of the run's own).
    pub held_out_test_regimes: usize,
    /// Scenes of the validation regime left out (without a regime of the run's own): its
    /// `seg.val_regime`, or for a run without one every val regime of the store.
    pub held_out_val: usize,
    /// What the run should be told before it starts (on stderr and in its log): a
    /// `seg.val_regime` not drawn as a val regime, say, and what the loader found
    /// ([`crate::Loader::padding_notes`]).
    pub warnings: Vec<String>,
}

impl TrainingScenes {
    /// What the run reads, in words, for its log: the regime, or every scene less what was
    /// held out.
    pub fn describe(&self) -> String {
        if self.regime.name != EVERY_SCENE {
            return format!("{} ({} scenes)", self.regime.name, self.regime.scenes.len());
        }
        let mut out = vec![];
        for (n, what) in [
            (self.held_out_test, "of the test release"),
            (self.held_out_test_regimes, "of test regimes"),
            (self.held_out_val, "of validation regimes"),
        ] {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        }
        let but = if out.is_empty() {
            String::new()
        } else {
            format!(" (held out: {})", out.join(", "))
        };
        format!("every scene, {}{but}", self.regime.scenes.len())
    }
}

/// Name of the regime [`training_scenes`] makes when the run names none.
pub const EVERY_SCENE: &str = "every scene";

fn list(ids: &[&str]) -> String {
    first_few(ids, 5)
}

/// The scenes of `r` that are in `set`, in `r`'s order.
fn among<'a>(r: &'a Regime, set: &BTreeSet<&str>) -> Vec<&'a str> {
    r.scenes
        .iter()
        .map(String::as_str)
        .filter(|s| set.contains(s))
        .collect()
}

/// The store's regimes, read (one that cannot be read is an error: it may be a test or
/// validation regime a run must hold out); `Ok(Err(why))` when they cannot be listed at all
/// (a store over plain HTTP, an object-store key without the right to list).
fn store_regimes(store: &Path) -> Result<Result<Vec<Regime>, String>, DatasetError> {
    if !crate::location::lists_folders(store) {
        return Ok(Err(format!(
            "the regimes of {} cannot be listed over HTTP, so its test and validation regimes \
             are not known",
            store.display()
        )));
    }
    let names = match crate::location::list(&store.join(super::REGIMES_DIR)) {
        Ok(n) => n,
        Err(e) => {
            let e = e.to_string();
            return Ok(Err(format!(
                "the regimes of {} cannot be listed ({}), so its test and validation regimes are \
                 not known",
                store.display(),
                e.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(120)
                    .collect::<String>()
            )));
        }
    };
    names
        .iter()
        .filter_map(|n| n.strip_suffix(".parquet"))
        .map(|n| Regime::open(Some(store), n))
        .collect::<Result<Vec<_>, _>>()
        .map(Ok)
}

/// Err when `r` (a run's regime under `key`) shares scenes with a test regime of the store.
fn check_not_test(key: &str, r: &Regime, tests: &[Regime]) -> Result<(), DatasetError> {
    for t in tests.iter().filter(|t| t.name != r.name) {
        let shared = among(r, &t.scenes.iter().map(String::as_str).collect());
        if !shared.is_empty() {
            return Err(regime_error(format!(
                "{key} `{}` shares {} scene(s) with the test regime `{}` ({}): its scores would \
                 not be held-out scores. Draw it with `--exclude {}`",
                r.name,
                shared.len(),
                t.name,
                list(&shared),
                t.name
            )));
        }
    }
    Ok(())
}

/// Err when `r` (a run's regime under `key`) holds scenes of the test release without having
/// been drawn to (`--include-test`).
fn check_no_test_release(key: &str, r: &Regime, table: &SceneTable) -> Result<(), DatasetError> {
    if r.include_test {
        return Ok(());
    }
    let test: Vec<&str> = r
        .scenes
        .iter()
        .map(String::as_str)
        .filter(|s| table.index_of(s).is_some_and(|i| table.scenes[i].is_test()))
        .collect();
    if test.is_empty() {
        return Ok(());
    }
    let remedy = if r.rule == Rule::Import {
        "remove them from its list and import it again (`--force`)"
    } else {
        "draw it again (`icefm regime … --force` holds them out)"
    };
    Err(regime_error(format!(
        "{key} `{}` holds {} scene(s) of the test release ({}), and was not drawn with \
         --include-test: {remedy}, or draw it with --include-test if that is meant",
        r.name,
        test.len(),
        list(&test)
    )))
}

/// The scenes a run trains on, from `store`: `regime` (its `data.regime`), checked, or every
/// complete scene but the test release's, the store's test regimes' and `val`'s (without
/// `val`, the store's val regimes'). Errors:
/// - `regime` is a test or validation regime, or `val` is a test regime;
/// - `regime` shares scenes with `val` (model selection on scenes it trained on);
/// - `regime` or `val` shares scenes with a test regime of the store;
/// - `regime` or `val` holds scenes of the test release but was not drawn with
///   `--include-test` (a regime drawn before icefm held them out).
pub fn training_scenes(
    store: &Path,
    regime: Option<Regime>,
    val: Option<&Regime>,
) -> Result<TrainingScenes, DatasetError> {
    HeldOut::of_store(store)?.training_scenes(regime, val)
}

/// What a store holds out of training: its scenes' releases and its test and val regimes,
/// read once for any number of [`HeldOut::training_scenes`] (an ablation grid's regimes).
pub struct HeldOut {
    store: std::path::PathBuf,
    table: SceneTable,
    tests: Vec<Regime>,
    vals: Vec<Regime>,
    /// Why the store's regimes could not be listed, if they could not.
    unlisted: Option<String>,
}

impl HeldOut {
    /// Read `store`'s scene table and regimes.
    pub fn of_store(store: &Path) -> Result<Self, DatasetError> {
        let table = SceneTable::from_store(store)?;
        let (regimes, unlisted) = match store_regimes(store)? {
            Ok(r) => (r, None),
            Err(why) => (Vec::new(), Some(why)),
        };
        let of = |role: Role| -> Vec<Regime> {
            regimes.iter().filter(|r| r.role == role).cloned().collect()
        };
        Ok(Self {
            store: store.to_path_buf(),
            table,
            tests: of(Role::Test),
            vals: of(Role::Val),
            unlisted,
        })
    }

    /// [`training_scenes`] in this store.
    pub fn training_scenes(
        &self,
        regime: Option<Regime>,
        val: Option<&Regime>,
    ) -> Result<TrainingScenes, DatasetError> {
        let (store, table, tests) = (self.store.as_path(), &self.table, &self.tests);
        if let Some(why) = &self.unlisted {
            // Without them, every scene would include theirs; a named regime trains, unchecked
            // against them.
            let Some(r) = &regime else {
                return Err(regime_error(format!(
                    "{why}: name the regime to train on (--regime), or train from the store's \
                     folder or an s3:// copy, which list their regimes"
                )));
            };
            let mut t = checked(store, table, tests, &self.vals, regime.clone(), val)?;
            t.warnings.push(format!(
                "{why}: data.regime `{}` is not checked against them",
                r.name
            ));
            return Ok(t);
        }
        checked(store, table, tests, &self.vals, regime, val)
    }
}

fn checked(
    store: &Path,
    table: &SceneTable,
    tests: &[Regime],
    store_vals: &[Regime],
    regime: Option<Regime>,
    val: Option<&Regime>,
) -> Result<TrainingScenes, DatasetError> {
    let mut warnings = Vec::new();
    if let Some(v) = val {
        if v.role == Role::Test {
            return Err(regime_error(format!(
                "seg.val_regime `{}` is a test regime: the best checkpoint would be chosen on \
                 the scenes it is scored on; give a val regime",
                v.name
            )));
        }
        check_no_test_release("seg.val_regime", v, table)?;
        check_not_test("seg.val_regime", v, tests)?;
        if v.role != Role::Val {
            warnings.push(format!(
                "seg.val_regime `{}` is a {} regime, not a val one: training holds its scenes \
                 out and chooses the best checkpoint on them; draw validation scenes with \
                 `icefm regime … --role val` (then other regimes can --exclude them)",
                v.name,
                v.role.name()
            ));
        }
    }
    let val_ids: BTreeSet<&str> = val
        .map(|v| v.scenes.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let Some(regime) = regime else {
        // Without a val regime of its own (an MAE run), the store's validation regimes are
        // held out too: their scenes choose the fine-tuned models.
        let store_vals = if val.is_none() { store_vals } else { &[] };
        let val_ids: BTreeSet<&str> = val_ids
            .iter()
            .copied()
            .chain(
                store_vals
                    .iter()
                    .flat_map(|v| v.scenes.iter().map(String::as_str)),
            )
            .collect();
        let test_ids: BTreeSet<&str> = tests
            .iter()
            .flat_map(|t| t.scenes.iter().map(String::as_str))
            .collect();
        let (mut held_out_test, mut held_out_test_regimes, mut held_out_val) = (0, 0, 0);
        let mut scenes = Vec::new();
        // The table is the scenes manifest's: the complete scenes.
        for e in &table.scenes {
            if e.is_test() {
                held_out_test += 1;
            } else if test_ids.contains(e.id.as_str()) {
                held_out_test_regimes += 1;
            } else if val_ids.contains(e.id.as_str()) {
                held_out_val += 1;
            } else {
                scenes.push(e.id.clone());
            }
        }
        if scenes.is_empty() {
            return Err(regime_error(format!(
                "{}: no scene to train on: its {} complete scene(s) are all of the test release, \
                 of test regimes or of the validation regime. Train on a regime drawn with \
                 --include-test if that is meant (`--regime NAME`)",
                store.display(),
                table.scenes.len()
            )));
        }
        let regime = Regime {
            name: EVERY_SCENE.to_string(),
            role: Role::Pretrain,
            rule: Rule::All,
            percent: None,
            seed: 0,
            list: None,
            excluded: tests
                .iter()
                .map(|t| t.name.clone())
                .chain(val.map(|v| v.name.clone()))
                .chain(store_vals.iter().map(|v| v.name.clone()))
                .collect(),
            within: Vec::new(),
            source: crate::location::recorded(store),
            source_hash: table.source_hash.clone(),
            scenes,
            notes: Vec::new(),
            include_test: false,
            patch_filter: None,
            patches: None,
        };
        return Ok(TrainingScenes {
            regime,
            held_out_test,
            held_out_test_regimes,
            held_out_val,
            warnings,
        });
    };
    if matches!(regime.role, Role::Test | Role::Val) {
        return Err(regime_error(format!(
            "data.regime `{}` is a {} regime: a run trains on pretrain or finetune regimes, \
             and is scored on test and validation ones",
            regime.name,
            regime.role.name()
        )));
    }
    let shared = among(&regime, &val_ids);
    if let (false, Some(v)) = (shared.is_empty(), val) {
        return Err(regime_error(format!(
            "data.regime `{}` and seg.val_regime `{}` share {} scene(s) ({}): the best \
             checkpoint would be chosen on scenes it trained on. Draw the training regime with \
             `--exclude {}`",
            regime.name,
            v.name,
            shared.len(),
            list(&shared),
            v.name
        )));
    }
    check_no_test_release("data.regime", &regime, table)?;
    check_not_test("data.regime", &regime, tests)?;
    // The store's other val regimes: an MAE pre-trained on their scenes, or a model trained on
    // them and validated elsewhere, is later chosen or scored on scenes it has seen.
    for v in store_vals
        .iter()
        .filter(|v| val.is_none_or(|own| own.name != v.name))
    {
        let ids: BTreeSet<&str> = v.scenes.iter().map(String::as_str).collect();
        let shared = among(&regime, &ids);
        if !shared.is_empty() {
            warnings.push(format!(
                "data.regime `{}` shares {} scene(s) with the store's val regime `{}` ({}): \
                 a model trained on them is later chosen or scored on scenes it has seen; draw \
                 the regime with `--exclude {}` unless that is meant",
                regime.name,
                shared.len(),
                v.name,
                list(&shared),
                v.name
            ));
        }
    }
    Ok(TrainingScenes {
        regime,
        held_out_test: 0,
        held_out_test_regimes: 0,
        held_out_val: 0,
        warnings,
    })
}
