//! Full-scene evaluation of one 26-Mpx scene (AI4Arctic's ready-to-train size, 5,000 × 5,200 at
//! 80 m): sliding windows at 200 m, blended, upsampled to 80 m and scored. Reports windows,
//! seconds and peak memory per scene for the window geometries of `configs/seg_vit_b.toml`
//! (crop 384, stride 192) and `configs/seg_vit_tiny.toml` (crop 96, stride 48), with a ViT-tiny
//! FCN model on the CPU (window counts do not depend on the model). SAR-IceFM's validation
//! spends about 7,600 windows per scene. Results: `docs/benchmarks.md`.
//!
//! The whole scene is timed by hand (one pass each); criterion times a quarter-size scene.
//! `ICEFM_BENCH_SCALE=0.25` shrinks the "full" scene too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use criterion::{Criterion, criterion_group, criterion_main};
use icefm_ingest::pipeline::{IngestOptions, NoReporter, ingest};
use icefm_ingest::store::new_attrs;
use icefm_model::config::TrainConfig;
use icefm_model::finetune::{EvalOverrides, evaluate_run};
use icefm_model::seg::SegModel;
use icefm_model::train::{init_weights, named_vars};
use icefm_schemas::Level;
use icefm_schemas::store::DEFAULT_CODEC;
use icefm_synth::SceneKind;

mod common;

/// A store of one RTT scene at 80 and 200 m (ingested once).
fn store(scene: &Path, name: &str) -> PathBuf {
    let store = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-data")
        .join(name);
    if !store.join("manifests/scenes.parquet").exists() {
        let attrs = new_attrs(
            &Level::parse_list("80,200").expect("levels"),
            384,
            DEFAULT_CODEC,
        );
        let s = ingest(
            &[scene.to_path_buf()],
            &store,
            attrs,
            &IngestOptions::default(),
            &NoReporter,
        )
        .expect("ingest");
        assert!(s.failed.is_empty(), "{:?}", s.failed);
    }
    store
}

/// A fine-tuning run folder holding an (untrained) ViT-tiny FCN with `crop` and `stride`.
fn run(dir: &Path, crop: u32, stride: u32) -> PathBuf {
    let run = dir.join(format!("run-{crop}-{stride}"));
    std::fs::create_dir_all(&run).expect("run folder");
    let cfg = TrainConfig::parse(
        include_str!("../configs/seg_vit_tiny.toml"),
        &[
            format!("data.crop={crop}"),
            format!("seg.eval_stride={stride}"),
            "seg.eval_level=200".into(),
            "data.batch_size=8".into(),
        ],
    )
    .expect("config");
    std::fs::write(run.join("config.toml"), cfg.to_toml()).expect("config.toml");
    let vars = VarMap::new();
    SegModel::new(
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        &cfg.seg_config().expect("seg"),
    )
    .expect("model");
    init_weights(&vars, 1).expect("weights");
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = named_vars(&vars)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, run.join("model.safetensors")).expect("weights");
    run
}

/// A memory line of `/proc/self/status` in MiB (Linux): `VmHWM` (peak resident since the last
/// reset) or `VmRSS` (resident now).
fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with(key))?.to_string();
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn eval_scene(c: &mut Criterion) {
    // As `icefm eval` runs (ICEFM_MALLOC=default for glibc's defaults).
    icefm_model::alloc::keep_freed_memory();
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().expect("tmp");
    let full = common::scene(SceneKind::Rtt);
    let s = common::scale();
    let full_store = store(&full, &format!("eval-store-{s}"));
    for (crop, stride, what) in [
        (384, 192, "seg_vit_b geometry"),
        (96, 48, "seg_vit_tiny geometry"),
    ] {
        let r = run(tmp.path(), crop, stride);
        // Reset the peak to what is resident now, then one whole pass.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = status_mib("VmRSS:");
        let t = Instant::now();
        let ev = evaluate_run(
            &r,
            &full_store,
            None,
            &EvalOverrides::default(),
            &dev,
            &mut |_, _| Ok(()),
        )
        .expect("evaluate");
        let secs = t.elapsed().as_secs_f64();
        let scene = &ev.scenes[0];
        eprintln!(
            "eval {what}: scene {}x{} at 80 m, {}x{} at 200 m, crop {crop}, stride {stride}: \
             {} windows, {secs:.1} s, peak memory {:.0} MiB ({:.0} MiB above the {:.0} MiB \
             resident before)",
            scene.score_size.0,
            scene.score_size.1,
            scene.level_size.0,
            scene.level_size.1,
            scene.windows,
            status_mib("VmHWM:"),
            status_mib("VmHWM:") - before,
            before
        );
    }

    // Criterion: a quarter-size scene, SAR-IceFM's window geometry.
    let quarter_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data/rtt-quarter");
    let quarter = match std::fs::read_dir(&quarter_dir)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
    {
        Some(e) => e.path(),
        None => {
            std::fs::create_dir_all(&quarter_dir).expect("folder");
            let o = icefm_synth::SynthOptions::new(SceneKind::Rtt, 1250, 1300, 7);
            icefm_synth::write_scene(&quarter_dir, &o).expect("scene")
        }
    };
    let qstore = store(&quarter, "eval-store-quarter");
    let r = run(tmp.path(), 384, 192);
    let mut g = c.benchmark_group("eval_scene");
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    g.bench_function("rtt_1250x1300_vit_tiny_fcn_crop384_stride192", |b| {
        b.iter(|| {
            evaluate_run(
                &r,
                &qstore,
                None,
                &EvalOverrides::default(),
                &dev,
                &mut |_, _| Ok(()),
            )
            .expect("evaluate")
        })
    });
    g.finish();
}

criterion_group!(benches, eval_scene);
criterion_main!(benches);
