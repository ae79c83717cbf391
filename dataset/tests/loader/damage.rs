//! A damaged store is an error that names the damage, never a patch of fill values: a shard
//! file gone, a chunk's bytes changed. Arrays written before every shard was kept still read a
//! missing shard as fill.

use std::sync::atomic::{AtomicU64, Ordering};

use icefm_dataset::store::{ArrayKind, StoreReader};
use icefm_schemas::Level;
use icefm_schemas::store::ALL_SHARDS_ATTR;

use super::*;

/// A store of its own (the tests below damage it).
fn damaged_store(name: &str) -> PathBuf {
    ingest_scenes(name, &[(SceneKind::Rtt, 200, 260)], 5)
}

fn array_dir(store: &Path, kind: ArrayKind) -> (String, PathBuf) {
    let r = StoreReader::open(store).unwrap();
    let l = Loader::open(store, None, opts()).unwrap();
    let scene = l.scenes()[0].to_string();
    let node = StoreReader::node(&scene, Level::new(80).unwrap(), kind);
    drop(r);
    (scene, store.join(node.trim_start_matches('/')))
}

#[test]
fn every_shard_file_is_written_and_a_missing_one_is_an_error() {
    let store = damaged_store("damage-missing-shard");
    let (scene, dir) = array_dir(&store, ArrayKind::Sar);
    let meta = std::fs::read_to_string(dir.join("zarr.json")).unwrap();
    assert!(
        meta.contains(&format!("\"{ALL_SHARDS_ATTR}\": true")),
        "{meta}"
    );
    assert!(meta.contains("\"crc32c\""), "{meta}");
    // 200 rows at 80 m in 64-pixel patches: 4 chunk-rows, each its own file.
    for row in 0..4 {
        assert!(dir.join(format!("c/0/{row}/0")).is_file(), "row {row}");
    }
    let level = Level::new(80).unwrap();
    let before = StoreReader::open(&store)
        .unwrap()
        .decode(&scene, level, ArrayKind::Sar, 1, 2)
        .unwrap();
    assert!(
        before
            .0
            .chunks(4)
            .any(|b| !f32::from_ne_bytes(b.try_into().unwrap()).is_nan())
    );

    std::fs::remove_file(dir.join("c/0/1/0")).unwrap();
    let r = StoreReader::open(&store).unwrap();
    let e = r
        .decode(&scene, level, ArrayKind::Sar, 1, 2)
        .expect_err("a missing shard must not read as fill")
        .to_string();
    // The error names the file itself.
    let file = dir.join("c/0/1/0").display().to_string();
    assert!(
        e.contains(&format!("{file}: chunk (1, 2)"))
            && e.contains("missing")
            && e.contains("--redo"),
        "{e}"
    );
    // Other rows still read.
    r.decode(&scene, level, ArrayKind::Sar, 0, 2).unwrap();

    // The loader reports it too instead of training on NaN.
    let l = Loader::open(&store, None, opts()).unwrap();
    let e = (0..200)
        .find_map(|i| l.batch(i).err())
        .expect("the loader read a missing shard without an error")
        .to_string();
    assert!(e.contains("c/0/1/0"), "{e}");
}

/// The shard index of a `[C, P, padded W]` shard file: (offset, size) of each chunk.
fn shard_index(bytes: &[u8], chunks: usize) -> Vec<(u64, u64)> {
    let at = bytes.len() - 4 - 16 * chunks;
    bytes[at..bytes.len() - 4]
        .chunks(16)
        .map(|e| {
            (
                u64::from_le_bytes(e[..8].try_into().unwrap()),
                u64::from_le_bytes(e[8..].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn a_changed_byte_in_a_chunk_fails_its_checksum() {
    let store = damaged_store("damage-flipped-byte");
    let (scene, dir) = array_dir(&store, ArrayKind::Labels);
    let level = Level::new(80).unwrap();
    let path = dir.join("c/0/2/0");
    let mut bytes = std::fs::read(&path).unwrap();
    // 260 columns in 64-pixel patches: 5 chunks a row.
    let index = shard_index(&bytes, 5);
    let (offset, size) = index[1];
    assert_ne!(offset, u64::MAX, "chunk (2, 1) is written");
    bytes[(offset + size / 2) as usize] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let r = StoreReader::open(&store).unwrap();
    let e = r
        .decode(&scene, level, ArrayKind::Labels, 2, 1)
        .expect_err("a changed byte must not decode")
        .to_string();
    assert!(
        e.contains("labels")
            && e.contains("(2, 1)")
            && e.contains("checksum")
            && e.contains("--redo"),
        "{e}"
    );
    // Its neighbours in the same shard are intact.
    r.decode(&scene, level, ArrayKind::Labels, 2, 0).unwrap();
    r.decode(&scene, level, ArrayKind::Labels, 2, 2).unwrap();
    // A changed byte in a shard's index (it has a CRC-32C of its own) is damage too.
    let path = dir.join("c/0/0/0");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 4 - 16 * 5 + 3;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let e = StoreReader::open(&store)
        .unwrap()
        .decode(&scene, level, ArrayKind::Labels, 0, 3)
        .expect_err("a changed shard index must not decode")
        .to_string();
    assert!(
        e.contains(&format!("{}: chunk (0, 3)", path.display()))
            && e.contains("shard's index")
            && e.contains("--redo"),
        "{e}"
    );
}

#[test]
fn a_truncated_shard_file_is_damage_with_the_redo_hint() {
    let store = damaged_store("damage-truncated");
    let (scene, dir) = array_dir(&store, ArrayKind::Aux);
    let level = Level::new(80).unwrap();
    let path = dir.join("c/0/3/0");
    let len = std::fs::metadata(&path).unwrap().len();
    // Cut shorter than the shard index at its end, then to nothing: a copy that stopped early.
    for keep in [10, 0] {
        assert!(keep < len);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(keep)
            .unwrap();
        let e = StoreReader::open(&store)
            .unwrap()
            .decode(&scene, level, ArrayKind::Aux, 3, 4)
            .expect_err("a truncated shard must not decode")
            .to_string();
        assert!(
            e.contains(&format!("{}: chunk (3, 4)", path.display()))
                && e.contains("shorter than its index says")
                && e.contains("--redo"),
            "{keep} bytes: {e}"
        );
    }
}

#[test]
fn arrays_without_the_every_shard_record_still_read_a_missing_shard_as_fill() {
    let store = damaged_store("damage-older-array");
    let (scene, dir) = array_dir(&store, ArrayKind::Sar);
    let meta = std::fs::read_to_string(dir.join("zarr.json")).unwrap();
    let older = meta.replace(&format!("\"{ALL_SHARDS_ATTR}\": true"), "\"older\": true");
    assert_ne!(older, meta);
    std::fs::write(dir.join("zarr.json"), older).unwrap();
    std::fs::remove_file(dir.join("c/0/3/0")).unwrap();
    let c = StoreReader::open(&store)
        .unwrap()
        .decode(&scene, Level::new(80).unwrap(), ArrayKind::Sar, 3, 0)
        .unwrap();
    assert_eq!(c.bytes(), 2 * 64 * 64 * 4);
    assert!(
        c.0.chunks(4)
            .all(|b| f32::from_ne_bytes(b.try_into().unwrap()).is_nan())
    );
}

/// Ingest one more generated scene (seed `seed`) into `store`, merging its manifests.
fn add_scene(store: &Path, seed: u64) {
    use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
    use icefm_synth::{SynthOptions, write_scene};
    let attrs = icefm_schemas::store::StoreAttrs::read(store).unwrap();
    let folder = store.with_file_name(format!("more-{seed}"));
    let mut o = SynthOptions::new(SceneKind::Rtt, 150, 170, seed);
    o.index = seed as u32;
    let input = write_scene(&folder, &o).unwrap();
    ingest(
        &[input],
        store,
        attrs,
        &IngestOptions::default(),
        &NoReporter,
    )
    .unwrap();
}

fn manifests(store: &Path) -> PathBuf {
    store.join(icefm_schemas::store::MANIFESTS_DIR)
}

fn copy_manifests(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["scenes.parquet", "polygons.parquet", "patches.parquet"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn manifests_of_two_merges_are_refused_until_merged_again() {
    use icefm_dataset::merged::{check_manifests, unmerged};
    use icefm_dataset::table::SceneTable;
    let store = damaged_store("damage-two-merges");
    let saved = store.with_file_name("saved");
    copy_manifests(&manifests(&store), &saved);
    assert_eq!(unmerged(&store).unwrap(), None);
    add_scene(&store, 40);
    assert_eq!(SceneTable::from_store(&store).unwrap().scenes.len(), 2);
    check_manifests(&store).unwrap();

    // A merge stopped after renaming scenes.parquet: patches.parquet is the earlier merge's.
    std::fs::copy(
        saved.join("patches.parquet"),
        manifests(&store).join("patches.parquet"),
    )
    .unwrap();
    let e = SceneTable::from_store(&store).unwrap_err().to_string();
    assert!(
        e.contains("scenes.parquet")
            && e.contains("patches.parquet")
            && e.contains("different merges")
            && e.contains("icefm manifest merge --store"),
        "{e}"
    );
    let e = Loader::open(&store, None, opts())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different merges"), "{e}");
    // The polygons manifest is checked too.
    icefm_ingest::manifest::merge_manifests(&store).unwrap();
    std::fs::copy(
        saved.join("polygons.parquet"),
        manifests(&store).join("polygons.parquet"),
    )
    .unwrap();
    let e = check_manifests(&store).unwrap_err().to_string();
    assert!(e.contains("polygons.parquet"), "{e}");
    // A stamped file beside an unstamped one (a stopped merge in a store merged before stamps)
    // is refused too.
    icefm_ingest::manifest::merge_manifests(&store).unwrap();
    let patches = manifests(&store).join("patches.parquet");
    let batches = icefm_ingest::manifest::read_parquet(&patches).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&patches).unwrap(),
        batches[0].schema(),
        None,
    )
    .unwrap();
    for b in &batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
    let e = check_manifests(&store).unwrap_err().to_string();
    assert!(
        e.contains("patches.parquet") && e.contains("different merges"),
        "{e}"
    );
    // What the message says to run mends it.
    icefm_ingest::manifest::merge_manifests(&store).unwrap();
    check_manifests(&store).unwrap();
    assert_eq!(
        Loader::open(&store, None, opts()).unwrap().scenes().len(),
        2
    );
}

#[test]
fn manifests_behind_the_committed_scenes_are_reported() {
    use icefm_dataset::merged::unmerged;
    let store = damaged_store("damage-behind");
    let saved = store.with_file_name("saved");
    copy_manifests(&manifests(&store), &saved);
    let first = Loader::open(&store, None, opts()).unwrap().scenes()[0].to_string();
    add_scene(&store, 41);
    let second = Loader::open(&store, None, opts())
        .unwrap()
        .scenes()
        .iter()
        .find(|s| ***s != *first)
        .unwrap()
        .to_string();
    // An ingest stopped between committing the scene and merging: the whole earlier merge.
    copy_manifests(&saved, &manifests(&store));
    let line = unmerged(&store)
        .unwrap()
        .expect("one committed scene is not merged");
    assert!(
        line.contains("1 committed scene(s) are not in them yet")
            && line.contains(&second)
            && line.contains("icefm manifest merge --store"),
        "{line}"
    );
    // Still readable: the earlier merge is whole.
    assert_eq!(
        Loader::open(&store, None, opts()).unwrap().scenes().len(),
        1
    );

    // A listed scene un-committed (being written again).
    icefm_ingest::manifest::merge_manifests(&store).unwrap();
    assert_eq!(unmerged(&store).unwrap(), None);
    // The same scenes, one of them committed again with other content since the merge (here
    // another scene's patches part stands in for a changed file's).
    let parts = store.join(icefm_schemas::store::PARTS_DIR);
    let own = parts.join(format!("{first}.patches.parquet"));
    let kept = std::fs::read(&own).unwrap();
    std::fs::copy(parts.join(format!("{second}.patches.parquet")), &own).unwrap();
    let line = unmerged(&store)
        .unwrap()
        .expect("a scene committed again is not merged");
    assert!(
        line.contains("scenes were written again since they were merged"),
        "{line}"
    );
    std::fs::write(&own, kept).unwrap();
    assert_eq!(unmerged(&store).unwrap(), None);
    icefm_ingest::manifest::remove_scene_parts(&store, &first).unwrap();
    let line = unmerged(&store)
        .unwrap()
        .expect("a listed scene is not committed");
    assert!(
        line.contains("1 scene(s) they list are no longer committed") && line.contains(&first),
        "{line}"
    );
}

#[test]
fn verify_reads_every_chunk_back_and_lists_each_damaged_array() {
    use icefm_dataset::verify::{chunk_count, verify};
    let store = damaged_store("damage-verify");
    // 200 x 260 at 80 m and 100 x 130 at 160 m in 64-pixel patches: 4 x 5 and 2 x 3 chunks,
    // three arrays each.
    assert_eq!(chunk_count(&store).unwrap(), 3 * (4 * 5 + 2 * 3));
    let seen = AtomicU64::new(0);
    let clean = verify(&store, &|n| {
        seen.fetch_add(n, Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(clean.chunks, 78);
    assert_eq!(seen.load(Ordering::Relaxed), 78);
    assert_eq!(clean.scenes, 1);
    assert!(clean.damaged.is_empty(), "{:?}", clean.damaged);
    // 26 chunks of each array: HH+HV and two aux channels f32, three label planes u8.
    assert_eq!(clean.decoded_bytes, 26 * 64 * 64 * (2 * 4 + 2 * 4 + 3));
    // Besides: the 2 km grid, its variable names and positions, and each level's channel and
    // task names and positions: 1 + 3 + 2 x 5 one-chunk arrays. Their bytes are at least the
    // positions' (f64, 8 x 10 cells at 2 km, 200 x 260 at 80 m, 100 x 130 at 160 m).
    assert_eq!(clean.small_arrays, 14);
    assert!(
        clean.small_bytes > 8 * (8 + 10 + 200 + 260 + 100 + 130),
        "{}",
        clean.small_bytes
    );

    let (scene, sar) = array_dir(&store, ArrayKind::Sar);
    std::fs::remove_file(sar.join("c/0/0/0")).unwrap();
    let (_, labels) = array_dir(&store, ArrayKind::Labels);
    let path = labels.join("c/0/3/0");
    let mut bytes = std::fs::read(&path).unwrap();
    let (offset, size) = shard_index(&bytes, 5)[4];
    bytes[(offset + size / 2) as usize] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let v = verify(&store, &|_| {}).unwrap();
    assert_eq!(v.chunks, 78);
    assert_eq!(v.damaged.len(), 2, "{:?}", v.damaged);
    assert!(v.damaged.iter().all(|(s, _)| *s == scene));
    let text: Vec<&str> = v.damaged.iter().map(|(_, e)| e.as_str()).collect();
    assert!(
        text.iter().any(|e| e.contains("80m/sar")
            && e.contains("c/0/0/0")
            && e.contains("(5 chunks of this array are bad)")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|e| e.contains("80m/labels")
            && e.contains("(3, 4)")
            && e.contains("checksum")
            && !e.contains("chunks of this array")),
        "{text:?}"
    );

    // The rest of a scene: its 2 km grid (one checksummed chunk), its group metadata, and the
    // manifests.
    let scene_dir = sar.parent().unwrap().parent().unwrap().to_path_buf();
    let grid = scene_dir.join("grid2km/c/0/0/0");
    let mut bytes = std::fs::read(&grid).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&grid, &bytes).unwrap();
    std::fs::write(scene_dir.join("160m/zarr.json"), "{ cut").unwrap();
    std::fs::remove_file(store.join("manifests/polygons.parquet")).unwrap();
    // The coordinate arrays: a level's task names and row positions damaged, the 2 km grid's
    // variable names' chunk gone, and a level's SAR channel names gone altogether, as in a store
    // ingested before they were written (not damage).
    let names = scene_dir.join("80m/task/c/0");
    let mut bytes = std::fs::read(&names).unwrap();
    bytes[0] ^= 0x10;
    std::fs::write(&names, &bytes).unwrap();
    std::fs::remove_file(scene_dir.join("variable/c/0")).unwrap();
    let rows = scene_dir.join("80m/y/c/0");
    let mut bytes = std::fs::read(&rows).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0x01;
    std::fs::write(&rows, &bytes).unwrap();
    std::fs::remove_dir_all(scene_dir.join("160m/sar_channel")).unwrap();
    let v = verify(&store, &|_| {}).unwrap();
    let text: Vec<String> = v.damaged.iter().map(|(s, e)| format!("{s}: {e}")).collect();
    assert_eq!(v.damaged.len(), 8, "{text:?}");
    // Four of the 14 small arrays damaged, one absent.
    assert_eq!(v.small_arrays, 9);
    assert!(
        text.iter()
            .any(|e| e.contains("80m/task/c/0") && e.contains("checksum") && e.contains("--redo")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|e| e.contains("80m/y/c/0") && e.contains("checksum")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|e| e.contains("variable/c/0")
            && e.contains("chunk file is missing")
            && e.contains("--redo")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|e| e.contains("grid2km") && e.contains("checksum") && e.contains("--redo")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|e| e.contains("160m/zarr.json")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|e| e.contains("polygons.parquet is missing") && e.contains("manifest merge")),
        "{text:?}"
    );

    // The committed parts the next merge reads: one cut short, then one gone.
    let part = store.join(format!("manifests/parts/{scene}.patches.parquet"));
    let len = std::fs::metadata(&part).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&part)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let parts_damage = |v: &icefm_dataset::verify::Verified| -> Vec<String> {
        v.damaged
            .iter()
            .filter(|(s, e)| *s == scene && e.contains("manifest merge"))
            .map(|(_, e)| e.clone())
            .collect()
    };
    let v = verify(&store, &|_| {}).unwrap();
    let found = parts_damage(&v);
    assert_eq!(v.damaged.len(), 9, "{:?}", v.damaged);
    assert!(
        found.len() == 1
            && found[0].contains(&part.display().to_string())
            && found[0].contains("--redo"),
        "{found:?}"
    );
    std::fs::remove_file(&part).unwrap();
    let v = verify(&store, &|_| {}).unwrap();
    let found = parts_damage(&v);
    assert!(
        found.len() == 1 && found[0].contains(&format!("{} is missing", part.display())),
        "{found:?}"
    );
}
