//! Ingest of AI4Arctic NetCDF scenes into the icefm Zarr v3 patch store with Parquet manifests.

pub mod claim;
pub mod error;
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
pub mod shard;
pub mod store;
pub mod submission;

pub use error::{IngestError, SceneError, StoreError};
/// Every netCDF call of the process runs on one thread (re-exported for callers of this crate).
pub use icefm_netcdf_thread as netcdf_thread;
