//! Data-parallel training on the CPU, ranks in threads meeting over TCP: two ranks take the
//! steps one process takes on the whole batch, keep the same weights, write one run directory,
//! stop together and resume exactly.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

mod common;

use icefm_model::config::TrainConfig;
use icefm_model::dist::{DistSpec, Group};
use icefm_model::finetune::{ValRecord, train_seg, train_seg_in};
use icefm_model::train::{
    RunOptions, RunSummary, StepRecord, checkpoints, read_metrics, train_mae, train_mae_in,
};

/// Two generated scenes, and a validation regime of one of them.
fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = common::rtt_store("dist-tests", 2, (260, 300), 23);
        common::write_val_regime(&store, "v", 50.0);
        store
    })
}

const SEG: &str = r#"
[model]
preset = "micro"
[seg]
head = "fcn"
channels = 8
val_regime = "v"
val_every = 2
eval_level = "160"
[data]
levels = "80,160"
crop = 32
batch_size = 4
min_valid = 0.3
threads = 1
[train]
steps = 4
lr = 2e-3
warmup_steps = 1
checkpoint_every = 2
keep_last = 5
seed = 6
"#;

fn opts(out: &Path, resume: bool) -> RunOptions {
    RunOptions {
        device: candle_core::Device::Cpu,
        store: store().to_path_buf(),
        out: out.to_path_buf(),
        resume,
    }
}

/// `world` ranks of `cfg` (MAE, or fine-tuning with a `[seg]` section) in threads, rank `k`
/// writing to `outs[k]`; rank `k`'s stop flag is `stops[k]`. Returns each rank's summary.
fn ranks(
    cfg: &TrainConfig,
    outs: &[PathBuf],
    resume: bool,
    stops: &[bool],
) -> Vec<Result<RunSummary, String>> {
    let port = common::free_port();
    let world = outs.len();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let (cfg, out, stop) = (cfg.clone(), outs[r].clone(), stops[r]);
            std::thread::spawn(move || {
                let spec = DistSpec::parse(&format!("{r}/{world}@127.0.0.1:{port}")).unwrap();
                let mut g = Group::connect(&spec, Duration::from_secs(60)).unwrap();
                let stop = Arc::new(AtomicBool::new(stop));
                let o = opts(&out, resume);
                let run = if cfg.is_seg() {
                    train_seg_in(&mut g, &cfg, &o, &stop, &|_| {}, &|_| {})
                } else {
                    train_mae_in(&mut g, &cfg, &o, &stop, &|_| {})
                };
                run.map_err(|e| e.to_string())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The largest difference between two runs' final weights, relative to the largest weight.
fn weights_gap(a: &Path, b: &Path) -> f32 {
    let load = |o: &Path| {
        let dir = checkpoints(o).last().unwrap().1.clone();
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    let (mut gap, mut top) = (0f32, 0f32);
    for (name, x) in &a {
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in x.iter().zip(&y) {
            gap = gap.max((p - q).abs());
            top = top.max(p.abs());
        }
    }
    gap / top
}

fn losses(r: &[StepRecord]) -> Vec<f32> {
    r.iter().map(|r| r.loss).collect()
}

#[test]
fn two_mae_ranks_take_the_steps_one_process_takes_on_the_whole_batch() {
    let cfg = TrainConfig::parse(common::DIST_MAE, &[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let one = train_mae(
        &cfg,
        &opts(&tmp.path().join("one"), false),
        &AtomicBool::new(false),
        &|_| {},
    )
    .unwrap();
    let two_dir = tmp.path().join("two");
    let r1_dir = tmp.path().join("rank1");
    let two = ranks(&cfg, &[two_dir.clone(), r1_dir.clone()], false, &[false; 2]);
    let (r0, r1) = (two[0].as_ref().unwrap(), two[1].as_ref().unwrap());
    assert_eq!((r0.steps_done, r1.steps_done), (4, 4));
    // Rank 0's records are the whole batch's: the same losses (to rounding), learning rates
    // and images per step as one process's, and the other rank reports the same.
    assert_eq!(r0.records.len(), 4);
    for (a, b) in one.records.iter().zip(&r0.records) {
        assert!(
            (a.loss - b.loss).abs() <= 2e-6 * a.loss.abs(),
            "{a:?}\n{b:?}"
        );
        assert!(
            (a.value("baseline").unwrap() - b.value("baseline").unwrap()).abs() < 1e-5,
            "{a:?}\n{b:?}"
        );
        assert_eq!(a.lr, b.lr);
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 1e-4 * a.grad_norm,
            "{a:?}\n{b:?}"
        );
    }
    assert_eq!(losses(&r0.records), losses(&r1.records));
    // The level mix is the whole batch's, every rank's samples.
    let mix = |r: &[StepRecord]| r.iter().map(|r| r.levels.clone()).collect::<Vec<_>>();
    assert_eq!(mix(&r0.records), mix(&one.records));
    let gap = weights_gap(&tmp.path().join("one"), &two_dir);
    assert!(gap < 1e-3, "weights differ by {gap}");
    // Rank 0 alone wrote a run directory: checkpoints, metrics, panels, log.
    assert_eq!(
        checkpoints(&two_dir)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        [2, 4]
    );
    assert_eq!(
        losses(&read_metrics(&two_dir.join("metrics.parquet")).unwrap()),
        losses(&r0.records)
    );
    assert!(two_dir.join("panels/step_0000004.png").exists());
    assert!(two_dir.join("log.txt").exists() && !r1_dir.exists());
}

#[test]
fn a_stop_on_any_rank_stops_both_and_a_resume_with_any_number_of_ranks_continues_the_run() {
    let cfg = TrainConfig::parse(common::DIST_MAE, &[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let done = ranks(&cfg, &[full.clone(), full.clone()], false, &[false; 2]);
    assert!(done.iter().all(Result::is_ok));

    // Rank 1 is asked to stop before its first step: both stop after it, and rank 0 saves.
    let part = tmp.path().join("part");
    let stopped = ranks(&cfg, &[part.clone(), part.clone()], false, &[false, true]);
    for r in &stopped {
        let r = r.as_ref().unwrap();
        assert_eq!((r.steps_done, r.interrupted), (1, true));
    }
    assert_eq!(checkpoints(&part).last().unwrap().0, 1);
    let rest = ranks(&cfg, &[part.clone(), part.clone()], true, &[false; 2]);
    let rest = rest[0].as_ref().unwrap();
    assert_eq!((rest.steps_done, rest.steps_run), (4, 3));
    let bytes = |o: &Path| {
        std::fs::read(checkpoints(o).last().unwrap().1.join("model.safetensors")).unwrap()
    };
    assert_eq!(bytes(&part), bytes(&full));
    assert_eq!(
        losses(&read_metrics(&part.join("metrics.parquet")).unwrap()),
        losses(&read_metrics(&full.join("metrics.parquet")).unwrap())
    );

    // The same stop, resumed by one process: the same samples, so the same steps (to
    // rounding: the sums are added in another order).
    let alone = tmp.path().join("alone");
    let stopped = ranks(&cfg, &[alone.clone(), alone.clone()], false, &[true, false]);
    assert!(stopped.iter().all(|r| r.as_ref().unwrap().steps_done == 1));
    let rest = train_mae(&cfg, &opts(&alone, true), &AtomicBool::new(false), &|_| {}).unwrap();
    assert_eq!((rest.steps_done, rest.steps_run), (4, 3));
    let want = read_metrics(&full.join("metrics.parquet")).unwrap();
    for (a, b) in want.iter().zip(&rest.records) {
        assert!(
            (a.loss - b.loss).abs() <= 2e-6 * a.loss.abs(),
            "{a:?}\n{b:?}"
        );
    }
    assert!(weights_gap(&alone, &full) < 1e-3);
}

#[test]
fn ranks_with_other_configurations_or_batches_that_do_not_split_are_refused() {
    let cfg = TrainConfig::parse(common::DIST_MAE, &[]).unwrap();
    let other = TrainConfig::parse(common::DIST_MAE, &["train.lr=2e-3".into()]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let run = |r: usize, cfg: TrainConfig, out: PathBuf| {
        std::thread::spawn(move || {
            let spec = DistSpec::parse(&format!("{r}/2@127.0.0.1:{port}")).unwrap();
            let mut g = Group::connect(&spec, Duration::from_secs(60)).unwrap();
            train_mae_in(
                &mut g,
                &cfg,
                &opts(&out, false),
                &AtomicBool::new(false),
                &|_| {},
            )
            .err()
            .unwrap()
            .to_string()
        })
    };
    let a = run(0, cfg.clone(), tmp.path().join("a"));
    let b = run(1, other, tmp.path().join("a"));
    for e in [a.join().unwrap(), b.join().unwrap()] {
        // The key that differs, with both values.
        assert!(
            e.contains(&format!(
                "the ranks' configurations differ from rank 0's: rank 1 has train.lr = 0.002 \
                 (rank 0: {})",
                cfg.train.lr
            )),
            "{e}"
        );
    }
    assert!(!tmp.path().join("a").exists());

    let three = TrainConfig::parse(common::DIST_MAE, &["data.batch_size=3".into()]).unwrap();
    let e = ranks(
        &three,
        &[tmp.path().join("b"), tmp.path().join("b")],
        false,
        &[false; 2],
    );
    for r in e {
        let e = r.err().unwrap();
        assert!(
            e.contains("batch_size 3 is not a multiple of the 2 ranks"),
            "{e}"
        );
    }

    // A resume that rank 0 refuses (nothing to resume in a new directory is fine, but a new
    // run into a directory with checkpoints is not) ends rank 1 too, with rank 0's reason.
    let used = tmp.path().join("used");
    train_mae(&cfg, &opts(&used, false), &AtomicBool::new(false), &|_| {}).unwrap();
    let again = ranks(&cfg, &[used.clone(), used.clone()], false, &[false; 2]);
    assert!(
        again[0]
            .as_ref()
            .err()
            .unwrap()
            .contains("already holds checkpoints")
    );
    let e = again[1].as_ref().err().unwrap();
    assert!(
        e.contains("rank 0:") && e.contains("already holds checkpoints"),
        "{e}"
    );
}

#[test]
fn two_fine_tuning_ranks_take_the_steps_one_process_takes_on_the_whole_batch() {
    let cfg = TrainConfig::parse(SEG, &[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let one = train_seg(
        &cfg,
        &opts(&tmp.path().join("one"), false),
        &AtomicBool::new(false),
        &|_| {},
        &|_| {},
    )
    .unwrap();
    let two_dir = tmp.path().join("two");
    let two = ranks(
        &cfg,
        &[two_dir.clone(), two_dir.clone()],
        false,
        &[false; 2],
    );
    let r0 = two[0].as_ref().unwrap();
    assert_eq!(two[1].as_ref().unwrap().steps_done, 4);
    // Each task's loss is a mean over the whole batch's labelled pixels (the ranks hold
    // different numbers of them): the total and each task's loss are one process's.
    for (a, b) in one.records.iter().zip(&r0.records) {
        assert!(
            (a.loss - b.loss).abs() <= 2e-6 * a.loss.abs(),
            "{a:?}\n{b:?}"
        );
        for t in ["loss_SIC", "loss_SOD", "loss_FLOE"] {
            let (x, y) = (a.value(t).unwrap(), b.value(t).unwrap());
            assert!((x - y).abs() <= 2e-6 * x.abs(), "{t}: {x} vs {y}");
        }
    }
    let gap = weights_gap(&tmp.path().join("one"), &two_dir);
    assert!(gap < 1e-3, "weights differ by {gap}");
    assert_eq!(
        checkpoints(&two_dir)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        [2, 4]
    );
    // Rank 0 alone validated (the other rank waited), with one process's scores, and kept
    // the best checkpoint.
    let steps = |v: &[ValRecord]| v.iter().map(|v| v.step).collect::<Vec<_>>();
    assert_eq!(steps(&r0.validation), [2, 4]);
    assert!(two[1].as_ref().unwrap().validation.is_empty());
    for (a, b) in one.validation.iter().zip(&r0.validation) {
        assert!(a.combined.is_finite(), "{a:?}");
        assert!((a.combined - b.combined).abs() < 0.5, "{a:?}\n{b:?}");
    }
    assert!(two_dir.join("checkpoints/best/model.safetensors").exists());
    assert!(two_dir.join("validation.parquet").exists());
}

/// `train.accumulate`: each step's batch in micro-batches whose gradients are added up before
/// one update, in one process and on each of two ranks, takes the whole batch's step, for
/// MAE and for fine-tuning.
#[test]
fn micro_batches_take_the_whole_batchs_step() {
    let tmp = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let close = |a: &[StepRecord], b: &[StepRecord], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x.loss - y.loss).abs() <= 2e-6 * x.loss.abs(),
                "{what}\n{x:?}\n{y:?}"
            );
            for ((n, p), (_, q)) in x.extra.iter().zip(&y.extra) {
                assert!(
                    (p - q).abs() <= 2e-6 * p.abs().max(1e-3),
                    "{what} {n}: {p} vs {q}"
                );
            }
            assert_eq!(x.levels, y.levels, "{what}");
        }
    };
    let mae = TrainConfig::parse(common::DIST_MAE, &[]).unwrap();
    let mae2 = TrainConfig::parse(common::DIST_MAE, &["train.accumulate=2".into()]).unwrap();
    let whole = train_mae(&mae, &opts(&tmp.path().join("m1"), false), &never, &|_| {}).unwrap();
    let micro = train_mae(&mae2, &opts(&tmp.path().join("m2"), false), &never, &|_| {}).unwrap();
    close(&whole.records, &micro.records, "MAE, 2 micro-batches");
    assert!(weights_gap(&tmp.path().join("m1"), &tmp.path().join("m2")) < 1e-3);
    // A run stopped after its first step continues in micro-batches (--resume may change
    // train.accumulate), with the same steps.
    let cut = tmp.path().join("cut");
    let stop = AtomicBool::new(false);
    let first = train_mae(&mae, &opts(&cut, false), &stop, &|_| {
        stop.store(true, std::sync::atomic::Ordering::SeqCst)
    })
    .unwrap();
    assert_eq!(first.steps_done, 1);
    let rest = train_mae(&mae2, &opts(&cut, true), &never, &|_| {}).unwrap();
    close(&whole.records, &rest.records, "resumed in 2 micro-batches");
    let both = tmp.path().join("m22");
    let two = ranks(&mae2, &[both.clone(), both.clone()], false, &[false; 2]);
    close(
        &whole.records,
        &two[0].as_ref().unwrap().records,
        "MAE, 2 ranks × 2",
    );
    assert!(weights_gap(&tmp.path().join("m1"), &both) < 1e-3);

    let seg = TrainConfig::parse(SEG, &[]).unwrap();
    let seg2 = TrainConfig::parse(SEG, &["train.accumulate=2".into()]).unwrap();
    let quiet = |_: &StepRecord| {};
    let whole = train_seg(
        &seg,
        &opts(&tmp.path().join("s1"), false),
        &never,
        &quiet,
        &|_| {},
    );
    let micro = train_seg(
        &seg2,
        &opts(&tmp.path().join("s2"), false),
        &never,
        &quiet,
        &|_| {},
    );
    close(
        &whole.unwrap().records,
        &micro.unwrap().records,
        "fine-tuning, 2 micro-batches",
    );
    assert!(weights_gap(&tmp.path().join("s1"), &tmp.path().join("s2")) < 1e-3);

    // Micro-batches that do not split the batch, or each rank's share of it, are refused.
    let e = TrainConfig::parse(common::DIST_MAE, &["train.accumulate=3".into()]).unwrap_err();
    assert!(e.to_string().contains("train.accumulate 3"), "{e}");
    let four = TrainConfig::parse(common::DIST_MAE, &["train.accumulate=4".into()]).unwrap();
    let bad = tmp.path().join("bad");
    for r in ranks(&four, &[bad.clone(), bad.clone()], false, &[false; 2]) {
        let e = r.err().unwrap();
        assert!(
            e.contains("not a multiple of the 2 ranks × 4 micro-batches"),
            "{e}"
        );
    }
}

/// `world` ranks of the MAE `cfg` in threads, rank `k` reading `stores[k]` into `outs[k]`,
/// each returning its error.
fn ranks_on(cfg: &TrainConfig, stores: &[PathBuf], outs: &[PathBuf], resume: bool) -> Vec<String> {
    let port = common::free_port();
    let world = outs.len();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let (cfg, store, out) = (cfg.clone(), stores[r].clone(), outs[r].clone());
            std::thread::spawn(move || {
                let spec = DistSpec::parse(&format!("{r}/{world}@127.0.0.1:{port}")).unwrap();
                let mut g = Group::connect(&spec, Duration::from_secs(60)).unwrap();
                let o = RunOptions {
                    store,
                    ..opts(&out, resume)
                };
                train_mae_in(&mut g, &cfg, &o, &AtomicBool::new(false), &|_| {})
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ranks_on_other_data_or_other_weights_are_refused_before_a_step() {
    let cfg = TrainConfig::parse(common::DIST_MAE, &[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Rank 1 on another store: it would add its scenes' gradients to rank 0's.
    let other = common::rtt_store("dist-tests-other", 2, (260, 300), 24);
    let out = tmp.path().join("mixed");
    let e = ranks_on(
        &cfg,
        &[store().to_path_buf(), other.clone()],
        &[out.clone(), out.clone()],
        false,
    );
    for e in &e {
        assert!(
            e.contains(
                "the ranks would train on different data: rank 0 reads every scene, 1 \
                        (held out: 1 of validation regimes)"
            ) && e.contains("rank 1 reads every scene, 2 in"),
            "{e}"
        );
    }
    assert!(!out.exists());
    // Two runs of one configuration at the same step, from other data: ranks resuming one
    // from each agree on everything but their weights, which are compared at once.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let two = TrainConfig::parse(common::DIST_MAE, &["train.steps=2".into()]).unwrap();
    train_mae(&two, &opts(&a, false), &AtomicBool::new(false), &|_| {}).unwrap();
    let o = RunOptions {
        store: other,
        ..opts(&b, false)
    };
    train_mae(&two, &o, &AtomicBool::new(false), &|_| {}).unwrap();
    let stores = [store().to_path_buf(), store().to_path_buf()];
    let e = ranks_on(&cfg, &stores, &[a.clone(), b.clone()], true);
    for e in &e {
        assert!(
            e.contains(
                "weights at the start (from --out's checkpoint, seg.init or the seed) differ"
            ),
            "{e}"
        );
    }
    // Nothing was trained: each still holds its 2 steps.
    for dir in [&a, &b] {
        assert_eq!(checkpoints(dir).last().unwrap().0, 2);
        assert_eq!(read_metrics(&dir.join("metrics.parquet")).unwrap().len(), 2);
    }
}
