//! Ingest speed on full-size synthetic scenes, beside the floor: reading and decompressing the
//! same variables with the netcdf crate alone. Results and machine: `docs/benchmarks.md`.
//!
//! Scenes are generated once into `target/bench-data/` (a full raw scene takes about a minute).
//! `ICEFM_BENCH_SCALE=0.25` shrinks the scenes for a quick run.

use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[path = "common.rs"]
mod common;
use common::scene;
use icefm_ingest::netcdf_thread::on_netcdf_thread;
use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
use icefm_ingest::reader::SceneReader;
use icefm_ingest::store::{new_attrs, with_sar_resample};
use icefm_schemas::Level;
use icefm_schemas::store::{Codec, DEFAULT_CODEC, DEFAULT_PATCH, SarResample};
use icefm_synth::SceneKind;

/// The floor: read and decompress every SAR-grid variable ingest reads, band by band.
fn read_floor(path: &Path) -> usize {
    let path = path.to_path_buf();
    on_netcdf_thread(move || read_floor_here(&path))
}

fn read_floor_here(path: &Path) -> usize {
    let r = SceneReader::open(path).expect("open");
    let info = r.info().clone();
    let mut n = 0;
    let mut row0 = 0;
    while row0 < info.height {
        let rows = info.band_rows.min(info.height - row0);
        let b = r.read_band_netcdf(row0, rows).expect("band");
        n += b.hh.len();
        row0 += rows;
    }
    n
}

fn ingest_once(path: &Path, levels: &[Level], codec: Codec) -> u64 {
    ingest_with(path, levels, codec, SarResample::Area)
}

fn ingest_with(path: &Path, levels: &[Level], codec: Codec, sar: SarResample) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("s.zarr");
    let s = ingest(
        &[path.to_path_buf()],
        &store,
        with_sar_resample(new_attrs(levels, DEFAULT_PATCH, codec), sar),
        &IngestOptions::default(),
        &NoReporter,
    )
    .expect("ingest");
    assert_eq!(s.done.len(), 1, "{:?}", s.failed);
    dir_size(&store)
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let q = e.path();
        n += if q.is_dir() {
            dir_size(&q)
        } else {
            e.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    n
}

fn bench_scene(c: &mut Criterion, kind: SceneKind) {
    let path = scene(kind);
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let name = format!("{kind:?}").to_lowercase();
    let mut g = c.benchmark_group(format!("ingest_{name}"));
    g.sample_size(10)
        .measurement_time(Duration::from_secs(60))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("netcdf_read_floor", |b| b.iter(|| read_floor(&path)));
    let levels = Level::defaults();
    let size = ingest_once(&path, &levels, DEFAULT_CODEC);
    eprintln!(
        "{name}: input {:.1} MB, store {:.1} MB (levels 80..400 m, default codec)",
        bytes as f64 / 1e6,
        size as f64 / 1e6
    );
    g.bench_function("ingest_all_levels", |b| {
        b.iter(|| ingest_once(&path, &levels, DEFAULT_CODEC))
    });
    // HH and HV sampled bilinearly (`ingest --sar-resample bilinear`) instead of area means.
    g.bench_function("ingest_all_levels_bilinear_sar", |b| {
        b.iter(|| ingest_with(&path, &levels, DEFAULT_CODEC, SarResample::Bilinear))
    });
    g.finish();
}

fn ingest_raw(c: &mut Criterion) {
    bench_scene(c, SceneKind::Raw);
}

fn ingest_rtt(c: &mut Criterion) {
    bench_scene(c, SceneKind::Rtt);
}

/// Codec choice: store size and ingest time on the RTT scene at 80, 200 and 400 m.
fn codecs(c: &mut Criterion) {
    let path = scene(SceneKind::Rtt);
    let levels = Level::parse_list("80,200,400").expect("levels");
    let mut g = c.benchmark_group("codec_rtt_80_200_400");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .warm_up_time(Duration::from_secs(1));
    for (name, codec) in [
        ("zstd1", Codec::Zstd { level: 1 }),
        ("zstd3", Codec::Zstd { level: 3 }),
        ("blosc_zstd1_shuffle", Codec::BloscZstd { level: 1 }),
        ("blosc_zstd5_shuffle", Codec::BloscZstd { level: 5 }),
    ] {
        let size = ingest_once(&path, &levels, codec);
        eprintln!("codec {name}: store {:.1} MB", size as f64 / 1e6);
        g.bench_function(name, |b| b.iter(|| ingest_once(&path, &levels, codec)));
    }
    g.finish();
}

criterion_group!(benches, ingest_raw, ingest_rtt, codecs);
criterion_main!(benches);
