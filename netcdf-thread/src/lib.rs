//! All netCDF-C/HDF5 calls of the process run on one dedicated thread.
//!
//! ```
//! let answer = icefm_netcdf_thread::on_netcdf_thread(|| 6 * 7);
//! assert_eq!(answer, 42);
//! ```
//!
//! netCDF-C and HDF5 are not thread-safe: the netcdf crate serialises calls behind a lock, but
//! HDF5 keeps per-thread state (its error-stack printing is switched off only on the thread that
//! initialised the library, so calls from other threads print diagnostic stacks). One thread
//! loses no throughput — calls are serialised anyway — and scenes still interleave band by band,
//! so one scene's reading overlaps the others' resampling, compression and writing.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Sender, bounded, unbounded};

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static ON_NETCDF_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn sender() -> &'static Sender<Job> {
    static SENDER: OnceLock<Sender<Job>> = OnceLock::new();
    SENDER.get_or_init(|| {
        let (tx, rx) = unbounded::<Job>();
        std::thread::Builder::new()
            .name("netcdf".into())
            .spawn(move || {
                ON_NETCDF_THREAD.with(|t| t.set(true));
                for job in rx {
                    job();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the netCDF thread: {e}"));
        tx
    })
}

/// Run `f` on the netCDF thread and wait for its result. Use it for every call into the netcdf
/// crate, including opening, closing (dropping) and creating files. Called from the netCDF thread
/// itself, it runs `f` at once.
pub fn on_netcdf_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    if ON_NETCDF_THREAD.with(Cell::get) {
        return f();
    }
    let (tx, rx) = bounded(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    if sender().send(job).is_err() {
        panic!("the netCDF thread has stopped");
    }
    match rx.recv() {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("the netCDF thread has stopped"),
    }
}

static WRITE_FAILED: AtomicBool = AtomicBool::new(false);

/// Record that writing a file through HDF5 failed (a full disk, say). HDF5 may then hold that
/// file open in a state its exit handler cannot close: at the process's exit it loops or
/// crashes. A program that sees [`write_failed`] ends without running exit handlers, once its
/// own output is flushed.
pub fn mark_write_failed() {
    WRITE_FAILED.store(true, Ordering::SeqCst);
}

/// Whether [`mark_write_failed`] was called.
pub fn write_failed() -> bool {
    WRITE_FAILED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_on_one_named_thread_and_returns_results() {
        let a = on_netcdf_thread(|| std::thread::current().id());
        let b = std::thread::spawn(|| on_netcdf_thread(|| std::thread::current().id()))
            .join()
            .unwrap_or_else(|_| panic!("join"));
        assert_eq!(a, b);
        assert_ne!(a, std::thread::current().id());
        assert_eq!(on_netcdf_thread(|| 6 * 7), 42);
        // Nested calls run inline instead of waiting on themselves.
        assert_eq!(on_netcdf_thread(|| on_netcdf_thread(|| 7)), 7);
    }
}
