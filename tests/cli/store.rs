//! End-to-end: what a store offers once ingested (inspect, regimes, zarr-python and pyarrow)
//! and `icefm synth`'s listing.

use std::path::Path;
use std::process::Command;

use icefm_ingest::store::{array_shape, read_f32, read_u8};

use super::*;

/// A merge stopped between its renames leaves manifests of two merges: `inspect` prints the
/// summary and says that it mixes them, naming the remedy.
#[test]
fn inspect_says_when_the_manifests_come_from_two_merges() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 1, "200x220", "default", "80");
    let out = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    let patches = store.join("manifests/patches.parquet");
    let first = std::fs::read(&patches).unwrap();
    let more = dir.path().join("more");
    ok(icefm()
        .args(["synth", "--count", "1", "--size", "200x220", "--seed", "9"])
        .arg("--out")
        .arg(&more)
        .output()
        .unwrap());
    ok(icefm()
        .args(["ingest", "--levels", "80", "--patch", "64", "--store"])
        .arg(&store)
        .arg(&more)
        .output()
        .unwrap());
    std::fs::write(&patches, first).unwrap();
    let out = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("2 scene(s)"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: the summary above mixes two merges' manifests")
            && err.contains("icefm manifest merge --store"),
        "{err}"
    );
}

/// A regime draw waits while another holds the store's regime lock, says so, and writes its
/// file once the lock is released.
#[test]
fn a_regime_draw_waits_for_another_on_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 1, "200x220", "default", "80");
    let regimes = store.join("regimes");
    std::fs::create_dir_all(&regimes).unwrap();
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(regimes.join(".lock"))
        .unwrap();
    lock.lock().unwrap();
    let log = dir.path().join("draw.err");
    let mut child = icefm()
        .args(["regime", "--name", "later", "--rule", "all", "--store"])
        .arg(&store)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // It says it waits (however slowly it gets there), and does wait.
    let said = (0..600).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting for another regime draw on")
    });
    assert!(
        said,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the draw did not wait");
    assert!(!regimes.join("later.parquet").exists());
    drop(lock);
    assert!(child.wait().unwrap().success());
    assert!(regimes.join("later.parquet").is_file());
    // The lock file is not a regime.
    let listed = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("regimes (1;") && !text.contains(".lock"),
        "{text}"
    );
}

/// The class pixels a balance block prints for `task`, its 255 count last.
fn balance(text: &str, task: &str) -> Vec<u64> {
    let head = format!("{task} class balance (native pixels; ");
    let at = text.find(&head).unwrap_or_else(|| panic!("{text}"));
    let block = &text[at..];
    let first = block.lines().next().unwrap();
    let total: u64 = first
        .split(" of ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let counts: Vec<u64> = block
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let skip = 1 + usize::from(l.ends_with("(missing)"));
            l.split_whitespace()
                .rev()
                .nth(skip)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let labelled: u64 = counts.iter().sum();
    [counts, vec![total - labelled]].concat()
}

/// `inspect STORE --scene ID` without `--png`: the scene's record, its levels' shapes and
/// patches, its largest polygons, the regimes holding it, and its class balance, which summed
/// over the scenes is the store's.
#[test]
fn inspect_scene_prints_its_record_levels_polygons_regimes_and_balance() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "400x420", "default", "80,200");
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("scenes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let ids: Vec<String> = files
        .iter()
        .map(|f| icefm_schemas::names::parse_scene_name(f).unwrap().scene_id)
        .collect();
    let list = dir.path().join("one.txt");
    std::fs::write(&list, format!("{}\n", files[1])).unwrap();
    ok(icefm()
        .args(["regime", "--name", "just-one", "--rule", "import", "--list"])
        .arg(&list)
        .arg("--store")
        .arg(&store)
        .output()
        .unwrap());
    let inspect = |scene: &str| {
        let out = ok(icefm()
            .arg("inspect")
            .arg(&store)
            .args(["--scene", scene])
            .output()
            .unwrap());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let whole =
        String::from_utf8_lossy(&ok(icefm().arg("inspect").arg(&store).output().unwrap()).stdout)
            .into_owned();
    let texts: Vec<String> = vec![inspect(&ids[0]), inspect(&files[1])];
    for (k, text) in texts.iter().enumerate() {
        assert!(
            text.starts_with(&format!("scene {}\n  file         {} (", ids[k], files[k])),
            "{text}"
        );
        assert!(text.contains("native 400 x 420 px at 40 m"), "{text}");
        for level in ["80m", "200m"] {
            let sh = array_shape(&store, &format!("/scenes/{}/{level}/sar", ids[k])).unwrap();
            let patches = sh[1].div_ceil(64) * sh[2].div_ceil(64);
            let row = format!(
                "\n{level:<8} {:<13} {patches:>8}  ",
                format!("{} x {}", sh[1], sh[2])
            );
            assert!(text.contains(&row), "{row:?} in {text}");
        }
        // The largest polygons, largest first.
        let pixels: Vec<u64> = text
            .split("largest polygons (")
            .nth(1)
            .unwrap()
            .lines()
            .skip(2)
            .take_while(|l| !l.is_empty())
            .map(|l| l.split_whitespace().rev().nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(pixels.len(), 8, "{text}");
        assert!(pixels.windows(2).all(|w| w[0] >= w[1]), "{pixels:?}");
    }
    // Where each lies, as the scenes manifest records it.
    let manifest = icefm_ingest::manifest::read_parquet(&store.join("manifests/scenes.parquet"))
        .unwrap()
        .remove(0);
    let float = |name: &str, row: usize| {
        manifest
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<arrow_array::Float64Array>()
            .unwrap()
            .value(row)
    };
    for (k, text) in texts.iter().enumerate() {
        let (lat, lon) = (float("centre_latitude", k), float("centre_longitude", k));
        let (south, west) = (float("min_latitude", k), float("west_longitude", k));
        // The synthetic scenes lie in Greenland's waters: north and west.
        assert!(
            lat > 50.0 && lon < 0.0 && south <= lat && west <= lon,
            "{lat} {lon}"
        );
        let line = format!(
            "\n  location     centre {:.2}° N, {:.2}° W (the image's); tie points {:.2}° N to ",
            lat, -lon, south
        );
        assert!(text.contains(&line), "{line:?} in {text}");
        // The store's listing gives the centre in its scene's row.
        let row = whole
            .lines()
            .find(|l| l.starts_with(&ids[k]))
            .unwrap_or_else(|| panic!("{whole}"));
        let centre = format!("{:>5.2}N {:>6.2}W", lat, -lon);
        assert!(row.contains(&centre), "{centre:?} in {row}");
    }
    assert!(texts[0].contains("\nin regimes: none\n"), "{}", texts[0]);
    assert!(
        texts[1].contains("\nin regimes: just-one (finetune)\n"),
        "{}",
        texts[1]
    );
    for task in ["SIC", "SOD", "FLOE"] {
        let (a, b) = (balance(&texts[0], task), balance(&texts[1], task));
        let sum: Vec<u64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(sum, balance(&whole, task), "{task}");
        assert!(a.iter().sum::<u64>() == 400 * 420, "{task}: {a:?}");
    }
    // One level's arrays read back: HH's valid share, mean, spread and percentiles as the
    // array gives them.
    let text = String::from_utf8_lossy(
        &ok(icefm()
            .arg("inspect")
            .arg(&store)
            .args(["--scene", &ids[0], "--level", "80"])
            .output()
            .unwrap())
        .stdout,
    )
    .into_owned();
    let node = format!("/scenes/{}/80m/sar", ids[0]);
    let sh = array_shape(&store, &node).unwrap();
    let hh = read_f32(&store, &node, [0..1, 0..sh[1], 0..sh[2]]).unwrap();
    let mut valid: Vec<f64> = hh
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| f64::from(v))
        .collect();
    valid.sort_by(f64::total_cmp);
    let n = valid.len() as f64;
    let mean = valid.iter().sum::<f64>() / n;
    let std = (valid.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    let at = |q: f64| valid[((q * n).ceil() as usize).max(1) - 1];
    assert!(
        text.starts_with(&format!(
            "scene {} at 80m: {} x {} cells, ",
            ids[0], sh[1], sh[2]
        )),
        "{text}"
    );
    let row: Vec<f64> = text
        .lines()
        .find(|l| l.starts_with("HH "))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.trim_end_matches('%').parse().unwrap())
        .collect();
    let share = 100.0 * n / hh.len() as f64;
    assert!((row[0] - share).abs() <= 0.05, "{row:?} {share}");
    assert!(
        (row[1] - mean).abs() <= 0.005 && (row[2] - std).abs() <= 0.006,
        "{row:?} {mean} {std}"
    );
    for (got, q) in row[3..6].iter().zip([0.01, 0.5, 0.99]) {
        assert!((got - at(q)).abs() <= 0.011, "p{q}: {got} vs {}", at(q));
    }
    assert_eq!(
        (row[6], row[7]),
        (
            (valid[0] * 100.0).round() / 100.0,
            (valid[valid.len() - 1] * 100.0).round() / 100.0
        )
    );
    // A test-release file without its chart: said so, and no class table of zeros.
    let test = dir.path().join("test");
    ok(icefm()
        .args([
            "synth",
            "--release",
            "test",
            "--count",
            "1",
            "--size",
            "200x220",
            "--out",
        ])
        .arg(&test)
        .output()
        .unwrap());
    let test_store = dir.path().join("test.zarr");
    ok(icefm()
        .args(["ingest", "--levels", "80", "--patch", "64", "--store"])
        .arg(&test_store)
        .arg(&test)
        .output()
        .unwrap());
    let test_file = std::fs::read_dir(&test)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = String::from_utf8_lossy(
        &ok(icefm()
            .arg("inspect")
            .arg(&test_store)
            .arg("--scene")
            .arg(&test_file)
            .output()
            .unwrap())
        .stdout,
    )
    .into_owned();
    assert!(
        text.contains("  chart        none: no pixel is labelled")
            && text.ends_with("\nclass balance: no labelled pixel\n")
            && text.contains("test release"),
        "{text}"
    );
    let out = icefm()
        .arg("inspect")
        .arg(&store)
        .args(["--scene", "20990101T000000_dmi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("scene \"20990101T000000_dmi\" is not in") && err.contains(&ids[0]),
        "{err}"
    );
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
    // The quicklook's scene named by its file, as a researcher copies it from a listing.
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("scenes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let id = icefm_schemas::names::parse_scene_name(&files[1])
        .unwrap()
        .scene_id;
    let out = ok(icefm()
        .arg("inspect")
        .arg(&store)
        .arg("--png")
        .arg(&png)
        .args(["--scene", &files[1]])
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("quicklook of {id} at 200m")),
        "{text}"
    );
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
    // A reader that has gone (`icefm inspect … | head -1` once head has its line): no panic
    // message, the status of a process ended by SIGPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = icefm()
        .arg("inspect")
        .arg(&store)
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Regimes drawn from an ingested store: a ladder, an excluding pair, `check`, `inspect --regime`
/// and the errors a researcher meets first.
#[test]
fn verify_finds_a_damaged_scene_and_its_redo_mends_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "300x320", "default", "80");
    let out = ok(icefm()
        .args(["inspect", "--verify"])
        .arg(&store)
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        // Per scene: its 2 km grid, the grid's names, positions, latitude and longitude, and
        // the 80 m level's channel and task names and positions.
        text.contains("and 22 small array(s) (2 km grids, coordinates) of 2 scene(s) back")
            && text.contains("no damage found"),
        "{text}"
    );
    // One scene loses a shard file.
    let scene_dir = std::fs::read_dir(store.join("scenes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let scene = scene_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::fs::remove_file(scene_dir.join("80m/aux/c/0/2/0")).unwrap();
    // And its cells' latitude altogether: the 2 km grid's `coordinates` names it.
    std::fs::remove_dir_all(scene_dir.join("latitude")).unwrap();
    let out = icefm()
        .args(["inspect", "--verify"])
        .arg(&store)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let damaged: Vec<&str> = text.lines().filter(|l| l.starts_with("damaged:")).collect();
    assert_eq!(damaged.len(), 2, "{text}");
    assert!(
        damaged
            .iter()
            .any(|d| d.contains(&scene) && d.contains("latitude")),
        "{text}"
    );
    assert!(
        damaged
            .iter()
            .any(|d| d.contains(&scene) && d.contains("80m/aux") && d.contains("c/0/2/0")),
        "{text}"
    );
    // The command it prints names the scene's file; run as printed, it mends the store.
    let line = text
        .lines()
        .find(|l| l.starts_with("1 damaged scene(s); write them again from their files "))
        .unwrap_or_else(|| panic!("{text}"));
    let command = line.split_once(": icefm ").unwrap().1;
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[..2], ["ingest", "--redo"], "{line}");
    let file = dir.path().join("scenes").join(words[2]);
    assert!(file.is_file(), "{line}");
    assert_eq!(words[3..], ["--store", &*store.to_string_lossy()], "{line}");
    // Named by URL, the store cannot be written by ingest: the mend is in its local copy.
    let out = icefm()
        .args(["inspect", "--verify"])
        .arg(format!("file://{}", store.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "1 damaged scene(s); write them again in the local store this one was copied from"
        ) && text.contains("--store LOCAL_STORE, then copy it here again"),
        "{text}"
    );
    ok(icefm()
        .args(["ingest", "--redo", "--store"])
        .arg(&store)
        .arg(&file)
        .output()
        .unwrap());
    let out = ok(icefm()
        .args(["inspect", "--verify"])
        .arg(&store)
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no damage found"));
}

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
    // What would be ignored, or make an awkward file name, is refused.
    for (args, want) in [
        (
            &["--name", "a b", "--percent", "50"][..],
            "regime name \"a b\": use letters",
        ),
        (
            &["--name", "x.parquet", "--percent", "50"][..],
            "no .parquet ending",
        ),
        (
            &["--name", "l", "--percent", "50", "--list", "x.txt"][..],
            "--list is for --rule import",
        ),
        (
            &["--name", "o", "--percent", "50", "--out", "o.parquet"][..],
            "--out is for planning",
        ),
        (
            &["--name", "d", "--ladder", "5,5"][..],
            "--ladder names 5 twice",
        ),
    ] {
        let out = regime(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
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
    // Another seed draws other scenes under names that exist: refused, nothing written.
    let ladder_seed = |seed: &str, force: bool| {
        let mut args = vec![
            "--name", "ft", "--rule", "fraction", "--ladder", "25,50", "--seed", seed,
        ];
        if force {
            args.push("--force");
        }
        regime(&args)
    };
    let changed = (4..40)
        .map(|s| s.to_string())
        .find(|s| {
            let out = ladder_seed(s, false);
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("ft_50")
        })
        .expect("some seed draws another ft_50");
    // (A seed tried before it that drew the same scenes rewrote the files: no change.)
    let before = std::fs::read(store.join("regimes/ft_50.parquet")).unwrap();
    let out = ladder_seed(&changed, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ft_50 exists with other scenes") && err.contains("--force to replace"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(store.join("regimes/ft_50.parquet")).unwrap(),
        before
    );
    // --force replaces them, and names the regime drawn around the old ft_50.
    let out = ok(ladder_seed(&changed, true));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replaced regime ft_50 (--force)"), "{err}");
    assert!(
        err.contains("warning: regime pt was drawn excluding ft_50's old scenes"),
        "{err}"
    );
    assert_ne!(
        std::fs::read(store.join("regimes/ft_50.parquet")).unwrap(),
        first
    );
    // Back to seed 3 for the checks below.
    ok(ladder_seed("3", true));
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
    // The store's summary lists its regimes: the patch-listing one holds all 4 scenes.
    let out = ok(icefm().arg("inspect").arg(&store).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\nregimes (5; `icefm inspect STORE --regime NAME` for one):\n")
            && text.contains("\n  pp                   finetune  all, patches              4\n")
            && text.contains("\n  pt                   pretrain  fraction 50%              2\n"),
        "{text}"
    );
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
    // A ladder is written whole or not at all: a member whose file cannot be written (its
    // name too long here) takes back the ones before it.
    let out = regime(&["--name", "long", "--ladder", "50,1e-300"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "the 1 regime file(s) written before it were taken back (new ones removed, \
             replaced ones restored)"
        ),
        "{err}"
    );
    assert!(!store.join("regimes/long_50.parquet").exists());
    // A member it replaced (--force) is restored as it was.
    ok(regime(&["--name", "long_50", "--rule", "all"]));
    let was = std::fs::read(store.join("regimes/long_50.parquet")).unwrap();
    let out = regime(&["--name", "long", "--ladder", "50,1e-300", "--force"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    // A failed draw has replaced nothing, and does not say it has.
    assert!(
        !err.contains("replaced regime long_50") && err.contains("replaced ones restored"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(store.join("regimes/long_50.parquet")).unwrap(),
        was
    );
    let left: Vec<String> = std::fs::read_dir(store.join("regimes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    std::fs::remove_file(store.join("regimes/long_50.parquet")).unwrap();
    // A training regime drawn over a test regime's scenes is said at once, not when a run
    // refuses it.
    ok(regime(&[
        "--name", "exam", "--rule", "all", "--role", "test",
    ]));
    let out = ok(regime(&["--name", "late", "--rule", "all"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "regime late shares 4 scene(s) with the test regime exam: `icefm train` refuses it"
        ),
        "{err}"
    );
    // Drawn within a subset (two scenes imported as a region would be): half of it.
    let two: Vec<String> = read_regime_scenes(&store.join("regimes/late.parquet"))[..2].to_vec();
    let list = dir.path().join("two.txt");
    std::fs::write(&list, two.join("\n")).unwrap();
    ok(regime(
        &["--name", "two", "--rule", "import", "--list"]
            .into_iter()
            .chain([list.to_str().unwrap()])
            .collect::<Vec<_>>(),
    ));
    let out = ok(regime(&[
        "--name",
        "half",
        "--percent",
        "50",
        "--within",
        "two",
        "--seed",
        "4",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("regime half (finetune, rule fraction 50 %, seed 4, within two): 1 of 4"),
        "{text}"
    );
    let half = read_regime_scenes(&store.join("regimes/half.parquet"));
    assert!(
        half.len() == 1 && two.contains(&half[0]),
        "{half:?} of {two:?}"
    );
    // Replacing the subset warns of the regimes drawn within it.
    let others: Vec<String> = read_regime_scenes(&store.join("regimes/late.parquet"))[2..].to_vec();
    std::fs::write(&list, others.join("\n")).unwrap();
    let out = ok(regime(
        &["--name", "two", "--rule", "import", "--force", "--list"]
            .into_iter()
            .chain([list.to_str().unwrap()])
            .collect::<Vec<_>>(),
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: regime half was drawn within two's old scenes"),
        "{err}"
    );
}

/// A regime file's scenes, in order.
fn read_regime_scenes(path: &Path) -> Vec<String> {
    icefm_dataset::regime::Regime::read(path).unwrap().scenes
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
        // Raw scenes: every one has its cells' latitude and longitude.
        "located": ids.len(),
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

#[test]
fn synth_lists_its_encodings_without_an_output_folder_and_asks_for_one_otherwise() {
    let out = ok(icefm()
        .args(["synth", "--encoding", "list"])
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert!(
        lines[0].starts_with("default ")
            && lines[0]
                .ends_with("ids f32 NaN, codes vlen, deflate 4, chunks 1024 × 1024, SAR f32"),
        "{text}"
    );
    assert!(
        text.contains("chunks 16 × full width") && text.contains("deflate none"),
        "{text}"
    );
    // Every listed name is accepted as an encoding.
    let dir = tempfile::tempdir().unwrap();
    for line in &lines[..6] {
        let name = line.split_whitespace().next().unwrap();
        synth(&dir.path().join(name), 1, "120x130", name);
    }
    let missing = icefm().args(["synth", "--count", "1"]).output().unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("icefm synth needs --out DIR"), "{err}");
}
