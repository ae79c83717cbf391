//! Segmentation: every parameter of both heads trains and its gradient matches finite
//! differences; resampling matches PyTorch; `--init` sets every encoder weight, the patch
//! embedding included; fine-tuning runs resume exactly and keep the best checkpoint by
//! validation; sliding-window inference equals the model on each window and skips empty ones.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::{SceneLevel, SceneReader};
use icefm_model::config::TrainConfig;
use icefm_model::evaluate::{Blend, InferOptions, predict_level, upsample_nearest, window_starts};
use icefm_model::finetune::{load_init, read_validation, train_seg};
use icefm_model::mae::{Mae, MaeConfig};
use icefm_model::seg::{
    HeadKind, Resample, SegConfig, SegModel, SicLoss, class_of, label_counts, resize, seg_loss,
};
use icefm_model::train::{RunOptions, StepRecord, checkpoints, init_weights, named_vars};
use icefm_schemas::{IGNORE, Level, Task};

mod common;
use common::{check_var, max_rel, random, values};

fn micro(head: HeadKind, sic_loss: SicLoss) -> SegConfig {
    SegConfig {
        encoder: MaeConfig::micro().encoder,
        layers: [0, 0, 1, 1],
        head,
        channels: 8,
        tasks: Task::ALL.to_vec(),
        sic_loss,
        task_weights: [1.0, 3.0, 3.0],
    }
}

fn model(dtype: DType, cfg: &SegConfig, seed: u64) -> (VarMap, SegModel) {
    let vars = VarMap::new();
    let m = SegModel::new(VarBuilder::from_varmap(&vars, dtype, &Device::Cpu), cfg).unwrap();
    init_weights(&vars, seed).unwrap();
    (vars, m)
}

/// Labels `[B, 3, H, W]`: classes of each task, with a band of 255.
fn labels(b: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(b * 3 * h * w);
    for s in 0..b {
        for t in Task::ALL {
            for y in 0..h {
                for x in 0..w {
                    out.push(if y == 3 {
                        IGNORE
                    } else {
                        ((s * 7 + y * 3 + x * 5 + t.channel()) % t.n_classes()) as u8
                    });
                }
            }
        }
    }
    out
}

/// The tensors of a micro MAE with `depth` encoder blocks and seeded weights, by name.
fn mae_weights(depth: usize, seed: u64) -> std::collections::HashMap<String, Tensor> {
    let vars = VarMap::new();
    let mut c = MaeConfig::micro();
    c.encoder.depth = depth;
    Mae::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), &c).unwrap();
    init_weights(&vars, seed).unwrap();
    named_vars(&vars)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// A whole fine-tuning run of [`CONFIG`] with `sets` into `out`.
fn fine_tune(sets: &[String], out: &Path) {
    let cfg = TrainConfig::parse(CONFIG, sets).unwrap();
    let opts = RunOptions {
        device: Device::Cpu,
        store: store().to_path_buf(),
        out: out.to_path_buf(),
        resume: false,
    };
    train_seg(&cfg, &opts, &AtomicBool::new(false), &|_| {}, &|_| {}).unwrap();
}

#[test]
fn every_parameter_of_both_heads_gets_a_finite_nonzero_gradient() {
    for head in [HeadKind::Fcn, HeadKind::UperNet] {
        for sic in [SicLoss::Mse, SicLoss::CrossEntropy] {
            let cfg = micro(head, sic);
            let (vars, m) = model(DType::F32, &cfg, 5);
            let images = random(&[2, 2, 16, 16], 1, 1.0, DType::F32);
            let outs = m.forward(&images, None).unwrap();
            for (t, y) in &outs {
                assert_eq!(y.dims(), &[2, 16, 16, cfg.outputs(*t)], "{head:?} {t:?}");
            }
            let loss = seg_loss(&outs, &labels(2, 16, 16), &cfg).unwrap();
            let parts = loss.parts().unwrap();
            assert_eq!(parts.len(), 3);
            for (t, v, n) in &parts {
                assert!(v.is_finite() && *v > 0.0, "{t:?} loss {v}");
                assert_eq!(*n, 2 * 15 * 16, "{t:?} labelled pixels");
            }
            assert_eq!(label_counts(&labels(2, 16, 16), 16 * 16), [2 * 15 * 16; 3]);
            let grads = loss.total.backward().unwrap();
            let named = named_vars(&vars);
            assert!(named.iter().any(|(n, _)| n.starts_with("heads.floe.")));
            for (name, var) in &named {
                let g = values(
                    grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{head:?}: {name} has no gradient")),
                );
                assert!(g.iter().all(|x| x.is_finite()), "{head:?}: {name}");
                assert!(
                    g.iter().any(|&x| x != 0.0),
                    "{head:?}: {name} zero gradient"
                );
            }
        }
    }
}

#[test]
fn a_batch_without_labels_of_a_task_gives_its_head_zero_gradients() {
    let cfg = micro(HeadKind::Fcn, SicLoss::Mse);
    let (vars, m) = model(DType::F32, &cfg, 6);
    let images = random(&[2, 2, 16, 16], 3, 1.0, DType::F32);
    let mut lab = labels(2, 16, 16);
    let plane = 16 * 16;
    for s in 0..2 {
        let sod = (s * 3 + Task::Sod.channel()) * plane;
        lab[sod..sod + plane].fill(IGNORE);
    }
    let loss = seg_loss(&m.forward(&images, None).unwrap(), &lab, &cfg).unwrap();
    assert_eq!(loss.parts().unwrap()[1], (Task::Sod, 0.0, 0));
    let grads = loss.total.backward().unwrap();
    for (name, var) in named_vars(&vars) {
        let g = values(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient")),
        );
        if name.starts_with("heads.sod.") {
            assert!(g.iter().all(|&x| x == 0.0), "{name}");
        } else {
            assert!(g.iter().all(|x| x.is_finite()), "{name}");
        }
    }
}

#[test]
fn gradients_through_pyramid_and_heads_match_finite_differences() {
    for head in [HeadKind::Fcn, HeadKind::UperNet] {
        let cfg = micro(head, SicLoss::Mse);
        let (vars, m) = model(DType::F64, &cfg, 9);
        let images = random(&[1, 2, 16, 16], 2, 1.0, DType::F64);
        let lab = labels(1, 16, 16);
        let f = || {
            let outs = m.forward(&images, None).unwrap();
            seg_loss(&outs, &lab, &cfg).unwrap().total
        };
        let named = named_vars(&vars);
        let pick = |n: &str| {
            named
                .iter()
                .find(|(k, _)| k == n)
                .unwrap_or_else(|| panic!("no {n}"))
                .1
                .clone()
        };
        let mut names = vec![
            "encoder.patch_embed.weight",
            "neck.up4.0.weight",
            "neck.up4.norm.weight",
            "neck.up2.weight",
        ];
        names.extend(match head {
            HeadKind::Fcn => [
                "heads.sod.lateral.3.weight",
                "heads.sic.norm.bias",
                "heads.floe.cls.weight",
            ],
            HeadKind::UperNet => [
                "heads.sod.ppm.2.conv.weight",
                "heads.sic.fpn.1.conv.weight",
                "heads.floe.fuse.conv.weight",
            ],
        });
        for n in names {
            check_var(&format!("{head:?} {n}"), &pick(n), &f, 8);
        }
    }
}

#[test]
fn resampling_matches_pytorch() {
    let dev = Device::Cpu;
    let line = |v: Vec<f32>, out: usize, kind| {
        let n = v.len();
        // One row `[1, 1, n, 1]`: resized along its columns only.
        let x = Tensor::from_vec(v, (1, 1, n, 1), &dev).unwrap();
        resize(&x, 1, out, kind).unwrap()
    };
    // F.interpolate(torch.arange(4.)[None, None], size=8, mode="linear", align_corners=False)
    let x = Tensor::arange(0f32, 4.0, &dev)
        .unwrap()
        .reshape((1, 1, 4, 1))
        .unwrap();
    let up = values(&resize(&x, 1, 8, Resample::Bilinear).unwrap());
    assert_eq!(up, [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]);
    // … and size=4 from arange(8): the half-pixel centres 0.5, 2.5, 4.5, 6.5.
    let x = Tensor::arange(0f32, 8.0, &dev)
        .unwrap()
        .reshape((1, 1, 8, 1))
        .unwrap();
    assert_eq!(
        values(&resize(&x, 1, 4, Resample::Bilinear).unwrap()),
        [0.5, 2.5, 4.5, 6.5]
    );
    // F.adaptive_avg_pool1d(torch.arange(5.)[None, None], 3): bins [0, 2), [1, 4), [3, 5).
    let p = values(&line(
        (0..5).map(|v| v as f32).collect(),
        3,
        Resample::AreaMean,
    ));
    assert!(max_abs(&p, &[0.5, 2.0, 3.5]) < 1e-6, "{p:?}");
    // Two axes at once: a separable ramp stays the sum of the two 1-D results.
    let ramp: Vec<f32> = (0..16).map(|i| (i / 4 * 10 + i % 4) as f32).collect();
    let x = Tensor::from_vec(ramp, (1, 4, 4, 1), &dev).unwrap();
    let y = values(&resize(&x, 8, 8, Resample::Bilinear).unwrap());
    let r = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
    let want: Vec<f64> = (0..64).map(|i| r[i / 8] * 10.0 + r[i % 8]).collect();
    assert!(max_abs(&y, &want) < 1e-5);
}

#[test]
fn the_3x3_convolution_equals_candles_conv2d_with_its_gradients() {
    // Odd sizes, f64 for exact comparisons; more output than input channels (the gradients
    // through x's columns and col2im), then as many and fewer (through the output gradient's
    // mirrored columns).
    for (c, o) in [(3, 4), (4, 4), (5, 2)] {
        conv3x3_against_conv2d(c, o);
    }
}

fn conv3x3_against_conv2d(c: usize, o: usize) {
    use candle_core::Var;
    let (b, h, w) = (2, 5, 7);
    let x = Var::from_tensor(&random(&[b, h, w, c], 301, 1.0, DType::F64)).unwrap();
    let k = Var::from_tensor(&random(&[o, c, 3, 3], 302, 0.5, DType::F64)).unwrap();
    let bias = Var::from_tensor(&random(&[o], 303, 0.5, DType::F64)).unwrap();
    let probe = random(&[b, h, w, o], 304, 1.0, DType::F64);
    let ours = icefm_model::seg::conv3x3(x.as_tensor(), k.as_tensor(), bias.as_tensor()).unwrap();
    // PyTorch's layout through candle's conv2d: NCHW, weight [O, C, 3, 3], padding 1.
    let theirs = x
        .as_tensor()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap()
        .conv2d(k.as_tensor(), 1, 1, 1, 1)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap()
        .broadcast_add(bias.as_tensor())
        .unwrap();
    assert!(max_rel(&ours, &theirs) < 1e-12);
    // A corner pixel by hand: only the kernel's lower-right 2 × 2 taps see the image.
    let (xv, kv, bv) = (
        values(x.as_tensor()),
        values(k.as_tensor()),
        values(bias.as_tensor()),
    );
    let mut want = bv[1];
    for ci in 0..c {
        for (dy, dx) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            let px = ((dy - 1) * w + (dx - 1)) * c + ci;
            want += kv[((c + ci) * 3 + dy) * 3 + dx] * xv[px]; // output channel 1
        }
    }
    assert!((values(&ours)[1] - want).abs() < 1e-12);
    let g1 = (ours * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (theirs * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&x, &k, &bias] {
        let (a, b) = (
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(max_rel(a, b) < 1e-12, "{c} → {o} channels: {:?}", v.dims());
    }
}

#[test]
fn im2col_places_each_neighbour_and_its_adjoint_sums_them_back() {
    use icefm_model::seg::Im2col3;
    // A 3 × 4 map, 2 channels: value = 100·y + 10·x + c.
    let (h, w, c) = (3usize, 4usize, 2usize);
    let v: Vec<f64> = (0..h * w * c)
        .map(|i| (100 * (i / (w * c)) + 10 * ((i / c) % w) + i % c) as f64)
        .collect();
    let x = Tensor::from_vec(v, (1, h, w, c), &Device::Cpu).unwrap();
    let cols = values(&x.apply_op1_no_bwd(&Im2col3::COLUMNS).unwrap());
    let at = |y: usize, xx: usize, tap: usize, ch: usize| cols[((y * w + xx) * 9 + tap) * c + ch];
    // Pixel (1, 2): tap (dy, dx) reads (y + dy − 1, x + dx − 1).
    assert_eq!(at(1, 2, 0, 1), 11.0);
    assert_eq!(at(1, 2, 4, 0), 120.0);
    assert_eq!(at(1, 2, 8, 1), 231.0);
    // The corner (0, 0) sees zeros above and left.
    assert_eq!(at(0, 0, 0, 0), 0.0);
    assert_eq!(at(0, 0, 2, 0), 0.0);
    assert_eq!(at(0, 0, 8, 1), 111.0);
    // Mirrored: tap (dy, dx) reads (y − dy + 1, x − dx + 1), so the corner sees (1, 1) at tap 0.
    let mirrored = values(&x.apply_op1_no_bwd(&Im2col3::MIRRORED).unwrap());
    let at_m =
        |y: usize, xx: usize, tap: usize, ch: usize| mirrored[((y * w + xx) * 9 + tap) * c + ch];
    assert_eq!(at_m(1, 2, 0, 1), 231.0);
    assert_eq!(at_m(1, 2, 4, 0), 120.0);
    assert_eq!(at_m(1, 2, 8, 1), 11.0);
    assert_eq!(at_m(0, 0, 0, 1), 111.0);
    assert_eq!(at_m(0, 0, 8, 0), 0.0);
    assert!(
        x.apply_op1_no_bwd(&Im2col3 {
            adjoint: true,
            mirrored: true
        })
        .is_err()
    );
    // Adjoint of ones: each pixel counts the neighbourhoods it is in (4 in a corner, 9 inside).
    let ones = Tensor::ones((1, h, w, 9 * c), DType::F64, &Device::Cpu).unwrap();
    let back = values(&ones.apply_op1_no_bwd(&Im2col3::ADJOINT).unwrap());
    assert_eq!(back[0], 4.0);
    assert_eq!(back[(w + 1) * c], 9.0);
    assert_eq!(back[c], 6.0);
}

#[test]
fn the_loss_is_mse_on_sic_and_cross_entropy_elsewhere_over_labelled_pixels() {
    let dev = Device::Cpu;
    let cfg = micro(HeadKind::Fcn, SicLoss::Mse);
    let sic = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (1, 2, 2, 1), &dev).unwrap();
    let logits: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
    let sod = Tensor::from_vec(logits.clone(), (1, 2, 2, 6), &dev).unwrap();
    let floe = Tensor::zeros((1, 2, 2, 7), DType::F32, &dev).unwrap();
    // [B = 1, 3, 2, 2]: SIC 0, ignored, 3, 10; SOD 5, 0, ignored, 2; FLOE all ignored.
    let mut lab = vec![0u8, IGNORE, 3, 10, 5, 0, IGNORE, 2];
    lab.extend([IGNORE; 4]);
    let outs = vec![
        (Task::Sic, sic),
        (Task::Sod, sod.clone()),
        (Task::Floe, floe),
    ];
    let loss = seg_loss(&outs, &lab, &cfg).unwrap();
    let mse = (1.0 + 0.0 + 36.0) / 3.0;
    let ce = [(0usize, 5usize), (1, 0), (3, 2)]
        .iter()
        .map(|&(px, class)| {
            let row: Vec<f64> = logits[px * 6..][..6]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            lse - row[class]
        })
        .sum::<f64>()
        / 3.0;
    let parts: Vec<(Task, f64, usize)> = loss
        .parts()
        .unwrap()
        .iter()
        .map(|&(t, v, n)| (t, f64::from(v), n))
        .collect();
    assert_eq!(parts[0].0, Task::Sic);
    assert!((parts[0].1 - mse).abs() < 1e-5 && parts[0].2 == 3);
    assert!((parts[1].1 - ce).abs() < 1e-5 && parts[1].2 == 3);
    assert_eq!((parts[2].1, parts[2].2), (0.0, 0));
    let total = f64::from(loss.total.to_scalar::<f32>().unwrap());
    assert!((total - (mse + 3.0 * ce)).abs() < 1e-4, "{total}");
    // A class beyond the task's is an error naming it.
    lab[4] = 6;
    let outs = vec![(Task::Sod, sod)];
    let err = seg_loss(&outs, &lab, &cfg).unwrap_err().to_string();
    assert!(err.contains("SOD label 6"), "{err}");
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

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
    };
    let maps = predict_level(&m, &scene, &opts, &Device::Cpu).unwrap();
    assert_eq!(maps.windows, 6);
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

fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = common::rtt_store("seg-tests", 3, (200, 240), 31);
        common::write_val_regime(&store, "v", 34.0);
        store
    })
}

const CONFIG: &str = r#"
[model]
preset = "micro"
[seg]
head = "fcn"
channels = 8
val_regime = "v"
val_every = 3
eval_level = "160"
[data]
levels = "80,160"
crop = 32
batch_size = 4
min_valid = 0.3
threads = 2
[train]
steps = 6
lr = 2e-3
warmup_steps = 2
checkpoint_every = 3
keep_last = 5
seed = 4
"#;

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
    let rest = train_seg(&cfg, &opts("b", true), &never, &quiet, &|_| {}).unwrap();
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
