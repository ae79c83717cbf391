//! Arrow schemas of the Parquet manifests (`store.zarr/manifests/*.parquet`), defined once.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, TimeUnit};

use crate::classes::Task;

/// File names of the merged manifests.
pub const SCENES_FILE: &str = "scenes.parquet";
/// Polygons manifest.
pub const POLYGONS_FILE: &str = "polygons.parquet";
/// Patches manifest.
pub const PATCHES_FILE: &str = "patches.parquet";

/// Key of the Parquet footer metadata that stamps the three merged manifests of one merge alike:
/// BLAKE3 (hex) of the committed parts they were built from. Manifests whose stamps differ come
/// from different merges (one stopped between its renames).
pub const MERGE_STAMP_KEY: &str = "icefm.merge";

/// A scene's committed parts (`manifests/parts/<id>.<kind>.parquet`), in the order a merge reads
/// them; the `scene` part is the commit and is written last.
pub const PART_KINDS: [&str; 3] = ["polygons", "patches", "scene"];

/// The [`MERGE_STAMP_KEY`] value of a merge: BLAKE3 over every committed scene's parts, scenes
/// in id order and parts in [`PART_KINDS`] order, each after its length. Ingest's merge writes it
/// and readers recompute it, so both use this.
#[derive(Default)]
pub struct MergeStamp(blake3::Hasher);

impl MergeStamp {
    /// Add the bytes of the next part.
    pub fn add_part(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// The stamp (hex).
    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// Histogram column name of a task (`sic_hist`, …): one count per class, the last for 255.
pub fn hist_column(task: Task, prefix: &str) -> String {
    format!("{}_{prefix}", task.name().to_lowercase())
}

fn hist_field(task: Task, suffix: &str, item: DataType) -> Field {
    Field::new(
        hist_column(task, suffix),
        DataType::FixedSizeList(
            Arc::new(Field::new("item", item, false)),
            task.hist_len() as i32,
        ),
        false,
    )
}

fn utf8_list(name: &str) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))),
        false,
    )
}

fn u32_list(name: &str) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
        false,
    )
}

/// One row per complete scene.
pub fn scenes_schema() -> Schema {
    let mut f = vec![
        Field::new("scene_id", DataType::Utf8, false),
        Field::new("ice_service", DataType::Utf8, true),
        Field::new(
            "acquired",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("satellite", DataType::Utf8, true),
        Field::new("source_name", DataType::Utf8, false),
        Field::new("source_size", DataType::UInt64, false),
        Field::new("source_checksum", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("native_spacing_m", DataType::Float64, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("width", DataType::UInt32, false),
        utf8_list("levels"),
        u32_list("level_heights"),
        u32_list("level_widths"),
        Field::new("grid2km_height", DataType::UInt32, false),
        Field::new("grid2km_width", DataType::UInt32, false),
        Field::new("valid_pixels", DataType::UInt64, false),
        Field::new("polygons", DataType::UInt32, false),
        Field::new("unknown_code_count", DataType::UInt32, false),
        Field::new("unknown_codes", DataType::Utf8, false),
    ];
    for t in Task::ALL {
        f.push(hist_field(t, "pixels", DataType::UInt64));
    }
    f.push(Field::new(RELEASE_COLUMN, DataType::Utf8, false));
    for name in FOOTPRINT_COLUMNS {
        f.push(Field::new(name, DataType::Float64, true));
    }
    Schema::new(f)
}

/// The scenes manifest's columns of each scene's footprint in degrees, null where its file has
/// no latitude and longitude (and in stores ingested before they were added): the image's
/// centre, the southernmost and northernmost tie point, and the westernmost and easternmost
/// (west greater than east where the scene crosses the antimeridian; -180 and 180 where its
/// tie points go round the pole).
pub const FOOTPRINT_COLUMNS: [&str; 6] = [
    "centre_latitude",
    "centre_longitude",
    "min_latitude",
    "max_latitude",
    "west_longitude",
    "east_longitude",
];

/// The scenes manifest's column of each scene's release (`train` or `test`,
/// [`crate::names::Release`]). Stores ingested before it lack it.
pub const RELEASE_COLUMN: &str = "release";

/// Every polygon of every raw scene: SIGRID fields as read, derived classes, pixel count.
pub fn polygons_schema() -> Schema {
    let mut f = vec![
        Field::new("scene_id", DataType::Utf8, false),
        Field::new("poly_id", DataType::Int64, false),
    ];
    for name in &crate::sigrid::FIELDS[1..] {
        f.push(Field::new(name.to_lowercase(), DataType::Utf8, false));
    }
    f.extend([
        Field::new("sic", DataType::UInt8, false),
        Field::new("sod", DataType::UInt8, false),
        Field::new("floe", DataType::UInt8, false),
        Field::new("pixels", DataType::UInt64, false),
        Field::new("unknown_codes", DataType::Utf8, false),
    ]);
    Schema::new(f)
}

/// One row per patch (chunk) of every level of every scene.
pub fn patches_schema() -> Schema {
    let mut f = vec![
        Field::new("scene_id", DataType::Utf8, false),
        Field::new("level", DataType::Utf8, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("col", DataType::UInt32, false),
        Field::new("y0", DataType::UInt32, false),
        Field::new("x0", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("valid_fraction", DataType::Float32, false),
        Field::new("land_fraction", DataType::Float32, false),
    ];
    for t in Task::ALL {
        f.push(hist_field(t, "hist", DataType::UInt32));
    }
    Schema::new(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_have_expected_columns() {
        let s = scenes_schema();
        assert!(s.field_with_name("source_checksum").is_ok());
        match s.field_with_name("sod_pixels").unwrap().data_type() {
            DataType::FixedSizeList(_, n) => assert_eq!(*n, 7),
            other => panic!("{other:?}"),
        }
        let p = polygons_schema();
        assert_eq!(p.fields().len(), 2 + 14 + 5);
        assert!(p.field_with_name("poly_type").is_ok());
        let q = patches_schema();
        assert!(q.field_with_name("floe_hist").is_ok());
    }
}
