//! A store of generated scenes for the integration tests of several crates (each includes this
//! file with `#[path]`): AI4Arctic-format scenes written by icefm-synth, ingested by icefm-ingest
//! at 80 m and 160 m.

use std::path::{Path, PathBuf};

use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
use icefm_ingest::store::new_attrs;
use icefm_schemas::Level;
use icefm_schemas::store::DEFAULT_CODEC;
use icefm_synth::{Release, SceneKind, SynthOptions, write_scene};

/// `scenes` (kind, height, width; seeds `seed`, `seed + 1`, …) generated under the tests'
/// temporary folder `name` (made afresh) and ingested at 80 m and 160 m with `patch`-pixel
/// patches into `<name>/s.zarr`.
pub fn synth_store(
    name: &str,
    scenes: &[(SceneKind, usize, usize)],
    seed: u64,
    patch: u32,
) -> PathBuf {
    let train: Vec<_> = scenes
        .iter()
        .map(|&(k, h, w)| (k, h, w, Release::Train))
        .collect();
    synth_store_of_releases(name, &train, seed, patch)
}

/// [`synth_store`] of scenes of either release: a test-release RTT scene has its charts in a
/// reference file beside it, a raw one none.
#[allow(dead_code)]
pub fn synth_store_of_releases(
    name: &str,
    scenes: &[(SceneKind, usize, usize, Release)],
    seed: u64,
    patch: u32,
) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&root);
    let folder = root.join("scenes");
    let inputs: Vec<PathBuf> = scenes
        .iter()
        .enumerate()
        .map(|(i, &(kind, h, w, release))| {
            let mut o = SynthOptions::new(kind, h, w, seed + i as u64);
            o.index = i as u32;
            o.release = release;
            write_scene(&folder, &o).unwrap()
        })
        .collect();
    let store = root.join("s.zarr");
    let attrs = new_attrs(&Level::parse_list("80,160").unwrap(), patch, DEFAULT_CODEC);
    let summary = ingest(
        &inputs,
        &store,
        attrs,
        &IngestOptions::default(),
        &NoReporter,
    )
    .unwrap();
    assert_eq!(summary.scenes_in_store, scenes.len());
    store
}
