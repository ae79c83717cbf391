//! `icefm`: the command line of the icefm sea-ice foundation-model engine.

mod ablate;
mod commands;
mod demo;
mod eval;
mod import;
mod progress;
mod regime;
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
            ExitCode::from(2)
        }
    }
}
