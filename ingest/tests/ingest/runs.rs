//! Runs

use super::*;

#[test]
fn rerun_skips_and_interrupted_run_resumes_to_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(dir.path(), SceneKind::Raw, 1, 0, "default");
    let b = synth(dir.path(), SceneKind::Raw, 2, 1, "row-chunks");
    let inputs = vec![a.clone(), b.clone()];
    let clean = dir.path().join("clean.zarr");
    let s = run(&inputs, &clean, "80,200", 64);
    assert_eq!(s.done.len(), 2);
    let again = run(&inputs, &clean, "80,200", 64);
    assert_eq!(again.skipped.len(), 2);
    assert!(again.done.is_empty());

    // Simulate a kill: scene A complete, scene B's arrays half written and not committed.
    let resumed = dir.path().join("resumed.zarr");
    run(std::slice::from_ref(&a), &resumed, "80,200", 64);
    let s_b = run(
        std::slice::from_ref(&b),
        &dir.path().join("tmp.zarr"),
        "80,200",
        64,
    );
    let b_id = &s_b.done[0];
    let src = dir.path().join("tmp.zarr/scenes").join(b_id);
    let dst = resumed.join("scenes").join(b_id);
    std::fs::create_dir_all(dst.join("80m")).unwrap();
    std::fs::copy(src.join("zarr.json"), dst.join("zarr.json")).unwrap();
    std::fs::write(dst.join("80m/zarr.json"), b"{ truncated").unwrap();
    std::fs::write(
        resumed.join("manifests/parts/junk.scene.parquet.tmp"),
        b"partial",
    )
    .unwrap();
    let s = run(&inputs, &resumed, "80,200", 64);
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.done, vec![b_id.clone()]);
    std::fs::remove_file(resumed.join("manifests/parts/junk.scene.parquet.tmp")).unwrap();
    let (x, y) = (tree_bytes(&clean), tree_bytes(&resumed));
    assert_eq!(x.len(), y.len());
    for ((pa, da), (pb, db)) in x.iter().zip(&y) {
        assert_eq!(pa, pb);
        assert!(
            da == db,
            "{} differs between the clean and the resumed store",
            pa.display()
        );
    }
}

/// `icefm ingest --redo INPUT` into a store of levels 80 and 160 m, patch 64.
fn redo(input: PathBuf, store: &Path) -> Summary {
    let attrs = new_attrs(
        &Level::parse_list("80,160").unwrap(),
        64,
        Codec::Zstd { level: 3 },
    );
    let options = IngestOptions {
        redo: true,
        ..IngestOptions::default()
    };
    ingest(&[input], store, attrs, &options, &NoReporter).unwrap()
}

#[test]
fn redo_writes_a_damaged_scene_again_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(dir.path(), SceneKind::Rtt, 3, 0, "default");
    let b = synth(dir.path(), SceneKind::Rtt, 4, 1, "default");
    let store = dir.path().join("s.zarr");
    let s = run(&[a.clone(), b.clone()], &store, "80,160", 64);
    assert_eq!(s.done.len(), 2);
    let before = tree_bytes(&store);
    let id = &s.done[0];
    let shard = store.join("scenes").join(id).join("80m/sar/c/0/1/0");
    std::fs::remove_file(&shard).unwrap();
    // Without --redo the committed scene is skipped, damage and all.
    assert_eq!(
        run(std::slice::from_ref(&a), &store, "80,160", 64).skipped,
        vec![id.clone()]
    );
    assert!(!shard.exists());
    let s = redo(a, &store);
    assert_eq!(s.done, vec![id.clone()]);
    assert_eq!(s.scenes_in_store, 2);
    // Byte for byte the store it was, the other scene untouched.
    let after = tree_bytes(&store);
    assert_eq!(
        before.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        after.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for ((p, x), (_, y)) in before.iter().zip(&after) {
        assert!(x == y, "{} differs after --redo", p.display());
    }
}

#[test]
fn a_damaged_scene_record_is_written_again_and_a_renamed_copy_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(dir.path(), SceneKind::Raw, 6, 0, "default");
    let b = synth(dir.path(), SceneKind::Raw, 7, 1, "default");
    let store = dir.path().join("s.zarr");
    let s = run(&[a.clone(), b.clone()], &store, "80,160", 64);
    let id = s.done[0].clone();
    let before = tree_bytes(&store);
    // The scene's committed record cut short (a copy that stopped early): the next run cannot
    // tell whether it is committed, so writes it again, saying why, and the store is as it was.
    let part = store.join(format!("manifests/parts/{id}.scene.parquet"));
    std::fs::File::options()
        .write(true)
        .open(&part)
        .unwrap()
        .set_len(100)
        .unwrap();
    let s = run(std::slice::from_ref(&a), &store, "80,160", 64);
    assert_eq!(s.done, vec![id.clone()]);
    assert!(
        s.warnings
            .iter()
            .any(|(scene, w)| *scene == id && w.contains("could not be read")),
        "{:?}",
        s.warnings
    );
    let after = tree_bytes(&store);
    assert_eq!(before.len(), after.len());
    for ((p, x), (q, y)) in before.iter().zip(&after) {
        assert_eq!(p, q);
        assert!(x == y, "{} differs", p.display());
    }
    // The same file under a name that does not parse as a scene name: skipped as the scene it
    // is, and with --redo refused rather than written as a second scene of the same data.
    let copy = dir.path().join("my-scene.nc");
    std::fs::copy(&a, &copy).unwrap();
    assert_eq!(
        run(std::slice::from_ref(&copy), &store, "80,160", 64).skipped,
        vec![id.clone()]
    );
    let s = redo(copy, &store);
    assert!(s.done.is_empty());
    assert_eq!(s.failed.len(), 1);
    assert!(
        s.failed[0]
            .1
            .contains(&format!("already in the store as scene {id}")),
        "{:?}",
        s.failed
    );
    assert_eq!(s.scenes_in_store, 2);
    assert!(!store.join("scenes/my-scene").exists());
}

#[cfg(unix)]
#[test]
fn a_new_store_through_a_link_to_an_empty_folder_is_made_there() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(dir.path(), SceneKind::Rtt, 5, 0, "default");
    let real = dir.path().join("disk/store.zarr");
    std::fs::create_dir_all(&real).unwrap();
    let link = dir.path().join("s.zarr");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let s = run(std::slice::from_ref(&a), &link, "80", 64);
    assert_eq!(s.done.len(), 1);
    assert!(link.is_symlink(), "the link was replaced");
    assert!(real.join("zarr.json").is_file());
    assert!(real.join("manifests/scenes.parquet").is_file());
    // A link to nothing says so.
    let dangling = dir.path().join("gone.zarr");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let attrs = new_attrs(
        &Level::parse_list("80").unwrap(),
        64,
        Codec::Zstd { level: 3 },
    );
    let e = ingest(
        &[a],
        &dangling,
        attrs,
        &IngestOptions::default(),
        &NoReporter,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("gone.zarr"), "{e}");
}

#[test]
fn bad_inputs_fail_alone_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = synth(dir.path(), SceneKind::Raw, 3, 0, "default");
    let mut inputs = vec![good];
    let mut expect: Vec<(&str, &str)> = Vec::new();
    // Truncated copy of a good file.
    let t = synth(&dir.path().join("t"), SceneKind::Raw, 4, 1, "default");
    let bytes = std::fs::read(&t).unwrap();
    let truncated = dir.path().join("truncated.nc");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    inputs.push(truncated);
    expect.push(("truncated.nc", ""));
    let junk = dir.path().join("notes.nc");
    std::fs::write(&junk, b"this is not a NetCDF file\n").unwrap();
    inputs.push(junk);
    expect.push(("notes.nc", "not a readable NetCDF"));
    for (i, (defect, var)) in [
        (
            Defect::MissingVariable("nersc_sar_secondary"),
            "nersc_sar_secondary",
        ),
        (Defect::MismatchedShape, "distance_map"),
        (Defect::BadCodeRow, "polygon_codes"),
        (Defect::AllInvalid, "nersc_sar_primary"),
    ]
    .into_iter()
    .enumerate()
    {
        let sub = dir.path().join(format!("d{i}"));
        let mut o = SynthOptions::new(SceneKind::Raw, 200, 220, 20 + i as u64);
        o.index = 10 + i as u32;
        o.defect = Some(defect);
        let p = write(&sub, o);
        expect.push((
            Box::leak(
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
                    .into_boxed_str(),
            ),
            var,
        ));
        inputs.push(p);
    }
    let store = dir.path().join("s.zarr");
    let s = run(&inputs, &store, "80,200", 64);
    assert_eq!(s.done.len(), 1, "{:?}", s.failed);
    assert_eq!(s.failed.len(), expect.len(), "{:?}", s.failed);
    for ((path, msg), (file, var)) in s.failed.iter().zip(&expect) {
        assert!(path.to_string_lossy().ends_with(file));
        assert!(msg.contains(file), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(var), "{msg} should name {var}");
    }
    // The store stays valid: manifests list exactly the good scene, no stray scene folders.
    let scenes = read_parquet(&store.join("manifests/scenes.parquet")).unwrap();
    assert_eq!(scenes.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    let dirs = std::fs::read_dir(store.join("scenes"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(dirs, 1);
}

/// One store holds one file per scene: a second file of a scene in the same run, or in a later
/// one, is refused, and so is a scene claimed by another ingest (another process's claim);
/// the other inputs go on, and nothing is left of a refused scene.
#[test]
fn one_file_per_scene_and_other_ingests_claims_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let raw = synth(&dir.path().join("raw"), SceneKind::Raw, 5, 0, "default");
    let rtt = synth(&dir.path().join("rtt"), SceneKind::Rtt, 5, 0, "default");
    let other = synth(&dir.path().join("o"), SceneKind::Raw, 6, 1, "default");
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let store = dir.path().join("s.zarr");
    let s = run(&[raw.clone(), rtt.clone()], &store, "80,200", 64);
    assert_eq!(s.done.len(), 1, "{:?}", s.failed);
    let id = s.done[0].clone();
    assert_eq!(s.failed.len(), 1);
    // The two files run at once: whichever opens second is refused.
    let (second, first) = if s.failed[0].0 == rtt {
        (&rtt, &raw)
    } else {
        (&raw, &rtt)
    };
    assert_eq!(&s.failed[0].0, second);
    let want = format!("scene {id} is also given as {}", first.display());
    assert!(s.failed[0].1.contains(&want), "{}", s.failed[0].1);
    // A later run with the scene's other file.
    let s = run(std::slice::from_ref(second), &store, "80,200", 64);
    let want = format!("scene {id} is already in the store from {}", name(first));
    assert!(s.failed[0].1.contains(&want), "{:?}", s.failed);
    // Another store where an ingest of another file holds the scene (its process is gone).
    let store = dir.path().join("claimed.zarr");
    let s = run(std::slice::from_ref(&other), &store, "80,200", 64);
    assert_eq!(s.done.len(), 1, "{:?}", s.failed);
    let claims = store.join("manifests/claims");
    std::fs::create_dir_all(&claims).unwrap();
    let claim = claims.join(format!("{id}.claim"));
    std::fs::write(&claim, "ghost.nc\nnode-3\n12345\n").unwrap();
    let s = run(&[raw.clone(), other.clone()], &store, "80,200", 64);
    assert_eq!((s.done.len(), s.skipped.len()), (0, 1));
    assert_eq!(s.failed.len(), 1);
    let want = format!(
        "{}: scene {id} is claimed by an ingest of ghost.nc (host node-3, process 12345); if no \
         ingest of it is running, remove {}",
        raw.display(),
        claim.display()
    );
    assert_eq!(s.failed[0].1, want);
    assert!(!store.join("scenes").join(&id).exists());
    assert_eq!(s.scenes_in_store, 1);
    // Once the claim is gone the scene goes in; the run leaves no claim behind.
    std::fs::remove_file(&claim).unwrap();
    let s = run(&[raw, other], &store, "80,200", 64);
    assert_eq!((s.done.clone(), s.skipped.len()), (vec![id], 1));
    assert_eq!(s.scenes_in_store, 2);
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
}

/// A code in no SIGRID-3 table (CT range code 12) becomes 255 for that polygon, and is counted
/// and reported per scene instead of passed through.
#[test]
fn out_of_table_code_is_ignored_counted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let nc = synth(dir.path(), SceneKind::Raw, 9, 0, "default");
    // Rewrite the first ice polygon's CT to 12 in place.
    let path = nc.clone();
    let poly_id = on_netcdf_thread(move || {
        let mut f = netcdf::append(&path).unwrap();
        let mut v = f.variable_mut("polygon_codes").unwrap();
        let n = v.dimensions()[0].len();
        for i in 1..n {
            let row = v.get_string(i).unwrap();
            let fields: Vec<&str> = row.split(';').collect();
            if fields[14].trim() == "I" && fields[1].trim() != "99" {
                let mut new = fields.clone();
                new[1] = "12";
                v.put_string(&new.join(";"), i).unwrap();
                return fields[0].trim().parse::<i64>().unwrap();
            }
        }
        panic!("no ice polygon");
    });
    let store = dir.path().join("s.zarr");
    let s = run(std::slice::from_ref(&nc), &store, "80", 64);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    let warning = &s
        .warnings
        .iter()
        .find(|(_, w)| w.contains("outside the SIGRID-3 tables"))
        .unwrap()
        .1;
    assert!(
        warning.contains(&format!("polygon {poly_id}: CT=12")),
        "{warning}"
    );
    let scenes = read_parquet(&store.join("manifests/scenes.parquet")).unwrap();
    let count = col::<UInt32Array>(&scenes[0], "unknown_code_count");
    assert_eq!(count.value(0), 1);
    let polygons = read_parquet(&store.join("manifests/polygons.parquet")).unwrap();
    let b = &polygons[0];
    let ids = col::<arrow_array::Int64Array>(b, "poly_id");
    let sic = col::<arrow_array::UInt8Array>(b, "sic");
    let ct = col::<StringArray>(b, "ct");
    let unknown = col::<StringArray>(b, "unknown_codes");
    let i = (0..b.num_rows())
        .find(|&i| ids.value(i) == poly_id)
        .unwrap();
    assert_eq!(
        (sic.value(i), ct.value(i), unknown.value(i)),
        (255, "12", "CT=12")
    );
    // Every pixel of that polygon is 255 for SIC: the scene's ignore bin holds at least them.
    let px = col::<UInt64Array>(b, "pixels");
    let sic_px = col::<FixedSizeListArray>(&scenes[0], "sic_pixels");
    let sic_px = sic_px
        .values()
        .as_any()
        .downcast_ref::<UInt64Array>()
        .unwrap();
    assert!(px.value(i) > 0);
    assert!(
        sic_px.value(11) >= px.value(i),
        "{} < {}",
        sic_px.value(11),
        px.value(i)
    );
    let id = &s.done[0];
    let shape = array_shape(&store, &format!("/scenes/{id}/80m/labels")).unwrap();
    let lab = read_u8(
        &store,
        &format!("/scenes/{id}/80m/labels"),
        [0..1, 0..shape[1], 0..shape[2]],
    )
    .unwrap();
    assert!(lab.iter().all(|&v| v <= 10 || v == IGNORE));
}
