//! The patch loader on a store ingested from generated AI4Arctic-format scenes: determinism across
//! thread counts, crops equal to the store's arrays, augmentation applied alike to inputs and
//! labels, normalisation, samplers, tiling and bad requests.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use icefm_dataset::regime::Regime;
use icefm_dataset::{Augment, Batch, Loader, LoaderOptions, Sampler, Transform};
use icefm_ingest::store::{array_shape, read_f32, read_u8};
use icefm_schemas::norm::mean_std;
use icefm_schemas::{IGNORE, Level, Task};
use icefm_synth::SceneKind;

#[path = "../common/mod.rs"]
mod common;
mod crops;
mod damage;
mod held_out;
mod samplers;

use common::{P, ingest_scenes, regime};

/// Two RTT scenes and one raw scene, ingested at 80 m and 160 m with 64-pixel patches; built
/// once per test run.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let scenes = [
            (SceneKind::Rtt, 300, 330),
            (SceneKind::Rtt, 260, 200),
            (SceneKind::Raw, 540, 620),
        ];
        ingest_scenes("loader-tests", &scenes, 11)
    })
}

fn opts() -> LoaderOptions {
    LoaderOptions {
        batch_size: 8,
        seed: 7,
        min_valid: 0.0,
        ..LoaderOptions::default()
    }
}

fn augmented() -> LoaderOptions {
    LoaderOptions {
        crop: 48,
        augment: Augment {
            flips: true,
            rot90: true,
            jitter: 40,
        },
        ..opts()
    }
}

fn all_scenes_regime(loader: &Loader) -> Vec<String> {
    loader.scenes().iter().map(|s| s.to_string()).collect()
}

#[test]
fn batches_do_not_depend_on_threads_or_order() {
    let store = store();
    let one = Loader::open(
        store,
        None,
        LoaderOptions {
            threads: 1,
            ..augmented()
        },
    )
    .unwrap();
    let reference: Vec<Batch> = (0..4).map(|i| one.batch(i).unwrap()).collect();
    for threads in [2, 3] {
        let l = Loader::open(
            store,
            None,
            LoaderOptions {
                threads,
                cache_bytes: 1 << 20, // a small cache: evictions between batches
                ..augmented()
            },
        )
        .unwrap();
        // Reverse order, then through the prefetching iterator from batch 1.
        // Batches made in recycled (dirty) buffers are the same too.
        for i in (0..4).rev() {
            let b = l.batch(i).unwrap();
            assert_eq!(b, reference[i as usize], "{threads} threads");
            l.recycle(b);
        }
        let it: Vec<Batch> = l.iter(1).take(3).map(Result::unwrap).collect();
        assert_eq!(it, reference[1..].to_vec());
    }
    // Another seed gives other windows.
    let other = Loader::open(
        store,
        None,
        LoaderOptions {
            seed: 8,
            ..augmented()
        },
    )
    .unwrap();
    assert_ne!(other.batch(0).unwrap().samples, reference[0].samples);
    let s = one.cache_stats();
    assert!(s.hits > 0 && s.misses > 0, "{s:?}");
}

/// Data-parallel ranks each read their share of every batch, and together exactly the batch
/// one process reads: samples, inputs, labels and validity in rank order.
#[test]
fn ranks_read_disjoint_shares_that_make_the_whole_batch() {
    let store = store();
    let whole = Loader::open(store, None, augmented()).unwrap();
    for world in [2, 4] {
        let parts: Vec<Loader> = (0..world)
            .map(|rank| {
                Loader::open(
                    store,
                    None,
                    LoaderOptions {
                        part: (rank, world),
                        ..augmented()
                    },
                )
                .unwrap()
            })
            .collect();
        for i in [0, 3] {
            let all = whole.batch(i).unwrap();
            let shares: Vec<Batch> = parts.iter().map(|l| l.batch(i).unwrap()).collect();
            assert!(shares.iter().all(|b| b.len() == 8 / world), "{world} ranks");
            let samples: Vec<_> = shares.iter().flat_map(|b| b.samples.clone()).collect();
            assert_eq!(samples, all.samples, "{world} ranks, batch {i}");
            for l in &parts {
                assert_eq!(l.whole_windows(i).unwrap(), all.samples);
            }
            let inputs: Vec<f32> = shares.iter().flat_map(|b| b.inputs.clone()).collect();
            assert_eq!(inputs, all.inputs);
            let valid: Vec<u8> = shares.iter().flat_map(|b| b.valid.clone()).collect();
            assert_eq!(valid, all.valid);
            let labels: Vec<u8> = shares.iter().flat_map(|b| b.labels.clone()).collect();
            assert_eq!(labels, all.labels);
        }
    }
    // A batch that does not split evenly, a rank past the world and a sequential pass are
    // refused.
    let refused = |part, sampler| {
        Loader::open(
            store,
            None,
            LoaderOptions {
                part,
                sampler,
                ..augmented()
            },
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    assert!(refused((0, 3), Sampler::LevelWeighted).contains("not a multiple of the 3 ranks"));
    assert!(refused((2, 2), Sampler::LevelWeighted).contains("rank 2 of 2 does not exist"));
    assert!(refused((1, 2), Sampler::Sequential { overlap: 0 }).contains("does not split batches"));
}

/// The expected normalised input, label and validity planes of a window, read from the store
/// through zarrs' array API (not the loader's chunk path).
fn expected(
    store: &Path,
    scene: &str,
    level: Level,
    y0: i64,
    x0: i64,
    n: usize,
    channels: &[(&str, usize, &str)],
) -> (Vec<f32>, Vec<u8>, Vec<u8>) {
    let node = |a: &str| format!("/scenes/{scene}/{level}/{a}");
    let shape = array_shape(store, &node("sar")).unwrap();
    let (h, w) = (shape[1] as i64, shape[2] as i64);
    let mut inp = vec![0f32; channels.len() * n * n];
    let mut lab = vec![IGNORE; 3 * n * n];
    let mut val = vec![0u8; n * n];
    let (ya, yb) = (y0.max(0), (y0 + n as i64).min(h));
    let (xa, xb) = (x0.max(0), (x0 + n as i64).min(w));
    let ranges = |c: u64| [0..c, ya as u64..yb as u64, xa as u64..xb as u64];
    let labels = read_u8(store, &node("labels"), ranges(3)).unwrap();
    let arrays: HashMap<&str, Vec<f32>> = ["sar", "aux"]
        .into_iter()
        .map(|a| (a, read_f32(store, &node(a), ranges(2)).unwrap()))
        .collect();
    let (rh, rw) = ((yb - ya) as usize, (xb - xa) as usize);
    for y in 0..rh {
        for x in 0..rw {
            let d = (y + (ya - y0) as usize) * n + x + (xa - x0) as usize;
            let s = y * rw + x;
            let mut ok = 1;
            for (ci, (array, index, var)) in channels.iter().enumerate() {
                let v = arrays[array][index * rh * rw + s];
                let m = mean_std(var).unwrap();
                if v.is_nan() {
                    ok = 0;
                } else {
                    inp[ci * n * n + d] = ((f64::from(v) - m.mean) / m.std) as f32;
                }
            }
            val[d] = ok;
            for t in 0..3 {
                lab[t * n * n + d] = labels[t * rh * rw + s];
            }
        }
    }
    (inp, lab, val)
}
