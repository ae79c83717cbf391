//! Import a SAR-IceFM / mmselfsup MAE checkpoint (PyTorch `.pth`) into icefm's variable names.
//!
//! SAR-IceFM pre-trains with mmselfsup 1.x: an `MAEViT` backbone (an mmcls `VisionTransformer`)
//! and an `MAEPretrainDecoder` neck, saved by mmengine as `{"meta", "state_dict", "optimizer",
//! …}`. This module reads the state dict (from that layout, a `model` entry, or a bare state
//! dict; a `module.` prefix is stripped) and renames every tensor to icefm's layout, the one a
//! training checkpoint's `model.safetensors` has (`encoder.*`, `decoder.*`):
//!
//! | mmselfsup | icefm |
//! | --- | --- |
//! | `backbone.patch_embed.projection.weight` `[D, C, p, p]` | `encoder.patch_embed.weight` `[D, C·p·p]` |
//! | `backbone.patch_embed.projection.bias` | `encoder.patch_embed.bias` |
//! | `backbone.cls_token` (+ `pos_embed` row 0) | `encoder.cls_token` |
//! | `backbone.layers.{i}.ln1` / `ln2` | `encoder.blocks.{i}.ln1` / `ln2` |
//! | `backbone.layers.{i}.attn.qkv` / `attn.proj` | `encoder.blocks.{i}.attn.qkv` / `attn.proj` |
//! | `backbone.layers.{i}.ffn.layers.0.0` / `ffn.layers.1` | `encoder.blocks.{i}.mlp.fc1` / `mlp.fc2` |
//! | `backbone.ln1` (final norm) | `encoder.norm` |
//! | `neck.decoder_embed` | `decoder.embed` |
//! | `neck.mask_token` | `decoder.mask_token` |
//! | `neck.decoder_blocks.{i}.*` (block layout as above) | `decoder.blocks.{i}.*` |
//! | `neck.ln1` (decoder norm) | `decoder.norm` |
//! | `neck.decoder_pred` (rows in `(i, j, c)` order) | `decoder.pred` (rows in `(c, i, j)` order) |
//!
//! The fixed position embeddings (`backbone.pos_embed`, `neck.decoder_pos_embed`) are checked
//! against icefm's sin-cos ([`sincos_2d`]) and skipped: icefm computes them. Nothing is dropped
//! silently: a key is mapped, skipped with a reason, or the import fails naming it.
//! `docs/import.md` has the whole story.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::pickle::PthTensors;
use candle_core::{Device, Tensor};

use crate::mae::MaeConfig;
use crate::vit::VitConfig;

mod state_dict;

pub use state_dict::import_state_dict;

/// Largest difference allowed between a checkpoint's position embedding and icefm's sin-cos.
/// PyTorch computes it in f32 (`ω` by `pow`, then `r·ω` for `r` up to the grid edge), so a
/// correct table differs from icefm's f64-then-rounded one by up to a few 1e-6 on large grids.
pub const POS_EMBED_TOLERANCE: f32 = 1e-4;

/// An import failure, one line.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read as a PyTorch checkpoint.
    #[error("{path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// Keys this importer has no mapping for (listed, sorted).
    #[error("{} unmapped key(s), not imported: {}", .0.len(), .0.join(", "))]
    Unmapped(Vec<String>),
    /// The tensors do not make an icefm model (missing, mis-shaped, unsupported).
    #[error("{0}")]
    Shape(String),
    /// A tensor operation.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Choices an import cannot infer from tensor shapes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportOptions {
    /// Encoder attention heads (not stored in a checkpoint). `None`: the heads of the preset of
    /// the same width, if there is one ([`preset_heads`]).
    pub heads: Option<usize>,
    /// Decoder attention heads. `None`: 16 for a 512-wide decoder (MAE's and SAR-IceFM's), the
    /// micro model's 2 for its 8-wide one.
    pub decoder_heads: Option<usize>,
    /// Import even if a position embedding is not icefm's sin-cos (a note instead of an
    /// error). The imported model then differs from the checkpoint's.
    pub allow_pos_embed_mismatch: bool,
}

/// The encoder's shape as read from the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderShape {
    /// Token width `D`.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads, when given or inferred from the width.
    pub heads: Option<usize>,
    /// Patch edge `p`.
    pub patch: usize,
    /// Input channels `C`.
    pub in_channels: usize,
    /// MLP hidden width / `D`.
    pub mlp_ratio: usize,
    /// Token grid edge of the checkpoint's position embedding (its training crop / `p`).
    pub pos_grid: Option<usize>,
}

/// The decoder's shape as read from the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderShape {
    /// Width.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads, when given or inferred.
    pub heads: Option<usize>,
}

/// A checkpoint key left out of the import, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The checkpoint's key (after stripping `module.`).
    pub key: String,
    /// Why it is not imported.
    pub reason: String,
}

/// An imported checkpoint: icefm-named f32 tensors and what was done to get them.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Where the state dict was found: `state_dict`, `model`, or the whole file.
    pub layout: String,
    /// icefm name → tensor (f32, contiguous, on the CPU).
    pub tensors: BTreeMap<String, Tensor>,
    /// `(checkpoint key, icefm name)` for every imported tensor, sorted by icefm name.
    pub mapping: Vec<(String, String)>,
    /// Keys not imported, with reasons.
    pub skipped: Vec<Skipped>,
    /// Things worth knowing (inferred heads, stripped prefixes, folded rows, …).
    pub notes: Vec<String>,
    /// Encoder shape.
    pub encoder: EncoderShape,
    /// Decoder shape; `None` when the checkpoint has no MAE decoder (e.g. a segmentation model).
    pub decoder: Option<DecoderShape>,
    /// What a `.safetensors` checkpoint's header records (`icefm export` writes the channels and
    /// heads); nothing for a `.pth`.
    pub recorded: crate::files::Recorded,
}

/// The two block layouts: mmcls `TransformerEncoderLayer` suffix → icefm `Block` suffix.
pub const BLOCK_KEYS: [(&str, &str); 12] = [
    ("ln1.weight", "ln1.weight"),
    ("ln1.bias", "ln1.bias"),
    ("attn.qkv.weight", "attn.qkv.weight"),
    ("attn.qkv.bias", "attn.qkv.bias"),
    ("attn.proj.weight", "attn.proj.weight"),
    ("attn.proj.bias", "attn.proj.bias"),
    ("ln2.weight", "ln2.weight"),
    ("ln2.bias", "ln2.bias"),
    ("ffn.layers.0.0.weight", "mlp.fc1.weight"),
    ("ffn.layers.0.0.bias", "mlp.fc1.bias"),
    ("ffn.layers.1.weight", "mlp.fc2.weight"),
    ("ffn.layers.1.bias", "mlp.fc2.bias"),
];

/// Keys outside the blocks: mmselfsup → icefm.
pub const TOP_KEYS: [(&str, &str); 12] = [
    (
        "backbone.patch_embed.projection.weight",
        "encoder.patch_embed.weight",
    ),
    (
        "backbone.patch_embed.projection.bias",
        "encoder.patch_embed.bias",
    ),
    ("backbone.cls_token", "encoder.cls_token"),
    ("backbone.ln1.weight", "encoder.norm.weight"),
    ("backbone.ln1.bias", "encoder.norm.bias"),
    ("neck.decoder_embed.weight", "decoder.embed.weight"),
    ("neck.decoder_embed.bias", "decoder.embed.bias"),
    ("neck.mask_token", "decoder.mask_token"),
    ("neck.ln1.weight", "decoder.norm.weight"),
    ("neck.ln1.bias", "decoder.norm.bias"),
    ("neck.decoder_pred.weight", "decoder.pred.weight"),
    ("neck.decoder_pred.bias", "decoder.pred.bias"),
];

/// mmcls's and mmpretrain's norm of the averaged tokens (`out_type='avg_featmap'`): applied to
/// the pooled token, not to each token as icefm's final norm is, so it is skipped, not mapped.
const POOLED_NORM: &str = "backbone.ln2.";

const ENCODER_POS: &str = "backbone.pos_embed";
const DECODER_POS: &str = "neck.decoder_pos_embed";
/// Prefixes of a segmentation model's heads (mmseg: `decode_head.*`, `auxiliary_head.*`; a
/// multi-task segmentor's `decode_heads.*`). Their presence marks a segmentation checkpoint,
/// whose `neck.*` is then a feature pyramid, not the MAE decoder.
const SEGMENTATION_PREFIXES: [&str; 2] = ["decode_head", "auxiliary_head"];

/// icefm's name for a checkpoint key (after `module.` is stripped), if it has one. The fixed
/// position embeddings have none (icefm computes them).
pub fn icefm_name(key: &str) -> Option<String> {
    if let Some((_, to)) = TOP_KEYS.iter().find(|(from, _)| *from == key) {
        return Some((*to).to_string());
    }
    for (prefix, to) in [
        ("backbone.layers.", "encoder.blocks."),
        ("neck.decoder_blocks.", "decoder.blocks."),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (index, suffix) = rest.split_once('.')?;
            let index: usize = index.parse().ok()?;
            let (_, mapped) = BLOCK_KEYS.iter().find(|(from, _)| *from == suffix)?;
            return Some(format!("{to}{index}.{mapped}"));
        }
    }
    None
}

/// Attention heads of the preset of width `dim` (`micro` 2, `tiny` 3, `small` 6, `base` 12,
/// `large` 16, `huge` 16), with the preset's name.
pub fn preset_heads(dim: usize) -> Option<(&'static str, usize)> {
    if dim == MaeConfig::micro().encoder.dim {
        return Some(("micro", MaeConfig::micro().encoder.heads));
    }
    ["tiny", "small", "base", "large", "huge"]
        .into_iter()
        .find_map(|name| {
            VitConfig::preset(name)
                .filter(|c| c.dim == dim)
                .map(|c| (name, c.heads))
        })
}

fn read_err(path: &Path, reason: impl std::fmt::Display) -> ImportError {
    ImportError::Read {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Read a `.pth` file's state dict: the `state_dict` entry of an mmengine checkpoint, else a
/// `model` entry, else the file as a bare state dict. Returns the layout found and the tensors
/// sorted by key. Needs PyTorch's zip format (`torch.save` since 1.6).
pub fn read_pth(path: &Path) -> Result<(String, Vec<(String, Tensor)>), ImportError> {
    if !path.is_file() {
        return Err(read_err(path, "no such file"));
    }
    let mut last = None;
    for key in [Some("state_dict"), Some("model"), None] {
        match PthTensors::new(path, key) {
            Ok(pth) => {
                let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
                if names.is_empty() {
                    last = Some(read_err(
                        path,
                        "no tensors found (not a PyTorch checkpoint?)",
                    ));
                    continue;
                }
                names.sort();
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let t = pth
                        .get(name)
                        .map_err(|e| read_err(path, format!("tensor {name}: {e}")))?
                        .ok_or_else(|| read_err(path, format!("tensor {name} vanished")))?;
                    out.push((name.clone(), t));
                }
                let layout = key.map_or("bare state dict".to_string(), |k| format!("`{k}` entry"));
                return Ok((layout, out));
            }
            Err(e) => {
                let msg = e.to_string();
                if key.is_some_and(|k| msg.contains(&format!("key {k} not found"))) {
                    continue;
                }
                let hint = if msg.contains("zip") || msg.contains("op-code") {
                    " (a PyTorch zip checkpoint is needed: in Python, \
                     torch.save(torch.load(f, map_location='cpu')['state_dict'], 'sd.pth'))"
                } else {
                    ""
                };
                return Err(read_err(path, format!("{msg}{hint}")));
            }
        }
    }
    Err(last.unwrap_or_else(|| read_err(path, "no state dict found")))
}

/// A `.safetensors` file of mmselfsup keys (as `icefm export` writes, or
/// `safetensors.torch.save_file` of a state dict): its tensors sorted by key.
pub fn read_safetensors_state_dict(
    path: &Path,
) -> Result<(String, Vec<(String, Tensor)>), ImportError> {
    if !path.is_file() {
        return Err(read_err(path, "no such file"));
    }
    let mut out: Vec<(String, Tensor)> = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| read_err(path, e))?
        .into_iter()
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(("safetensors state dict".to_string(), out))
}

/// [`read_pth`] (or [`read_safetensors_state_dict`] for a `.safetensors` file) then
/// [`import_state_dict`].
pub fn import_pth(path: &Path, opts: &ImportOptions) -> Result<Imported, ImportError> {
    let safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let (layout, entries) = if safetensors {
        read_safetensors_state_dict(path)?
    } else {
        read_pth(path)?
    };
    // What `icefm export` recorded in the header: the heads, which the shapes do not tell,
    // where none are given, and the channels.
    let (record, malformed) = if safetensors {
        crate::files::Recorded::read_checked(path)
    } else {
        Default::default()
    };
    let effective = ImportOptions {
        heads: opts.heads.or(record.heads),
        decoder_heads: opts.decoder_heads.or(record.decoder_heads),
        ..opts.clone()
    };
    let mut imported = import_state_dict(entries, &effective)?;
    imported.layout = layout;
    for (what, flag, given, recorded) in [
        ("encoder", "--heads", opts.heads, record.heads),
        (
            "decoder",
            "--decoder-heads",
            opts.decoder_heads,
            record.decoder_heads,
        ),
    ] {
        match (given, recorded) {
            (None, Some(h)) => imported.notes.push(format!(
                "{what} heads {h}, from the file's header (as icefm export records them)"
            )),
            (Some(g), Some(h)) if g != h => imported.notes.push(format!(
                "{what} heads {g} as {flag} gives them; the file's header records {h}"
            )),
            _ => {}
        }
    }
    if let Some(c) = &record.channels {
        imported.notes.push(format!(
            "input channels {}, from the file's header (recorded in the imported file too)",
            c.join(", ")
        ));
    }
    imported.notes.extend(malformed);
    imported.recorded = record;
    Ok(imported)
}

impl Imported {
    /// The encoder configuration (`ln_eps` 1e-6 as mmselfsup's; no drop-path). Fails when the
    /// heads are unknown.
    pub fn vit_config(&self) -> Result<VitConfig, ImportError> {
        let e = &self.encoder;
        let heads = e.heads.ok_or_else(|| {
            ImportError::Shape(format!(
                "encoder heads unknown for width {} (pass them: --heads)",
                e.dim
            ))
        })?;
        Ok(VitConfig {
            dim: e.dim,
            depth: e.depth,
            heads,
            patch: e.patch,
            in_channels: e.in_channels,
            mlp_ratio: e.mlp_ratio,
            drop_path: 0.0,
            ln_eps: 1e-6,
        })
    }

    /// The MAE configuration (mask ratio 0.75). Fails without a decoder or with unknown heads.
    pub fn mae_config(&self) -> Result<MaeConfig, ImportError> {
        let d = self
            .decoder
            .as_ref()
            .ok_or_else(|| ImportError::Shape("the checkpoint has no MAE decoder".into()))?;
        let heads = d.heads.ok_or_else(|| {
            ImportError::Shape(format!(
                "decoder heads unknown for width {} (pass them: --decoder-heads)",
                d.dim
            ))
        })?;
        Ok(MaeConfig {
            encoder: self.vit_config()?,
            decoder_dim: d.dim,
            decoder_depth: d.depth,
            decoder_heads: heads,
            mask_ratio: 0.75,
        })
    }

    /// Take the heads of a preset (`micro`, `tiny`, `small`, `base`, `large`, `huge`) after
    /// checking that its width, depth, patch and MLP ratio are the checkpoint's.
    pub fn apply_preset(&mut self, name: &str) -> Result<(), ImportError> {
        let p = if name == "micro" {
            Some(MaeConfig::micro().encoder)
        } else {
            VitConfig::preset(name)
        }
        .ok_or_else(|| {
            ImportError::Shape(format!(
                "preset {name}: expected micro, tiny, small, base, large or huge"
            ))
        })?;
        let e = &mut self.encoder;
        if (p.dim, p.depth, p.patch, p.mlp_ratio) != (e.dim, e.depth, e.patch, e.mlp_ratio) {
            return Err(ImportError::Shape(format!(
                "preset {name} is {} wide, {} blocks, patch {}, MLP ratio {}; the checkpoint is \
                 {} wide, {} blocks, patch {}, MLP ratio {}",
                p.dim, p.depth, p.patch, p.mlp_ratio, e.dim, e.depth, e.patch, e.mlp_ratio
            )));
        }
        e.heads = Some(p.heads);
        self.notes.retain(|n| !n.starts_with("encoder heads"));
        let header = match self.recorded.heads {
            Some(h) if h != p.heads => format!("; the file's header records {h}"),
            _ => String::new(),
        };
        self.notes.push(format!(
            "encoder heads {}, from the {name} preset{header}",
            p.heads
        ));
        Ok(())
    }

    /// Tensors under `encoder.` and under `decoder.`.
    pub fn counts(&self) -> (usize, usize) {
        let enc = self
            .tensors
            .keys()
            .filter(|k| k.starts_with("encoder."))
            .count();
        (enc, self.tensors.len() - enc)
    }

    /// Write the tensors as safetensors, named as a training checkpoint's `model.safetensors`
    /// (`encoder.*`, `decoder.*`; f32).
    pub fn write_safetensors(&self, path: &Path) -> Result<(), ImportError> {
        save_named(&self.tensors, path, None).map_err(|e| read_err(path, e))
    }

    /// [`Imported::write_safetensors`], recording in the file's header what `record` gives:
    /// the input channels the encoder reads ([`crate::files::CHANNELS_KEY`]; fine-tuning from
    /// it then checks its `data.channels` against them, as it does against an icefm run's; their
    /// number must be the patch embedding's input channels) and the attention heads (fine-tuning
    /// refuses a model with others).
    pub fn write_safetensors_recorded(
        &self,
        path: &Path,
        record: &crate::files::Recorded,
    ) -> Result<(), ImportError> {
        if let Some(channels) = &record.channels
            && channels.len() != self.encoder.in_channels
        {
            return Err(ImportError::Shape(format!(
                "{} channel name(s) given ({}), but the encoder reads {} input channel(s)",
                channels.len(),
                channels.join(", "),
                self.encoder.in_channels
            )));
        }
        save_named(&self.tensors, path, record.metadata()).map_err(|e| read_err(path, e))
    }
}

pub(crate) fn save_named(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) -> candle_core::Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    crate::files::save_safetensors_with(&map, path, metadata)
}
