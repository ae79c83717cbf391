//! Helpers shared by icefm-model's test files (`mod common;` in each).
#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, Var};
use icefm_dataset::rng::Rng;
use icefm_model::census::Row;
use icefm_model::mae::MaeConfig;
use icefm_model::vit::VitConfig;

#[path = "../../../tests/support/synth_store.rs"]
mod synth_store;

/// A seeded tensor on the CPU, uniform in `[-scale, scale)`, of `dtype`.
pub fn random(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed, 0);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| (r.unit() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tensor's values on the host, as f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |got − want| over the largest |want| (floored at 1e-12); the shapes must agree.
pub fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    g.iter()
        .zip(&w)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// Central differences of `f` at every element of `var` (or the first `limit`), against the
/// analytic gradient; f64 throughout.
pub fn check_var(name: &str, var: &Var, f: &dyn Fn() -> Tensor, limit: usize) {
    let loss = f();
    let grads = loss.backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let shape = var.as_tensor().shape().clone();
    let h = 1e-6;
    let n = base.len();
    let step = (n / limit).max(1);
    let mut worst = 0f64;
    for i in (0..n).step_by(step) {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            f().to_scalar::<f64>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        // Relative, with a floor of 1e-4 for tiny gradients (e.g. key biases, zero by symmetry:
        // softmax ignores a shift shared by all keys), where both sides are rounding noise
        // (about 1e-9 with h = 1e-6).
        let err = (numeric - g[i]).abs() / (numeric.abs() + g[i].abs()).max(1e-4);
        worst = worst.max(err);
        assert!(
            err < 1e-4,
            "{name}[{i}]: analytic {} vs numeric {numeric}",
            g[i]
        );
    }
    var.set(&Tensor::from_vec(base, shape, &Device::Cpu).unwrap())
        .unwrap();
    assert!(worst.is_finite());
}

/// A store of `count` generated ready-to-train scenes of `h × w` (seeds `seed`, `seed + 1`, …)
/// ingested at 80 and 160 m with 64-px patches, under the tests' temporary folder `name`
/// (made afresh).
pub fn rtt_store(name: &str, count: u32, (h, w): (usize, usize), seed: u64) -> std::path::PathBuf {
    let scenes = vec![(icefm_synth::SceneKind::Rtt, h, w); count as usize];
    synth_store::synth_store(name, &scenes, seed, 64)
}

/// Checks the 320 words of the `ptx_probe` kernel (model/src/kernels.cu) against the PTX ISA's
/// definitions of the flash kernels' inline-PTX primitives; an error names the first primitive
/// that disagrees, its lane and register.
pub fn check_ptx_probe(words: &[u32]) -> Result<(), String> {
    if words.len() != 320 {
        return Err(format!("{} words, not 320", words.len()));
    }
    let pair = |a: u32, b: u32| a | (b << 16);
    for l in 0..32u32 {
        for i in 0..4u32 {
            // ldmatrix: register i = matrix i (rows (i & 1)·8.., columns (i >> 1)·8..), its row
            // l / 4, values 2·(l % 4) and the next.
            let (r, c) = ((i & 1) * 8 + l / 4, (i >> 1) * 8 + 2 * (l % 4));
            let want = pair(r * 16 + c, r * 16 + c + 1);
            let got = words[(l * 4 + i) as usize];
            if got != want {
                return Err(format!(
                    "ldmatrix: lane {l} register {i} is {got:#010x}, not {want:#010x}"
                ));
            }
            // .trans: matrix i's column l / 4 at rows 2·(l % 4) and the next.
            let (r0, c) = ((i & 1) * 8 + 2 * (l % 4), (i >> 1) * 8 + l / 4);
            let want = pair(r0 * 16 + c, (r0 + 1) * 16 + c);
            let got = words[(128 + l * 4 + i) as usize];
            if got != want {
                return Err(format!(
                    "ldmatrix .trans: lane {l} register {i} is {got:#010x}, not {want:#010x}"
                ));
            }
        }
        // cvt.rn.bf16x2.f32 via pack_bf16(lo, hi): lo in the low half (small integers: exact).
        let bf = |v: f32| v.to_bits() >> 16;
        let want = pair(bf(1.0 + (l / 8) as f32), bf(-2.0 - (l / 4) as f32));
        let got = words[(256 + l) as usize];
        if got != want {
            return Err(format!(
                "bf16 pair: lane {l} is {got:#010x}, not {want:#010x}"
            ));
        }
        // ex2.approx.ftz.f32: within 2 ulp; results below 2^-126 flushed to 0.
        let x = -(l as f64) * 4.25 - 100.0;
        let got = f32::from_bits(words[(288 + l) as usize]);
        let ok = if x < -126.0 {
            got == 0.0
        } else {
            (f64::from(got) / x.exp2() - 1.0).abs() < 5e-7
        };
        if !ok {
            return Err(format!("ex2.approx.ftz: lane {l}, 2^{x} came out {got:e}"));
        }
    }
    Ok(())
}

/// A one-block MAE whose attention takes both flash kernels' head widths (64 in the encoder,
/// 32 in the decoder): the model of the census tests.
pub fn census_mae() -> MaeConfig {
    let mut encoder = VitConfig::preset("tiny").unwrap(); // 3 heads of 64
    encoder.depth = 1;
    MaeConfig {
        decoder_dim: 64,
        decoder_depth: 1,
        decoder_heads: 2, // heads of 32
        ..MaeConfig::new(encoder)
    }
}

/// `a` equals `b` row by row, exactly but for the partial sums of the bias and layer-norm
/// parameter gradients (written, then summed): their row blocks are the batch's rows rounded
/// up, so their size is affine in the batch only up to a block (their calls match, their
/// bytes to 60 %; the layer norm's backward writes them beside its `dx`: its bytes written to
/// 30 %, read exactly).
pub fn assert_same_census(a: &[Row], b: &[Row]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            (&x.phase, &x.op, &x.dtype, x.calls),
            (&y.phase, &y.op, &y.dtype, y.calls)
        );
        // The partial sums (bias and layer-norm gradients), and the sums over them: relative
        // tolerances of bytes read, bytes written and operations.
        let partial = x.phase.starts_with("backward: icefm-");
        let rel = match x.op.as_str() {
            "custom icefm-column-sums" | "reduce Sum" if partial => [0.6; 3],
            "custom icefm-layer-norm-grad" if partial => [1e-6, 0.3, 1e-6],
            // Its bias gradient is one partial sum per block of rows, as the layer norm's.
            "custom icefm-bias-gelu-grad" if partial => [1e-6, 0.3, 1e-6],
            _ => [1e-6; 3],
        };
        for ((u, v), rel) in [(x.read, y.read), (x.written, y.written), (x.flops, y.flops)]
            .into_iter()
            .zip(rel)
        {
            let tol = rel * v.max(1.0);
            assert!((u - v).abs() <= tol, "{x:?} against {y:?}");
        }
    }
}

/// The micro MAE of the data-parallel tests (`dist.rs`, and `cuda.rs` on a GPU): samples with
/// no-data pixels (`min_valid` 0.3), so that the ranks' shares hold different numbers of
/// valid pixels.
pub const DIST_MAE: &str = r#"
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
threads = 1
[train]
steps = 4
lr = 1e-3
warmup_steps = 1
checkpoint_every = 2
keep_last = 5
panel_every = 2
seed = 5
"#;

/// A port free a moment ago on this host.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A validation regime `name` of `percent` % of `store`'s scenes (seed 0), written into it.
pub fn write_val_regime(store: &std::path::Path, name: &str, percent: f64) {
    use icefm_dataset::regime::{Regime, RegimeSpec, Role, Rule, draw};
    use icefm_dataset::table::SceneTable;
    let table = SceneTable::from_store(store).unwrap();
    let spec = RegimeSpec {
        name: name.into(),
        rule: Rule::Fraction,
        percent: Some(percent),
        seed: 0,
        role: Role::Val,
        list: None,
        exclude: vec![],
        within: vec![],
        include_test: false,
    };
    draw(&table, &spec)
        .unwrap()
        .write(&Regime::path_in(store, name))
        .unwrap();
}
