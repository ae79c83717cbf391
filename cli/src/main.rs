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
mod train;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain, once, on one line per cause.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(h) = hint(&e) {
                eprintln!("hint: {h}");
            }
            ExitCode::from(2)
        }
    }
}

/// What to do next, for errors whose cause is plain but whose words are the driver's.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    let said = |word: &str| e.chain().any(|c| c.to_string().contains(word));
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
    use super::hint;

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
    }
}
