//! `icefm manifest merge`: the store's manifests from its committed scene parts, once the
//! shards of a sharded ingest have finished.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use icefm_ingest::manifest::merge_manifests;
use icefm_ingest::shard::{list_shards, shard_runs};
use icefm_ingest::store::Store;

#[derive(Subcommand, Debug)]
pub(crate) enum ManifestCommand {
    /// Rebuild `manifests/{scenes,polygons,patches}.parquet` from the committed scenes. Refused
    /// while a sharded ingest of the store has shards that have not finished, unless
    /// `--partial`; exit status 1 if a shard's inputs failed.
    Merge(MergeArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct MergeArgs {
    /// The store.
    #[arg(long)]
    store: PathBuf,
    /// Merge although shards have not finished: the manifests list the scenes committed so far.
    #[arg(long)]
    partial: bool,
}

/// Say on stderr when `store`'s manifests are behind its committed scenes (an ingest running or
/// stopped before its merge), so that what is read from them does not leave scenes out
/// unnoticed. A store that cannot be read says nothing here: its reader reports that.
pub(crate) fn warn_if_unmerged(store: &std::path::Path) {
    if let Ok(Some(line)) = icefm_dataset::merged::unmerged(store) {
        eprintln!("warning: {line}");
    }
}

pub(crate) fn cmd_manifest(c: ManifestCommand) -> Result<ExitCode> {
    match c {
        ManifestCommand::Merge(a) => merge(&a),
    }
}

fn merge(a: &MergeArgs) -> Result<ExitCode> {
    crate::commands::local_store(&a.store, "manifest merge")?;
    Store::open(&a.store).context("manifest merge")?;
    let runs = shard_runs(&a.store)?;
    let mut unfinished = 0;
    let mut failed = 0;
    for run in &runs {
        eprintln!(
            "sharded ingest {}: {} inputs in {} shards, {} finished",
            run.digest,
            run.inputs_total,
            run.of,
            run.finished.len()
        );
        if !run.complete() {
            unfinished += 1;
            eprintln!(
                "  shard(s) {} have not finished (running, stopped or never started): \
                 run them with --shard K/{}; if that ingest was abandoned, remove its \
                 finished shards' records (`K-of-N.json`) from {}",
                list_shards(&run.missing),
                run.of,
                a.store.join(icefm_schemas::store::SHARDS_DIR).display()
            );
        }
        for (shard, file, why) in &run.failed {
            failed += 1;
            eprintln!("  failed (shard {shard}): {file}: {why}");
        }
    }
    let mut counts: Vec<usize> = runs.iter().map(|r| r.of).collect();
    counts.sort_unstable();
    counts.dedup();
    for n in counts {
        let digests = runs.iter().filter(|r| r.of == n).count();
        if digests > 1 {
            eprintln!(
                "  {digests} sharded ingests of {n} shards were given different input files: if \
                 they are one run, its shards were not all given the same inputs"
            );
        }
    }
    if unfinished > 0 && !a.partial {
        bail!(
            "{}: not merged, {unfinished} sharded ingest(s) have shards that have not finished; \
             `--partial` merges the scenes committed so far",
            a.store.display()
        );
    }
    let scenes = merge_manifests(&a.store)
        .with_context(|| format!("merging the manifests of {}", a.store.display()))?;
    eprintln!("{scenes} scene(s) in the manifests");
    if failed > 0 {
        eprintln!("{failed} input(s) of the shards failed (above): exit status 1");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
