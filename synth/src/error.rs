//! Errors of scene generation.

use std::path::PathBuf;

/// Why a scene could not be generated or written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The options describe no scene this generator can make.
    #[error("invalid synth options: {reason}")]
    Options {
        /// What is wrong.
        reason: String,
    },
    /// Creating the output directory or renaming the finished file failed.
    #[error("IO error on {path}: {source}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The NetCDF file could not be created.
    #[error("cannot create NetCDF file {path}: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The netCDF error.
        source: netcdf::Error,
    },
    /// Defining or writing one item (variable, dimension, attribute) failed.
    #[error("writing {item} of {path} failed: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The variable, dimension or attribute (`var`, `var:attr`, `:global_attr`, `dim name`).
        item: String,
        /// The netCDF error.
        source: netcdf::Error,
    },
}

impl SynthError {
    /// An [`SynthError::Options`] error.
    pub fn options(reason: impl Into<String>) -> Self {
        Self::Options {
            reason: reason.into(),
        }
    }
}
