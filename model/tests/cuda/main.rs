//! icefm's CUDA kernels against their CPU references (feature `cuda`; needs a GPU, so CI does
//! not run these: scripts/gpu-check.sh does). Random seeded inputs; values and gradients of the
//! fused layer norm and softmax (f32 and bf16), the fused AdamW step against the composed one,
//! a whole micro MAE's loss and gradients on the GPU against the CPU, the page-locked
//! uploaders and queued readbacks, clipping on the device against clipping on the host, and a
//! step's census on the GPU against the CPU's. Run them on one thread
//! (`--test-threads=1`): the AdamW test switches fusion off and on for the whole process, and a
//! census counts every thread's operations.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use icefm_dataset::rng::Rng;
use icefm_model::mae::{Mae, MaeConfig, Masking};
use icefm_model::optim::{AdamW, AdamWConfig};
use icefm_model::train::{init_weights, named_vars};
use icefm_model::{fused, ops};

#[path = "../common/mod.rs"]
mod common;
mod kernels;

use common::{max_rel, values as host};

fn gpu() -> Device {
    icefm_model::cuda::device(0).expect("a CUDA device")
}

/// A seeded f32 tensor on the CPU.
fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    common::random(shape, seed, scale, DType::F32)
}

/// NCCL, as data-parallel training uses it ([`icefm_model::dist`]), with the one rank a
/// one-GPU machine can hold (NCCL refuses two ranks on one device): a unique id, a
/// communicator on candle's stream, and a sum that returns each value as it was.
#[test]
fn nccl_sums_on_the_device_with_one_rank() {
    use icefm_model::cuda::Nccl;
    assert!(
        Nccl::available(),
        "libnccl.so.2 is not on the library path (scripts/gpu-env.sh adds PyTorch's)"
    );
    let Device::Cuda(cd) = gpu() else {
        unreachable!()
    };
    let id = Nccl::unique_id().unwrap();
    assert_eq!(id.len(), 128);
    let nccl = Nccl::new(&cd, 0, 1, &id).unwrap();
    let x = random(&[3, 1001], 7, 2.0);
    let on = x.to_device(&gpu()).unwrap();
    // A view off its storage's start, as the gradients' flat buffer may be.
    let sum = nccl.sum(&on.narrow(0, 1, 2).unwrap()).unwrap();
    assert_eq!(sum.dims(), &[2, 1001]);
    assert_eq!(host(&sum), host(&x.narrow(0, 1, 2).unwrap()));
}

/// A micro MAE on `dev` with seeded weights, its loss and named gradients for one batch.
fn micro_grads(dev: &Device, dtype: DType) -> (f32, Vec<(String, Vec<f64>)>) {
    let mut cfg = MaeConfig::micro();
    cfg.encoder.dim = 32;
    cfg.encoder.heads = 4;
    cfg.decoder_dim = 16;
    let vars = VarMap::new();
    let mut mae = Mae::new(VarBuilder::from_varmap(&vars, DType::F32, dev), &cfg).unwrap();
    mae.compute_dtype = dtype;
    init_weights(&vars, 11).unwrap();
    let (b, n) = (3usize, 16usize);
    let images = random(&[b, 2, n, n], 12, 1.5).to_device(dev).unwrap();
    let valid = Tensor::ones((b, n, n), DType::F32, dev).unwrap();
    let mut r = Rng::new(13, 0);
    let noise: Vec<Vec<f32>> = (0..b)
        .map(|_| (0..16).map(|_| r.unit() as f32).collect())
        .collect();
    let masking = Masking::from_noise(&noise, 0.75);
    let out = mae.forward(&images, &valid, &masking, None).unwrap();
    let grads = out.loss.backward().unwrap();
    let named = named_vars(&vars)
        .into_iter()
        .map(|(name, v)| {
            let g = grads.get(v.as_tensor()).unwrap();
            (name, host(g))
        })
        .collect();
    (out.loss.to_scalar::<f32>().unwrap(), named)
}

#[test]
fn a_micro_mae_has_the_same_loss_and_gradients_on_the_gpu() {
    let (loss_c, grads_c) = micro_grads(&Device::Cpu, DType::F32);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
        let (loss_g, grads_g) = micro_grads(&gpu(), dtype);
        assert!(
            ((loss_g - loss_c) / loss_c).abs() < tol as f32,
            "{dtype:?} loss {loss_g} vs {loss_c}"
        );
        for ((name, a), (_, c)) in grads_g.iter().zip(&grads_c) {
            let scale = c.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
            let e = a
                .iter()
                .zip(c)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale));
            // The key third of the qkv bias has no gradient by symmetry: its scale is ~0.
            assert!(e < tol * 10.0, "{dtype:?} gradient of {name}: {e}");
        }
    }
}

/// `Σᵢ Σ (vᵢ · rᵢ)²` with `rᵢ` seeded random multipliers (seed `seed + i`) on `g`: a loss
/// whose gradients differ per parameter and step.
fn squared_products<'a>(vars: impl Iterator<Item = &'a Var>, seed: u64, g: &Device) -> Tensor {
    let mut loss = Tensor::zeros((), DType::F32, g).unwrap();
    for (i, v) in vars.enumerate() {
        let t = random(v.dims(), seed + i as u64, 1.0).to_device(g).unwrap();
        let term = (v.as_tensor() * t)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        loss = (loss + term).unwrap();
    }
    loss
}

#[test]
fn the_fused_adamw_step_matches_the_composed_one() {
    let g = gpu();
    let run = |fusion: bool| {
        fused::set_fused(fusion);
        let shapes: [&[usize]; 4] = [&[300, 70], &[70], &[1, 1, 16], &[1000, 3]];
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let name = format!("p{i}.{}", if s.len() == 1 { "bias" } else { "weight" });
                (
                    name,
                    Var::from_tensor(&random(s, 20 + i as u64, 1.0).to_device(&g).unwrap())
                        .unwrap(),
                )
            })
            .collect();
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
        for step in 0..3u64 {
            let loss = squared_products(vars.iter().map(|(_, v)| v), 40 + step * 10, &g);
            let grads = loss.backward().unwrap();
            opt.step(&grads, 1e-2, 0.7).unwrap();
        }
        let (_, moments) = opt.state();
        let mut out: Vec<Vec<f64>> = vars.iter().map(|(_, v)| host(v.as_tensor())).collect();
        out.extend(moments.iter().map(|(_, t)| host(t)));
        out
    };
    let composed = run(false);
    let fused_out = run(true);
    fused::set_fused(true);
    for (i, (a, c)) in fused_out.iter().zip(&composed).enumerate() {
        let scale = c.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        let e = a
            .iter()
            .zip(c)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale));
        assert!(e < 1e-5, "tensor {i}: {e}");
    }
    // The update moved the weights.
    assert!(
        fused_out[0]
            .iter()
            .zip(&host(&random(&[300, 70], 20, 1.0)))
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
}

#[test]
fn the_uploader_delivers_every_batch_intact() {
    let g = gpu();
    let mut up = icefm_model::cuda::Uploader::new(g.as_cuda_device().unwrap()).unwrap();
    // Two slots, reused; a short batch in between (new buffers for its slot); each tensor kept
    // alive while later uploads reuse the slots, and work queued on each before the next.
    let sizes = [6 * 1000, 6 * 1000, 6 * 1000, 6 * 500, 6 * 1000, 6 * 1000];
    let mut kept = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let data: Vec<f32> = host(&random(&[len], 200 + i as u64, 3.0))
            .iter()
            .map(|&x| x as f32)
            .collect();
        let t = up.upload(&data, (len / 6, 6)).unwrap();
        let doubled = (&t * 2.0).unwrap();
        kept.push((data, t, doubled));
    }
    for (data, t, doubled) in &kept {
        assert_eq!(t.dims(), &[data.len() / 6, 6]);
        let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&got, data);
        let twice: Vec<f32> = doubled.flatten_all().unwrap().to_vec1().unwrap();
        assert!(twice.iter().zip(data).all(|(a, b)| *a == 2.0 * b));
    }
    assert!(up.upload(&[1.0, 2.0, 3.0], (2, 2)).is_err());
}

#[test]
fn index_uploads_and_queued_readbacks_carry_their_values() {
    let g = gpu();
    let cd = g.as_cuda_device().unwrap();
    let mut up = icefm_model::cuda::Uploader::<u32>::new(cd).unwrap();
    let noise: Vec<Vec<f32>> = (0..3)
        .map(|s| {
            (0..16)
                .map(|t| ((t * 7 + s * 5) % 16) as f32 / 16.0)
                .collect()
        })
        .collect();
    let masking = Masking::from_noise(&noise, 0.75);
    let packed = masking.packed();
    let len = packed.len();
    let staged = masking
        .clone()
        .staged(up.upload(&packed, len).unwrap())
        .unwrap();
    let on = staged.on(&g).unwrap();
    let keep: Vec<Vec<u32>> = on.keep.to_vec2().unwrap();
    let restore: Vec<Vec<u32>> = on.restore.to_vec2().unwrap();
    assert_eq!(keep, masking.ids_keep);
    assert_eq!(restore, masking.ids_restore);
    let masked: Vec<Vec<u32>> = on.masked.to_vec2().unwrap();
    for (b, row) in masked.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            assert_eq!(m == 1, masking.is_masked(b, t));
        }
    }
    // A readback queued behind more work returns the values as they were when it was queued.
    let t = Tensor::new(&[1.5f32, -2.0, 3.25], &g).unwrap();
    let r = icefm_model::cuda::Readback::start(&t.affine(2.0, 0.0).unwrap()).unwrap();
    let _more = t.exp().unwrap();
    assert_eq!(r.finish().unwrap().0, vec![3.0, -4.0, 6.5]);
    let bf = Tensor::new(0.5f32, &g)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        icefm_model::cuda::Readback::start(&bf)
            .unwrap()
            .finish()
            .unwrap()
            .0,
        vec![0.5]
    );
    // Two at a time, in page-locked buffers the finished ones left for reuse.
    let a = icefm_model::cuda::Readback::start(&t).unwrap();
    let b = icefm_model::cuda::Readback::start(&t.neg().unwrap()).unwrap();
    let (vb, mark_b) = b.finish().unwrap();
    let (va, mark_a) = a.finish().unwrap();
    assert_eq!(vb, vec![-1.5, 2.0, -3.25]);
    assert_eq!(va, vec![1.5, -2.0, 3.25]);
    // Each readback's mark is behind its copy: a's comes first on the stream.
    assert!(mark_a.secs_to(&mark_b).unwrap() >= 0.0);
    // Device time between two marks is the work queued between them, whatever the host does
    // after: a record read late (training's records) still gets its step's time.
    let start = icefm_model::cuda::DeviceMark::record(g.as_cuda_device().unwrap()).unwrap();
    let m = Tensor::ones((2048, 2048), DType::F32, &g).unwrap();
    let host = std::time::Instant::now();
    for _ in 0..20 {
        m.matmul(&m).unwrap();
    }
    let r = icefm_model::cuda::Readback::start(&m.sum_all().unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (v, end) = r.finish().unwrap();
    assert_eq!(v, vec![2048.0 * 2048.0]);
    let secs = start.secs_to(&end).unwrap();
    assert!(
        secs > 0.0 && secs < host.elapsed().as_secs_f64() - 0.25,
        "{secs} s"
    );
}

#[test]
fn clipping_on_the_device_updates_as_clipping_on_the_host() {
    let g = gpu();
    fused::set_fused(true);
    for max_norm in [0.5, 1e9, 0.0] {
        let run = |on_device: bool| {
            let shapes: [&[usize]; 3] = [&[300, 70], &[70], &[1000, 3]];
            let vars: Vec<(String, Var)> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let v = Var::from_tensor(&random(s, 80 + i as u64, 1.0).to_device(&g).unwrap());
                    (format!("p{i}.weight"), v.unwrap())
                })
                .collect();
            let just: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
            let mut norms = Vec::new();
            for step in 0..3u64 {
                let loss = squared_products(just.iter(), 90 + step * 10, &g);
                let grads = loss.backward().unwrap();
                let c = icefm_model::optim::clip(&grads, just.iter(), max_norm).unwrap();
                assert!(matches!(c, icefm_model::optim::Clip::Device { .. }));
                norms.push(c.norm().unwrap());
                if on_device {
                    opt.step_clipped(&grads, 1e-2, &c).unwrap();
                } else {
                    opt.step(&grads, 1e-2, c.scale().unwrap()).unwrap();
                }
            }
            let w: Vec<Vec<f64>> = just.iter().map(|v| host(v.as_tensor())).collect();
            (w, norms)
        };
        let (dev_w, dev_norms) = run(true);
        let (host_w, host_norms) = run(false);
        assert_eq!(dev_norms, host_norms, "max norm {max_norm}");
        // The same scale, computed in double on either side, then the same kernel.
        assert_eq!(dev_w, host_w, "max norm {max_norm}");
    }
}

#[test]
fn the_gpu_step_census_is_the_cpu_census_with_gpu_routes() {
    // What examples/census.rs counts on the CPU is what a GPU step runs: the same operations,
    // bytes and products, under whatever switches the process has (the partial sums of
    // parameter gradients aside: the kernels choose their own row blocks).
    use icefm_model::census::{mae_step, rows};
    let cfg = common::census_mae();
    let on_gpu = rows(&mae_step(&cfg, 64, 3, DType::BF16, &gpu(), false).unwrap());
    fused::set_gpu_routes(true);
    let on_cpu = mae_step(&cfg, 64, 3, DType::BF16, &Device::Cpu, false);
    fused::set_gpu_routes(false);
    common::assert_same_census(&on_gpu, &rows(&on_cpu.unwrap()));
}

/// Data-parallel training on a GPU through the host route, on the GPU check's store (two ranks
/// share the one GPU, which NCCL refuses, so NCCL is off): the gradients' flat buffer goes to the host and back, the
/// fused AdamW and clipping read gradients that are views into it, and two ranks give one
/// process's losses and weights.
#[test]
fn two_ranks_on_one_gpu_take_one_process_steps_through_the_host() {
    use icefm_model::config::TrainConfig;
    use icefm_model::dist::{DistSpec, Group};
    use icefm_model::train::{RunOptions, checkpoints, train_mae, train_mae_in};
    use std::sync::atomic::AtomicBool;
    // The GPU check's small store (scripts/build-gpu-check.sh; this binary must not link
    // netCDF, so it cannot make one).
    let store = std::path::PathBuf::from(
        std::env::var("ICEFM_GPU_STORE").unwrap_or_else(|_| ".gpu/store".into()),
    );
    assert!(
        store.join("zarr.json").exists(),
        "{}: no store (run from the repository root after scripts/build-gpu-check.sh, or set \
         ICEFM_GPU_STORE)",
        store.display()
    );
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.panel_every=0",
    ];
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = TrainConfig::parse(common::DIST_MAE, &sets).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = |out: &std::path::Path| RunOptions {
        device: gpu(),
        store: store.clone(),
        out: out.to_path_buf(),
        resume: false,
    };
    let one = train_mae(
        &cfg,
        &opts(&tmp.path().join("one")),
        &AtomicBool::new(false),
        &|_| {},
    )
    .unwrap();
    let port = common::free_port();
    let two = tmp.path().join("two");
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let (cfg, o) = (cfg.clone(), opts(&two));
            std::thread::spawn(move || {
                let spec = DistSpec::parse(&format!("{r}/2@127.0.0.1:{port}")).unwrap();
                let mut g = Group::connect(&spec, std::time::Duration::from_secs(60)).unwrap();
                g.allow_nccl(false);
                train_mae_in(&mut g, &cfg, &o, &AtomicBool::new(false), &|_| {}).unwrap()
            })
        })
        .collect();
    let two_runs: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    for (a, b) in one.records.iter().zip(&two_runs[0].records) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-4 * a.loss.abs(),
            "{a:?}\n{b:?}"
        );
    }
    assert_eq!(two_runs[1].steps_done, 3);
    let load = |o: &std::path::Path| {
        let dir = checkpoints(o).last().unwrap().1.clone();
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    // Adam moves a weight whose gradient is near 0 by up to its learning rate either way, so
    // the gap is taken against the largest weight of the model, not each tensor's.
    let (a, b) = (load(&tmp.path().join("one")), load(&two));
    let (mut gap, mut top) = (0f64, 0f64);
    for (name, x) in &a {
        for (p, q) in host(x).iter().zip(host(&b[name])) {
            gap = gap.max((p - q).abs());
            top = top.max(p.abs());
        }
    }
    assert!(gap / top < 1e-3, "weights differ by {}", gap / top);
}
