//! The fine-tuning step's 3 × 3 im2col and its adjoint.

use super::*;

// ---- im2col.

type Im2col<T> = unsafe extern "C" fn(*const T, *mut T, i32, i32, i32, i32, i32);
type Col2im<T> = unsafe extern "C" fn(*const T, *mut T, i32, i32, i32, i32);

fn im2col_case<T: Host>(tol: f64) {
    use icefm_model::seg::Im2col3;
    let emu = emulator();
    let suffix = if T::DTYPE == DType::F32 {
        "f32"
    } else {
        "bf16"
    };
    let (b, h, w, c) = (2usize, 5usize, 7usize, 6usize);
    let dims = (b as i32, h as i32, w as i32, c as i32);
    // SAFETY: the kernels' C signatures.
    let im2col: Im2col<T> = unsafe { emu.kernel(&format!("im2col3_{suffix}")) };
    let col2im: Col2im<T> = unsafe { emu.kernel(&format!("col2im3_{suffix}")) };
    for (op, seed) in [
        (Im2col3::COLUMNS, 81),
        (Im2col3::MIRRORED, 83),
        (Im2col3::ADJOINT, 82),
    ] {
        let shape_in = if op.adjoint {
            [b, h, w, 9 * c]
        } else {
            [b, h, w, c]
        };
        let x = random(&shape_in, seed, 2.0, T::DTYPE);
        let want = x.apply_op1_no_bwd(&op).unwrap();
        let xb = Buffer::from(&T::of(&x));
        let n = want.elem_count();
        let mirror = i32::from(op.mirrored);
        // The launchers' elem_cfg, and one block striding over everything.
        for grid in [n.div_ceil(256) as u32, 1] {
            let mut y = Buffer::<T>::output(n);
            let yp = y.mut_ptr();
            emu.launch((grid, 1, 1), (256, 1, 1), 0, Order::Forward, &|| {
                // SAFETY: x and y of the map's sizes.
                unsafe {
                    if op.adjoint {
                        col2im(xb.ptr(), yp, dims.0, dims.1, dims.2, dims.3)
                    } else {
                        im2col(xb.ptr(), yp, dims.0, dims.1, dims.2, dims.3, mirror)
                    }
                }
            })
            .unwrap();
            let got = T::tensor(y.values(), want.dims());
            assert_close(&got, &want, tol, &format!("{op:?} {suffix} grid {grid}"));
        }
    }
}

/// The fine-tuning step's 3 × 3 im2col, mirrored and not, and its adjoint.
#[test]
fn the_im2col_kernels_match_the_cpu_in_the_emulator() {
    im2col_case::<f32>(1e-6);
    im2col_case::<u16>(1e-2);
}
