//! `icefm demo` end to end, with `icefm eval` and `icefm predict` on its run.

use std::path::PathBuf;

use super::*;

/// The held-out line of `init` in the demo's output: (SIC R², SOD F1, FLOE F1, combined).
fn demo_scores(stdout: &str, init: &str) -> [f64; 4] {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(init) && l.contains("combined"))
        .unwrap_or_else(|| panic!("no `{init}` line in:\n{stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| -> f64 {
        let i = words.iter().position(|w| *w == key).unwrap();
        words[i + 1].parse().unwrap()
    };
    [
        after("R²"),
        after("F1"),
        {
            let i = words.iter().rposition(|w| *w == "F1").unwrap();
            words[i + 1].parse().unwrap()
        },
        after("combined"),
    ]
}

#[test]
fn demo_fine_tunes_from_scratch_and_from_its_mae_then_scores_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = ok(icefm()
        .args([
            "demo",
            "--scenes",
            "8",
            "--mae-steps",
            "8",
            "--ft-steps",
            "12",
            "--depth",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap());
    let stdout = String::from_utf8_lossy(&run.stdout);
    for init in ["scratch", "MAE"] {
        let [r2, sod, floe, combined] = demo_scores(&stdout, init);
        assert!(r2.is_finite() && r2 <= 1.0, "{init}: {stdout}");
        assert!(
            (0.0..=1.0).contains(&sod) && (0.0..=1.0).contains(&floe),
            "{init}"
        );
        // The printed combined score is AutoICE's weighting of the printed parts (× 100).
        let want = (2.0 * r2 + 2.0 * sod + floe) / 5.0 * 100.0;
        assert!(
            (combined - want).abs() < 0.1,
            "{init}: {combined} vs {want}"
        );
    }
    let ft = out.join("runs/ft-mae");
    let log = std::fs::read_to_string(ft.join("log.txt")).unwrap();
    assert!(
        log.contains("tensors from") && log.contains("runs/mae"),
        "{log}"
    );
    assert!(ft.join("checkpoints/best/model.safetensors").exists());
    assert!(ft.join("validation.parquet").exists());
    let eval = ft.join("eval-test");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["scenes"], 2);
    assert_eq!(metrics["score_level"], "80m");
    // Held-out scores: none of the test scenes chose the best checkpoint.
    assert_eq!(metrics["scenes_of_val_regime"], serde_json::json!([]));
    let [.., combined] = demo_scores(&stdout, "MAE");
    let saved = metrics["scores"]["combined"].as_f64().unwrap();
    assert!((saved - combined).abs() < 0.05, "{saved} vs {combined}");
    assert!(metrics["windows"].as_u64().unwrap() >= 2);
    for task in ["SIC", "SOD", "FLOE"] {
        let csv = std::fs::read_to_string(eval.join(format!("confusion_{task}.csv"))).unwrap();
        assert!(csv.starts_with("true\\pred,0,1,"), "{csv}");
        assert!(eval.join(format!("confusion_{task}.png")).exists());
    }
    assert!(eval.join("scenes.parquet").exists());
    let panels = std::fs::read_dir(eval.join("panels")).unwrap().count();
    assert_eq!(panels, 2);
    // `icefm eval` without --store scores on the store the run trained on, to the same scores.
    let again = dir.path().join("eval-again");
    let out_eval = ok(icefm()
        .args(["eval", "--regime", "test", "--no-panels", "--run"])
        .arg(&ft)
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap());
    assert!(
        String::from_utf8_lossy(&out_eval.stderr).contains("(the run's, from its starts.jsonl)"),
        "{}",
        String::from_utf8_lossy(&out_eval.stderr)
    );
    let rescored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(rescored["scores"], metrics["scores"]);
    assert!(!again.join("panels").exists(), "--no-panels made panels/");
    // `--out .` (no name of its own) stages beside the folder, never inside it.
    let here = dir.path().join("eval-here");
    std::fs::create_dir_all(&here).unwrap();
    ok(icefm()
        .current_dir(&here)
        .args([
            "eval",
            "--regime",
            "test",
            "--no-panels",
            "--out",
            ".",
            "--run",
        ])
        .arg(&ft)
        .output()
        .unwrap());
    let inside: Vec<String> = std::fs::read_dir(&here)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(inside.contains(&"metrics.json".to_string()), "{inside:?}");
    assert!(!inside.iter().any(|n| n.starts_with('.')), "{inside:?}");
    // The held-out test scenes are none of those the run trained on; its own `ft` scenes are,
    // and an evaluation on them says so and lists them.
    assert_eq!(metrics["scenes_seen_in_training"], serde_json::json!([]));
    let seen = dir.path().join("eval-ft");
    let out_seen = ok(icefm()
        .args(["eval", "--regime", "ft", "--no-panels", "--run"])
        .arg(&ft)
        .arg("--out")
        .arg(&seen)
        .output()
        .unwrap());
    let err = String::from_utf8_lossy(&out_seen.stderr);
    assert!(
        err.contains("3 of the 3 scenes scored are among those the run trained on"),
        "{err}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(seen.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(
        m["scenes_seen_in_training"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(m["scenes_seen_by_init"], serde_json::json!([]));
    // The MAE's `pt` scenes: not trained on by the fine-tuning, but its initial encoder was
    // pre-trained on them, and eval says so too.
    let by_init = dir.path().join("eval-pt");
    let out_init = ok(icefm()
        .args(["eval", "--regime", "pt", "--no-panels", "--run"])
        .arg(&ft)
        .arg("--out")
        .arg(&by_init)
        .output()
        .unwrap());
    let err = String::from_utf8_lossy(&out_init.stderr);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(by_init.join("metrics.json")).unwrap())
            .unwrap();
    let n = m["scenes"].as_u64().unwrap();
    assert!(n >= 1);
    assert!(
        err.contains(&format!(
            "{n} of the {n} scenes scored are among those its initial encoder"
        )),
        "{err}"
    );
    assert_eq!(m["scenes_seen_in_training"], serde_json::json!([]));
    assert_eq!(
        m["scenes_seen_by_init"].as_array().map(Vec::len),
        Some(n as usize)
    );
    // Scoring again into a folder that holds an evaluation replaces it whole: its panels go
    // with its metrics.json. The staging folder of a killed evaluation is swept away.
    let killed = ft.join(".eval-test.eval-4000000000");
    std::fs::create_dir_all(killed.join("panels")).unwrap();
    std::fs::write(eval.join("panels/notes.txt"), "mine").unwrap();
    std::fs::write(eval.join("panels/mine.png"), "mine").unwrap();
    ok(icefm()
        .args(["eval", "--regime", "test", "--no-panels", "--run"])
        .arg(&ft)
        .output()
        .unwrap());
    // The PNGs it wrote, that is (its metrics.json lists them): the user's files in panels/,
    // PNGs too, stay.
    let mut left: Vec<String> = std::fs::read_dir(eval.join("panels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["mine.png", "notes.txt"],
        "an earlier evaluation's panels were kept, or the user's removed"
    );
    let replaced: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(replaced["scores"], metrics["scores"]);
    assert!(eval.join("scenes.parquet").exists());
    let left: Vec<String> = std::fs::read_dir(&ft)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".eval-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // What cannot be scored writes no folder: a level the store lacks, an MAE run.
    let bad = dir.path().join("eval-bad");
    let out_bad = icefm()
        .args(["eval", "--regime", "test", "--level", "120m", "--run"])
        .arg(&ft)
        .arg("--out")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out_bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out_bad.stderr);
    assert!(
        err.contains("level 120m is not in the store") && err.contains("(it has 80m, 200m, 400m)"),
        "{err}"
    );
    let out_bad = icefm()
        .args(["eval", "--run"])
        .arg(out.join("runs/mae"))
        .arg("--out")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out_bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out_bad.stderr).contains("not a fine-tuning run"));
    assert!(!bad.exists());
    // An --out that is a file is refused before any scene is scored.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out_bad = icefm()
        .args(["eval", "--regime", "test", "--no-panels", "--run"])
        .arg(&ft)
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out_bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out_bad.stderr);
    assert!(err.contains("exists and is not a folder"), "{err}");
    let text = String::from_utf8_lossy(&out_bad.stdout);
    assert!(!text.contains("scored"), "{text}");
    // `icefm inspect RUN`: where the run stands, its best validation and its evaluation, as
    // the files hold them.
    let out_inspect = ok(icefm().arg("inspect").arg(&ft).output().unwrap());
    let summary = String::from_utf8_lossy(&out_inspect.stdout);
    let steps = metrics_steps(&ft);
    assert!(
        summary.contains(&format!("steps: {steps} of {steps} (complete)")),
        "{summary}"
    );
    assert!(summary.contains("validation on val every"), "{summary}");
    assert!(summary.contains("(checkpoints/best)"), "{summary}");
    assert!(
        summary.contains(&format!(
            "eval-test: 2 scene(s) at {}: SIC R² {:.3}",
            metrics["level"].as_str().unwrap(),
            metrics["scores"]["sic_r2"].as_f64().unwrap()
        )),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("combined {saved:.2}")),
        "{summary}"
    );
    // An evaluation stopped while moving its outputs into place (no metrics.json) is said to be
    // incomplete, not left out.
    std::fs::create_dir_all(ft.join("eval-stopped/panels")).unwrap();
    let out_inspect = ok(icefm().arg("inspect").arg(&ft).output().unwrap());
    let summary = String::from_utf8_lossy(&out_inspect.stdout);
    assert!(
        summary.contains("eval-stopped: incomplete (no metrics.json"),
        "{summary}"
    );
    std::fs::remove_dir_all(ft.join("eval-stopped")).unwrap();

    // The AutoICE submission of one raw scene and one RTT scene of the test release (given as
    // a glob gives them: with its reference charts, which are left out): their three charts on
    // the 80 m grid.
    let scene = std::fs::read_dir(out.join("scenes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("icechart"))
        .unwrap();
    let test = dir.path().join("test");
    ok(icefm()
        .args([
            "synth",
            "--count",
            "1",
            "--kind",
            "rtt",
            "--release",
            "test",
        ])
        .args(["--size", "300x330", "--seed", "77", "--out"])
        .arg(&test)
        .output()
        .unwrap());
    let mut test_files: Vec<PathBuf> = std::fs::read_dir(&test)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    test_files.sort();
    assert_eq!(test_files.len(), 2, "{test_files:?}");
    let sub = dir.path().join("sub.nc");
    let predicted = ok(icefm()
        .arg("predict")
        .arg(&scene)
        .args(&test_files)
        .arg("--run")
        .arg(&ft)
        .arg("--out")
        .arg(&sub)
        .output()
        .unwrap());
    let stderr = String::from_utf8_lossy(&predicted.stderr);
    assert!(
        stderr.contains("1 reference chart file(s) (…_reference.nc) are not scenes: left out"),
        "{stderr}"
    );
    let rtt_stem = test_files[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches("_prep")
        .to_string();
    let rtt_sub = sub.clone();
    let rtt_dims = icefm_ingest::netcdf_thread::on_netcdf_thread(move || {
        let file = netcdf::open(&rtt_sub).unwrap();
        let v = file.variable(&format!("{rtt_stem}_SOD")).unwrap();
        v.dimensions().iter().map(|d| d.len()).collect::<Vec<_>>()
    });
    assert_eq!(rtt_dims, vec![300, 330]);
    // Scoring the test scene: with its reference charts it is scored; alone it has nothing to
    // score, and eval says so.
    let alone = dir.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(
        &test_files[0],
        alone.join(test_files[0].file_name().unwrap()),
    )
    .unwrap();
    for (input, labelled) in [(&test, true), (&alone, false)] {
        let store = input.with_extension("zarr");
        ok(icefm()
            .args([
                "ingest",
                "--levels",
                "80,200,400",
                "--patch",
                "256",
                "--store",
            ])
            .arg(&store)
            .arg(input)
            .output()
            .unwrap());
        ok(icefm()
            .args(["regime", "--name", "t", "--rule", "all", "--store"])
            .arg(&store)
            .args(["--role", "test"])
            .output()
            .unwrap());
        let eval = input.with_extension("eval");
        let out = ok(icefm()
            .args(["eval", "--regime", "t", "--run"])
            .arg(&ft)
            .arg("--store")
            .arg(&store)
            .arg("--out")
            .arg(&eval)
            .output()
            .unwrap());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap())
                .unwrap();
        let pixels = metrics["scores"]["pixels"][1].as_u64().unwrap();
        assert_eq!(pixels > 0, labelled, "{metrics}");
        assert_eq!(
            metrics["scores"]["combined"].is_f64(),
            labelled,
            "{metrics}"
        );
        assert_eq!(
            stderr.contains("warning: no labelled SIC / SOD / FLOE pixel"),
            !labelled,
            "{stderr}"
        );
        if labelled {
            // The same store served over HTTP, as from object storage: the same scores.
            let server = http_files::HttpFiles::serve(input.parent().unwrap());
            let url = format!(
                "{}/{}",
                server.base,
                store.file_name().unwrap().to_string_lossy()
            );
            let remote = input.with_extension("eval-http");
            ok(icefm()
                .args(["eval", "--regime", "t", "--no-panels", "--run"])
                .arg(&ft)
                .args(["--store", &url, "--out"])
                .arg(&remote)
                .output()
                .unwrap());
            let text = std::fs::read_to_string(remote.join("metrics.json")).unwrap();
            let over_http: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(over_http["scores"], metrics["scores"]);
            assert!(server.counts().1 > 0, "{:?}", server.counts());
        }
    }
    // Named by scene id, as the RTT scenes are, not by the raw file's long stem.
    let stem =
        icefm_schemas::names::parse_scene_name(&scene.file_name().unwrap().to_string_lossy())
            .unwrap()
            .scene_id;
    let (names, charts) = icefm_ingest::netcdf_thread::on_netcdf_thread(move || {
        let file = netcdf::open(&sub).unwrap();
        let mut names: Vec<String> = file.variables().map(|v| v.name()).collect();
        names.sort();
        let charts: Vec<(Vec<usize>, Vec<u8>)> = ["SIC", "SOD", "FLOE"]
            .iter()
            .map(|c| {
                let v = file.variable(&format!("{stem}_{c}")).unwrap();
                let dims = v.dimensions().iter().map(|d| d.len()).collect();
                (dims, v.get_values::<u8, _>(..).unwrap())
            })
            .collect();
        (names, charts)
    });
    assert_eq!(names.len(), 6, "{names:?}");
    for ((dims, values), classes) in charts.iter().zip([11u8, 6, 7]) {
        // Demo raw scenes are 1200 x 1250 at 40 m.
        assert_eq!(dims, &[600, 625]);
        let predicted = values.iter().filter(|&&v| v != 255).count();
        assert!(
            predicted > values.len() / 2,
            "{predicted} of {}",
            values.len()
        );
        assert!(values.iter().all(|&v| v < classes || v == 255));
    }
    predict_refusals(dir.path(), &ft, &test_files[0]);
    eval_notes(dir.path(), &ft);
    // The MAE's loss and the fine-tuning's on one plot: drawn, with a warning that they are
    // not one quantity; two fine-tuning runs' are.
    let plot = |runs: &[&str]| {
        let mut c = icefm();
        c.arg("plot");
        for r in runs {
            c.arg(out.join("runs").join(r));
        }
        ok(c.arg("--out")
            .arg(dir.path().join("p.png"))
            .output()
            .unwrap())
    };
    let err = String::from_utf8_lossy(&plot(&["mae", "ft-mae"]).stderr).into_owned();
    assert!(
        err.contains("are MAE runs and") && err.contains("their losses are different quantities"),
        "{err}"
    );
    assert!(plot(&["ft-scratch", "ft-mae"]).stderr.is_empty());
    // The val regime drawn again since the run validated on it: eval cannot tell which scored
    // scenes chose the best checkpoint, and says so rather than name the new ones.
    ok(icefm()
        .args([
            "regime",
            "--name",
            "val",
            "--rule",
            "fraction",
            "--percent",
            "25",
        ])
        .args(["--role", "val", "--seed", "11", "--force", "--store"])
        .arg(out.join("store.zarr"))
        .output()
        .unwrap());
    let again = icefm()
        .args(["eval", "--regime", "test", "--no-panels", "--run"])
        .arg(&ft)
        .arg("--out")
        .arg(dir.path().join("eval-redrawn"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&ok(again).stderr).into_owned();
    assert!(
        err.contains("seg.val_regime `val` has been drawn again since the run started"),
        "{err}"
    );
    fine_tuning_refusals(dir.path(), &out, &ft);
}

/// What a fine-tuning run refuses before its folder is made: a validation level the store
/// lacks, an encoder trained on other channels.
fn fine_tuning_refusals(dir: &Path, demo: &Path, ft: &Path) {
    let train = |out: &str, sets: &[&str]| {
        let mut c = icefm();
        c.args(["train", "--store"])
            .arg(demo.join("store.zarr"))
            .arg("--config")
            .arg(ft.join("config.toml"))
            .arg("--out")
            .arg(dir.join(out));
        for s in sets {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    let refused = |o: &Output, want: &str, out: &str| {
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err}");
        assert!(!dir.join(out).exists());
    };
    refused(
        &train("level", &["seg.eval_level=120"]),
        "seg.eval_level 120m: the store",
        "level",
    );
    refused(
        &train("channels", &["data.channels=[\"HV\", \"HH\"]"]),
        "its encoder was trained on data.channels [\"HH\", \"HV\"], this run reads [\"HV\", \"HH\"]",
        "channels",
    );
}

/// What `icefm predict` refuses before any scene is read, and what it leaves beside its
/// output: nothing of its own, whether it ends well or not.
fn predict_refusals(dir: &Path, ft: &Path, scene: &Path) {
    let predict = |scenes: &[&Path], out: &Path, extra: &[&str]| {
        icefm()
            .arg("predict")
            .args(scenes)
            .arg("--run")
            .arg(ft)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = |o: &Output, what: &str| {
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what), "{err}");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("predicted"));
    };
    let scratch_left = || -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".icefm-predict-") || n.ends_with(".partial"))
            .collect()
    };
    // URLs are refused, not made into local folders named `s3:`.
    let keep = ["--keep-store", "s3://bucket/kept.zarr"];
    refused(
        &predict(&[scene], &dir.join("k.nc"), &keep),
        "needs a local store",
    );
    refused(
        &predict(&[scene], Path::new("s3://bucket/sub.nc"), &[]),
        "predict writes the submission as a local file",
    );
    assert!(!Path::new("s3:").exists());
    // The output is one of the scenes: the scene stays as it was.
    let before = std::fs::read(scene).unwrap();
    refused(
        &predict(&[scene], scene, &[]),
        "is one of the scenes to predict",
    );
    assert_eq!(std::fs::read(scene).unwrap(), before);
    // A file that is not a submission is not replaced.
    let file = dir.join("notes.nc");
    std::fs::write(&file, "my notes").unwrap();
    refused(
        &predict(&[scene], &file, &[]),
        "exists and is not an AutoICE submission",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "my notes");
    refused(
        &predict(&[scene], dir, &[]),
        "a folder; name the submission file to write",
    );
    refused(
        &predict(&[scene, scene], &dir.join("twice.nc"), &[]),
        "is given twice",
    );
    refused(
        &predict(&[scene], &dir.join("s0.nc"), &["--stride", "0"]),
        "--stride 0: windows must move on",
    );
    assert!(!dir.join("twice.nc").exists() && !dir.join("s0.nc").exists());
    // A file that is not a scene is refused too.
    let bad = dir.join("20200101T000000_dmi_prep.nc");
    std::fs::write(&bad, "not netCDF").unwrap();
    refused(
        &predict(&[scene, &bad], &dir.join("bad.nc"), &[]),
        "not a readable NetCDF-4/HDF5 file",
    );
    // A run that fails on the way removes its scratch store (this scene cannot be read at a
    // level finer than its own); a killed run's is removed by the next run beside it.
    let out = predict(&[scene], &dir.join("fine.nc"), &["--level", "40m"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("finer than the scene's native 80 m grid"),
        "{err}"
    );
    assert_eq!(scratch_left(), Vec::<String>::new());
    std::fs::create_dir_all(dir.join(".icefm-predict-4000000000/scenes.zarr")).unwrap();
    // An earlier submission is replaced, with a word.
    let out = ok(predict(&[scene], &dir.join("sub.nc"), &[]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("predicted 1 scene at ")
            && text.contains("(replacing the submission that was there)"),
        "{text}"
    );
    assert_eq!(scratch_left(), Vec::<String>::new());
    // A scene without a valid SAR pixel has no prediction: 255 charts on its 80 m grid (a raw
    // scene's halved, rounded up), and the others are predicted.
    let mut o = icefm_synth::SynthOptions::new(icefm_synth::SceneKind::Raw, 201, 221, 5);
    o.defect = Some(icefm_synth::Defect::AllInvalid);
    let blank = icefm_synth::write_scene(&dir.join("blank"), &o).unwrap();
    let blank_id =
        icefm_schemas::names::parse_scene_name(&blank.file_name().unwrap().to_string_lossy())
            .unwrap()
            .scene_id;
    let both = dir.join("both.nc");
    let out = ok(predict(&[scene, &blank], &both, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no valid SAR pixel; its charts in the submission are 255"),
        "{err}"
    );
    let blank_sic = icefm_ingest::netcdf_thread::on_netcdf_thread(move || {
        let file = netcdf::open(&both).unwrap();
        assert_eq!(file.variables().count(), 6);
        let v = file.variable(&format!("{blank_id}_SIC")).unwrap();
        let dims: Vec<usize> = v.dimensions().iter().map(|d| d.len()).collect();
        (dims, v.get_values::<u8, _>(..).unwrap())
    });
    assert_eq!(blank_sic.0, vec![101, 111]);
    assert!(blank_sic.1.iter().all(|&v| v == 255));
}

/// `icefm eval`'s warnings on what a score is not: scenes that chose the best checkpoint, a
/// level the run did not train at; and a weights file with nowhere to write.
fn eval_notes(dir: &Path, ft: &Path) {
    let out = ok(icefm()
        .args([
            "eval",
            "--regime",
            "val",
            "--level",
            "400m",
            "--no-panels",
            "--run",
        ])
        .arg(ft)
        .arg("--out")
        .arg(dir.join("eval-val"))
        .output()
        .unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    // Every scene of `val` chose the best checkpoint: said, and listed in metrics.json.
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval-val").join("metrics.json")).unwrap())
            .unwrap();
    let n = metrics["scenes"].as_u64().unwrap();
    assert!(n > 0);
    assert_eq!(
        metrics["scenes_of_val_regime"].as_array().unwrap().len() as u64,
        n
    );
    assert!(
        err.contains(&format!(
            "warning: {n} of the {n} scenes scored are of the run's seg.val_regime `val` ("
        )) && err.contains("its best checkpoint was chosen on them"),
        "{err}"
    );
    assert!(
        err.contains("note: the run trained at 200m (data.levels); inference at 400m applies it"),
        "{err}"
    );
    let out = icefm()
        .args(["eval", "--regime", "test", "--run"])
        .arg(ft.join("checkpoints/best/model.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is a weights file") && err.contains("give --out"),
        "{err}"
    );
    // A checkpoint's other files are not weights.
    let out = icefm()
        .args(["eval", "--regime", "test", "--run"])
        .arg(ft.join("checkpoints/best/state.json"))
        .arg("--out")
        .arg(dir.join("eval-state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state.json: not a safetensors file of weights"),
        "{err}"
    );
}

/// The number of steps in a run's `metrics.parquet` (its last 0-based step + 1).
fn metrics_steps(run: &Path) -> u64 {
    icefm_model::train::read_metrics(&run.join("metrics.parquet"))
        .unwrap()
        .last()
        .unwrap()
        .step
        + 1
}
