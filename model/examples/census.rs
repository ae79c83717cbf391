//! What one MAE training step asks of a GPU, counted on the CPU (`icefm_model::census`): the
//! launches and bytes of every operation of the forward and backward passes, by phase and op,
//! extrapolated to the batch asked for from batches 2 and 3, with a lower bound of each one's
//! time at a card's copy bandwidth and matrix rate.
//!
//! `cargo run --release -p icefm-model --example census -- [--model mae|seg] [--preset base]
//! [--size 384] [--mask 0.75] [--batch 64] [--dtype bf16] [--routes gpu|cpu] [--sites]
//! [--top 40] [--bandwidth 4267] [--tflops 600]`
//!
//! `--model seg` counts the fine-tuning step instead (SAR-IceFM's UPerNet head and three tasks;
//! `--batch` 16 is the GPU check's).
//!
//! `--routes gpu` (default) takes the GPU's path where an op chooses by device; the switches
//! of `fused` read their variables as in training (`ICEFM_FLASH_BWD=1`, …). Bandwidth in GB/s
//! and the matrix rate in TFLOP/s default to what the H200 measured (docs/benchmarks.md).
#![allow(missing_docs, clippy::unwrap_used)]
use candle_core::{DType, Device};
use icefm_model::census::{Row, extrapolate, mae_step, rows, seg_step};
use icefm_model::fused;
use icefm_model::mae::MaeConfig;
use icefm_model::seg::SegConfig;
use icefm_model::vit::VitConfig;
use std::collections::BTreeMap;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot read {v}"))
        })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset: String = arg(&args, "--preset", "base".to_string());
    let px: usize = arg(&args, "--size", 384);
    let batch: usize = arg(&args, "--batch", 64);
    let top: usize = arg(&args, "--top", 40);
    let bw = arg(&args, "--bandwidth", 4267.0) * 1e9;
    let rate = arg(&args, "--tflops", 600.0) * 1e12;
    let dtype = match arg(&args, "--dtype", "bf16".to_string()).as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        d => panic!("--dtype: bf16 or f32, not {d}"),
    };
    let routes: String = arg(&args, "--routes", "gpu".to_string());
    fused::set_gpu_routes(routes == "gpu");
    let sites = args.iter().any(|a| a == "--sites");
    let model: String = arg(&args, "--model", "mae".to_string());
    let encoder = VitConfig::preset(&preset).expect("--preset");
    let mut cfg = MaeConfig::new(encoder.clone());
    cfg.mask_ratio = arg(&args, "--mask", 0.75);
    let seg = SegConfig::sar_icefm(encoder);
    let census = |b| {
        let entries = match model.as_str() {
            "mae" => mae_step(&cfg, px, b, dtype, &Device::Cpu, sites),
            "seg" => seg_step(&seg, px, b, dtype, &Device::Cpu, sites),
            m => panic!("--model: mae or seg, not {m}"),
        };
        rows(&entries.unwrap())
    };
    let rows = extrapolate((2, &census(2)), (3, &census(3)), batch).unwrap();

    let what = if model == "seg" {
        "fine-tuning step (UPerNet, 3 tasks)".to_string()
    } else {
        format!("MAE step, mask {}", cfg.mask_ratio)
    };
    println!(
        "{what} census: {preset}/{}, {px} px, batch {batch}, {dtype:?}, {routes} routes; \
         flash {}, flash backward {}, bias+GELU {}, cuBLASLt bias {}",
        cfg.encoder.patch,
        fused::flash(),
        fused::flash_bwd(),
        fused::bias_gelu_cuda(),
        fused::lt_bias()
    );
    println!(
        "times are lower bounds: bytes at {:.0} GB/s or products at {:.0} TFLOP/s\n",
        bw / 1e9,
        rate / 1e12
    );
    // By pass and operation.
    let mut by: BTreeMap<(String, String), Row> = BTreeMap::new();
    for r in &rows {
        let pass = r.phase.split(':').next().unwrap().to_string();
        let e = by.entry((pass, r.op.clone())).or_insert_with(|| Row {
            calls: 0.0,
            read: 0.0,
            written: 0.0,
            flops: 0.0,
            ..r.clone()
        });
        e.calls += r.calls;
        e.read += r.read;
        e.written += r.written;
        e.flops += r.flops;
    }
    let mut by: Vec<_> = by.into_iter().collect();
    by.sort_by(|a, b| b.1.seconds(bw, rate).total_cmp(&a.1.seconds(bw, rate)));
    println!("| pass | op | launches | GB moved | TFLOP | ms (bound) |\n|---|---|---|---|---|---|");
    let mut total = [0.0; 4];
    for ((pass, op), r) in &by {
        let ms = r.seconds(bw, rate) * 1e3;
        println!(
            "| {pass} | {op} | {} | {:.2} | {:.2} | {ms:.2} |",
            r.calls,
            r.bytes() / 1e9,
            r.flops / 1e12
        );
        total[0] += r.calls;
        total[1] += r.bytes();
        total[2] += r.flops;
        total[3] += ms;
    }
    println!(
        "| all | | {} | {:.2} | {:.2} | {:.2} |\n",
        total[0],
        total[1] / 1e9,
        total[2] / 1e12,
        total[3]
    );
    // The largest rows outside the matrix products.
    let mut rest: Vec<&Row> = rows.iter().filter(|r| r.op != "matmul").collect();
    rest.sort_by(|a, b| b.bytes().total_cmp(&a.bytes()));
    println!(
        "| phase | op | dtype | largest shape (batch 3) | launches | GB moved | ms at copy speed | site |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rest.iter().take(top) {
        println!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {} |",
            r.phase,
            r.op,
            r.dtype,
            r.shape,
            r.calls,
            r.bytes() / 1e9,
            r.bytes() / bw * 1e3,
            r.site
        );
    }
}
