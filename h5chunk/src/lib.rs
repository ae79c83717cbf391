//! Raw-chunk reading of 2-D HDF5 datasets, with the decoding done on all cores.
//!
//! netCDF-C and HDF5 serialise every read, inflate included, on one thread. This crate asks
//! HDF5 only for the *stored* bytes of each chunk (`H5Dread_chunk`, a plain file read) and undoes
//! the filters itself — deflate (libdeflate) and byte shuffle — on rayon threads, then converts
//! the elements to the caller's type exactly as netCDF-C's `nc_get_vara` would.
//!
//! Only what it can decode exactly is accepted: chunked 2-D datasets of little-endian integers
//! or floats whose filters are deflate and/or shuffle. [`File::dataset`] says why anything else
//! is not, and the caller reads that variable through netCDF-C as before. Chunks that were never
//! written (fill value only) are reported as [`H5Error::Unallocated`] for the same fallback.
//!
//! Every call into HDF5 (open, [`Dataset::read_rows`], drop) must run on the thread that makes
//! the process's other netCDF/HDF5 calls; decoding ([`RawRows::decode`]) may run anywhere.

#![allow(unsafe_code)] // FFI to HDF5, confined to this file and `ffi`; each block states its contract.

mod decode;
mod ffi;

use std::ffi::CString;
use std::path::Path;

pub use decode::{DType, DecodeError, Element, Filter, Layout, RawChunk, RawRows};

/// An HDF5 call that failed.
#[derive(Debug, thiserror::Error)]
pub enum H5Error {
    /// A call returned an error status.
    #[error("HDF5 {call} failed for {what}")]
    Call {
        /// The HDF5 function.
        call: &'static str,
        /// The file, dataset or chunk it was called on.
        what: String,
    },
    /// A chunk the request covers was never written (it holds the fill value only).
    #[error("chunk at row {row}, column {col} is not allocated")]
    Unallocated {
        /// First row of the chunk.
        row: usize,
        /// First column of the chunk.
        col: usize,
    },
}

/// An HDF5 file opened read-only beside (or instead of) netCDF-C's handle.
#[derive(Debug)]
pub struct File {
    id: ffi::hid_t,
    path: String,
}

/// A chunked 2-D dataset whose chunks this crate can decode.
#[derive(Debug)]
pub struct Dataset {
    id: ffi::hid_t,
    name: String,
    layout: Layout,
}

fn check(status: ffi::herr_t, call: &'static str, what: &str) -> Result<(), H5Error> {
    if status < 0 {
        Err(H5Error::Call {
            call,
            what: what.to_string(),
        })
    } else {
        Ok(())
    }
}

fn check_id(id: ffi::hid_t, call: &'static str, what: &str) -> Result<ffi::hid_t, H5Error> {
    if id < 0 {
        Err(H5Error::Call {
            call,
            what: what.to_string(),
        })
    } else {
        Ok(id)
    }
}

/// Closes an HDF5 identifier when dropped.
struct Guard(ffi::hid_t, unsafe extern "C" fn(ffi::hid_t) -> ffi::herr_t);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: the identifier was returned valid by HDF5 and is closed exactly once, here.
        unsafe {
            (self.1)(self.0);
        }
    }
}

impl File {
    /// Open `path` read-only. The file may already be open through netCDF-C.
    pub fn open(path: &Path) -> Result<Self, H5Error> {
        let what = path.display().to_string();
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| H5Error::Call {
            call: "H5Fopen",
            what: format!("{what} (NUL in the path)"),
        })?;
        // SAFETY: H5open initialises the library (idempotent) so that the class identifier
        // global is valid; each property list is closed by its guard; `c` outlives the calls.
        unsafe {
            check(ffi::H5open(), "H5open", &what)?;
            // The first degree that matches the one of an existing handle (netCDF-C's) opens.
            for degree in ffi::H5F_CLOSE_DEGREES {
                let fapl = check_id(
                    ffi::H5Pcreate(ffi::H5P_CLS_FILE_ACCESS_ID_g),
                    "H5Pcreate",
                    &what,
                )?;
                let _fapl = Guard(fapl, ffi::H5Pclose);
                check(
                    ffi::H5Pset_fclose_degree(fapl, degree),
                    "H5Pset_fclose_degree",
                    &what,
                )?;
                let id = ffi::H5Fopen(c.as_ptr(), ffi::H5F_ACC_RDONLY, fapl);
                if id >= 0 {
                    return Ok(Self { id, path: what });
                }
            }
        }
        Err(H5Error::Call {
            call: "H5Fopen",
            what,
        })
    }

    /// The dataset `name` (at the root group) if its chunks can be decoded here; otherwise why
    /// not (not 2-D, not chunked, another filter, a big-endian or non-numeric type, …).
    pub fn dataset(&self, name: &str) -> Result<Dataset, String> {
        let what = format!("{}:{name}", self.path);
        let c = CString::new(name).map_err(|_| "NUL in the name".to_string())?;
        // SAFETY: `self.id` is an open file; every identifier obtained below is closed by a
        // guard (or by the returned Dataset); output arrays are sized as the calls require.
        unsafe {
            let id = check_id(
                ffi::H5Dopen2(self.id, c.as_ptr(), ffi::H5P_DEFAULT),
                "H5Dopen2",
                &what,
            )
            .map_err(|e| e.to_string())?;
            let mut dataset = Dataset {
                id,
                name: what.clone(),
                layout: Layout::default(),
            };
            let space = Guard(ffi::H5Dget_space(id), ffi::H5Sclose);
            if space.0 < 0 || ffi::H5Sget_simple_extent_ndims(space.0) != 2 {
                return Err("not a 2-D dataset".into());
            }
            let mut dims = [0u64; 2];
            if ffi::H5Sget_simple_extent_dims(space.0, dims.as_mut_ptr(), std::ptr::null_mut()) != 2
            {
                return Err("no extent".into());
            }
            let dtype = {
                let t = Guard(ffi::H5Dget_type(id), ffi::H5Tclose);
                if t.0 < 0 {
                    return Err("no datatype".into());
                }
                if ffi::H5Tget_order(t.0) != ffi::H5T_ORDER_LE {
                    return Err("not little-endian".into());
                }
                let size = ffi::H5Tget_size(t.0);
                match ffi::H5Tget_class(t.0) {
                    ffi::H5T_FLOAT if size == 4 || size == 8 => DType::float(size),
                    ffi::H5T_INTEGER if matches!(size, 1 | 2 | 4 | 8) => {
                        DType::int(size, ffi::H5Tget_sign(t.0) != ffi::H5T_SGN_NONE)
                    }
                    _ => return Err("not an integer or float type".into()),
                }
            };
            let plist = Guard(ffi::H5Dget_create_plist(id), ffi::H5Pclose);
            if plist.0 < 0 || ffi::H5Pget_layout(plist.0) != ffi::H5D_CHUNKED {
                return Err("not chunked".into());
            }
            let mut chunk = [0u64; 2];
            if ffi::H5Pget_chunk(plist.0, 2, chunk.as_mut_ptr()) != 2 || chunk.contains(&0) {
                return Err("no chunk shape".into());
            }
            let n = ffi::H5Pget_nfilters(plist.0);
            let mut filters = Vec::new();
            for i in 0..n.max(0) as u32 {
                let (mut flags, mut nelmts, mut config) = (0u32, 8usize, 0u32);
                let mut values = [0u32; 8];
                let mut fname = [0 as std::ffi::c_char; 64];
                let f = ffi::H5Pget_filter2(
                    plist.0,
                    i,
                    &mut flags,
                    &mut nelmts,
                    values.as_mut_ptr(),
                    fname.len(),
                    fname.as_mut_ptr(),
                    &mut config,
                );
                filters.push(match f {
                    ffi::H5Z_FILTER_DEFLATE => Filter::Deflate,
                    ffi::H5Z_FILTER_SHUFFLE => Filter::Shuffle,
                    other => return Err(format!("filter {other} is not decoded here")),
                });
            }
            dataset.layout = Layout {
                shape: [dims[0] as usize, dims[1] as usize],
                chunk: [chunk[0] as usize, chunk[1] as usize],
                filters,
                dtype,
            };
            Ok(dataset)
        }
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // SAFETY: the file identifier is valid and closed once; datasets borrow no memory of it.
        unsafe {
            ffi::H5Fclose(self.id);
        }
    }
}

impl Dataset {
    /// Shape, chunking, filters and element type.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The stored bytes of every chunk that holds a row of `[row0, row0 + rows)`, all columns.
    pub fn read_rows(&self, row0: usize, rows: usize) -> Result<RawRows, H5Error> {
        let l = &self.layout;
        let [ch, cw] = l.chunk;
        let (c0, c1) = (row0 / ch, (row0 + rows).div_ceil(ch));
        let ncols = l.shape[1].div_ceil(cw);
        let mut chunks = Vec::with_capacity((c1 - c0) * ncols);
        for ci in c0..c1 {
            for cj in 0..ncols {
                let offset = [(ci * ch) as u64, (cj * cw) as u64];
                let what = || format!("{} chunk ({}, {})", self.name, offset[0], offset[1]);
                let (mut nbytes, mut addr, mut info_mask) = (0u64, 0u64, 0u32);
                // SAFETY: `offset` has one entry per dimension (2) and is a chunk origin.
                let status = unsafe {
                    ffi::H5Dget_chunk_info_by_coord(
                        self.id,
                        offset.as_ptr(),
                        &mut info_mask,
                        &mut addr,
                        &mut nbytes,
                    )
                };
                check(status, "H5Dget_chunk_info_by_coord", &what())?;
                if nbytes == 0 {
                    return Err(H5Error::Unallocated {
                        row: ci * ch,
                        col: cj * cw,
                    });
                }
                let mut bytes = vec![0u8; nbytes as usize];
                let mut mask = 0u32;
                // SAFETY: `bytes` holds exactly the chunk's stored size, as HDF5 reported it.
                let status = unsafe {
                    ffi::H5Dread_chunk(
                        self.id,
                        ffi::H5P_DEFAULT,
                        offset.as_ptr(),
                        &mut mask,
                        bytes.as_mut_ptr().cast(),
                    )
                };
                check(status, "H5Dread_chunk", &what())?;
                chunks.push(RawChunk {
                    row: ci,
                    col: cj,
                    mask,
                    bytes,
                });
            }
        }
        Ok(RawRows {
            layout: self.layout.clone(),
            row0,
            rows,
            chunks,
        })
    }
}

impl Drop for Dataset {
    fn drop(&mut self) {
        // SAFETY: the dataset identifier is valid and closed once.
        unsafe {
            ffi::H5Dclose(self.id);
        }
    }
}
