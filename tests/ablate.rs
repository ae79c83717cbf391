//! `icefm ablate` end to end on a store of generated scenes: a 2 regimes × 2 inits grid of
//! micro models, its table, plot and resume; a single-task, multi-scale cell; grids that are
//! wrong fail before any training.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::SystemTime;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt64Type};
use icefm_dataset::regime::{Regime, RegimeSpec, Role, Rule, draw, draw_ladder};
use icefm_dataset::table::SceneTable;
use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
use icefm_ingest::plot::{PLOT_HEIGHT, PLOT_WIDTH};
use icefm_ingest::store::new_attrs;
use icefm_schemas::Level;
use icefm_schemas::store::DEFAULT_CODEC;
use icefm_synth::{SceneKind, SynthOptions, write_scene};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn icefm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_icefm"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(out: Output) -> Output {
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    out
}

/// The shared fixture: a store of four generated scenes at 80 and 160 m (64-px patches) with
/// regimes `test` (one scene) and the ladder `ft_25` (one scene), `ft_50` (two) drawn from the
/// others, and a micro MAE pre-trained for two steps.
struct Fixture {
    store: PathBuf,
    mae: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ablate-tests");
        let _ = std::fs::remove_dir_all(&root);
        let mut inputs = Vec::new();
        for i in 0..4u32 {
            let mut o = SynthOptions::new(SceneKind::Rtt, 160, 180, 31 + u64::from(i));
            o.index = i;
            inputs.push(write_scene(&root.join("scenes"), &o).unwrap());
        }
        let store = root.join("s.zarr");
        let attrs = new_attrs(&Level::parse_list("80,160").unwrap(), 64, DEFAULT_CODEC);
        let summary = ingest(
            &inputs,
            &store,
            attrs,
            &IngestOptions::default(),
            &NoReporter,
        )
        .unwrap();
        assert_eq!(summary.scenes_in_store, 4);
        let table = SceneTable::from_store(&store).unwrap();
        let mut spec = RegimeSpec {
            name: "test".into(),
            rule: Rule::Fraction,
            percent: Some(25.0),
            seed: 7,
            role: Role::Test,
            list: None,
            exclude: vec![],
        };
        let test = draw(&table, &spec).unwrap();
        test.write(&Regime::path_in(&store, "test")).unwrap();
        spec.name = "ft".into();
        spec.percent = None;
        spec.role = Role::Finetune;
        spec.exclude = vec![test];
        for r in draw_ladder(&table, &spec, &[Some(25.0), Some(50.0)]).unwrap() {
            r.write(&Regime::path_in(&store, &r.name)).unwrap();
        }
        let mae = root.join("mae");
        let mut c = icefm();
        c.args(["train", "--store"])
            .arg(&store)
            .arg("--config")
            .arg(repo().join("configs/mae_vit_tiny.toml"))
            .arg("--out")
            .arg(&mae);
        for s in [
            "model.preset=micro",
            "mae.decoder_dim=8",
            "mae.decoder_depth=1",
            "mae.decoder_heads=2",
            "data.levels=80",
            "data.crop=32",
            "data.batch_size=2",
            "data.threads=1",
            "train.steps=2",
            "train.warmup_steps=1",
            "train.panel_every=0",
        ] {
            c.args(["--set", s]);
        }
        ok(c.output().unwrap());
        Fixture { store, mae }
    })
}

/// The fine-tuning configuration of the tests: a micro ViT with an 8-wide FCN head.
const SEG_MICRO: &str = r#"
[model]
preset = "micro"
[seg]
head = "fcn"
channels = 8
eval_stride = 32
[data]
levels = "80"
crop = 32
batch_size = 2
min_valid = 0.3
jitter = 8
threads = 1
[train]
steps = 2
lr = 1e-3
warmup_steps = 1
checkpoint_every = 100
keep_last = 1
panel_every = 0
seed = 1
"#;

/// A folder with `seg_micro.toml` and the grid file `name.toml` holding `grid`; the grid's path.
fn grid_file(dir: &Path, name: &str, grid: &str) -> PathBuf {
    let g = dir.join("grids");
    std::fs::create_dir_all(&g).unwrap();
    std::fs::write(g.join("seg_micro.toml"), SEG_MICRO).unwrap();
    let path = g.join(format!("{name}.toml"));
    std::fs::write(&path, grid).unwrap();
    path
}

/// `icefm ablate` of `grid` into `out` on the fixture's store.
fn ablate_command(grid: &Path, out: &Path) -> Command {
    let mut c = icefm();
    c.args(["ablate", "--store"])
        .arg(&fixture().store)
        .arg("--grid")
        .arg(grid)
        .arg("--out")
        .arg(out);
    c
}

fn ablate(grid: &Path, out: &Path, extra: &[&str]) -> Output {
    ablate_command(grid, out).args(extra).output().unwrap()
}

/// `icefm ablate` started in the background, its output captured.
fn spawn_ablate(grid: &Path, out: &Path) -> std::process::Child {
    ablate_command(grid, out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The table's columns by name: text columns as strings, numbers as f64.
fn read_table(path: &Path) -> BTreeMap<String, Vec<String>> {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut cols: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for b in reader {
        let b = b.unwrap();
        for (f, c) in b.schema().fields().iter().zip(b.columns()) {
            let v = cols.entry(f.name().clone()).or_default();
            for i in 0..c.len() {
                v.push(if let Some(s) = c.as_string_opt::<i32>() {
                    s.value(i).to_string()
                } else if let Some(x) = c.as_primitive_opt::<Float64Type>() {
                    x.value(i).to_string()
                } else {
                    c.as_primitive::<UInt64Type>().value(i).to_string()
                });
            }
        }
    }
    cols
}

fn floats(cols: &BTreeMap<String, Vec<String>>, name: &str) -> Vec<f64> {
    cols[name].iter().map(|s| s.parse().unwrap()).collect()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (usize, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn a_grid_trains_scores_tabulates_plots_and_resumes_without_retraining() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ladder_grid(dir.path(), "ladder");
    let out = dir.path().join("out");
    let keys = [
        "ft_25-scratch-multi-80",
        "ft_25-mae-multi-80",
        "ft_50-scratch-multi-80",
        "ft_50-mae-multi-80",
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
    assert_eq!(table["regime"], ["ft_25", "ft_25", "ft_50", "ft_50"]);
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
        stdout.contains("cell 4/4 ft_50-mae-multi-80: started"),
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
pool = "ft_50"
[grid]
regimes = ["ft_50"]
init = ["scratch"]
tasks = ["single"]
levels = ["80,160"]
"#,
    );
    let out = dir.path().join("out");
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    let key = "ft_50-scratch-single-80+160";
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
regimes = ["ft_25"]
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
    assert_eq!(tables[1]["key"], ["ft_25-scratch-multi-80"]);
    for c in ["sic_r2", "sod_f1", "floe_f1", "combined"] {
        let (folder, url) = (floats(&tables[0], c), floats(&tables[1], c));
        assert!(folder[0].is_finite(), "{c}: {folder:?}");
        assert_eq!(url, folder, "{c}");
    }
}

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
            "base = \"seg_micro.toml\"\nmae = {mae}\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_25\", \"ft_99\"]\n"
        ),
    );
    fails_before_training(o, &out, &["unknown regime `ft_99`", "ft_25, ft_50, test"]);
    // One MAE run per regime: each must be named, and only regimes of the grid.
    let per_regime = |entries: &str| {
        format!(
            "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_25\", \"ft_50\"]\n[mae]\n{entries}"
        )
    };
    let o = case("permae", &per_regime(&format!("ft_25 = {mae}\n")));
    fails_before_training(o, &out, &["names no MAE run for regime ft_50"]);
    let o = case(
        "permae",
        &per_regime(&format!("ft_25 = {mae}\nft_50 = {mae}\nft_99 = {mae}\n")),
    );
    fails_before_training(o, &out, &["mae.ft_99"]);
    let grid = grid_file(
        dir.path(),
        "permae",
        &per_regime(&format!("ft_25 = {mae}\nft_50 = {mae}\n")),
    );
    let (stdout, _) = text(&ok(ablate(&grid, &out, &["--dry-run"])));
    assert!(stdout.starts_with("4 cells"), "{stdout}");
    // A misspelt key.
    let o = case(
        "typo",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregime = [\"ft_25\"]\n",
    );
    fails_before_training(o, &out, &["unknown field `regime`"]);
    // An init the grid cannot do: no MAE run named.
    let o = case(
        "nomae",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_25\"]\ninit = [\"mae\"]\n",
    );
    fails_before_training(o, &out, &["no `mae` run"]);
    // `set` may not change an axis.
    let o = case(
        "axis",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\nset = [\"data.regime=ft_50\"]\n[grid]\nregimes = [\"ft_25\"]\n",
    );
    fails_before_training(o, &out, &["data.regime is an axis"]);
    // A level the store does not have.
    let o = case(
        "level",
        "base = \"seg_micro.toml\"\ntest_regime = \"test\"\n[grid]\nregimes = [\"ft_25\"]\ninit = [\"scratch\"]\nlevels = [\"200\"]\n",
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
regimes = ["ft_50"]
init = ["mae", "scratch"]
"#,
            f.mae.display().to_string()
        )
    };
    let grid = grid_file(dir.path(), "stop", &body(1_000_000));
    let out = dir.path().join("out");
    let child = spawn_ablate(&grid, &out);
    // Wait until the first run trains, then send SIGINT as a terminal's Ctrl-C does.
    let run = out.join("runs/ft_50-mae-multi-80");
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
        stdout.contains("cell 1/2 ft_50-mae-multi-80: stopped (checkpoint saved)"),
        "{stdout}"
    );
    assert!(!stdout.contains("cell 2/2"), "{stdout}");
    assert!(!out.join("runs/ft_50-scratch-multi-80").exists());
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
            "cell 1/2 ft_50-mae-multi-80: started (regime ft_50, 2 scenes, 66.7 % of the pool, init mae, tasks multi, levels 80, {} steps, resuming at step {done})",
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
    // Weights that resolve but cannot be read: the cell that starts from them fails when it
    // trains, after the grid was checked.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let body = |ft_50: &Path| {
        format!(
            r#"
base = "seg_micro.toml"
test_regime = "test"
[grid]
regimes = ["ft_25", "ft_50"]
init = ["mae"]
[mae]
ft_25 = {:?}
ft_50 = {:?}
"#,
            f.mae.display().to_string(),
            ft_50.display().to_string()
        )
    };
    let grid = grid_file(dir.path(), "failing", &body(&bad));
    let out = dir.path().join("out");
    let o = ablate(&grid, &out, &[]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("cell 1/2 ft_25-mae-multi-80: finished"),
        "{stdout}"
    );
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("cell 2/2 ft_50-mae-multi-80: FAILED: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(failed.contains("bad.safetensors"), "{failed}");
    assert!(
        stdout.contains("(1 trained, 0 skipped, 1 failed)"),
        "{stdout}"
    );
    assert_eq!(
        read_table(&out.join("ablation.parquet"))["key"],
        ["ft_25-mae-multi-80"]
    );
    // The failure is marked for other workers running the grid now, with its reason.
    let mark = out.join("claims/ft_50-mae-multi-80.failed");
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
        ["ft_25-mae-multi-80", "ft_50-mae-multi-80"]
    );
    assert!(!mark.exists());
}

/// The 2 regimes × 2 inits grid of micro runs, `train.steps` = 3.
fn ladder_grid(dir: &Path, name: &str) -> PathBuf {
    grid_file(
        dir,
        name,
        &format!(
            r#"
base = "seg_micro.toml"
mae = {:?}
test_regime = "test"
set = ["train.steps=3"]
[grid]
regimes = ["ft_25", "ft_50"]
init = ["scratch", "mae"]
"#,
            fixture().mae.display().to_string()
        ),
    )
}

#[test]
fn a_cell_held_by_another_worker_is_left_to_it_and_taken_up_once_free() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ladder_grid(dir.path(), "held");
    let out = dir.path().join("out");
    // Another worker holds the second cell: its lock, with its line.
    let claims = out.join("claims");
    std::fs::create_dir_all(&claims).unwrap();
    let lock = std::fs::File::create(claims.join("ft_25-mae-multi-80.lock")).unwrap();
    lock.lock().unwrap();
    std::fs::write(
        claims.join("ft_25-mae-multi-80.lock"),
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
        line(&stdout, "cell 2/4 ft_25-mae-multi-80:").ends_with(&format!("{held}0 s)")),
        "{stdout}"
    );
    assert_eq!(stdout.matches(": new").count(), 3, "{stdout}");

    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        line(&stdout, "cell 2/4 ft_25-mae-multi-80:").contains(held),
        "{stdout}"
    );
    for (i, k) in [(1, "ft_25-scratch"), (3, "ft_50-scratch"), (4, "ft_50-mae")] {
        assert!(
            stdout.contains(&format!("cell {i}/4 {k}-multi-80: finished")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("(3 trained, 0 skipped, 0 failed, 1 running in other workers)"),
        "{stdout}"
    );
    assert!(!out.join("runs/ft_25-mae-multi-80/config.toml").exists());
    assert_eq!(
        read_table(&out.join("ablation.parquet"))["key"],
        [
            "ft_25-scratch-multi-80",
            "ft_50-scratch-multi-80",
            "ft_50-mae-multi-80"
        ]
    );
    // The cells this worker ran are free again.
    assert_eq!(
        std::fs::read_to_string(claims.join("ft_25-scratch-multi-80.lock")).unwrap(),
        ""
    );

    // The other worker dies: the operating system drops its lock, the file stays, and the
    // next invocation runs the cell.
    drop(lock);
    let (stdout, _) = text(&ok(ablate(&grid, &out, &[])));
    assert!(
        stdout.contains("cell 2/4 ft_25-mae-multi-80: started"),
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
