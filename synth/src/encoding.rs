//! On-disk encodings of a scene. The real files' encoding is not known (reference §1), so the
//! generator writes every plausible form and a reader must accept each of them.

/// `_FillValue` of `polygon_icechart` under [`PolygonIdEncoding::Int32Fill`].
pub const POLYGON_ID_FILL: i32 = -1;

/// `scale_factor` of SAR under [`SarPacking::Int16Scaled`] (dB per count).
pub const SAR_SCALE_FACTOR: f32 = 0.002;
/// `add_offset` of SAR under [`SarPacking::Int16Scaled`] (dB): counts cover about −80 … +50 dB.
pub const SAR_ADD_OFFSET: f32 = -15.0;
/// `_FillValue` of SAR under [`SarPacking::Int16Scaled`] (marks NaN).
pub const SAR_FILL: i16 = i16::MIN;

/// Deflate level of the `default` encoding.
pub const DEFAULT_DEFLATE: i32 = 4;
/// Chunk edge of the `default` encoding.
pub const DEFAULT_CHUNK: usize = 1024;

/// How `polygon_icechart` stores polygon ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolygonIdEncoding {
    /// float32, NaN outside every polygon (land included).
    Float32Nan,
    /// int32 with a `_FillValue` attribute ([`POLYGON_ID_FILL`]) outside every polygon.
    Int32Fill,
}

/// How `polygon_codes` stores its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodesEncoding {
    /// `NC_STRING` (variable-length string), one per row.
    VlenString,
    /// `NC_CHAR` array `[polygon_codes, polygon_codes_strlen]`, rows NUL-padded.
    CharArray,
}

/// Storage layout of the 2-D variables on the SAR grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Contiguous storage (no chunks); cannot be combined with deflate.
    Contiguous,
    /// Chunks of `rows × cols`, each clamped to the variable's shape.
    Chunked {
        /// Chunk height.
        rows: usize,
        /// Chunk width.
        cols: usize,
    },
}

/// How the raw file stores the SAR channels. RTT files are always float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SarPacking {
    /// float32 dB, NaN invalid.
    Float32,
    /// int16 with `scale_factor` ([`SAR_SCALE_FACTOR`]), `add_offset` ([`SAR_ADD_OFFSET`]) and
    /// `_FillValue` ([`SAR_FILL`]) marking invalid pixels.
    Int16Scaled,
}

/// The on-disk form of a scene. It never changes the decoded values (packing aside, which
/// rounds SAR to [`SAR_SCALE_FACTOR`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Form of `polygon_icechart` (raw only).
    pub polygon_ids: PolygonIdEncoding,
    /// Form of `polygon_codes` (raw only).
    pub codes: CodesEncoding,
    /// Deflate level 0–9 with the shuffle filter, on every 2-D variable; `None`: uncompressed.
    pub deflate: Option<i32>,
    /// Layout of the 2-D SAR-grid variables.
    pub chunking: Chunking,
    /// Form of the SAR channels (raw only).
    pub sar_packing: SarPacking,
    /// RTT's float variables carry `_FillValue` = NaN, as xarray writes them (they hold no NaN:
    /// RTT marks invalid pixels 0). Raw files' float SAR and polygon ids always carry it.
    pub float_fill: bool,
}

impl Default for Encoding {
    /// The `default` encoding.
    fn default() -> Self {
        Self {
            polygon_ids: PolygonIdEncoding::Float32Nan,
            codes: CodesEncoding::VlenString,
            deflate: Some(DEFAULT_DEFLATE),
            chunking: Chunking::Chunked {
                rows: DEFAULT_CHUNK,
                cols: DEFAULT_CHUNK,
            },
            sar_packing: SarPacking::Float32,
            float_fill: false,
        }
    }
}

impl std::fmt::Display for Encoding {
    /// The short form of [`Encoding::all_named`]'s table, e.g. `ids f32 NaN, codes vlen,
    /// deflate 4, chunks 1024 × 1024, SAR f32`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = match self.polygon_ids {
            PolygonIdEncoding::Float32Nan => "f32 NaN",
            PolygonIdEncoding::Int32Fill => "i32 fill",
        };
        let codes = match self.codes {
            CodesEncoding::VlenString => "vlen",
            CodesEncoding::CharArray => "char",
        };
        let deflate = self
            .deflate
            .map_or_else(|| "none".to_string(), |d| d.to_string());
        let chunks = match self.chunking {
            Chunking::Contiguous => "contiguous".to_string(),
            Chunking::Chunked { rows, cols } => {
                let side = |n: usize| {
                    if n == usize::MAX {
                        "full width".to_string()
                    } else {
                        n.to_string()
                    }
                };
                format!("{} × {}", side(rows), side(cols))
            }
        };
        let sar = match self.sar_packing {
            SarPacking::Float32 => "f32",
            SarPacking::Int16Scaled => "i16 scaled",
        };
        let fill = if self.float_fill {
            ", RTT floats fill NaN"
        } else {
            ""
        };
        write!(
            f,
            "ids {ids}, codes {codes}, deflate {deflate}, chunks {chunks}, SAR {sar}{fill}"
        )
    }
}

impl Encoding {
    /// The named presets, together covering every form above at least once:
    ///
    /// | name | ids | codes | deflate | chunks | SAR | RTT float `_FillValue` |
    /// |---|---|---|---|---|---|---|
    /// | `default` | f32 NaN | vlen | 4 | 1024 × 1024 | f32 | – |
    /// | `int-ids-char-codes` | i32 fill | char | 4 | 1024 × 1024 | f32 | – |
    /// | `contiguous-uncompressed` | f32 NaN | vlen | – | contiguous | f32 | – |
    /// | `packed-int16` | i32 fill | vlen | 4 | 512 × 512 | i16 scaled | – |
    /// | `row-chunks` | f32 NaN | char | 1 | 16 × full width | f32 | NaN |
    /// | `odd-chunks-uncompressed` | i32 fill | char | – | 333 × 777 | i16 scaled | NaN |
    pub fn all_named() -> Vec<(&'static str, Encoding)> {
        use CodesEncoding::{CharArray, VlenString};
        use PolygonIdEncoding::{Float32Nan, Int32Fill};
        use SarPacking::{Float32, Int16Scaled};
        let chunked = |rows, cols| Chunking::Chunked { rows, cols };
        let enc = |polygon_ids, codes, deflate, chunking, sar_packing| Encoding {
            polygon_ids,
            codes,
            deflate,
            chunking,
            sar_packing,
            float_fill: false,
        };
        let filled = |e: Encoding| Encoding {
            float_fill: true,
            ..e
        };
        vec![
            ("default", Encoding::default()),
            (
                "int-ids-char-codes",
                enc(Int32Fill, CharArray, Some(4), chunked(1024, 1024), Float32),
            ),
            (
                "contiguous-uncompressed",
                enc(Float32Nan, VlenString, None, Chunking::Contiguous, Float32),
            ),
            (
                "packed-int16",
                enc(
                    Int32Fill,
                    VlenString,
                    Some(4),
                    chunked(512, 512),
                    Int16Scaled,
                ),
            ),
            (
                "row-chunks",
                filled(enc(
                    Float32Nan,
                    CharArray,
                    Some(1),
                    chunked(16, usize::MAX),
                    Float32,
                )),
            ),
            (
                "odd-chunks-uncompressed",
                filled(enc(
                    Int32Fill,
                    CharArray,
                    None,
                    chunked(333, 777),
                    Int16Scaled,
                )),
            ),
        ]
    }

    /// The preset called `name` (see [`Encoding::all_named`]).
    pub fn named(name: &str) -> Option<Encoding> {
        Self::all_named()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, e)| e)
    }

    /// Chunk shape for a `height × width` variable, `None` for contiguous storage.
    pub(crate) fn chunk_shape(&self, height: usize, width: usize) -> Option<[usize; 2]> {
        match self.chunking {
            Chunking::Contiguous => None,
            Chunking::Chunked { rows, cols } => {
                Some([rows.clamp(1, height.max(1)), cols.clamp(1, width.max(1))])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_cover_every_form() {
        let all = Encoding::all_named();
        let any = |f: &dyn Fn(&Encoding) -> bool| all.iter().any(|(_, e)| f(e));
        assert!(any(&|e| e.polygon_ids == PolygonIdEncoding::Float32Nan));
        assert!(any(&|e| e.polygon_ids == PolygonIdEncoding::Int32Fill));
        assert!(any(&|e| e.codes == CodesEncoding::VlenString));
        assert!(any(&|e| e.codes == CodesEncoding::CharArray));
        assert!(any(&|e| e.deflate.is_some()));
        assert!(any(&|e| e.deflate.is_none()));
        assert!(any(&|e| e.chunking == Chunking::Contiguous));
        assert!(any(&|e| matches!(e.chunking, Chunking::Chunked { .. })));
        assert!(any(&|e| e.sar_packing == SarPacking::Int16Scaled));
        assert!(any(&|e| e.sar_packing == SarPacking::Float32));
        assert_eq!(Encoding::named("default"), Some(Encoding::default()));
        assert_eq!(Encoding::named("nope"), None);
        // Contiguous storage is never combined with deflate (HDF5 cannot).
        assert!(
            all.iter()
                .all(|(_, e)| e.chunking != Chunking::Contiguous || e.deflate.is_none())
        );
    }

    #[test]
    fn chunks_are_clamped_to_the_shape() {
        let e = Encoding::named("row-chunks").unwrap_or_default();
        assert_eq!(e.chunk_shape(300, 320), Some([16, 320]));
        assert_eq!(
            Encoding::default().chunk_shape(300, 5000),
            Some([300, 1024])
        );
        let c = Encoding::named("contiguous-uncompressed").unwrap_or_default();
        assert_eq!(c.chunk_shape(300, 320), None);
    }
}
