//! Where scenes lie: the scenes manifest's footprints and the 2 km grid's latitude and
//! longitude, against the files' tie points read here with the netCDF library.

use super::*;
use arrow_array::Float64Array;
use zarrs::array::Array as ZarrArray;

/// A variable of `path` as stored, in f64.
fn values(path: &Path, name: &'static str) -> Vec<f64> {
    let path = path.to_path_buf();
    on_netcdf_thread(move || {
        let f = netcdf::open(&path).unwrap();
        let v = f.variable(name).unwrap();
        assert!(v.attribute("scale_factor").is_none(), "{name} is packed");
        v.get_values::<f64, _>(..).unwrap()
    })
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

/// A float column of the scenes manifest by scene id; NaN where null.
fn footprint(store: &Path, column: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for b in read_parquet(&store.join("manifests/scenes.parquet")).unwrap() {
        let ids = col::<StringArray>(&b, "scene_id");
        let v = col::<Float64Array>(&b, column);
        for i in 0..b.num_rows() {
            let x = if v.is_null(i) { f64::NAN } else { v.value(i) };
            out.insert(ids.value(i).to_string(), x);
        }
    }
    out
}

/// A 2-D float64 array of the store, and its shape.
fn grid_f64(store: &Path, node: &str) -> (Vec<u64>, Vec<f64>) {
    let fs = std::sync::Arc::new(zarrs::filesystem::FilesystemStore::new(store).unwrap());
    let a = ZarrArray::open(fs, node).unwrap();
    let shape = a.shape().to_vec();
    let v: Vec<f64> = a.retrieve_array_subset(&a.subset_all()).unwrap();
    (shape, v)
}

/// Latitude and longitude at a native pixel, bilinear in degrees between the file's tie points
/// (placed by their own `sar_grid_line` and `sar_grid_sample`): independent of icefm's 3-D
/// interpolation. The two differ by how far a great circle bows poleward of a parallel over a
/// tie-point cell: 2e-7° (2 cm) over these 0.6 km cells at 71° N.
fn planar_at(
    line: &[f64],
    sample: &[f64],
    lat: &[f64],
    lon: &[f64],
    row: f64,
    colm: f64,
) -> (f64, f64) {
    let mut rows: Vec<f64> = line.to_vec();
    rows.sort_by(f64::total_cmp);
    rows.dedup();
    let mut cols: Vec<f64> = sample.to_vec();
    cols.sort_by(f64::total_cmp);
    cols.dedup();
    let i = rows
        .iter()
        .rposition(|&r| r <= row)
        .unwrap()
        .min(rows.len() - 2);
    let j = cols
        .iter()
        .rposition(|&c| c <= colm)
        .unwrap()
        .min(cols.len() - 2);
    let fy = (row - rows[i]) / (rows[i + 1] - rows[i]);
    let fx = (colm - cols[j]) / (cols[j + 1] - cols[j]);
    let at = |v: &[f64], r: f64, c: f64| {
        let k = (0..line.len())
            .find(|&k| line[k] == r && sample[k] == c)
            .unwrap();
        v[k]
    };
    let blend = |v: &[f64]| {
        let top = at(v, rows[i], cols[j]) * (1.0 - fx) + at(v, rows[i], cols[j + 1]) * fx;
        let bot = at(v, rows[i + 1], cols[j]) * (1.0 - fx) + at(v, rows[i + 1], cols[j + 1]) * fx;
        top * (1.0 - fy) + bot * fy
    };
    (blend(lat), blend(lon))
}

#[test]
fn footprints_and_cell_latitudes_follow_the_files_tie_points() {
    let dir = tempfile::tempdir().unwrap();
    let raw = synth(dir.path(), SceneKind::Raw, 7, 0, "default");
    let rtt = synth(dir.path(), SceneKind::Rtt, 7, 1, "default");
    let mut o = SynthOptions::new(SceneKind::Raw, H, W, 8);
    o.index = 2;
    o.defect = Some(Defect::MissingVariable("sar_grid_latitude"));
    let lost = write(dir.path(), o);
    let store = dir.path().join("store.zarr");
    let summary = run(&[raw.clone(), rtt.clone(), lost.clone()], &store, "80", 64);
    assert_eq!(summary.done.len(), 3, "{:?}", summary.failed);
    // Scene ids by source file name, from the manifest.
    let mut ids = HashMap::new();
    for b in read_parquet(&store.join("manifests/scenes.parquet")).unwrap() {
        let (id, source) = (
            col::<StringArray>(&b, "scene_id"),
            col::<StringArray>(&b, "source_name"),
        );
        for i in 0..b.num_rows() {
            ids.insert(source.value(i).to_string(), id.value(i).to_string());
        }
    }
    let id = |p: &Path| ids[&p.file_name().unwrap().to_string_lossy().into_owned()].clone();
    let (raw_id, rtt_id, lost_id) = (id(&raw), id(&rtt), id(&lost));

    // Raw: bounds are the tie points'; the centre is at the image's centre, which the
    // synthetic grid places on its middle tie point.
    let (line, sample) = (
        values(&raw, "sar_grid_line"),
        values(&raw, "sar_grid_sample"),
    );
    let (lat, lon) = (
        values(&raw, "sar_grid_latitude"),
        values(&raw, "sar_grid_longitude"),
    );
    let get = |c: &str, id: &str| footprint(&store, c)[id];
    let (lo, hi) = min_max(&lat);
    assert_eq!(
        (get("min_latitude", &raw_id), get("max_latitude", &raw_id)),
        (lo, hi)
    );
    let (west, east) = min_max(&lon);
    assert!((get("west_longitude", &raw_id) - west).abs() < 1e-9);
    assert!((get("east_longitude", &raw_id) - east).abs() < 1e-9);
    let (clat, clon) = planar_at(
        &line,
        &sample,
        &lat,
        &lon,
        (H as f64 - 1.0) / 2.0,
        (W as f64 - 1.0) / 2.0,
    );
    assert!((get("centre_latitude", &raw_id) - clat).abs() < 1e-9);
    assert!((get("centre_longitude", &raw_id) - clon).abs() < 1e-9);

    // Ready-to-train: the grid's middle and its bounds, without positions.
    let (rlat, rlon) = (
        values(&rtt, "sar_grid2d_latitude"),
        values(&rtt, "sar_grid2d_longitude"),
    );
    assert_eq!(rlat.len(), 441);
    assert!((get("centre_latitude", &rtt_id) - rlat[220]).abs() < 1e-9);
    assert!((get("centre_longitude", &rtt_id) - rlon[220]).abs() < 1e-9);
    assert_eq!(get("max_latitude", &rtt_id), min_max(&rlat).1);

    // The file without latitudes: no footprint, and a warning that says why.
    assert!(get("centre_latitude", &lost_id).is_nan());
    assert!(get("east_longitude", &lost_id).is_nan());
    let warned: Vec<&(String, String)> = summary
        .warnings
        .iter()
        .filter(|(_, w)| w.contains("latitude and longitude left out"))
        .collect();
    assert_eq!(warned.len(), 1, "{:?}", summary.warnings);
    assert!(
        warned[0].0 == lost_id && warned[0].1.contains("sar_grid_latitude"),
        "{:?}",
        warned[0]
    );

    // The raw scene's 2 km cells: each centre's latitude and longitude, CF coordinates of the
    // grid.
    let node = format!("/scenes/{raw_id}");
    let (shape, cell_lat) = grid_f64(&store, &format!("{node}/latitude"));
    let (_, cell_lon) = grid_f64(&store, &format!("{node}/longitude"));
    assert_eq!(shape, [(H / 50) as u64, (W / 50) as u64]);
    for i in 0..H / 50 {
        for j in 0..W / 50 {
            let (a, o) = planar_at(
                &line,
                &sample,
                &lat,
                &lon,
                50.0 * i as f64 + 24.5,
                50.0 * j as f64 + 24.5,
            );
            let k = i * (W / 50) + j;
            assert!(
                (cell_lat[k] - a).abs() < 1e-6,
                "({i}, {j}): {} {a}",
                cell_lat[k]
            );
            assert!(
                (cell_lon[k] - o).abs() < 1e-6,
                "({i}, {j}): {} {o}",
                cell_lon[k]
            );
        }
    }
    let meta =
        std::fs::read_to_string(store.join(format!("scenes/{raw_id}/grid2km/zarr.json"))).unwrap();
    assert!(
        meta.contains("\"coordinates\": \"latitude longitude\""),
        "{meta}"
    );
    let meta =
        std::fs::read_to_string(store.join(format!("scenes/{raw_id}/latitude/zarr.json"))).unwrap();
    assert!(
        meta.contains("degrees_north") && meta.contains("\"y_2km\""),
        "{meta}"
    );
    // Not where the file gives no positions, nor where it has no latitudes.
    for id in [&rtt_id, &lost_id] {
        assert!(
            !store.join(format!("scenes/{id}/latitude")).exists(),
            "{id}"
        );
        let meta =
            std::fs::read_to_string(store.join(format!("scenes/{id}/grid2km/zarr.json"))).unwrap();
        assert!(!meta.contains("coordinates"), "{id}");
    }
}
