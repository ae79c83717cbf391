//! Loader throughput on a store ingested from the full-size synthetic scenes (one raw, one RTT;
//! all nine levels; 384-pixel patches), batches of 32 × 2 × 384 × 384, beside:
//! - `zarrs_alone`: decoding exactly the chunks the loader's batches touch with zarrs (shard
//!   indexes cached, arrays opened once, the same threads), nothing else;
//! - `netcdf_random_crop`: what SAR-IceFM's ancestors did, opening the RTT NetCDF scene and
//!   reading a random 384 × 384 window of HH, HV, SIC, SOD and FLOE per sample, normalised.
//!
//! Group `loader_http`: the same loader reading the store over HTTP from an in-process server
//! (`tests/support/http_files.rs`), answering at once or after 20 ms, as an object store would
//! (feature `object-store`).
//!
//! Results and machine: `docs/benchmarks.md`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use icefm_dataset::rng::Rng;
use icefm_dataset::{Augment, Loader, LoaderOptions, Sampler};
use icefm_ingest::netcdf_thread::on_netcdf_thread;
use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
use icefm_ingest::store::new_attrs;
use icefm_schemas::Level;
use icefm_schemas::store::{DEFAULT_CODEC, DEFAULT_PATCH};
use icefm_synth::SceneKind;
use rayon::prelude::*;
use zarrs::array::{
    Array, ArrayBytes, ArrayShardedReadableExt, ArrayShardedReadableExtCache, CodecOptions,
};
use zarrs::filesystem::FilesystemStore;

#[path = "common.rs"]
mod common;
#[cfg(feature = "object-store")]
#[path = "../tests/support/http_files.rs"]
#[allow(dead_code)]
mod http_files;
use common::{scale, scene, scene_number};

const BATCH: usize = 32;
const CROP: u32 = 384;

/// The store, ingested once into `target/bench-data/`.
fn store() -> PathBuf {
    let inputs = [scene(SceneKind::Raw), scene_number(SceneKind::Rtt, 1)];
    let store = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-data")
        .join(format!("loader-store-{}", scale()));
    if !store.join("manifests/patches.parquet").exists() {
        let _ = std::fs::remove_dir_all(&store);
        let s = ingest(
            &inputs,
            &store,
            new_attrs(&Level::defaults(), DEFAULT_PATCH, DEFAULT_CODEC),
            &IngestOptions::default(),
            &NoReporter,
        )
        .expect("ingest");
        assert!(s.failed.is_empty(), "{:?}", s.failed);
    }
    store
}

fn options(threads: usize) -> LoaderOptions {
    LoaderOptions {
        crop: CROP,
        batch_size: BATCH,
        threads,
        seed: 1,
        sampler: Sampler::LevelWeighted,
        ..LoaderOptions::default()
    }
}

/// zarrs on its own: the arrays opened once with their shard-index caches.
struct ZarrsAlone {
    fs: Arc<FilesystemStore>,
    arrays: HashMap<String, (Array<FilesystemStore>, ArrayShardedReadableExtCache)>,
    pool: rayon::ThreadPool,
}

impl ZarrsAlone {
    fn new(store: &Path, threads: usize) -> Self {
        Self {
            fs: Arc::new(FilesystemStore::new(store).expect("store")),
            arrays: HashMap::new(),
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool"),
        }
    }

    /// The chunks of the windows (the same spans as the loader), opened ahead.
    fn chunks(&mut self, loader: &Loader, batch: u64) -> Vec<(String, u64, u64)> {
        let mut set = BTreeSet::new();
        for s in loader.windows(batch).expect("windows") {
            let span = |start: i64| {
                let p = i64::from(DEFAULT_PATCH);
                (start.max(0) / p) as u64..=((start + i64::from(CROP) - 1) / p) as u64
            };
            for a in ["sar", "labels"] {
                let node = format!("/scenes/{}/{}/{a}", s.scene, s.level);
                let (array, _) = self.arrays.entry(node.clone()).or_insert_with(|| {
                    let array = Array::open(self.fs.clone(), &node).expect("array");
                    let cache = ArrayShardedReadableExtCache::new(&array);
                    (array, cache)
                });
                let [_, h, w] = array.shape() else {
                    panic!("3-d")
                };
                let (rows, cols) = (
                    h.div_ceil(u64::from(DEFAULT_PATCH)),
                    w.div_ceil(u64::from(DEFAULT_PATCH)),
                );
                for r in span(s.y0).filter(|&r| r < rows) {
                    for c in span(s.x0).filter(|&c| c < cols) {
                        set.insert((node.clone(), r, c));
                    }
                }
            }
        }
        set.into_iter().collect()
    }

    /// Decode the chunks: to typed vectors (`Vec<f32>`, `Vec<u8>`), as zarrs' API is usually
    /// called, or to their bytes (no conversion copy; what the loader does).
    fn decode(&self, chunks: &[(String, u64, u64)], typed: bool) -> usize {
        let opts = CodecOptions::default().with_concurrent_target(1);
        self.pool.install(|| {
            chunks
                .par_iter()
                .map(|(node, r, c)| {
                    let (array, cache) = &self.arrays[node];
                    if !typed {
                        array
                            .retrieve_subchunk_opt::<ArrayBytes<'static>>(
                                cache,
                                &[0, *r, *c],
                                &opts,
                            )
                            .expect("decode")
                            .size()
                    } else if node.ends_with("labels") {
                        array
                            .retrieve_subchunk_opt::<Vec<u8>>(cache, &[0, *r, *c], &opts)
                            .expect("decode")
                            .len()
                    } else {
                        array
                            .retrieve_subchunk_opt::<Vec<f32>>(cache, &[0, *r, *c], &opts)
                            .expect("decode")
                            .len()
                    }
                })
                .sum()
        })
    }
}

/// One sample the old way: open the NetCDF file, read a random window of every variable.
fn netcdf_crop(path: &Path, rng: &mut Rng, out: &mut [f32], labels: &mut [u8]) {
    let file = netcdf::open(path).expect("open");
    let hh = file.variable("nersc_sar_primary").expect("HH");
    let dims: Vec<usize> = hh.dimensions().iter().map(|d| d.len()).collect();
    let (h, w) = (dims[0], dims[1]);
    let n = CROP as usize;
    let y = rng.below((h - n) as u64) as usize;
    let x = rng.below((w - n) as u64) as usize;
    let ext = [y..y + n, x..x + n];
    for (i, name) in ["nersc_sar_primary", "nersc_sar_secondary"]
        .iter()
        .enumerate()
    {
        let v: Vec<f32> = file
            .variable(name)
            .expect("variable")
            .get_values::<f32, _>(ext.clone())
            .expect("read");
        // RTT files are already scaled: the crop only replaces NaN (the toolbox's fill).
        for (o, x) in out[i * n * n..(i + 1) * n * n].iter_mut().zip(v) {
            *o = if x.is_nan() { 0.0 } else { x };
        }
    }
    for (i, name) in ["SIC", "SOD", "FLOE"].iter().enumerate() {
        let v: Vec<u8> = file
            .variable(name)
            .expect("chart")
            .get_values::<u8, _>(ext.clone())
            .expect("read");
        labels[i * n * n..(i + 1) * n * n].copy_from_slice(&v);
    }
}

fn loader(c: &mut Criterion) {
    let store = store();
    let mut g = c.benchmark_group("loader_32x2x384");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(BATCH as u64));
    for threads in [1, 2] {
        // The loader with its cache off: the same decoding work as zarrs alone, plus cutting,
        // normalising and the masks.
        let l = Loader::open(
            &store,
            None,
            LoaderOptions {
                cache_bytes: 0,
                ..options(threads)
            },
        )
        .expect("loader");
        eprintln!("eligible patches per level: {:?}", l.eligible_patches());
        let mut i = 0;
        g.bench_function(format!("loader_nocache/{threads}t"), |b| {
            b.iter(|| {
                i += 1;
                let b = l.batch(i).expect("batch");
                let n = b.inputs.len();
                l.recycle(b);
                n
            })
        });
        // The same without the charts, as MAE pre-training reads: no label chunk decoded.
        let nl = Loader::open(
            &store,
            None,
            LoaderOptions {
                cache_bytes: 0,
                labels: false,
                ..options(threads)
            },
        )
        .expect("loader");
        let mut i = 0;
        g.bench_function(format!("loader_nocache_nolabels/{threads}t"), |b| {
            b.iter(|| {
                i += 1;
                let b = nl.batch(i).expect("batch");
                let n = b.inputs.len();
                nl.recycle(b);
                n
            })
        });
        let mut z = ZarrsAlone::new(&store, threads);
        for (name, typed) in [("zarrs_alone", true), ("zarrs_alone_bytes", false)] {
            let mut i = 0;
            g.bench_function(format!("{name}/{threads}t"), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        i += 1;
                        let chunks = z.chunks(&l, i);
                        let start = std::time::Instant::now();
                        std::hint::black_box(z.decode(&chunks, typed));
                        t += start.elapsed();
                    }
                    t
                })
            });
        }
        // Training settings: cache on, crops jittered across chunk borders, flips, rotations.
        let l = Loader::open(
            &store,
            None,
            LoaderOptions {
                augment: Augment {
                    flips: true,
                    rot90: true,
                    jitter: CROP / 2,
                },
                ..options(threads)
            },
        )
        .expect("loader");
        let mut i = 0;
        g.bench_function(format!("loader_jitter_aug/{threads}t"), |b| {
            b.iter(|| {
                i += 1;
                let b = l.batch(i).expect("batch");
                let n = b.inputs.len();
                l.recycle(b);
                n
            })
        });
        eprintln!("jitter+aug cache: {:?}", l.cache_stats());
        // Through the prefetching iterator (what training uses).
        let mut it = l.iter(1_000_000);
        g.bench_function(format!("loader_jitter_aug_prefetch/{threads}t"), |b| {
            b.iter(|| {
                let b = it.next().expect("batch").expect("batch");
                let n = b.inputs.len();
                it.recycle(b);
                n
            })
        });
    }
    // On the netCDF thread, where icefm makes every netCDF-C/HDF5 call (neither is thread-safe).
    let rtt = scene(SceneKind::Rtt);
    let mut seed = 0;
    g.bench_function("netcdf_random_crop/1t", |b| {
        b.iter(|| {
            seed += 1;
            let (rtt, seed) = (rtt.clone(), seed);
            on_netcdf_thread(move || {
                let mut rng = Rng::new(1, seed);
                let n = CROP as usize;
                let (mut out, mut labels) = (vec![0f32; 2 * n * n], vec![0u8; 3 * n * n]);
                for _ in 0..BATCH {
                    netcdf_crop(&rtt, &mut rng, &mut out, &mut labels);
                }
                out[0]
            })
        })
    });
    g.finish();
}

/// `store` served over HTTP, each answer `latency_ms` late: the server and the store's URL.
#[cfg(feature = "object-store")]
fn served(store: &Path, latency_ms: u64) -> (http_files::HttpFiles, PathBuf) {
    let server = http_files::HttpFiles::serve_with_latency(
        store.parent().expect("folder"),
        Duration::from_millis(latency_ms),
    );
    let name = store.file_name().expect("name").to_string_lossy();
    let url = PathBuf::from(format!("{}/{name}", server.base));
    (server, url)
}

/// The loader over HTTP: cache off (every chunk a request) and training settings (cache on),
/// with the loader's threads raised to hide the requests' latency.
#[cfg(feature = "object-store")]
fn loader_http(c: &mut Criterion) {
    let store = store();
    let mut g = c.benchmark_group("loader_http_32x2x384");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(BATCH as u64));
    for latency_ms in [0, 20] {
        let (server, url) = served(&store, latency_ms);
        for threads in [2, 8, 32] {
            for (what, cache_bytes, augment) in [
                ("nocache", 0, Augment::default()),
                (
                    "jitter_aug",
                    LoaderOptions::default().cache_bytes,
                    Augment {
                        flips: true,
                        rot90: true,
                        jitter: CROP / 2,
                    },
                ),
            ] {
                let l = Loader::open(
                    &url,
                    None,
                    LoaderOptions {
                        cache_bytes,
                        augment,
                        ..options(threads)
                    },
                )
                .expect("loader");
                let mut i = 0;
                g.bench_function(format!("{latency_ms}ms/{what}/{threads}t"), |b| {
                    b.iter(|| {
                        i += 1;
                        let b = l.batch(i).expect("batch");
                        let n = b.inputs.len();
                        l.recycle(b);
                        n
                    })
                });
            }
        }
        let (requests, ranged) = server.counts();
        eprintln!("{latency_ms} ms: {requests} requests, {ranged} of them byte ranges");
    }
    g.finish();
    // Whole scene levels, as `icefm eval` reads them: the first scene's 80 m level (HH, HV and
    // labels), from the folder and over HTTP.
    let mut g = c.benchmark_group("scene_read_http");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    let level = Level::new(80).expect("80 m");
    let channels = ["HH".to_string(), "HV".to_string()];
    let scene_id =
        |reader: &icefm_dataset::SceneReader| reader.scenes(None).expect("scenes")[0].clone();
    let local = icefm_dataset::SceneReader::open(&store, &channels).expect("store");
    let id = scene_id(&local);
    let [h, w] = {
        let s = local.read(&id, level).expect("scene");
        [s.height, s.width]
    };
    eprintln!("scene {id} at 80 m: {h} x {w} px");
    g.throughput(Throughput::Elements((h * w) as u64));
    g.bench_function("local", |b| {
        b.iter(|| local.read(&id, level).expect("scene").height)
    });
    for latency_ms in [0, 20] {
        let (_server, url) = served(&store, latency_ms);
        let reader = icefm_dataset::SceneReader::open(&url, &channels).expect("store");
        g.bench_function(format!("{latency_ms}ms"), |b| {
            b.iter(|| reader.read(&id, level).expect("scene").height)
        });
    }
    g.finish();
}

#[cfg(not(feature = "object-store"))]
fn loader_http(_: &mut Criterion) {}

criterion_group!(benches, loader, loader_http);
criterion_main!(benches);
