//! The model's gradients, resampling, convolutions and loss.

use super::*;

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
