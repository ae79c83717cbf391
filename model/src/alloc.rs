//! glibc's allocator, tuned for training and inference on the CPU.
//!
//! A training step allocates and frees the same large buffers (activations, gradients,
//! attention matrices) every step. With glibc's defaults, blocks above its mmap threshold (at
//! most 32 MiB) are mapped and unmapped each time, and freed memory at the top of the heap is
//! returned to the system: every step then faults its pages in again, and each unmap costs the
//! other threads a TLB shootdown. perf put that at about 15 % of a CPU step. Keeping freed
//! memory in the heap removes it: the ViT-tiny MAE step at 384 px went from 12.4 to 8.7 s
//! (docs/benchmarks.md), with the same peak memory, since the next step reuses the same blocks.
//!
//! One arena: a CPU step runs on rayon's worker threads ([`crate::threads`]), and glibc gives
//! each thread that allocates its own arena. A secondary arena's heaps are at most 64 MiB
//! mappings, and with mmap off its large blocks fall back to the main arena while its small
//! ones fragment: the 384-px step was 40 % slower on a worker than on the main thread until
//! every thread shared the main arena.
#![allow(unsafe_code)] // one libc call per setting

/// Make glibc keep freed memory for reuse (no mmap for large blocks, no trimming below 2 GiB
/// of free heap, one arena for all threads), for a process about to train or run a model on
/// the CPU; call it before starting threads. Left alone where the environment already sets
/// `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_` or `MALLOC_ARENA_MAX`, or where
/// `ICEFM_MALLOC=default`; a no-op off glibc. Returns whether the settings were applied.
pub fn keep_freed_memory() -> bool {
    let user = USER_SETTINGS.iter().any(|v| std::env::var_os(v).is_some())
        || std::env::var("ICEFM_MALLOC").is_ok_and(|v| v == "default");
    if user {
        return false;
    }
    apply()
}

/// glibc's environment variables for the settings [`keep_freed_memory`] makes.
const USER_SETTINGS: [&str; 3] = [
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
];

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_settings_apply_on_glibc_unless_the_environment_sets_them() {
        let user = super::USER_SETTINGS
            .iter()
            .any(|v| std::env::var_os(v).is_some())
            || std::env::var("ICEFM_MALLOC").is_ok_and(|v| v == "default");
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        assert_eq!(super::keep_freed_memory(), glibc && !user);
        // Allocations still work after the change, large ones included.
        let v = vec![1u8; 64 << 20];
        assert_eq!(v.iter().map(|&b| usize::from(b)).sum::<usize>(), 64 << 20);
    }
}
