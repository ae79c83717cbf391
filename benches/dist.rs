//! Data-parallel gradient sums on the CPU: [`Group::all_reduce_sum`] and [`Group::reduce`]
//! (flatten, weigh, sum, split back) between ranks in threads over TCP on this host, for the
//! gradients of ViT-tiny's MAE (6.0 M f32 with its 2-block decoder, the shape
//! `configs/mae_vit_tiny.toml` trains) and of a ViT-B-sized 112 M buffer, by both
//! [`SumPath`]s (down the chain and back, or through rank 0) with 2 and 3 ranks. Reports the
//! time per sum and the buffer's bytes per second. Results: `docs/benchmarks.md`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use icefm_model::dist::{DistSpec, Group, SumPath, Weights};

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(29777)
}

/// Rank 0 here and ranks 1 … `world − 1` in threads that each run `n` sums of `len` values
/// whenever asked.
fn ranks(len: usize, world: usize, sum: SumPath) -> (Group, Vec<mpsc::Sender<u64>>) {
    let p = port();
    let mut asks = Vec::new();
    for r in 1..world {
        let (tx, rx) = mpsc::channel::<u64>();
        asks.push(tx);
        std::thread::spawn(move || {
            let spec = DistSpec::parse(&format!("{r}/{world}@127.0.0.1:{p}")).expect("spec");
            let mut g = Group::connect_with(&spec, Duration::from_secs(30), sum).expect("rank");
            let mut buf = vec![1.0f32; len];
            while let Ok(n) = rx.recv() {
                for _ in 0..n {
                    g.all_reduce_sum(&mut buf).expect("sum");
                }
            }
        });
    }
    let spec = DistSpec::parse(&format!("0/{world}@127.0.0.1:{p}")).expect("spec");
    (
        Group::connect_with(&spec, Duration::from_secs(30), sum).expect("rank 0"),
        asks,
    )
}

fn sums(c: &mut Criterion) {
    let mut group = c.benchmark_group("all_reduce_sum");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for (world, sum) in [
        (2, SumPath::Chain),
        (2, SumPath::Star),
        (3, SumPath::Chain),
        (3, SumPath::Star),
    ] {
        for (name, len) in [
            ("vit_tiny_mae_6.0M", 6_000_000usize),
            ("vit_b_112M", 112_000_000),
        ] {
            let (mut g, asks) = ranks(len, world, sum);
            let mut buf = vec![1.0f32; len];
            group.throughput(Throughput::Bytes((len * 4) as u64));
            let id = format!("{sum:?}_{world}_ranks/{name}").to_lowercase();
            group.bench_function(id, |b| {
                b.iter_custom(|n| {
                    asks.iter().for_each(|a| a.send(n).expect("rank"));
                    let t = Instant::now();
                    for _ in 0..n {
                        g.all_reduce_sum(&mut buf).expect("sum");
                    }
                    t.elapsed()
                })
            });
        }
    }
    group.finish();
}

/// The whole gradient path of a step: ViT-tiny MAE-sized gradients in 150 tensors.
fn reduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("reduce_gradients_2_ranks");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    let (n_vars, per) = (150usize, 40_000usize);
    let p = port();
    let (tx, rx) = mpsc::channel::<u64>();
    let make = move || -> (Vec<Var>, Tensor) {
        let dev = Device::Cpu;
        let vars: Vec<Var> = (0..n_vars)
            .map(|i| {
                Var::from_tensor(&Tensor::full(i as f32, (per / 100, 100), &dev).expect("full"))
                    .expect("var")
            })
            .collect();
        let mut loss = Tensor::zeros((), DType::F32, &dev).expect("zero");
        for v in &vars {
            loss = (loss + v.as_tensor().sqr().expect("sqr").sum_all().expect("sum")).expect("add");
        }
        (vars, loss)
    };
    std::thread::spawn(move || {
        let spec = DistSpec::parse(&format!("1/2@127.0.0.1:{p}")).expect("spec");
        let mut g = Group::connect(&spec, Duration::from_secs(30)).expect("rank 1");
        let (vars, loss) = make();
        let w = Tensor::new(3f32, &Device::Cpu).expect("w");
        while let Ok(n) = rx.recv() {
            for _ in 0..n {
                let mut grads = loss.backward().expect("backward");
                g.reduce(
                    &mut grads,
                    &vars,
                    std::slice::from_ref(&loss),
                    Weights::Scale(&w),
                )
                .expect("reduce");
            }
        }
    });
    let spec = DistSpec::parse(&format!("0/2@127.0.0.1:{p}")).expect("spec");
    let mut g = Group::connect(&spec, Duration::from_secs(30)).expect("rank 0");
    let (vars, loss) = make();
    let w = Tensor::new(2f32, &Device::Cpu).expect("w");
    group.throughput(Throughput::Bytes((n_vars * per * 4) as u64));
    group.bench_function("vit_tiny_mae_6.0M_in_150_tensors", |b| {
        b.iter_custom(|n| {
            let mut spent = Duration::ZERO;
            tx.send(n).expect("rank 1");
            for _ in 0..n {
                // The backward pass is the step's, not the sum's: timed apart and left out.
                let mut grads = loss.backward().expect("backward");
                let t = Instant::now();
                g.reduce(
                    &mut grads,
                    &vars,
                    std::slice::from_ref(&loss),
                    Weights::Scale(&w),
                )
                .expect("reduce");
                spent += t.elapsed();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, sums, reduce);
criterion_main!(benches);
