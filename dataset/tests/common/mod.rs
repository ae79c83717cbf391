//! What the dataset crate's integration tests share: a store ingested from generated scenes,
//! and a regime of given scenes.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;

use icefm_dataset::regime::{Regime, Role, Rule};
use icefm_synth::SceneKind;

#[path = "../../../tests/support/synth_store.rs"]
mod synth_store;
use synth_store::synth_store;
#[allow(unused_imports)] // Not every test binary that includes this module draws test scenes.
pub use synth_store::synth_store_of_releases;

/// Patch edge of the tests' stores.
pub const P: u32 = 64;

/// `scenes` (kind, height, width; seeds from `seed`) generated under `target/tmp/<name>/` and
/// ingested at 80 m and 160 m with [`P`]-pixel patches into `<name>/s.zarr`, anew.
pub fn ingest_scenes(name: &str, scenes: &[(SceneKind, usize, usize)], seed: u64) -> PathBuf {
    synth_store(name, scenes, seed, P)
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
        within: vec![],
        source: String::new(),
        source_hash: String::new(),
        scenes,
        notes: vec![],
        include_test: false,
        patch_filter: None,
        patches: None,
    }
}
