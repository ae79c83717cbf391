//! Undoing HDF5's filters and converting elements: pure Rust, on rayon threads.

use std::cell::RefCell;

use rayon::prelude::*;

/// An HDF5 filter this crate decodes, in the order the writer applied them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// zlib (deflate) compression, `H5Z_FILTER_DEFLATE`.
    Deflate,
    /// Byte shuffle, `H5Z_FILTER_SHUFFLE`.
    Shuffle,
}

/// Element type of a dataset (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DType {
    /// Bytes per element.
    pub size: usize,
    /// Floating point (else integer).
    pub float: bool,
    /// Signed integer.
    pub signed: bool,
}

impl DType {
    pub(crate) fn float(size: usize) -> Self {
        Self {
            size,
            float: true,
            signed: true,
        }
    }

    pub(crate) fn int(size: usize, signed: bool) -> Self {
        Self {
            size,
            float: false,
            signed,
        }
    }
}

/// What a dataset's chunks hold and how they are stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// Rows, columns.
    pub shape: [usize; 2],
    /// Chunk rows, chunk columns (edge chunks are stored at full size).
    pub chunk: [usize; 2],
    /// Filters in the order they were applied on writing.
    pub filters: Vec<Filter>,
    /// Element type.
    pub dtype: DType,
}

/// The stored bytes of one chunk.
#[derive(Debug, Clone)]
pub struct RawChunk {
    /// Chunk-row index.
    pub row: usize,
    /// Chunk-column index.
    pub col: usize,
    /// HDF5's filter mask: bit `i` set means filter `i` was skipped for this chunk.
    pub mask: u32,
    /// Stored (filtered) bytes.
    pub bytes: Vec<u8>,
}

/// The raw chunks covering a block of whole rows of a dataset.
#[derive(Debug, Clone)]
pub struct RawRows {
    /// The dataset's layout.
    pub layout: Layout,
    /// First row asked for.
    pub row0: usize,
    /// Rows asked for.
    pub rows: usize,
    /// Chunks, by chunk-row then chunk-column.
    pub chunks: Vec<RawChunk>,
}

/// A chunk that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The element type does not convert to the requested one without loss of meaning.
    #[error("{0} elements do not convert to {1}")]
    Type(String, &'static str),
    /// Corrupt or truncated compressed data.
    #[error("chunk ({row}, {col}): {reason}")]
    Corrupt {
        /// Chunk-row index.
        row: usize,
        /// Chunk-column index.
        col: usize,
        /// What went wrong.
        reason: String,
    },
}

/// A type the elements are converted to, with C's (and so netCDF-C's) conversion rules.
pub trait Element: Copy + Default + Send + Sync + 'static {
    /// Name for errors.
    const NAME: &'static str;
    /// Whether every value of `d` converts to this type exactly as netCDF-C would convert it
    /// (netCDF-C reports out-of-range conversions as errors; such types are refused here).
    fn accepts(d: DType) -> bool;
    /// Convert from an `f64` (which holds every source value of an accepted type exactly,
    /// except 64-bit integers beyond 2^53 which netCDF-C also rounds).
    fn from_f64(x: f64) -> Self;
    /// Convert from an `f32` (direct, so no double rounding).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    fn accepts(_: DType) -> bool {
        true
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f64 {
    const NAME: &'static str = "f64";
    fn accepts(_: DType) -> bool {
        true
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn from_f32(x: f32) -> Self {
        f64::from(x)
    }
}

impl Element for u8 {
    const NAME: &'static str = "u8";
    fn accepts(d: DType) -> bool {
        !d.float && d.size == 1 && !d.signed
    }
    fn from_f64(x: f64) -> Self {
        x as u8
    }
    fn from_f32(x: f32) -> Self {
        x as u8
    }
}

thread_local! {
    static INFLATER: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
    /// Inflated bytes of the chunk being decoded, reused: a fresh multi-megabyte buffer per
    /// chunk costs the kernel a page fault and a page clear for every 4 KiB.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Layout {
    /// Elements per stored chunk.
    pub fn chunk_len(&self) -> usize {
        self.chunk[0] * self.chunk[1]
    }

    /// Whether the shuffle filter applies to chunk `c` (not skipped by its mask).
    fn shuffled(&self, c: &RawChunk) -> bool {
        self.filters
            .iter()
            .enumerate()
            .any(|(i, f)| *f == Filter::Shuffle && !(i < 32 && c.mask & (1 << i) != 0))
    }

    /// Inflate chunk `c` into `out` if deflate applies (else leave `out` empty: the stored bytes
    /// are the data). Returns whether the bytes are still shuffled. Only the pipelines this crate
    /// accepts exist: deflate and shuffle, shuffle applied first on writing.
    fn inflate(&self, c: &RawChunk, out: &mut Vec<u8>) -> Result<bool, DecodeError> {
        let expect = self.chunk_len() * self.dtype.size;
        let corrupt = |reason: String| DecodeError::Corrupt {
            row: c.row,
            col: c.col,
            reason,
        };
        let deflated = self
            .filters
            .iter()
            .enumerate()
            .any(|(i, f)| *f == Filter::Deflate && !(i < 32 && c.mask & (1 << i) != 0));
        out.clear();
        let len = if deflated {
            out.resize(expect, 0);
            INFLATER
                .with(|d| d.borrow_mut().zlib_decompress(&c.bytes, out))
                .map_err(|e| corrupt(format!("inflate failed ({e:?})")))?
        } else {
            c.bytes.len()
        };
        if len != expect {
            return Err(corrupt(format!("{len} bytes, expected {expect}")));
        }
        Ok(self.shuffled(c))
    }
}

/// Element `i` of a chunk's bytes as little-endian bytes, shuffled (byte `b` at `b * n + i`) or
/// not.
#[inline(always)]
fn gather<const N: usize>(bytes: &[u8], shuffled: bool, n: usize, i: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if shuffled {
        for (b, x) in a.iter_mut().enumerate() {
            *x = bytes[b * n + i];
        }
    } else {
        a.copy_from_slice(&bytes[i * N..i * N + N]);
    }
    a
}

/// Convert elements `[start, start + out.len())` of a chunk's `n` elements (little-endian bytes
/// of type `d`, shuffled or not) into `out`.
fn convert_range<T: Element>(
    d: DType,
    bytes: &[u8],
    shuffled: bool,
    n: usize,
    start: usize,
    out: &mut [T],
) {
    macro_rules! each {
        ($t:ty, $n:literal, $f:expr) => {
            for (k, o) in out.iter_mut().enumerate() {
                let v = <$t>::from_le_bytes(gather::<$n>(bytes, shuffled, n, start + k));
                *o = $f(v);
            }
        };
    }
    match (d.float, d.signed, d.size) {
        (true, _, 4) => each!(f32, 4, T::from_f32),
        (true, _, _) => each!(f64, 8, T::from_f64),
        (false, true, 1) => each!(i8, 1, |v| T::from_f64(f64::from(v))),
        (false, false, 1) => each!(u8, 1, |v| T::from_f64(f64::from(v))),
        (false, true, 2) => each!(i16, 2, |v| T::from_f64(f64::from(v))),
        (false, false, 2) => each!(u16, 2, |v| T::from_f64(f64::from(v))),
        (false, true, 4) => each!(i32, 4, |v| T::from_f64(f64::from(v))),
        (false, false, 4) => each!(u32, 4, |v| T::from_f64(f64::from(v))),
        (false, true, _) => each!(i64, 8, |v| T::from_f64(v as f64)),
        (false, false, _) => each!(u64, 8, |v| T::from_f64(v as f64)),
    }
}

impl RawRows {
    /// Decode the rows asked for into a row-major `rows × columns` array of `T`, inflating the
    /// chunks on the rayon pool.
    pub fn decode<T: Element>(&self) -> Result<Vec<T>, DecodeError> {
        let l = &self.layout;
        if !T::accepts(l.dtype) {
            return Err(DecodeError::Type(format!("{:?}", l.dtype), T::NAME));
        }
        let [ch, cw] = l.chunk;
        let width = l.shape[1];
        let ncols = width.div_ceil(cw);
        let first = self.row0 / ch;
        let mut out = vec![T::default(); self.rows * width];
        // Split the output into one list of row pieces per chunk, so every chunk is inflated,
        // unshuffled and converted straight into its place, in parallel and without a copy.
        let mut pieces: Vec<Vec<&mut [T]>> = (0..self.chunks.len()).map(|_| Vec::new()).collect();
        let index = |ci: usize, cj: usize| (ci - first) * ncols + cj;
        for (r, mut row) in out.chunks_mut(width).enumerate() {
            let ci = (self.row0 + r) / ch;
            for cj in 0..ncols {
                let n = cw.min(width - cj * cw);
                let (piece, rest) = row.split_at_mut(n);
                row = rest;
                if let Some(p) = pieces.get_mut(index(ci, cj)) {
                    p.push(piece);
                }
            }
        }
        let by_position = self
            .chunks
            .iter()
            .all(|c| c.row >= first && c.col < ncols && index(c.row, c.col) < self.chunks.len());
        if !by_position || self.chunks.len() != pieces.len() {
            return Err(DecodeError::Corrupt {
                row: first,
                col: 0,
                reason: "chunk list does not cover the rows asked for".into(),
            });
        }
        let mut tasks: Vec<(&RawChunk, Vec<&mut [T]>)> = Vec::with_capacity(self.chunks.len());
        let mut slots: Vec<Option<Vec<&mut [T]>>> = pieces.into_iter().map(Some).collect();
        for c in &self.chunks {
            let p = slots[index(c.row, c.col)].take().unwrap_or_default();
            tasks.push((c, p));
        }
        let n = l.chunk_len();
        tasks.into_par_iter().try_for_each(|(c, rows)| {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let shuffled = l.inflate(c, &mut scratch)?;
                let bytes: &[u8] = if scratch.is_empty() {
                    &c.bytes
                } else {
                    &scratch
                };
                // Local row of the first output row inside this chunk.
                let first_row = self.row0.max(c.row * ch) - c.row * ch;
                for (k, piece) in rows.into_iter().enumerate() {
                    let start = (first_row + k) * cw;
                    convert_range(l.dtype, bytes, shuffled, n, start, piece);
                }
                Ok(())
            })
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_follow_c_rules() {
        let d = DType::int(2, true);
        let bytes: Vec<u8> = [-3i16, 0, 32767]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = [0f32; 3];
        convert_range(d, &bytes, false, 3, 0, &mut out);
        assert_eq!(out, [-3.0, 0.0, 32767.0]);
        assert!(u8::accepts(DType::int(1, false)));
        assert!(!u8::accepts(DType::int(2, false)));
        assert!(!u8::accepts(DType::float(4)));
        let f: Vec<u8> = [1.5f64, -2.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut o = [0f32; 2];
        convert_range(DType::float(8), &f, false, 2, 0, &mut o);
        assert_eq!(o, [1.5, -2.25]);
        // The same two f64 shuffled: byte b of element i at b * 2 + i; decoded from element 1.
        let mut sh = vec![0u8; 16];
        for i in 0..2 {
            for b in 0..8 {
                sh[b * 2 + i] = f[i * 8 + b];
            }
        }
        let mut one = [0f32; 1];
        convert_range(DType::float(8), &sh, true, 2, 1, &mut one);
        assert_eq!(one, [-2.25]);
    }

    #[test]
    fn corrupt_deflate_is_an_error_not_garbage() {
        let l = Layout {
            shape: [2, 2],
            chunk: [2, 2],
            filters: vec![Filter::Deflate],
            dtype: DType::float(4),
        };
        let c = RawChunk {
            row: 0,
            col: 0,
            mask: 0,
            bytes: vec![0x78, 0x9c, 1, 2, 3],
        };
        assert!(matches!(
            l.inflate(&c, &mut Vec::new()),
            Err(DecodeError::Corrupt { .. })
        ));
        // A skipped filter (mask bit) leaves the stored bytes as they are.
        let raw = RawChunk {
            mask: 1,
            bytes: vec![0u8; 16],
            ..c
        };
        let mut out = Vec::new();
        assert!(matches!(l.inflate(&raw, &mut out), Ok(false)));
        assert!(out.is_empty());
    }
}
