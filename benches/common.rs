//! Shared by the benchmarks: full-size synthetic scenes, generated once into
//! `target/bench-data/`. `ICEFM_BENCH_SCALE=0.25` shrinks them for a quick run.

use std::path::{Path, PathBuf};

use icefm_synth::{SceneKind, SynthOptions, write_scene};

pub fn scale() -> f64 {
    std::env::var("ICEFM_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// A synthetic scene of full AI4Arctic size (raw 10,000 × 10,400; RTT half), generated once.
pub fn scene(kind: SceneKind) -> PathBuf {
    scene_number(kind, 0)
}

/// Scene `index` of a kind (each index another acquisition, so scenes can share a store).
#[allow(dead_code)] // used by the loader benchmark only
pub fn scene_number(kind: SceneKind, index: u32) -> PathBuf {
    let s = scale();
    let (h, w) = match kind {
        SceneKind::Raw => ((10_000.0 * s) as usize, (10_400.0 * s) as usize),
        SceneKind::Rtt => ((5_000.0 * s) as usize, (5_200.0 * s) as usize),
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-data")
        .join(if index == 0 {
            format!("{kind:?}-{h}x{w}")
        } else {
            format!("{kind:?}-{h}x{w}-{index}")
        });
    if let Ok(mut entries) = std::fs::read_dir(&dir)
        && let Some(Ok(e)) = entries.next()
    {
        return e.path();
    }
    std::fs::create_dir_all(&dir).expect("bench data folder");
    let t = std::time::Instant::now();
    let mut o = SynthOptions::new(kind, h, w, 42 + u64::from(index));
    o.index = index;
    let p = write_scene(&dir, &o).expect("synthetic scene");
    eprintln!(
        "generated {} in {:.1} s",
        p.display(),
        t.elapsed().as_secs_f64()
    );
    p
}
