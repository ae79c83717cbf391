//! Export icefm weights under SAR-IceFM's (mmselfsup's) names: the inverse of
//! [`crate::import`], so that an encoder pre-trained here can be fine-tuned, or compared, in
//! SAR-IceFM's PyTorch code.
//!
//! The tensors are renamed by the tables of [`crate::import`] (`encoder.blocks.{i}.mlp.fc1` →
//! `backbone.layers.{i}.ffn.layers.0.0`, …) and put back in mmselfsup's layouts: the patch
//! embedding as a `[D, C, p, p]` kernel, the decoder's prediction rows in `(i, j, c)` order.
//! The fixed position embeddings that icefm computes are written as mmselfsup keeps them
//! (`backbone.pos_embed` `[1, 1 + g², D]`, `neck.decoder_pos_embed`), with a zero class-token
//! row, for a `g × g` token grid (the training image over the patch). A fine-tuning run's
//! feature pyramid (`neck.*`) and heads (`heads.*`) have no counterpart and are left out, by
//! name. `docs/import.md` has the details.
//!
//! ```no_run
//! # use std::collections::BTreeMap;
//! # use icefm_model::export::{ExportOptions, export_mmselfsup};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let weights: BTreeMap<String, candle_core::Tensor> =
//!     candle_core::safetensors::load("run/checkpoints/best/model.safetensors", &candle_core::Device::Cpu)?
//!         .into_iter()
//!         .collect();
//! let opts = ExportOptions { patch: 16, in_channels: 2, grid: 24 };
//! export_mmselfsup(&weights, &opts)?
//!     .write_safetensors("sar_icefm_mae.safetensors".as_ref(), &Default::default())?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::import::{BLOCK_KEYS, TOP_KEYS, save_named};
use crate::vit::sincos_2d;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The weights do not make an icefm encoder (missing tensors, wrong shapes).
    #[error("{0}")]
    Shape(String),
    /// Names that are neither the MAE's nor a fine-tuning model's.
    #[error("no mmselfsup name for: {}", .0.join(", "))]
    Unmapped(Vec<String>),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The weights could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// Reason.
        reason: String,
    },
    /// The file could not be written.
    #[error("{path}: {reason}")]
    Write {
        /// File.
        path: String,
        /// Reason.
        reason: String,
    },
}

/// What the weights alone do not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// Patch size `p` (the patch kernel is stored flat, `[D, C·p·p]`).
    pub patch: usize,
    /// Input channels `C`.
    pub in_channels: usize,
    /// Token grid edge of the position embeddings: mmselfsup's `img_size / patch`.
    pub grid: usize,
}

/// Weights under mmselfsup's names.
#[derive(Debug)]
pub struct Exported {
    /// mmselfsup key → tensor (f32, contiguous), sorted by key.
    pub tensors: BTreeMap<String, Tensor>,
    /// icefm names left out, each with the reason.
    pub skipped: Vec<(String, String)>,
}

/// mmselfsup's key for icefm's name `name`, if it has one: the inverse of
/// [`crate::import::icefm_name`] (the final norm is `backbone.ln1`, as `MAEViT` names it).
pub fn mmselfsup_name(name: &str) -> Option<String> {
    if let Some((from, _)) = TOP_KEYS.iter().find(|(_, to)| *to == name) {
        return Some((*from).to_string());
    }
    for (prefix, to) in [
        ("encoder.blocks.", "backbone.layers."),
        ("decoder.blocks.", "neck.decoder_blocks."),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let (index, suffix) = rest.split_once('.')?;
            let index: usize = index.parse().ok()?;
            let (from, _) = BLOCK_KEYS.iter().find(|(_, icefm)| *icefm == suffix)?;
            return Some(format!("{to}{index}.{from}"));
        }
    }
    None
}

/// A fixed position embedding as mmselfsup stores it: `[1, 1 + g², dim]`, a zero class-token
/// row then icefm's sin-cos.
fn pos_embed(grid: usize, dim: usize) -> Result<Tensor, ExportError> {
    let mut values = vec![0f32; dim];
    values.extend(sincos_2d(grid, grid, dim));
    Ok(Tensor::from_vec(
        values,
        (1, 1 + grid * grid, dim),
        &Device::Cpu,
    )?)
}

/// `weights` (a checkpoint's `model.safetensors`: `encoder.*`, and `decoder.*` or a
/// fine-tuning run's `neck.*` and `heads.*`) under mmselfsup's names and layouts.
pub fn export_mmselfsup(
    weights: &BTreeMap<String, Tensor>,
    opts: &ExportOptions,
) -> Result<Exported, ExportError> {
    let (p, c) = (opts.patch, opts.in_channels);
    let values = c * p * p;
    let kernel = "encoder.patch_embed.weight";
    let (dim, flat) = weights
        .get(kernel)
        .ok_or_else(|| ExportError::Shape(format!("no {kernel}: not an icefm encoder")))?
        .dims2()?;
    if flat != values {
        return Err(ExportError::Shape(format!(
            "{kernel} is [{dim}, {flat}], not [D, C·p·p] with C = {c}, p = {p}"
        )));
    }
    let mut tensors = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut unmapped = Vec::new();
    let mut decoder_dim = None;
    for (name, t) in weights {
        let Some(key) = mmselfsup_name(name) else {
            if name.starts_with("heads.") || name.starts_with("neck.") {
                skipped.push((
                    name.clone(),
                    "fine-tuning feature pyramid or head: mmseg's are not icefm's; the \
                     backbone alone is exported"
                        .to_string(),
                ));
            } else {
                unmapped.push(name.clone());
            }
            continue;
        };
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let t = match name.as_str() {
            "encoder.patch_embed.weight" => t.reshape((dim, c, p, p))?,
            // icefm predicts each patch's values in (c, i, j) order, mmselfsup in (i, j, c).
            "decoder.pred.weight" => {
                let (rows, dd) = t.dims2()?;
                if rows != values {
                    return Err(ExportError::Shape(format!(
                        "{name} has {rows} rows, not C·p·p = {values}"
                    )));
                }
                t.reshape((c, p, p, dd))?
                    .permute((1, 2, 0, 3))?
                    .reshape((values, dd))?
            }
            "decoder.pred.bias" => t.reshape((c, p, p))?.permute((1, 2, 0))?.reshape(values)?,
            "decoder.embed.weight" => {
                decoder_dim = Some(t.dims2()?.0);
                t
            }
            _ => t,
        };
        tensors.insert(key, t.contiguous()?);
    }
    if !unmapped.is_empty() {
        return Err(ExportError::Unmapped(unmapped));
    }
    tensors.insert("backbone.pos_embed".into(), pos_embed(opts.grid, dim)?);
    if let Some(dd) = decoder_dim {
        tensors.insert("neck.decoder_pos_embed".into(), pos_embed(opts.grid, dd)?);
    }
    Ok(Exported { tensors, skipped })
}

/// [`export_mmselfsup`] of a weights file (a checkpoint's `model.safetensors`).
pub fn export_mmselfsup_file(path: &Path, opts: &ExportOptions) -> Result<Exported, ExportError> {
    let weights: BTreeMap<String, Tensor> = crate::files::load_checked(path, &Device::Cpu)
        .map_err(|e| ExportError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?
        .into_iter()
        .collect();
    export_mmselfsup(&weights, opts)
}

impl Exported {
    /// Tensors of the backbone (`backbone.*`) and of the MAE decoder (`neck.*`).
    pub fn counts(&self) -> (usize, usize) {
        let backbone = self
            .tensors
            .keys()
            .filter(|k| k.starts_with("backbone."))
            .count();
        (backbone, self.tensors.len() - backbone)
    }

    /// Write the tensors as safetensors under their mmselfsup keys (PyTorch:
    /// `safetensors.torch.load_file`, then `torch.save({"state_dict": sd}, "x.pth")` for
    /// mmengine's `load_checkpoint`).
    /// `record` goes into the file's header (the run's channels and heads, which the tensors do
    /// not tell): `icefm import` of the file takes them from there.
    pub fn write_safetensors(
        &self,
        path: &Path,
        record: &crate::files::Recorded,
    ) -> Result<(), ExportError> {
        save_named(&self.tensors, path, record.metadata()).map_err(|e| ExportError::Write {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }
}
