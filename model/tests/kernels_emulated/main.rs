//! icefm's CUDA kernels (`model/src/kernels.cu`) run on the CPU by the emulator in
//! `tests/emulator/`, against the CPU references of their ops: the kernels' own source, so that
//! a kernel written on a machine without a GPU has its indexing, tiling, barriers and
//! warp-level arithmetic checked before any GPU time is spent on it. Every launch mirrors the
//! configuration `model/src/cuda/` uses (or a smaller one that exercises the same loops);
//! buffers carry NaN guard zones and outputs start as NaN, so reads past an end, writes past an
//! end and elements never written all fail. Kernels that have no atomics are also run with
//! their threads in other orders between barriers, and must give the same bits. The flash
//! kernels' `ldmatrix` loads must be free of shared-memory bank conflicts.
//!
//! Needs a C++17 compiler (`$CXX` or `c++`); no CUDA toolkit, no GPU.
#![allow(clippy::unwrap_used)]
#![allow(unsafe_code)] // calls into the kernel emulator (FFI); each block states its contract

use candle_core::{DType, Device, Tensor, Var};
use icefm_model::{fused, ops};

#[path = "../common/mod.rs"]
mod common;
#[path = "../emulator/mod.rs"]
mod emulator;

mod bias_gelu;
mod flash;
mod im2col;
mod layer_norm;
mod mae;
mod verified;

use common::max_rel;
use emulator::{Buffer, Elem, Order, emulator};

/// Host element types of the kernels' buffers.
trait Host: Elem {
    const DTYPE: DType;
    fn of(t: &Tensor) -> Vec<Self>;
    fn tensor(v: &[Self], shape: &[usize]) -> Tensor;
}
impl Host for f32 {
    const DTYPE: DType = DType::F32;
    fn of(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }
}
/// bf16, as its bits.
impl Host for u16 {
    const DTYPE: DType = DType::BF16;
    fn of(t: &Tensor) -> Vec<u16> {
        t.to_dtype(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .into_iter()
            .map(half::bf16::to_bits)
            .collect()
    }
    fn tensor(v: &[u16], shape: &[usize]) -> Tensor {
        let h: Vec<half::bf16> = v.iter().map(|&b| half::bf16::from_bits(b)).collect();
        Tensor::from_vec(h, shape, &Device::Cpu).unwrap()
    }
}

/// A seeded CPU tensor of `dtype`, uniform in `[-scale, scale)`.
fn random(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    common::random(shape, seed, scale, dtype)
}

/// `got` has no NaN or infinity and is within `tol` of `want` (relative to `want`'s largest).
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let g = common::values(got);
    if let Some(i) = g.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} of {} is {}", g.len(), g[i]);
    }
    let e = max_rel(got, want);
    assert!(e < tol, "{what}: off by {e:.3e} (limit {tol:.1e})");
}

// ---- The emulator itself.

type ProbeFn = unsafe extern "C" fn() -> u32;
type SyncFn = unsafe extern "C" fn();
type ShflFn = unsafe extern "C" fn(f32, i32) -> f32;

/// The emulated thread's block index (x).
fn emu_block() -> u32 {
    // SAFETY: the probe's C signature; called only inside launches.
    let f: ProbeFn = unsafe { emulator().kernel("emu_probe_block") };
    // SAFETY: as above.
    unsafe { f() }
}

#[test]
fn the_emulator_runs_threads_to_their_barriers_and_completes_shuffles() {
    let emu = emulator();
    // SAFETY: the probes' C signatures (emu.cpp), called only inside launches.
    let (thread, sync, shfl): (ProbeFn, SyncFn, ShflFn) = unsafe {
        (
            emu.kernel("emu_probe_thread"),
            emu.kernel("emu_probe_syncthreads"),
            emu.kernel("emu_probe_shfl_xor"),
        )
    };
    // Each thread writes its slot of a block-shared array, then reads its neighbour's. With the
    // barrier, every order gives the neighbour's value. Without it, some thread always reads
    // its neighbour's slot before the write (the neighbours form a cycle): all but the last in
    // index order, only the last in reverse order.
    let n = 64usize;
    for barrier in [true, false] {
        for order in [Order::Forward, Order::Reverse, Order::Random(7)] {
            let mut shared = vec![0u32; n];
            let mut out = vec![0u32; n];
            let (s, o) = (shared.as_mut_ptr(), out.as_mut_ptr());
            emu.launch((1, 1, 1), (n as u32, 1, 1), 0, order, &|| {
                // SAFETY: each thread writes its own slots; the emulator runs one at a time.
                unsafe {
                    let i = thread() as usize;
                    *s.add(i) = i as u32 + 1;
                    if barrier {
                        sync();
                    }
                    *o.add(i) = *s.add((i + 1) % n);
                }
            })
            .unwrap();
            let stale: Vec<usize> = (0..n)
                .filter(|&i| out[i] != ((i + 1) % n) as u32 + 1)
                .collect();
            let expected: Vec<usize> = match (barrier, order) {
                (true, _) => vec![],
                (false, Order::Forward) => (0..n - 1).collect(),
                (false, Order::Reverse) => vec![n - 1],
                (false, Order::Random(_)) => stale.clone(),
            };
            assert_eq!(stale, expected, "barrier {barrier}, {order:?}");
            if !barrier {
                assert!(!stale.is_empty(), "{order:?}: the race does not show");
            }
            drop(shared);
        }
    }
    // A butterfly of shuffles sums the warp's lanes in every lane.
    let mut out = vec![0f32; 64];
    let o = out.as_mut_ptr();
    emu.launch((1, 1, 1), (64, 1, 1), 0, Order::Random(3), &|| {
        // SAFETY: as above.
        unsafe {
            let i = thread();
            let mut v = i as f32;
            for m in [16, 8, 4, 2, 1] {
                v += shfl(v, m);
            }
            *o.add(i as usize) = v;
        }
    })
    .unwrap();
    assert!(out[..32].iter().all(|&v| v == 496.0), "{out:?}"); // 0 + … + 31
    assert!(out[32..].iter().all(|&v| v == 1520.0), "{out:?}"); // 32 + … + 63
    // Shared memory no thread of the block has written reads as NaN bytes, whatever an
    // earlier block left there.
    // SAFETY: the probes' C signatures.
    let (read, write): (ProbeFn, unsafe extern "C" fn(u32)) = unsafe {
        (
            emu.kernel("emu_probe_shared_read"),
            emu.kernel("emu_probe_shared_write"),
        )
    };
    let mut seen = vec![0u32; 3];
    let sp = seen.as_mut_ptr();
    emu.launch((3, 1, 1), (32, 1, 1), 0, Order::Forward, &|| {
        // SAFETY: as above; thread 0 of each block records what it read first.
        unsafe {
            if thread() == 0 {
                *sp.add(emu_block() as usize) = read();
                write(12345);
            }
        }
    })
    .unwrap();
    assert_eq!(seen, vec![u32::MAX; 3]);
    // Half a warp at a barrier while the other half waits for it at a shuffle is a deadlock,
    // reported as one. (Threads that have exited do not hold a barrier, as on the GPU.)
    let e = emu
        .launch((2, 1, 1), (32, 1, 1), 0, Order::Forward, &|| {
            // SAFETY: as above.
            unsafe {
                if thread() < 16 {
                    sync();
                } else {
                    shfl(1.0, 1);
                }
            }
        })
        .unwrap_err();
    assert!(e.contains("deadlock"), "{e}");
    // So is a shuffle that half a warp never reaches.
    let e = emu
        .launch((1, 1, 1), (32, 1, 1), 0, Order::Forward, &|| {
            // SAFETY: as above.
            unsafe {
                if thread() < 16 {
                    shfl(1.0, 1);
                }
            }
        })
        .unwrap_err();
    assert!(e.contains("exited"), "{e}");
}

/// The flash kernels' inline-PTX primitives as the emulator runs them, against the PTX ISA's
/// definitions (the CUDA test `the_ptx_primitives_behave_as_the_emulator_assumes` checks the
/// same words on a GPU).
#[test]
fn the_emulated_ptx_primitives_follow_the_ptx_isa() {
    let emu = emulator();
    // SAFETY: the kernel's C signature.
    let probe: unsafe extern "C" fn(*mut u32) = unsafe { emu.kernel("ptx_probe") };
    let mut out = Buffer::<u32>::output(320);
    let op = out.mut_ptr();
    emu.launch((1, 1, 1), (32, 1, 1), 0, Order::Reverse, &|| {
        // SAFETY: 320 words.
        unsafe { probe(op) }
    })
    .unwrap();
    common::check_ptx_probe(out.values()).unwrap();
}
