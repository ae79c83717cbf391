//! Forward parity with an independent NumPy implementation of the MAE
//! (`model/tests/reference/mae_reference.py`, which wrote `model/tests/data/mae_tiny_reference.npz`):
//! the same weights, input, validity mask and masking noise must give the same encoder output,
//! predictions and loss, within a relative error of 1e-4 in f32.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use icefm_model::mae::{Mae, MaeConfig, Masking};

mod common;
use common::max_rel;

#[test]
fn mae_forward_matches_the_numpy_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/mae_tiny_reference.npz"
    );
    let data: HashMap<String, Tensor> = Tensor::read_npz(path).unwrap().into_iter().collect();
    let cfg = MaeConfig::micro();
    let vars = VarMap::new();
    let mae = Mae::new(
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    // Every parameter of the model is in the fixture, with its shape.
    let mut set = 0;
    for (name, var) in vars.data().lock().unwrap().iter() {
        let t = data
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the fixture"));
        assert_eq!(t.dims(), var.as_tensor().dims(), "{name}");
        var.set(&t.to_dtype(DType::F32).unwrap()).unwrap();
        set += 1;
    }
    assert_eq!(set, 2 + 1 + 2 * 12 + 2 + 2 + 1 + 12 + 2 + 2);

    let images = &data["images"];
    let valid = &data["valid"];
    let noise: Vec<Vec<f32>> = data["noise"].to_vec2().unwrap();
    let masking = Masking::from_noise(&noise, cfg.mask_ratio);
    let ids_keep: Vec<Vec<i64>> = data["ids_keep"].to_vec2().unwrap();
    for (mine, theirs) in masking.ids_keep.iter().zip(&ids_keep) {
        assert_eq!(
            mine.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
            *theirs
        );
    }
    let out = mae.forward(images, valid, &masking, None).unwrap();
    let latent = max_rel(&out.latent, &data["latent"]);
    let pred = max_rel(&out.pred, &data["pred"]);
    let loss = out
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want: Vec<f64> = data["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let loss_err = (loss - want[0]).abs() / want[0].abs();
    assert!(latent <= 1e-4, "encoder output: relative error {latent:e}");
    assert!(pred <= 1e-4, "predictions: relative error {pred:e}");
    assert!(
        loss_err <= 1e-4,
        "loss {loss} vs {}: relative error {loss_err:e}",
        want[0]
    );
}
