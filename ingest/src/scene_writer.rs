//! Writing one scene: the band loop (reader thread → native labels → level accumulators) and
//! the level arrays with their patch statistics.

use std::sync::Arc;

use icefm_schemas::Task;
use icefm_schemas::store::{
    AUX_CHANNELS, GRID2KM_ARRAY, LABEL_CHANNELS, Level, SAR_CHANNELS, SCENES_GROUP, SarResample,
};
use rayon::prelude::*;
use serde_json::{Map, Value, json};
use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

use crate::error::{IngestError, SceneError, StoreError};
use crate::geo::Geolocation;
use crate::labels::{
    LabelCounts, PACKED_IGNORE, Packed, PolygonTable, count_classes, native_labels_into,
};
use crate::manifest::PatchRecord;
use crate::netcdf_thread::on_netcdf_thread;
use crate::pipeline::IngestOptions;
use crate::reader::{Band, InputKind, SceneInfo, SceneReader, TiePoints};
use crate::resample::{
    ChunkRow, LevelAccumulator, NativeRow, PieceRun, Run, piece_runs_of, runs_of,
};
use crate::store::{Store, write_options};

/// The reason a scene with no valid SAR pixel fails ([`crate::pipeline::ingest`] reports it):
/// `icefm predict` takes such a scene as one with no prediction.
pub const NO_VALID_SAR: &str = "every pixel is invalid (no valid HH)";

/// What writing a scene produced besides its arrays.
pub(crate) struct Written {
    pub(crate) table: Option<PolygonTable>,
    pub(crate) polygon_pixels: Vec<u64>,
    pub(crate) class_pixels: [Vec<u64>; 3],
    pub(crate) valid_pixels: u64,
    pub(crate) level_shapes: Vec<(usize, usize)>,
    pub(crate) patches: Vec<PatchRecord>,
    pub(crate) unknown_count: u32,
    pub(crate) unknown_text: String,
    pub(crate) warnings: Vec<String>,
}

/// Continuous channels carried through the pyramid: dense ones first (HH, HV, and for RTT the
/// incidence angle), then the piecewise-constant distance zone and land indicator.
const CH_HH: usize = 0;
/// RTT only; raw scenes take the incidence angle from their tie points.
const CH_INC: usize = 2;

/// Centres of `n` cells of `size` metres from the grid's outer edge: `(k + ½)·size`.
fn centres(n: usize, size: f64) -> Vec<f64> {
    (0..n).map(|k| (k as f64 + 0.5) * size).collect()
}

/// Write the latitude and longitude of each 2 km cell's centre (`latitude`, `longitude` over
/// `y_2km`, `x_2km`), interpolated between the tie points in 3-D ([`Geolocation::at_pixel`]).
fn write_cell_geolocation(
    store: &Store,
    scene_node: &str,
    g: &crate::reader::Grid2km,
    geo: &Geolocation,
) -> Result<(), StoreError> {
    let n = g.native_pixels_per_cell as f64;
    let mut lat = Vec::with_capacity(g.height * g.width);
    let mut lon = Vec::with_capacity(g.height * g.width);
    for i in 0..g.height {
        for j in 0..g.width {
            // Cell (i, j) covers native pixels [n i, n i + n): its centre is half-way.
            let centre = |k: usize| k as f64 * n + (n - 1.0) / 2.0;
            let (a, o) = geo
                .at_pixel(centre(i), centre(j))
                .unwrap_or((f64::NAN, f64::NAN));
            lat.push(a);
            lon.push(o);
        }
    }
    for (name, values, units, standard) in [
        ("latitude", lat, "degrees_north", "latitude"),
        ("longitude", lon, "degrees_east", "longitude"),
    ] {
        let mut m = Map::new();
        m.insert("units".into(), json!(units));
        m.insert("standard_name".into(), json!(standard));
        m.insert(
            "long_name".into(),
            json!(format!(
                "{standard} of the 2 km cell's centre, interpolated between the file's tie \
                 points as unit vectors (bilinear in the tie points' pixel positions)"
            )),
        );
        store.write_grid_f64(
            &format!("{scene_node}/{name}"),
            [g.height, g.width],
            ["y_2km", "x_2km"],
            values,
            m,
        )?;
    }
    Ok(())
}

/// Attributes of a position coordinate (`y` down the rows, `x` along the columns).
fn position_attrs(along_rows: bool) -> Map<String, serde_json::Value> {
    let (axis, what) = if along_rows {
        ("Y", "row")
    } else {
        ("X", "column")
    };
    let mut m = Map::new();
    m.insert("units".into(), json!("m"));
    m.insert("axis".into(), json!(axis));
    m.insert(
        "long_name".into(),
        json!(format!(
            "distance of the cell's centre from the outer edge of the scene's first {what}, along \
             the SAR grid (pixel spacing times index; not a map projection)"
        )),
    );
    m
}

/// Channel indices of (distance, land) for a scene with `dense` dense channels.
fn piecewise_channels(dense: usize) -> (usize, usize) {
    (dense, dense + 1)
}

struct LevelOut {
    level: Level,
    acc: LevelAccumulator,
    /// Dense continuous channels (the piecewise ones follow).
    dense: usize,
    /// Tie-point column brackets of this level's cell centres (raw scenes), computed once.
    incidence_cols: Vec<(usize, f64)>,
    sar: Array<FilesystemStore>,
    aux: Array<FilesystemStore>,
    labels: Array<FilesystemStore>,
    /// The store's folder, for errors that name the file.
    root: std::path::PathBuf,
    patches: Vec<PatchRecord>,
    error: Option<StoreError>,
    /// The aux chunk-row buffer, reused.
    aux_buf: Vec<f32>,
}

/// A chart whose `polygon_codes` lists an id in more than one row: its pixels take the last
/// row's classes (as a table keyed by id does), which the user should know of.
fn repeated_ids_warning(codes: &[icefm_schemas::sigrid::PolygonCode]) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    let mut repeated: Vec<i64> = codes
        .iter()
        .filter(|c| !seen.insert(c.poly_id))
        .map(|c| c.poly_id)
        .collect();
    repeated.sort_unstable();
    repeated.dedup();
    (!repeated.is_empty()).then(|| {
        format!(
            "polygon_codes lists {} polygon id(s) in more than one row ({}): their pixels \
             take the last such row's classes",
            repeated.len(),
            icefm_schemas::names::first_few(&repeated, 5)
        )
    })
}

/// A scene without a chart is ingested with every label 255: say so, and where an RTT test
/// scene's charts would have been found.
fn chart_warning(info: &SceneInfo) -> Option<String> {
    if info.has_chart {
        return None;
    }
    let stem = info
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some(match info.kind {
        InputKind::Rtt => format!(
            "no ice chart in the file (SIC, SOD, FLOE) and no {stem}_reference.nc beside it or \
             in --reference: labels are all 255"
        ),
        InputKind::Raw => "no ice chart in the file: labels are all 255".to_string(),
    })
}

fn scene_attrs(info: &SceneInfo) -> Map<String, Value> {
    let name = info
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let mut m = Map::new();
    m.insert("scene_id".into(), json!(info.scene_id));
    m.insert("ice_service".into(), json!(info.service));
    m.insert("acquired_us".into(), json!(info.acquired_us));
    m.insert("satellite".into(), json!(info.satellite));
    m.insert("source_name".into(), json!(name));
    m.insert("kind".into(), json!(info.kind.name()));
    if let Some(r) = &info.reference {
        // Only where charts came from a reference file: other scenes' attributes are as before.
        let r = r.file_name().map(|n| n.to_string_lossy().into_owned());
        m.insert("reference_name".into(), json!(r));
    }
    m.insert("native_spacing_m".into(), json!(info.native_spacing_m));
    m.insert("native_shape".into(), json!([info.height, info.width]));
    m
}

pub(crate) fn write_scene(
    store: &Store,
    reader: &Arc<SceneReader>,
    options: &IngestOptions,
    progress: impl Fn(usize),
) -> Result<Written, IngestError> {
    let info = reader.info().clone();
    let path = info.path.clone();
    let zerr = |e: StoreError| IngestError::Store(e);
    let scene_node = format!("/{SCENES_GROUP}/{}", info.scene_id);
    store
        .write_group(&scene_node, scene_attrs(&info))
        .map_err(zerr)?;
    // 2 km grids, natively, with their pixel mapping.
    let g = &info.grid2km;
    // The cells' latitude and longitude, where the tie points have pixel positions (raw).
    let cell_geo = match &info.geolocation {
        Ok(Some(geo)) if geo.positions.is_some() && g.height * g.width > 0 => Some(geo),
        _ => None,
    };
    let mut gattrs = Map::new();
    if cell_geo.is_some() {
        // CF: xarray takes the cells' latitude and longitude as the grid's coordinates.
        gattrs.insert("coordinates".into(), json!("latitude longitude"));
    }
    gattrs.insert("variables".into(), json!(g.variables));
    gattrs.insert("cell_size_m".into(), json!(2000));
    gattrs.insert(
        "native_pixels_per_cell".into(),
        json!(g.native_pixels_per_cell),
    );
    gattrs.insert(
        "pixel_mapping".into(),
        json!(format!(
            "cell (i, j) covers native pixels [{n}i, {n}i+{n}) x [{n}j, {n}j+{n}) of the {s} m SAR grid",
            n = g.native_pixels_per_cell,
            s = info.native_spacing_m
        )),
    );
    store
        .write_small_array(
            &format!("{scene_node}/{GRID2KM_ARRAY}"),
            [g.variables.len(), g.height, g.width],
            &g.data,
            gattrs,
        )
        .map_err(zerr)?;
    let variables: Vec<&str> = g.variables.iter().map(String::as_str).collect();
    store
        .write_names(&format!("{scene_node}/variable"), &variables)
        .map_err(zerr)?;
    let cell_m = g.native_pixels_per_cell as f64 * info.native_spacing_m;
    for (dim, n) in [("y_2km", g.height), ("x_2km", g.width)] {
        store
            .write_positions(
                &format!("{scene_node}/{dim}"),
                centres(n, cell_m),
                position_attrs(dim.starts_with('y')),
            )
            .map_err(zerr)?;
    }
    if let Some(geo) = cell_geo {
        write_cell_geolocation(store, &scene_node, g, geo).map_err(zerr)?;
    }

    let dense = if info.kind == InputKind::Rtt { 3 } else { 2 };
    let channels = dense + 2;
    let patch = store.attrs.patch as usize;
    let mut levels = Vec::new();
    for &level in &store.attrs.levels {
        let ratio = f64::from(level.spacing_m()) / info.native_spacing_m;
        let acc = match store.attrs.sar_resample {
            SarResample::Area => {
                LevelAccumulator::new(info.height, info.width, ratio, channels, patch)
            }
            // HH and HV, the first two dense channels.
            SarResample::Bilinear => LevelAccumulator::with_bilinear(
                info.height,
                info.width,
                ratio,
                channels,
                patch,
                SAR_CHANNELS.len(),
            ),
        };
        let (h, w) = acc.shape();
        let node = format!("{scene_node}/{}", level.name());
        let mut la = Map::new();
        la.insert("spacing_m".into(), json!(level.spacing_m()));
        la.insert("ratio".into(), json!(ratio));
        la.insert("shape".into(), json!([h, w]));
        store.write_group(&node, la).map_err(zerr)?;
        let attrs = |units: &str| {
            let mut m = Map::new();
            m.insert("units".into(), json!(units));
            m
        };
        let sar = store
            .create_level_array(
                &format!("{node}/sar"),
                "sar_channel",
                &SAR_CHANNELS,
                h,
                w,
                true,
                attrs("dB"),
            )
            .map_err(zerr)?;
        let aux = store
            .create_level_array(
                &format!("{node}/aux"),
                "aux_channel",
                &AUX_CHANNELS,
                h,
                w,
                true,
                attrs("degrees, zone"),
            )
            .map_err(zerr)?;
        let labels = store
            .create_level_array(
                &format!("{node}/labels"),
                "task",
                &LABEL_CHANNELS,
                h,
                w,
                false,
                attrs("class"),
            )
            .map_err(zerr)?;
        // Where each row and column lies, in metres along the grid: the same axes at every
        // level and for the 2 km grid, so xarray aligns them.
        let spacing = f64::from(level.spacing_m());
        for (dim, n, along_rows) in [("y", h, true), ("x", w, false)] {
            store
                .write_positions(
                    &format!("{node}/{dim}"),
                    centres(n, spacing),
                    position_attrs(along_rows),
                )
                .map_err(zerr)?;
        }
        // The channel names as coordinates, one per first dimension above.
        for (dim, names) in [
            ("sar_channel", &SAR_CHANNELS[..]),
            ("aux_channel", &AUX_CHANNELS[..]),
            ("task", &LABEL_CHANNELS[..]),
        ] {
            store
                .write_names(&format!("{node}/{dim}"), names)
                .map_err(zerr)?;
        }
        let incidence_cols = info
            .tie_points
            .as_ref()
            .map(|t| {
                (0..w)
                    .map(|x| t.col_bracket((x as f64 + 0.5) * ratio - 0.5))
                    .collect()
            })
            .unwrap_or_default();
        levels.push(LevelOut {
            level,
            acc,
            dense,
            incidence_cols,
            sar,
            aux,
            labels,
            root: store.path.clone(),
            patches: Vec::new(),
            error: None,
            aux_buf: Vec::new(),
        });
    }

    let table = (info.kind == InputKind::Raw && info.has_chart)
        .then(|| PolygonTable::new(&info.polygons, options.merge_mode));
    let mut label_counts = LabelCounts {
        polygon_pixels: vec![0u64; info.polygons.len()],
        ..LabelCounts::default()
    };
    let mut class_pixels: [Vec<u64>; 3] = Task::ALL.map(|t| vec![0u64; t.hist_len()]);
    let mut valid_pixels = 0u64;

    let band_rows = options.band_rows.unwrap_or(info.band_rows).max(1);
    let read_band = |row0: usize, rows: usize| -> Result<Band, SceneError> {
        let r = Arc::clone(reader);
        // Stored chunks on the netCDF thread, inflated here on all cores.
        on_netcdf_thread(move || r.read_band_raw(row0, rows))
            .and_then(|raw| reader.decode_band(raw))
    };
    band_pipeline(info.height, band_rows, read_band, |band| {
        let w = info.width;
        let (packed, counts) = labels_parallel(&band, table.as_ref(), w);
        label_counts.add(&counts);
        count_classes(&packed, &mut class_pixels);
        valid_pixels += band.hh.iter().filter(|v| !v.is_nan()).count() as u64;
        // Distance zones and land are piecewise constant: run-length encode them once.
        let rows: Vec<(Vec<Run>, Vec<PieceRun>, Vec<PieceRun>)> = packed
            .par_chunks(w)
            .zip(band.distance.par_chunks(w))
            .map(|(labels, distance)| {
                let mut r = Vec::new();
                runs_of(labels, &mut r);
                let mut d = Vec::new();
                piece_runs_of(distance, &mut d);
                let land = d.iter().map(|&(s, n, v)| (s, n, land_of(v))).collect();
                (r, d, land)
            })
            .collect();
        let tie = info.tie_points.as_ref();
        levels.par_iter_mut().for_each(|lv| {
            if lv.error.is_some() {
                return;
            }
            for (r, (labels, distance, land)) in rows.iter().enumerate() {
                let span = r * w..(r + 1) * w;
                let hh = &band.hh[span.clone()];
                let hv = &band.hv[span.clone()];
                let with_inc;
                let without_inc;
                let dense: &[&[f32]] = match &band.incidence {
                    Some(inc) => {
                        with_inc = [hh, hv, &inc[span]];
                        &with_inc
                    }
                    None => {
                        without_inc = [hh, hv];
                        &without_inc
                    }
                };
                let piecewise = [distance.as_slice(), land.as_slice()];
                let row = NativeRow {
                    dense,
                    piecewise: &piecewise,
                    labels,
                };
                lv.acc.push_row(band.row0 + r, row);
            }
            flush_level(lv, tie, patch);
        });
        if let Some(e) = levels.iter_mut().find_map(|l| l.error.take()) {
            return Err(e.into());
        }
        progress(band.rows);
        Ok(())
    })?;
    for lv in &mut levels {
        lv.acc.finish();
        flush_level(lv, info.tie_points.as_ref(), patch);
        if let Some(e) = lv.error.take() {
            return Err(e.into());
        }
    }
    if valid_pixels == 0 {
        return Err(SceneError::variable(&path, "nersc_sar_primary", NO_VALID_SAR).into());
    }
    let mut warnings = Vec::new();
    let mut unknown: Vec<String> = Vec::new();
    let mut unknown_count = 0u32;
    if let Some(t) = &table {
        for (code, d) in info.polygons.iter().zip(&t.derived) {
            for u in &d.unknown {
                unknown_count += 1;
                unknown.push(format!("polygon {}: {u}", code.poly_id));
            }
        }
    }
    let (orphans, out_of_table) = (label_counts.orphan_pixels, label_counts.out_of_table_pixels);
    if orphans > 0 {
        unknown_count += 1;
        unknown.push(format!(
            "{orphans} pixels with polygon ids not in polygon_codes"
        ));
    }
    if out_of_table > 0 {
        unknown_count += 1;
        unknown.push(format!(
            "{out_of_table} chart pixels with values in no class table"
        ));
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "{} code(s) outside the SIGRID-3 tables set to 255: {}",
            unknown_count,
            unknown.join("; ")
        ));
    }
    warnings.extend(chart_warning(&info));
    if let Err(why) = &info.geolocation {
        let what = match info.kind {
            InputKind::Raw => {
                "the scenes manifest has no footprint, the 2 km grid no latitude \
                               and longitude"
            }
            InputKind::Rtt => "the scenes manifest has no footprint",
        };
        warnings.push(format!("latitude and longitude left out ({what}): {why}"));
    }
    if table.is_some() {
        warnings.extend(repeated_ids_warning(&info.polygons));
    }
    let level_shapes = levels.iter().map(|l| l.acc.shape()).collect();
    let patches = levels.into_iter().flat_map(|l| l.patches).collect();
    Ok(Written {
        table,
        polygon_pixels: label_counts.polygon_pixels,
        class_pixels,
        valid_pixels,
        level_shapes,
        patches,
        unknown_count,
        unknown_text: unknown.join("; "),
        warnings,
    })
}

/// Land indicator of a distance zone: 1 on land (zone 0), 0 at sea, NaN where unknown.
/// The bands of a scene `height` rows high, `band_rows` at a time: `read` on a thread of their
/// own, one band ahead of `consume` on this one. The first error of either ends both and is
/// returned: the channel's receiving end goes with `consume`'s error, so a reader waiting to
/// hand over its next band stops instead of waiting for ever (an ingest that filled the disk
/// hung so).
fn band_pipeline<B: Send>(
    height: usize,
    band_rows: usize,
    read: impl Fn(usize, usize) -> Result<B, SceneError> + Sync,
    mut consume: impl FnMut(B) -> Result<(), IngestError>,
) -> Result<(), IngestError> {
    let band_rows = band_rows.max(1);
    let (tx, rx) = crossbeam_channel::bounded::<Result<B, SceneError>>(1);
    std::thread::scope(|s| {
        let read = &read;
        s.spawn(move || {
            let mut row0 = 0;
            while row0 < height {
                let rows = band_rows.min(height - row0);
                let band = read(row0, rows);
                let failed = band.is_err();
                if tx.send(band).is_err() || failed {
                    break;
                }
                row0 += rows;
            }
        });
        // Owned here, so that it is dropped when this closure returns, before the scope waits
        // for the reader.
        let rx = rx;
        for band in rx.iter() {
            consume(band?)?;
        }
        Ok(())
    })
}

fn land_of(distance: f32) -> f32 {
    if distance.is_nan() {
        f32::NAN
    } else if distance <= 0.0 {
        1.0
    } else {
        0.0
    }
}

/// Native labels for a band, computed on all cores in row blocks.
fn labels_parallel(
    band: &Band,
    table: Option<&PolygonTable>,
    width: usize,
) -> (Vec<Packed>, LabelCounts) {
    let block = 64 * width;
    let mut packed = vec![PACKED_IGNORE; band.hh.len()];
    let parts: Vec<LabelCounts> = packed
        .par_chunks_mut(block)
        .enumerate()
        .map(|(b, out)| native_labels_into(band, b * block..b * block + out.len(), table, out))
        .collect();
    let mut counts = LabelCounts::default();
    for p in &parts {
        counts.add(p);
    }
    (packed, counts)
}

fn flush_level(lv: &mut LevelOut, tie: Option<&TiePoints>, patch: usize) {
    for chunk in lv.acc.take_chunks() {
        if let Err(e) = store_chunk_row(lv, &chunk, tie, patch) {
            lv.error = Some(e);
            return;
        }
        lv.acc.recycle(chunk);
    }
}

fn store_chunk_row(
    lv: &mut LevelOut,
    chunk: &ChunkRow,
    tie: Option<&TiePoints>,
    p: usize,
) -> Result<(), StoreError> {
    let (h, w) = lv.acc.shape();
    let pw = lv.acc.padded_width();
    let plane = p * pw;
    let ratio = lv.acc_ratio();
    let idx = chunk.index as u64;
    let options = write_options();
    // An error names the shard file, in the store's folder.
    let root = lv.root.clone();
    let fail = move |a: &Array<FilesystemStore>, e: zarrs::array::ArrayError| {
        StoreError::zarr(root.join(a.chunk_key(&[0, idx, 0]).as_str()), e)
    };
    let store = |a: &Array<FilesystemStore>, data: &[f32]| {
        a.store_chunk_opt(&[0, idx, 0], data, &options)
            .map_err(|e| fail(a, e))
    };
    store(&lv.sar, &chunk.values[..2 * plane])?;
    let mut aux = std::mem::take(&mut lv.aux_buf);
    aux.clear();
    aux.resize(2 * plane, f32::NAN);
    let (ch_dist, ch_land) = piecewise_channels(lv.dense);
    match tie {
        Some(t) => {
            for r in 0..chunk.rows {
                let y = (chunk.index * p + r) as f64;
                let yb = t.row_bracket((y + 0.5) * ratio - 0.5);
                for (x, &xb) in lv.incidence_cols.iter().enumerate() {
                    if !chunk.values[r * pw + x].is_nan() {
                        aux[r * pw + x] = t.interpolate(yb, xb) as f32;
                    }
                }
            }
        }
        None => {
            // RTT: the resampled incidence angle, given where HH is (as the tie points' is), so
            // that a level whose HH was sampled bilinearly has no angle where HH is invalid.
            let inc = &chunk.values[CH_INC * plane..(CH_INC + 1) * plane];
            let hh = &chunk.values[CH_HH * plane..(CH_HH + 1) * plane];
            for ((a, &i), &h) in aux[..plane].iter_mut().zip(inc).zip(hh) {
                if !h.is_nan() {
                    *a = i;
                }
            }
        }
    }
    aux[plane..].copy_from_slice(&chunk.values[ch_dist * plane..(ch_dist + 1) * plane]);
    store(&lv.aux, &aux[..])?;
    lv.aux_buf = aux;
    lv.labels
        .store_chunk_opt(&[0, idx, 0], &chunk.labels[..], &options)
        .map_err(|e| fail(&lv.labels, e))?;
    // Patch statistics for the manifest.
    let name = lv.level.name();
    let y0 = chunk.index * p;
    for col in 0..pw / p {
        let x0 = col * p;
        let x1 = (x0 + p).min(w);
        if x0 >= w {
            break;
        }
        let mut valid = 0u32;
        let mut land = 0.0f64;
        let mut hist: [Vec<u32>; 3] = Task::ALL.map(|t| vec![0u32; t.hist_len()]);
        for r in 0..chunk.rows {
            let row = r * pw;
            for x in x0..x1 {
                if !chunk.values[CH_HH * plane + row + x].is_nan() {
                    valid += 1;
                }
                let l = chunk.values[ch_land * plane + row + x];
                if !l.is_nan() {
                    land += f64::from(l);
                }
            }
            for t in Task::ALL {
                let c = t.channel();
                for &v in &chunk.labels[c * plane + row + x0..c * plane + row + x1] {
                    hist[c][t.hist_bin(v)] += 1;
                }
            }
        }
        let area = (p * p) as f64;
        lv.patches.push(PatchRecord {
            level: name.clone(),
            row: chunk.index as u32,
            col: col as u32,
            y0: y0 as u32,
            x0: x0 as u32,
            height: chunk.rows.min(h - y0) as u32,
            width: (x1 - x0) as u32,
            valid_fraction: (f64::from(valid) / area) as f32,
            land_fraction: (land / area) as f32,
            hist,
        });
    }
    Ok(())
}

impl LevelOut {
    fn acc_ratio(&self) -> f64 {
        self.acc.ratio()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// `band_pipeline` on a scene of `height` rows in bands of one, `consume` failing at band
    /// `fail_at`, on a thread of its own: its result, or `None` if it has not ended in 20 s.
    fn run(height: usize, fail_at: usize) -> (Option<Result<(), String>>, usize) {
        let read = std::sync::Arc::new(AtomicUsize::new(0));
        let (done, result) = crossbeam_channel::bounded(1);
        let counter = std::sync::Arc::clone(&read);
        std::thread::spawn(move || {
            let mut seen = 0;
            let r = band_pipeline(
                height,
                1,
                |row0, _| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(row0)
                },
                |row0| {
                    assert_eq!(row0, seen, "bands in order");
                    seen += 1;
                    if row0 == fail_at {
                        let e = std::io::Error::other("No space left on device");
                        return Err(StoreError::io("store.zarr", e).into());
                    }
                    Ok(())
                },
            );
            let _ = done.send(r.map_err(|e| e.to_string()));
        });
        let r = result.recv_timeout(Duration::from_secs(20)).ok();
        (r, read.load(Ordering::SeqCst))
    }

    #[test]
    fn a_polygon_id_in_two_rows_is_warned_of() {
        use icefm_schemas::sigrid::PolygonCode;
        let code = |s: &str| PolygonCode::parse(s).unwrap();
        let once = [
            code("1;90;-9;93;07;-9;-9;-9;-9;-9;-9;-9;-9;07-9;I"),
            code("2;02;-9;98;10;-9;-9;-9;-9;-9;-9;-9;-9;10-9;W"),
        ];
        assert_eq!(repeated_ids_warning(&once), None);
        let twice = [
            once[0].clone(),
            once[1].clone(),
            code("1;30;-9;93;07;-9;-9;-9;-9;-9;-9;-9;-9;07-9;I"),
        ];
        let w = repeated_ids_warning(&twice).unwrap();
        assert!(
            w.contains("1 polygon id(s) in more than one row (1)"),
            "{w}"
        );
    }

    #[test]
    fn a_failed_band_ends_the_reader_too_instead_of_leaving_it_waiting() {
        // A write that fails at the third of a million bands (the disk full): the error comes
        // back, and the reader stopped at most two bands later (one in the channel, one held).
        let (r, read) = run(1_000_000, 2);
        let e = r.expect("band_pipeline did not end").unwrap_err();
        assert!(e.contains("No space left on device"), "{e}");
        assert!((3..=5).contains(&read), "{read} bands read");
        // Without a failure, every band once, in order.
        let (r, read) = run(50, usize::MAX);
        assert_eq!(r, Some(Ok(())));
        assert_eq!(read, 50);
    }

    #[test]
    fn a_failed_read_ends_the_scene_with_its_error() {
        let r = band_pipeline(
            10,
            3,
            |row0, rows| {
                if row0 >= 6 {
                    Err(SceneError::file(
                        "s.nc",
                        format!("rows {row0}+{rows}: truncated"),
                    ))
                } else {
                    Ok(rows)
                }
            },
            |_| Ok(()),
        );
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("s.nc") && e.contains("rows 6+3: truncated"),
            "{e}"
        );
    }
}
