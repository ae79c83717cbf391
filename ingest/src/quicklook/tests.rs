//! Tests of `quicklook`.
#![allow(clippy::unwrap_used)]

use super::*;

/// A `height × width` scene: HH ramps left to right across its grey range, HV top to bottom,
/// a diagonal pattern of NaN; each label plane cycles through all classes and 255.
fn synthetic(height: usize, width: usize) -> SceneRaster {
    let mut raster = SceneRaster::empty(width);
    raster.height = height;
    for (y, x) in (0..height).flat_map(|y| (0..width).map(move |x| (y, x))) {
        let hh = -32.0 + 34.0 * x as f32 / width as f32;
        let hh = if (x + y) % 17 == 0 { f32::NAN } else { hh };
        let hv = -36.0 + 28.0 * y as f32 / height as f32;
        for (plane, db) in raster.sar.iter_mut().zip([hh, hv]) {
            plane.push(db);
        }
        for task in Task::ALL {
            let n = task.n_classes();
            let v = (x / 4 + 3 * (y / 5) + task.channel()) % (n + 1);
            raster.labels[task.channel()].push(if v == n { IGNORE } else { v as u8 });
        }
    }
    raster
}

#[test]
fn class_colours_are_distinct_per_task_and_grey_for_ignore() {
    for task in Task::ALL {
        let classes = (0..task.n_classes() as u8).chain([IGNORE]);
        let colours: Vec<_> = classes.map(|k| class_colour(task, k)).collect();
        for (i, a) in colours.iter().enumerate() {
            assert!(!colours[i + 1..].contains(a), "{} class {i}", task.name());
        }
        assert_eq!(class_colour(task, IGNORE), [64, 64, 64]);
        assert_eq!(class_colour(task, task.n_classes() as u8), IGNORE_COLOUR);
    }
    // Open water is the same dark blue in every task; SIC 100 % is white.
    assert_eq!(class_colour(Task::Sod, 0), class_colour(Task::Sic, 0));
    assert_eq!(class_colour(Task::Floe, 0), class_colour(Task::Sic, 0));
    assert_eq!(class_colour(Task::Sic, 10), WHITE);
}

#[test]
fn db_to_grey_maps_endpoints_clamps_and_blacks_out_nan() {
    let (lo, hi) = HH_DB_RANGE;
    let grey = |db| db_to_grey(db, lo, hi);
    assert_eq!(
        [-30.0, 0.0, -15.0, -45.0, 12.0].map(grey),
        [0, 255, 128, 0, 255]
    );
    let odd = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    assert_eq!(odd.map(grey), [255, 0, 0]);
    let (lo, hi) = HV_DB_RANGE;
    let grey = |db| db_to_grey(db, lo, hi);
    assert_eq!([-35.0, -10.0, -22.5].map(grey), [0, 255, 128]);
}

#[test]
fn stride_and_read_bands_follow_max_width_and_shard_rows() {
    let cases = [(50, 20), (600, 600), (601, 600), (0, 600), (10, 0)];
    assert_eq!(cases.map(|(w, m)| stride_for(w, m)), [3, 1, 2, 1, 10]);
    assert_eq!(QuicklookOptions::default().max_width, DEFAULT_MAX_WIDTH);
    let bands: Vec<_> = read_bands(40, 16, 3).collect();
    assert_eq!(bands, [0..16, 18..32, 33..40]);
    // A band holding no sampled row (8..10 with stride 6) is not read.
    let bands: Vec<_> = read_bands(10, 4, 6).collect();
    assert_eq!(bands, [0..4, 6..8]);
    assert_eq!(read_bands(0, 4, 1).count(), 0);
    assert!(SceneRaster::from_planes(2, 2, vec![0.0; 7], vec![0; 12]).is_err());
}

#[test]
fn render_draws_sampled_pixels_titles_and_legends_where_the_layout_says() {
    let (full, width, stride) = (synthetic(40, 50), 50, 3);
    let header = "S1A_TEST_scene  200m";
    let canvas = render(header, &full.subsample(stride));
    let layout = Layout::new(17, 14, header);
    assert_eq!((canvas.width, canvas.height), (layout.width, layout.height));
    assert_eq!(canvas.rgb.len(), 3 * layout.width * layout.height);
    let ((hh_lo, hh_hi), (hv_lo, hv_hi)) = (HH_DB_RANGE, HV_DB_RANGE);
    for (py, px) in (0..14).flat_map(|y| (0..17).map(move |x| (y, x))) {
        let (i, y) = (py * stride * width + px * stride, layout.panel_y + py);
        let hh = db_to_grey(full.sar[0][i], hh_lo, hh_hi);
        let hv = db_to_grey(full.sar[1][i], hv_lo, hv_hi);
        assert_eq!(canvas.get(layout.column_x[0] + px, y), [hh; 3]);
        assert_eq!(canvas.get(layout.column_x[1] + px, y), [hv; 3]);
        for task in Task::ALL {
            let c = task.channel();
            let want = class_colour(task, full.labels[c][i]);
            let at = (layout.column_x[2 + c] + px, y);
            assert_eq!(canvas.get(at.0, at.1), want, "{} {at:?}", task.name());
        }
    }
    for &x in &layout.column_x {
        assert_eq!(canvas.get(x - 1, layout.panel_y - 1), FRAME_COLOUR);
        assert_eq!(canvas.get(x + 17, layout.panel_y + 14), FRAME_COLOUR);
        assert!((0..TEXT_HEIGHT).any(|dy| canvas.get(x, layout.title_y + dy) == BLACK));
    }
    for task in Task::ALL {
        let x = layout.column_x[2 + task.channel()];
        let entries = legend_entries(task);
        assert_eq!(entries.len(), task.n_classes() + 1);
        assert_eq!(entries.last().unwrap(), &(IGNORE, "255 ignore".to_string()));
        for (row, (class, _)) in entries.iter().enumerate() {
            let (y, centre) = (layout.legend_y + row * LEGEND_ROW, SWATCH / 2);
            assert_eq!(canvas.get(x, y), BLACK);
            assert_eq!(
                canvas.get(x + centre, y + centre),
                class_colour(task, *class)
            );
        }
    }
    // The header's 'S' starts its left column in its second row; the bottom margin is blank.
    assert_eq!(canvas.get(MARGIN, MARGIN + TEXT_SCALE - 1), WHITE);
    assert_eq!(canvas.get(MARGIN, MARGIN + TEXT_SCALE), BLACK);
    assert!((0..canvas.width).all(|x| canvas.get(x, canvas.height - 1) == WHITE));
}

/// Write `raster` as scene `s1` at `level` into a new store of 16-pixel patches.
fn write_store(path: &Path, raster: &SceneRaster, level: Level) {
    use zarrs::array::ArraySubset;
    let codec = icefm_schemas::store::Codec::Zstd { level: 1 };
    let store = Store::open_or_create(path, crate::store::new_attrs(&[level], 16, codec));
    let (store, node) = (store.unwrap(), format!("/{SCENES_GROUP}/s1/{level}"));
    let (h, w) = (raster.height, raster.width);
    let new = |name: &str, channels: &[&str], float| {
        let node = format!("{node}/{name}");
        store.create_level_array(&node, "channel", channels, h, w, float, Default::default())
    };
    let all = |c| ArraySubset::new_with_ranges(&[0..c, 0..h as u64, 0..w as u64]);
    let sar = new("sar", &["HH", "HV"], true).unwrap();
    sar.store_array_subset(&all(2), &raster.sar.concat()[..])
        .unwrap();
    let labels = new("labels", &["SIC", "SOD", "FLOE"], false).unwrap();
    labels
        .store_array_subset(&all(3), &raster.labels.concat()[..])
        .unwrap();
}

#[test]
fn write_quicklook_reads_bands_of_the_store_and_writes_the_rendered_png() {
    let dir = tempfile::tempdir().unwrap();
    let (store, out) = (dir.path().join("store"), dir.path().join("quicklook.png"));
    let (full, level) = (synthetic(40, 50), Level::new(200).unwrap());
    write_store(&store, &full, level);
    // Stride 3 over bands of 16 rows: the reads start at rows 0, 18 and 33.
    let options = QuicklookOptions { max_width: 20 };
    let size = write_quicklook(&store, "s1", level, &out, &options).unwrap();
    let want = render("s1  200m  40 x 50 px, stride 3", &full.subsample(3));
    assert_eq!(size, (want.width, want.height));
    let file = std::io::BufReader::new(std::fs::File::open(&out).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width as usize, info.height as usize), size);
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(&buf[..info.buffer_size()], &want.rgb[..]);
    let run = |store: &Path, scene, out: &Path| write_quicklook(store, scene, level, out, &options);
    let no_scene = run(&store, "nope", &out);
    assert!(
        matches!(no_scene, Err(StoreError::Zarr { .. })),
        "{no_scene:?}"
    );
    let no_store = run(dir.path(), "s1", &out);
    assert!(
        matches!(no_store, Err(StoreError::Incompatible { .. })),
        "{no_store:?}"
    );
    let no_dir = run(&store, "s1", &dir.path().join("no/such/dir/q.png"));
    assert!(matches!(no_dir, Err(StoreError::Io { .. })), "{no_dir:?}");
}

/// `raster`'s labels with every class moved to the next (the last to 0) and 255 to 0.
fn shifted_labels(raster: &SceneRaster) -> [Vec<u8>; 3] {
    Task::ALL.map(|task| {
        let n = task.n_classes();
        let next = |v: &u8| match usize::from(*v) {
            v if v < n => ((v + 1) % n) as u8,
            _ => 0,
        };
        raster.labels[task.channel()].iter().map(next).collect()
    })
}

#[test]
fn eval_panel_draws_truth_and_pred_pairs_with_one_legend_per_chart() {
    let (full, width, stride) = (synthetic(40, 50), 50, 3);
    let pred = shifted_labels(&full);
    let planes = EvalPlanes {
        height: 40,
        width,
        sar: [&full.sar[0], &full.sar[1]],
        truth: full.labels.each_ref().map(Vec::as_slice),
        pred: pred.each_ref().map(Vec::as_slice),
    };
    assert_eq!(planes.validate(), Ok(()));
    let header = "S1A_TEST_scene  80m  eval";
    let canvas = render_eval(header, &planes, stride);
    let layout = Layout::eval(17, 14, header);
    assert_eq!((canvas.width, canvas.height), (layout.width, layout.height));
    // Equal columns; pairs PAIR_GAP apart, everything else COLUMN_GAP.
    let x = &layout.column_x;
    let column_width = x[1] - x[0] - COLUMN_GAP;
    let gaps: Vec<_> = x.windows(2).map(|p| p[1] - p[0] - column_width).collect();
    let (g, p) = (COLUMN_GAP, PAIR_GAP);
    assert_eq!(gaps, [g, g, p, g, p, g, p]);
    assert_eq!(layout.width, x[7] + column_width + MARGIN);
    let ((hh_lo, hh_hi), (hv_lo, hv_hi)) = (HH_DB_RANGE, HV_DB_RANGE);
    for (py, px) in (0..14).flat_map(|y| (0..17).map(move |x| (y, x))) {
        let (i, y) = (py * stride * width + px * stride, layout.panel_y + py);
        let hh = db_to_grey(full.sar[0][i], hh_lo, hh_hi);
        let hv = db_to_grey(full.sar[1][i], hv_lo, hv_hi);
        assert_eq!(canvas.get(x[0] + px, y), [hh; 3]);
        assert_eq!(canvas.get(x[1] + px, y), [hv; 3]);
        for task in Task::ALL {
            let c = task.channel();
            let truth = class_colour(task, full.labels[c][i]);
            let predicted = class_colour(task, pred[c][i]);
            assert_eq!(canvas.get(x[2 + 2 * c] + px, y), truth, "{}", task.name());
            assert_eq!(
                canvas.get(x[3 + 2 * c] + px, y),
                predicted,
                "{}",
                task.name()
            );
        }
    }
    for &x in x {
        assert_eq!(canvas.get(x - 1, layout.panel_y - 1), FRAME_COLOUR);
        assert_eq!(canvas.get(x + 17, layout.panel_y + 14), FRAME_COLOUR);
        assert!((0..TEXT_HEIGHT).any(|dy| canvas.get(x, layout.title_y + dy) == BLACK));
    }
    for task in Task::ALL {
        let (truth_x, pred_x) = (x[2 + 2 * task.channel()], x[3 + 2 * task.channel()]);
        let entries = eval_legend_entries(task);
        assert_eq!(entries.last().unwrap().1, "255 ignore / none");
        // The legend stays under its pair; none is drawn under the prediction column.
        assert!(truth_x + legend_width(&entries) <= pred_x + column_width);
        for (row, (class, _)) in entries.iter().enumerate() {
            let (y, centre) = (layout.legend_y + row * LEGEND_ROW, SWATCH / 2);
            assert_eq!(canvas.get(truth_x, y), BLACK);
            let colour = class_colour(task, *class);
            assert_eq!(canvas.get(truth_x + centre, y + centre), colour);
            assert_eq!(canvas.get(pred_x + column_width - 1, y + centre), WHITE);
        }
    }
    assert!((0..canvas.width).all(|x| canvas.get(x, canvas.height - 1) == WHITE));
}

#[test]
fn eval_planes_of_the_wrong_length_are_named() {
    let (sar, labels, short) = (vec![0.0; 6], vec![0; 6], vec![0; 5]);
    let planes = EvalPlanes {
        height: 2,
        width: 3,
        sar: [&sar, &sar],
        truth: [&labels, &labels, &labels],
        pred: [&labels, &labels, &short],
    };
    let err = planes.validate().unwrap_err();
    assert_eq!(err, "plane `FLOE pred` has 5 values, expected 2 x 3 = 6");
    let planes = EvalPlanes {
        sar: [&sar, &sar[..4]],
        ..planes
    };
    assert!(planes.validate().unwrap_err().contains("`HV (dB)` has 4"));
}
