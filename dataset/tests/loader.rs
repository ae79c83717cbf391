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

mod common;
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

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn crops_are_the_store_windows_normalised() {
    let store = store();
    // Crops larger than a patch with jitter: windows straddle up to 3 × 3 chunks and the edges.
    let channels = [
        ("sar", 1, "nersc_sar_secondary"),
        ("aux", 0, "sar_incidenceangle"),
    ];
    let l = Loader::open(
        store,
        None,
        LoaderOptions {
            crop: 150,
            channels: vec!["HV".into(), "incidence_angle".into()],
            augment: Augment {
                jitter: 70,
                ..Augment::default()
            },
            ..opts()
        },
    )
    .unwrap();
    let mut straddling = 0;
    let mut invalid = 0;
    for i in 0..3 {
        let b = l.batch(i).unwrap();
        let n = b.size;
        assert_eq!((b.channels, n, b.len()), (2, 150, 8));
        for (k, s) in b.samples.iter().enumerate() {
            assert_eq!(s.transform, Transform::IDENTITY);
            if s.y0 % i64::from(P) != 0 || s.x0 % i64::from(P) != 0 {
                straddling += 1;
            }
            let (inp, lab, val) = expected(store, &s.scene, s.level, s.y0, s.x0, n, &channels);
            let plane = n * n;
            assert_close(
                &b.inputs[k * 2 * plane..(k + 1) * 2 * plane],
                &inp,
                "inputs",
            );
            assert_eq!(&b.labels[k * 3 * plane..(k + 1) * 3 * plane], &lab[..]);
            assert_eq!(&b.valid[k * plane..(k + 1) * plane], &val[..]);
            invalid += val.iter().filter(|&&v| v == 0).count();
        }
    }
    assert!(straddling > 10, "{straddling}");
    assert!(invalid > 0, "the scenes have no-data areas");
    // Scenes smaller than the crop: padded with 0 / 255 / invalid past the edge.
    let big = Loader::open(
        store,
        None,
        LoaderOptions {
            crop: 320,
            levels: vec![(Level::new(160).unwrap(), 1.0)],
            ..opts()
        },
    )
    .unwrap();
    let b = big.batch(0).unwrap();
    // A batch made in a recycled buffer full of other values is the same.
    let mut dirty = b.clone();
    dirty.inputs.fill(7.0);
    dirty.labels.fill(3);
    dirty.valid.fill(1);
    big.recycle(dirty);
    assert_eq!(big.batch(0).unwrap(), b);
    let s = &b.samples[0];
    assert_eq!((s.y0, s.x0), (0, 0));
    let (inp, lab, val) = expected(
        store,
        &s.scene,
        s.level,
        0,
        0,
        320,
        &[
            ("sar", 0, "nersc_sar_primary"),
            ("sar", 1, "nersc_sar_secondary"),
        ],
    );
    assert_close(&b.inputs[..2 * 320 * 320], &inp, "padded inputs");
    assert_eq!(&b.labels[..3 * 320 * 320], &lab[..]);
    assert_eq!(&b.valid[..320 * 320], &val[..]);
    assert_eq!(b.labels[3 * 320 * 320 - 1], IGNORE);
}

#[test]
fn augmentation_moves_inputs_and_labels_alike() {
    let store = store();
    let plain = Loader::open(
        store,
        None,
        LoaderOptions {
            augment: Augment {
                jitter: 40,
                ..Augment::default()
            },
            ..augmented()
        },
    )
    .unwrap();
    let aug = Loader::open(store, None, augmented()).unwrap();
    let mut kinds = std::collections::HashSet::new();
    for i in 0..4 {
        let (p, a) = (plain.batch(i).unwrap(), aug.batch(i).unwrap());
        let n = p.size;
        let plane = n * n;
        for (k, (sp, sa)) in p.samples.iter().zip(&a.samples).enumerate() {
            // Same windows; only the symmetry differs.
            assert_eq!(
                (&sp.scene, sp.level, sp.y0, sp.x0),
                (&sa.scene, sa.level, sa.y0, sa.x0)
            );
            kinds.insert(sa.transform);
            let mut out = vec![0f32; plane];
            for c in 0..2 {
                let at = (k * 2 + c) * plane;
                sa.transform.apply(&p.inputs[at..at + plane], &mut out, n);
                assert_eq!(&out[..], &a.inputs[at..at + plane]);
            }
            let mut out = vec![0u8; plane];
            for t in 0..3 {
                let at = (k * 3 + t) * plane;
                sa.transform.apply(&p.labels[at..at + plane], &mut out, n);
                assert_eq!(&out[..], &a.labels[at..at + plane]);
            }
            sa.transform
                .apply(&p.valid[k * plane..(k + 1) * plane], &mut out, n);
            assert_eq!(&out[..], &a.valid[k * plane..(k + 1) * plane]);
        }
    }
    assert!(
        kinds.len() >= 6,
        "{} distinct symmetries in 32 draws",
        kinds.len()
    );
}

fn level_counts(l: &Loader, batches: u64) -> HashMap<u32, usize> {
    let mut m = HashMap::new();
    for i in 0..batches {
        for s in l.batch(i).unwrap().samples {
            *m.entry(s.level.spacing_m()).or_default() += 1;
        }
    }
    m
}

#[test]
fn samplers_follow_their_weights() {
    let store = store();
    let small = |o: LoaderOptions| LoaderOptions {
        crop: 8,
        batch_size: 100,
        ..o
    };
    let l80 = Level::new(80).unwrap();
    let l160 = Level::new(160).unwrap();
    // Level weights 3 : 1.
    let weighted = Loader::open(
        store,
        None,
        small(LoaderOptions {
            levels: vec![(l80, 3.0), (l160, 1.0)],
            ..opts()
        }),
    )
    .unwrap();
    let c = level_counts(&weighted, 10);
    assert!((700..800).contains(&c[&80]), "{c:?}");
    // Uniform over patches: in proportion to the eligible patches of each level.
    let uniform = Loader::open(
        store,
        None,
        small(LoaderOptions {
            sampler: Sampler::Uniform,
            ..opts()
        }),
    )
    .unwrap();
    let e: HashMap<u32, usize> = uniform
        .eligible_patches()
        .into_iter()
        .map(|(l, n)| (l.spacing_m(), n))
        .collect();
    let share80 = e[&80] as f64 / (e[&80] + e[&160]) as f64;
    let c = level_counts(&uniform, 10);
    let got = c[&80] as f64 / 1000.0;
    assert!((got - share80).abs() < 0.05, "{got} vs {share80}");
    // Weight 0 leaves a level out of the uniform sampler too.
    let uniform80 = Loader::open(
        store,
        None,
        small(LoaderOptions {
            sampler: Sampler::Uniform,
            levels: vec![(l160, 0.0), (l80, 1.0)],
            ..opts()
        }),
    )
    .unwrap();
    assert_eq!(level_counts(&uniform80, 3).get(&160), None);
    // Weight 0: never drawn.
    let only80 = Loader::open(
        store,
        None,
        small(LoaderOptions {
            levels: vec![(l80, 1.0), (l160, 0.0)],
            ..opts()
        }),
    )
    .unwrap();
    assert_eq!(level_counts(&only80, 3).get(&160), None);

    // Class balance: the rarest SOD class gets a larger share of the labelled pixels.
    let share_of_rarest = |sampler| {
        let l = Loader::open(
            store,
            None,
            LoaderOptions {
                sampler,
                levels: vec![(l80, 1.0)],
                batch_size: 64,
                ..opts()
            },
        )
        .unwrap();
        let mut hist = vec![0u64; Task::Sod.n_classes()];
        for i in 0..6 {
            let b = l.batch(i).unwrap();
            let plane = b.size * b.size;
            for k in 0..b.len() {
                let at = (k * 3 + Task::Sod.channel()) * plane;
                for &v in &b.labels[at..at + plane] {
                    if v != IGNORE {
                        hist[usize::from(v)] += 1;
                    }
                }
            }
        }
        hist
    };
    let u = share_of_rarest(Sampler::LevelWeighted);
    let bal = share_of_rarest(Sampler::ClassBalanced(Task::Sod));
    let present: Vec<usize> = (0..u.len()).filter(|&c| u[c] > 0).collect();
    let rarest = *present.iter().min_by_key(|&&c| u[c]).unwrap();
    let share = |h: &[u64], c: usize| h[c] as f64 / h.iter().sum::<u64>() as f64;
    assert!(
        share(&bal, rarest) > 1.3 * share(&u, rarest),
        "class {rarest}: balanced {:.4} vs plain {:.4}",
        share(&bal, rarest),
        share(&u, rarest)
    );
}

#[test]
fn valid_threshold_skips_patches_from_the_manifest() {
    let store = store();
    let all = Loader::open(store, None, opts()).unwrap();
    let full = Loader::open(
        store,
        None,
        LoaderOptions {
            min_valid: 1.0,
            batch_size: 32,
            ..opts()
        },
    )
    .unwrap();
    let (a, f): (usize, usize) = (
        all.eligible_patches().iter().map(|e| e.1).sum(),
        full.eligible_patches().iter().map(|e| e.1).sum(),
    );
    assert!(f < a && f > 0, "{f} of {a}");
    for i in 0..4 {
        let b = full.batch(i).unwrap();
        assert!(
            b.valid.iter().all(|&v| v == 1),
            "batch {i} holds invalid pixels"
        );
    }
    // The same with a regime of one scene: only its patches are drawn.
    let one = all_scenes_regime(&all)[..1].to_vec();
    let r = regime("one", one.clone());
    let l = Loader::open(store, Some(&r), opts()).unwrap();
    for s in l.batch(0).unwrap().samples {
        assert_eq!(&*s.scene, one[0].as_str());
    }
}

#[test]
fn sequential_tiles_cover_every_scene_once() {
    let store = store();
    let l = Loader::open(
        store,
        None,
        LoaderOptions {
            sampler: Sampler::Sequential { overlap: 16 },
            crop: 96,
            batch_size: 5,
            augment: Augment {
                flips: true,
                rot90: true,
                jitter: 10,
            },
            ..opts()
        },
    )
    .unwrap();
    let batches: Vec<Batch> = l.iter(0).map(Result::unwrap).collect();
    // Recycled buffers do not leak into a short last batch or a batch at the scene edge.
    for b in &batches {
        l.recycle(batches[0].clone());
        assert_eq!(&l.batch(b.index).unwrap(), b);
    }
    assert_eq!(batches.len() as u64, l.len().unwrap());
    let tiles: usize = batches.iter().map(Batch::len).sum();
    assert!(batches.last().unwrap().len() <= 5);
    assert!(l.batch(l.len().unwrap()).is_err());
    // Every pixel of every scene and level is in some tile; tiles are the store's windows.
    let mut covered: HashMap<(String, Level), Vec<bool>> = HashMap::new();
    let mut count = 0;
    for b in &batches {
        for (k, s) in b.samples.iter().enumerate() {
            count += 1;
            assert_eq!(s.transform, Transform::IDENTITY);
            let shape =
                array_shape(store, &format!("/scenes/{}/{}/sar", s.scene, s.level)).unwrap();
            let (h, w) = (shape[1] as usize, shape[2] as usize);
            let cov = covered
                .entry((s.scene.to_string(), s.level))
                .or_insert_with(|| vec![false; h * w]);
            for y in s.y0 as usize..(s.y0 as usize + 96).min(h) {
                for x in s.x0 as usize..(s.x0 as usize + 96).min(w) {
                    cov[y * w + x] = true;
                }
            }
            if k == 0 {
                let (_, lab, _) = expected(store, &s.scene, s.level, s.y0, s.x0, 96, &[]);
                assert_eq!(&b.labels[..3 * 96 * 96], &lab[..]);
            }
        }
    }
    assert_eq!(count, tiles);
    assert_eq!(covered.len(), 3 * 2);
    assert!(covered.values().all(|c| c.iter().all(|&v| v)));
}

#[test]
fn bad_requests_fail_with_one_clear_error() {
    let store = store();
    let err =
        |o: LoaderOptions, r: Option<&Regime>| Loader::open(store, r, o).err().unwrap().to_string();
    let e = err(
        LoaderOptions {
            levels: vec![(Level::new(400).unwrap(), 1.0)],
            ..opts()
        },
        None,
    );
    assert!(
        e.contains("no level 400m") && e.contains("80m, 160m"),
        "{e}"
    );
    let e = err(
        opts(),
        Some(&regime("ghost", vec!["20990101T000000_dmi".into()])),
    );
    assert!(
        e.contains("ghost") && e.contains("20990101T000000_dmi"),
        "{e}"
    );
    let e = err(opts(), Some(&regime("empty", vec![])));
    assert!(e.contains("`empty` has no scene"), "{e}");
    let e = err(
        LoaderOptions {
            channels: vec!["VV".into()],
            ..opts()
        },
        None,
    );
    assert!(e.contains("`VV`") && e.contains("HH, HV"), "{e}");
    let e = err(
        LoaderOptions {
            sampler: Sampler::Sequential { overlap: 64 },
            crop: 64,
            ..opts()
        },
        None,
    );
    assert!(e.contains("overlap 64"), "{e}");
    let e = err(
        LoaderOptions {
            levels: vec![(Level::new(80).unwrap(), 0.0)],
            ..opts()
        },
        None,
    );
    assert!(e.contains("weight 0"), "{e}");
    let e = Loader::open(Path::new("/nonexistent/store"), None, opts())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not an icefm store"), "{e}");
}

#[test]
fn direct_chunk_decoding_equals_zarrs() {
    use icefm_dataset::store::{ArrayKind, StoreReader};
    let store = store();
    let r = StoreReader::open(store).unwrap();
    let l = Loader::open(store, None, opts()).unwrap();
    let mut n = 0;
    for scene in l.scenes() {
        for level in r.attrs.levels.clone() {
            for kind in [ArrayKind::Sar, ArrayKind::Aux, ArrayKind::Labels] {
                let [_, h, w] = r.shape(scene, level, kind).unwrap();
                for row in 0..h.div_ceil(u64::from(P)) {
                    for col in 0..w.div_ceil(u64::from(P)) {
                        let a = r.decode(scene, level, kind, row, col).unwrap();
                        let b = r.decode_with_zarrs(scene, level, kind, row, col).unwrap();
                        assert_eq!(a.0, b.0, "{scene} {level} {kind:?} ({row}, {col})");
                        n += 1;
                    }
                }
            }
        }
    }
    assert!(n > 100, "{n} chunks");
    // A chunk past the grid is an error naming the array, not a panic.
    let e = r
        .decode(
            &l.scenes()[0],
            Level::new(80).unwrap(),
            ArrayKind::Sar,
            99,
            0,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sar") && e.contains("(99, 0)"), "{e}");
}

#[test]
fn regimes_listing_patches_restrict_the_random_samplers() {
    use icefm_dataset::regime::list_patches;
    let store = store();
    let l80 = Level::new(80).unwrap();
    let all = Loader::open(store, None, opts()).unwrap();
    let mut r = regime("listed", all_scenes_regime(&all));
    list_patches(&mut r, store, &[l80], 0.9).unwrap();
    let lists = r.patches.clone().unwrap();
    let n: usize = lists.iter().map(Vec::len).sum();
    // The same patches as the loader's own threshold at that level.
    let thresholded = Loader::open(
        store,
        None,
        LoaderOptions {
            levels: vec![(l80, 1.0)],
            min_valid: 0.9,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(n, thresholded.eligible_patches()[0].1);
    assert!(n > 0 && lists.iter().flatten().all(|p| p.level == l80));

    // Written and read back unchanged, byte-identical when written again.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
    r.write(&a).unwrap();
    r.write(&b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let back = Regime::read(&a).unwrap();
    assert_eq!(back, r);

    // The loader draws only listed patches (no jitter, crop = patch: the window's centre lies
    // in its patch even where an edge patch's window is moved inside the scene).
    let l = Loader::open(
        store,
        Some(&back),
        LoaderOptions {
            levels: vec![(l80, 1.0)],
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(l.eligible_patches()[0].1, n);
    let half = i64::from(P / 2);
    for i in 0..4 {
        for s in l.batch(i).unwrap().samples {
            let si = back.scenes.iter().position(|x| **x == *s.scene).unwrap();
            let key = icefm_dataset::regime::PatchKey {
                level: s.level,
                row: ((s.y0 + half) / i64::from(P)) as u32,
                col: ((s.x0 + half) / i64::from(P)) as u32,
            };
            assert!(
                lists[si].contains(&key),
                "{key:?} of {} not listed",
                s.scene
            );
        }
    }
    // Levels the regime lists nothing at cannot be drawn.
    let e = Loader::open(store, Some(&back), opts())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("160m") && e.contains("listed"), "{e}");
    let e = list_patches(&mut r, store, &[Level::new(400).unwrap()], 0.5)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no level 400m"), "{e}");
}
