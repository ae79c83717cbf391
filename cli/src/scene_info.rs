//! `icefm inspect STORE --scene ID` without `--png`: one scene's record from the manifests (its
//! file, acquisition, shape, chart, levels, patches, class balance) and the regimes that hold
//! it. Reads the merged manifests only, so it works on a store in object storage too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int64Type, TimestampMicrosecondType, UInt8Type, UInt32Type,
    UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use icefm_dataset::table::read_manifest;
use icefm_schemas::Task;
use icefm_schemas::manifest::{PATCHES_FILE, POLYGONS_FILE, SCENES_FILE, hist_column};
use icefm_schemas::store::MANIFESTS_DIR;

/// Largest polygons listed.
const POLYGONS_LISTED: usize = 8;

/// A column of a manifest batch, or an error naming the file.
fn column<'a>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a dyn Array> {
    b.column_by_name(name)
        .map(|c| c.as_ref())
        .with_context(|| format!("{}: no column `{name}`", path.display()))
}

/// The id of a scene given by id or by the name of its raw or RTT file; an error listing some
/// of the store's scenes when it is not one of `ids`.
pub fn resolve_scene(name: &str, ids: &[String], store: &Path) -> Result<String> {
    let id = icefm_schemas::names::parse_scene_name(name)
        .map_or_else(|| name.to_string(), |n| n.scene_id);
    if !ids.contains(&id) {
        bail!(
            "scene {name:?} is not in {} (its scenes: {})",
            store.display(),
            icefm_schemas::names::first_few(ids, 5)
        );
    }
    Ok(id)
}

/// Per level of the scene: patches, those with ≥ 50 % valid SAR, those with a SIC label.
#[derive(Default)]
struct LevelPatches {
    patches: u64,
    valid: u64,
    labelled: u64,
}

/// The readout of scene `name` (an id or a file name) of `store`.
pub fn scene_report(store: &Path, name: &str) -> Result<String> {
    let dir = store.join(MANIFESTS_DIR);
    let scenes_path = dir.join(SCENES_FILE);
    if !icefm_dataset::location::exists(&scenes_path)? {
        bail!(
            "{}: no scenes manifest yet (an ingest that has not merged: `icefm manifest merge \
             --store {}`)",
            store.display(),
            store.display()
        );
    }
    let batches = read_manifest(&scenes_path)?;
    let mut ids = Vec::new();
    for b in &batches {
        ids.extend(
            column(b, "scene_id", &scenes_path)?
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string),
        );
    }
    let id = resolve_scene(name, &ids, store)?;
    let (b, i) = batches
        .iter()
        .find_map(|b| {
            let col = b.column_by_name("scene_id")?.as_string::<i32>();
            (0..b.num_rows())
                .find(|&i| col.value(i) == id)
                .map(|i| (b, i))
        })
        .context("the scene's row")?;
    let p = &scenes_path;
    let text = |c: &str| -> Result<Option<String>> {
        let a = column(b, c, p)?.as_string::<i32>();
        Ok(a.is_valid(i).then(|| a.value(i).to_string()))
    };
    let u32_of =
        |c: &str| -> Result<u32> { Ok(column(b, c, p)?.as_primitive::<UInt32Type>().value(i)) };
    let u64_of =
        |c: &str| -> Result<u64> { Ok(column(b, c, p)?.as_primitive::<UInt64Type>().value(i)) };
    let (height, width) = (u32_of("height")?, u32_of("width")?);
    let native_px = u64::from(height) * u64::from(width);
    let spacing = column(b, "native_spacing_m", p)?
        .as_primitive::<Float64Type>()
        .value(i);
    let acquired = column(b, "acquired", p)?.as_primitive::<TimestampMicrosecondType>();
    let acquired = if acquired.is_valid(i) {
        icefm_schemas::calendar::utc_stamp(acquired.value(i).div_euclid(1_000_000))
    } else {
        "unknown".to_string()
    };
    let valid = u64_of("valid_pixels")?;
    let mut class_pixels: [Vec<u64>; 3] = Default::default();
    for t in Task::ALL {
        let l = column(b, &hist_column(t, "pixels"), p)?
            .as_fixed_size_list()
            .value(i);
        class_pixels[t.channel()] = l.as_primitive::<UInt64Type>().values().to_vec();
    }
    let sic = &class_pixels[Task::Sic.channel()];
    let labelled: u64 = sic[..sic.len() - 1].iter().sum();
    // Stores merged before the release column: the release from the record, as readers do.
    let release = match b.column_by_name(icefm_schemas::manifest::RELEASE_COLUMN) {
        Some(_) => text(icefm_schemas::manifest::RELEASE_COLUMN)?.unwrap_or_default(),
        None => icefm_schemas::names::Release::of_record(&id, sic)
            .name()
            .to_string(),
    };
    let unknown = text("unknown_codes")?.unwrap_or_default();

    let kind = text("kind")?.unwrap_or_default();
    let mut o = String::new();
    let _ = writeln!(o, "scene {id}");
    let _ = writeln!(
        o,
        "  file         {} ({:.1} MB, BLAKE3 {})",
        text("source_name")?.unwrap_or_default(),
        u64_of("source_size")? as f64 / 1e6,
        text("source_checksum")?.unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "  kind         {kind}, {release} release; native {height} x {width} px at {spacing} m"
    );
    let _ = writeln!(
        o,
        "  acquired     {acquired} by {}; chart by {}",
        text("satellite")?.unwrap_or_else(|| "an unknown satellite".into()),
        text("ice_service")?.unwrap_or_else(|| "an unknown service".into())
    );
    let _ = writeln!(
        o,
        "  valid HH     {:.1}% of the native pixels; {:.1}% of them labelled (SIC)",
        100.0 * valid as f64 / native_px.max(1) as f64,
        100.0 * labelled as f64 / valid.max(1) as f64
    );
    if labelled == 0 {
        let _ = writeln!(
            o,
            "  chart        none: no pixel is labelled (a test-release file without its chart)"
        );
    } else if kind == "rtt" {
        let _ = writeln!(
            o,
            "  chart        rasters of SIC, SOD and FLOE (the ready-to-train release has no polygons)"
        );
    } else {
        let _ = writeln!(
            o,
            "  chart        {} polygon(s); codes outside the SIGRID-3 tables: {}",
            u32_of("polygons")?,
            if unknown.is_empty() { "none" } else { &unknown }
        );
    }
    let _ = writeln!(
        o,
        "  2 km grid    {} x {} cells",
        u32_of("grid2km_height")?,
        u32_of("grid2km_width")?
    );

    // Levels: shapes from the scene's record, patches from patches.parquet.
    let list = |c: &str| -> Result<arrow_array::ArrayRef> {
        Ok(column(b, c, p)?.as_list::<i32>().value(i))
    };
    let levels: Vec<String> = list("levels")?
        .as_string::<i32>()
        .iter()
        .flatten()
        .map(str::to_string)
        .collect();
    let heights = list("level_heights")?;
    let widths = list("level_widths")?;
    let (heights, widths) = (
        heights.as_primitive::<UInt32Type>().values(),
        widths.as_primitive::<UInt32Type>().values(),
    );
    let patches_path = dir.join(PATCHES_FILE);
    let mut per_level: BTreeMap<String, LevelPatches> = BTreeMap::new();
    if icefm_dataset::location::exists(&patches_path)? {
        for b in read_manifest(&patches_path)? {
            let pp = &patches_path;
            let ids = column(&b, "scene_id", pp)?.as_string::<i32>();
            let level = column(&b, "level", pp)?.as_string::<i32>();
            let vf = column(&b, "valid_fraction", pp)?.as_primitive::<Float32Type>();
            let hist = column(&b, &hist_column(Task::Sic, "hist"), pp)?.as_fixed_size_list();
            let n = Task::Sic.hist_len();
            let counts = hist.values().as_primitive::<UInt32Type>();
            for r in (0..b.num_rows()).filter(|&r| ids.value(r) == id) {
                let e = per_level.entry(level.value(r).to_string()).or_default();
                e.patches += 1;
                e.valid += u64::from(vf.value(r) >= 0.5);
                let start = (hist.offset() + r) * n;
                let labelled = (start..start + n - 1).any(|k| counts.value(k) > 0);
                e.labelled += u64::from(labelled);
            }
        }
    }
    let _ = writeln!(
        o,
        "\nlevel    shape          patches  >= 50% valid SAR  with a SIC label"
    );
    for (k, level) in levels.iter().enumerate() {
        let e = per_level.remove(level).unwrap_or_default();
        let shape = format!(
            "{} x {}",
            heights.get(k).copied().unwrap_or(0),
            widths.get(k).copied().unwrap_or(0)
        );
        let _ = writeln!(
            o,
            "{level:<8} {shape:<13} {:>8}  {:>16}  {:>16}",
            e.patches, e.valid, e.labelled
        );
    }

    // The largest polygons of its chart.
    let polygons_path = dir.join(POLYGONS_FILE);
    if icefm_dataset::location::exists(&polygons_path)? {
        let mut rows: Vec<(u64, String)> = Vec::new();
        for b in read_manifest(&polygons_path)? {
            let pp = &polygons_path;
            let ids = column(&b, "scene_id", pp)?.as_string::<i32>();
            let poly = column(&b, "poly_id", pp)?.as_primitive::<Int64Type>();
            let pixels = column(&b, "pixels", pp)?.as_primitive::<UInt64Type>();
            let code = |c: &str| -> Result<_> { Ok(column(&b, c, pp)?.as_string::<i32>()) };
            let (ct, poly_type) = (code("ct")?, code("poly_type")?);
            let class =
                |c: &str| -> Result<_> { Ok(column(&b, c, pp)?.as_primitive::<UInt8Type>()) };
            let (sic, sod, floe) = (class("sic")?, class("sod")?, class("floe")?);
            for r in (0..b.num_rows()).filter(|&r| ids.value(r) == id) {
                let name = |t: Task, v: u8| {
                    t.class_names()
                        .get(usize::from(v))
                        .map_or_else(|| "no label".to_string(), |n| (*n).to_string())
                };
                rows.push((
                    pixels.value(r),
                    format!(
                        "{:>8} {:<5} {:<4} {:<6} {:<14} {:<14}",
                        poly.value(r),
                        poly_type.value(r),
                        ct.value(r),
                        name(Task::Sic, sic.value(r)),
                        name(Task::Sod, sod.value(r)),
                        name(Task::Floe, floe.value(r)),
                    ),
                ));
            }
        }
        if !rows.is_empty() {
            rows.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            let total: u64 = rows.iter().map(|r| r.0).sum();
            let _ = writeln!(
                o,
                "\nlargest polygons ({} of {}; share: of the chart's polygon pixels):\n{:>8} {:<5} {:<4} {:<6} {:<14} {:<14} {:>12} {:>6}",
                rows.len().min(POLYGONS_LISTED),
                rows.len(),
                "poly_id",
                "type",
                "CT",
                "SIC",
                "SOD",
                "FLOE",
                "pixels",
                "share"
            );
            for (px, line) in rows.iter().take(POLYGONS_LISTED) {
                let _ = writeln!(
                    o,
                    "{line} {px:>12} {:>5.1}%",
                    100.0 * *px as f64 / total.max(1) as f64
                );
            }
        }
    }

    // The regimes that hold it.
    match crate::regime::regime_names(store) {
        Ok(names) if names.is_empty() => {}
        Ok(names) => {
            let mut holding = Vec::new();
            let mut unread = Vec::new();
            for n in names {
                match icefm_dataset::regime::Regime::open(Some(store), &n) {
                    Ok(r) if r.scenes.contains(&id) => {
                        holding.push(format!("{n} ({})", r.role.name()));
                    }
                    Ok(_) => {}
                    Err(_) => unread.push(n),
                }
            }
            let _ = writeln!(
                o,
                "\nin regimes: {}",
                if holding.is_empty() {
                    "none".to_string()
                } else {
                    holding.join(", ")
                }
            );
            if !unread.is_empty() {
                let _ = writeln!(o, "regimes that cannot be read: {}", unread.join(", "));
            }
        }
        Err(line) => {
            let _ = writeln!(o, "\n{line}");
        }
    }
    if labelled == 0 {
        let _ = writeln!(o, "\nclass balance: no labelled pixel");
    } else {
        o.push_str(&icefm_ingest::inspect::render_class_balance(&class_pixels));
    }
    Ok(o)
}
