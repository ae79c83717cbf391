//! The vendored candle-core's patches (vendor/README.md): float-only unary ops on integer
//! tensors are an error naming the op, not a panic; integer-capable ops still work; gradients
//! still sum over every path to a tensor.
#![allow(clippy::unwrap_used, missing_docs)]

use candle_core::{Device, Tensor, Var};

#[test]
fn float_only_ops_on_integer_tensors_are_errors() {
    let t = Tensor::new(&[1u8, 2, 3], &Device::Cpu).unwrap();
    for (name, r) in [("exp", t.exp()), ("sqrt", t.sqrt()), ("neg", t.neg())] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("floating-point"), "{e}");
    }
    // Ops defined on integers are unchanged.
    assert_eq!(t.abs().unwrap().to_vec1::<u8>().unwrap(), [1, 2, 3]);
    let f = t.to_dtype(candle_core::DType::F32).unwrap().sqr().unwrap();
    assert_eq!(f.to_vec1::<f32>().unwrap(), [1.0, 4.0, 9.0]);
}

#[test]
fn a_tensor_used_twice_gets_the_sum_of_both_gradients() {
    // y = x·x + 3x (x used on three paths; the first gradient stored as it is, then added to).
    let x = Var::new(&[1f32, -2.0, 0.5], &Device::Cpu).unwrap();
    let y = ((x.as_tensor() * x.as_tensor()).unwrap() + (x.as_tensor() * 3.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = y.backward().unwrap();
    let got = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got, [5.0, -1.0, 4.0]);
    // Subtraction: d(a − b)/db = −1 with b's first gradient stored negated.
    let b = Var::new(&[2f32, 4.0], &Device::Cpu).unwrap();
    let z = (Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap() - b.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = z.backward().unwrap();
    assert_eq!(
        g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [-1.0, -1.0]
    );
}
