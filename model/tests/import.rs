//! `icefm import` on a tiny SAR-IceFM / mmselfsup checkpoint written by PyTorch
//! (`model/tests/reference/make_mmselfsup_ckpt.py`, which wrote `model/tests/data/mmselfsup_tiny*.pth`
//! and `mmselfsup_tiny_reference.npz`): the mapping covers every key, the imported encoder and
//! MAE reproduce PyTorch's outputs within a relative error of 1e-4, unknown keys and foreign
//! position embeddings are errors, and the written safetensors is a training checkpoint's layout.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use icefm_model::export::{ExportError, ExportOptions, export_mmselfsup};
use icefm_model::import::{ImportError, ImportOptions, import_pth, import_state_dict, read_pth};
use icefm_model::mae::{Mae, Masking};
use icefm_model::train::named_vars;
use icefm_model::vit::Vit;

mod common;
use common::{max_rel, values};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn reference() -> HashMap<String, Tensor> {
    Tensor::read_npz(data("mmselfsup_tiny_reference.npz"))
        .unwrap()
        .into_iter()
        .collect()
}

fn vb_of(tensors: &std::collections::BTreeMap<String, Tensor>) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

#[test]
fn the_mapping_covers_every_key_of_the_mmengine_checkpoint() {
    let (layout, entries) = read_pth(&data("mmselfsup_tiny.pth")).unwrap();
    assert_eq!(layout, "`state_dict` entry");
    assert_eq!(entries.len(), 50);
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    // Every key is either imported or skipped with a reason, once.
    let mut seen: Vec<&str> = imported.mapping.iter().map(|(k, _)| k.as_str()).collect();
    seen.extend(imported.skipped.iter().map(|s| s.key.as_str()));
    let seen_set: BTreeSet<&str> = seen.iter().copied().collect();
    let keys: BTreeSet<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(seen.len(), seen_set.len(), "a key counted twice");
    assert_eq!(seen_set, keys);
    let skipped: Vec<&str> = imported.skipped.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(skipped, ["backbone.pos_embed", "neck.decoder_pos_embed"]);
    assert!(
        imported
            .skipped
            .iter()
            .all(|s| s.reason.contains("sin-cos"))
    );
    assert_eq!(imported.tensors.len(), 48);
    assert_eq!(imported.counts(), (29, 19));
    for (key, name) in [
        (
            "backbone.patch_embed.projection.weight",
            "encoder.patch_embed.weight",
        ),
        ("backbone.ln1.weight", "encoder.norm.weight"),
        (
            "backbone.layers.1.ffn.layers.0.0.weight",
            "encoder.blocks.1.mlp.fc1.weight",
        ),
        (
            "backbone.layers.1.ffn.layers.1.bias",
            "encoder.blocks.1.mlp.fc2.bias",
        ),
        ("neck.ln1.bias", "decoder.norm.bias"),
        (
            "neck.decoder_blocks.0.attn.qkv.weight",
            "decoder.blocks.0.attn.qkv.weight",
        ),
        ("neck.decoder_pred.weight", "decoder.pred.weight"),
    ] {
        assert!(
            imported
                .mapping
                .contains(&(key.to_string(), name.to_string())),
            "{key} -> {name}"
        );
    }
    // The shape, and the heads of the micro preset (the only 16-wide one).
    let e = &imported.encoder;
    assert_eq!(
        (
            e.dim,
            e.depth,
            e.heads,
            e.patch,
            e.in_channels,
            e.mlp_ratio,
            e.pos_grid
        ),
        (16, 2, Some(2), 4, 2, 2, Some(2))
    );
    let d = imported.decoder.as_ref().unwrap();
    assert_eq!((d.dim, d.depth, d.heads), (8, 1, Some(2)));
    assert_eq!(
        imported.tensors["encoder.patch_embed.weight"].dims(),
        &[16, 32]
    );
    assert!(
        imported
            .tensors
            .values()
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous())
    );
}

#[test]
fn the_imported_encoder_reproduces_pytorch() {
    let reference = reference();
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let vit = Vit::new(
        vb_of(&imported.tensors).pp("encoder"),
        &imported.vit_config().unwrap(),
    )
    .unwrap();
    let out = vit.forward(&reference["images"]).unwrap();
    assert_eq!(out.dims(), &[2, 1 + 4, 16]);
    let err = max_rel(&out, &reference["encoder_out"]);
    assert!(err <= 1e-4, "encoder output: max relative error {err:.2e}");
}

#[test]
fn the_imported_mae_reproduces_pytorch_latent_and_predictions() {
    let reference = reference();
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let mut cfg = imported.mae_config().unwrap();
    cfg.mask_ratio = 0.5;
    let mae = Mae::new(vb_of(&imported.tensors), &cfg).unwrap();
    let images = &reference["images"];
    let (b, _, h, w) = images.dims4().unwrap();
    let valid = Tensor::ones((b, h, w), DType::F32, &Device::Cpu).unwrap();
    let noise: Vec<Vec<f32>> = reference["noise"].to_vec2().unwrap();
    let masking = Masking::from_noise(&noise, cfg.mask_ratio);
    let out = mae.forward(images, &valid, &masking, None).unwrap();
    let latent = max_rel(&out.latent, &reference["latent"]);
    // `pred` in the fixture is re-ordered to icefm's (c, i, j) patch values: this checks the
    // decoder_pred row permutation.
    let pred = max_rel(&out.pred, &reference["pred"]);
    assert!(latent <= 1e-4, "latent: max relative error {latent:.2e}");
    assert!(pred <= 1e-4, "pred: max relative error {pred:.2e}");
}

#[test]
fn a_bare_backbone_only_state_dict_with_module_prefix_imports_the_encoder() {
    let reference = reference();
    let imported = import_pth(
        &data("mmselfsup_tiny_backbone.pth"),
        &ImportOptions {
            heads: Some(2),
            ..ImportOptions::default()
        },
    )
    .unwrap();
    assert_eq!(imported.layout, "bare state dict");
    assert!(imported.decoder.is_none());
    assert_eq!(imported.counts(), (29, 0));
    assert!(imported.notes.iter().any(|n| n.contains("`module.`")));
    assert!(imported.notes.iter().any(|n| n.contains("encoder only")));
    assert!(imported.mae_config().is_err());
    let vit = Vit::new(
        vb_of(&imported.tensors).pp("encoder"),
        &imported.vit_config().unwrap(),
    )
    .unwrap();
    let err = max_rel(
        &vit.forward(&reference["images"]).unwrap(),
        &reference["encoder_out"],
    );
    assert!(err <= 1e-4, "encoder output: max relative error {err:.2e}");
}

#[test]
fn a_segmentation_checkpoint_imports_its_backbone_and_skips_its_heads() {
    let (_, mut entries) = read_pth(&data("mmselfsup_tiny_backbone.pth")).unwrap();
    let t = Tensor::zeros((3, 16, 1, 1), DType::F32, &Device::Cpu).unwrap();
    entries.push(("module.decode_head.conv_seg.weight".into(), t.clone()));
    entries.push(("module.neck.lateral_convs.0.conv.weight".into(), t));
    let imported = import_state_dict(entries, &ImportOptions::default()).unwrap();
    assert!(imported.decoder.is_none());
    let skipped: Vec<&str> = imported.skipped.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        skipped,
        [
            "backbone.pos_embed",
            "decode_head.conv_seg.weight",
            "neck.lateral_convs.0.conv.weight"
        ]
    );
    assert!(imported.notes.iter().any(|n| n.contains("segmentation")));
}

/// mmcls's `ln2` beside `ln1` is the norm of the averaged tokens, not the encoder's final norm:
/// skipped with its reason, the final norm taken from `ln1` alone.
#[test]
fn the_norm_of_averaged_tokens_is_skipped_not_taken_for_the_final_norm() {
    let (_, mut entries) = read_pth(&data("mmselfsup_tiny_backbone.pth")).unwrap();
    let ln1 = entries
        .iter()
        .find(|(k, _)| k.ends_with("backbone.ln1.weight"))
        .map(|(_, t)| t.clone())
        .unwrap();
    let other = (ln1.clone() * 3.0).unwrap();
    entries.push(("module.backbone.ln2.weight".into(), other.clone()));
    entries.push(("module.backbone.ln2.bias".into(), other));
    let imported = import_state_dict(
        entries,
        &ImportOptions {
            heads: Some(2),
            ..ImportOptions::default()
        },
    )
    .unwrap();
    let skipped: Vec<&str> = imported.skipped.iter().map(|s| s.key.as_str()).collect();
    assert!(
        skipped.contains(&"backbone.ln2.weight") && skipped.contains(&"backbone.ln2.bias"),
        "{skipped:?}"
    );
    let norm = imported.tensors["encoder.norm.weight"]
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(norm, ln1.to_vec1::<f32>().unwrap());
}

#[test]
fn an_unknown_key_is_an_error_naming_it() {
    let (_, mut entries) = read_pth(&data("mmselfsup_tiny.pth")).unwrap();
    let t = Tensor::ones(16, DType::F32, &Device::Cpu).unwrap();
    entries.push(("backbone.layers.0.attn.gamma1.weight".into(), t.clone()));
    entries.push(("head.fc.weight".into(), t));
    let err = import_state_dict(entries, &ImportOptions::default()).unwrap_err();
    assert!(matches!(err, ImportError::Unmapped(_)));
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        msg.contains("backbone.layers.0.attn.gamma1.weight"),
        "{msg}"
    );
    assert!(msg.contains("head.fc.weight"), "{msg}");
    assert!(msg.starts_with("2 unmapped key(s)"), "{msg}");
}

#[test]
fn a_position_embedding_that_is_not_sincos_is_an_error_unless_allowed() {
    let (_, entries) = read_pth(&data("mmselfsup_tiny.pth")).unwrap();
    let perturbed: Vec<(String, Tensor)> = entries
        .into_iter()
        .map(|(k, t)| {
            if k == "backbone.pos_embed" {
                let t = (t + 0.01).unwrap();
                (k, t)
            } else {
                (k, t)
            }
        })
        .collect();
    let err = import_state_dict(perturbed.clone(), &ImportOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("backbone.pos_embed"), "{msg}");
    assert!(msg.contains("--allow-pos-embed-mismatch"), "{msg}");
    let lenient = ImportOptions {
        allow_pos_embed_mismatch: true,
        ..ImportOptions::default()
    };
    let imported = import_state_dict(perturbed, &lenient).unwrap();
    assert!(imported.notes.iter().any(|n| n.contains("imported anyway")));
    // The shifted class-token row is folded into cls_token, as MAEViT adds it.
    assert!(imported.notes.iter().any(|n| n.contains("class-token row")));
}

#[test]
fn heads_that_do_not_divide_the_width_are_an_error() {
    let opts = ImportOptions {
        heads: Some(3),
        ..ImportOptions::default()
    };
    let err = import_pth(&data("mmselfsup_tiny.pth"), &opts).unwrap_err();
    assert!(err.to_string().contains("heads 3"), "{err}");
}

#[test]
fn a_preset_gives_the_heads_only_if_its_shape_is_the_checkpoints() {
    let mut imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let err = imported.apply_preset("base").unwrap_err().to_string();
    assert!(err.contains("preset base is 768 wide"), "{err}");
    assert!(err.contains("the checkpoint is 16 wide"), "{err}");
    imported.apply_preset("micro").unwrap();
    assert_eq!(imported.encoder.heads, Some(2));
    assert!(
        imported
            .notes
            .iter()
            .any(|n| n == "encoder heads 2, from the micro preset")
    );
}

#[test]
fn a_missing_file_is_a_one_line_error() {
    let err = import_pth(&data("nope.pth"), &ImportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("nope.pth: no such file"), "{err}");
}

#[test]
fn the_safetensors_round_trips_in_a_training_checkpoints_layout() {
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    imported.write_safetensors(&path).unwrap();
    let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.len(), imported.tensors.len());
    for (name, t) in &imported.tensors {
        let u = &back[name];
        assert_eq!(u.dims(), t.dims(), "{name}");
        assert_eq!(values(u), values(t), "{name}");
    }
    // The names are exactly the variables of icefm's MAE, as train.rs saves and loads them.
    let vars = VarMap::new();
    Mae::new(
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        &imported.mae_config().unwrap(),
    )
    .unwrap();
    let names: BTreeSet<String> = named_vars(&vars).into_iter().map(|(n, _)| n).collect();
    let written: BTreeSet<String> = back.keys().cloned().collect();
    assert_eq!(names, written);
    for (name, var) in named_vars(&vars) {
        assert_eq!(back[&name].dims(), var.as_tensor().dims(), "{name}");
        var.set(&back[&name]).unwrap();
    }
}

/// `icefm export`'s options for the fixture: patch, channels and token grid of the import.
fn fixture_export_options(imported: &icefm_model::import::Imported) -> ExportOptions {
    ExportOptions {
        patch: imported.encoder.patch,
        in_channels: imported.encoder.in_channels,
        grid: imported.encoder.pos_grid.unwrap(),
    }
}

#[test]
fn export_writes_back_the_mmselfsup_checkpoint_it_was_imported_from() {
    let (_, entries) = read_pth(&data("mmselfsup_tiny.pth")).unwrap();
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let exported = export_mmselfsup(&imported.tensors, &fixture_export_options(&imported)).unwrap();
    // The same 50 keys PyTorch wrote, with their shapes and values: the weights bit for bit,
    // the fixed position embeddings to f32 rounding (PyTorch computes them in f32).
    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    let written: Vec<&str> = exported.tensors.keys().map(String::as_str).collect();
    assert_eq!(written, keys);
    assert_eq!(exported.counts(), (30, 20));
    assert!(exported.skipped.is_empty());
    for (key, original) in &entries {
        let t = &exported.tensors[key];
        assert_eq!(t.dims(), original.dims(), "{key}");
        let (a, b) = (values(t), values(original));
        if key.ends_with("pos_embed") {
            let gap = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f64, f64::max);
            assert!(gap < 1e-6, "{key}: {gap}");
        } else {
            assert_eq!(a, b, "{key}");
        }
    }
}

#[test]
fn an_exported_safetensors_imports_to_the_same_icefm_weights() {
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let exported = export_mmselfsup(&imported.tensors, &fixture_export_options(&imported)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sar_icefm.safetensors");
    exported
        .write_safetensors(&path, &Default::default())
        .unwrap();
    let again = import_pth(&path, &ImportOptions::default()).unwrap();
    assert_eq!(again.layout, "safetensors state dict");
    assert_eq!(
        again.tensors.keys().collect::<Vec<_>>(),
        imported.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &imported.tensors {
        assert_eq!(values(&again.tensors[name]), values(t), "{name}");
    }
    assert_eq!(again.encoder.pos_grid, imported.encoder.pos_grid);
}

/// What the tensors do not tell travels in the header: an exported file's heads (of any
/// width, a preset's or not) and channels come back on import; a flag overrides a head count,
/// with a note.
#[test]
fn an_exported_file_records_its_heads_and_channels_for_import() {
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let decoder = imported.decoder.clone().unwrap();
    let (dim, ddim) = (imported.encoder.dim, decoder.dim);
    // Head counts no preset default would give: one per width, and the width's own count.
    assert_ne!(Some(1), imported.encoder.heads);
    let exported = export_mmselfsup(&imported.tensors, &fixture_export_options(&imported)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recorded.safetensors");
    let record = icefm_model::files::Recorded {
        channels: Some(vec!["HH".into(), "HV".into()]),
        heads: Some(1),
        decoder_heads: Some(ddim),
    };
    exported.write_safetensors(&path, &record).unwrap();
    assert_eq!(icefm_model::files::Recorded::read(&path), record);
    let again = import_pth(&path, &ImportOptions::default()).unwrap();
    assert_eq!(again.encoder.heads, Some(1));
    assert_eq!(again.decoder.as_ref().unwrap().heads, Some(ddim));
    assert_eq!(again.recorded, record);
    assert!(
        again
            .notes
            .iter()
            .any(|n| n == "encoder heads 1, from the file's header (as icefm export records them)"),
        "{:?}",
        again.notes
    );
    assert!(
        again.notes.iter().any(|n| n
            == "input channels HH, HV, from the file's header (recorded in the imported file too)"),
        "{:?}",
        again.notes
    );
    // A preset replaces the header's heads, and says what the header records.
    let mut preset = again.clone();
    preset.apply_preset("micro").unwrap();
    assert!(
        preset
            .notes
            .iter()
            .any(|n| n == "encoder heads 2, from the micro preset; the file's header records 1"),
        "{:?}",
        preset.notes
    );
    let m = again.mae_config().unwrap();
    assert_eq!(
        (m.encoder.dim, m.encoder.heads, m.decoder_heads),
        (dim, 1, ddim)
    );
    // A flag wins over the header, with a note; a file without a header records nothing.
    let given = ImportOptions {
        heads: Some(dim),
        ..ImportOptions::default()
    };
    let flagged = import_pth(&path, &given).unwrap();
    assert_eq!(flagged.encoder.heads, Some(dim));
    assert!(
        flagged.notes.contains(&format!(
            "encoder heads {dim} as --heads gives them; the file's header records 1"
        )),
        "{:?}",
        flagged.notes
    );
    let bare = dir.path().join("bare.safetensors");
    exported
        .write_safetensors(&bare, &Default::default())
        .unwrap();
    assert_eq!(
        icefm_model::files::Recorded::read(&bare),
        Default::default()
    );
    assert_eq!(
        import_pth(&bare, &ImportOptions::default())
            .unwrap()
            .recorded
            .channels,
        None
    );
}

#[test]
fn export_leaves_out_fine_tuning_heads_by_name_and_refuses_unknown_names() {
    let imported = import_pth(&data("mmselfsup_tiny.pth"), &ImportOptions::default()).unwrap();
    let opts = fixture_export_options(&imported);
    // A fine-tuning checkpoint: the encoder and heads, no decoder.
    let mut weights: std::collections::BTreeMap<String, Tensor> = imported
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("encoder."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let t = Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap();
    weights.insert("heads.sic.cls.weight".into(), t.clone());
    let exported = export_mmselfsup(&weights, &opts).unwrap();
    assert_eq!(exported.counts(), (30, 0));
    assert_eq!(exported.skipped.len(), 1);
    assert_eq!(exported.skipped[0].0, "heads.sic.cls.weight");
    assert!(exported.tensors.contains_key("backbone.pos_embed"));
    assert!(!exported.tensors.contains_key("neck.decoder_pos_embed"));
    weights.insert("encoder.blocks.0.attn.gamma".into(), t);
    let err = export_mmselfsup(&weights, &opts).unwrap_err();
    assert!(matches!(err, ExportError::Unmapped(_)), "{err}");
    assert!(
        err.to_string().contains("encoder.blocks.0.attn.gamma"),
        "{err}"
    );
    // A patch or channel count the kernel does not have.
    let wrong = ExportOptions { patch: 8, ..opts };
    let err = export_mmselfsup(&imported.tensors, &wrong).unwrap_err();
    assert!(
        err.to_string().contains("not [D, C·p·p] with C = 2, p = 8"),
        "{err}"
    );
}
