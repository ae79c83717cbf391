//! The test release held out: of the regimes other than test ones, and of what a run trains
//! on; never a test or validation regime to train on, never training on validation scenes.

use icefm_dataset::regime::{EVERY_SCENE, Regime, RegimeSpec, Role, Rule, draw, training_scenes};
use icefm_dataset::table::SceneTable;
use icefm_synth::Release;

use super::*;

/// Three training-release scenes (two raw, one RTT) and two of the test release (an RTT one
/// with its reference charts, a raw one without charts).
fn store_with_test_release() -> PathBuf {
    common::synth_store_of_releases(
        "held-out",
        &[
            (SceneKind::Raw, 200, 220, Release::Train),
            (SceneKind::Rtt, 120, 130, Release::Train),
            (SceneKind::Raw, 200, 220, Release::Train),
            (SceneKind::Rtt, 120, 130, Release::Test),
            (SceneKind::Raw, 200, 220, Release::Test),
        ],
        21,
        P,
    )
}

fn spec(name: &str, rule: Rule, percent: Option<f64>, role: Role) -> RegimeSpec {
    RegimeSpec {
        name: name.into(),
        rule,
        percent,
        seed: 3,
        role,
        list: None,
        exclude: vec![],
        within: vec![],
        include_test: false,
    }
}

#[test]
fn the_test_release_is_recorded_and_held_out_of_training_regimes_and_runs() {
    let store = store_with_test_release();
    let table = SceneTable::from_store(&store).unwrap();
    let test: Vec<&str> = table
        .scenes
        .iter()
        .filter(|e| e.is_test())
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(test.len(), 2, "{:?}", table.scenes);

    // Regimes: every role but test holds them out, and says so.
    let ft = draw(
        &table,
        &spec("ft", Rule::Fraction, Some(100.0), Role::Finetune),
    )
    .unwrap();
    assert_eq!(ft.scenes.len(), 3);
    assert!(ft.scenes.iter().all(|s| !test.contains(&s.as_str())));
    assert!(
        ft.notes
            .iter()
            .any(|n| n.contains("2 scene(s) of the test release are held out"))
    );
    let all = draw(&table, &spec("pt", Rule::All, None, Role::Pretrain)).unwrap();
    assert_eq!(all.scenes.len(), 3);
    // A test regime is drawn from the test release.
    let t = draw(&table, &spec("test", Rule::All, None, Role::Test)).unwrap();
    let mut got = t.scenes.clone();
    got.sort();
    assert_eq!(got, test);
    // --include-test draws from every scene, and the regime records it.
    let mut s = spec("ptx", Rule::All, None, Role::Pretrain);
    s.include_test = true;
    let ptx = draw(&table, &s).unwrap();
    assert_eq!((ptx.scenes.len(), ptx.include_test), (5, true));
    assert!(
        ptx.notes
            .iter()
            .any(|n| n.contains("drawn with --include-test: 2 of its candidates")),
        "{:?}",
        ptx.notes
    );
    // An imported list with --include-test: the test scenes among those it names.
    let mut ix = spec("ix", Rule::Import, None, Role::Pretrain);
    ix.include_test = true;
    let list = store.parent().unwrap().join("one_test.txt");
    std::fs::write(&list, format!("{}\n{}\n", test[0], ft.scenes[0])).unwrap();
    ix.list = Some(list);
    let ixr = draw(&table, &ix).unwrap();
    assert!(
        ixr.notes.iter().any(|n| n
            == "drawn with --include-test: 1 of the 2 scene(s) it takes are of the test release"),
        "{:?}",
        ixr.notes
    );
    // It means nothing to a test regime, which says so.
    let mut tx = spec("tx", Rule::All, None, Role::Test);
    tx.include_test = true;
    assert!(
        draw(&table, &tx)
            .unwrap_err()
            .to_string()
            .contains("--include-test is for")
    );
    // Shares count the pool: 2/3 of the three training scenes.
    let two = draw(
        &table,
        &spec("ft67", Rule::Fraction, Some(67.0), Role::Finetune),
    )
    .unwrap();
    assert_eq!(two.scenes.len(), 2);

    // What a run trains on: without a regime, every scene but the test release's and the
    // validation regime's.
    let mut v = spec("val", Rule::Fraction, Some(34.0), Role::Val);
    v.seed = 1;
    let val = draw(&table, &v).unwrap();
    assert_eq!(val.scenes.len(), 1);
    let every = training_scenes(&store, None, None).unwrap();
    assert_eq!(every.regime.name, EVERY_SCENE);
    assert_eq!((every.regime.scenes.len(), every.held_out_test), (3, 2));
    let every = training_scenes(&store, None, Some(&val)).unwrap();
    assert_eq!(every.regime.scenes.len(), 2);
    assert!(!every.regime.scenes.contains(&val.scenes[0]));
    assert_eq!(every.held_out_val, 1);
    assert!(every.warnings.is_empty(), "{:?}", every.warnings);
    // A regime of another role as the validation one is held out all the same, with a
    // warning that it is not a val regime.
    let mut as_val = val.clone();
    as_val.role = Role::Finetune;
    let warned = training_scenes(&store, None, Some(&as_val)).unwrap();
    assert_eq!(warned.regime.scenes, every.regime.scenes);
    assert_eq!(warned.warnings.len(), 1, "{:?}", warned.warnings);
    assert!(
        warned.warnings[0].contains("seg.val_regime `val` is a finetune regime, not a val one"),
        "{:?}",
        warned.warnings
    );
    // Refused: a test or validation regime to train on; a regime sharing the validation
    // scenes; one holding test scenes without having been drawn to.
    let refused = |r: Regime, val: Option<&Regime>| {
        training_scenes(&store, Some(r), val)
            .expect_err("must be refused")
            .to_string()
    };
    let e = refused(t.clone(), None);
    assert!(e.contains("`test` is a test regime"), "{e}");
    let e = refused(val.clone(), None);
    assert!(e.contains("is a val regime"), "{e}");
    let e = refused(ft.clone(), Some(&val));
    assert!(
        e.contains("share 1 scene(s)") && e.contains("--exclude val"),
        "{e}"
    );
    let mut old = ptx.clone();
    old.include_test = false;
    let e = refused(old, None);
    assert!(e.contains("holds 2 scene(s) of the test release"), "{e}");
    assert_eq!(
        training_scenes(&store, Some(ptx.clone()), None)
            .unwrap()
            .regime
            .scenes
            .len(),
        5
    );
    // A regime drawn excluding the validation one passes.
    let mut f = spec("ft", Rule::All, None, Role::Finetune);
    f.exclude = vec![val.clone()];
    let ft = draw(&table, &f).unwrap();
    assert_eq!(
        training_scenes(&store, Some(ft.clone()), Some(&val))
            .unwrap()
            .regime
            .scenes
            .len(),
        2
    );
    // No model selection on test scenes: a test regime as the validation one, or a validation
    // regime holding test-release scenes.
    let e = training_scenes(&store, None, Some(&t))
        .unwrap_err()
        .to_string();
    assert!(e.contains("seg.val_regime `test` is a test regime"), "{e}");
    let mut vx = spec("valx", Rule::All, None, Role::Val);
    vx.include_test = true;
    let mut leaky = draw(&table, &vx).unwrap();
    leaky.include_test = false;
    let e = training_scenes(&store, None, Some(&leaky))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("seg.val_regime `valx` holds 2 scene(s) of the test release"),
        "{e}"
    );
    // A test regime of the store's own making (a store without a test release splits its
    // training scenes so): held out of training without a regime, refused in one.
    let mut own = spec("own_test", Rule::Import, None, Role::Test);
    let list = store.parent().unwrap().join("own_test.txt");
    std::fs::write(&list, &ft.scenes[0]).unwrap();
    own.list = Some(list);
    let own = draw(&table, &own).unwrap();
    own.write(&Regime::path_in(&store, "own_test")).unwrap();
    let every = training_scenes(&store, None, Some(&val)).unwrap();
    assert_eq!(every.held_out_test_regimes, 1);
    assert_eq!(every.regime.scenes.len(), 1);
    assert!(
        every
            .describe()
            .contains("2 of the test release, 1 of test regimes, 1 of validation regimes")
    );
    // A run without a val regime of its own (an MAE) leaves the store's val regimes out too.
    val.write(&Regime::path_in(&store, "val")).unwrap();
    let mae = training_scenes(&store, None, None).unwrap();
    assert_eq!((mae.held_out_val, mae.regime.scenes.len()), (1, 1));
    std::fs::remove_file(Regime::path_in(&store, "val")).unwrap();
    let e = training_scenes(&store, Some(ft), Some(&val))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shares 1 scene(s) with the test regime `own_test`")
            && e.contains("--exclude own_test"),
        "{e}"
    );
    std::fs::remove_file(Regime::path_in(&store, "own_test")).unwrap();
    val.write(&Regime::path_in(&store, "val")).unwrap();
    // A regime of the run's own holding those val scenes trains, with a warning naming them.
    let over = training_scenes(&store, Some(all.clone()), None).unwrap();
    assert_eq!(over.regime.scenes.len(), 3);
    assert_eq!(
        over.warnings,
        [format!(
            "data.regime `pt` shares 1 scene(s) with the store's val regime `val` ({}): a model \
             trained on them is later chosen or scored on scenes it has seen; draw the regime \
             with `--exclude val` unless that is meant",
            val.scenes[0]
        )]
    );
    std::fs::remove_file(Regime::path_in(&store, "val")).unwrap();
}
