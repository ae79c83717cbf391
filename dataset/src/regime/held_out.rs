//! What a training run may read: never a test or validation regime, never its own validation
//! scenes, and, unless its regime was drawn to, never the test release.

use std::collections::BTreeSet;
use std::path::Path;

use crate::error::DatasetError;
use crate::table::SceneTable;

use super::{Regime, Role, Rule, regime_error};

/// The scenes a training run reads, and what was held out of them.
#[derive(Debug, Clone)]
pub struct TrainingScenes {
    /// The regime the loader reads: the run's own, or (without one) every scene of the store
    /// but the held-out ones, as a regime named `every scene`.
    pub regime: Regime,
    /// Scenes of the test release left out (without a regime of the run's own).
    pub held_out_test: usize,
    /// Scenes of the validation regime left out (without a regime of the run's own).
    pub held_out_val: usize,
}

/// Name of the regime [`training_scenes`] makes when the run names none.
pub const EVERY_SCENE: &str = "every scene";

fn list(ids: &[&str]) -> String {
    let mut s = ids.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if ids.len() > 5 {
        s.push_str(", …");
    }
    s
}

/// The scenes a run trains on, from `store`: `regime` (its `data.regime`), checked, or every
/// complete scene but the test release's and `val`'s. Errors:
/// - `regime` is a test or validation regime;
/// - `regime` shares scenes with `val` (model selection on scenes it trained on);
/// - `regime` holds scenes of the test release but was not drawn with `--include-test` (a
///   regime drawn before icefm held them out).
pub fn training_scenes(
    store: &Path,
    regime: Option<Regime>,
    val: Option<&Regime>,
) -> Result<TrainingScenes, DatasetError> {
    let table = SceneTable::from_store(store)?;
    let val_ids: BTreeSet<&str> = val
        .map(|v| v.scenes.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let Some(regime) = regime else {
        let complete: BTreeSet<String> =
            crate::loader::complete_scenes(store)?.into_iter().collect();
        let mut held_out_test = 0;
        let mut held_out_val = 0;
        let mut scenes = Vec::new();
        for e in table.scenes.iter().filter(|e| complete.contains(&e.id)) {
            if e.is_test() {
                held_out_test += 1;
            } else if val_ids.contains(e.id.as_str()) {
                held_out_val += 1;
            } else {
                scenes.push(e.id.clone());
            }
        }
        if scenes.is_empty() {
            return Err(regime_error(format!(
                "{}: no scene to train on: its {} complete scene(s) are all of the test release \
                 or the validation regime",
                store.display(),
                complete.len()
            )));
        }
        let regime = Regime {
            name: EVERY_SCENE.to_string(),
            role: Role::Pretrain,
            rule: Rule::All,
            percent: None,
            seed: 0,
            list: None,
            excluded: val.map(|v| v.name.clone()).into_iter().collect(),
            source: store.display().to_string(),
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
            held_out_val,
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
    let shared: Vec<&str> = regime
        .scenes
        .iter()
        .map(String::as_str)
        .filter(|s| val_ids.contains(s))
        .collect();
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
    if !regime.include_test {
        let test: Vec<&str> = regime
            .scenes
            .iter()
            .map(String::as_str)
            .filter(|s| table.index_of(s).is_some_and(|i| table.scenes[i].is_test()))
            .collect();
        if !test.is_empty() {
            return Err(regime_error(format!(
                "data.regime `{}` holds {} scene(s) of the test release ({}), and was not drawn \
                 with --include-test: draw it again (`icefm regime … --force` holds them out), \
                 or with --include-test if training on them is meant",
                regime.name,
                test.len(),
                list(&test)
            )));
        }
    }
    Ok(TrainingScenes {
        regime,
        held_out_test: 0,
        held_out_val: 0,
    })
}
