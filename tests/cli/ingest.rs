//! Ingest through the executable: kill and resume, shards, test-release folders, bad inputs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::*;

/// `icefm ingest` of the kill-and-resume test: three levels, small patches.
fn ingest_80_160_400(store: &Path, scenes: &Path) -> Command {
    let mut c = icefm();
    c.args([
        "ingest",
        "--levels",
        "80,160,400",
        "--patch",
        "128",
        "--store",
    ])
    .arg(store)
    .arg(scenes);
    c
}

#[test]
fn ingest_killed_at_any_moment_resumes_to_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let scenes = dir.path().join("scenes");
    synth(&scenes, 4, "700x760", "cycle");
    let clean = dir.path().join("clean.zarr");
    ok(ingest_80_160_400(&clean, &scenes).output().unwrap());
    for (attempt, kill_after_ms) in [150u64, 600, 1200].into_iter().enumerate() {
        let store = dir.path().join(format!("killed{attempt}.zarr"));
        let mut child = ingest_80_160_400(&store, &scenes)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        let _ = child.kill();
        let _ = child.wait();
        let out = ok(ingest_80_160_400(&store, &scenes).output().unwrap());
        let summary = String::from_utf8_lossy(&out.stdout);
        assert!(summary.contains("0 failed"), "{summary}");
        // Temporary files of the killed run are the only thing allowed to differ.
        let strip = |v: Vec<(PathBuf, Vec<u8>)>| -> Vec<(PathBuf, Vec<u8>)> {
            v.into_iter()
                .filter(|(p, _)| !p.to_string_lossy().ends_with(".tmp"))
                .collect()
        };
        let (a, b) = (strip(tree_bytes(&clean)), strip(tree_bytes(&store)));
        assert_eq!(
            a.iter().map(|x| &x.0).collect::<Vec<_>>(),
            b.iter().map(|x| &x.0).collect::<Vec<_>>(),
            "kill after {kill_after_ms} ms"
        );
        for ((p, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                x == y,
                "{} differs after a kill at {kill_after_ms} ms",
                p.display()
            );
        }
    }
}

/// A store's files without the shard records and temporary files: what a sharded ingest must
/// write exactly as an unsharded one does.
fn store_bytes(store: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    tree_bytes(store)
        .into_iter()
        .filter(|(p, _)| {
            !p.to_string_lossy().ends_with(".tmp") && !p.starts_with("manifests/shards")
        })
        .collect()
}

fn assert_same_store(a: &Path, b: &Path) {
    let (x, y) = (store_bytes(a), store_bytes(b));
    assert_eq!(
        x.iter().map(|f| &f.0).collect::<Vec<_>>(),
        y.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((p, u), (_, v)) in x.iter().zip(&y) {
        assert!(u == v, "{} differs", p.display());
    }
}

#[test]
fn sharded_ingest_writes_the_store_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let scenes = dir.path().join("scenes");
    synth(&scenes, 5, "300x330", "cycle");
    let ingest = |store: &Path, shard: &str| {
        let mut c = icefm();
        c.args([
            "ingest", "--levels", "80,200", "--patch", "64", "--jobs", "1",
        ]);
        c.arg("--store").arg(store).arg(&scenes);
        if !shard.is_empty() {
            c.args(["--shard", shard]);
        }
        c
    };
    let clean = dir.path().join("clean.zarr");
    ok(ingest(&clean, "").output().unwrap());

    // Two shards at once, both creating the store.
    let both = dir.path().join("both.zarr");
    let children: Vec<_> = ["0/2", "1/2"]
        .iter()
        .map(|s| {
            ingest(&both, s)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let stderrs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = ok(c.wait_with_output().unwrap());
            String::from_utf8_lossy(&out.stderr).into_owned()
        })
        .collect();
    assert!(
        stderrs[0].contains("shard 0/2: 3 of 5 inputs"),
        "{}",
        stderrs[0]
    );
    assert!(
        stderrs[1].contains("shard 1/2: 2 of 5 inputs"),
        "{}",
        stderrs[1]
    );
    assert!(
        stderrs
            .iter()
            .any(|e| e.contains("the manifests are merged")),
        "{stderrs:?}"
    );
    assert_same_store(&clean, &both);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(both.join("manifests/shards/1-of-2.json")).unwrap())
            .unwrap();
    assert_eq!(record["assigned"].as_array().unwrap().len(), 2);
    assert_eq!(record["done"].as_array().unwrap().len(), 2);
    assert_eq!(record["inputs_total"], 5);

    // One task of a 3-task Slurm array (`--array=1-3`, task 2 = shard 1/3), alone.
    let slurm = dir.path().join("slurm.zarr");
    let out = ok(ingest(&slurm, "slurm")
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_MAX", "3")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shard 1/3: 2 of 5 inputs"), "{stderr}");
    assert!(
        stderr.contains("waiting for shard(s) 0, 2 of 3"),
        "{stderr}"
    );
    // Not merged yet: `inspect` says so, readers of the manifests refuse, and so does
    // `manifest merge`.
    let out = ok(icefm().arg("inspect").arg(&slurm).output().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .contains("a sharded ingest (3 shards) is not finished: shard(s) 0, 2 have no record")
            && stdout.contains("2 scene(s) are complete but the manifests list 0")
            && stdout.contains("\nclass balance: no scene in the manifests yet\n")
            && !stdout.contains("0.0% of 0"),
        "{stdout}"
    );
    let out = icefm()
        .args(["regime", "--name", "every", "--rule", "all", "--store"])
        .arg(&slurm)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the manifests are not merged"), "{stderr}");
    let merge = |partial: bool| {
        let mut c = icefm();
        c.args(["manifest", "merge", "--store"]).arg(&slurm);
        if partial {
            c.arg("--partial");
        }
        c.output().unwrap()
    };
    let out = merge(false);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shard(s) 0, 2 have not finished"),
        "{stderr}"
    );
    assert!(!slurm.join("manifests/scenes.parquet").exists());
    let out = ok(merge(true));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 scene(s) in the manifests"), "{stderr}");
    // The other two shards, one after the other: the last merges.
    let out = ok(ingest(&slurm, "0/3").output().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("waiting for shard(s) 2 of 3"), "{stderr}");
    let out = ok(ingest(&slurm, "2/3").output().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the manifests are merged"), "{stderr}");
    assert_same_store(&clean, &slurm);
    let out = ok(merge(false));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("5 inputs in 3 shards, 3 finished"),
        "{stderr}"
    );
    assert!(stderr.contains("5 scene(s) in the manifests"), "{stderr}");

    // A shard beyond N is refused before anything is read.
    let out = ingest(&slurm, "3/3").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected K/N"));

    // A shard given other files than the rest of its run: it says so, and so does the merge.
    let fewer = dir.path().join("fewer");
    std::fs::create_dir_all(&fewer).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&scenes)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files[..4] {
        std::fs::copy(f, fewer.join(f.file_name().unwrap())).unwrap();
    }
    let out = ok(icefm()
        .args([
            "ingest", "--levels", "80,200", "--patch", "64", "--shard", "0/3",
        ])
        .arg("--store")
        .arg(&slurm)
        .arg(&fewer)
        .output()
        .unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the records of shard(s) 1, 2 of 3 list other input files"),
        "{stderr}"
    );
    let out = merge(false);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2 sharded ingests of 3 shards were given different input files"),
        "{stderr}"
    );
}

#[test]
fn a_test_release_folder_ingests_its_scenes_with_their_reference_charts() {
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("test");
    ok(icefm()
        .args([
            "synth",
            "--count",
            "2",
            "--kind",
            "rtt",
            "--release",
            "test",
        ])
        .args(["--size", "200x220", "--out"])
        .arg(&test)
        .output()
        .unwrap());
    let store = dir.path().join("t.zarr");
    let ingest = |input: &Path| {
        icefm()
            .args(["ingest", "--levels", "80,160", "--patch", "64", "--store"])
            .arg(&store)
            .arg(input)
            .output()
            .unwrap()
    };
    let out = ok(ingest(&test));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 done, 0 skipped, 0 failed"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let out = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SIC class balance"), "{stdout}");
    assert!(!stdout.contains("100.0% of"), "{stdout}");
    assert!(!stdout.contains("have no label"), "{stdout}");
    // RTT scenes alone: one pixel size, no note; with a raw scene, the note on pixel areas.
    assert!(!stdout.contains("a raw pixel covers"), "{stdout}");
    ok(icefm()
        .args([
            "synth", "--count", "1", "--size", "200x220", "--seed", "9", "--out",
        ])
        .arg(dir.path().join("raw"))
        .output()
        .unwrap());
    ok(ingest(&dir.path().join("raw")));
    let out = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("raw (40 m) and RTT (80 m) scenes together: a raw pixel covers a quarter"),
        "{stdout}"
    );
    // A scene without its reference: ingested, and `inspect` shows it has no label.
    let alone = dir.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let scene = std::fs::read_dir(&test)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("_prep.nc"))
        .unwrap();
    std::fs::copy(&scene, alone.join(scene.file_name().unwrap())).unwrap();
    let lone = dir.path().join("lone.zarr");
    let out = ok(icefm()
        .args(["ingest", "--levels", "80,160", "--patch", "64", "--store"])
        .arg(&lone)
        .arg(&alone)
        .output()
        .unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("_prep_reference.nc beside it"), "{stderr}");
    let out = ok(icefm().arg("inspect").arg(&lone).output().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // No label, and (its centre between) no unknown code.
    assert!(
        stdout.contains("    0.0%  ") && stdout.contains("W    0\n1 scene(s) have no label"),
        "{stdout}"
    );
    // A reference file on its own is not a scene.
    let reference = std::fs::read_dir(&test)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("_prep_reference.nc"))
        .unwrap();
    let out = ingest(&reference);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a test scene's reference charts, not a scene"),
        "{stderr}"
    );
}

#[test]
fn a_scene_another_process_holds_locked_is_read() {
    // Another process holds an exclusive flock on the scene, as one that inherited an HDF5
    // writer's open file from its parent does: HDF5's own lock then failed the read with
    // "NetCDF: HDF error". icefm reads with HDF5's locking off unless told otherwise.
    let dir = tempfile::tempdir().unwrap();
    let scenes = dir.path().join("scenes");
    synth(&scenes, 1, "200x220", "default");
    let scene = std::fs::read_dir(&scenes)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut holder = Command::new("flock")
        .arg(&scene)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    // flock takes the lock before it runs sleep: wait for the lock to be there.
    let t0 = std::time::Instant::now();
    while Command::new("flock")
        .args(["--nonblock"])
        .arg(&scene)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "no lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ingest = |locking: Option<&str>, store: &str| {
        let mut c = icefm();
        c.args(["ingest", "--levels", "80", "--store"])
            .arg(dir.path().join(store))
            .arg(&scene);
        if let Some(v) = locking {
            c.env("HDF5_USE_FILE_LOCKING", v);
        }
        c.output().unwrap()
    };
    let out = ok(ingest(None, "a.zarr"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 done, 0 skipped, 0 failed"), "{text}");
    // Asked for, HDF5's locking is used, and the lock makes the file unreadable.
    let out = ingest(Some("TRUE"), "b.zarr");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NetCDF: HDF error"));
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn bad_inputs_exit_non_zero_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = icefm()
        .args(["ingest", "--store"])
        .arg(dir.path().join("s.zarr"))
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no .nc files") && err.contains("empty"),
        "{err}"
    );
    // No scene would ever be processed with no job.
    let out = icefm()
        .args(["ingest", "--jobs", "0", "--store"])
        .arg(dir.path().join("s.zarr"))
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'0' for '--jobs"));
    // A folder of reference charts alone is said to be one.
    let refs = dir.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("20200101T000000_dmi_prep_reference.nc"), b"x").unwrap();
    let out = icefm()
        .args(["ingest", "--store"])
        .arg(dir.path().join("s.zarr"))
        .arg(&refs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds only reference charts (1 `…_reference.nc`)")
            && err.contains("--reference"),
        "{err}"
    );

    let scenes = dir.path().join("scenes");
    synth(&scenes, 1, "300x320", "default");
    std::fs::write(scenes.join("broken.nc"), b"CDF? no").unwrap();
    let store = dir.path().join("s.zarr");
    let out = icefm()
        .args(["ingest", "--levels", "80", "--store"])
        .arg(&store)
        .arg(&scenes)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("1 done, 0 skipped, 1 failed"), "{summary}");
    // Per-scene lines reach a log even where no progress bar is drawn (not a terminal).
    assert!(err.lines().any(|l| l.starts_with("done ")), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("FAILED") && l.contains("broken.nc")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("failed:") && l.contains("broken.nc")),
        "{err}"
    );
    // Re-running skips the complete scene and still reports the bad one.
    let out = icefm()
        .args(["ingest", "--levels", "80", "--store"])
        .arg(&store)
        .arg(&scenes)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 done, 1 skipped, 1 failed"));
    // A store made with other levels is refused with one line.
    let out = icefm()
        .args(["ingest", "--levels", "200", "--store"])
        .arg(&store)
        .arg(&scenes)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use another store"));
    // So is another codec; without --codec an ingest takes the store's (the default here).
    let ingest_with = |store: &Path, extra: &[&str]| {
        icefm()
            .args(["ingest", "--levels", "80", "--store"])
            .arg(store)
            .args(extra)
            .arg(&scenes)
            .output()
            .unwrap()
    };
    let out = ingest_with(&store, &["--codec", "zstd:3"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the store's arrays use blosc-zstd:1") && err.contains("leave out --codec"),
        "{err}"
    );
    let out = ingest_with(&store, &["--codec", "blosc-zstd:1"]);
    assert_eq!(out.status.code(), Some(1), "the same codec is accepted");
    // Levels no AI4Arctic scene has are refused before a store exists.
    let fine = dir.path().join("fine.zarr");
    let out = icefm()
        .args(["ingest", "--levels", "20,80", "--store"])
        .arg(&fine)
        .arg(&scenes)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("level 20m is finer than any AI4Arctic"),
        "{err}"
    );
    assert!(!fine.exists());
    // A store's own error (here the scene's folder is a file) stops the scene with a line that
    // names its input too, not only the store.
    let good = std::fs::read_dir(&scenes)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.ends_with("broken.nc"))
        .unwrap();
    let id = std::fs::read_dir(store.join("scenes"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_dir_all(&id).unwrap();
    std::fs::write(&id, b"not a folder").unwrap();
    let out = icefm()
        .args(["ingest", "--levels", "80", "--redo", "--store"])
        .arg(&store)
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = good.file_name().unwrap().to_string_lossy();
    assert!(
        err.lines().any(|l| l.starts_with("failed:")
            && l.contains(&*name)
            && l.contains(&*id.to_string_lossy())),
        "{err}"
    );
}

/// `--sar-resample bilinear`: HH and HV as PyTorch's bilinear `interpolate` samples them (at an
/// odd ratio the cell's centre pixel, at 2 the mean of its 2 × 2 block), everything else as an
/// area store has it; the store records the mode, keeps it when added to, refuses another; a
/// run trained on it records it, and `predict` makes its levels the same way.
#[test]
fn bilinear_sar_levels_sample_the_native_grid_as_sar_icefm_did() {
    let dir = tempfile::tempdir().unwrap();
    let scenes = dir.path().join("scenes");
    synth(&scenes, 1, "203x211", "default");
    let ingest = |store: &Path, levels: &str, extra: &[&str]| {
        icefm()
            .args(["ingest", "--levels", levels, "--patch", "64", "--store"])
            .arg(store)
            .args(extra)
            .arg(&scenes)
            .output()
            .unwrap()
    };
    let area = dir.path().join("area.zarr");
    let bil = dir.path().join("bilinear.zarr");
    ok(ingest(&area, "40,80,200", &[]));
    ok(ingest(&bil, "80,200", &["--sar-resample", "bilinear"]));
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bil.join("zarr.json")).unwrap()).unwrap();
    assert_eq!(root["attributes"]["icefm"]["sar_resample"], "bilinear");
    assert!(
        root["attributes"]["icefm"]["continuous_rule"]
            .as_str()
            .unwrap()
            .starts_with("HH and HV: bilinear interpolation")
    );
    let area_root = std::fs::read_to_string(area.join("zarr.json")).unwrap();
    assert!(!area_root.contains("sar_resample"), "{area_root}");
    // The id of a one-scene store's scene.
    let only_scene = |store: &Path| {
        std::fs::read_dir(store.join("scenes"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .into_owned()
    };
    let id = only_scene(&bil);
    let sar = |store: &Path, level: &str| {
        let node = format!("/scenes/{id}/{level}/sar");
        let sh = icefm_ingest::store::array_shape(store, &node).unwrap();
        let v = icefm_ingest::store::read_f32(store, &node, [0..2, 0..sh[1], 0..sh[2]]).unwrap();
        (v, sh[1] as usize, sh[2] as usize)
    };
    let (native, nh, nw) = sar(&area, "40m");
    assert_eq!((nh, nw), (203, 211));
    // 200 m is 5 native pixels: each cell is its centre pixel, bit for bit (the last row and
    // column, past the scene's edge, repeat its last pixel).
    let (b200, h, w) = sar(&bil, "200m");
    assert_eq!((h, w), (41, 43));
    let mut compared = 0;
    for c in 0..2 {
        for y in 0..h {
            for x in 0..w {
                let (ny, nx) = ((5 * y + 2).min(nh - 1), (5 * x + 2).min(nw - 1));
                let want = native[(c * nh + ny) * nw + nx];
                let got = b200[(c * h + y) * w + x];
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "channel {c} ({y},{x}): {got} vs {want}"
                );
                compared += usize::from(!got.is_nan());
            }
        }
    }
    assert!(compared > 2 * h * w / 2, "{compared}");
    // 80 m is 2 native pixels: the 2 × 2 mean, the area store's value where all four are valid.
    let (b80, ..) = sar(&bil, "80m");
    let (a80, ..) = sar(&area, "80m");
    let mut same = 0;
    for (i, (b, a)) in b80.iter().zip(&a80).enumerate() {
        if !b.is_nan() {
            assert!(
                (b - a).abs() <= 1e-4 * a.abs().max(1.0),
                "cell {i}: {b} vs {a}"
            );
            same += 1;
        }
    }
    assert!(same > b80.len() / 2, "{same} of {}", b80.len());
    // Labels and distances are the area store's, bit for bit; the incidence angle too, where
    // it is given: where HH is (bilinear HH is invalid wherever an invalid pixel has a weight).
    for level in ["80m", "200m"] {
        let at = |array: &str| format!("/scenes/{id}/{level}/{array}");
        let sh = icefm_ingest::store::array_shape(&bil, &at("labels")).unwrap();
        let (h, w) = (sh[1], sh[2]);
        assert_eq!(
            icefm_ingest::store::read_u8(&bil, &at("labels"), [0..3, 0..h, 0..w]).unwrap(),
            icefm_ingest::store::read_u8(&area, &at("labels"), [0..3, 0..h, 0..w]).unwrap()
        );
        let read = |s: &Path, array: &str| {
            icefm_ingest::store::read_f32(s, &at(array), [0..2, 0..h, 0..w]).unwrap()
        };
        let (b_aux, a_aux, b_sar) = (read(&bil, "aux"), read(&area, "aux"), read(&bil, "sar"));
        let plane = (h * w) as usize;
        for i in 0..plane {
            let (b, a) = (b_aux[i], a_aux[i]);
            if b_sar[i].is_nan() {
                assert!(b.is_nan(), "{level} incidence {i}: {b} where HH is invalid");
            } else {
                assert_eq!(b.to_bits(), a.to_bits(), "{level} incidence {i}");
            }
            let (b, a) = (b_aux[plane + i], a_aux[plane + i]);
            assert!(
                b.to_bits() == a.to_bits(),
                "{level} distance {i}: {b} vs {a}"
            );
        }
    }
    // An RTT scene (80 m native, so 200 m is 2.5 pixels): its incidence angle, a resampled
    // channel of the file, is given exactly where HH is, as the area store's where both are.
    let rtt = dir.path().join("rtt");
    ok(icefm()
        .args([
            "synth", "--kind", "rtt", "--count", "1", "--size", "151x163", "--out",
        ])
        .arg(&rtt)
        .output()
        .unwrap());
    let (rtt_area, rtt_bil) = (
        dir.path().join("rtt-area.zarr"),
        dir.path().join("rtt-bil.zarr"),
    );
    for (store, extra) in [
        (&rtt_area, &[][..]),
        (&rtt_bil, &["--sar-resample", "bilinear"][..]),
    ] {
        ok(icefm()
            .args(["ingest", "--levels", "200", "--patch", "64", "--store"])
            .arg(store)
            .args(extra)
            .arg(&rtt)
            .output()
            .unwrap());
    }
    let rtt_id = only_scene(&rtt_bil);
    let read = |s: &Path, array: &str| {
        let node = format!("/scenes/{rtt_id}/200m/{array}");
        let sh = icefm_ingest::store::array_shape(s, &node).unwrap();
        icefm_ingest::store::read_f32(s, &node, [0..1, 0..sh[1], 0..sh[2]]).unwrap()
    };
    let (hh, inc, inc_area, hh_area) = (
        read(&rtt_bil, "sar"),
        read(&rtt_bil, "aux"),
        read(&rtt_area, "aux"),
        read(&rtt_area, "sar"),
    );
    let (mut invalid, mut both) = (0, 0);
    for i in 0..hh.len() {
        assert_eq!(
            hh[i].is_nan(),
            inc[i].is_nan(),
            "cell {i}: HH {} angle {}",
            hh[i],
            inc[i]
        );
        invalid += usize::from(hh[i].is_nan());
        if !hh[i].is_nan() && !hh_area[i].is_nan() {
            assert_eq!(inc[i].to_bits(), inc_area[i].to_bits(), "cell {i}");
            both += 1;
        }
    }
    assert!(
        invalid > 0 && both > hh.len() / 2,
        "{invalid} invalid, {both} compared"
    );
    let summary = ok(icefm().arg("inspect").arg(&bil).output().unwrap());
    assert!(
        String::from_utf8_lossy(&summary.stdout).starts_with(
            "1 scene(s); levels 80m, 200m; patch 64 px; HH and HV resampled bilinearly"
        ),
        "{}",
        String::from_utf8_lossy(&summary.stdout)
    );
    // Added to without the flag, the store keeps its mode; the other mode is refused.
    let more = ingest(&bil, "80,200", &["--redo"]);
    ok(more);
    let refused = ingest(&bil, "80,200", &["--sar-resample", "area"]);
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("the store's levels resample HH and HV by bilinear, this run asks for area"),
        "{err}"
    );
    let (again, ..) = sar(&bil, "200m");
    assert_eq!(
        again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b200.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // A fine-tuning run on the store, from an MAE pre-trained on the area store, is warned of
    // the other levels; it records its store's mode, and predict makes its levels so.
    let mae = dir.path().join("mae");
    ok(micro_train(
        &area,
        &mae,
        &["train.steps=1", "train.warmup_steps=0"],
        false,
    )
    .output()
    .unwrap());
    let seg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/seg_vit_tiny.toml");
    let run = dir.path().join("ft");
    let tuned = ok(icefm()
        .args(["train", "--store"])
        .arg(&bil)
        .arg("--config")
        .arg(&seg)
        .args(["--set", "model.preset=micro", "--set", "data.levels=80"])
        .args(["--set", "data.crop=32", "--set", "data.batch_size=2"])
        .args(["--set", "seg.channels=8", "--set", "train.steps=1"])
        .args(["--set", "train.warmup_steps=0", "--init"])
        .arg(&mae)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap());
    let err = String::from_utf8_lossy(&tuned.stderr);
    assert!(
        err.contains(
            "its encoder was pre-trained on a store whose levels resample HH and HV by area, \
             this store's by bilinear"
        ),
        "{err}"
    );
    let starts = std::fs::read_to_string(run.join("starts.jsonl")).unwrap();
    assert!(starts.contains("\"sar_resample\":\"bilinear\""), "{starts}");
    let kept = dir.path().join("kept.zarr");
    let file = std::fs::read_dir(&scenes)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let predicted = ok(icefm()
        .arg("predict")
        .arg(&file)
        .arg("--run")
        .arg(&run)
        .arg("--out")
        .arg(dir.path().join("sub.nc"))
        .arg("--keep-store")
        .arg(&kept)
        .output()
        .unwrap());
    let err = String::from_utf8_lossy(&predicted.stderr);
    assert!(
        err.contains("resample HH and HV by bilinear: the scenes' levels are made the same way"),
        "{err}"
    );
    let kept_root = std::fs::read_to_string(kept.join("zarr.json")).unwrap();
    assert!(
        kept_root.contains("\"sar_resample\": \"bilinear\""),
        "{kept_root}"
    );
    let (kept80, ..) = sar(&kept, "80m");
    assert_eq!(
        kept80.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b80.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}
