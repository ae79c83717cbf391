//! Outputs of `icefm eval` / `icefm predict`: the AutoICE submission NetCDF read back through the
//! netcdf crate (and its HDF5 storage through icefm-h5chunk), the evaluation-panel and
//! confusion-matrix PNGs decoded.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

use icefm_h5chunk::Filter;
use icefm_ingest::StoreError;
use icefm_ingest::netcdf_thread::on_netcdf_thread;
use icefm_ingest::quicklook::{
    CONFUSION_DARKEST, NO_SUPPORT_COLOUR, QuicklookOptions, class_colour, write_confusion_png,
    write_eval_panel,
};
use icefm_ingest::submission::{
    DEFLATE_LEVEL, SceneMaps, SubmissionError, dimension_names, variable_name, write_submission,
};
use icefm_schemas::{IGNORE, Task};
use netcdf::types::{IntType, NcVariableType};

/// A `height × width` scene whose charts hold a different pattern each, with 255 on a diagonal.
fn scene(name: &str, height: usize, width: usize) -> SceneMaps {
    let plane = |task: Task, salt: usize| -> Vec<u8> {
        let n = task.n_classes();
        let pixels = (0..height).flat_map(|y| (0..width).map(move |x| (y, x)));
        pixels
            .map(|(y, x)| match (y + 2 * x) % 11 {
                0 => IGNORE,
                _ => ((x / 3 + y * salt) % n) as u8,
            })
            .collect()
    };
    SceneMaps {
        scene: name.into(),
        height,
        width,
        sic: plane(Task::Sic, 1),
        sod: plane(Task::Sod, 2),
        floe: plane(Task::Floe, 3),
    }
}

/// What the file holds of one chart variable: dimension (name, length) pairs, type, values.
type ReadChart = (Vec<(String, usize)>, NcVariableType, Vec<u8>);

/// Every variable name of the file at `path`, sorted, and the chart `name`.
fn read_chart(path: &Path, name: &str) -> (Vec<String>, ReadChart) {
    let (path, name) = (path.to_path_buf(), name.to_string());
    on_netcdf_thread(move || {
        let file = netcdf::open(&path).unwrap();
        let mut names: Vec<String> = file.variables().map(|v| v.name()).collect();
        names.sort();
        let var = file.variable(&name).unwrap();
        let dims = var.dimensions().iter().map(|d| (d.name(), d.len()));
        let values = var.get_values::<u8, _>(..).unwrap();
        (names, (dims.collect(), var.vartype(), values))
    })
}

/// The HDF5 filters of dataset `name` and the first two bytes of its first chunk, with the
/// chunk's filter mask (0: every filter applied).
fn storage(path: &Path, name: &str) -> (Vec<Filter>, u32, [u8; 2]) {
    let (path, name) = (path.to_path_buf(), name.to_string());
    on_netcdf_thread(move || {
        let file = icefm_h5chunk::File::open(&path).unwrap();
        let dataset = file.dataset(&name).unwrap();
        let rows = dataset.read_rows(0, 1).unwrap();
        let chunk = &rows.chunks[0];
        let filters = dataset.layout().filters.clone();
        (filters, chunk.mask, [chunk.bytes[0], chunk.bytes[1]])
    })
}

#[test]
fn submission_holds_each_chart_as_a_deflated_u8_variable_on_its_own_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload_package.nc");
    let scenes = [scene("20210328T202742_S1B", 37, 53), scene("s2", 20, 20)];
    assert!(scenes[0].sod.contains(&IGNORE) && scenes[1].floe.contains(&IGNORE));
    write_submission(&path, &scenes).unwrap();
    let mut want_names: Vec<String> = scenes
        .iter()
        .flat_map(|s| Task::ALL.map(|t| variable_name(&s.scene, t)))
        .collect();
    want_names.sort();
    assert_eq!(
        dimension_names("s2", Task::Floe),
        ["s2_FLOE_dim0", "s2_FLOE_dim1"]
    );
    for s in &scenes {
        for task in Task::ALL {
            let name = format!("{}_{}", s.scene, task.name());
            assert_eq!(variable_name(&s.scene, task), name);
            let (names, (dims, vartype, values)) = read_chart(&path, &name);
            assert_eq!(names, want_names);
            let want_dims = [
                (format!("{name}_dim0"), s.height),
                (format!("{name}_dim1"), s.width),
            ];
            assert_eq!(dims, want_dims, "{name}");
            assert_eq!(vartype, NcVariableType::Int(IntType::U8), "{name}");
            assert_eq!(values, s.chart(task), "{name}");
            // The netcdf crate does not expose a variable's filters: read the HDF5 storage.
            // Deflate alone (no shuffle), applied to the chunk, whose zlib header (0x78, FLG)
            // carries the level class in FLG's top two bits: 0 for levels 0-1 (6 would be 0x9C).
            let (filters, mask, zlib_header) = storage(&path, &name);
            assert_eq!(filters, [Filter::Deflate], "{name}");
            assert_eq!((mask, zlib_header), (0, [0x78, 0x01]), "{name}");
        }
    }
    assert_eq!(DEFLATE_LEVEL, 1);
    // Only the package is left in the directory: the temporary file was renamed.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1);
    // Writing again replaces the file.
    write_submission(&path, &scenes[1..]).unwrap();
    let (names, _) = read_chart(&path, "s2_SIC");
    assert_eq!(names, ["s2_FLOE", "s2_SIC", "s2_SOD"]);
}

#[test]
fn submission_of_a_bad_scene_names_it_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload_package.nc");
    let mut bad = scene("s_short", 20, 20);
    bad.sod.pop();
    let err = write_submission(&path, &[scene("s1", 4, 5), bad]).unwrap_err();
    assert!(
        matches!(
            &err,
            SubmissionError::Shape { scene, chart: "SOD", height: 20, width: 20, found: 399 }
                if scene == "s_short"
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "scene `s_short`: SOD has 399 values, expected 20 x 20"
    );
    let twice = write_submission(&path, &[scene("s1", 2, 2), scene("s1", 3, 3)]).unwrap_err();
    assert!(matches!(&twice, SubmissionError::Duplicate { scene } if scene == "s1"));
    let empty = write_submission(&path, &[scene("s0", 0, 7)]).unwrap_err();
    assert!(matches!(&empty, SubmissionError::Empty { scene, .. } if scene == "s0"));
    // A NetCDF failure (no such directory) names the file and leaves nothing behind.
    let missing = dir.path().join("no/such/dir/upload.nc");
    let failed = write_submission(&missing, &[scene("s1", 2, 2)]).unwrap_err();
    assert!(
        matches!(failed, SubmissionError::NetCdf { .. }),
        "{failed:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Decode the RGB PNG at `path`: (width, height, pixels).
fn decode(path: &Path) -> (usize, usize, Vec<[u8; 3]>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(3)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width as usize, info.height as usize, pixels)
}

/// Bounding box (x0, y0, x1, y1), exclusive ends, and number of the pixels of `colour`.
fn extent(
    width: usize,
    pixels: &[[u8; 3]],
    colour: [u8; 3],
) -> Option<((usize, usize, usize, usize), usize)> {
    let at = pixels.iter().enumerate().filter(|(_, p)| **p == colour);
    let xy: Vec<_> = at.map(|(i, _)| (i % width, i / width)).collect();
    let (xs, ys) = (xy.iter().map(|p| p.0), xy.iter().map(|p| p.1));
    Some((
        (
            xs.clone().min()?,
            ys.clone().min()?,
            xs.max()? + 1,
            ys.max()? + 1,
        ),
        xy.len(),
    ))
}

#[test]
fn eval_panel_png_shows_truth_and_pred_of_each_chart_in_class_colours() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("panel.png");
    // 90 × 120 pixels, max_width 40: stride 3, 30 × 40 panels. Truth and prediction are uniform
    // classes whose colours appear nowhere else (legend swatches aside); SIC has no prediction.
    let (h, w) = (90, 120);
    let hh: Vec<f32> = (0..h * w).map(|i| -30.0 + (i % w) as f32 / 4.0).collect();
    let hv = vec![f32::NAN; h * w];
    let planes = [
        vec![3u8; h * w],
        vec![4; h * w],
        vec![6; h * w],
        vec![IGNORE; h * w],
        vec![2; h * w],
        vec![1; h * w],
    ];
    let truth = [&planes[0][..], &planes[1][..], &planes[2][..]];
    let pred = [&planes[3][..], &planes[4][..], &planes[5][..]];
    let options = QuicklookOptions { max_width: 40 };
    let header = "S1A_EVAL  80m  eval panel";
    let size = write_eval_panel(&out, header, h, w, &hh, &hv, truth, pred, &options).unwrap();
    let (width, height, pixels) = decode(&out);
    assert_eq!((width, height), size);
    // Eight columns of at least the widest title ("FLOE truth", 118 px) plus margins and gaps.
    assert!(width >= 2 * 16 + 8 * 118 + 7 * 16, "{width}");
    assert!(height < 500, "{height}");
    let swatch = 12 * 12;
    let panel = (30, 40);
    let check = |task: Task, class: u8, swatches: usize| {
        let colour = class_colour(task, class);
        let ((x0, y0, x1, y1), n) = extent(width, &pixels, colour).unwrap();
        assert_eq!(
            n,
            panel.0 * panel.1 + swatches * swatch,
            "{} {class}",
            task.name()
        );
        // The panel's top-left corner is the box's; the box ends at the legend swatch.
        assert!(
            x1 - x0 >= panel.1 && y1 - y0 >= panel.0,
            "{} {class}",
            task.name()
        );
        (x0, y0)
    };
    let (sic_truth, sod_truth, floe_truth) = (
        check(Task::Sic, 3, 1),
        check(Task::Sod, 4, 1),
        check(Task::Floe, 6, 1),
    );
    let (sod_pred, floe_pred) = (check(Task::Sod, 2, 1), check(Task::Floe, 1, 1));
    // Panels left to right in chart order, truth before prediction, all on one row.
    let xs = [
        sic_truth.0,
        sod_truth.0,
        sod_pred.0,
        floe_truth.0,
        floe_pred.0,
    ];
    assert!(xs.windows(2).all(|p| p[0] < p[1]), "{xs:?}");
    let ys = [
        sic_truth.1,
        sod_truth.1,
        sod_pred.1,
        floe_truth.1,
        floe_pred.1,
    ];
    assert!(ys.iter().all(|&y| y == ys[0]), "{ys:?}");
    // The SIC prediction panel, between the SIC and SOD truth panels, is all "no prediction".
    let grey = class_colour(Task::Sic, IGNORE);
    for y in ys[0]..ys[0] + panel.0 {
        let row = &pixels[y * width + sic_truth.0 + panel.1..y * width + sod_truth.0];
        assert_eq!(
            row.iter().filter(|&&p| p == grey).count(),
            panel.1,
            "row {y}"
        );
    }
    // HV is all NaN: a black panel left of the SIC truth.
    let ((bx0, by0, _, _), black) = extent(width, &pixels, [0, 0, 0]).unwrap();
    assert!(black > panel.0 * panel.1 && bx0 < sic_truth.0 && by0 < ys[0]);

    let short = &planes[5][..w];
    let pred = [pred[0], pred[1], short];
    let bad = write_eval_panel(&out, header, h, w, &hh, &hv, truth, pred, &options).unwrap_err();
    match bad {
        StoreError::Io { path, source } => {
            assert_eq!(path, out);
            assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput);
            assert!(
                source.to_string().contains("`FLOE pred` has 120 values"),
                "{source}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn confusion_png_shades_rows_by_share_with_grey_rows_without_support() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("confusion_SOD.png");
    // Six SOD classes and "none": class 0 always right, class 1 absent, class 2 half right,
    // class 5 never predicted; the others spread.
    #[rustfmt::skip]
    let counts: [u64; 42] = [
        900, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0,
        10, 0, 50, 30, 0, 0, 10,
        0, 0, 5, 80, 15, 0, 0,
        0, 0, 0, 20, 70, 10, 0,
        0, 0, 0, 0, 0, 0, 40,
    ];
    let size = write_confusion_png(&out, Task::Sod, &counts, 6, 7).unwrap();
    let (width, height, pixels) = decode(&out);
    assert_eq!((width, height), size);
    // Two cells hold their whole row (0 → 0 and 5 → none): darkest, each 47 × 47 but its text.
    let ((x0, y0, x1, y1), n) = extent(width, &pixels, CONFUSION_DARKEST).unwrap();
    assert!(n > 2 * 47 * 47 - 2 * 400 && n <= 2 * 47 * 47, "{n}");
    assert_eq!((y1 - y0, x1 - x0), (5 * 48 + 47, 6 * 48 + 47));
    // The row of class 1 is grey across all seven cells, without text.
    let ((gx0, gy0, gx1, gy1), grey) = extent(width, &pixels, NO_SUPPORT_COLOUR).unwrap();
    assert_eq!(grey, 7 * 47 * 47);
    assert_eq!((gx0, gy0, gx1, gy1), (x0, y0 + 48, x1, y0 + 48 + 47));
    assert!(width > x1 && height > y1);

    let wrong = [
        write_confusion_png(&out, Task::Sod, &counts[..41], 6, 7),
        write_confusion_png(&out, Task::Sod, &counts, 6, 8),
        write_confusion_png(&out, Task::Sod, &counts, 7, 6),
    ];
    for result in wrong {
        let err = result.unwrap_err();
        assert!(
            matches!(&err, StoreError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::InvalidInput),
            "{err:?}"
        );
    }
    // Without the "none" column, fine too.
    let square: Vec<u64> = (0..36).map(|i| u64::from(i % 7 == 0) * 5).collect();
    let (w, _) = write_confusion_png(&out, Task::Sod, &square, 6, 6).unwrap();
    assert_eq!(decode(&out).0, w);
}
