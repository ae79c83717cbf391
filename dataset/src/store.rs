//! Reading a store's level arrays one chunk (= patch) at a time with zarrs, the shard indexes
//! cached per array.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use icefm_schemas::Level;
use icefm_schemas::norm::mean_std_of_store;
use icefm_schemas::store::{ALL_SHARDS_ATTR, SCENES_GROUP, StoreAttrs};
use std::num::NonZeroU64;
use zarrs::array::CodecOptions;

use zarrs::array::codec::api::ArrayToBytesCodecTraits;
use zarrs::array::{
    Array, ArrayBytes, ArrayError, ArrayMetadata, ArrayShardedReadableExt,
    ArrayShardedReadableExtCache, CodecChain, CodecError,
};
use zarrs::metadata_ext::codec::sharding::ShardingCodecConfigurationV1;
use zarrs::storage::byte_range::ByteRange;
use zarrs::storage::{ReadableStorage, ReadableStorageTraits};

use crate::error::DatasetError;

/// How to mend a scene whose stored chunks are damaged.
pub(crate) const REDO: &str = "write the scene again with `icefm ingest --redo FILE --store STORE`";

/// Whether `e` is a read that ended early: a file shorter than the shard index says.
fn truncated(e: &ArrayError) -> bool {
    use zarrs::storage::StorageError;
    let eof = |s: &StorageError| matches!(s, StorageError::IOError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
    match e {
        ArrayError::StorageError(s) | ArrayError::CodecError(CodecError::StorageError(s)) => eof(s),
        ArrayError::CodecError(CodecError::IOError(io)) => {
            io.kind() == std::io::ErrorKind::UnexpectedEof
        }
        _ => false,
    }
}

/// The three arrays of a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArrayKind {
    /// `sar`: f32 `[C, H, W]`, dB, NaN = invalid.
    Sar = 0,
    /// `aux`: f32 `[K, H, W]`.
    Aux = 1,
    /// `labels`: u8 `[3, H, W]`, 255 = ignore.
    Labels = 2,
}

impl ArrayKind {
    /// Array name inside a level group.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sar => "sar",
            Self::Aux => "aux",
            Self::Labels => "labels",
        }
    }
}

/// One opened array with its shard-index cache.
struct Opened {
    array: Array<dyn ReadableStorageTraits>,
    shards: ArrayShardedReadableExtCache,
    inner: Option<InnerCodecs>,
    /// The array records that every shard file was written ([`ALL_SHARDS_ATTR`]): a missing one
    /// is damage.
    all_shards: bool,
}

impl Opened {
    /// The store key of the file holding chunk `(row, col)`: its shard file in a sharded array
    /// (inner chunks of `inner.shape` in shards of the array's chunk shape).
    fn file_of(&self, row: u64, col: u64) -> String {
        let edge = |shape: &[NonZeroU64], axis: usize| shape.get(axis).map_or(1, |d| d.get());
        let mut at = vec![0, row, col];
        if let (Some(inner), Ok(outer)) = (&self.inner, self.array.chunk_shape(&[0, 0, 0])) {
            for (axis, i) in at.iter_mut().enumerate().skip(1) {
                *i = *i * edge(&inner.shape, axis) / edge(&outer, axis);
            }
        }
        self.array.chunk_key(&at).to_string()
    }
}

/// How to decode one inner chunk of a sharded array from its stored bytes.
struct InnerCodecs {
    chain: CodecChain,
    shape: Vec<NonZeroU64>,
    /// The stored bytes end in a CRC-32C (a last `crc32c` codec, taken out of `chain`): checked
    /// and cut off here in place. zarrs' own `crc32c` decoder copies the rest of the chunk into
    /// a new buffer, which made the loader a third slower (`docs/benchmarks.md`).
    crc: bool,
}

impl InnerCodecs {
    /// The inner codec chain of an array whose only codec is `sharding_indexed` (what icefm
    /// writes); `None` for any other layout, which then takes zarrs' general path.
    fn of(array: &Array<dyn ReadableStorageTraits>) -> Option<Self> {
        let ArrayMetadata::V3(meta) = array.metadata() else {
            return None;
        };
        let [codec] = meta.codecs.as_slice() else {
            return None;
        };
        if codec.name() != "sharding_indexed" {
            return None;
        }
        let config: ShardingCodecConfigurationV1 = codec.to_configuration().ok()?;
        let mut codecs = config.codecs.clone();
        // A trailing `crc32c` with its checksum at the end (the default, and what icefm writes).
        let crc = codecs.last().is_some_and(|c| {
            c.name() == "crc32c"
                && c.configuration()
                    .is_none_or(|conf| conf.get("location").is_none_or(|l| l == "end"))
        });
        if crc {
            codecs.pop();
        }
        let chain = CodecChain::from_metadata(&codecs).ok()?;
        Some(Self {
            chain,
            shape: config.chunk_shape.to_vec(),
            crc,
        })
    }
}

/// A decoded chunk, `[C, P, P]`, as the elements' native-endian bytes (f32 for `sar` and
/// `aux`, u8 for `labels`; pixels past the scene edge hold the fill value). Kept as bytes: zarrs
/// decodes into bytes, and a typed copy would cost a pass over every chunk.
#[derive(Debug, Clone)]
pub struct Chunk(pub Arc<Vec<u8>>);

impl Chunk {
    /// Decoded size in bytes.
    pub fn bytes(&self) -> usize {
        self.0.len()
    }
}

/// The root attributes of the store at `path` (a folder, or a URL into object storage), the
/// format version checked.
pub fn read_attrs(path: &Path) -> Result<StoreAttrs, DatasetError> {
    let store_error =
        |e: &dyn std::fmt::Display| DatasetError::Store(format!("{}: {e}", path.display()));
    // Only a missing zarr.json makes the folder "not a store"; a refused or failed read of one
    // says so.
    let bytes = crate::location::read(&path.join("zarr.json")).map_err(|e| {
        store_error(&if e.kind() == std::io::ErrorKind::NotFound {
            format!("not an icefm store (no zarr.json: {e})")
        } else {
            format!("cannot read zarr.json: {e}")
        })
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| store_error(&format!("zarr.json: {e}")))?;
    StoreAttrs::from_zarr_json(text).map_err(|e| store_error(&e))
}

/// A store opened for reading: its attributes and the arrays opened so far.
pub struct StoreReader {
    /// Root folder, or URL ([`crate::location`]).
    pub path: PathBuf,
    /// Root attributes.
    pub attrs: StoreAttrs,
    storage: ReadableStorage,
    opened: Mutex<HashMap<(String, Level, ArrayKind), Arc<Opened>>>,
    options: CodecOptions,
}

impl StoreReader {
    /// Open the store at `path` (a folder, or a URL into object storage).
    pub fn open(path: &Path) -> Result<Self, DatasetError> {
        let attrs = read_attrs(path)?;
        let storage = crate::location::zarr_storage(path)
            .map_err(|e| DatasetError::Store(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            attrs,
            storage,
            opened: Mutex::new(HashMap::new()),
            // One chunk per call, decoded on the caller's thread: the loader spreads chunks over
            // its own threads.
            options: CodecOptions::default().with_concurrent_target(1),
        })
    }

    /// The store's Zarr storage, opened once.
    pub(crate) fn storage(&self) -> ReadableStorage {
        self.storage.clone()
    }

    /// Mean and standard deviation (raw units) of a `sar` or `aux` channel, from the store's
    /// recorded normalisation.
    pub fn mean_std(&self, channel: &str) -> Result<(f32, f32), DatasetError> {
        mean_std_of_store(&self.attrs.normalisation, channel)
            .map(|m| (m.mean as f32, m.std as f32))
            .ok_or_else(|| {
                DatasetError::Store(format!(
                    "{}: no normalisation constants for channel `{channel}`",
                    self.path.display()
                ))
            })
    }

    /// Zarr node of an array.
    pub fn node(scene: &str, level: Level, kind: ArrayKind) -> String {
        format!("/{SCENES_GROUP}/{scene}/{level}/{}", kind.name())
    }

    fn array(
        &self,
        scene: &str,
        level: Level,
        kind: ArrayKind,
    ) -> Result<Arc<Opened>, DatasetError> {
        let key = (scene.to_string(), level, kind);
        if let Some(o) = self.lock().get(&key) {
            return Ok(o.clone());
        }
        let node = Self::node(scene, level, kind);
        let array =
            Array::open(self.storage.clone(), &node).map_err(|e| self.read_error(&node, e))?;
        let shards = ArrayShardedReadableExtCache::new(&array);
        let inner = InnerCodecs::of(&array);
        let all_shards =
            array.attributes().get(ALL_SHARDS_ATTR) == Some(&serde_json::Value::Bool(true));
        let o = Arc::new(Opened {
            array,
            shards,
            inner,
            all_shards,
        });
        self.lock().insert(key, o.clone());
        Ok(o)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Level, ArrayKind), Arc<Opened>>> {
        // A panic while holding the map cannot leave it inconsistent (inserts are whole).
        self.opened.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An error reading chunk `(row, col)`, naming the file that holds it (its shard file in
    /// a sharded array).
    fn chunk_error(
        &self,
        o: &Opened,
        [row, col]: [u64; 2],
        e: &dyn std::fmt::Display,
    ) -> DatasetError {
        self.read_error(
            o.file_of(row, col).as_str(),
            format!("chunk ({row}, {col}): {e}"),
        )
    }

    fn read_error(&self, node: &str, e: impl std::fmt::Display) -> DatasetError {
        DatasetError::Read {
            path: self
                .path
                .join(node.trim_start_matches('/'))
                .display()
                .to_string(),
            reason: e.to_string(),
        }
    }

    /// Shape `[C, H, W]` of an array.
    pub fn shape(
        &self,
        scene: &str,
        level: Level,
        kind: ArrayKind,
    ) -> Result<[u64; 3], DatasetError> {
        let o = self.array(scene, level, kind)?;
        let s = o.array.shape();
        match s {
            [c, h, w] => Ok([*c, *h, *w]),
            _ => Err(self.read_error(
                &Self::node(scene, level, kind),
                format!("expected 3 dimensions, found {}", s.len()),
            )),
        }
    }

    /// Decode chunk `(row, col)` of an array: `[C, P, P]`.
    ///
    /// For icefm's sharded arrays this reads the chunk's stored bytes through the cached shard
    /// index and runs the inner codec chain on them, straight into the result. zarrs' general
    /// sharded read decodes into a cache of its own and copies out of it; skipping that copy
    /// is about a fifth of the decoding time (`docs/benchmarks.md`). Other layouts take zarrs'
    /// general path ([`StoreReader::decode_with_zarrs`]).
    pub fn decode(
        &self,
        scene: &str,
        level: Level,
        kind: ArrayKind,
        row: u64,
        col: u64,
    ) -> Result<Chunk, DatasetError> {
        let o = self.array(scene, level, kind)?;
        let Some(inner) = &o.inner else {
            return self.decode_with_zarrs(scene, level, kind, row, col);
        };
        let err = |e: &dyn std::fmt::Display| self.chunk_error(&o, [row, col], e);
        let shape = o.array.shape();
        let grid = |axis: usize| {
            let edge = inner.shape.get(axis).map_or(1, |d| d.get());
            shape.get(axis).map_or(0, |n| n.div_ceil(edge))
        };
        if row >= grid(1) || col >= grid(2) {
            return Err(err(&format!(
                "outside the {} x {} chunk grid",
                grid(1),
                grid(2)
            )));
        }
        let data_type = o.array.data_type();
        let fill = o.array.fill_value();
        let at = [0, row, col];
        // zarrs 0.23 does not check a shard index's "no chunk" entry (offset and size u64::MAX)
        // before reading an encoded subchunk, so look first.
        // A shard index (it has its own CRC-32C) that no longer matches is damage too, and so is
        // a shard file shorter than its index says.
        let index_err = |e: ArrayError| {
            if matches!(e, ArrayError::CodecError(CodecError::InvalidChecksum)) {
                err(&format!(
                    "the checksum of its shard's index is invalid: the store is damaged; {REDO}"
                ))
            } else if truncated(&e) {
                err(&format!(
                    "the shard file is shorter than its index says ({e}): the store is \
                     damaged; {REDO}"
                ))
            } else {
                err(&e)
            }
        };
        let stored = match o
            .array
            .subchunk_byte_range(&o.shards, &at)
            .map_err(index_err)?
        {
            // No shard file. Arrays that record writing every shard hold none missing unless
            // the store lost it: reading it as fill would score and train on an empty patch.
            None if o.all_shards => {
                return Err(err(&format!(
                    "the shard file is missing, and this array was written with every shard: \
                     the store is damaged; {REDO}"
                )));
            }
            Some(ByteRange::FromStart(offset, _)) if offset == u64::MAX => None,
            _ => o
                .array
                .retrieve_encoded_subchunk(&o.shards, &at)
                .map_err(index_err)?,
        };
        let damaged = |what: &dyn std::fmt::Display| {
            err(&format!(
                "{what}: the chunk's bytes changed since they were written, so the store is \
                 damaged; {REDO}"
            ))
        };
        let decoded = match stored {
            Some(mut encoded) => {
                if inner.crc {
                    let n = encoded
                        .len()
                        .checked_sub(4)
                        .ok_or_else(|| damaged(&"shorter than its checksum"))?;
                    let mut sum = [0u8; 4];
                    sum.copy_from_slice(&encoded[n..]);
                    if self.options.validate_checksums()
                        && crc32c::crc32c(&encoded[..n]) != u32::from_le_bytes(sum)
                    {
                        return Err(damaged(&"the checksum is invalid"));
                    }
                    encoded.truncate(n);
                }
                inner
                    .chain
                    .decode(encoded.into(), &inner.shape, data_type, fill, &self.options)
                    .map_err(|e| match e {
                        CodecError::InvalidChecksum => damaged(&e),
                        e => err(&e),
                    })?
            }
            // A chunk never written holds the fill value.
            None => ArrayBytes::new_fill_value(
                data_type,
                inner.shape.iter().map(|d| d.get()).product(),
                fill,
            )
            .map_err(|e| err(&e))?,
        };
        let bytes = decoded.into_fixed().map_err(|e| err(&e))?.into_owned();
        Ok(Chunk(Arc::new(bytes)))
    }

    /// Decode chunk `(row, col)` with zarrs' general sharded read (the reference for
    /// [`StoreReader::decode`]).
    pub fn decode_with_zarrs(
        &self,
        scene: &str,
        level: Level,
        kind: ArrayKind,
        row: u64,
        col: u64,
    ) -> Result<Chunk, DatasetError> {
        let o = self.array(scene, level, kind)?;
        let at = [0, row, col];
        let err = |e: &dyn std::fmt::Display| self.chunk_error(&o, [row, col], e);
        let bytes = o
            .array
            .retrieve_subchunk_opt::<ArrayBytes<'static>>(&o.shards, &at, &self.options)
            .map_err(|e| err(&e))?
            .into_fixed()
            .map_err(|e| err(&e))?
            .into_owned();
        Ok(Chunk(Arc::new(bytes)))
    }
}
