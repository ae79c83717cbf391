//! Writing through the NetCDF-4 library: dimensions, attributes, and 2-D variables filled in
//! stripes of rows (so converted copies of a full-size plane never exist at once).

use std::path::{Path, PathBuf};

use netcdf::types::NcVariableType;
use netcdf::{AttributeValue, NcTypeDescriptor};
use rayon::prelude::*;

use crate::encoding::Encoding;
use crate::error::SynthError;

fn werr(path: &Path, item: String, source: netcdf::Error) -> SynthError {
    // HDF5 may hold the file in a state its exit handler cannot close.
    icefm_netcdf_thread::mark_write_failed();
    SynthError::Write {
        path: path.to_path_buf(),
        item,
        source,
    }
}

/// Rows written per call when storage is contiguous (or per chunk row, at least this many).
const STRIPE_ROWS: usize = 256;

/// A 2-D variable to define.
pub(crate) struct GridVar<'a> {
    pub name: &'a str,
    pub dims: [&'a str; 2],
    pub shape: [usize; 2],
    /// On the SAR grid: the encoding's chunking applies (deflate applies to every 2-D variable).
    pub sar_grid: bool,
    pub attrs: Vec<(&'a str, AttributeValue)>,
}

/// An open output file and the encoding to apply.
pub(crate) struct SceneWriter {
    file: netcdf::FileMut,
    path: PathBuf,
    encoding: Encoding,
    /// Variables left out on purpose (the `MissingVariable` defect, a test file's chart).
    skip: Vec<&'static str>,
}

impl SceneWriter {
    pub(crate) fn create(
        path: &Path,
        encoding: Encoding,
        skip: Vec<&'static str>,
    ) -> Result<Self, SynthError> {
        let file = netcdf::create(path).map_err(|source| SynthError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            encoding,
            skip,
        })
    }

    /// Whether `name` is to be left out.
    pub(crate) fn skips(&self, name: &str) -> bool {
        self.skip.contains(&name)
    }

    /// Rows and row dimension of `distance_map`: one row short, on its own dimension, for the
    /// [`crate::Defect::MismatchedShape`] defect.
    pub(crate) fn distance_rows(
        &mut self,
        short: bool,
        height: usize,
        row_dim: &'static str,
    ) -> Result<(usize, &'static str), SynthError> {
        if short {
            self.dim("distance_map_lines", height - 1)?;
            Ok((height - 1, "distance_map_lines"))
        } else {
            Ok((height, row_dim))
        }
    }

    pub(crate) fn dim(&mut self, name: &str, len: usize) -> Result<(), SynthError> {
        let path = self.path.clone();
        self.file
            .add_dimension(name, len)
            .map(|_| ())
            .map_err(|s| werr(&path, format!("dimension {name}"), s))
    }

    pub(crate) fn global(
        &mut self,
        name: &str,
        value: impl Into<AttributeValue>,
    ) -> Result<(), SynthError> {
        let path = self.path.clone();
        self.file
            .add_attribute(name, value)
            .map(|_| ())
            .map_err(|s| werr(&path, format!(":{name}"), s))
    }

    /// Define `spec` with the encoding's filters and `fill` as `_FillValue`, then fill it in
    /// stripes: `row(y, out)` writes row `y` into `out` (called in parallel).
    pub(crate) fn grid<T>(
        &mut self,
        spec: GridVar<'_>,
        fill: Option<T>,
        row: impl Fn(usize, &mut [T]) + Sync,
    ) -> Result<(), SynthError>
    where
        T: NcTypeDescriptor + Copy + Default + Send,
    {
        if self.skips(spec.name) {
            return Ok(());
        }
        let [h, w] = spec.shape;
        let chunk = if spec.sar_grid {
            self.encoding.chunk_shape(h, w)
        } else {
            None
        };
        let deflate = self.encoding.deflate;
        let name = spec.name;
        let path = self.path.clone();
        let e = |what: &str| {
            let item = format!("{name}{what}");
            let path = &path;
            move |s| werr(path, item, s)
        };
        let mut var = self
            .file
            .add_variable::<T>(name, &spec.dims)
            .map_err(e(""))?;
        if let Some(c) = chunk {
            var.set_chunking(&c).map_err(e(" (chunking)"))?;
        }
        if let Some(level) = deflate {
            var.set_compression(level, true).map_err(e(" (deflate)"))?;
        }
        if let Some(f) = fill {
            var.set_fill_value(f).map_err(e(":_FillValue"))?;
        }
        for (a, v) in spec.attrs {
            var.put_attribute(a, v).map_err(e(&format!(":{a}")))?;
        }
        // Stripes hold whole chunk rows, so each chunk is compressed once.
        let stripe = match chunk {
            Some([r, _]) => r * STRIPE_ROWS.div_ceil(r),
            None => STRIPE_ROWS,
        };
        let mut buf = vec![T::default(); stripe.min(h) * w];
        let mut result = Ok(());
        for y0 in (0..h).step_by(stripe) {
            let y1 = (y0 + stripe).min(h);
            let part = &mut buf[..(y1 - y0) * w];
            part.par_chunks_mut(w)
                .enumerate()
                .for_each(|(i, out)| row(y0 + i, out));
            if let Err(err) = var.put_values(part, (y0..y1, ..)) {
                result = Err(err);
                break;
            }
        }
        result.map_err(e(" (data)"))
    }

    /// A 1-D float64 variable.
    pub(crate) fn vector(
        &mut self,
        name: &str,
        dim: &str,
        values: &[f64],
        attrs: Vec<(&str, AttributeValue)>,
    ) -> Result<(), SynthError> {
        if self.skips(name) {
            return Ok(());
        }
        let path = self.path.clone();
        let path = &path;
        let e = |what: String| move |s| werr(path, what, s);
        let mut var = self
            .file
            .add_variable::<f64>(name, &[dim])
            .map_err(e(name.to_string()))?;
        for (a, v) in attrs {
            var.put_attribute(a, v).map_err(e(format!("{name}:{a}")))?;
        }
        var.put_values(values, ..)
            .map_err(e(format!("{name} (data)")))
    }

    /// A 2-D float64 variable written whole (small grids).
    pub(crate) fn small_grid(
        &mut self,
        name: &str,
        dims: [&str; 2],
        values: &[f64],
    ) -> Result<(), SynthError> {
        if self.skips(name) {
            return Ok(());
        }
        let path = self.path.clone();
        let path = &path;
        let e = |what: String| move |s| werr(path, what, s);
        let mut var = self
            .file
            .add_variable::<f64>(name, &dims)
            .map_err(e(name.to_string()))?;
        var.put_values(values, ..)
            .map_err(e(format!("{name} (data)")))
    }

    /// `polygon_codes` as variable-length strings.
    pub(crate) fn strings(
        &mut self,
        name: &str,
        dim: &str,
        rows: &[String],
    ) -> Result<(), SynthError> {
        if self.skips(name) {
            return Ok(());
        }
        let path = self.path.clone();
        let path = &path;
        let e = |what: String| move |s| werr(path, what, s);
        let mut var = self
            .file
            .add_string_variable(name, &[dim])
            .map_err(e(name.to_string()))?;
        for (i, r) in rows.iter().enumerate() {
            var.put_string(r, [i]).map_err(e(format!("{name}[{i}]")))?;
        }
        Ok(())
    }

    /// `polygon_codes` as an `NC_CHAR` array `[dim, strlen_dim]`, rows NUL-padded.
    ///
    /// The netcdf crate writes `NC_CHAR` through its ndarray `put`, which passes bytes with the
    /// variable's own type (so `u8` data reaches `nc_put_vars` as text, no unsafe needed).
    pub(crate) fn chars(
        &mut self,
        name: &str,
        [dim, strlen_dim]: [&str; 2],
        rows: &[String],
    ) -> Result<(), SynthError> {
        if self.skips(name) {
            return Ok(());
        }
        let len = rows.iter().map(String::len).max().unwrap_or(1).max(1);
        self.dim(strlen_dim, len)?;
        let mut bytes = vec![0u8; rows.len() * len];
        for (dst, r) in bytes.chunks_mut(len).zip(rows) {
            dst[..r.len()].copy_from_slice(r.as_bytes());
        }
        let path = self.path.clone();
        let path = &path;
        let e = |what: String| move |s| werr(path, what, s);
        let mut var = self
            .file
            .add_variable_with_type(name, &[dim, strlen_dim], &NcVariableType::Char)
            .map_err(e(name.to_string()))?;
        let view = ndarray::ArrayView2::from_shape((rows.len(), len), &bytes)
            .map_err(|err| netcdf::Error::Str(err.to_string()))
            .map_err(e(format!("{name} (shape)")))?;
        var.put(view, ..).map_err(e(format!("{name} (data)")))
    }

    pub(crate) fn close(self) -> Result<(), SynthError> {
        let path = self.path;
        self.file
            .close()
            .map_err(|s| werr(&path, "file (close)".into(), s))
    }
}
