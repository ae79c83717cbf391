//! Ingest of AI4Arctic NetCDF scenes into the icefm Zarr v3 patch store with Parquet manifests.

mod canvas;
pub mod claim;
pub mod error;
pub mod geo;
pub mod inspect;
pub mod labels;
pub mod manifest;
pub use icefm_schemas::names;
pub mod pipeline;
pub mod plot;
pub mod quicklook;
pub mod reader;
pub mod resample;
mod scene_writer;
pub use scene_writer::NO_VALID_SAR;
pub mod shard;
pub mod store;
pub mod submission;

pub use error::{IngestError, SceneError, StoreError};

/// A path's file name as text (empty if it has none): how scenes, shards and claims name
/// their inputs.
pub(crate) fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
/// Every netCDF call of the process runs on one thread (re-exported for callers of this crate).
pub use icefm_netcdf_thread as netcdf_thread;
