//! One rank of a data-parallel gradient sum, timed: `scripts/bench-dist-net.sh` starts one
//! per emulated node (a network namespace behind a rate-limited link) to compare the two
//! [`SumPath`]s where the network, not this host's memory copies, bounds the exchange.
//!
//! ```sh
//! dist_sum RANK/WORLD@HOST:PORT [--values N] [--sum chain|star] [--repeat K]
//! ```
//!
//! Every rank sums a buffer of `N` f32 (default 6,000,000: ViT-tiny MAE's gradients) `K`
//! times (default 5) after one untimed sum; rank 0 prints the sum path, the world size, the
//! median and fastest seconds per sum and the buffer's megabytes per second, and every rank
//! checks the sums' values.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use icefm_model::dist::{DistSpec, Group, SumPath};

fn main() {
    if let Err(e) = run() {
        eprintln!("dist_sum: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let spec = args.next().ok_or(
        "usage: dist_sum RANK/WORLD@HOST:PORT [--values N] [--sum chain|star] [--repeat K]",
    )?;
    let spec = DistSpec::parse(&spec)?;
    let (mut values, mut sum, mut repeat) = (6_000_000usize, SumPath::Chain, 5usize);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |_| format!("{flag} {value}: not a number");
        match flag.as_str() {
            "--values" => values = value.parse().map_err(bad)?,
            "--sum" => sum = SumPath::parse(&value)?,
            "--repeat" => repeat = value.parse().map_err(bad)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let mut g =
        Group::connect_with(&spec, Duration::from_secs(60), sum).map_err(|e| e.to_string())?;
    let rank = g.rank() as f32;
    let world = g.world();
    let mut buf = Vec::new();
    let mut times = Vec::with_capacity(repeat);
    for k in 0..=repeat {
        buf.clear();
        buf.resize(values, rank + 1.0);
        let t = Instant::now();
        g.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        if k > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        // 1 + 2 + … + world, exact in f32 for any world size used here.
        let expect = (world * (world + 1) / 2) as f32;
        if let Some(bad) = buf.iter().position(|x| *x != expect) {
            return Err(format!(
                "value {bad} is {} after the sum, not {expect}",
                buf[bad]
            ));
        }
    }
    // Every rank ends the timing together.
    g.agree(false).map_err(|e| e.to_string())?;
    if g.is_leader() {
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let best = times.first().copied().unwrap_or(f64::NAN);
        let mb = (values * 4) as f64 / 1e6;
        println!(
            "{:<5} {world} ranks  {mb:7.1} MB  median {median:8.4} s  best {best:8.4} s  {:8.1} MB/s",
            format!("{sum:?}").to_lowercase(),
            mb / median
        );
    }
    Ok(())
}
