//! Samplers, thresholds, sequential tiles, regimes listing patches and bad requests.

use super::*;

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
    assert!(
        e.contains("level 160m: regime `listed` lists patches at 80m only")
            && e.contains("--levels"),
        "{e}"
    );
    let e = list_patches(&mut r, store, &[Level::new(400).unwrap()], 0.5)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no level 400m"), "{e}");
}
