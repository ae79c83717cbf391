//! What a loader reads, resolved when it opens: levels and their weights, input channels, the
//! regime's complete scenes, their patches from the manifest, sequential tiles and class-balanced weights.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type};
use icefm_schemas::manifest::{PATCHES_FILE, SCENES_FILE, hist_column};
use icefm_schemas::names::first_few;
use icefm_schemas::store::MANIFESTS_DIR;
use icefm_schemas::{Level, Task};

use crate::error::DatasetError;
use crate::regime::Regime;
use crate::sampler::{Transform, tile_starts};
use crate::store::{ArrayKind, StoreReader};
use crate::table::read_batches;

use super::{ChannelSource, PatchRef, Window, loader_error};

pub(super) fn cumulative(w: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut acc = 0.0;
    w.map(|x| {
        acc += x;
        acc
    })
    .collect()
}

/// The levels asked for with their weights (every store level, equal weights, when none).
pub(super) fn resolve_levels(
    reader: &StoreReader,
    store: &Path,
    asked: &[(Level, f64)],
) -> Result<Vec<(Level, f64)>, DatasetError> {
    let have = &reader.attrs.levels;
    let weighted: Vec<(Level, f64)> = if asked.is_empty() {
        have.iter().map(|&l| (l, 1.0)).collect()
    } else {
        asked.to_vec()
    };
    let missing: Vec<String> = weighted
        .iter()
        .filter(|(l, _)| !have.contains(l))
        .map(|(l, _)| l.name())
        .collect();
    if !missing.is_empty() {
        return Err(loader_error(format!(
            "{}: the store has no level {} (it has {})",
            store.display(),
            missing.join(", "),
            have.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(weighted)
}

/// Where each named input channel comes from, with its normalisation.
pub(crate) fn resolve_channels(
    reader: &StoreReader,
    names: &[String],
) -> Result<Vec<ChannelSource>, DatasetError> {
    let attrs = &reader.attrs;
    let mut channels = Vec::new();
    for name in names {
        let (kind, index) = if let Some(i) = attrs.sar_channels.iter().position(|c| c == name) {
            (ArrayKind::Sar, i)
        } else if let Some(i) = attrs.aux_channels.iter().position(|c| c == name) {
            (ArrayKind::Aux, i)
        } else {
            return Err(loader_error(format!(
                "unknown input channel `{name}` (the store has {} and {})",
                attrs.sar_channels.join(", "),
                attrs.aux_channels.join(", ")
            )));
        };
        let (mean, std) = reader.mean_std(name)?;
        channels.push(ChannelSource {
            kind,
            index,
            mean,
            inv_std: 1.0 / std,
        });
    }
    if channels.is_empty() {
        return Err(loader_error(
            "no input channel asked for (data.channels is empty)",
        ));
    }
    Ok(channels)
}

/// The regime's scenes in its order, all complete in the store (every complete scene without a
/// regime).
pub(crate) fn resolve_scenes(
    store: &Path,
    regime: Option<&Regime>,
) -> Result<Vec<Arc<str>>, DatasetError> {
    let complete = complete_scenes(store)?;
    // Patches of scenes the scenes manifest lacks (or the reverse) would be read as they are.
    crate::merged::check_manifests(store)?;
    let scenes: Vec<Arc<str>> = match regime {
        Some(r) => {
            if r.scenes.is_empty() {
                return Err(loader_error(format!("regime `{}` has no scene", r.name)));
            }
            let known: std::collections::HashSet<&str> =
                complete.iter().map(String::as_str).collect();
            let absent: Vec<&str> = r
                .scenes
                .iter()
                .map(String::as_str)
                .filter(|s| !known.contains(s))
                .collect();
            if !absent.is_empty() {
                return Err(loader_error(format!(
                    "regime `{}`: {} of its scenes are not in {}: {}",
                    r.name,
                    absent.len(),
                    store.display(),
                    first_few(&absent, 5)
                )));
            }
            r.scenes.iter().map(|s| Arc::from(s.as_str())).collect()
        }
        None => complete.iter().map(|s| Arc::from(s.as_str())).collect(),
    };
    if scenes.is_empty() {
        return Err(loader_error(format!(
            "{}: the store has no complete scene",
            store.display()
        )));
    }
    Ok(scenes)
}

/// Cumulative class-balanced weights of each level's eligible patches (`hists[level][patch]`,
/// the task's class counts): `Σ_c hist[c] / total[c]`.
pub(super) fn balanced_weights(
    hists: &[Vec<Vec<u32>>],
    weighted: &[(Level, f64)],
    task: Task,
) -> Result<Vec<Vec<f64>>, DatasetError> {
    let mut out = Vec::new();
    for (h, (level, weight)) in hists.iter().zip(weighted) {
        let mut total = vec![0u64; task.n_classes()];
        for ph in h {
            for (t, &c) in total.iter_mut().zip(ph.iter()) {
                *t += u64::from(c);
            }
        }
        let cum = cumulative(h.iter().map(|ph| {
            ph.iter()
                .zip(&total)
                .filter(|(_, t)| **t > 0)
                .map(|(&c, &t)| f64::from(c) / t as f64)
                .sum::<f64>()
        }));
        if *weight > 0.0 && cum.last().is_none_or(|&t| t <= 0.0) {
            return Err(loader_error(format!(
                "level {level}: no eligible patch has a {} label to balance",
                task.name()
            )));
        }
        out.push(cum);
    }
    Ok(out)
}

/// The sequential sampler's windows: every scene, level by level, row-major.
pub(super) fn tiles(
    extents: &[Vec<(u32, u32)>],
    crop: u32,
    overlap: u32,
) -> Result<Vec<Window>, DatasetError> {
    if overlap >= crop {
        return Err(loader_error(format!(
            "overlap {overlap} must be smaller than the crop {crop}"
        )));
    }
    let mut t = Vec::new();
    for (si, ext) in extents.iter().enumerate() {
        for (li, &(h, w)) in ext.iter().enumerate() {
            for y in tile_starts(h, crop, overlap) {
                for x in tile_starts(w, crop, overlap) {
                    t.push(Window {
                        scene: si as u32,
                        level: li as u16,
                        y0: i64::from(y),
                        x0: i64::from(x),
                        transform: Transform::IDENTITY,
                    });
                }
            }
        }
    }
    Ok(t)
}

/// Scene ids of the store's scenes manifest (complete scenes only are listed there).
pub(crate) fn complete_scenes(store: &Path) -> Result<Vec<String>, DatasetError> {
    let path = store.join(MANIFESTS_DIR).join(SCENES_FILE);
    if !crate::table::exists(&path)? {
        return Err(crate::error::no_scenes_manifest(store));
    }
    let mut out = Vec::new();
    for b in read_batches(&path, &["scene_id"])? {
        out.extend(
            b.column(0)
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(String::from),
        );
    }
    Ok(out)
}

pub(super) struct ManifestRow {
    pub(super) level: u16,
    pub(super) row: u32,
    pub(super) col: u32,
    pub(super) valid: f32,
    pub(super) patch: PatchRef,
    pub(super) hist: Vec<u32>,
}

pub(super) struct PatchManifest {
    /// `[scene][level]` → `(H, W)`.
    pub(super) extents: Vec<Vec<(u32, u32)>>,
    /// Rows of the loader's scenes and levels, sorted by scene, level, row, column.
    pub(super) rows: Vec<ManifestRow>,
}

pub(super) fn read_patches(
    store: &Path,
    scenes: &[Arc<str>],
    levels: &[Level],
    hist: Option<Task>,
) -> Result<PatchManifest, DatasetError> {
    let path = store.join(MANIFESTS_DIR).join(PATCHES_FILE);
    let scene_ix: HashMap<&str, u32> = scenes
        .iter()
        .enumerate()
        .map(|(i, s)| (&**s, i as u32))
        .collect();
    let level_ix: HashMap<String, u16> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name(), i as u16))
        .collect();
    let hist_col = hist.map(|t| hist_column(t, "hist"));
    let mut cols = vec![
        "scene_id", "level", "row", "col", "y0", "x0", "height", "width",
    ];
    cols.push("valid_fraction");
    if let Some(h) = &hist_col {
        cols.push(h);
    }
    let mut extents = vec![vec![(0u32, 0u32); levels.len()]; scenes.len()];
    let mut rows: Vec<(u32, u32, u32, ManifestRow)> = Vec::new();
    let bad =
        |what: &str| DatasetError::manifest(&path, format!("column `{what}` has the wrong type"));
    for b in read_batches(&path, &cols)? {
        let ids = b.column(0).as_string::<i32>();
        let lv = b.column(1).as_string::<i32>();
        let u32s = |i: usize, name: &str| {
            b.column(i)
                .as_primitive_opt::<UInt32Type>()
                .ok_or_else(|| bad(name))
        };
        let (r, c, y0, x0, h, w) = (
            u32s(2, "row")?,
            u32s(3, "col")?,
            u32s(4, "y0")?,
            u32s(5, "x0")?,
            u32s(6, "height")?,
            u32s(7, "width")?,
        );
        let valid = b
            .column(8)
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| bad("valid_fraction"))?;
        let hists = hist_col
            .as_ref()
            .map(|_| {
                b.column(9)
                    .as_fixed_size_list_opt()
                    .ok_or_else(|| bad("hist"))
            })
            .transpose()?;
        for i in 0..b.num_rows() {
            let (Some(&s), Some(&l)) = (scene_ix.get(ids.value(i)), level_ix.get(lv.value(i)))
            else {
                continue;
            };
            let e = &mut extents[s as usize][l as usize];
            e.0 = e.0.max(y0.value(i) + h.value(i));
            e.1 = e.1.max(x0.value(i) + w.value(i));
            let hist = match (&hists, hist) {
                (Some(hs), Some(t)) => {
                    let v = hs.value(i);
                    let v = v
                        .as_primitive_opt::<UInt32Type>()
                        .ok_or_else(|| bad("hist"))?;
                    v.values()[..t.n_classes()].to_vec()
                }
                _ => Vec::new(),
            };
            rows.push((
                s,
                r.value(i),
                c.value(i),
                ManifestRow {
                    level: l,
                    row: r.value(i),
                    col: c.value(i),
                    valid: valid.value(i),
                    patch: PatchRef {
                        scene: s,
                        y0: y0.value(i),
                        x0: x0.value(i),
                    },
                    hist,
                },
            ));
        }
    }
    for (si, ext) in extents.iter().enumerate() {
        for (li, e) in ext.iter().enumerate() {
            if e.0 == 0 || e.1 == 0 {
                return Err(DatasetError::manifest(
                    &path,
                    format!("scene {} has no patch at level {}", scenes[si], levels[li]),
                ));
            }
        }
    }
    rows.sort_by_key(|(s, r, c, m)| (*s, m.level, *r, *c));
    Ok(PatchManifest {
        extents,
        rows: rows.into_iter().map(|(_, _, _, m)| m).collect(),
    })
}
