//! Errors of ingest, with the file, variable and reason they concern.

use std::path::PathBuf;

/// One input scene that could not be ingested. Printed as one line:
/// `FILE: variable `VAR`: REASON`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{reason}", path.display(), variable.as_ref().map(|v| format!("variable `{v}`: ")).unwrap_or_default())]
pub struct SceneError {
    /// The input file.
    pub path: PathBuf,
    /// The variable concerned, if any.
    pub variable: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl SceneError {
    /// An error about the file as a whole.
    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            variable: None,
            reason: reason.into(),
        }
    }
    /// An error about one variable of the file.
    pub fn variable(
        path: impl Into<PathBuf>,
        variable: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            variable: Some(variable.into()),
            reason: reason.into(),
        }
    }
}

/// Errors of the store as a whole (not of one input).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path concerned.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A Zarr operation failed.
    #[error("{}: zarr: {reason}", path.display())]
    Zarr {
        /// Path (store or node) concerned.
        path: PathBuf,
        /// Cause, as text (zarrs has several error types).
        reason: String,
    },
    /// A Parquet manifest could not be read or written.
    #[error("{}: parquet: {reason}", path.display())]
    Parquet {
        /// Manifest file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The store exists but is not an icefm store or does not match the options.
    #[error("{}: {reason}", path.display())]
    Incompatible {
        /// Store path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    /// Wrap an IO error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    /// Wrap a zarrs error with its path.
    pub fn zarr(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Self::Zarr {
            path: path.into(),
            reason: e.to_string(),
        }
    }
    /// Wrap a parquet/arrow error with its path.
    pub fn parquet(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Self::Parquet {
            path: path.into(),
            reason: e.to_string(),
        }
    }
}

/// Why a scene's ingest failed: its input, or the store.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The input is bad.
    #[error(transparent)]
    Scene(#[from] SceneError),
    /// Writing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
