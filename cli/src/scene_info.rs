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

/// The merged scenes manifest of `store` and its scene ids.
fn scenes_manifest(store: &Path) -> Result<(Vec<RecordBatch>, Vec<String>)> {
    let scenes_path = store.join(MANIFESTS_DIR).join(SCENES_FILE);
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
    Ok((batches, ids))
}

/// Per level of the scene: patches, those with ≥ 50 % valid SAR, those with a SIC label.
#[derive(Default)]
struct LevelPatches {
    patches: u64,
    valid: u64,
    labelled: u64,
}

/// A latitude as `71.52° N`.
fn latitude_text(v: f64) -> String {
    format!("{:.2}° {}", v.abs(), if v < 0.0 { 'S' } else { 'N' })
}

/// A longitude as `45.25° W`.
fn longitude_text(v: f64) -> String {
    format!("{:.2}° {}", v.abs(), if v < 0.0 { 'W' } else { 'E' })
}

/// Where row `i` of the scenes manifest `b` lies, from its footprint columns.
fn location(b: &RecordBatch, i: usize, kind: &str, p: &Path) -> Result<String> {
    use icefm_schemas::manifest::FOOTPRINT_COLUMNS;
    if b.column_by_name(FOOTPRINT_COLUMNS[0]).is_none() {
        return Ok(
            "not recorded: the store was ingested before footprints were; \
                   `icefm ingest --redo` records them"
                .into(),
        );
    }
    let mut v = [0.0; 6];
    for (x, c) in v.iter_mut().zip(FOOTPRINT_COLUMNS) {
        let a = column(b, c, p)?.as_primitive::<Float64Type>();
        if !a.is_valid(i) {
            return Ok("unknown: the file has no usable latitude and longitude".into());
        }
        *x = a.value(i);
    }
    let [lat, lon, south, north, west, east] = v;
    let across = if west == -180.0 && east == 180.0 {
        " (round the pole)"
    } else if west > east {
        " (across the antimeridian)"
    } else {
        ""
    };
    let centre = if kind == "rtt" {
        "the tie-point grid's middle; the file gives no positions"
    } else {
        "the image's"
    };
    Ok(format!(
        "centre {}, {} ({centre}); tie points {} to {}, {} to {}{across}",
        latitude_text(lat),
        longitude_text(lon),
        latitude_text(south),
        latitude_text(north),
        longitude_text(west),
        longitude_text(east),
    ))
}

/// The readout of scene `name` (an id or a file name) of `store`.
pub fn scene_report(store: &Path, name: &str) -> Result<String> {
    let dir = store.join(MANIFESTS_DIR);
    let scenes_path = dir.join(SCENES_FILE);
    let (batches, ids) = scenes_manifest(store)?;
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
    let _ = writeln!(o, "  location     {}", location(b, i, &kind, p)?);
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

/// Histogram bins of the dB percentiles: 0.01 dB wide over [`DB_LOW`, `DB_HIGH`).
const DB_BIN: f64 = 0.01;
/// Lowest dB the percentile histogram resolves (lower values count in its first bin).
const DB_LOW: f64 = -60.0;
/// Highest dB the percentile histogram resolves (higher values count in its last bin).
const DB_HIGH: f64 = 20.0;

/// Valid count, sums, extremes and a fine histogram of one SAR channel's dB values.
struct DbStats {
    valid: u64,
    sum: f64,
    sum_sq: f64,
    min: f32,
    max: f32,
    bins: Vec<u64>,
}

impl DbStats {
    fn new() -> Self {
        Self {
            valid: 0,
            sum: 0.0,
            sum_sq: 0.0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            bins: vec![0; ((DB_HIGH - DB_LOW) / DB_BIN).round() as usize],
        }
    }

    fn add(&mut self, v: f32) {
        if v.is_nan() {
            return;
        }
        self.valid += 1;
        let x = f64::from(v);
        self.sum += x;
        self.sum_sq += x * x;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        let last = self.bins.len() - 1;
        let b = (((x - DB_LOW) / DB_BIN).floor().max(0.0) as usize).min(last);
        self.bins[b] += 1;
    }

    /// The `q`-quantile (0–1): the centre of the bin that holds it, within half a bin (the
    /// extremes are exact).
    fn quantile(&self, q: f64) -> f64 {
        if q <= 0.0 {
            return f64::from(self.min);
        }
        if q >= 1.0 {
            return f64::from(self.max);
        }
        let rank = (q * self.valid as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in self.bins.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let centre = DB_LOW + (b as f64 + 0.5) * DB_BIN;
                return centre.clamp(f64::from(self.min), f64::from(self.max));
            }
        }
        f64::from(self.max)
    }
}

/// `icefm inspect STORE --scene ID --level L`: the scene's arrays at one level, read back:
/// per SAR channel the valid share and the dB distribution, the incidence angle's range, the
/// land share, the labelled share per task. Reads every chunk of the level (over object storage
/// too).
pub fn level_report(store: &Path, name: &str, level: &str) -> Result<String> {
    use icefm_dataset::store::{ArrayKind, StoreReader};
    let reader = StoreReader::open(store)?;
    let level: icefm_schemas::Level = level.parse()?;
    if !reader.attrs.levels.contains(&level) {
        bail!(
            "level {level} is not in the store (it has {})",
            reader
                .attrs
                .levels
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (_, ids) = scenes_manifest(store)?;
    let id = resolve_scene(name, &ids, store)?;
    let [_, h, w] = reader.shape(&id, level, ArrayKind::Sar)?;
    let p = u64::from(reader.attrs.patch);
    let (rows, cols) = (h.div_ceil(p), w.div_ceil(p));
    let cells = h * w;
    let mut sar = [DbStats::new(), DbStats::new()];
    let (mut inc_min, mut inc_max) = (f32::INFINITY, f32::NEG_INFINITY);
    let (mut land, mut with_distance) = (0u64, 0u64);
    let mut labelled = [0u64; 3];
    let plane = (p * p) as usize;
    let floats = |c: &icefm_dataset::store::Chunk| -> Vec<f32> {
        c.0.chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    for row in 0..rows {
        for col in 0..cols {
            // The part of the chunk inside the array (the rest is fill).
            let (ch, cw) = ((h - row * p).min(p) as usize, (w - col * p).min(p) as usize);
            let s = floats(&reader.decode(&id, level, ArrayKind::Sar, row, col)?);
            let a = floats(&reader.decode(&id, level, ArrayKind::Aux, row, col)?);
            let l = reader.decode(&id, level, ArrayKind::Labels, row, col)?;
            for y in 0..ch {
                for x in 0..cw {
                    let i = y * p as usize + x;
                    sar[0].add(s[i]);
                    sar[1].add(s[plane + i]);
                    let inc = a[i];
                    if !inc.is_nan() {
                        inc_min = inc_min.min(inc);
                        inc_max = inc_max.max(inc);
                    }
                    let d = a[plane + i];
                    if !d.is_nan() {
                        with_distance += 1;
                        land += u64::from(d == 0.0);
                    }
                    for (t, n) in labelled.iter_mut().enumerate() {
                        *n += u64::from(l.0[t * plane + i] != icefm_schemas::IGNORE);
                    }
                }
            }
        }
    }
    let share = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "scene {id} at {level}: {h} x {w} cells, {rows} x {cols} patches of {p} px; HH and HV by {}",
        if reader.attrs.sar_resample.is_area() {
            "area means"
        } else {
            "bilinear sampling"
        }
    );
    let _ = writeln!(
        o,
        "\n      valid     mean      std       p1      p50      p99      min      max  (dB)"
    );
    for (name, st) in ["HH", "HV"].iter().zip(&sar) {
        if st.valid == 0 {
            let _ = writeln!(o, "{name:<4} {:>6.1}%  (no valid cell)", 0.0);
            continue;
        }
        let n = st.valid as f64;
        let mean = st.sum / n;
        let std = (st.sum_sq / n - mean * mean).max(0.0).sqrt();
        let _ = writeln!(
            o,
            "{name:<4} {:>6.1}% {mean:>8.2} {std:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            share(st.valid, cells),
            st.quantile(0.01),
            st.quantile(0.5),
            st.quantile(0.99),
            st.min,
            st.max
        );
    }
    let _ = writeln!(
        o,
        "(percentiles to within {} dB)\n\nincidence angle  {}",
        DB_BIN / 2.0,
        if inc_min <= inc_max {
            format!("{inc_min:.2}° to {inc_max:.2}°")
        } else {
            "none given".to_string()
        }
    );
    let _ = writeln!(
        o,
        "land             {:.1}% of the {with_distance} cells with a distance (zone 0)",
        share(land, with_distance)
    );
    let _ = writeln!(
        o,
        "labelled cells   SIC {:.1}%, SOD {:.1}%, FLOE {:.1}% of {cells}",
        share(labelled[0], cells),
        share(labelled[1], cells),
        share(labelled[2], cells)
    );
    Ok(o)
}
