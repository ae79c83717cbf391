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
use icefm_ingest::plot::{PLOT_HEIGHT, PLOT_WIDTH};
use icefm_synth::SceneKind;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

mod grid;
mod stops;
#[path = "../support/synth_store.rs"]
mod synth_store;

use synth_store::synth_store;

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
/// regimes `test` (one scene) and the ladder `ft_34` (one scene), `ft_67` (two) drawn from the
/// others, and a micro MAE pre-trained for two steps.
struct Fixture {
    store: PathBuf,
    mae: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let store = synth_store("ablate-tests", &[(SceneKind::Rtt, 160, 180); 4], 31, 64);
        let root = store.parent().unwrap().to_path_buf();
        let table = SceneTable::from_store(&store).unwrap();
        let mut spec = RegimeSpec {
            name: "test".into(),
            rule: Rule::Fraction,
            percent: Some(25.0),
            seed: 7,
            role: Role::Test,
            list: None,
            exclude: vec![],
            within: vec![],
            include_test: false,
        };
        let test = draw(&table, &spec).unwrap();
        test.write(&Regime::path_in(&store, "test")).unwrap();
        spec.name = "ft".into();
        spec.percent = None;
        spec.role = Role::Finetune;
        spec.exclude = vec![test];
        for r in draw_ladder(&table, &spec, &[Some(34.0), Some(67.0)]).unwrap() {
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
const SEG_MICRO: &str = include_str!("seg_micro.toml");

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
regimes = ["ft_34", "ft_67"]
init = ["scratch", "mae"]
"#,
            fixture().mae.display().to_string()
        ),
    )
}
