//! Stops, failures and several workers on one grid.

use super::*;

/// Exit status 2, one line on stderr holding every one of `want`, and no run folder made.
fn fails_before_training(o: Output, out: &Path, want: &[&str]) {
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for w in want {
        assert!(stderr.contains(w), "{w:?} not in {stderr}");
    }
    assert!(!out.join("runs").exists());
}

#[test]
fn a_wrong_grid_fails_with_one_line_before_any_training() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mae = format!("{:?}", f.mae.display().to_string());
    let case = |name: &str, body: &str| {
        let grid = grid_file(dir.path(), name, body);
        ablate(&grid, &out, &[])
    };
    // A regime the store lacks: named, with the ones it has.
    let o = case(
        "missing",
        &format!(
            "base = \"seg_micro.toml\"\nmae = {mae}\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_34\", \"ft_99\"]\n"
        ),
    );
    fails_before_training(o, &out, &["unknown regime `ft_99`", "ft_34, ft_67, test"]);
    // One MAE run per regime: each must be named, and only regimes of the grid.
    let per_regime = |entries: &str| {
        format!(
            "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_34\", \"ft_67\"]\n[mae]\n{entries}"
        )
    };
    let o = case("permae", &per_regime(&format!("ft_34 = {mae}\n")));
    fails_before_training(o, &out, &["names no MAE run for regime ft_67"]);
    let o = case(
        "permae",
        &per_regime(&format!("ft_34 = {mae}\nft_67 = {mae}\nft_99 = {mae}\n")),
    );
    fails_before_training(o, &out, &["mae.ft_99"]);
    let grid = grid_file(
        dir.path(),
        "permae",
        &per_regime(&format!("ft_34 = {mae}\nft_67 = {mae}\n")),
    );
    let (stdout, _) = text(&ok(ablate(&grid, &out, &["--dry-run"])));
    assert!(stdout.starts_with("4 cells"), "{stdout}");
    // A misspelt key.
    let o = case(
        "typo",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregime = [\"ft_34\"]\n",
    );
    fails_before_training(o, &out, &["unknown field `regime`"]);
    // An init the grid cannot do: no MAE run named.
    let o = case(
        "nomae",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_34\"]\ninit = [\"mae\"]\n",
    );
    fails_before_training(o, &out, &["no `mae` run"]);
    // `set` may not change an axis.
    let o = case(
        "axis",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\nset = [\"data.regime=ft_67\"]\n[grid]\nregimes = [\"ft_34\"]\n",
    );
    fails_before_training(o, &out, &["data.regime is an axis"]);
    // A regime training would refuse: the test regime itself.
    let o = case(
        "trains-on-test",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_34\", \"test\"]\ninit = [\"scratch\"]\n",
    );
    fails_before_training(o, &out, &["regimes: data.regime `test` is a test regime"]);
    // A value of the wrong type: the line is named.
    let o = case(
        "type",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_34\"]\ntasks = \"multi\"\n",
    );
    fails_before_training(
        o,
        &out,
        &[
            "type.toml: line 5 (tasks = \"multi\")",
            "expected a sequence",
        ],
    );
    // A misspelt key in `set`: the grid's, not the base's.
    let o = case(
        "settypo",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\nset = [\"train.stpes=5\"]\n[grid]\nregimes = [\"ft_34\"]\n",
    );
    fails_before_training(o, &out, &["settypo.toml: set: train.stpes=5"]);
    // Validation on the scenes scored: each best checkpoint would be chosen on them.
    let o = case(
        "valtest",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\nset = [\"seg.val_regime=test\"]\n[grid]\nregimes = [\"ft_34\"]\ninit = [\"scratch\"]\n",
    );
    fails_before_training(
        o,
        &out,
        &["the test regime test shares 1 scene(s) with seg.val_regime test"],
    );
    // A regime outside the pool: its fraction would be over 1.
    let o = case(
        "pool",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\npool = \"ft_34\"\n[grid]\nregimes = [\"ft_67\"]\ninit = [\"scratch\"]\n",
    );
    fails_before_training(
        o,
        &out,
        &["regime ft_67 has 1 scene(s) outside the pool regime ft_34"],
    );
    // An `mae` that is not an MAE's weights: a fine-tuning run, a file of another kind, an
    // encoder the base's model cannot take.
    let ft = dir.path().join("ft-run");
    std::fs::create_dir_all(&ft).unwrap();
    let ft_config = icefm_model::config::TrainConfig::parse(SEG_MICRO, &[]).unwrap();
    std::fs::write(ft.join("config.toml"), ft_config.to_toml()).unwrap();
    std::fs::write(ft.join("model.safetensors"), "").unwrap();
    let with_mae = |m: &str, set: &str| {
        format!(
            "base = \"seg_micro.toml\"\nmae = {m:?}\ntest_regime = \"test\"\nset = [{set}]\n[grid]\nregimes = [\"ft_34\"]\n"
        )
    };
    let o = case("maeft", &with_mae(&ft.display().to_string(), ""));
    fails_before_training(o, &out, &["a fine-tuning run, not an MAE"]);
    let readme = repo().join("README.md");
    let o = case("maefile", &with_mae(&readme.display().to_string(), ""));
    fails_before_training(o, &out, &["README.md", "not a safetensors file"]);
    let o = case(
        "maedepth",
        &with_mae(&f.mae.display().to_string(), "\"model.depth=3\""),
    );
    fails_before_training(o, &out, &["with 2 blocks", "with 3 blocks", "model.depth"]);
    // A level the store does not have.
    let o = case(
        "level",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_34\"]\ninit = [\"scratch\"]\nlevels = [\"200\"]\n",
    );
    fails_before_training(o, &out, &["no level 200m"]);
    // The shipped example parses: run from the repository against this store, it stops at
    // its first regime (the store has another ladder).
    let o = icefm()
        .current_dir(repo())
        .args(["ablate", "--dry-run", "--store"])
        .arg(&f.store)
        .args(["--grid", "configs/ablate_tiny.toml", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    fails_before_training(o, &out, &["unknown regime `ft_01`"]);
}

#[test]
fn ctrl_c_stops_the_grid_at_a_step_boundary_and_a_rerun_resumes_it() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let body = |steps: u64| {
        format!(
            r#"
base = "seg_micro.toml"
mae = {:?}
test_regime = "test"
set = ["train.steps={steps}", "train.checkpoint_every=1000000", "data.batch_size=8"]
[grid]
regimes = ["ft_67"]
init = ["mae", "scratch"]
"#,
            f.mae.display().to_string()
        )
    };
    let grid = grid_file(dir.path(), "stop", &body(1_000_000));
    let out = dir.path().join("out");
    let child = spawn_ablate(&grid, &out);
    // Wait until the first run trains, then send SIGINT as a terminal's Ctrl-C does.
    let run = out.join("runs/ft_67-mae-multi-80");
    let t0 = std::time::Instant::now();
    while !run.join("log.txt").exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("cell 1/2 ft_67-mae-multi-80: stopped (checkpoint saved)"),
        "{stdout}"
    );
    assert!(!stdout.contains("cell 2/2"), "{stdout}");
    assert!(!out.join("runs/ft_67-scratch-multi-80").exists());
    let done: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            name.strip_prefix("step_")?.parse().ok()
        })
        .collect();
    assert_eq!(done.len(), 1, "{done:?}");
    let done = done[0];
    assert!(done >= 1, "{done}");
    // The same grid, now ending one step later: the stopped run continues, the other starts.
    std::fs::write(&grid, body(done + 1)).unwrap();
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        stdout.contains(&format!(
            "cell 1/2 ft_67-mae-multi-80: started (regime ft_67, 2 scenes, 66.7 % of the pool, init mae, tasks multi, levels 80, {} steps, resuming at step {done})",
            done + 1
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("(2 trained, 0 skipped, 0 failed)"),
        "{stdout}"
    );
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    assert!(
        log.contains(&format!("stopped at step {done} (interrupt)")),
        "{log}"
    );
    assert!(log.contains("resumed from"), "{log}");
    assert_eq!(read_table(&out.join("ablation.parquet"))["key"].len(), 2);
}

#[test]
fn a_failing_cell_fails_alone_and_a_rerun_retries_it() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // Weights that resolve and whose header passes the grid's check, but whose tensors are
    // cut short: the cell that starts from them fails when it trains, after the grid was
    // checked.
    let bad = dir.path().join("bad.safetensors");
    let good = std::fs::read(icefm_model::finetune::resolve_weights(&f.mae).unwrap()).unwrap();
    std::fs::write(&bad, &good[..good.len() - 64]).unwrap();
    let body = |ft_67: &Path| {
        format!(
            r#"
base = "seg_micro.toml"
test_regime = "test"
[grid]
regimes = ["ft_34", "ft_67"]
init = ["mae"]
[mae]
ft_34 = {:?}
ft_67 = {:?}
"#,
            f.mae.display().to_string(),
            ft_67.display().to_string()
        )
    };
    let grid = grid_file(dir.path(), "failing", &body(&bad));
    let out = dir.path().join("out");
    let o = ablate(&grid, &out, &[]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("cell 1/2 ft_34-mae-multi-80: finished"),
        "{stdout}"
    );
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("cell 2/2 ft_67-mae-multi-80: FAILED: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(failed.contains("bad.safetensors"), "{failed}");
    // Refused before its run started: no training time to count.
    assert!(
        !out.join("runs/ft_67-mae-multi-80/train_seconds.txt")
            .exists()
    );
    assert!(
        stdout.contains("(1 trained, 0 skipped, 1 failed)"),
        "{stdout}"
    );
    assert_eq!(
        read_table(&out.join("ablation.parquet"))["key"],
        ["ft_34-mae-multi-80"]
    );
    // The failure is marked for other workers running the grid now, with its reason.
    let mark = out.join("claims/ft_67-mae-multi-80.failed");
    let why = std::fs::read_to_string(&mark).unwrap();
    assert!(why.contains("bad.safetensors"), "{why}");
    // With its weights fixed, a re-run trains only the failed cell.
    std::fs::write(&grid, body(&f.mae)).unwrap();
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        stdout.contains("(1 trained, 1 skipped, 0 failed)"),
        "{stdout}"
    );
    assert_eq!(
        read_table(&out.join("ablation.parquet"))["key"],
        ["ft_34-mae-multi-80", "ft_67-mae-multi-80"]
    );
    assert!(!mark.exists());
}

#[test]
fn a_cell_held_by_another_worker_is_left_to_it_and_taken_up_once_free() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ladder_grid(dir.path(), "held");
    let out = dir.path().join("out");
    // Another worker holds the second cell: its lock, with its line.
    let claims = out.join("claims");
    std::fs::create_dir_all(&claims).unwrap();
    let lock = std::fs::File::create(claims.join("ft_34-mae-multi-80.lock")).unwrap();
    lock.lock().unwrap();
    std::fs::write(
        claims.join("ft_34-mae-multi-80.lock"),
        "gpu-node-7 pid 1, cuda:3\n",
    )
    .unwrap();

    let (stdout, _) = text(&ok(ablate(&grid, &out, &["--dry-run"])));
    let held = "running in another worker (gpu-node-7 pid 1, cuda:3, for ";
    let line = |stdout: &str, prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {stdout}"))
            .to_string()
    };
    assert!(
        line(&stdout, "cell 2/4 ft_34-mae-multi-80:").ends_with(&format!("{held}0 s)")),
        "{stdout}"
    );
    assert_eq!(stdout.matches(": new").count(), 3, "{stdout}");

    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        line(&stdout, "cell 2/4 ft_34-mae-multi-80:").contains(held),
        "{stdout}"
    );
    for (i, k) in [(1, "ft_34-scratch"), (3, "ft_67-scratch"), (4, "ft_67-mae")] {
        assert!(
            stdout.contains(&format!("cell {i}/4 {k}-multi-80: finished")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("(3 trained, 0 skipped, 0 failed, 1 running in other workers)"),
        "{stdout}"
    );
    assert!(!out.join("runs/ft_34-mae-multi-80/config.toml").exists());
    assert_eq!(
        read_table(&out.join("ablation.parquet"))["key"],
        [
            "ft_34-scratch-multi-80",
            "ft_67-scratch-multi-80",
            "ft_67-mae-multi-80"
        ]
    );
    // The cells this worker ran are free again.
    assert_eq!(
        std::fs::read_to_string(claims.join("ft_34-scratch-multi-80.lock")).unwrap(),
        ""
    );

    // The other worker dies: the operating system drops its lock, the file stays, and the
    // next invocation runs the cell.
    drop(lock);
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        stdout.contains("cell 2/4 ft_34-mae-multi-80: started"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(1 trained, 3 skipped, 0 failed)"),
        "{stdout}"
    );
    assert_eq!(read_table(&out.join("ablation.parquet"))["key"].len(), 4);
}

#[test]
fn two_workers_share_a_grid_train_each_cell_once_and_score_as_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ladder_grid(dir.path(), "shared");
    let alone = dir.path().join("alone");
    ok(ablate(&grid, &alone, &[]));
    let want = read_table(&alone.join("ablation.parquet"));

    let out = dir.path().join("out");
    let (a, b) = (spawn_ablate(&grid, &out), spawn_ablate(&grid, &out));
    let logs: Vec<String> = [a, b]
        .into_iter()
        .map(|c| text(&ok(c.wait_with_output().unwrap())).0)
        .collect();
    let both = logs.concat();
    for k in &want["key"] {
        assert_eq!(
            both.matches(&format!(" {k}: started")).count(),
            1,
            "{k}:\n{}\n---\n{}",
            logs[0],
            logs[1]
        );
        assert_eq!(both.matches(&format!(" {k}: finished")).count(), 1);
    }
    // Whichever worker finished last wrote the whole table: the one worker's scores.
    let got = read_table(&out.join("ablation.parquet"));
    for c in ["key", "sic_r2", "sod_f1", "floe_f1", "combined"] {
        assert_eq!(got[c], want[c], "{c}");
    }
}

#[test]
fn cells_started_from_another_mae_checkpoint_are_refused_not_mixed_into_one_table() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // An MAE run of the grid's own, which the researcher trains on after the first pass.
    let mae = dir.path().join("mae");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(&f.mae)
        .arg(&mae)
        .status()
        .unwrap();
    assert!(copied.success());
    let body = |mae: &Path| {
        format!(
            r#"
base = "seg_micro.toml"
mae = {:?}
test_regime = "test"
[grid]
regimes = ["ft_34"]
init = ["mae"]
"#,
            mae.display().to_string()
        )
    };
    let grid = grid_file(dir.path(), "pinned", &body(&mae));
    let out = dir.path().join("out");
    // A regime of the same scenes under another name (a ladder's equal rungs): noted.
    let mut twin = Regime::read(&f.store.join("regimes/ft_34.parquet")).unwrap();
    twin.name = "twin".into();
    twin.write(&dir.path().join("grids/twin.parquet")).unwrap();
    let twins = grid_file(
        dir.path(),
        "twins",
        &body(&mae).replace(r#"["ft_34"]"#, r#"["ft_34", "twin.parquet"]"#),
    );
    let (_, stderr) = text(&ok(ablate(&twins, &dir.path().join("t"), &["--dry-run"])));
    assert!(
        stderr.contains("note: regimes ft_34, twin hold the same scenes"),
        "{stderr}"
    );
    ok(ablate(&grid, &out, &[]));
    let record = out.join("runs/ft_34-mae-multi-80/inputs.json");
    let inputs = std::fs::read_to_string(&record).unwrap();
    assert!(
        inputs.contains("step_0000002/model.safetensors (BLAKE3 ")
            && inputs.contains("ft_34 (scenes BLAKE3 "),
        "{inputs}"
    );
    // One step more: the grid's `mae` now resolves to another checkpoint.
    ok(Command::new(env!("CARGO_BIN_EXE_icefm"))
        .args(["train", "--resume", "--store"])
        .arg(&f.store)
        .arg("--config")
        .arg(mae.join("config.toml"))
        .arg("--out")
        .arg(&mae)
        .args(["--set", "train.steps=3"])
        .output()
        .unwrap());
    let o = ablate(&grid, &out, &[]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr
            .contains("1 cell(s) of this --out started from other inputs than the grid names now")
            && stderr.contains("ft_34-mae-multi-80: started from ")
            && stderr.contains("step_0000002/model.safetensors")
            && stderr.contains("the grid's mae is now ")
            && stderr.contains("step_0000003/model.safetensors"),
        "{stderr}"
    );
    // Its folder deleted, the cell trains again from the MAE as it is now.
    std::fs::remove_dir_all(out.join("runs/ft_34-mae-multi-80")).unwrap();
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        stdout.contains("(1 trained, 0 skipped, 0 failed)"),
        "{stdout}"
    );
    assert!(
        std::fs::read_to_string(&record)
            .unwrap()
            .contains("step_0000003/model.safetensors (BLAKE3 ")
    );
}
