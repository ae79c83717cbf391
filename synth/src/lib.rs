//! Generator of AI4Arctic-format sea-ice scenes, written through the real NetCDF-4 library:
//! raw 40 m files (SAR in dB, polygon raster + SIGRID-3 code table) and ready-to-train 80 m
//! files (standard-scaled inputs, `SIC`/`SOD`/`FLOE` rasters), in every on-disk encoding a
//! reader must accept, optionally with a deliberate defect.
//!
//! Scenes are plausible and learnable: a warped Voronoi ice chart with water, single- and
//! multi-stage ice, fast ice and unknown polygons; land along part of one edge with distance
//! zones; slanted no-data swath borders; class-dependent backscatter with incidence trend,
//! texture tied to floe size and 4-look speckle; AMSR2 and ERA5 fields on the 2 km grid.
//! Content is a pure function of the options (not of the thread count).
//!
//! ```
//! use icefm_synth::{Defect, Encoding, SceneKind, SynthOptions, write_scene};
//! # let dir = tempfile::tempdir().map_err(|e| icefm_synth::SynthError::options(e.to_string()))?;
//! # let dir = dir.path();
//! let mut opts = SynthOptions::new(SceneKind::Raw, 300, 320, 42);
//! opts.encoding = Encoding::named("int-ids-char-codes").unwrap_or_default();
//! let path = write_scene(dir, &opts)?;
//! assert!(path.ends_with(opts.file_name()));
//!
//! // The same scene at 80 m, ready to train, with its SAR all invalid.
//! let mut rtt = SynthOptions::new(SceneKind::Rtt, 150, 160, 42);
//! rtt.defect = Some(Defect::AllInvalid);
//! assert!(write_scene(dir, &rtt)?.ends_with(rtt.rtt_file_name()));
//! # Ok::<(), icefm_synth::SynthError>(())
//! ```

mod backscatter;
mod chart;
mod encoding;
mod error;
mod geography;
mod geolocation;
mod grid2km;
mod options;
mod raw;
mod rng;
mod rtt;
mod scene;
mod writer;

use std::path::{Path, PathBuf};

use icefm_netcdf_thread::on_netcdf_thread;

pub use encoding::{
    Chunking, CodesEncoding, DEFAULT_CHUNK, DEFAULT_DEFLATE, Encoding, POLYGON_ID_FILL,
    PolygonIdEncoding, SAR_ADD_OFFSET, SAR_FILL, SAR_SCALE_FACTOR, SarPacking,
};
pub use error::SynthError;
pub use options::{DEFAULT_SERVICE, Defect, MIN_SIZE, Release, SceneKind, Service, SynthOptions};

/// Generate the scene `opts` describes and write it to `dir` (created if missing) under
/// [`SynthOptions::file_name`]; returns the path written. The file appears only when complete
/// (it is written under a temporary name, then renamed). The content is generated on the
/// caller's thread (and rayon); the netCDF calls run on the process's netCDF thread
/// ([`icefm_netcdf_thread`]).
pub fn write_scene(dir: &Path, opts: &SynthOptions) -> Result<PathBuf, SynthError> {
    opts.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| SynthError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let name = opts.file_name();
    let path = dir.join(&name);
    let partial = dir.join(format!(".{name}.partial"));
    let scene = scene::Scene::build(opts);
    // A test scene's reference file first: the scene file appears last, when both are whole.
    if let Some(reference) = opts.reference_file_name() {
        let (file, o, s) = (
            dir.join(format!(".{reference}.partial")),
            opts.clone(),
            scene.clone(),
        );
        let done = file.clone();
        let written = on_netcdf_thread(move || rtt::write_reference(&file, &o, &s));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&done);
            return Err(e);
        }
        let target = dir.join(&reference);
        std::fs::rename(&done, &target).map_err(|source| SynthError::Io {
            path: target,
            source,
        })?;
    }
    // netCDF-C/HDF5 are not thread-safe: every call of the process goes to one thread.
    let (file, o) = (partial.clone(), opts.clone());
    let written = on_netcdf_thread(move || match o.kind {
        SceneKind::Raw => raw::write(&file, &o, &scene),
        SceneKind::Rtt => rtt::write(&file, &o, &scene),
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &path).map_err(|source| SynthError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
