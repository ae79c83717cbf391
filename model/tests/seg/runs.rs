//! Initialisation, evaluation windows and fine-tuning runs from a store.

use super::*;

#[test]
fn init_sets_every_encoder_weight_and_names_a_missing_one() {
    let cfg = micro(HeadKind::Fcn, SicLoss::Mse);
    let (vars, _) = model(DType::F32, &cfg, 1);
    // An MAE with other weights, saved as its checkpoints are.
    let mae = mae_weights(2, 99);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&mae, &file).unwrap();

    let named = named_vars(&vars);
    let encoder: Vec<&String> = named
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("encoder."))
        .collect();
    assert!(encoder.iter().any(|n| *n == "encoder.patch_embed.weight"));
    let patch = |named: &[(String, candle_core::Var)]| {
        values(
            named
                .iter()
                .find(|(n, _)| n == "encoder.patch_embed.weight")
                .unwrap()
                .1
                .as_tensor(),
        )
    };
    let before = patch(&named);
    let (read, set) = load_init(tmp.path(), &named, &Device::Cpu).unwrap();
    assert_eq!((read, set), (file.clone(), encoder.len()));
    for (n, v) in &named {
        if let Some(want) = mae.get(n).filter(|_| n.starts_with("encoder.")) {
            assert_eq!(max_rel(v.as_tensor(), want), 0.0, "{n}");
        }
    }
    assert_ne!(before, patch(&named));

    let mut partial = mae.clone();
    partial.remove("encoder.blocks.1.mlp.fc2.weight");
    candle_core::safetensors::save(&partial, &file).unwrap();
    let e = load_init(&file, &named, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("encoder.blocks.1.mlp.fc2.weight"), "{e}");

    // An encoder of another depth is named as such.
    let t = mae_weights(3, 1);
    candle_core::safetensors::save(&t, &file).unwrap();
    let e = load_init(&file, &named, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has 3 blocks, the model 2"), "{e}");
}

#[test]
fn sliding_windows_equal_the_model_on_each_window_and_skip_empty_ones() {
    assert_eq!(window_starts(10, 4, 3), [0, 3, 6]);
    assert_eq!(window_starts(9, 4, 4), [0, 4, 5]);
    assert_eq!(window_starts(3, 4, 2), [0]);
    assert_eq!(window_starts(8, 4, 4), [0, 4]);
    let cfg = micro(HeadKind::Fcn, SicLoss::Mse);
    let (_, m) = model(DType::F32, &cfg, 3);
    let (h, w, crop) = (32, 48, 16);
    let inputs = values(&random(&[2, h, w], 4, 1.5, DType::F32));
    let mut scene = SceneLevel {
        scene: "s".into(),
        level: Level::new(200).unwrap(),
        height: h,
        width: w,
        channels: 2,
        inputs: inputs.iter().map(|&v| v as f32).collect(),
        valid: vec![1; h * w],
        labels: vec![IGNORE; 3 * h * w],
    };
    let opts = InferOptions {
        level: scene.level,
        crop,
        stride: crop,
        batch: 4,
        blend: Blend::Mean,
        progress: None,
    };
    let maps = predict_level(&m, &scene, &opts, &Device::Cpu).unwrap();
    assert_eq!(maps.windows, 6);
    // Told as it goes: after each batch and each row of window positions, up to all 6.
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = told.clone();
    let watched = InferOptions {
        progress: Some(icefm_model::evaluate::WindowProgress(std::sync::Arc::new(
            move |done, of| sink.lock().unwrap().push((done, of)),
        ))),
        ..opts.clone()
    };
    assert_eq!(
        predict_level(&m, &scene, &watched, &Device::Cpu).unwrap(),
        maps
    );
    let told = told.lock().unwrap().clone();
    assert!(told.iter().all(|&(_, of)| of == 6), "{told:?}");
    assert!(told.windows(2).all(|p| p[0].0 <= p[1].0), "{told:?}");
    assert_eq!(told.last(), Some(&(6, 6)));
    // Each window on its own.
    for (wy, wx) in [(0, 0), (16, 32), (0, 16)] {
        let mut tile = vec![0f32; 2 * crop * crop];
        for c in 0..2 {
            for y in 0..crop {
                for x in 0..crop {
                    tile[(c * crop + y) * crop + x] = scene.inputs[(c * h + wy + y) * w + wx + x];
                }
            }
        }
        let t = Tensor::from_vec(tile, (1, 2, crop, crop), &Device::Cpu).unwrap();
        for (task, y) in m.forward(&t, None).unwrap() {
            let k = cfg.outputs(task);
            let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for y in 0..crop {
                for x in 0..crop {
                    let px = &v[(y * crop + x) * k..(y * crop + x + 1) * k];
                    assert_eq!(
                        maps.maps[task.channel()][(wy + y) * w + wx + x],
                        class_of(px, task),
                        "{task:?} at ({}, {})",
                        wy + y,
                        wx + x
                    );
                }
            }
        }
    }
    // Overlapping windows blend every pixel; a window without valid SAR is skipped.
    for y in 16..32 {
        for x in 32..48 {
            scene.valid[y * w + x] = 0;
        }
    }
    let o = InferOptions {
        stride: 8,
        blend: Blend::Taper,
        ..opts
    };
    let maps = predict_level(&m, &scene, &o, &Device::Cpu).unwrap();
    // Starts 0, 8, 16 down and 0, 8, …, 32 across: 15 windows, less the one at (16, 32).
    assert_eq!(maps.windows, 14);
    // Only that window covered rows 24-31 of columns 40-47: no prediction there.
    for t in Task::ALL {
        for y in 0..h {
            for x in 0..w {
                let c = maps.maps[t.channel()][y * w + x];
                if y >= 24 && x >= 40 {
                    assert_eq!(c, IGNORE, "{t:?} ({y}, {x})");
                } else {
                    assert!((c as usize) < t.n_classes(), "{t:?} ({y}, {x}): {c}");
                }
            }
        }
    }
}

#[test]
fn nearest_upsampling_maps_80m_pixels_into_their_coarse_cells() {
    let map = [1u8, 2, 3, 4];
    let up = upsample_nearest(
        &map,
        (2, 2),
        Level::new(200).unwrap(),
        (5, 5),
        Level::new(80).unwrap(),
    );
    // Rows and columns 0-2 of the 80 m grid lie in coarse cell 0 (0, 80, 160 m < 200 m).
    let row = |a: u8, b: u8| [a, a, a, b, b];
    let want: Vec<u8> = [row(1, 2); 3]
        .into_iter()
        .chain([row(3, 4); 2])
        .flatten()
        .collect();
    assert_eq!(up, want);
}

#[test]
fn a_resumed_fine_tuning_equals_an_uninterrupted_one_and_keeps_the_best() {
    let store = store();
    let cfg = TrainConfig::parse(CONFIG, &[]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let quiet = |_: &StepRecord| {};
    let opts = |name: &str, resume| RunOptions {
        device: Device::Cpu,
        store: store.to_path_buf(),
        out: tmp.path().join(name),
        resume,
    };
    let full = train_seg(&cfg, &opts("a", false), &never, &quiet, &|_| {}).unwrap();
    assert_eq!(full.steps_done, 6);
    for r in &full.records {
        assert!(r.loss.is_finite() && r.loss > 0.0);
        for t in ["loss_SIC", "loss_SOD", "loss_FLOE"] {
            assert!(r.value(t).is_some_and(f32::is_finite), "{t}");
        }
    }
    let steps: Vec<u64> = full.validation.iter().map(|v| v.step).collect();
    assert_eq!(steps, [3, 6]);
    for v in &full.validation {
        assert!(v.combined.is_finite() && v.combined <= 100.0, "{v:?}");
        assert!((v.score - v.combined).abs() < 1e-9, "{v:?}");
    }
    assert_eq!(
        read_validation(&tmp.path().join("a/validation.parquet")).unwrap(),
        full.validation
    );
    let best = full
        .validation
        .iter()
        .max_by(|a, b| a.score.total_cmp(&b.score))
        .unwrap();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("a/checkpoints/best/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], best.step);

    let stop = AtomicBool::new(false);
    let part = train_seg(
        &cfg,
        &opts("b", false),
        &stop,
        &|r| {
            if r.step == 2 {
                stop.store(true, Ordering::SeqCst);
            }
        },
        &|_| {},
    )
    .unwrap();
    assert_eq!((part.steps_done, part.interrupted), (3, true));
    // As if stopped between step 3's checkpoint and saving its best (the first validation's):
    // the resume scores step 3's weights again and saves them as the best.
    let b_best = tmp.path().join("b/checkpoints/best");
    let first_best = std::fs::read(b_best.join("model.safetensors")).unwrap();
    std::fs::remove_dir_all(&b_best).unwrap();
    let rest = train_seg(&cfg, &opts("b", true), &never, &quiet, &|_| {}).unwrap();
    let log = std::fs::read_to_string(tmp.path().join("b/log.txt")).unwrap();
    assert!(
        log.contains("step 3: best score") && log.contains("saved again"),
        "{log}"
    );
    let a_best = |f: &str| std::fs::read(tmp.path().join("a/checkpoints/best").join(f)).unwrap();
    assert_eq!(
        std::fs::read(b_best.join("model.safetensors")).unwrap(),
        a_best("model.safetensors")
    );
    assert_eq!(
        std::fs::read(b_best.join("state.json")).unwrap(),
        a_best("state.json")
    );
    if best.step == 3 {
        assert_eq!(first_best, a_best("model.safetensors"));
    }
    let losses = |r: &[StepRecord]| r.iter().map(|r| r.loss).collect::<Vec<_>>();
    assert_eq!(losses(&rest.records), losses(&full.records));
    assert_eq!(rest.validation, {
        let mut v = full.validation.clone();
        for (a, b) in v.iter_mut().zip(&rest.validation) {
            a.seconds = b.seconds;
        }
        v
    });
    let last = |run: &str| {
        std::fs::read(
            checkpoints(&tmp.path().join(run))
                .last()
                .unwrap()
                .1
                .join("model.safetensors"),
        )
        .unwrap()
    };
    assert_eq!(last("a"), last("b"));
}

/// A run that saved a best before its first step checkpoint and then stopped (its best at step
/// 3, its first checkpoint due at 6) is resumed by starting over, which gives the same best
/// again; a new run into that folder is still refused.
#[test]
fn a_best_without_a_step_checkpoint_is_started_over_by_a_resume() {
    let cfg = TrainConfig::parse(CONFIG, &["train.checkpoint_every=6".into()]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let opts = |resume| RunOptions {
        device: Device::Cpu,
        store: store().to_path_buf(),
        out: tmp.path().join("c"),
        resume,
    };
    train_seg(&cfg, &opts(false), &never, &|_| {}, &|_| {}).unwrap();
    let best = tmp.path().join("c/checkpoints/best");
    let want = std::fs::read(best.join("state.json")).unwrap();
    for (_, dir) in checkpoints(&tmp.path().join("c")) {
        std::fs::remove_dir_all(dir).unwrap();
    }
    let e = train_seg(&cfg, &opts(false), &never, &|_| {}, &|_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("holds the best checkpoint of an earlier training"),
        "{e}"
    );
    let again = train_seg(&cfg, &opts(true), &never, &|_| {}, &|_| {}).unwrap();
    assert_eq!((again.steps_done, again.steps_run), (6, 6));
    assert_eq!(std::fs::read(best.join("state.json")).unwrap(), want);
    let log = std::fs::read_to_string(tmp.path().join("c/log.txt")).unwrap();
    assert!(
        log.contains(
            "holds no step checkpoint; training starts at step 0, and its checkpoints/best"
        ),
        "{log}"
    );
}

#[test]
fn fine_tuning_starts_from_the_mae_encoder_it_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let mae = mae_weights(2, 77);
    let file = tmp.path().join("mae.safetensors");
    candle_core::safetensors::save(&mae, &file).unwrap();
    // A step with learning rate 0 changes nothing: the checkpoint holds the initial weights.
    let out = tmp.path().join("run");
    fine_tune(
        &[
            format!("seg.init=\"{}\"", file.display()),
            "seg.val_regime=\"\"".into(),
            "train.steps=1".into(),
            "train.lr=0".into(),
        ],
        &out,
    );
    let saved = candle_core::safetensors::load(
        checkpoints(&out)
            .last()
            .unwrap()
            .1
            .join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut n = 0;
    for (k, t) in &saved {
        if k.starts_with("encoder.") {
            assert_eq!(max_rel(t, &mae[k]), 0.0, "{k}");
            n += 1;
        }
    }
    assert_eq!(n, mae.keys().filter(|k| k.starts_with("encoder.")).count());
    assert!(saved.contains_key("encoder.patch_embed.weight"));
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert!(
        log.contains(&format!("{n} tensors from {}", file.display())),
        "{log}"
    );
    // An encoder of another depth is refused before a run folder is made for it.
    let deeper = tmp.path().join("deeper.safetensors");
    candle_core::safetensors::save(&mae_weights(3, 77), &deeper).unwrap();
    let cfg = TrainConfig::parse(
        CONFIG,
        &[
            format!("seg.init=\"{}\"", deeper.display()),
            "train.steps=1".into(),
        ],
    )
    .unwrap();
    let refused = tmp.path().join("refused");
    let opts = RunOptions {
        device: Device::Cpu,
        store: store().to_path_buf(),
        out: refused.clone(),
        resume: false,
    };
    let Err(e) = train_seg(&cfg, &opts, &AtomicBool::new(false), &|_| {}, &|_| {}) else {
        panic!("a deeper encoder must be refused");
    };
    let e = e.to_string();
    assert!(e.contains("its encoder has 3 blocks, the model 2"), "{e}");
    assert!(!refused.exists(), "a run that cannot start made its folder");
}

#[test]
fn a_scene_level_reads_as_the_loader_normalises_it() {
    let store = store();
    let reader = SceneReader::open(store, &["HH".into(), "HV".into()]).unwrap();
    let scenes = reader.scenes(None).unwrap();
    assert_eq!(scenes.len(), 3);
    let level = Level::new(80).unwrap();
    let s = reader.read(&scenes[0], level).unwrap();
    assert_eq!((s.height, s.width, s.channels), (200, 240, 2));
    let (raw, shape) = reader
        .read_f32(&scenes[0], level, icefm_dataset::store::ArrayKind::Sar)
        .unwrap();
    assert_eq!(shape, [2, 200, 240]);
    let (labels, size) = reader.read_labels(&scenes[0], level).unwrap();
    assert_eq!((labels.len(), size), (3 * 200 * 240, (200, 240)));
    assert_eq!(labels, s.labels);
    let plane = 200 * 240;
    for c in 0..2 {
        let name = ["HH", "HV"][c];
        let (mean, std) = icefm_dataset::store::StoreReader::open(store)
            .unwrap()
            .mean_std(name)
            .unwrap();
        for i in (0..plane).step_by(97) {
            let x = raw[c * plane + i];
            let want = if x.is_finite() { (x - mean) / std } else { 0.0 };
            assert!((s.inputs[c * plane + i] - want).abs() < 1e-5);
        }
    }
    assert!(s.valid.iter().all(|&v| v <= 1) && s.valid.contains(&1));
}

#[test]
fn a_frozen_encoder_stays_as_initialised_while_the_heads_train() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("probe");
    fine_tune(
        &[
            "seg.freeze_encoder=true".into(),
            "seg.val_regime=\"\"".into(),
            "train.steps=2".into(),
            "train.checkpoint_every=1".into(),
        ],
        &out,
    );
    let load = |step: u64| {
        let dir = checkpoints(&out)
            .into_iter()
            .find(|(s, _)| *s == step)
            .unwrap()
            .1;
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(1), load(2));
    let (mut frozen, mut moved) = (0, 0);
    for (k, t) in &a {
        let same = max_rel(t, &b[k]) == 0.0;
        if k.starts_with("encoder.") {
            assert!(same, "{k} moved");
            frozen += 1;
        } else if !same {
            moved += 1;
        }
    }
    assert!(frozen > 10 && moved > 10, "{frozen} frozen, {moved} moved");
    // The optimizer holds moments for the trained tensors only.
    let moments = candle_core::safetensors::load(
        checkpoints(&out)
            .last()
            .unwrap()
            .1
            .join("optimizer.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(moments.keys().all(|k| !k.starts_with("encoder.")));
}

#[test]
fn raw_windows_normalised_and_turned_by_the_op_equal_the_loaders_batches() {
    use icefm_dataset::{Augment, Loader, LoaderOptions};
    use icefm_model::fused::normalise_augment;
    let opts = |raw_inputs| LoaderOptions {
        levels: vec![
            (Level::new(80).unwrap(), 1.0),
            (Level::new(160).unwrap(), 1.0),
        ],
        crop: 48,
        batch_size: 8,
        seed: 5,
        augment: Augment {
            flips: true,
            rot90: true,
            jitter: 24,
        },
        min_valid: 0.2,
        threads: 2,
        raw_inputs,
        ..LoaderOptions::default()
    };
    let host = Loader::open(store(), None, opts(false)).unwrap();
    let raw = Loader::open(store(), None, opts(true)).unwrap();
    let (mean, inv): (Vec<f32>, Vec<f32>) = raw.channel_norms().into_iter().unzip();
    let mut turned = 0;
    for index in 0..4 {
        let (h, r) = (host.batch(index).unwrap(), raw.batch(index).unwrap());
        assert_eq!(h.samples, r.samples);
        assert_eq!(h.labels, r.labels);
        // Raw windows keep NaN (no-data and outside the scene).
        assert!(r.inputs.iter().any(|v| v.is_nan()));
        let (b, n) = (r.len(), r.size);
        let t = Tensor::from_vec(r.inputs.clone(), (b, 2, n, n), &Device::Cpu).unwrap();
        let tf: Vec<_> = r.samples.iter().map(|s| s.transform).collect();
        turned += tf.iter().filter(|t| !t.is_identity()).count();
        let (inputs, valid) = normalise_augment(&t, &mean, &inv, &tf).unwrap();
        let inputs: Vec<f32> = inputs.flatten_all().unwrap().to_vec1().unwrap();
        let valid: Vec<f32> = valid.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(inputs, h.inputs, "batch {index}");
        let host_valid: Vec<f32> = h.valid.iter().map(|&v| f32::from(v)).collect();
        assert_eq!(valid, host_valid, "batch {index}");
    }
    assert!(turned > 8, "{turned} turned samples");
}
