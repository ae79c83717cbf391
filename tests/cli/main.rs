//! End-to-end tests of the `icefm` executable in temporary directories.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod demo;
#[path = "../support/http_files.rs"]
mod http_files;
mod ingest;
mod store;
mod train;
#[path = "../support/tree.rs"]
mod tree;
use tree::tree_bytes;

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
