//! Command definitions (clap) and their glue to the library crates.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Error, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use icefm_ingest::inspect::{StoreSummary, summarize, summarize_manifests};
use icefm_ingest::pipeline::{DEFAULT_JOBS, IngestOptions, Summary, ingest};
use icefm_ingest::quicklook::{QuicklookOptions, write_quicklook};
use icefm_ingest::reader::{RAW_SPACING_M, is_reference_file};
use icefm_ingest::shard::{Shard, list_shards};
use icefm_ingest::store::{new_attrs, with_sar_resample};
use icefm_schemas::Level;
use icefm_schemas::manifest::{PATCHES_FILE, SCENES_FILE};
use icefm_schemas::sigrid::MergeMode;
use icefm_schemas::store::{Codec, DEFAULT_CODEC, DEFAULT_PATCH, MANIFESTS_DIR, SarResample};
use icefm_synth::{Encoding, Release, SceneKind, Service, SynthOptions, write_scene};

use crate::progress::IngestBars;

/// icefm: SAR sea-ice foundation models, data pipeline first.
#[derive(Parser, Debug)]
#[command(name = "icefm", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert AI4Arctic NetCDF scenes (raw 40 m or ready-to-train 80 m) into a Zarr patch store.
    Ingest(IngestArgs),
    /// Write AI4Arctic-format synthetic scenes through the NetCDF-4 library.
    Synth(SynthArgs),
    /// Print a store's scenes, levels, patches and class balance; optionally a PNG quicklook.
    Inspect(InspectArgs),
    /// Write data-regime manifests (scene lists drawn by a rule) or check two for overlap.
    Regime(Box<crate::regime::RegimeArgs>),
    /// Pre-train an MAE, or fine-tune SIC/SOD/FLOE with a `[seg]` config (`--config FILE`,
    /// `--set KEY=VALUE`, `--init CKPT`, `--regime NAME`, `--resume`).
    Train(Box<crate::train::TrainArgs>),
    /// The whole pipeline on generated scenes: ingest, regimes, MAE pre-training, fine-tuning
    /// from it and from scratch, held-out scores.
    Demo(crate::demo::DemoArgs),
    /// AutoICE metrics of a fine-tuned model on whole scenes: metrics.json, per-scene table,
    /// confusion matrices, panels.
    Eval(Box<crate::eval::EvalArgs>),
    /// Charts of new NetCDF scenes as an AutoICE submission file.
    Predict(Box<crate::eval::PredictArgs>),
    /// Convert a SAR-IceFM / mmselfsup MAE checkpoint (`.pth`) into icefm safetensors.
    Import(Box<crate::import::ImportArgs>),
    /// Write a run's encoder (and MAE decoder) under SAR-IceFM's / mmselfsup's names, as
    /// safetensors for PyTorch: the inverse of `import`.
    Export(Box<crate::import::ExportArgs>),
    /// Training curves of runs as one PNG: loss, per-task losses, learning rate, gradient
    /// norm, images/s, or validation scores (`--metric val.combined`).
    Plot(Box<crate::plot::PlotArgs>),
    /// Run a data-regime ablation grid (regimes × init × tasks × levels) from a TOML file:
    /// fine-tune, score, tabulate and plot; re-running resumes a half-done grid.
    Ablate(Box<crate::ablate::AblateArgs>),
    /// Store manifests: `merge` rebuilds them from the scenes' committed parts once the shards
    /// of a sharded ingest have finished.
    #[command(subcommand)]
    Manifest(crate::manifest::ManifestCommand),
}

#[derive(clap::Args, Debug)]
struct IngestArgs {
    /// NetCDF files or directories of them (`*.nc`, not recursive).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Store to create or add to.
    #[arg(long)]
    store: PathBuf,
    /// Levels as ground spacings in metres [default: 80,120,160,200,240,280,320,360,400 for a
    /// new store, the store's own when adding to one].
    #[arg(long)]
    levels: Option<String>,
    /// Patch (= chunk) edge in pixels [default: 384 for a new store, the store's own when
    /// adding to one].
    #[arg(long)]
    patch: Option<u32>,
    /// Scenes processed at once (at least 1).
    #[arg(long, default_value_t = DEFAULT_JOBS as u16, value_parser = clap::value_parser!(u16).range(1..))]
    jobs: u16,
    /// Compression: `zstd:LEVEL` or `blosc-zstd:LEVEL` (zstd inside blosc, byte shuffle)
    /// [default: blosc-zstd:1 for a new store, the store's own when adding to one].
    #[arg(long)]
    codec: Option<String>,
    /// Merge equal partial concentrations as the AI4Arctic toolbox does (assign, not add).
    #[arg(long)]
    toolbox_merge: bool,
    /// Rows per band read from each file [default: follow the file's chunking].
    #[arg(long)]
    band_rows: Option<usize>,
    /// Another folder holding test scenes' reference charts (`<id>_prep_reference.nc` of the
    /// AutoICE test release); the scene file's own folder is always searched first.
    #[arg(long, value_name = "DIR")]
    reference: Vec<PathBuf>,
    /// Ingest only shard K of N (0 <= K < N) of the inputs, sorted by file name, into a store
    /// that the other shards write too; `slurm` takes K and N from a Slurm array task. The
    /// last shard to finish merges the manifests (docs/ingest.md).
    #[arg(long, value_name = "K/N|slurm")]
    shard: Option<String>,
    /// Write the given scenes again even where the store already holds them from the same
    /// file (to mend a scene whose chunks a read reported damaged). Without it they are
    /// skipped.
    #[arg(long)]
    redo: bool,
    /// How HH and HV are resampled to the levels: `area` (exact area means) or `bilinear`
    /// (PyTorch's bilinear interpolate without antialiasing, as SAR-IceFM made its levels: for
    /// an imported SAR-IceFM encoder) [default: area for a new store, the store's own when
    /// adding to one].
    #[arg(long, value_name = "area|bilinear")]
    sar_resample: Option<SarResample>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KindArg {
    Raw,
    Rtt,
}

#[derive(clap::Args, Debug)]
struct SynthArgs {
    /// Output directory (not needed with `--encoding list`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Number of scenes.
    #[arg(long, default_value_t = 4)]
    count: u32,
    /// Release format.
    #[arg(long, value_enum, default_value = "raw")]
    kind: KindArg,
    /// Scene size ROWSxCOLS (a full raw scene is about 10000x10400).
    #[arg(long, default_value = "1000x1040")]
    size: String,
    /// Seed of the first scene (scene i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Encoding name, `cycle` (scene i uses the i-th encoding) or `list` to print them.
    #[arg(long, default_value = "default")]
    encoding: String,
    /// `test`: files as the test release has them, without charts (raw: no polygons; RTT:
    /// the charts in `<id>_prep_reference.nc` beside each scene).
    #[arg(long, value_enum, default_value = "train")]
    release: ReleaseArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReleaseArg {
    Train,
    Test,
}

#[derive(clap::Args, Debug)]
pub(crate) struct InspectArgs {
    /// Store to inspect, or a training run's folder (where the run stands).
    pub store: PathBuf,
    /// Write a quicklook PNG (HH, HV, SIC, SOD, FLOE with legends) of one scene.
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// A scene, by its id or its raw or RTT file name: without --png, print its record (file,
    /// acquisition, levels, patches, largest polygons, regimes, class balance); with it, the
    /// quicklook's scene [default: the first].
    #[arg(long)]
    pub scene: Option<String>,
    /// Level of the quicklook [default: the coarsest]; with --scene and without --png, read the
    /// scene's arrays at this level back: valid shares, HH and HV in dB (mean, spread,
    /// percentiles), the incidence angle's range, land and labelled shares.
    #[arg(long)]
    pub level: Option<String>,
    /// Summarise this regime of the store instead (scenes, patches, class pixels, missing classes).
    #[arg(long, conflicts_with_all = ["png", "scene", "level"])]
    pub regime: Option<String>,
    /// Read every chunk of every complete scene back (checksums, missing or cut shard files) and
    /// check the manifests and the scenes' committed parts; list what is damaged and how to
    /// mend it, exit status 1 if anything is.
    #[arg(long, conflicts_with_all = ["png", "scene", "level", "regime"])]
    pub verify: bool,
}

/// Run a command; `Ok` carries the exit status (1 when some scenes failed).
pub fn run(cli: Cli) -> Result<ExitCode> {
    if matches!(
        cli.command,
        Command::Train(_)
            | Command::Demo(_)
            | Command::Eval(_)
            | Command::Predict(_)
            | Command::Ablate(_)
    ) {
        // Model work reuses the same large buffers every step: keep freed memory for reuse.
        icefm_model::alloc::keep_freed_memory();
    }
    match cli.command {
        Command::Ingest(a) => cmd_ingest(a),
        Command::Synth(a) => cmd_synth(a).map(|_| ExitCode::SUCCESS),
        Command::Inspect(a) if a.verify => verify_store(&a.store),
        Command::Inspect(a) => cmd_inspect(a).map(|_| ExitCode::SUCCESS),
        Command::Regime(a) => crate::regime::cmd_regime(*a),
        Command::Train(a) => crate::train::cmd_train(*a),
        Command::Demo(a) => crate::demo::cmd_demo(a),
        Command::Eval(a) => crate::eval::cmd_eval(*a).map(|_| ExitCode::SUCCESS),
        Command::Predict(a) => crate::eval::cmd_predict(*a).map(|()| ExitCode::SUCCESS),
        Command::Import(a) => crate::import::cmd_import(*a).map(|_| ExitCode::SUCCESS),
        Command::Export(a) => crate::import::cmd_export(*a).map(|_| ExitCode::SUCCESS),
        Command::Ablate(a) => crate::ablate::cmd_ablate(*a),
        Command::Plot(a) => crate::plot::cmd_plot(*a).map(|()| ExitCode::SUCCESS),
        Command::Manifest(c) => crate::manifest::cmd_manifest(c),
    }
}

pub(crate) fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("size {s:?} is not ROWSxCOLS"))?;
    Ok((
        h.trim().parse().with_context(|| format!("rows in {s:?}"))?,
        w.trim()
            .parse()
            .with_context(|| format!("columns in {s:?}"))?,
    ))
}

/// `c` as `--codec` takes it.
fn codec_text(c: Codec) -> String {
    match c {
        Codec::Zstd { level } => format!("zstd:{level}"),
        Codec::BloscZstd { level } => format!("blosc-zstd:{level}"),
    }
}

/// The codec of an ingest into `store`: `asked`, which an existing store must already use (its
/// arrays' codec is fixed when it is made), else the existing store's, else the default.
fn ingest_codec(store: &Path, asked: Option<&str>) -> Result<Codec> {
    let asked = asked.map(parse_codec).transpose()?;
    if !store.join("zarr.json").exists() {
        return Ok(asked.unwrap_or(DEFAULT_CODEC));
    }
    let have = icefm_ingest::store::Store::open(store)
        .with_context(|| format!("opening {}", store.display()))?
        .attrs
        .codec;
    match asked {
        Some(c) if c != have => bail!(
            "{}: the store's arrays use {}, and a store has one codec; leave out --codec to add \
             to it, or ingest into another store",
            store.display(),
            codec_text(have)
        ),
        _ => Ok(have),
    }
}

fn parse_codec(s: &str) -> Result<Codec> {
    let (name, level) = s.split_once(':').unwrap_or((s, "3"));
    let level: i32 = level
        .parse()
        .with_context(|| format!("codec level in {s:?}"))?;
    Ok(match name {
        "zstd" => Codec::Zstd { level },
        "blosc-zstd" => Codec::BloscZstd {
            level: u8::try_from(level)
                .ok()
                .filter(|l| *l <= 9)
                .with_context(|| format!("blosc level must be 0-9 in {s:?}"))?,
        },
        other => bail!("unknown codec {other:?}: use zstd:LEVEL or blosc-zstd:LEVEL"),
    })
}

/// Expand directories into their `*.nc` files (sorted); keep files as given.
fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let nc: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "nc") && f.is_file())
                .collect();
            // A test scene's reference charts go with their scene, not on their own.
            let references = nc.iter().filter(|f| is_reference_file(f)).count();
            let mut found: Vec<PathBuf> =
                nc.into_iter().filter(|f| !is_reference_file(f)).collect();
            if found.is_empty() && references > 0 {
                bail!(
                    "{}: holds only reference charts ({references} `…_reference.nc`), which are \
                     not scenes; give the folder of the scenes (`…_prep.nc`), with \
                     `--reference {}` if their charts are here",
                    p.display(),
                    p.display()
                );
            }
            if found.is_empty() {
                bail!("{}: no .nc files in this directory", p.display());
            }
            found.sort();
            out.extend(found);
        } else if is_reference_file(p) {
            bail!(
                "{}: a test scene's reference charts, not a scene; give the scene file \
                 (`…_prep.nc`): its reference is read from beside it or from --reference",
                p.display()
            );
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

/// The summary on stdout (the result, as other commands print theirs), each failure on stderr
/// after it.
fn print_summary(s: &Summary) {
    println!(
        "{} done, {} skipped, {} failed; {:.1} Mpx from {:.1} MB in {:.1} s ({:.1} MB/s); {} scene(s) in the store",
        s.done.len(),
        s.skipped.len(),
        s.failed.len(),
        s.pixels as f64 / 1e6,
        s.bytes as f64 / 1e6,
        s.seconds,
        s.bytes as f64 / 1e6 / s.seconds.max(1e-9),
        s.scenes_in_store
    );
    for (path, reason) in &s.failed {
        // A scene's own errors name its file; a store's (a full disk, a read-only folder) name
        // the store only, so say which input they stopped.
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        if reason.contains(&name) {
            eprintln!("failed: {reason}");
        } else {
            eprintln!("failed: {}: {reason}", path.display());
        }
    }
    if let Some(o) = &s.shard {
        let shard = o.plan.shard;
        if o.waiting_for.is_empty() {
            eprintln!(
                "shard {shard}: every shard of the run has finished; the manifests are merged"
            );
        } else {
            eprintln!(
                "shard {shard}: finished; waiting for shard(s) {} of {}: the last to finish \
                 merges the manifests (or `icefm manifest merge --store STORE`)",
                list_shards(&o.waiting_for),
                shard.count
            );
        }
        if !o.other_inputs.is_empty() {
            eprintln!(
                "shard {shard}: the records of shard(s) {} of {} list other input files (an \
                 earlier run, or shards given other files: every shard must be given the same \
                 inputs; `icefm manifest merge` lists the runs)",
                list_shards(&o.other_inputs),
                shard.count
            );
        }
    }
}

pub(crate) fn do_ingest(
    inputs: &[PathBuf],
    store: &Path,
    levels: Vec<Level>,
    patch: u32,
    codec: Codec,
    sar_resample: SarResample,
    options: &IngestOptions,
) -> Result<Summary> {
    if patch < 16 {
        bail!("--patch {patch} is too small (at least 16)");
    }
    // Checked here, before a store with these levels exists: every scene would fail, and the
    // store would keep levels no scene can fill.
    if let Some(l) = levels.iter().find(|l| l.spacing_m() < RAW_SPACING_M) {
        bail!(
            "level {l} is finer than any AI4Arctic scene's grid (raw scenes are {RAW_SPACING_M} m, \
             the ready-to-train release 80 m)"
        );
    }
    let bars = IngestBars::new(inputs.len());
    let summary = ingest(
        inputs,
        store,
        with_sar_resample(new_attrs(&levels, patch, codec), sar_resample),
        options,
        &bars,
    )
    .with_context(|| format!("ingest into {}", store.display()))?;
    bars.finish();
    print_summary(&summary);
    Ok(summary)
}

/// Refuse a store in object storage for a command that writes a store or reads its ingest
/// records (local folders only).
pub(crate) fn local_store(store: &Path, command: &str) -> Result<()> {
    if icefm_dataset::location::is_url(store) {
        bail!(
            "{}: `icefm {command}` needs a local store; ingest into a folder, copy it to object \
             storage (`aws s3 sync`, `gcloud storage rsync`, `rclone sync`, …), then train, \
             evaluate and draw regimes from its URL (docs/object-store.md)",
            store.display()
        );
    }
    Ok(())
}

fn cmd_ingest(a: IngestArgs) -> Result<ExitCode> {
    local_store(&a.store, "ingest")?;
    let mut inputs = expand_inputs(&a.inputs)?;
    let shard = match a.shard.as_deref() {
        None => None,
        Some("slurm") => Some(Shard::from_slurm(|k| std::env::var(k).ok()).map_err(Error::msg)?),
        Some(s) => Some(Shard::parse(s).map_err(Error::msg)?),
    };
    let mut plan = None;
    if let Some(shard) = shard {
        let (mine, p) = shard.plan(&inputs).map_err(Error::msg)?;
        eprintln!(
            "shard {shard}: {} of {} inputs (run {})",
            mine.len(),
            p.total,
            p.digest
        );
        inputs = mine;
        plan = Some(p);
    }
    // Adding to a store takes its levels and patch unless they are given (and then must match).
    let existing = if a.store.join("zarr.json").exists() {
        Some(
            icefm_ingest::store::Store::open(&a.store)
                .with_context(|| format!("opening {}", a.store.display()))?
                .attrs,
        )
    } else {
        None
    };
    let levels = match (&a.levels, &existing) {
        (Some(s), _) => Level::parse_list(s)?,
        (None, Some(attrs)) => attrs.levels.clone(),
        (None, None) => Level::defaults(),
    };
    let patch = a
        .patch
        .or(existing.as_ref().map(|attrs| attrs.patch))
        .unwrap_or(DEFAULT_PATCH);
    let sar_resample = a
        .sar_resample
        .or(existing.as_ref().map(|attrs| attrs.sar_resample))
        .unwrap_or_default();
    let options = IngestOptions {
        jobs: usize::from(a.jobs),
        merge_mode: if a.toolbox_merge {
            MergeMode::ToolboxAssign
        } else {
            MergeMode::Sum
        },
        band_rows: a.band_rows,
        reference_dirs: a.reference,
        shard: plan,
        redo: a.redo,
    };
    let summary = do_ingest(
        &inputs,
        &a.store,
        levels,
        patch,
        ingest_codec(&a.store, a.codec.as_deref())?,
        sar_resample,
        &options,
    )?;
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn synth_scenes(
    out: &Path,
    count: u32,
    kind: Option<SceneKind>,
    size: (usize, usize),
    seed: u64,
    encoding: &str,
    release: Release,
) -> Result<Vec<PathBuf>> {
    let named = Encoding::all_named();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut paths = Vec::new();
    for i in 0..count {
        // Without a fixed kind, raw and RTT alternate and RTT scenes are half size (80 m).
        let (kind, (h, w)) = match kind {
            Some(k) => (k, size),
            None if i % 2 == 0 => (SceneKind::Raw, size),
            None => (SceneKind::Rtt, (size.0 / 2, size.1 / 2)),
        };
        let mut o = SynthOptions::new(kind, h, w, seed + u64::from(i));
        o.index = i;
        o.release = release;
        o.service = if i % 3 == 2 {
            Service::Cis
        } else {
            Service::Dmi
        };
        o.encoding = match encoding {
            "cycle" => named[i as usize % named.len()].1,
            name => Encoding::named(name).with_context(|| {
                format!(
                    "unknown encoding {name:?}; known: cycle, {}",
                    named.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                )
            })?,
        };
        let started = Instant::now();
        let p = write_scene(out, &o).with_context(|| format!("writing synthetic scene {i}"))?;
        eprintln!(
            "synth  {} ({h}x{w}, {:.1} s)",
            p.display(),
            started.elapsed().as_secs_f64()
        );
        if let Some(r) = o.reference_file_name() {
            eprintln!("       {} (its charts)", out.join(r).display());
        }
        paths.push(p);
    }
    Ok(paths)
}

fn cmd_synth(a: SynthArgs) -> Result<()> {
    if a.encoding == "list" {
        for (n, e) in Encoding::all_named() {
            println!("{n:<24} {e}");
        }
        println!("cycle                    scene i takes the i-th encoding above");
        return Ok(());
    }
    let Some(out) = &a.out else {
        bail!("icefm synth needs --out DIR (where to write the scenes)");
    };
    let kind = match a.kind {
        KindArg::Raw => SceneKind::Raw,
        KindArg::Rtt => SceneKind::Rtt,
    };
    synth_scenes(
        out,
        a.count,
        Some(kind),
        parse_size(&a.size)?,
        a.seed,
        &a.encoding,
        match a.release {
            ReleaseArg::Train => Release::Train,
            ReleaseArg::Test => Release::Test,
        },
    )?;
    Ok(())
}

/// The summary of a store in object storage, from its attributes and manifests (its ingest
/// records are local to the machine that ingested it).
fn summarize_remote(store: &Path) -> Result<StoreSummary> {
    use icefm_dataset::table::read_manifest;
    let attrs = icefm_dataset::store::read_attrs(store)?;
    let dir = store.join(MANIFESTS_DIR);
    let (scenes, patches) = (dir.join(SCENES_FILE), dir.join(PATCHES_FILE));
    if !icefm_dataset::location::exists(&scenes)? {
        bail!(
            "{}: no scenes manifest (ingest into a folder and copy the whole store, manifests \
             included)",
            store.display()
        );
    }
    Ok(summarize_manifests(
        &attrs,
        (&read_manifest(&scenes)?, &scenes),
        (&read_manifest(&patches)?, &patches),
    )?)
}

/// `icefm inspect STORE --verify`: every chunk read back, the damage listed with the files to
/// ingest again.
fn verify_store(store: &Path) -> Result<ExitCode> {
    use icefm_dataset::verify::{chunk_count, verify};
    let context = || format!("inspect --verify {}", store.display());
    let total = chunk_count(store).with_context(context)?;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "  verify [{bar:30}] {pos}/{len} chunks  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let v = verify(store, &|n| bar.inc(n)).with_context(context)?;
    bar.finish_and_clear();
    println!(
        "read {} chunk(s) of level arrays and {} small array(s) (2 km grids, coordinates) of {} \
         scene(s) back ({:.2} GB decoded) in {:.1} s",
        v.chunks,
        v.small_arrays,
        v.scenes,
        (v.decoded_bytes + v.small_bytes) as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    if let Some(line) = &v.unmerged {
        eprintln!("warning: {line}");
    }
    if v.damaged.is_empty() {
        println!("no damage found");
        return Ok(ExitCode::SUCCESS);
    }
    let mut scenes: Vec<&str> = Vec::new();
    for (scene, what) in &v.damaged {
        if scene.is_empty() {
            println!("damaged: {what}");
        } else {
            println!("damaged: {scene}: {what}");
            if !scenes.contains(&scene.as_str()) {
                scenes.push(scene);
            }
        }
    }
    if !scenes.is_empty() {
        let sources = source_names(store).unwrap_or_default();
        let files: Vec<String> = scenes
            .iter()
            .map(|s| {
                sources
                    .get(*s)
                    .map(|f| crate::train::shell_word(f))
                    .unwrap_or_else(|| format!("<the file of {s}>"))
            })
            .collect();
        if icefm_dataset::location::is_url(store) {
            // Ingest writes local stores only: the mend is in the copy the bucket came from.
            println!(
                "{} damaged scene(s); write them again in the local store this one was copied \
                 from (the names the store recorded; give each with its folder): icefm ingest \
                 --redo {} --store LOCAL_STORE, then copy it here again",
                scenes.len(),
                files.join(" ")
            );
        } else {
            println!(
                "{} damaged scene(s); write them again from their files (the names the store \
                 recorded; give each with its folder): icefm ingest --redo {} --store {}",
                scenes.len(),
                files.join(" "),
                crate::train::shell_word(&store.display().to_string())
            );
        }
    }
    Ok(ExitCode::from(1))
}

/// Scene id → source file name, from the store's scenes manifest.
fn source_names(store: &Path) -> Result<std::collections::HashMap<String, String>> {
    use arrow_array::cast::AsArray;
    let path = store.join(MANIFESTS_DIR).join(SCENES_FILE);
    let mut out = std::collections::HashMap::new();
    for b in icefm_dataset::table::read_manifest(&path)? {
        let (Some(ids), Some(names)) = (
            b.column_by_name("scene_id"),
            b.column_by_name("source_name"),
        ) else {
            continue;
        };
        let (ids, names) = (ids.as_string::<i32>(), names.as_string::<i32>());
        for i in 0..b.num_rows() {
            out.insert(ids.value(i).to_string(), names.value(i).to_string());
        }
    }
    Ok(out)
}

pub(crate) fn cmd_inspect(a: InspectArgs) -> Result<()> {
    if crate::run_summary::is_run(&a.store) {
        if a.png.is_some() || a.regime.is_some() || a.scene.is_some() || a.level.is_some() {
            bail!(
                "{} is a training run: --png, --scene, --level and --regime inspect a store",
                a.store.display()
            );
        }
        return crate::run_summary::inspect_run(&a.store);
    }
    if let Some(name) = &a.regime {
        return crate::regime::inspect_regime(&a.store, name);
    }
    if let (Some(scene), None) = (&a.scene, &a.png) {
        let report = match &a.level {
            Some(level) => crate::scene_info::level_report(&a.store, scene, level),
            None => crate::scene_info::scene_report(&a.store, scene),
        }
        .with_context(|| format!("inspect {} --scene {scene}", a.store.display()))?;
        print!("{report}");
        return Ok(());
    }
    if a.level.is_some() && a.png.is_none() {
        bail!("--level needs --png (a quicklook's level) or --scene (a scene's arrays at it)");
    }
    if icefm_dataset::location::is_url(&a.store) {
        if a.png.is_some() {
            local_store(&a.store, "inspect --png")?;
        }
        let s =
            summarize_remote(&a.store).with_context(|| format!("inspect {}", a.store.display()))?;
        print!("{}", s.render());
        print!("{}", crate::regime::regimes_block(&a.store));
        return Ok(());
    }
    let s = summarize(&a.store).with_context(|| {
        if a.store.is_dir() && a.store.join("grid.toml").is_file() {
            format!(
                "inspect {}: an `icefm ablate` output (grid.toml): its results are in \
                 ablation.parquet and ablation.png; inspect a cell's run with `icefm inspect \
                 {}/runs/KEY`",
                a.store.display(),
                a.store.display()
            )
        } else if a.store.is_dir() && !a.store.join("zarr.json").exists() {
            format!(
                "inspect {}: neither a store (no zarr.json) nor a training run (no config.toml)",
                a.store.display()
            )
        } else {
            format!("inspect {}", a.store.display())
        }
    })?;
    // The quicklook's scene and level are checked before anything is printed.
    let quicklook = a.png.as_ref().map(|png| -> Result<_> {
        let scene = match &a.scene {
            Some(name) => {
                let ids: Vec<String> = s.scenes.iter().map(|x| x.scene_id.clone()).collect();
                crate::scene_info::resolve_scene(name, &ids, &a.store)?
            }
            None => s
                .scenes
                .first()
                .map(|x| x.scene_id.clone())
                .context("the store has no scenes")?,
        };
        let level: Level = match &a.level {
            Some(l) => {
                let l: Level = l.parse()?;
                if !s.levels.contains(&l.name()) {
                    bail!(
                        "level {l} is not in the store (it has {})",
                        s.levels.join(", ")
                    );
                }
                l
            }
            None => s
                .levels
                .last()
                .context("the store has no levels")?
                .parse()?,
        };
        Ok((png, scene, level))
    });
    let quicklook = quicklook.transpose()?;
    print!("{}", s.render());
    // Manifests of two merges (one stopped between its renames) mix two stores' counts, which
    // training, regimes and eval refuse: say so under the summary.
    if let Err(e) = icefm_dataset::merged::check_manifests(&a.store) {
        eprintln!("warning: the summary above mixes two merges' manifests: {e}");
    }
    print!("{}", crate::regime::regimes_block(&a.store));
    if let Some((png, scene, level)) = quicklook {
        let (w, h) = write_quicklook(&a.store, &scene, level, png, &QuicklookOptions::default())?;
        println!(
            "\nquicklook of {scene} at {level}: {} ({w} px wide, {h} high)",
            png.display()
        );
    }
    Ok(())
}
