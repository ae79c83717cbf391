//! End-to-end tests of the `icefm` executable in temporary directories.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use icefm_ingest::store::{array_shape, read_f32, read_u8};

fn icefm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_icefm"))
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn synth(dir: &Path, count: u32, size: &str, encoding: &str) {
    ok(icefm()
        .args([
            "synth",
            "--count",
            &count.to_string(),
            "--size",
            size,
            "--encoding",
            encoding,
            "--out",
        ])
        .arg(dir)
        .output()
        .unwrap());
}

/// Synthetic scenes ingested at `levels` with 64-px patches: the store path.
fn synth_and_ingest(dir: &Path, count: u32, size: &str, encoding: &str, levels: &str) -> PathBuf {
    let scenes = dir.join("scenes");
    synth(&scenes, count, size, encoding);
    let store = dir.join("s.zarr");
    ok(icefm()
        .args(["ingest", "--levels", levels, "--patch", "64", "--store"])
        .arg(&store)
        .arg(&scenes)
        .output()
        .unwrap());
    store
}

fn tree_bytes(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

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
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("0 failed"), "{stderr}");
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
            && stdout.contains("2 scene(s) are complete but the manifests list 0"),
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
    assert!(stderr.contains("2 done, 0 skipped, 0 failed"), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let out = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SIC class balance"), "{stdout}");
    assert!(!stdout.contains("100.0% of"), "{stdout}");
    assert!(!stdout.contains("have no label"), "{stdout}");
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
    assert!(
        stdout.contains("    0.0%  0\n1 scene(s) have no label"),
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
    assert!(err.contains("1 done, 0 skipped, 1 failed"), "{err}");
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 done, 1 skipped, 1 failed"));
    // A store made with other levels is refused with one line.
    let out = icefm()
        .args(["ingest", "--levels", "200", "--store"])
        .arg(&store)
        .arg(&scenes)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use another store"));
}

#[test]
fn inspect_prints_balance_and_writes_a_quicklook() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "400x420", "default", "80,200");
    let png = dir.path().join("q.png");
    let out = ok(icefm()
        .arg("inspect")
        .arg(&store)
        .arg("--png")
        .arg(&png)
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("2 scene(s); levels 80m, 200m; patch 64 px"),
        "{text}"
    );
    assert!(text.contains("SOD class balance"), "{text}");
    assert!(text.contains("open water"), "{text}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(!text.contains("without a committed scene") && !text.contains("claimed"));
    // What a killed ingest leaves: a scene folder without its commit, and its claim.
    std::fs::create_dir_all(store.join("scenes/20990101T000000_dmi/80m")).unwrap();
    std::fs::write(
        store.join("manifests/claims/20990101T000000_dmi.claim"),
        "x.nc\nnode\n7\n",
    )
    .unwrap();
    let out = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 scene folder(s) without a committed scene")
            && text.contains("redoes them): 20990101T000000_dmi\n")
            && text.contains("1 scene(s) claimed by an ingest")
            && text.contains("`manifests/claims/`): 20990101T000000_dmi\n"),
        "{text}"
    );
    let out = icefm()
        .arg("inspect")
        .arg(&store)
        .args(["--png", "x.png", "--level", "120"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("level 120m is not in the store"));
}

/// Regimes drawn from an ingested store: a ladder, an excluding pair, `check`, `inspect --regime`
/// and the errors a researcher meets first.
#[test]
fn regimes_from_a_store_are_nested_disjoint_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 4, "200x220", "default", "80,400");
    let regime = |args: &[&str]| {
        icefm()
            .arg("regime")
            .args(args)
            .arg("--store")
            .arg(&store)
            .output()
            .unwrap()
    };
    let out = ok(regime(&[
        "--name", "ft", "--rule", "fraction", "--ladder", "25,50", "--seed", "3",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("regime ft_25 (finetune, rule fraction 25 %, seed 3): 1 of 4 scenes"),
        "{text}"
    );
    assert!(text.contains("of 4 scenes"), "{text}");
    assert!(text.contains("patches"), "{text}");
    let out = ok(regime(&[
        "--name",
        "pt",
        "--rule",
        "fraction",
        "--percent",
        "50",
        "--role",
        "pretrain",
        "--exclude",
        "ft_50",
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 of 4 scenes"));
    let check = |a: &str, b: &str| {
        icefm()
            .args(["regime", "check", a, b, "--store"])
            .arg(&store)
            .output()
            .unwrap()
    };
    let out = check("ft_50", "pt");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("are disjoint"));
    // The 25 % regime sits inside the 50 % one, so it overlaps itself-plus.
    let out = check("ft_25", "ft_50");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("share 1 scene(s)"));
    // Same store, rule and seed: the same bytes.
    let first = std::fs::read(store.join("regimes/ft_50.parquet")).unwrap();
    ok(regime(&[
        "--name", "ft", "--rule", "fraction", "--ladder", "25,50", "--seed", "3",
    ]));
    // Coverage takes as many scenes as holding every class needs, and says so.
    let out = ok(regime(&[
        "--name",
        "cov",
        "--rule",
        "coverage",
        "--percent",
        "25",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("missing: none"), "{text}");
    assert_eq!(
        std::fs::read(store.join("regimes/ft_50.parquet")).unwrap(),
        first
    );
    let out = ok(icefm()
        .arg("inspect")
        .arg(&store)
        .args(["--regime", "pt"])
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("regime pt (pretrain, rule fraction 50 %"),
        "{text}"
    );
    assert!(
        text.contains("regimes in the store: cov, ft_25, ft_50, pt"),
        "{text}"
    );
    let out = check("ft_50", "nope");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown regime `nope`") && err.contains("known: cov, ft_25, ft_50, pt"),
        "{err}"
    );
    let out = regime(&["--name", "x", "--rule", "fraction"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --percent"));
    // A regime listing its 80 m patches at least half valid; inspect reads the list back.
    let out = ok(regime(&[
        "--name",
        "pp",
        "--rule",
        "all",
        "--patches",
        "--min-valid",
        "0.5",
        "--levels",
        "80",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let listed = text
        .split("; lists ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(listed > 0, "{text}");
    assert!(text.contains("(valid SAR ≥ 50 % at 80m)"), "{text}");
    let out = ok(icefm()
        .arg("inspect")
        .arg(&store)
        .args(["--regime", "pp"])
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("; lists {listed} patches")));
    let out = regime(&[
        "--name",
        "x",
        "--rule",
        "all",
        "--patches",
        "--levels",
        "120",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no level 120m"));
}

/// zarr-python, xarray and pyarrow read the store with no icefm code and agree with icefm.
#[test]
fn store_opens_in_zarr_python_and_pyarrow_with_the_same_values() {
    let have = Command::new("python3")
        .args(["-c", "import zarr, xarray, pyarrow, numpy"])
        .status();
    assert!(
        have.is_ok_and(|s| s.success()),
        "python3 with zarr, xarray, pyarrow and numpy is needed: run `make deps`"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "300x340", "cycle", "80,200");
    let ids: Vec<String> = std::fs::read_dir(store.join("scenes"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut arrays = Vec::new();
    let mut patches = 0u64;
    for id in &ids {
        for level in ["80m", "200m"] {
            for name in ["sar", "aux", "labels"] {
                let node = format!("/scenes/{id}/{level}/{name}");
                let shape = array_shape(&store, &node).unwrap();
                let r = [0..shape[0], 0..shape[1], 0..shape[2]];
                let (cy, cx) = (shape[1] / 2, shape[2] / 2);
                let idx = |c: u64, y: u64, x: u64| ((c * shape[1] + y) * shape[2] + x) as usize;
                let entry = if name == "labels" {
                    let v = read_u8(&store, &node, r).unwrap();
                    let mut hist = serde_json::Map::new();
                    for k in 0..=255u8 {
                        let n = v.iter().filter(|&&x| x == k).count();
                        if n > 0 {
                            hist.insert(k.to_string(), n.into());
                        }
                    }
                    let window: Vec<serde_json::Value> = (0..4)
                        .flat_map(|y| (0..4).map(move |x| (y, x)))
                        .map(|(y, x)| v[idx(0, cy + y, cx + x)].into())
                        .collect();
                    serde_json::json!({"node": node, "shape": shape, "hist": hist, "window_at": [0, cy, cx], "window": window})
                } else {
                    let v = read_f32(&store, &node, r).unwrap();
                    let nan = v.iter().filter(|x| x.is_nan()).count();
                    let sum: f64 = v
                        .iter()
                        .filter(|x| !x.is_nan())
                        .map(|&x| f64::from(x))
                        .sum();
                    let window: Vec<serde_json::Value> = (0..4)
                        .flat_map(|y| (0..4).map(move |x| (y, x)))
                        .map(|(y, x)| {
                            let f = v[idx(1, cy + y, cx + x)];
                            if f.is_nan() {
                                serde_json::Value::Null
                            } else {
                                f64::from(f).into()
                            }
                        })
                        .collect();
                    serde_json::json!({"node": node, "shape": shape, "nan": nan, "sum": sum, "window_at": [1, cy, cx], "window": window})
                };
                arrays.push(entry);
            }
            let sh = array_shape(&store, &format!("/scenes/{id}/{level}/sar")).unwrap();
            patches += sh[1].div_ceil(64) * sh[2].div_ceil(64);
        }
    }
    let expected = serde_json::json!({
        "levels": ["80m", "200m"],
        "arrays": arrays,
        "scene_ids": ids,
        "manifest_rows": {"scenes": ids.len(), "patches": patches},
    });
    let exp = dir.path().join("expected.json");
    std::fs::write(&exp, serde_json::to_vec(&expected).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/check_store.py");
    let out = ok(Command::new("python3")
        .arg(script)
        .arg(&store)
        .arg(&exp)
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains("checks passed"));
}

/// `icefm train` of the micro MAE (tests' size) on `store` into `run`, with more `--set`s.
fn micro_train(store: &Path, run: &Path, sets: &[&str], resume: bool) -> Command {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/mae_vit_tiny.toml");
    let mut c = icefm();
    c.arg("train")
        .arg("--store")
        .arg(store)
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(run);
    let micro = [
        "model.preset=micro",
        "mae.decoder_dim=8",
        "mae.decoder_depth=1",
        "mae.decoder_heads=2",
        "data.levels=80",
        "data.crop=32",
        "data.batch_size=2",
    ];
    for s in micro.iter().chain(sets) {
        c.args(["--set", s]);
    }
    if resume {
        c.arg("--resume");
    }
    c
}

/// (width, height) of a PNG file.
fn png_size(path: &Path) -> (usize, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn train_writes_a_run_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let run = dir.path().join("run");
    let train = |steps: &str, resume: bool| {
        let sets = ["train.checkpoint_every=2", "train.warmup_steps=1", steps];
        micro_train(&store, &run, &sets, resume).output().unwrap()
    };
    let out = ok(train("train.steps=3", false));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("trained 3 steps (now at 3 of 3)"), "{text}");
    for f in [
        "config.toml",
        "log.txt",
        "metrics.parquet",
        "loss.png",
        "checkpoints/step_0000003/model.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    assert_eq!(png_size(&run.join("loss.png")), (1000, 600));
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("preset = \"micro\""), "{resolved}");
    // Again without --resume: refused; with it and more steps: continues.
    let out = train("train.steps=3", false);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let out = ok(train("train.steps=5", true));
    assert!(String::from_utf8_lossy(&out.stdout).contains("trained 2 steps (now at 5 of 5)"));
    // Curves: any column of the metrics, of one run or several; wrong names say what there is.
    let plot = |args: &[&str]| {
        icefm()
            .arg("plot")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let runs = run.to_str().unwrap();
    let out = ok(plot(&[runs, "--metric", "lr", "--smooth", "1"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        run.join("lr.png").to_str().unwrap()
    );
    assert_eq!(png_size(&run.join("lr.png")), (1000, 600));
    ok(plot(&[runs, runs, "--metric", "grad_norm"]));
    assert_eq!(png_size(&dir.path().join("grad_norm.png")), (1000, 600));
    let out = plot(&[runs, "--metric", "los"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no column \"los\"; it has loss, lr, grad_norm"),
        "{err}"
    );
    let err =
        String::from_utf8_lossy(&plot(&[runs, "--metric", "val.combined"]).stderr).to_string();
    assert!(err.contains("has no validation.parquet"), "{err}");
    // A typo in a key is one clear error.
    let out = train("train.stesp=5", false);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `stesp`"));
}

#[test]
fn two_processes_train_one_run_with_dist() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let run = dir.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.warmup_steps=1",
        "data.threads=1",
    ];
    // Rank 1 through Slurm's variables, rank 0 through an explicit address; rank 1 first,
    // so it waits for rank 0.
    let mut one = micro_train(&store, &run, &sets, false);
    one.args(["--dist", "slurm"])
        .env("SLURM_PROCID", "1")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_LOCALID", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    let one = one
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut zero = micro_train(&store, &run, &sets, false);
    zero.args(["--dist", &format!("0/2@127.0.0.1:{port}")]);
    let zero = ok(zero.output().unwrap());
    let one = ok(one.wait_with_output().unwrap());
    let text = String::from_utf8_lossy(&zero.stdout);
    assert!(text.contains("trained 3 steps (now at 3 of 3)"), "{text}");
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(text.contains("rank 1 of 2: trained 3 steps"), "{text}");
    assert!(
        String::from_utf8_lossy(&one.stderr)
            .contains("rank 1 of 2: meeting the other ranks at 127.0.0.1:")
    );
    assert!(
        run.join("checkpoints/step_0000003/model.safetensors")
            .exists()
    );
    // A bad --dist is one line.
    let mut bad = micro_train(&store, &dir.path().join("bad"), &sets, false);
    let out = bad
        .args(["--dist", "2/2@localhost:29500"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 2 of 2 ranks does not exist"), "{err}");
}

/// The `loss` column of a run's `metrics.parquet`.
fn losses(run: &Path) -> Vec<f32> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float32Type;
    let file = std::fs::File::open(run.join("metrics.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let c = b.column_by_name("loss").unwrap();
        out.extend(c.as_primitive::<Float32Type>().values().iter().copied());
    }
    out
}

#[test]
fn dist_local_starts_the_ranks_itself_and_trains_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.warmup_steps=1",
        "data.threads=1",
    ];
    let alone = dir.path().join("alone");
    ok(micro_train(&store, &alone, &sets, false).output().unwrap());
    let run = dir.path().join("run");
    let out = ok(micro_train(&store, &run, &sets, false)
        .args(["--dist", "local:2"])
        .output()
        .unwrap());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("starting 2 ranks on this machine (rank 0 at 127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        stdout.contains("trained 3 steps (now at 3 of 3)"),
        "{stdout}"
    );
    assert!(stdout.contains("rank 1 of 2: trained 3 steps"), "{stdout}");
    // Two ranks, one process's step: the same losses.
    let (want, got) = (losses(&alone), losses(&run));
    assert_eq!(want.len(), 3);
    assert_eq!(got.len(), 3);
    for (a, b) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() < 2e-6 * a.abs().max(1.0),
            "{want:?} vs {got:?}"
        );
    }
    // A batch the ranks cannot share is said once, before any rank starts.
    let out = micro_train(&store, &dir.path().join("odd"), &sets, false)
        .args(["--dist=local:3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("is not a multiple of the 3 ranks").count(),
        1,
        "{err}"
    );
    assert!(!err.contains("starting"), "{err}");
    assert!(!dir.path().join("odd").exists());
    // So is a device this build cannot use (no CUDA here).
    let out = micro_train(&store, &dir.path().join("gpu"), &sets, false)
        .args(["--dist", "local:2", "--device", "cuda"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("--features cuda").count(), 1, "{err}");
    assert!(!err.contains("starting"), "{err}");
}

#[test]
fn train_names_what_is_wrong_with_a_device_or_a_precision() {
    let dir = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/mae_vit_tiny.toml");
    let run = |extra: &[&str]| {
        let mut c = icefm();
        c.args(["train", "--store"])
            .arg(dir.path())
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(dir.path().join("run"));
        c.args(extra);
        c.output().unwrap()
    };
    // A CPU-only build: CUDA is a rebuild away, and the message says how.
    let out = run(&["--device", "cuda:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
    let out = run(&["--device", "gpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda or cuda:N"));
    let out = run(&["--set", "train.precision=fp16"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected f32 or bf16"));
}

/// The output of `child` once it ends; killed, with a failed test, if that takes over `limit`
/// (a run that ignores its stop signal would otherwise train for ever), and with it every
/// process whose command line holds `also_kill` (its ranks).
fn wait_with_limit(mut child: std::process::Child, limit: Duration, also_kill: &Path) -> Output {
    use std::io::Read;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = vec![];
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("pkill").arg("-f").arg(also_kill).status();
            panic!("still running {limit:?} after the stop signal");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Send `signal` (`-INT`, `-TERM`) to `child` once its run trains: `log` exists, then 1.5 s.
fn signal_once_training(child: &std::process::Child, log: &Path, signal: &str) {
    let t0 = std::time::Instant::now();
    while !log.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let kill = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// Checkpoints `step_N` of a run, by step.
fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            name.strip_prefix("step_")?.parse().ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

#[test]
fn sigterm_to_the_dist_local_launcher_alone_stops_every_rank_at_one_step_and_saves() {
    // `kill PID` (SIGTERM), as a scheduler or a user sends it, to the launcher only: the ranks
    // are not signalled by anyone else, so they stop only if the launcher passes it on.
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let run = dir.path().join("run");
    let sets = [
        "train.steps=1000000",
        "train.checkpoint_every=1000000",
        "train.panel_every=0",
        "data.threads=1",
    ];
    let child = micro_train(&store, &run, &sets, false)
        .args(["--dist", "local:2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = run.join("log.txt");
    signal_once_training(&child, &log, "-TERM");
    let out = wait_with_limit(child, Duration::from_secs(120), &run);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    // Both ranks stopped after the same step, and rank 0 saved it.
    let steps = checkpoint_steps(&run);
    assert_eq!(steps.len(), 1, "{steps:?}");
    let done = steps[0];
    assert!((1..1_000_000).contains(&done), "{done}");
    assert!(
        stdout.contains(&format!("stopped after {done} steps")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("rank 1 of 2: stopped after {done} steps")),
        "{stdout}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("(interrupt)")
    );
}

#[test]
fn ctrl_c_stops_training_at_a_step_boundary_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 1, "200x220", "default", "80");
    let run = dir.path().join("run");
    let train = |steps: &str, resume: bool| {
        let sets = [
            "train.checkpoint_every=1000000",
            "train.panel_every=0",
            steps,
        ];
        micro_train(&store, &run, &sets, resume)
    };
    let child = train("train.steps=1000000", false)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // SIGINT, as a terminal's Ctrl-C sends.
    let log = run.join("log.txt");
    signal_once_training(&child, &log, "-INT");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("stopped after"), "{text}");
    assert!(
        text.contains("continue with: icefm train --resume"),
        "{text}"
    );
    // The checkpoint of the step it stopped at, and a resume that continues from it.
    let ckpts = checkpoint_steps(&run);
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let done = ckpts[0];
    assert!((1..1_000_000).contains(&done), "{done}");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("(interrupt)")
    );
    let out = ok(train(&format!("train.steps={}", done + 2), true)
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "trained 2 steps (now at {} of {})",
            done + 2,
            done + 2
        )),
        "{text}"
    );
}

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
    }
    let stem = scene.file_stem().unwrap().to_string_lossy().into_owned();
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
}
