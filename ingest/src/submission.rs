//! The AutoICE challenge's upload package: the predicted SIC, SOD and FLOE charts of every test
//! scene in one NetCDF-4 file, as the challenge's toolbox writes it with xarray.
//!
//! Each scene and chart is a `uint8` variable `{scene}_{chart}` (chart `SIC`, `SOD` or `FLOE`)
//! on its own dimensions `{scene}_{chart}_dim0` (rows) and `{scene}_{chart}_dim1` (columns),
//! deflated at level 1 without shuffle, holding the 80 m map exactly as given; no attributes.
//!
//! ```no_run
//! use icefm_ingest::submission::{SceneMaps, write_submission};
//!
//! let scene = SceneMaps {
//!     scene: "20210328T202742_S1B".into(),
//!     height: 2,
//!     width: 3,
//!     sic: vec![0, 10, 10, 255, 5, 0],
//!     sod: vec![0, 4, 4, 255, 3, 0],
//!     floe: vec![0, 2, 2, 255, 1, 0],
//! };
//! write_submission("upload_package.nc".as_ref(), &[scene])?;
//! # Ok::<(), icefm_ingest::submission::SubmissionError>(())
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use icefm_schemas::Task;

use crate::netcdf_thread::on_netcdf_thread;

/// zlib level of every chart variable (the toolbox's `complevel=1`).
pub const DEFLATE_LEVEL: i32 = 1;

/// The predicted charts of one scene at the 80 m grid, each `height × width`, row-major, with
/// 255 where there is no prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SceneMaps {
    /// Scene name as the challenge expects it (the prefix of the variable names).
    pub scene: String,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Sea-ice concentration classes.
    pub sic: Vec<u8>,
    /// Stage-of-development classes.
    pub sod: Vec<u8>,
    /// Floe-size classes.
    pub floe: Vec<u8>,
}

impl SceneMaps {
    /// The chart of `task`.
    pub fn chart(&self, task: Task) -> &[u8] {
        match task {
            Task::Sic => &self.sic,
            Task::Sod => &self.sod,
            Task::Floe => &self.floe,
        }
    }
}

/// Name of the variable of `scene`'s `task` chart.
pub fn variable_name(scene: &str, task: Task) -> String {
    format!("{scene}_{}", task.name())
}

/// Names of the row and column dimensions of `scene`'s `task` chart.
pub fn dimension_names(scene: &str, task: Task) -> [String; 2] {
    let variable = variable_name(scene, task);
    [format!("{variable}_dim0"), format!("{variable}_dim1")]
}

/// Why a submission could not be written. Nothing is left at the output path then.
#[derive(Debug, thiserror::Error)]
pub enum SubmissionError {
    /// A chart does not hold `height × width` values.
    #[error("scene `{scene}`: {chart} has {found} values, expected {height} x {width}")]
    Shape {
        /// The scene.
        scene: String,
        /// The chart (`SIC`, `SOD`, `FLOE`).
        chart: &'static str,
        /// Rows given.
        height: usize,
        /// Columns given.
        width: usize,
        /// Values found.
        found: usize,
    },
    /// A scene without pixels: NetCDF takes a dimension of length 0 for an unlimited one.
    #[error("scene `{scene}`: empty ({height} x {width})")]
    Empty {
        /// The scene.
        scene: String,
        /// Rows given.
        height: usize,
        /// Columns given.
        width: usize,
    },
    /// Two scenes of one name (their variables would collide).
    #[error("scene `{scene}` is given twice")]
    Duplicate {
        /// The scene.
        scene: String,
    },
    /// A NetCDF call failed.
    #[error("{}: {item}: {source}", path.display())]
    NetCdf {
        /// The file being written.
        path: PathBuf,
        /// The file, dimension or variable concerned.
        item: String,
        /// Cause.
        source: netcdf::Error,
    },
    /// Writing failed where the disk is (all but) full: netCDF says only "HDF error".
    #[error(
        "{cause} (the disk holding {} has {free} bytes free: No space left on device, most \
         likely)",
        path.display()
    )]
    Full {
        /// The file being written.
        path: PathBuf,
        /// Bytes free there.
        free: u64,
        /// What netCDF said.
        cause: Box<SubmissionError>,
    },
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path concerned.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Write the upload package of `scenes` to `path` (replacing any file there). The file is
/// written under a temporary name beside `path` and renamed when complete, so a file at `path`
/// is always whole. Every scene is checked before anything is written. The netCDF calls run on
/// the process's netCDF thread ([`crate::netcdf_thread`]), one chart at a time, so memory holds
/// one more copy of one chart only.
pub fn write_submission(path: &Path, scenes: &[SceneMaps]) -> Result<(), SubmissionError> {
    validate(scenes)?;
    let io = |source| SubmissionError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let partial = path.with_file_name(format!(
        ".{}.{}.partial",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = write_file(&partial, scenes);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path).map_err(|source| {
        let _ = std::fs::remove_file(&partial);
        io(source)
    })
}

/// Whether `path` is an upload package as [`write_submission`] writes it: a NetCDF file holding
/// at least one variable, every one of them a `uint8` chart named `{scene}_{SIC|SOD|FLOE}`.
/// False for anything else, a file that cannot be read included.
pub fn is_submission(path: &Path) -> bool {
    let owned = path.to_path_buf();
    on_netcdf_thread(move || {
        let Ok(file) = netcdf::open(&owned) else {
            return false;
        };
        let mut any = false;
        for v in file.variables() {
            let name = v.name();
            let chart = Task::ALL.iter().any(|t| {
                name.strip_suffix(t.name())
                    .is_some_and(|p| p.ends_with('_'))
            });
            if !chart
                || v.vartype() != netcdf::types::NcVariableType::Int(netcdf::types::IntType::U8)
            {
                return false;
            }
            any = true;
        }
        any
    })
}

/// Check every scene: a name not seen before, at least one pixel, `height × width` values in
/// every chart.
fn validate(scenes: &[SceneMaps]) -> Result<(), SubmissionError> {
    let mut seen = HashSet::new();
    for s in scenes {
        if !seen.insert(s.scene.as_str()) {
            return Err(SubmissionError::Duplicate {
                scene: s.scene.clone(),
            });
        }
        let (height, width) = (s.height, s.width);
        if height == 0 || width == 0 {
            return Err(SubmissionError::Empty {
                scene: s.scene.clone(),
                height,
                width,
            });
        }
        for task in Task::ALL {
            let found = s.chart(task).len();
            if height.checked_mul(width) != Some(found) {
                return Err(SubmissionError::Shape {
                    scene: s.scene.clone(),
                    chart: task.name(),
                    height,
                    width,
                    found,
                });
            }
        }
    }
    Ok(())
}

/// An open file whose every call, its closing included, runs on the netCDF thread.
struct ThreadFile {
    file: Option<netcdf::FileMut>,
    path: PathBuf,
}

impl ThreadFile {
    fn create(path: &Path) -> Result<Self, SubmissionError> {
        let owned = path.to_path_buf();
        let file = on_netcdf_thread(move || netcdf::create(&owned)).map_err(|source| {
            SubmissionError::NetCdf {
                path: path.to_path_buf(),
                item: "create".into(),
                source,
            }
        })?;
        Ok(Self {
            file: Some(file),
            path: path.to_path_buf(),
        })
    }

    /// Define and fill the chart variable `name` on dimensions `dims` of `shape`.
    fn chart(
        &mut self,
        name: String,
        dims: [String; 2],
        shape: [usize; 2],
        values: Vec<u8>,
    ) -> Result<(), SubmissionError> {
        let Some(mut file) = self.file.take() else {
            return Err(self.error(name, netcdf::Error::Str("file already closed".into())));
        };
        let (file, written) = on_netcdf_thread(move || {
            let written = define_chart(&mut file, &name, &dims, shape, &values);
            (file, written)
        });
        self.file = Some(file);
        written.map_err(|(item, source)| self.error(item, source))
    }

    /// Close the file, reporting what closing (flushing) reports.
    fn close(mut self) -> Result<(), SubmissionError> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        on_netcdf_thread(move || file.close()).map_err(|source| self.error("close".into(), source))
    }

    fn error(&self, item: String, source: netcdf::Error) -> SubmissionError {
        SubmissionError::NetCdf {
            path: self.path.clone(),
            item,
            source,
        }
    }
}

impl Drop for ThreadFile {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            on_netcdf_thread(move || drop(file));
        }
    }
}

/// Define the chart variable `name` (u8, deflated, no shuffle) on new dimensions `dims` of
/// `shape` and fill it with `values`. The error names the item that failed.
fn define_chart(
    file: &mut netcdf::FileMut,
    name: &str,
    dims: &[String; 2],
    shape: [usize; 2],
    values: &[u8],
) -> Result<(), (String, netcdf::Error)> {
    for (dim, len) in dims.iter().zip(shape) {
        file.add_dimension(dim, len)
            .map_err(|e| (format!("dimension {dim}"), e))?;
    }
    let mut var = file
        .add_variable::<u8>(name, &[&dims[0], &dims[1]])
        .map_err(|e| (format!("variable {name}"), e))?;
    var.set_compression(DEFLATE_LEVEL, false)
        .map_err(|e| (format!("variable {name} (deflate)"), e))?;
    var.put_values(values, ..)
        .map_err(|e| (format!("variable {name} (values)"), e))
}

/// Bytes free to a writer on the file system holding `path`'s folder.
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Write every chart of `scenes` (already validated) into a new file at `path`. A failure is
/// recorded for the process's exit ([`icefm_netcdf_thread::mark_write_failed`]), and said to be
/// a full disk where the disk has less room left than the charts take uncompressed.
fn write_file(path: &Path, scenes: &[SceneMaps]) -> Result<(), SubmissionError> {
    write_charts(path, scenes).map_err(|e| {
        icefm_netcdf_thread::mark_write_failed();
        let charts: u64 = scenes.iter().map(|s| 3 * (s.height * s.width) as u64).sum();
        match (&e, free_bytes(path)) {
            (SubmissionError::NetCdf { .. }, Some(free)) if free < charts => {
                SubmissionError::Full {
                    path: path.to_path_buf(),
                    free,
                    cause: Box::new(e),
                }
            }
            _ => e,
        }
    })
}

fn write_charts(path: &Path, scenes: &[SceneMaps]) -> Result<(), SubmissionError> {
    let mut file = ThreadFile::create(path)?;
    for s in scenes {
        for task in Task::ALL {
            let values = s.chart(task).to_vec();
            let (name, dims) = (
                variable_name(&s.scene, task),
                dimension_names(&s.scene, task),
            );
            file.chart(name, dims, [s.height, s.width], values)?;
        }
    }
    file.close()
}
