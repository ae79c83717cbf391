//! Errors of the dataset crate: one line each, naming the file and what is wrong.

use std::path::Path;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A manifest that cannot be read.
    #[error("{path}: {reason}")]
    Manifest {
        /// The Parquet file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A bad line in a class-count table or scene list.
    #[error("{path}{}: {reason}", if *line == 0 { String::new() } else { format!(", line {line}") })]
    Table {
        /// The file.
        path: String,
        /// 1-based line (0: the file itself).
        line: usize,
        /// Why.
        reason: String,
    },
    /// The store is missing or not an icefm store.
    #[error("{0}")]
    Store(String),
    /// A regime request that cannot be met.
    #[error("{0}")]
    Regime(String),
    /// A loader request that cannot be met (levels, channels, sampler, options).
    #[error("{0}")]
    Loader(String),
    /// Reading or decoding a store array failed.
    #[error("{path}: {reason}")]
    Read {
        /// The array.
        path: String,
        /// Why.
        reason: String,
    },
    /// Writing a file failed.
    #[error("{path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl DatasetError {
    pub(crate) fn manifest(path: &Path, reason: String) -> Self {
        Self::Manifest {
            path: path.display().to_string(),
            reason,
        }
    }

    pub(crate) fn table(path: &Path, line: usize, reason: String) -> Self {
        Self::Table {
            path: path.display().to_string(),
            line,
            reason,
        }
    }

    pub(crate) fn write(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Write {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A store without a scenes manifest: never ingested, or a sharded ingest not merged yet.
pub(crate) fn no_scenes_manifest(store: &Path) -> DatasetError {
    let parts = store.join(icefm_schemas::store::PARTS_DIR);
    let committed = std::fs::read_dir(&parts).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".scene.parquet")))
    });
    DatasetError::Store(if committed {
        format!(
            "{}: scenes are committed but the manifests are not merged (a sharded ingest still \
             running?); `icefm manifest merge --store {}` merges them",
            store.display(),
            store.display()
        )
    } else {
        format!(
            "{}: no scenes manifest; is this an icefm store? run `icefm ingest` first",
            store.display()
        )
    })
}
