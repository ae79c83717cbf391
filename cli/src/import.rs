//! `icefm import`: a SAR-IceFM / mmselfsup MAE checkpoint (`.pth`) to icefm safetensors, and
//! `icefm export`, the way back.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use icefm_model::export::{ExportOptions, export_mmselfsup_file};
use icefm_model::finetune::resolve_weights;
use icefm_model::import::{ImportOptions, Imported, import_pth};
use icefm_model::train::config_of_run;

/// Arguments of `icefm import`.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The checkpoint: an mmengine `.pth` (`state_dict` entry), a bare state dict, or a
    /// `.safetensors` of mmselfsup keys (as `icefm export` writes).
    checkpoint: PathBuf,
    /// Safetensors to write (the layout of a training checkpoint's `model.safetensors`).
    #[arg(long)]
    out: PathBuf,
    /// Encoder preset the checkpoint was trained as (`tiny`, `small`, `base`, `large`, `huge`,
    /// `micro`): gives the heads and checks the width, depth, patch and MLP ratio.
    #[arg(long, conflicts_with = "heads")]
    preset: Option<String>,
    /// Encoder attention heads [default: those of the preset of the checkpoint's width].
    #[arg(long)]
    heads: Option<usize>,
    /// Decoder attention heads [default: 16 for a 512-wide decoder].
    #[arg(long)]
    decoder_heads: Option<usize>,
    /// Import even if a position embedding is not the fixed sin-cos (the model will differ).
    #[arg(long)]
    allow_pos_embed_mismatch: bool,
    /// The input channels the encoder was trained on, in order (SAR-IceFM's: HH,HV), recorded
    /// in the file: fine-tuning from it then refuses other data.channels. Without it only their
    /// number is checked.
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<String>>,
    /// Print every checkpoint key and its icefm name.
    #[arg(long)]
    show_map: bool,
}

/// Run `icefm import`.
pub fn cmd_import(a: ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        heads: a.heads,
        decoder_heads: a.decoder_heads,
        allow_pos_embed_mismatch: a.allow_pos_embed_mismatch,
    };
    let mut imported = import_pth(&a.checkpoint, &opts)
        .with_context(|| format!("cannot import {}", a.checkpoint.display()))?;
    if let Some(name) = &a.preset {
        imported
            .apply_preset(name)
            .with_context(|| format!("--preset {name}"))?;
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Channels given, or recorded in the header of a file `icefm export` wrote.
    let channels = match (&a.channels, &imported.recorded.channels) {
        (Some(given), Some(recorded)) if given != recorded => bail!(
            "--channels {} but {} records {}: its encoder was trained on those",
            given.join(","),
            a.checkpoint.display(),
            recorded.join(",")
        ),
        (given, recorded) => given.as_ref().or(recorded.as_ref()),
    };
    // Heads given, or recorded in the header, are recorded again, so fine-tuning refuses a
    // model with others; heads only guessed from the width are not.
    let given = a.heads.is_some() || a.preset.is_some() || imported.recorded.heads.is_some();
    let record = icefm_model::files::Recorded {
        channels: channels.cloned(),
        heads: imported.encoder.heads.filter(|_| given),
        decoder_heads: imported
            .decoder
            .as_ref()
            .and_then(|d| d.heads)
            .filter(|_| a.decoder_heads.is_some() || imported.recorded.decoder_heads.is_some()),
    };
    imported
        .write_safetensors_recorded(&a.out, &record)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    print_summary(&a, &imported);
    Ok(())
}

fn heads(h: Option<usize>) -> String {
    h.map_or("unknown".into(), |h| h.to_string())
}

fn print_summary(a: &ImportArgs, im: &Imported) {
    let total = im.mapping.len() + im.skipped.len();
    println!(
        "read {}: {}, {total} tensors",
        a.checkpoint.display(),
        im.layout
    );
    let e = &im.encoder;
    println!(
        "encoder: width {}, blocks {}, heads {}, patch {}, channels {}, MLP ratio {}{}",
        e.dim,
        e.depth,
        heads(e.heads),
        e.patch,
        e.in_channels,
        e.mlp_ratio,
        e.pos_grid
            .map(|g| format!(", trained on a {g}x{g} token grid ({} px)", g * e.patch))
            .unwrap_or_default()
    );
    match &im.decoder {
        Some(d) => println!(
            "decoder: width {}, blocks {}, heads {}, {} values per patch",
            d.dim,
            d.depth,
            heads(d.heads),
            e.in_channels * e.patch * e.patch
        ),
        None => println!("decoder: absent (encoder only)"),
    }
    let (enc, dec) = im.counts();
    println!(
        "imported {} tensors ({enc} encoder, {dec} decoder); skipped {}",
        im.tensors.len(),
        im.skipped.len()
    );
    for s in &im.skipped {
        println!("  skipped {}: {}", s.key, s.reason);
    }
    for n in &im.notes {
        println!("  note: {n}");
    }
    if a.show_map {
        for (key, name) in &im.mapping {
            println!("  {key} -> {name}");
        }
    }
    println!("wrote {}", a.out.display());
}

/// `icefm export`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A run folder (its best checkpoint, else its newest), or a checkpoint folder in one.
    run: PathBuf,
    /// Safetensors to write, under mmselfsup's keys.
    #[arg(long)]
    out: PathBuf,
    /// Image size of the position embeddings, as mmselfsup's `img_size` [default: the run's
    /// data.crop].
    #[arg(long)]
    image_size: Option<usize>,
}

/// Run `icefm export`.
pub fn cmd_export(a: ExportArgs) -> Result<()> {
    let weights_path = resolve_weights(&a.run)?;
    let (run, cfg) = config_of_run(&weights_path)?;
    let mae = cfg.mae_config().map_err(|e| anyhow::anyhow!("{}", e.0))?;
    let (patch, in_channels) = (mae.encoder.patch, mae.encoder.in_channels);
    let image = a.image_size.unwrap_or(cfg.data.crop as usize);
    if image == 0 || !image.is_multiple_of(patch) {
        bail!("image size {image} is not a multiple of the patch {patch}");
    }
    let opts = ExportOptions {
        patch,
        in_channels,
        grid: image / patch,
    };
    let exported = export_mmselfsup_file(&weights_path, &opts)
        .with_context(|| format!("cannot export {}", weights_path.display()))?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // What the tensors do not tell, for `icefm import` of the file: mmselfsup's loaders ignore
    // a safetensors header's metadata.
    let record = icefm_model::files::Recorded {
        channels: Some(cfg.data.channels.clone()),
        heads: Some(mae.encoder.heads),
        decoder_heads: (exported.counts().1 > 0).then_some(mae.decoder_heads),
    };
    exported
        .write_safetensors(&a.out, &record)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let (backbone, neck) = exported.counts();
    println!(
        "read {} (run {}): width {}, blocks {}, heads {}, patch {patch}, channels {in_channels}",
        weights_path.display(),
        run.display(),
        mae.encoder.dim,
        mae.encoder.depth,
        mae.encoder.heads,
    );
    println!(
        "exported {} tensors ({backbone} backbone.*, {neck} neck.*); position embeddings for \
         {image} px ({g}x{g} tokens)",
        exported.tensors.len(),
        g = opts.grid
    );
    let left_out = exported.skipped.len();
    if left_out > 0 {
        println!(
            "  left out {left_out} tensors of the fine-tuning feature pyramid and heads \
             (neck.*, heads.*): mmseg's are not icefm's"
        );
    }
    println!(
        "  backbone config: img_size={image}, patch_size={patch}, in_channels={in_channels}, \
         embed_dims={}, num_layers={}, num_heads={}",
        mae.encoder.dim, mae.encoder.depth, mae.encoder.heads
    );
    if neck > 0 {
        // MAEPretrainDecoder's defaults (196 patches, 3 channels, 1024 wide) fit ImageNet's
        // ViT-L, not this model: every setting its shapes depend on.
        println!(
            "  neck config: num_patches={}, patch_size={patch}, in_chans={in_channels}, \
             embed_dim={}, decoder_embed_dim={}, decoder_depth={}, decoder_num_heads={}",
            opts.grid * opts.grid,
            mae.encoder.dim,
            mae.decoder_dim,
            mae.decoder_depth,
            mae.decoder_heads
        );
    }
    println!(
        "  in PyTorch: sd = safetensors.torch.load_file(\"{}\"); \
         torch.save({{\"state_dict\": sd}}, \"icefm_mae.pth\")",
        a.out.display()
    );
    println!("wrote {}", a.out.display());
    Ok(())
}
