//! The vendored candle-core's census (`candle_core::census`, vendor/README.md), icefm's count
//! of an MAE step built on it (`icefm_model::census`), and the GPU routes it counts on the CPU
//! (`fused::set_gpu_routes`). One test binary of its own: a census and the routes are
//! process-wide, and other tests' operations would land in it.
#![allow(clippy::unwrap_used, missing_docs)]

use candle_core::census::{self, Entry};
use candle_core::{DType, Device, Tensor, Var};
use common::{max_rel, random};
use icefm_model::census::{Row, extrapolate, mae_step, rows, seg_step};
use icefm_model::fused;
use std::sync::Mutex;

mod common;

/// Censuses are process-wide: the tests take turns.
static TURN: Mutex<()> = Mutex::new(());

fn find<'a>(entries: &'a [Entry], phase: &str, op: &str) -> &'a Entry {
    entries
        .iter()
        .find(|e| e.phase == phase && e.op == op)
        .unwrap_or_else(|| panic!("no {phase} / {op} in {entries:#?}"))
}

#[test]
fn the_census_counts_each_operation_with_its_bytes_and_phase() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let a = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
    let b = Tensor::new(&[10f32, 20.0, 30.0], &dev).unwrap();
    // Nothing is counted before a census opens.
    let _ = (a.as_tensor() * 2.0).unwrap();
    census::start(Some("tests/census.rs"));
    census::phase("forward");
    let sum = a.as_tensor().broadcast_add(&b).unwrap(); // [2, 3] + [3]
    let t = a.as_tensor().t().unwrap().contiguous().unwrap(); // a strided copy
    let p = a.as_tensor().matmul(&t).unwrap(); // [2, 3] · [3, 2]
    let h = sum.to_dtype(DType::BF16).unwrap();
    let loss = (p.sum_all().unwrap() + h.to_dtype(DType::F32).unwrap().sum_all().unwrap()).unwrap();
    census::phase("backward");
    loss.backward().unwrap();
    let entries = census::finish();
    // Closed again: this is not counted.
    let _ = (a.as_tensor() * 2.0).unwrap();
    assert!(census::finish().is_empty());

    let add = find(&entries, "forward", "binary add");
    // The broadcast operand counts once: 6 + 3 values read, 6 written.
    assert_eq!((add.calls, add.bytes_read, add.bytes_written), (1, 36, 24));
    assert_eq!(add.shape, "[2, 3]");
    assert!(add.site.contains("census.rs:"), "{}", add.site);
    let copy = find(&entries, "forward", "copy (strided)");
    assert_eq!(
        (copy.calls, copy.bytes_read, copy.bytes_written),
        (1, 24, 24)
    );
    let mm = find(&entries, "forward", "matmul");
    assert_eq!(
        (mm.calls, mm.flops, mm.bytes_written),
        (1, 2 * 2 * 2 * 3, 16)
    );
    let cast = find(&entries, "forward", "cast f32→bf16");
    assert_eq!((cast.bytes_read, cast.bytes_written), (24, 12));
    // The backward's operations carry the node whose gradient they compute.
    let dmm: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.phase == "backward: matmul" && e.op == "matmul")
        .collect();
    assert_eq!(dmm.iter().map(|e| e.calls).sum::<u64>(), 2, "{entries:#?}");
    find(&entries, "backward: to_dtype", "cast bf16→f32");
    // No operation is lost to the phases: the forward's are all here.
    let forward: u64 = entries
        .iter()
        .filter(|e| e.phase == "forward")
        .map(|e| e.calls)
        .sum();
    assert!(forward >= 7, "{entries:#?}");
}

#[test]
fn an_mae_step_census_extrapolates_exactly_and_takes_the_gpu_routes() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = common::census_mae();
    let dev = Device::Cpu;
    let at = |b| rows(&mae_step(&cfg, 64, b, DType::BF16, &dev, false).unwrap());

    // The flash forward alone differs between the routes below: the other GPU routes (on by
    // default) are off here, and back on at the end.
    fused::set_flash_bwd(false);
    fused::set_lt_bias(false);
    fused::set_bias_gelu_cuda(false);
    fused::set_gpu_routes(true);
    let (two, three, five) = (at(2), at(3), at(5));
    // Batch 5 from batches 2 and 3, and batch 2 back from 3 and 5.
    common::assert_same_census(&extrapolate((2, &two), (3, &three), 5).unwrap(), &five);
    common::assert_same_census(&extrapolate((3, &three), (5, &five), 2).unwrap(), &two);
    // The GPU's path: the flash kernel's op for both attentions, with its products declared.
    let flash = three
        .iter()
        .find(|r| r.op == "custom icefm-flash-attention")
        .unwrap();
    assert_eq!(flash.calls, 2.0);
    // 2 products of N² · hd per head: encoder 5 tokens (4 kept + cls) × 3 heads of 64,
    // decoder 17 tokens × 2 heads of 32, 3 images.
    let want = 3.0 * 2.0 * 2.0 * (3.0 * 25.0 * 64.0 + 2.0 * 289.0 * 32.0);
    assert_eq!(flash.flops, want);

    fused::set_gpu_routes(false);
    let cpu = at(3);
    assert!(cpu.iter().all(|r| !r.op.contains("flash")));
    // The CPU route's forward materialises the scores over tokens padded to multiples of 8
    // (5 → 8, 17 → 24): its 2 products per head are that much larger; the rest is the same
    // (the backward, without ICEFM_FLASH_BWD, pads on both routes).
    let mm = |rs: &[Row]| -> f64 { rs.iter().map(|r| r.flops).sum() };
    let padding = 3.0 * 2.0 * 2.0 * (3.0 * (64.0 - 25.0) * 64.0 + 2.0 * (576.0 - 289.0) * 32.0);
    assert_eq!(mm(&cpu) - mm(&three), padding);
    // Two batch sizes are needed.
    assert!(extrapolate((3, &three), (3, &three), 4).is_err());
    // Different graphs are refused.
    assert!(extrapolate((2, &two), (3, &cpu), 4).is_err());
    fused::set_flash_bwd(true);
    fused::set_lt_bias(true);
    fused::set_bias_gelu_cuda(true);
}

#[test]
fn the_flash_node_on_gpu_routes_equals_the_composed_attention_with_gradients() {
    // bf16 with heads 32 and 64 wide: the GPU's path, the flash kernel as the attention node's
    // forward (no result copied into the graph), run through its CPU reference.
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    fused::set_gpu_routes(true);
    for flash_bwd in [false, true] {
        fused::set_flash_bwd(flash_bwd);
        for (b, n, heads, hd, seed) in [(2, 13, 2, 32, 71), (1, 70, 1, 64, 72)] {
            let x = random(&[b, n, 3 * heads * hd], seed, 1.5, DType::F64);
            let probe = random(&[b, n, heads * hd], seed + 1, 1.0, DType::F64);
            let run = |dtype: DType, node: bool| {
                let qkv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
                census::start(None);
                let y = if node {
                    fused::attention(qkv.as_tensor(), heads).unwrap()
                } else {
                    fused::attention_reference(qkv.as_tensor(), heads).unwrap()
                };
                let ops = census::finish();
                let p = probe.to_dtype(dtype).unwrap();
                let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                let g = g
                    .get(qkv.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap();
                (y.to_dtype(DType::F64).unwrap(), g, ops)
            };
            let (yr, gr, _) = run(DType::F64, false);
            let (yf, gf, ops) = run(DType::BF16, true);
            // One operation in the forward: the flash node itself, nothing copied after it.
            assert_eq!(ops.len(), 1, "{ops:#?}");
            assert_eq!(ops[0].op, "custom icefm-flash-attention");
            // bf16 inputs and outputs (the reference rounds once, the kernel's inputs too).
            // Measured: forward 3.1–3.4e-3, dqkv 3.6–6.1e-3.
            assert!(
                max_rel(&yf, &yr) < 6e-3,
                "forward n = {n}: {}",
                max_rel(&yf, &yr)
            );
            assert!(
                max_rel(&gf, &gr) < 1.2e-2,
                "dqkv n = {n}, flash backward {flash_bwd}: {}",
                max_rel(&gf, &gr)
            );
        }
    }
    fused::set_flash_bwd(true);
    fused::set_gpu_routes(false);
}

#[test]
fn a_fine_tuning_step_census_extrapolates_exactly() {
    // The UPerNet step's sizes are affine in the batch too, so examples/census.rs may count it
    // at batches 2 and 3 for any other.
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut encoder = icefm_model::vit::VitConfig::preset("tiny").unwrap();
    encoder.depth = 4;
    let cfg = icefm_model::seg::SegConfig {
        channels: 32,
        ..icefm_model::seg::SegConfig::sar_icefm(encoder)
    };
    let at = |b| rows(&seg_step(&cfg, 32, b, DType::F32, &Device::Cpu, false).unwrap());
    let (two, three, four) = (at(2), at(3), at(4));
    common::assert_same_census(&extrapolate((2, &two), (3, &three), 4).unwrap(), &four);
    // Three UPerNet heads of five 3 × 3 convolutions each (three pyramid levels, the pooling
    // module's and the fusion's): one im2col forward and a graph node each, and in the
    // backward one mirrored im2col of the output gradient each (none has more channels out
    // than in).
    let calls = |phase: &str, op: &str| -> f64 {
        four.iter()
            .filter(|r| r.phase == phase && r.op == op)
            .map(|r| r.calls)
            .sum()
    };
    assert_eq!(calls("forward", "custom icefm-im2col3"), 15.0);
    assert_eq!(calls("forward", "custom icefm-conv3x3"), 15.0);
    assert_eq!(
        calls("backward: icefm-conv3x3", "custom icefm-im2col3"),
        15.0
    );
    // With its labels staged, as the fine-tuning loop stages them, the step copies nothing
    // between host and device (the classes and resampling matrices are made once and kept).
    let copies: Vec<&Row> = four
        .iter()
        .filter(|r| r.op == "upload" || r.op == "read back")
        .collect();
    assert!(copies.is_empty(), "{copies:#?}");
}

#[test]
fn a_product_with_a_constant_differentiates_only_the_variable() {
    // The vendored backward skips the gradient of an operand that needs none (vendor/README.md).
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let x = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
    let m = Tensor::new(&[[1f32, 0.0], [0.0, 2.0], [1.0, 1.0]], &dev).unwrap();
    let probe = Tensor::new(&[[1f32, -1.0], [2.0, 0.5]], &dev).unwrap();
    let loss = (x.as_tensor().matmul(&m).unwrap() * &probe)
        .unwrap()
        .sum_all()
        .unwrap();
    census::start(None);
    let grads = loss.backward().unwrap();
    let entries = census::finish();
    let products: u64 = entries
        .iter()
        .filter(|e| e.op == "matmul")
        .map(|e| e.calls)
        .sum();
    assert_eq!(products, 1, "{entries:#?}");
    // d/dx = probe · mᵀ.
    let gx = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(gx, [[1.0, -2.0, 0.0], [2.0, 1.0, 2.5]]);
    assert!(grads.get(&m).is_none());
}

/// A resize makes its two resampling matrices once per shape, device and dtype: a second
/// resize of the same shapes counts its two products only (each had a cast of its matrix, and
/// on a GPU a copy from the host that waits for the queue).
#[test]
fn resizing_again_reuses_its_resampling_matrices() {
    use icefm_model::seg::{Resample, resize};
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    // Sizes no other test resizes between (the matrices are kept for the process).
    let x = random(&[2, 7, 5, 3], 1, 1.0, DType::BF16);
    let count = || {
        census::start(None);
        let y = resize(&x, 11, 13, Resample::Bilinear).unwrap();
        let entries = census::finish();
        (y, entries)
    };
    let (first, entries) = count();
    let casts = |e: &[Entry]| e.iter().filter(|e| e.op.starts_with("cast")).count();
    let products = |e: &[Entry]| {
        e.iter()
            .filter(|e| e.op == "matmul")
            .map(|e| e.calls)
            .sum::<u64>()
    };
    // Other tests may have made these matrices already; at most the two casts the first time.
    assert!(casts(&entries) <= 2, "{entries:#?}");
    assert_eq!(products(&entries), 2);
    let (again, entries) = count();
    assert_eq!(casts(&entries), 0, "{entries:#?}");
    assert!(entries.iter().all(|e| e.op != "upload"), "{entries:#?}");
    assert_eq!(products(&entries), 2);
    assert_eq!(max_rel(&first, &again), 0.0);
    // Another shape makes its own.
    census::start(None);
    let other = resize(&x, 4, 2, Resample::AreaMean).unwrap();
    let entries = census::finish();
    assert_eq!(other.dims(), [2, 4, 2, 3]);
    assert_eq!(casts(&entries), 2, "{entries:#?}");
}

/// The sin-cos position embeddings are made once per grid, width, dtype and device: asked for
/// again, no cast (nor, on a GPU, a copy from the host), and the same values.
#[test]
fn position_embeddings_are_made_once() {
    use icefm_model::vit::{sincos_2d, sincos_on};
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let take = || {
        census::start(None);
        let t = sincos_on(5, 7, 24, DType::BF16, &Device::Cpu).unwrap();
        (t, census::finish())
    };
    let (first, entries) = take();
    // Made here (unless another test made them first): one copy from the host, one cast.
    let mut ops: Vec<(&str, u64)> = entries
        .iter()
        .map(|e| (e.op.as_str(), e.bytes_written))
        .collect();
    ops.sort();
    assert!(
        ops.is_empty() || ops == [("cast f32→bf16", 35 * 24 * 2), ("upload", 35 * 24 * 4)],
        "{entries:#?}"
    );
    let (again, entries) = take();
    assert!(entries.is_empty(), "{entries:#?}");
    assert_eq!(max_rel(&first, &again), 0.0);
    assert_eq!(first.dims(), [1, 35, 24]);
    let want = Tensor::from_vec(sincos_2d(5, 7, 24), (1, 35, 24), &Device::Cpu).unwrap();
    assert!(max_rel(&first, &want) < 1e-2);
}

/// A training step must not make the host wait for the device: no read back and no copy from
/// the host inside its forward and backward passes, once the masking's indices are staged on
/// the device (as `icefm train` does through page-locked memory on a GPU). Without staging,
/// the indices are the one copy, in one piece.
#[test]
fn an_mae_step_copies_nothing_between_host_and_device_once_its_masking_is_staged() {
    use icefm_model::mae::{Mae, Masking};
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = common::census_mae();
    let dev = Device::Cpu;
    let (b, px) = (3usize, 64usize);
    let vars = candle_nn::VarMap::new();
    let mut mae = Mae::new(
        candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &dev),
        &cfg,
    )
    .unwrap();
    mae.compute_dtype = DType::BF16;
    let images = random(&[b, 2, px, px], 5, 1.0, DType::F32);
    let valid = Tensor::ones((b, px, px), DType::F32, &dev).unwrap();
    let n = (px / 16).pow(2);
    let noise: Vec<Vec<f32>> = (0..b)
        .map(|s| {
            (0..n)
                .map(|t| ((t * 37 + s * 11) % 97) as f32 / 97.0)
                .collect()
        })
        .collect();
    let masking = Masking::from_noise(&noise, cfg.mask_ratio);
    let k = masking.ids_keep[0].len();
    // The steady state: what the first step makes and keeps (position embeddings) is made.
    mae.forward(&images, &valid, &masking, None).unwrap();
    let transfers = |masking: &Masking| -> Vec<Entry> {
        let entries = icefm_model::census::count(false, || {
            Ok(mae.forward(&images, &valid, masking, None)?.loss)
        })
        .unwrap();
        entries
            .into_iter()
            .filter(|e| e.op == "upload" || e.op == "read back")
            .collect()
    };
    for gpu_routes in [true, false] {
        fused::set_flash_bwd(gpu_routes);
        fused::set_gpu_routes(gpu_routes);
        let packed = masking.packed();
        assert_eq!(packed.len(), b * (k + 2 * n));
        let staged = masking
            .clone()
            .staged(Tensor::from_vec(packed, b * (k + 2 * n), &dev).unwrap())
            .unwrap();
        let none = transfers(&staged);
        let one = transfers(&masking);
        fused::set_gpu_routes(false);
        fused::set_flash_bwd(false);
        assert!(none.is_empty(), "gpu routes {gpu_routes}: {none:#?}");
        assert_eq!(one.len(), 1, "gpu routes {gpu_routes}: {one:#?}");
        assert_eq!(
            (one[0].op.as_str(), one[0].calls, one[0].bytes_written),
            ("upload", 1, (4 * b * (k + 2 * n)) as u64)
        );
    }
    // A staged copy of another masking's size is refused.
    let short = Tensor::from_vec(vec![0u32; 5], 5, &dev).unwrap();
    assert!(masking.clone().staged(short).is_err());
}

/// Stochastic depth's scales staged on the device give the forward pass the host draws'
/// values, and no copy from the host; from the host draws each block with a rate copies two.
#[test]
fn staged_drop_path_scales_copy_nothing_and_scale_as_the_host_draws() {
    use icefm_model::ops::Draws;
    use icefm_model::vit::{Vit, VitConfig};
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let mut cfg = VitConfig::preset("tiny").unwrap();
    cfg.depth = 2;
    cfg.drop_path = 0.5; // linear over the blocks: 0 for the first, 0.5 for the second
    let vars = candle_nn::VarMap::new();
    let vit = Vit::new(
        candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &dev),
        &cfg,
    )
    .unwrap();
    let draws = Draws::new(vec![(vec![0.1, 0.9, 0.6], vec![0.7, 0.2, 0.55]); 2]);
    let scales = vit.drop_scales(&draws);
    assert_eq!(
        scales,
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 2.0]
    );
    let staged = draws
        .clone()
        .staged(Tensor::from_vec(scales, (2, 2, 3), &dev).unwrap())
        .unwrap();
    let tokens = random(&[3, 4, cfg.dim], 9, 1.0, DType::F32);
    let run = |d: &Draws| {
        census::start(None);
        let y = vit.encode(&tokens, Some(d)).unwrap();
        let uploads = census::finish()
            .iter()
            .filter(|e| e.op == "upload")
            .map(|e| e.calls)
            .sum::<u64>();
        (y, uploads)
    };
    let (from_host, host_copies) = run(&draws);
    let (from_staged, staged_copies) = run(&staged);
    assert_eq!((host_copies, staged_copies), (2, 0));
    assert_eq!(max_rel(&from_host, &from_staged), 0.0);
    // In the second block the first sample's attention branch and the second's MLP branch
    // are dropped: the result differs from a run without stochastic depth.
    let plain = vit.encode(&tokens, None).unwrap();
    assert!(max_rel(&from_host, &plain) > 1e-3);
    // Scales of another shape are refused.
    let wrong = Tensor::zeros((2, 2, 4), DType::F32, &dev).unwrap();
    assert!(draws.staged(wrong).is_err());
}
