//! MAE runs on a store ingested from generated scenes: a run stopped at a step boundary and
//! resumed gives the same losses and weights as one that never stopped; run directories and
//! bad resumes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

mod common;

use icefm_model::config::TrainConfig;
use icefm_model::train::{RunOptions, checkpoints, read_metrics, train_mae};

fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| common::rtt_store("train-tests", 2, (260, 300), 21))
}

const CONFIG: &str = r#"
[model]
preset = "micro"
[mae]
decoder_dim = 8
decoder_depth = 1
decoder_heads = 2
[data]
levels = "80,160"
crop = 32
batch_size = 4
min_valid = 0.3
flips = true
rot90 = true
jitter = 8
threads = 2
[train]
steps = 6
lr = 1e-3
warmup_steps = 2
checkpoint_every = 3
keep_last = 5
panel_every = 3
seed = 3
"#;

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let store = store();
    let cfg = TrainConfig::parse(CONFIG, &[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let quiet = |_: &icefm_model::train::StepRecord| {};

    let a = RunOptions {
        device: candle_core::Device::Cpu,
        store: store.to_path_buf(),
        out: tmp.path().join("a"),
        resume: false,
    };
    let full = train_mae(&cfg, &a, &never, &quiet).unwrap();
    assert_eq!(
        (full.steps_done, full.steps_run, full.interrupted),
        (6, 6, false)
    );
    assert!(
        full.records
            .iter()
            .all(|r| r.loss.is_finite() && r.loss > 0.0)
    );
    assert!(full.records.iter().any(|r| r.levels.contains("160m")));

    // Stopped after step 3 (as Ctrl-C does), then resumed.
    let b = RunOptions {
        device: candle_core::Device::Cpu,
        store: store.to_path_buf(),
        out: tmp.path().join("b"),
        resume: false,
    };
    let stop = AtomicBool::new(false);
    let part = train_mae(&cfg, &b, &stop, &|r| {
        if r.step == 2 {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert_eq!((part.steps_done, part.interrupted), (3, true));
    assert_eq!(checkpoints(&b.out).last().unwrap().0, 3);
    let resumed = train_mae(
        &cfg,
        &RunOptions {
            device: candle_core::Device::Cpu,
            resume: true,
            ..b.clone()
        },
        &never,
        &quiet,
    )
    .unwrap();
    assert_eq!((resumed.steps_done, resumed.steps_run), (6, 3));
    let losses = |r: &[icefm_model::train::StepRecord]| -> Vec<(u64, f32, f64)> {
        r.iter().map(|x| (x.step, x.loss, x.lr)).collect()
    };
    assert_eq!(losses(&resumed.records), losses(&full.records));
    // The same weights, bit for bit, and the same metrics on disk.
    let last = |o: &Path| checkpoints(o).last().unwrap().1.clone();
    assert_eq!(weights(&last(&a.out)), weights(&last(&b.out)));
    let on_disk = read_metrics(&b.out.join("metrics.parquet")).unwrap();
    assert_eq!(losses(&on_disk), losses(&full.records));
    assert!(b.out.join("config.toml").exists() && b.out.join("log.txt").exists());
    // Panels every 3 steps: a PNG of 3 columns of 32 px and 4 rows of samples.
    let png = std::fs::read(a.out.join("panels/step_0000006.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (3 * 32 + 8, 4 * 32 + 3 * 4));
    assert_eq!(
        checkpoints(&a.out).iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![3, 6]
    );

    // A finished run asked for more steps continues; a new run into it is refused, and so is
    // a resume with another configuration.
    let more = TrainConfig::parse(CONFIG, &["train.steps=7".into()]).unwrap();
    let r = train_mae(
        &more,
        &RunOptions {
            device: candle_core::Device::Cpu,
            resume: true,
            ..a.clone()
        },
        &never,
        &quiet,
    )
    .unwrap();
    assert_eq!((r.steps_done, r.steps_run), (7, 1));
    let e = train_mae(&cfg, &a, &never, &quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("already holds checkpoints") && e.contains("--resume"),
        "{e}"
    );
    let other = TrainConfig::parse(CONFIG, &["mae.mask_ratio=0.6".into()]).unwrap();
    let e = train_mae(
        &other,
        &RunOptions {
            device: candle_core::Device::Cpu,
            resume: true,
            ..a.clone()
        },
        &never,
        &quiet,
    )
    .err()
    .unwrap()
    .to_string();
    // It names the key, with the run's value and the one given.
    assert!(
        e.contains("differs from the run's config.toml in mae.mask_ratio (0.75, not 0.6)")
            && e.contains("config.toml`, which holds every --set"),
        "{e}"
    );
}

#[test]
fn a_micro_mae_beats_predicting_each_patch_mean() {
    // 160 m patches of the generated scenes hold structure (edges, gradients) as well as
    // speckle; predicting each patch's mean scores about 1 in norm-pix units.
    let cfg = TrainConfig::parse(
        CONFIG,
        &[
            "data.levels=160".into(),
            "train.steps=80".into(),
            "train.lr=3e-3".into(),
            "train.warmup_steps=5".into(),
            "train.checkpoint_every=80".into(),
            "train.panel_every=0".into(),
            "data.batch_size=8".into(),
        ],
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let run = train_mae(
        &cfg,
        &RunOptions {
            device: candle_core::Device::Cpu,
            store: store().to_path_buf(),
            out: tmp.path().join("learn"),
            resume: false,
        },
        &AtomicBool::new(false),
        &|_| {},
    )
    .unwrap();
    let last = &run.records[run.records.len() - 10..];
    let loss = last.iter().map(|r| f64::from(r.loss)).sum::<f64>() / 10.0;
    let baseline = last
        .iter()
        .map(|r| f64::from(r.value("baseline").unwrap_or(f32::NAN)))
        .sum::<f64>()
        / 10.0;
    let first = f64::from(run.records[0].loss);
    eprintln!(
        "micro MAE: first loss {first:.3}, last-10 loss {loss:.3}, patch-mean baseline {baseline:.3}"
    );
    assert!(baseline > 0.8 && baseline < 1.0, "{baseline}");
    assert!(
        loss < 0.85 * baseline,
        "loss {loss:.3} vs baseline {baseline:.3}"
    );
}

/// Whatever stops a run between its records and its checkpoint, a checkpoint never stands
/// without the records of its steps: here writing `metrics.parquet` fails (its temporary name is
/// taken by a folder, as a full disk would fail it) and no checkpoint of that step is left. A
/// resume then gives every record; what stopped processes left in `checkpoints/` (half-written
/// folders, a removal stopped half-way) is removed at the next start.
#[test]
fn records_come_before_their_checkpoint_and_leftovers_are_swept() {
    let cfg = TrainConfig::parse(CONFIG, &[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let quiet = |_: &icefm_model::train::StepRecord| {};
    let opts = RunOptions {
        device: candle_core::Device::Cpu,
        store: store().to_path_buf(),
        out: tmp.path().join("r"),
        resume: false,
    };
    let blocker = opts.out.join("metrics.parquet.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    let e = train_mae(&cfg, &opts, &never, &quiet).err().unwrap();
    assert!(e.to_string().contains("metrics.parquet"), "{e}");
    assert!(checkpoints(&opts.out).is_empty());
    std::fs::remove_dir(&blocker).unwrap();

    // Leftovers of stopped processes.
    let ck = opts.out.join("checkpoints");
    for left in ["step_0000003.tmp", "step_0000002", "best.tmp"] {
        std::fs::create_dir_all(ck.join(left)).unwrap();
        std::fs::write(ck.join(left).join("model.safetensors"), b"part").unwrap();
    }
    // The first start's record cut short, as a crash or a full disk leaves it: the next start's
    // record is a line of its own.
    let starts = opts.out.join("starts.jsonl");
    let text = std::fs::read(&starts).unwrap();
    std::fs::write(&starts, &text[..text.len() - 2]).unwrap();
    let resume = RunOptions {
        resume: true,
        ..opts.clone()
    };
    let done = train_mae(&cfg, &resume, &never, &quiet).unwrap();
    assert_eq!(icefm_model::train::run_starts(&opts.out).len(), 1);
    assert_eq!((done.steps_done, done.steps_run), (6, 6));
    let steps: Vec<u64> = read_metrics(&opts.out.join("metrics.parquet"))
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (0..6).collect::<Vec<u64>>());
    let mut left: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["step_0000003", "step_0000006"]);
    let log = std::fs::read_to_string(opts.out.join("log.txt")).unwrap();
    assert!(
        log.contains(
            "removed what a stopped process left in checkpoints/: best.tmp, step_0000002, \
             step_0000003.tmp"
        ),
        "{log}"
    );
}
