//! Stores in object storage (feature `object-store`): a store served over HTTP, and one named by
//! a `file://` URL, read (and its regimes written) through the object_store crate, give what the
//! same store read as a folder gives: manifests, every chunk, the loader's batches, regimes.
#![cfg(feature = "object-store")]
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use icefm_dataset::loader::REMOTE_THREADS;
use icefm_dataset::regime::{Regime, list_regimes};
use icefm_dataset::store::{ArrayKind, StoreReader};
use icefm_dataset::table::{SceneTable, manifests_hash};
use icefm_dataset::{Augment, Batch, Loader, LoaderOptions, location};
use icefm_synth::SceneKind;

mod common;
use common::{P, ingest_scenes, regime};

#[path = "../../tests/support/http_files.rs"]
mod http_files;
use http_files::HttpFiles;

/// One RTT and one raw scene, and a regime of the first; built once per test run.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let scenes = [(SceneKind::Rtt, 300, 330), (SceneKind::Raw, 540, 620)];
        let store = ingest_scenes("object-store-tests", &scenes, 21);
        let first = SceneTable::from_store(&store).unwrap().scenes[0].id.clone();
        regime("first", vec![first])
            .write(&Regime::path_in(&store, "first"))
            .unwrap();
        store
    })
}

fn loader_options() -> LoaderOptions {
    LoaderOptions {
        batch_size: 6,
        seed: 3,
        min_valid: 0.0,
        crop: 48,
        threads: 2,
        augment: Augment {
            flips: true,
            rot90: true,
            jitter: 40,
        },
        ..LoaderOptions::default()
    }
}

/// Everything a training run reads of `url`, against the same reads of the local folder.
fn assert_reads_as_local(url: &Path) {
    let local = store();
    let (a, b) = (
        SceneTable::from_store(local).unwrap(),
        SceneTable::from_store(url).unwrap(),
    );
    assert_eq!(a.scenes, b.scenes);
    assert_eq!(a.source_hash, b.source_hash);
    assert_eq!(manifests_hash(url).unwrap(), manifests_hash(local).unwrap());

    // Every chunk of every array.
    let (r, u) = (
        StoreReader::open(local).unwrap(),
        StoreReader::open(url).unwrap(),
    );
    assert_eq!(u.attrs, r.attrs);
    let mut chunks = 0;
    for scene in &a.scenes {
        for level in r.attrs.levels.clone() {
            for kind in [ArrayKind::Sar, ArrayKind::Aux, ArrayKind::Labels] {
                let shape = r.shape(&scene.id, level, kind).unwrap();
                assert_eq!(u.shape(&scene.id, level, kind).unwrap(), shape);
                for row in 0..shape[1].div_ceil(u64::from(P)) {
                    for col in 0..shape[2].div_ceil(u64::from(P)) {
                        let want = r.decode(&scene.id, level, kind, row, col).unwrap();
                        let got = u.decode(&scene.id, level, kind, row, col).unwrap();
                        assert_eq!(
                            got.0, want.0,
                            "{} {level} {kind:?} ({row}, {col})",
                            scene.id
                        );
                        chunks += 1;
                    }
                }
            }
        }
    }
    assert!(chunks > 100, "{chunks} chunks");

    // The loader's batches, over all scenes and over a regime opened by name.
    let first = Regime::open(Some(url), "first").unwrap();
    assert_eq!(first.scenes, [a.scenes[0].id.clone()]);
    for regime in [None, Some(&first)] {
        let want: Vec<Batch> = {
            let l = Loader::open(local, regime, loader_options()).unwrap();
            (0..3).map(|i| l.batch(i).unwrap()).collect()
        };
        let l = Loader::open(url, regime, loader_options()).unwrap();
        let got: Vec<Batch> = (0..3).map(|i| l.batch(i).unwrap()).collect();
        assert_eq!(got, want);
    }
    // Threads "all cores" become at least REMOTE_THREADS for a store in object storage.
    let all_cores = LoaderOptions {
        threads: 0,
        ..loader_options()
    };
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        Loader::open(local, None, all_cores.clone())
            .unwrap()
            .threads(),
        cores
    );
    assert_eq!(
        Loader::open(url, None, all_cores).unwrap().threads(),
        cores.max(REMOTE_THREADS)
    );
    let e = Regime::open(Some(url), "second").unwrap_err().to_string();
    assert!(e.contains("unknown regime `second`"), "{e}");
}

#[test]
fn a_store_served_over_http_reads_as_its_folder() {
    let local = store();
    let server = HttpFiles::serve(local.parent().unwrap());
    let url = PathBuf::from(format!("{}/s.zarr", server.base));
    assert!(location::is_url(&url));
    assert_reads_as_local(&url);
    // The reads went over HTTP, the chunks as byte ranges of their shards.
    let (requests, ranged) = server.counts();
    assert!(
        requests > 20 && ranged > 10,
        "{requests} requests, {ranged} ranged"
    );

    // A path that is not a store there says so.
    let missing = PathBuf::from(format!("{}/nothing.zarr", server.base));
    let e = StoreReader::open(&missing).err().unwrap().to_string();
    assert!(
        e.contains("nothing.zarr") && e.contains("not an icefm store"),
        "{e}"
    );
    let e = SceneTable::from_store(&missing).unwrap_err().to_string();
    assert!(e.contains("no scenes manifest"), "{e}");
    let e = Regime::open(Some(&missing), "first")
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing.zarr: not an icefm store"), "{e}");
}

#[test]
fn an_outage_of_a_store_that_answered_is_waited_out() {
    let local = store();
    let server = HttpFiles::serve(local.parent().unwrap());
    let url = PathBuf::from(format!("{}/s.zarr", server.base));
    let (r, u) = (
        StoreReader::open(local).unwrap(),
        StoreReader::open(&url).unwrap(),
    );
    let scene = SceneTable::from_store(local).unwrap().scenes[0].id.clone();
    let level = r.attrs.levels[0];
    // Down for longer than the object_store client's own tries (some 2–3 s): each of its
    // requests fails, and icefm tries them again until the server answers.
    server.set_down(true);
    let want = r.decode(&scene, level, ArrayKind::Sar, 0, 0).unwrap();
    let reading = std::thread::spawn(move || u.decode(&scene, level, ArrayKind::Sar, 0, 0));
    std::thread::sleep(std::time::Duration::from_secs(8));
    let dropped = server.dropped();
    server.set_down(false);
    assert_eq!(reading.join().unwrap().unwrap().0, want.0);
    assert!(
        dropped >= 2,
        "{dropped} connections tried during the outage"
    );
}

#[test]
fn file_urls_read_the_store_and_write_its_regimes_whole() {
    let local = store();
    // A copy, so that this test's regimes do not show in the other's store.
    let copy = tempfile::tempdir().unwrap();
    let root = copy.path().join("s.zarr");
    copy_tree(local, &root);
    let url = PathBuf::from(format!("file://{}", root.display()));
    assert_reads_as_local(&url);

    // A regime written through the URL is a whole object in the store's regimes/, listed and
    // read back as the local file.
    let r = regime("both", vec!["b".into(), "a".into()]);
    r.write(&Regime::path_in(&url, "both")).unwrap();
    let back = Regime::read(&Regime::path_in(&root, "both")).unwrap();
    assert_eq!(back.scenes, ["b", "a"]);
    assert_eq!(list_regimes(&url), ["both", "first"]);
    assert_eq!(list_regimes(&url), list_regimes(&root));
    let names: Vec<String> = std::fs::read_dir(root.join("regimes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(
        &location::read(&url.join("zarr.json")).unwrap()[..],
        &std::fs::read(root.join("zarr.json")).unwrap()[..]
    );
    assert!(!location::exists(&url.join("regimes/none.parquet")).unwrap());
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
