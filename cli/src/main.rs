//! `icefm`: the command line of the icefm sea-ice foundation-model engine.

// Doc comments of the options are clap's help texts, whose placeholders read `<name>`.
#![allow(rustdoc::invalid_html_tags)]

mod ablate;
mod commands;
mod demo;
mod eval;
mod import;
mod launch;
mod manifest;
mod plot;
mod progress;
mod regime;
mod run_summary;
mod scene_info;
mod train;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    no_backtraces_in_error_messages();
    no_hdf5_file_locks();
    end_quietly_when_stdout_closes();
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain, once, on one line per cause.
            for line in error_lines(&e) {
                eprintln!("{line}");
            }
            if let Some(h) = hint(&e) {
                eprintln!("hint: {h}");
            }
            if icefm_netcdf_thread::write_failed() {
                end_now(2);
            }
            ExitCode::from(2)
        }
    }
}

/// End the process with `code` without running exit handlers: after a failed write through
/// HDF5 (a full disk) its handler would close the file it still holds, and loop or crash doing
/// so (seen: "HDF5: infinite loop closing library", a segmentation fault). Output is flushed
/// first; every file icefm writes is complete by then or was never put in place.
#[allow(unsafe_code)] // _exit: see the SAFETY note
fn end_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once; no Rust state is observed after it.
    unsafe { libc::_exit(code) }
}

/// The lines that report `e`: the error, then each cause not already said. Errors that put
/// their source's text in their own (`model: I/O error: …` over `I/O error: …` over the OS's
/// words) would otherwise print one reason three times.
fn error_lines(e: &anyhow::Error) -> Vec<String> {
    let mut lines = vec![format!("error: {e}")];
    let mut said = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !said.contains(&text) {
            lines.push(format!("  caused by: {text}"));
        }
        said = text;
    }
    lines
}

/// candle puts a stack backtrace into the text of every error it makes whenever
/// `RUST_BACKTRACE` is set, as many shells set it: a one-line error, or an ablation's `FAILED:`
/// line, would become thirty. Library backtraces follow `RUST_LIB_BACKTRACE` first, so unless
/// that is set, it is set off here; panics still print theirs under `RUST_BACKTRACE`.
#[allow(unsafe_code)] // set_var: see the SAFETY note
fn no_backtraces_in_error_messages() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the first statement of main, before this process starts any thread, so no
        // other thread can be reading the environment.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// HDF5 (under netCDF-4) locks every file it opens with flock, unless `HDF5_USE_FILE_LOCKING`
/// says otherwise. icefm reads scenes that nothing else writes, and writes its own files
/// through temporary names and a rename, so the lock guards nothing here, while it fails: on
/// file systems without flock (some NFS and Lustre mounts), and wherever another process holds
/// a lock on the file, as a process inherits it from a parent that had the file open when it
/// started it. netCDF then says only "NetCDF: HDF error". Off, unless the variable is set.
#[allow(unsafe_code)] // set_var: see the SAFETY note
fn no_hdf5_file_locks() {
    if std::env::var_os("HDF5_USE_FILE_LOCKING").is_none() {
        // SAFETY: at the start of main, before this process starts any thread or opens any
        // file through HDF5, so no other thread can be reading the environment.
        unsafe { std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE") };
    }
}

/// A reader that stops early (`icefm export … | head`) closes the pipe, and Rust's print macros
/// then panic with "failed printing to stdout: Broken pipe". End instead as a Unix tool that
/// the closed pipe's SIGPIPE ended: silently, with status 141 (128 + SIGPIPE), so a pipeline
/// under `set -o pipefail` still sees that the output was cut. (SIGPIPE itself stays ignored,
/// as Rust sets it: writes to a closed socket or child remain errors, not a sudden end.)
fn end_quietly_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_closed_stdout(message) {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Whether a panic's message is the print macros' on a closed standard output.
fn is_closed_stdout(message: &str) -> bool {
    // "Broken pipe (os error 32)", the OS's words for EPIPE.
    message.starts_with("failed printing to stdout")
        && message.to_ascii_lowercase().contains("broken pipe")
}

/// What to do next, for errors whose cause is plain but whose words are the driver's.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    let said = |word: &str| e.chain().any(|c| c.to_string().contains(word));
    if said("No space left on device") {
        return Some(
            "the disk is full. Free space (or write elsewhere) and run the same command again: \
             `icefm train --resume` continues a run from its last checkpoint, and ingest, eval \
             and ablate start again where they left nothing half-written.",
        );
    }
    (said("CUDA_ERROR_OUT_OF_MEMORY") || said("CUBLAS_STATUS_ALLOC_FAILED")).then_some(
        "the GPU ran out of memory. Micro-batches (`--set train.accumulate=4`: the same \
         steps from a quarter of the activations; a run continues so with --resume), bf16 \
         (`--set train.precision=bf16`: activations take half the memory), a smaller batch \
         (`--set data.batch_size=16`) or a smaller model needs less; `nvidia-smi` lists other \
         processes holding the GPU's memory.",
    )
}

#[cfg(test)]
mod tests {
    use super::{error_lines, hint, is_closed_stdout};

    #[test]
    fn a_cause_whose_words_were_already_said_is_not_printed_again() {
        let os = std::io::Error::other("No space left on device (os error 28)");
        let e = anyhow::Error::new(os)
            .context("model: I/O error: No space left on device (os error 28)")
            .context("saving checkpoints/step_0000003");
        assert_eq!(
            error_lines(&e),
            [
                "error: saving checkpoints/step_0000003",
                "  caused by: model: I/O error: No space left on device (os error 28)"
            ]
        );
        // Causes that say something new are all kept.
        let e = anyhow::Error::msg("Permission denied").context("st/zarr.json: cannot read");
        assert_eq!(
            error_lines(&e),
            [
                "error: st/zarr.json: cannot read",
                "  caused by: Permission denied"
            ]
        );
    }

    #[test]
    fn a_gpu_out_of_memory_error_gets_a_hint_and_others_do_not() {
        // The driver's words as cudarc's DriverError writes them, under the context icefm adds.
        let oom = anyhow::Error::msg(
            "model: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".to_string(),
        )
        .context("training step 3");
        assert!(hint(&oom).is_some_and(|h| h.contains("train.accumulate")));
        let cublas = anyhow::Error::msg("cublas: CUBLAS_STATUS_ALLOC_FAILED".to_string());
        assert!(hint(&cublas).is_some());
        let other = anyhow::Error::msg("store.zarr: no such file".to_string()).context("ingest");
        assert_eq!(hint(&other), None);
        // A full disk, in the OS's words.
        let full = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context("writing run/checkpoints/step_0000003.tmp/model.safetensors");
        assert!(hint(&full).is_some_and(|h| h.contains("disk is full") && h.contains("--resume")));
    }

    #[test]
    fn only_a_print_to_a_closed_stdout_ends_quietly() {
        // The message of std's print macros, with the error a write to a closed pipe gets.
        let epipe = std::io::Error::from_raw_os_error(libc::EPIPE);
        assert!(is_closed_stdout(&format!(
            "failed printing to stdout: {epipe}"
        )));
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(!is_closed_stdout(&format!(
            "failed printing to stdout: {full}"
        )));
        assert!(!is_closed_stdout(&format!(
            "failed printing to stderr: {epipe}"
        )));
        assert!(!is_closed_stdout("index out of bounds"));
    }
}
