//! One worker's grids

use super::*;

#[test]
fn a_grid_trains_scores_tabulates_plots_and_resumes_without_retraining() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ladder_grid(dir.path(), "ladder");
    let out = dir.path().join("out");
    let keys = [
        "ft_34-scratch-multi-80",
        "ft_34-mae-multi-80",
        "ft_67-scratch-multi-80",
        "ft_67-mae-multi-80",
    ];

    // The dry run lists the cells and trains nothing.
    let (stdout, _) = text(&ok(ablate(&grid, &out, &["--dry-run"])));
    for (i, k) in keys.iter().enumerate() {
        assert!(
            stdout.contains(&format!("cell {}/4 {k}: ", i + 1)),
            "{stdout}"
        );
    }
    assert_eq!(stdout.matches(": new").count(), 4, "{stdout}");
    assert!(!out.join("runs").exists());

    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    for (i, k) in keys.iter().enumerate() {
        let head = format!("cell {}/4 {k}", i + 1);
        assert!(stdout.contains(&format!("{head}: started")), "{stdout}");
        assert!(
            stdout.contains(&format!("{head}: finished, combined ")),
            "{stdout}"
        );
        let run = out.join("runs").join(k);
        assert!(
            run.join("checkpoints/step_0000003/model.safetensors")
                .is_file()
        );
        assert!(run.join("result.json").is_file());
        // The encoder came from the MAE run in MAE cells only.
        let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
        if k.contains("-mae-") {
            assert!(
                log.contains("encoder: ") && log.contains("tensors from"),
                "{log}"
            );
        } else {
            assert!(log.contains("encoder: from scratch"), "{log}");
        }
    }
    assert!(out.join("grid.toml").is_file());

    let table = read_table(&out.join("ablation.parquet"));
    assert_eq!(table["key"], keys);
    assert_eq!(table["regime"], ["ft_34", "ft_34", "ft_67", "ft_67"]);
    assert_eq!(table["init"], ["scratch", "mae", "scratch", "mae"]);
    assert_eq!(table["tasks"], ["multi"; 4]);
    assert_eq!(table["levels"], ["80"; 4]);
    assert_eq!(table["steps"], ["3"; 4]);
    assert_eq!(table["scenes"], ["1", "1", "2", "2"]);
    // The pool is the three scenes outside the test regime.
    let fractions = floats(&table, "labelled_fraction");
    for (got, want) in fractions.iter().zip([1.0, 1.0, 2.0, 2.0]) {
        assert!((got - want / 3.0).abs() < 1e-12, "{fractions:?}");
    }
    let (sic, sod, floe, comb) = (
        floats(&table, "sic_r2"),
        floats(&table, "sod_f1"),
        floats(&table, "floe_f1"),
        floats(&table, "combined"),
    );
    for i in 0..4 {
        assert!(sic[i].is_finite() && sic[i] <= 1.0, "{sic:?}");
        assert!((0.0..=1.0).contains(&sod[i]), "{sod:?}");
        assert!((0.0..=1.0).contains(&floe[i]), "{floe:?}");
        assert!(comb[i].is_finite() && comb[i] <= 100.0, "{comb:?}");
        // AutoICE's weighting: (2·R² + 2·F1 + F1) / 5 × 100.
        let want = (2.0 * sic[i] + 2.0 * sod[i] + floe[i]) / 5.0 * 100.0;
        assert!((comb[i] - want).abs() < 1e-9, "{} vs {want}", comb[i]);
    }
    assert!(floats(&table, "seconds").iter().all(|s| *s > 0.0));
    assert_eq!(
        png_size(&out.join("ablation.png")),
        (PLOT_WIDTH, PLOT_HEIGHT)
    );

    // `inspect` of a cell's run shows its result.
    let (summary, _) = text(&ok(icefm()
        .arg("inspect")
        .arg(out.join("runs").join(keys[0]))
        .output()
        .unwrap()));
    assert!(
        summary.contains(&format!(
            "ablation result (result.json), on test after 3 steps: SIC R² {:.3}",
            sic[0]
        )),
        "{summary}"
    );

    // `inspect` of the grid's folder points at its results.
    let o = icefm().arg("inspect").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let (_, err) = text(&o);
    assert!(
        err.contains("an `icefm ablate` output (grid.toml)"),
        "{err}"
    );

    // Again: every cell is skipped, nothing is trained or scored, the table is the same.
    let results: Vec<PathBuf> = keys
        .iter()
        .map(|k| out.join("runs").join(k).join("result.json"))
        .collect();
    let before: Vec<SystemTime> = results.iter().map(|p| mtime(p)).collect();
    let metrics_before = mtime(&out.join("runs").join(keys[0]).join("metrics.parquet"));
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert_eq!(
        stdout.matches(": skipped, done before").count(),
        4,
        "{stdout}"
    );
    assert!(!stdout.contains("started"), "{stdout}");
    assert!(
        stdout.contains("(0 trained, 4 skipped, 0 failed)"),
        "{stdout}"
    );
    let after: Vec<SystemTime> = results.iter().map(|p| mtime(p)).collect();
    assert_eq!(before, after);
    assert_eq!(
        metrics_before,
        mtime(&out.join("runs").join(keys[0]).join("metrics.parquet"))
    );
    assert_eq!(read_table(&out.join("ablation.parquet")), table);

    // A half-done grid: a cell with its checkpoint but no result resumes (no steps left to
    // train) and is scored again, to the same scores; the others are skipped.
    std::fs::remove_file(&results[3]).unwrap();
    let (stdout, _) = text(&ok(ablate(&grid, &out, &["--dry-run"])));
    assert!(stdout.contains("resumes at step 3"), "{stdout}");
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        stdout.contains("cell 4/4 ft_67-mae-multi-80: started"),
        "{stdout}"
    );
    assert!(stdout.contains("resuming at step 3"), "{stdout}");
    assert!(
        stdout.contains("(1 trained, 3 skipped, 0 failed)"),
        "{stdout}"
    );
    let again = read_table(&out.join("ablation.parquet"));
    for c in ["key", "sic_r2", "sod_f1", "floe_f1", "combined"] {
        assert_eq!(again[c], table[c], "{c}");
    }
    let log = std::fs::read_to_string(out.join("runs").join(keys[3]).join("log.txt")).unwrap();
    assert!(log.contains("resumed from"), "{log}");

    // Scored on another test regime (here the same scenes under another name, in a file
    // beside the grid): no result is taken for this grid's; every cell is scored again from
    // its checkpoint, none trains a step, and the results name the regime they were scored on.
    let mut exam = Regime::open(Some(&fixture().store), "test").unwrap();
    exam.name = "exam".into();
    exam.write(&dir.path().join("grids/exam.parquet")).unwrap();
    let exam_text = std::fs::read_to_string(&grid)
        .unwrap()
        .replace("test_regime = \"test\"", "test_regime = \"exam.parquet\"");
    let exam_grid = grid_file(dir.path(), "ladder_exam", &exam_text);
    let (stdout, stderr) = text(&ok(ablate(&exam_grid, &out, &[])));
    assert_eq!(stdout.matches("resuming at step 3").count(), 4, "{stdout}");
    assert!(!stdout.contains("skipped, done before"), "{stdout}");
    assert!(stderr.contains("held another grid file"), "{stderr}");
    let rescored = read_table(&out.join("ablation.parquet"));
    for c in ["key", "sic_r2", "sod_f1", "floe_f1", "combined"] {
        assert_eq!(rescored[c], table[c], "{c}");
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results[0]).unwrap()).unwrap();
    assert!(
        r["test_regime"].as_str().unwrap().ends_with("exam.parquet"),
        "{r}"
    );

    // Changing the runs' configuration under a finished grid is refused, not mixed in.
    let changed = std::fs::read_to_string(&grid)
        .unwrap()
        .replace("\"train.steps=3\"", "\"train.steps=3\", \"train.lr=0.5\"");
    std::fs::write(&grid, changed).unwrap();
    let o = ablate(&grid, &out, &[]);
    assert_eq!(o.status.code(), Some(2));
    let (_, stderr) = text(&o);
    assert!(stderr.contains("another configuration"), "{stderr}");
}

#[test]
fn a_single_task_multi_scale_cell_merges_its_three_runs_into_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let grid = grid_file(
        dir.path(),
        "single",
        r#"
base = "seg_micro.toml"
test_regime = "test"
pool = "ft_67"
[grid]
regimes = ["ft_67"]
init = ["scratch"]
tasks = ["single"]
levels = ["80,160"]
"#,
    );
    let out = dir.path().join("out");
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    let key = "ft_67-scratch-single-80+160";
    assert!(
        stdout.contains(&format!("cell 1/1 {key}: finished")),
        "{stdout}"
    );
    let cell = out.join("runs").join(key);
    let part = |task: &str, field: &str| -> f64 {
        let text = std::fs::read_to_string(cell.join(task).join("result.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[field].as_f64().unwrap_or(f64::NAN)
    };
    // Each run trained only its task and was scored only on it.
    assert!(part("SIC", "sic_r2").is_finite() && part("SIC", "sod_f1").is_nan());
    assert!(part("SOD", "sod_f1").is_finite() && part("SOD", "floe_f1").is_nan());
    assert!(part("FLOE", "floe_f1").is_finite() && part("FLOE", "sic_r2").is_nan());
    let cfg = std::fs::read_to_string(cell.join("SOD/config.toml")).unwrap();
    assert!(cfg.contains("tasks = [\"SOD\"]"), "{cfg}");
    assert!(cfg.contains("levels = \"80,160\""), "{cfg}");
    let table = read_table(&out.join("ablation.parquet"));
    assert_eq!(table["key"], [key]);
    assert_eq!(table["tasks"], ["single"]);
    assert_eq!(table["levels"], ["80,160"]);
    // The pool is the regime itself.
    assert_eq!(floats(&table, "labelled_fraction"), [1.0]);
    let row = |c: &str| floats(&table, c)[0];
    assert_eq!(row("sic_r2"), part("SIC", "sic_r2"));
    assert_eq!(row("sod_f1"), part("SOD", "sod_f1"));
    assert_eq!(row("floe_f1"), part("FLOE", "floe_f1"));
    let want = (2.0 * row("sic_r2") + 2.0 * row("sod_f1") + row("floe_f1")) / 5.0 * 100.0;
    assert!((row("combined") - want).abs() < 1e-9);
    assert_eq!(
        png_size(&out.join("ablation.png")),
        (PLOT_WIDTH, PLOT_HEIGHT)
    );
}

#[test]
fn a_grid_on_a_store_named_by_url_scores_as_on_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let grid = grid_file(
        dir.path(),
        "url",
        r#"
base = "seg_micro.toml"
test_regime = "test"
[grid]
regimes = ["ft_34"]
init = ["scratch"]
levels = ["80"]
"#,
    );
    let store = &fixture().store;
    let mut tables = Vec::new();
    for (name, at) in [
        ("folder", store.display().to_string()),
        ("url", format!("file://{}", store.display())),
    ] {
        let out = dir.path().join(name);
        ok(icefm()
            .args(["ablate", "--store", &at, "--grid"])
            .arg(&grid)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap());
        tables.push(read_table(&out.join("ablation.parquet")));
    }
    assert_eq!(tables[1]["key"], ["ft_34-scratch-multi-80"]);
    for c in ["sic_r2", "sod_f1", "floe_f1", "combined"] {
        let (folder, url) = (floats(&tables[0], c), floats(&tables[1], c));
        assert!(folder[0].is_finite(), "{c}: {folder:?}");
        assert_eq!(url, folder, "{c}");
    }
}
