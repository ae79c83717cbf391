//! What the dataset crate's integration tests share: a store ingested from generated scenes,
//! and a regime of given scenes.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use icefm_dataset::regime::{Regime, Role, Rule};
use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
use icefm_ingest::store::new_attrs;
use icefm_schemas::Level;
use icefm_schemas::store::DEFAULT_CODEC;
use icefm_synth::{SceneKind, SynthOptions, write_scene};

/// Patch edge of the tests' stores.
pub const P: u32 = 64;

/// `scenes` (kind, height, width; seeds from `seed`) generated under `target/tmp/<name>/` and
/// ingested at 80 m and 160 m with [`P`]-pixel patches into `<name>/s.zarr`, anew.
pub fn ingest_scenes(name: &str, scenes: &[(SceneKind, usize, usize)], seed: u64) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&root);
    let folder = root.join("scenes");
    let mut inputs = Vec::new();
    for (i, &(kind, h, w)) in scenes.iter().enumerate() {
        let mut o = SynthOptions::new(kind, h, w, seed + i as u64);
        o.index = i as u32;
        inputs.push(write_scene(&folder, &o).unwrap());
    }
    let store = root.join("s.zarr");
    let attrs = new_attrs(&Level::parse_list("80,160").unwrap(), P, DEFAULT_CODEC);
    ingest(
        &inputs,
        &store,
        attrs,
        &IngestOptions::default(),
        &NoReporter,
    )
    .unwrap();
    store
}

/// A fine-tuning regime of `scenes`, imported (no rule of its own).
pub fn regime(name: &str, scenes: Vec<String>) -> Regime {
    Regime {
        name: name.into(),
        role: Role::Finetune,
        rule: Rule::Import,
        percent: None,
        seed: 0,
        list: None,
        excluded: vec![],
        source: String::new(),
        source_hash: String::new(),
        scenes,
        notes: vec![],
        patch_filter: None,
        patches: None,
    }
}
