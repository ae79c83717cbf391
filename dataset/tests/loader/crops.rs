//! Crops against the store's windows, augmentation, direct chunk decoding.

use super::*;

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
    // At 160 m the scenes are 150 x 165, 130 x 100 and 135 x 155 px: two are narrower than
    // the crop somewhere, the smallest leaving 130 x 100 of a 150 x 150 window inside it.
    assert_eq!(
        l.padding_notes(),
        vec![
            "level 160m: 2 of the 3 scenes drawn there are smaller than the 150 px crop (the \
             smallest 130 x 100 px): their windows are padded with no-data pixels, up to 42 % of \
             a window; a smaller data.crop, or weight 0 for the level, avoids it"
                .to_string()
        ]
    );
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
    // Every scene is smaller than 320 px: at most 130 x 100 of 320 x 320 is inside.
    let notes = big.padding_notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("3 of the 3 scenes") && notes[0].contains("up to 87 % of a window"),
        "{notes:?}"
    );
    // Small windows fit every scene: nothing to say.
    let small = Loader::open(store, None, augmented()).unwrap();
    assert!(small.padding_notes().is_empty());
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
fn batches_without_labels_read_no_label_chunk_and_the_same_inputs() {
    let store = store();
    let with = Loader::open(store, None, augmented()).unwrap();
    let without = Loader::open(
        store,
        None,
        LoaderOptions {
            labels: false,
            ..augmented()
        },
    )
    .unwrap();
    for i in 0..3 {
        let (a, b) = (with.batch(i).unwrap(), without.batch(i).unwrap());
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.inputs.len(), b.inputs.len());
        assert!(
            a.inputs
                .iter()
                .zip(&b.inputs)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert_eq!(a.valid, b.valid);
        assert!(a.labels.iter().any(|&l| l != IGNORE));
        assert!(b.labels.iter().all(|&l| l == IGNORE));
    }
    // Two arrays' chunks (sar, labels) against one: fewer reads.
    let (a, b) = (with.cache_stats(), without.cache_stats());
    assert!(b.misses < a.misses, "{a:?} vs {b:?}");
}
