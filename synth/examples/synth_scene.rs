//! Write one synthetic scene and report how long it took and how large it is.
//!
//! `cargo run --release -p icefm-synth --example synth_scene -- raw 10000 10400 7 default /tmp/s`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use icefm_synth::{Encoding, SceneKind, SynthOptions, write_scene};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let kind = match arg(0, "raw").as_str() {
        "rtt" => SceneKind::Rtt,
        _ => SceneKind::Raw,
    };
    let (Ok(height), Ok(width), Ok(seed)) = (
        arg(1, "1000").parse::<usize>(),
        arg(2, "1040").parse::<usize>(),
        arg(3, "7").parse::<u64>(),
    ) else {
        eprintln!("usage: synth_scene [raw|rtt] HEIGHT WIDTH SEED [ENCODING] [DIR]");
        return ExitCode::from(2);
    };
    let Some(encoding) = Encoding::named(&arg(4, "default")) else {
        eprintln!(
            "unknown encoding; one of: {:?}",
            Encoding::all_named()
                .iter()
                .map(|e| e.0)
                .collect::<Vec<_>>()
        );
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(arg(5, "synth-out"));
    let mut opts = SynthOptions::new(kind, height, width, seed);
    opts.encoding = encoding;
    let start = Instant::now();
    match write_scene(&dir, &opts) {
        Ok(path) => {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            println!(
                "{} {:.2} s {:.1} MB",
                path.display(),
                start.elapsed().as_secs_f64(),
                size as f64 / 1e6
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
