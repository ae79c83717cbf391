//! Where a CPU step runs: on one of rayon's worker threads.
//!
//! candle's matmul (gemm) and icefm's fused CPU kernels split their work over rayon's global
//! pool. Called from a thread outside the pool (the program's main thread), every parallel op
//! queues its work, wakes the workers and puts the caller to sleep until they finish: two
//! context switches per op, thousands per training step. perf counted about 8,000 context
//! switches per ViT-tiny MAE step at 96 px. Run from inside the pool, an op's first half runs on
//! the calling worker and the other worker steals the rest while it is still spinning from the
//! last op, with no sleep in between: 10× fewer switches and a 10–15 % shorter step
//! (docs/benchmarks.md).

/// Run `f` on a worker thread of rayon's global pool (inline when already on one) and return
/// its result. `cpu == false` (a GPU device) or `ICEFM_ON_WORKER=0` runs `f` on the calling
/// thread, as plain code would. A panic in `f` propagates to the caller.
pub fn on_worker<R: Send>(cpu: bool, f: impl FnOnce() -> R + Send) -> R {
    if !cpu || rayon::current_thread_index().is_some() || !enabled() {
        return f();
    }
    // Called from outside the pool, `join` hands both closures to the pool's workers and
    // blocks until they are done.
    rayon::join(f, || ()).0
}

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ICEFM_ON_WORKER").map_or(true, |v| v != "0"))
}

#[cfg(test)]
mod tests {
    use super::on_worker;

    #[test]
    fn runs_on_a_pool_worker_and_returns_the_result() {
        let outside = rayon::current_thread_index();
        assert_eq!(outside, None);
        let (inside, sum) = on_worker(true, || {
            let v: Vec<u64> = (0..10_000).collect();
            use rayon::prelude::*;
            (rayon::current_thread_index(), v.par_iter().sum::<u64>())
        });
        assert_eq!(sum, 49_995_000);
        if std::env::var("ICEFM_ON_WORKER").is_ok_and(|v| v == "0") {
            assert_eq!(inside, None);
        } else {
            assert!(inside.is_some());
        }
        // Not on the CPU: the caller's thread.
        assert_eq!(on_worker(false, rayon::current_thread_index), None);
    }

    #[test]
    fn a_panic_in_the_step_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| on_worker(true, || panic!("boom")));
        assert!(r.is_err());
    }
}
