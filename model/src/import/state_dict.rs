//! Renaming a state dict to icefm's layout: the shapes read from the tensors, the checks of
//! the fixed position embeddings, the layouts converted, and nothing dropped silently.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::mae::{Mae, MaeConfig};
use crate::vit::{VitConfig, sincos_2d};

use super::{
    DECODER_POS, DecoderShape, ENCODER_POS, EncoderShape, ImportError, ImportOptions, Imported,
    POOLED_NORM, POS_EMBED_TOLERANCE, SEGMENTATION_PREFIXES, Skipped, icefm_name, preset_heads,
};

/// Largest `|a − b|` over two equally long slices.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Check a `[1, 1 + g², dim]` fixed position embedding against icefm's sin-cos; returns the
/// grid edge, the largest difference over the patch rows, and the class-token row.
fn check_pos_embed(
    t: &Tensor,
    dim: usize,
    what: &str,
) -> Result<(usize, f32, Vec<f32>), ImportError> {
    let bad = || {
        ImportError::Shape(format!(
            "{what} has shape {:?}, expected [1, 1 + N, {dim}] with a square token grid",
            t.dims()
        ))
    };
    let (one, n, d) = t.dims3().map_err(|_| bad())?;
    if one != 1 || d != dim || n < 2 {
        return Err(bad());
    }
    let tokens = n - 1;
    let g = (tokens as f64).sqrt().round() as usize;
    if g * g != tokens {
        return Err(bad());
    }
    let rows: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let cls = rows[..dim].to_vec();
    let diff = max_abs_diff(&rows[dim..], &sincos_2d(g, g, dim));
    Ok((g, diff, cls))
}

/// The number of blocks under an icefm prefix (`encoder.blocks.` or `decoder.blocks.`): one
/// more than the largest index present.
fn block_count(tensors: &BTreeMap<String, Tensor>, prefix: &str) -> usize {
    tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split_once('.')?
                .0
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

fn dims(tensors: &BTreeMap<String, Tensor>, name: &str) -> Result<Vec<usize>, ImportError> {
    tensors
        .get(name)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| ImportError::Shape(format!("the checkpoint has no tensor for {name}")))
}

/// The first dimension of a tensor (the output width of a linear layer's weight).
fn lead(tensors: &BTreeMap<String, Tensor>, name: &str) -> Result<usize, ImportError> {
    dims(tensors, name)?
        .first()
        .copied()
        .ok_or_else(|| ImportError::Shape(format!("{name} is a scalar, expected a matrix")))
}

/// Rename a state dict's tensors (checkpoint key → tensor) to icefm's layout; see the module
/// documentation for the mapping. Fails on any key it cannot place, listing them all.
pub fn import_state_dict(
    entries: Vec<(String, Tensor)>,
    opts: &ImportOptions,
) -> Result<Imported, ImportError> {
    let mut notes = Vec::new();
    let stripped = entries
        .iter()
        .filter(|(k, _)| k.starts_with("module."))
        .count();
    if stripped > 0 {
        notes.push(format!(
            "stripped the `module.` prefix of {stripped} key(s)"
        ));
    }
    let entries: Vec<(String, Tensor)> = entries
        .into_iter()
        .map(|(k, t)| {
            (
                k.strip_prefix("module.").map_or(k.clone(), str::to_string),
                t,
            )
        })
        .collect();
    let segmentation = entries
        .iter()
        .any(|(k, _)| SEGMENTATION_PREFIXES.iter().any(|p| k.starts_with(p)));

    let mut tensors = BTreeMap::new();
    let mut source_of: BTreeMap<String, String> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut unmapped = Vec::new();
    let mut duplicates = BTreeSet::new();
    let mut encoder_pos = None;
    let mut decoder_pos = None;
    for (key, t) in entries {
        if key == ENCODER_POS {
            if encoder_pos.replace(t).is_some() {
                duplicates.insert(format!("{key} twice"));
            }
            continue;
        }
        if key.starts_with(POOLED_NORM) {
            skipped.push(Skipped {
                key,
                reason: "norm of the averaged tokens (mmcls/mmpretrain's avg_featmap), not \
                         a per-token layer; icefm pools no tokens"
                    .into(),
            });
            continue;
        }
        if key.starts_with("data_preprocessor.") {
            skipped.push(Skipped {
                key,
                reason: "input normalisation buffer, not a weight (icefm normalises in its loader)"
                    .into(),
            });
            continue;
        }
        if segmentation
            && (key.starts_with("neck.")
                || SEGMENTATION_PREFIXES.iter().any(|p| key.starts_with(p)))
        {
            skipped.push(Skipped {
                key,
                reason: "segmentation neck/head, not part of the MAE".into(),
            });
            continue;
        }
        if key == DECODER_POS {
            if decoder_pos.replace(t).is_some() {
                duplicates.insert(format!("{key} twice"));
            }
            continue;
        }
        match icefm_name(&key) {
            Some(name) => {
                if let Some(first) = source_of.get(&name) {
                    duplicates.insert(format!("{first} and {key} both give {name}"));
                    continue;
                }
                let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                source_of.insert(name.clone(), key);
                tensors.insert(name, t);
            }
            None => unmapped.push(key),
        }
    }
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(ImportError::Unmapped(unmapped));
    }
    if !duplicates.is_empty() {
        return Err(ImportError::Shape(format!(
            "duplicate keys: {}",
            duplicates.into_iter().collect::<Vec<_>>().join("; ")
        )));
    }

    // Encoder shape from the patch embedding and the blocks.
    let pw = dims(&tensors, "encoder.patch_embed.weight")?;
    let [dim, in_channels, p, p2] = pw[..]
        .try_into()
        .ok()
        .filter(|d: &[usize; 4]| d.iter().all(|&x| x > 0))
        .ok_or_else(|| {
            ImportError::Shape(format!(
                "backbone.patch_embed.projection.weight has shape {pw:?}, expected a \
                 convolution kernel [D, C, p, p]"
            ))
        })?;
    if p != p2 {
        return Err(ImportError::Shape(format!(
            "non-square patches ({p} x {p2}) are not supported"
        )));
    }
    let depth = block_count(&tensors, "encoder.blocks.");
    if depth == 0 {
        return Err(ImportError::Shape(
            "the checkpoint has no backbone.layers.*".into(),
        ));
    }
    let hidden = lead(&tensors, "encoder.blocks.0.mlp.fc1.weight")?;
    if !hidden.is_multiple_of(dim) {
        return Err(ImportError::Shape(format!(
            "MLP hidden width {hidden} is not a multiple of the width {dim}"
        )));
    }
    let mlp_ratio = hidden / dim;
    let heads = resolve_heads(opts.heads, dim, "encoder", "--heads", &mut notes, |d| {
        preset_heads(d).map(|(name, h)| (format!("the {name} preset"), h))
    })?;

    // Flatten the patch-embedding kernel: [D, C, p, p] → [D, C·p·p], values in (c, i, j) order,
    // the order of icefm's patchify.
    let name = "encoder.patch_embed.weight";
    if let Some(w) = tensors.get(name) {
        let w = w.reshape((dim, in_channels * p * p))?;
        tensors.insert(name.to_string(), w);
    }

    // The encoder position embedding: icefm's sin-cos, class-token row folded into cls_token.
    let mut pos_grid = None;
    match encoder_pos {
        Some(t) => {
            let (g, diff, cls_row) = check_pos_embed(&t, dim, ENCODER_POS)?;
            pos_grid = Some(g);
            pos_check(diff, ENCODER_POS, g, opts, &mut notes)?;
            if cls_row.iter().any(|v| *v != 0.0) {
                let cls = tensors.get("encoder.cls_token").ok_or_else(|| {
                    ImportError::Shape("the checkpoint has no backbone.cls_token".into())
                })?;
                let row = Tensor::from_vec(cls_row, (1, 1, dim), &Device::Cpu)?;
                tensors.insert("encoder.cls_token".into(), cls.broadcast_add(&row)?);
                notes.push(
                    "added backbone.pos_embed's class-token row to cls_token (MAEViT adds it)"
                        .into(),
                );
            }
            skipped.push(Skipped {
                key: ENCODER_POS.into(),
                reason: format!(
                    "fixed 2-D sin-cos ({g}x{g} tokens, max |diff| {diff:.1e} from icefm's): \
                     icefm computes it"
                ),
            });
        }
        None => notes.push(format!(
            "no {ENCODER_POS}: icefm's fixed sin-cos is assumed, as MAEViT's"
        )),
    }

    // The decoder, if any.
    let has_decoder = tensors.keys().any(|k| k.starts_with("decoder."));
    let decoder = if has_decoder {
        let dd = lead(&tensors, "decoder.embed.weight")?;
        let ddepth = block_count(&tensors, "decoder.blocks.");
        if ddepth > 0 {
            let dhidden = lead(&tensors, "decoder.blocks.0.mlp.fc1.weight")?;
            if dhidden != dd * mlp_ratio {
                return Err(ImportError::Shape(format!(
                    "decoder MLP hidden width {dhidden} is not {dd} x the encoder's MLP ratio \
                     {mlp_ratio} (icefm's decoder shares the encoder's ratio)"
                )));
            }
        }
        let values = in_channels * p * p;
        let pred = lead(&tensors, "decoder.pred.weight")?;
        if pred != values {
            return Err(ImportError::Shape(format!(
                "neck.decoder_pred gives {} values per patch, expected C·p·p = {values} \
                 (a feature-predicting decoder cannot be imported)",
                pred
            )));
        }
        // mmselfsup patchifies (i, j, c) ('nchpwq->nhwpqc'); icefm (c, i, j).
        if let Some(w) = tensors.get("decoder.pred.weight") {
            let w = w
                .reshape((p, p, in_channels, dd))?
                .permute((2, 0, 1, 3))?
                .reshape((values, dd))?;
            tensors.insert("decoder.pred.weight".into(), w);
        }
        if let Some(b) = tensors.get("decoder.pred.bias") {
            let b = b
                .reshape((p, p, in_channels))?
                .permute((2, 0, 1))?
                .reshape(values)?;
            tensors.insert("decoder.pred.bias".into(), b);
        }
        let dheads = resolve_heads(
            opts.decoder_heads,
            dd,
            "decoder",
            "--decoder-heads",
            &mut notes,
            |d| match d {
                512 => Some(("MAE's and SAR-IceFM's decoder".to_string(), 16)),
                8 => Some(("the micro decoder".to_string(), 2)),
                _ => None,
            },
        )?;
        match decoder_pos {
            Some(t) => {
                let (g, diff, cls_row) = check_pos_embed(&t, dd, DECODER_POS)?;
                let cls_diff = cls_row.iter().fold(0f32, |m, v| m.max(v.abs()));
                pos_check(diff.max(cls_diff), DECODER_POS, g, opts, &mut notes)?;
                skipped.push(Skipped {
                    key: DECODER_POS.into(),
                    reason: format!(
                        "fixed 2-D sin-cos ({g}x{g} tokens, max |diff| {:.1e} from icefm's): \
                         icefm computes it",
                        diff.max(cls_diff)
                    ),
                });
            }
            None => notes.push(format!(
                "no {DECODER_POS}: icefm's fixed sin-cos is assumed"
            )),
        }
        Some(DecoderShape {
            dim: dd,
            depth: ddepth,
            heads: dheads,
        })
    } else {
        if let Some(t) = decoder_pos {
            skipped.push(Skipped {
                key: DECODER_POS.into(),
                reason: format!(
                    "decoder position embedding {:?} without a decoder",
                    t.dims()
                ),
            });
        }
        notes.push(if segmentation {
            "a segmentation checkpoint: the encoder only, no MAE decoder".to_string()
        } else {
            "no MAE decoder (neck.*) in the checkpoint: the encoder only".to_string()
        });
        None
    };

    let tensors: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let encoder = EncoderShape {
        dim,
        depth,
        heads,
        patch: p,
        in_channels,
        mlp_ratio,
        pos_grid,
    };
    check_complete(&tensors, &encoder, decoder.as_ref())?;
    skipped.sort_by(|a, b| a.key.cmp(&b.key));
    let mapping = source_of
        .into_iter()
        .map(|(name, key)| (key, name))
        .collect();
    Ok(Imported {
        layout: "state dict".into(),
        tensors,
        mapping,
        skipped,
        notes,
        encoder,
        decoder,
        recorded: Default::default(),
    })
}

/// The heads given, or a default by width (with a note); `None` when neither.
fn resolve_heads(
    given: Option<usize>,
    dim: usize,
    what: &str,
    flag: &str,
    notes: &mut Vec<String>,
    default: impl Fn(usize) -> Option<(String, usize)>,
) -> Result<Option<usize>, ImportError> {
    let heads = match given {
        Some(h) => Some(h),
        None => match default(dim) {
            Some((from, h)) => {
                notes.push(format!(
                    "{what} heads {h}, from {from} (width {dim}): checkpoints do not store \
                     heads, {flag} sets them"
                ));
                Some(h)
            }
            None => {
                notes.push(format!(
                    "{what} heads unknown for width {dim}: checkpoints do not store heads, \
                     pass {flag}"
                ));
                None
            }
        },
    };
    if let Some(h) = heads
        && (h == 0 || !dim.is_multiple_of(h))
    {
        return Err(ImportError::Shape(format!(
            "{what} heads {h} do not divide the width {dim}"
        )));
    }
    Ok(heads)
}

/// A position embedding's verdict: fine, a note (when allowed), or an error.
fn pos_check(
    diff: f32,
    key: &str,
    g: usize,
    opts: &ImportOptions,
    notes: &mut Vec<String>,
) -> Result<(), ImportError> {
    if diff <= POS_EMBED_TOLERANCE {
        return Ok(());
    }
    let msg = format!(
        "{key} ({g}x{g} tokens) is not the fixed 2-D sin-cos icefm computes (max |diff| {diff:.2e} \
         > {POS_EMBED_TOLERANCE:.0e}): a learned or resized embedding cannot be represented"
    );
    if opts.allow_pos_embed_mismatch {
        notes.push(format!("{msg}; imported anyway, the model will differ"));
        Ok(())
    } else {
        Err(ImportError::Shape(format!(
            "{msg} (--allow-pos-embed-mismatch imports it anyway)"
        )))
    }
}

/// Every tensor icefm's model needs is there, with its shape, and nothing more: the check builds
/// the model on the tensors.
fn check_complete(
    tensors: &BTreeMap<String, Tensor>,
    enc: &EncoderShape,
    dec: Option<&DecoderShape>,
) -> Result<(), ImportError> {
    // Heads do not change shapes: any divisor builds the model.
    let vit = VitConfig {
        dim: enc.dim,
        depth: enc.depth,
        heads: 1,
        patch: enc.patch,
        in_channels: enc.in_channels,
        mlp_ratio: enc.mlp_ratio,
        drop_path: 0.0,
        ln_eps: 1e-6,
    };
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    let built = match dec {
        Some(d) => Mae::new(
            vb,
            &MaeConfig {
                encoder: vit,
                decoder_dim: d.dim,
                decoder_depth: d.depth,
                decoder_heads: 1,
                mask_ratio: 0.75,
            },
        )
        .map(|_| ()),
        None => crate::vit::Vit::new(vb.pp("encoder"), &vit).map(|_| ()),
    };
    built
        .map_err(|e| ImportError::Shape(format!("the tensors do not make an icefm model: {e}")))?;
    // The model's variable count, to catch blocks beyond those it reads (never the case as
    // depth is the largest index + 1, but a gap would leave a block short and fail above).
    let expected = 5 + 12 * enc.depth + dec.map_or(0, |d| 7 + 12 * d.depth);
    if tensors.len() != expected {
        return Err(ImportError::Shape(format!(
            "{} tensors, the model has {expected}",
            tensors.len()
        )));
    }
    Ok(())
}
