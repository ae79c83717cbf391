//! Drawing a regime's scenes: the pool a rule draws from, seeded random and stratified orders,
//! SAR-IceFM's greedy class coverage, shares and ladders of nested regimes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_schema::{DataType, Field};
use icefm_schemas::Task;
use icefm_schemas::names::first_few;

use crate::error::DatasetError;
use crate::rng::Rng;
use crate::table::SceneTable;

use super::{Regime, RegimeSpec, Role, Rule, read_scene_list_with_repeats, regime_error};

/// Whether a regime drawn by `spec` holds the test release's scenes out: every role but test,
/// unless asked (`--include-test`).
fn holds_test_out(spec: &RegimeSpec) -> bool {
    spec.role != Role::Test && !spec.include_test
}

/// Which scenes of `table` a regime of `spec` may hold at all: a test regime the test
/// release's (every scene when the table has none, to split a training release, and any scene
/// an imported list names); other roles
/// every scene but the test release's, unless `--include-test`.
/// With `--within`, only the scenes of those regimes.
fn eligible(table: &SceneTable, spec: &RegimeSpec) -> Vec<bool> {
    let has_test = table.scenes.iter().any(|e| e.is_test());
    let within = within_scenes(spec);
    table
        .scenes
        .iter()
        .map(|e| {
            (spec.within.is_empty() || within.contains(e.id.as_str()))
                && match spec.role {
                    // An imported test list is taken as it is.
                    Role::Test => spec.rule == Rule::Import || !has_test || e.is_test(),
                    _ => !holds_test_out(spec) || !e.is_test(),
                }
        })
        .collect()
}

/// The scenes of the `--within` regimes (their union); empty without them.
fn within_scenes(spec: &RegimeSpec) -> BTreeSet<&str> {
    spec.within
        .iter()
        .flat_map(|r| r.scenes.iter().map(String::as_str))
        .collect()
}

/// Candidate scene indices: the `ok` ([`eligible`]) scenes minus the excluded regimes' scenes.
fn pool(table: &SceneTable, spec: &RegimeSpec, ok: &[bool]) -> Vec<usize> {
    let out: BTreeSet<&str> = spec
        .exclude
        .iter()
        .flat_map(|r| r.scenes.iter().map(String::as_str))
        .collect();
    (0..table.scenes.len())
        .filter(|&i| ok[i] && !out.contains(table.scenes[i].id.as_str()))
        .collect()
}

/// N, the number of scenes a share is of: the `ok` ([`eligible`]) scenes minus those of
/// excluded validation and test regimes. A fine-tune share and its pre-train complement (drawn
/// excluding it) then add up to the whole training pool, as SAR-IceFM's `finetune_XX` /
/// `pretrain_(100−XX)` lists do.
fn share_base(table: &SceneTable, spec: &RegimeSpec, ok: &[bool]) -> usize {
    let held: BTreeSet<&str> = spec
        .exclude
        .iter()
        .filter(|r| matches!(r.role, Role::Val | Role::Test))
        .flat_map(|r| r.scenes.iter().map(String::as_str))
        .collect();
    (0..table.scenes.len())
        .filter(|&i| ok[i] && !held.contains(table.scenes[i].id.as_str()))
        .count()
}

/// Seeded random order.
fn random_order(pool: &[usize], seed: u64) -> Vec<usize> {
    let mut v = pool.to_vec();
    Rng::new(seed, 0).shuffle(&mut v);
    v
}

/// Seeded order whose every prefix is balanced over ice service × season: each step takes the
/// next scene of the stratum furthest behind its proportional share.
fn stratified_order(table: &SceneTable, pool: &[usize], seed: u64) -> Vec<usize> {
    let mut strata: BTreeMap<(String, &'static str), Vec<usize>> = BTreeMap::new();
    for &i in pool {
        let e = &table.scenes[i];
        strata
            .entry((e.service.clone(), e.season()))
            .or_default()
            .push(i);
    }
    let lists: Vec<Vec<usize>> = strata
        .into_values()
        .enumerate()
        .map(|(k, mut v)| {
            Rng::new(seed, k as u64 + 1).shuffle(&mut v);
            v
        })
        .collect();
    let mut taken = vec![0usize; lists.len()];
    let mut out = Vec::with_capacity(pool.len());
    while out.len() < pool.len() {
        let mut best: Option<(usize, f64)> = None;
        for (k, l) in lists.iter().enumerate() {
            if taken[k] < l.len() {
                let ratio = (taken[k] as f64 + 1.0) / l.len() as f64;
                if best.is_none_or(|(_, b)| ratio < b) {
                    best = Some((k, ratio));
                }
            }
        }
        let Some((k, _)) = best else { break };
        out.push(lists[k][taken[k]]);
        taken[k] += 1;
    }
    out
}

/// SAR-IceFM's greedy class coverage. Each round takes, for each task in turn, the rarest class
/// (fewest pixels over the candidates) that the picked scenes do not hold yet, and adds the
/// candidate holding it that also holds the most other uncovered classes (ties: seeded random
/// order). Rounds stop when every class present among the candidates is held; the rest follow in
/// seeded random order. Returns the order and the length of its coverage part.
fn coverage_order(table: &SceneTable, pool: &[usize], seed: u64) -> (Vec<usize>, usize) {
    let random = random_order(pool, seed);
    let totals = table.class_totals(pool.iter().copied());
    // Uncovered classes: (task, class) present among the candidates.
    let mut uncovered: BTreeSet<(usize, usize)> = BTreeSet::new();
    for t in Task::ALL {
        let ch = t.channel();
        let present = totals[ch][..t.n_classes()].iter().enumerate();
        uncovered.extend(present.filter(|(_, p)| **p > 0).map(|(c, _)| (ch, c)));
    }
    let mut picked: Vec<usize> = Vec::new();
    let mut used = BTreeSet::new();
    while !uncovered.is_empty() {
        for t in Task::ALL {
            let ch = t.channel();
            let rarest = uncovered
                .iter()
                .filter(|(k, _)| *k == ch)
                .min_by_key(|&&(k, c)| (totals[k][c], c))
                .copied();
            let Some((_, class)) = rarest else { continue };
            let gain = |i: usize| {
                uncovered
                    .iter()
                    .filter(|&&(k, c)| table.scenes[i].pixels[k][c] > 0)
                    .count()
            };
            // First maximum in the random order: the seeded tie-break.
            let mut best: Option<(usize, usize)> = None;
            for &i in &random {
                if !used.contains(&i) && table.scenes[i].holds(t, class) {
                    let g = gain(i);
                    if best.is_none_or(|(_, bg)| g > bg) {
                        best = Some((i, g));
                    }
                }
            }
            if let Some((i, _)) = best {
                used.insert(i);
                picked.push(i);
                uncovered.retain(|&(k, c)| table.scenes[i].pixels[k][c] == 0);
            }
        }
    }
    let n = picked.len();
    picked.extend(random.into_iter().filter(|i| !used.contains(i)));
    (picked, n)
}

/// Number of scenes for `percent` of `total`: ⌊P/100 × N⌋, as SAR-IceFM counts its shares
/// (20 % of its 493 training scenes is its 98-scene `finetune_20`), and at least one.
pub fn share_count(percent: f64, total: usize) -> usize {
    // The small term keeps a share that is whole in decimal whole in binary (29 % of 100).
    ((percent * total as f64 / 100.0 + 1e-9).floor() as usize).max(1)
}

fn check_percent(p: f64) -> Result<f64, DatasetError> {
    if p.is_finite() && p > 0.0 && p <= 100.0 {
        Ok(p)
    } else {
        Err(regime_error(format!("--percent {p} is not in (0, 100]")))
    }
}

/// Draw a regime of `percent` (or the spec's own) from `table`.
pub fn draw(table: &SceneTable, spec: &RegimeSpec) -> Result<Regime, DatasetError> {
    Ok(draw_shares(table, spec, &[spec.percent], false)?.remove(0))
}

/// Draw nested regimes, one per percent (`None`: the spec's rule without a share), from one
/// order, named `<name>_<percent>` (a ladder of one percent too, so that its name does not
/// depend on how many were asked for).
pub fn draw_ladder(
    table: &SceneTable,
    spec: &RegimeSpec,
    percents: &[Option<f64>],
) -> Result<Vec<Regime>, DatasetError> {
    draw_shares(table, spec, percents, true)
}

/// The regimes of `percents` from one order; `suffix`: name each `<name>_<percent>`.
fn draw_shares(
    table: &SceneTable,
    spec: &RegimeSpec,
    percents: &[Option<f64>],
    suffix: bool,
) -> Result<Vec<Regime>, DatasetError> {
    if table.scenes.is_empty() {
        return Err(regime_error(format!(
            "{}: no scenes to draw from",
            table.source.display()
        )));
    }
    if spec.include_test && spec.role == Role::Test {
        return Err(regime_error(
            "--include-test is for the other roles: a test regime draws from the test release \
             already (from every scene when the store has none)",
        ));
    }
    let ok = eligible(table, spec);
    let candidates = pool(table, spec, &ok);
    let base = share_base(table, spec, &ok);
    let mut notes = Vec::new();

    // With --within, the subset's scenes: the test release's among them, and those the table
    // lacks (said, not dropped silently).
    let within = within_scenes(spec);
    let inside = |id: &str| spec.within.is_empty() || within.contains(id);
    let absent: Vec<&str> = within
        .iter()
        .copied()
        .filter(|id| table.index_of(id).is_none())
        .collect();
    if !absent.is_empty() {
        notes.push(format!(
            "{} scene(s) of the --within regime(s) are not in {} and are left out: {}",
            absent.len(),
            table.source.display(),
            first_few(&absent, 10)
        ));
    }
    let tests = table
        .scenes
        .iter()
        .filter(|e| e.is_test() && inside(&e.id))
        .count();
    if tests > 0 && spec.role == Role::Test && spec.rule != Rule::Import {
        notes.push(format!(
            "a test regime: drawn from the {tests} scene(s) of the test release"
        ));
    } else if tests > 0 && spec.include_test && spec.rule != Rule::Import {
        let held = candidates
            .iter()
            .filter(|&&i| table.scenes[i].is_test())
            .count();
        notes.push(format!(
            "drawn with --include-test: {held} of its candidates are of the test release"
        ));
    } else if tests > 0 && holds_test_out(spec) {
        notes.push(format!(
            "{tests} scene(s) of the test release are held out of this {} regime \
             (--include-test draws from them too)",
            spec.role.name()
        ));
    }
    let (order, coverage_len) = match spec.rule {
        Rule::All => (candidates.clone(), 0),
        Rule::Fraction => (random_order(&candidates, spec.seed), 0),
        Rule::Stratified => (stratified_order(table, &candidates, spec.seed), 0),
        Rule::Coverage => coverage_order(table, &candidates, spec.seed),
        Rule::Import => {
            let path = spec
                .list
                .as_deref()
                .ok_or_else(|| regime_error("rule import needs --list FILE"))?;
            let (ids, repeats) = read_scene_list_with_repeats(path)?;
            if !repeats.is_empty() {
                notes.push(format!(
                    "{} scene(s) are named more than once in {} and count once: {}",
                    repeats.len(),
                    path.display(),
                    first_few(&repeats, 5)
                ));
            }
            let missing: Vec<&str> = ids
                .iter()
                .filter(|id| table.index_of(id).is_none())
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(regime_error(format!(
                    "{}: {} of {} listed scenes are not in {}: {}",
                    path.display(),
                    missing.len(),
                    ids.len(),
                    table.source.display(),
                    first_few(&missing, 10)
                )));
            }
            if holds_test_out(spec) {
                let test: Vec<&str> = ids
                    .iter()
                    .filter(|id| {
                        table
                            .index_of(id)
                            .is_some_and(|i| table.scenes[i].is_test())
                    })
                    .map(String::as_str)
                    .collect();
                if !test.is_empty() {
                    return Err(regime_error(format!(
                        "{}: {} listed scene(s) are of the test release, which a {} regime \
                         holds out: {} (--role test for a test regime; --include-test to \
                         draw them anyway)",
                        path.display(),
                        test.len(),
                        spec.role.name(),
                        first_few(&test, 10)
                    )));
                }
            }
            let allowed: BTreeSet<usize> = candidates.iter().copied().collect();
            let mut order = Vec::new();
            for id in &ids {
                let i = table.index_of(id).unwrap_or(usize::MAX);
                if allowed.contains(&i) {
                    order.push(i);
                } else if !inside(id) {
                    notes.push(format!("{id} is outside --within, left out"));
                } else {
                    notes.push(format!("{id} is excluded"));
                }
            }
            (order, 0)
        }
    };
    // An imported list: the test-release scenes among those it names (said once they are
    // known).
    if tests > 0 && spec.include_test && spec.rule == Rule::Import && spec.role != Role::Test {
        let held = order.iter().filter(|&&i| table.scenes[i].is_test()).count();
        notes.push(format!(
            "drawn with --include-test: {held} of the {} scene(s) it takes are of the test release",
            order.len()
        ));
    }
    let mut out = Vec::new();
    for &p in percents {
        let mut notes = notes.clone();
        let n = match (spec.rule, p) {
            (Rule::All | Rule::Import, Some(_)) => {
                return Err(regime_error(format!(
                    "rule {} takes no --percent",
                    spec.rule.name()
                )));
            }
            (Rule::All | Rule::Import, None) => order.len(),
            (_, None) => {
                return Err(regime_error(format!(
                    "rule {} needs --percent (or --ladder)",
                    spec.rule.name()
                )));
            }
            (_, Some(p)) => {
                let p = check_percent(p)?;
                let want = share_count(p, base);
                if base != table.scenes.len() {
                    notes.push(format!(
                        "{p} % is of the {base} scene(s) a {} regime is drawn from (of {} in \
                         all; docs/regimes.md)",
                        spec.role.name(),
                        table.scenes.len()
                    ));
                }
                if p * base as f64 / 100.0 + 1e-9 < 1.0 {
                    notes.push(format!(
                        "{p} % of {base} scenes is less than one scene: the regime takes one"
                    ));
                }
                if want > order.len() {
                    notes.push(format!(
                        "{p} % of {base} scenes is {want}, but only {} not excluded: the regime \
                         takes {}",
                        if order.len() == 1 {
                            "1 scene is".to_string()
                        } else {
                            format!("{} scenes are", order.len())
                        },
                        if order.len() == 1 { "it" } else { "them all" }
                    ));
                }
                if coverage_len > want {
                    notes.push(format!(
                        "covering every class took {coverage_len} scenes, more than the {want} of {p} %"
                    ));
                }
                want.max(coverage_len).min(order.len())
            }
        };
        if n == 0 {
            let in_table = within.len() - absent.len();
            let held = if !spec.within.is_empty() && in_table == 0 {
                format!(
                    "; none of the {} scene(s) of the --within regime(s) is in {}",
                    within.len(),
                    table.source.display()
                )
            } else if !spec.within.is_empty()
                && candidates.is_empty()
                && !(tests > 0 && holds_test_out(spec))
            {
                let has_test = table.scenes.iter().any(|e| e.is_test());
                let mut why = Vec::new();
                if !spec.exclude.is_empty() {
                    why.push("--exclude removes them".to_string());
                }
                if spec.role == Role::Test && has_test && tests == 0 {
                    why.push(
                        "a test regime draws from the test release's scenes, and none is among \
                         them"
                            .to_string(),
                    );
                }
                format!(
                    "; the --within regime(s) hold {in_table} scene(s) of {}{}",
                    table.source.display(),
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", why.join("; "))
                    }
                )
            } else if spec.rule == Rule::Import {
                format!(
                    "; the list leaves none: each scene it names is excluded or held out{}, or \
                     it names none",
                    if spec.within.is_empty() {
                        ""
                    } else {
                        " or outside --within"
                    }
                )
            } else if tests > 0 && holds_test_out(spec) {
                format!(
                    "; the {tests} scene(s) of the test release are held out of a {} regime \
                     (--role test for a test regime, --include-test to draw them anyway)",
                    spec.role.name()
                )
            } else {
                String::new()
            };
            return Err(regime_error(format!(
                "regime {} would be empty ({} candidate scenes){held}",
                spec.name,
                order.len()
            )));
        }
        let name = match p {
            Some(p) if suffix => format!("{}_{}", spec.name, percent_label(p)),
            _ => spec.name.clone(),
        };
        out.push(Regime {
            name,
            role: spec.role,
            rule: spec.rule,
            percent: p,
            seed: spec.seed,
            list: spec.list.as_ref().map(|l| l.display().to_string()),
            excluded: spec.exclude.iter().map(|r| r.name.clone()).collect(),
            within: spec.within.iter().map(|r| r.name.clone()).collect(),
            source: crate::location::recorded(&table.source),
            source_hash: table.source_hash.clone(),
            scenes: order[..n]
                .iter()
                .map(|&i| table.scenes[i].id.clone())
                .collect(),
            notes,
            include_test: spec.include_test && spec.role != Role::Test,
            patch_filter: None,
            patches: None,
        });
    }
    Ok(out)
}

/// `1` → `01`, `5` → `05`, `40` → `40`, `0.5` → `0p5` (SAR-IceFM's list names use two digits).
pub fn percent_label(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{:02}", p as u64)
    } else {
        p.to_string().replace('.', "p")
    }
}

pub(super) fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}
