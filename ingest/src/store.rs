//! The Zarr v3 store: creation, compatibility checks, scene groups, level arrays.
//!
//! Layout (format version 1, `DESIGN.md`): `zarr.json` (attrs.icefm = [`StoreAttrs`]),
//! `scenes/<id>/<level>/{sar,labels,aux}`, `scenes/<id>/grid2km`, `manifests/*.parquet`.
//! Level arrays are `[C, H, W]` with chunk = patch `[C, P, P]`, sharded by chunk-row
//! (`[C, P, W rounded up to P]`) so one chunk-row of output is written as one shard.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use icefm_schemas::norm::GLOBAL_MEAN_STD;
use icefm_schemas::store::{
    ALL_SHARDS_ATTR, AUX_CHANNELS, BILINEAR_SAR_RULE, CONTINUOUS_RULE, Codec, FORMAT_VERSION,
    LABEL_CHANNELS, LABEL_RULE, Level, SAR_CHANNELS, SCENES_GROUP, SarResample, StoreAttrs,
};
use icefm_schemas::{IGNORE, Task};
use serde_json::{Map, Value, json};
use zarrs::array::codec::{
    BloscCodec, BloscCompressionLevel, BloscCompressor, BloscShuffleMode, Crc32cCodec, ZstdCodec,
};
use zarrs::array::codec::{ShardingCodecOptions, SubchunkWriteOrder};
use zarrs::array::{Array, ArrayBuilder, ArraySubset, data_type};
use zarrs::array::{BytesToBytesCodecTraits, CodecOptions, CodecSpecificOptions};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::{Group, GroupBuilder};

use crate::error::StoreError;

/// A store opened for writing.
#[derive(Clone)]
pub struct Store {
    /// Root folder.
    pub path: PathBuf,
    /// zarrs filesystem store.
    pub fs: Arc<FilesystemStore>,
    /// Root attributes.
    pub attrs: StoreAttrs,
}

/// The root attributes for new stores made with these options.
pub fn new_attrs(levels: &[Level], patch: u32, codec: Codec) -> StoreAttrs {
    let classes: Map<String, Value> = Task::ALL
        .iter()
        .map(|t| (t.name().to_string(), json!(t.class_names())))
        .collect();
    let normalisation: Map<String, Value> = GLOBAL_MEAN_STD
        .iter()
        .map(|(n, m)| ((*n).to_string(), json!({"mean": m.mean, "std": m.std})))
        .collect();
    StoreAttrs {
        format_version: FORMAT_VERSION,
        levels: levels.to_vec(),
        patch,
        sar_channels: SAR_CHANNELS.iter().map(|s| (*s).to_string()).collect(),
        aux_channels: AUX_CHANNELS.iter().map(|s| (*s).to_string()).collect(),
        label_channels: LABEL_CHANNELS.iter().map(|s| (*s).to_string()).collect(),
        classes: Value::Object(classes),
        normalisation: Value::Object(normalisation),
        label_rule: LABEL_RULE.to_string(),
        continuous_rule: CONTINUOUS_RULE.to_string(),
        codec,
        sar_resample: Default::default(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// `attrs` for a store whose levels resample HH and HV by `mode` (its rule recorded in
/// `continuous_rule`).
pub fn with_sar_resample(mut attrs: StoreAttrs, mode: SarResample) -> StoreAttrs {
    attrs.sar_resample = mode;
    attrs.continuous_rule = match mode {
        SarResample::Area => CONTINUOUS_RULE.to_string(),
        SarResample::Bilinear => format!("{BILINEAR_SAR_RULE}. Other channels: {CONTINUOUS_RULE}"),
    };
    attrs
}

/// Blosc block size: whole 1 MiB blocks. Blosc's automatic choice for level 1 is small, and each
/// block pays zstd's context set-up (measured: `docs/benchmarks.md`).
const BLOSC_BLOCK_BYTES: usize = 1 << 20;

fn codec_of(codec: Codec, type_size: usize) -> Result<Arc<dyn BytesToBytesCodecTraits>, String> {
    Ok(match codec {
        Codec::Zstd { level } => Arc::new(ZstdCodec::new(level, false)),
        Codec::BloscZstd { level } => Arc::new(
            BloscCodec::new(
                BloscCompressor::Zstd,
                BloscCompressionLevel::try_from(level)
                    .map_err(|l| format!("blosc level {l} > 9"))?,
                Some(BLOSC_BLOCK_BYTES),
                if type_size > 1 {
                    BloscShuffleMode::Shuffle
                } else {
                    BloscShuffleMode::NoShuffle
                },
                Some(type_size),
            )
            .map_err(|e| e.to_string())?,
        ),
    })
}

/// How icefm stores a level array's chunk-rows: every shard file is written, an all-fill one too
/// (zarrs would otherwise delete it), so that a missing shard file reads as damage
/// ([`ALL_SHARDS_ATTR`]) rather than as a row of fill values.
pub fn write_options() -> CodecOptions {
    CodecOptions::default().with_store_empty_chunks(true)
}

impl Store {
    /// Open an existing icefm store, or create one with `attrs`. An existing store must have the
    /// same levels, patch size and format version.
    pub fn open_or_create(path: &Path, attrs: StoreAttrs) -> Result<Self, StoreError> {
        let root_meta = path.join("zarr.json");
        if root_meta.exists() {
            let existing = Self::open(path)?;
            if existing.attrs.levels != attrs.levels || existing.attrs.patch != attrs.patch {
                return Err(StoreError::Incompatible {
                    path: path.to_path_buf(),
                    reason: format!(
                        "the store has levels {:?} and patch {}, this run asks for {:?} and {}; use another store",
                        existing
                            .attrs
                            .levels
                            .iter()
                            .map(|l| l.name())
                            .collect::<Vec<_>>(),
                        existing.attrs.patch,
                        attrs.levels.iter().map(|l| l.name()).collect::<Vec<_>>(),
                        attrs.patch
                    ),
                });
            }
            if existing.attrs.sar_resample != attrs.sar_resample {
                return Err(StoreError::Incompatible {
                    path: path.to_path_buf(),
                    reason: format!(
                        "the store's levels resample HH and HV by {}, this run asks for {}; \
                         one store holds one kind of levels: use another store",
                        existing.attrs.sar_resample.name(),
                        attrs.sar_resample.name()
                    ),
                });
            }
            return Ok(existing);
        }
        if path.exists()
            && std::fs::read_dir(path)
                .map_err(|e| StoreError::io(path, e))?
                .next()
                .is_some()
        {
            // Another process may have renamed its new store into place since the first look.
            if root_meta.exists() {
                return Self::open_or_create(path, attrs);
            }
            return Err(StoreError::Incompatible {
                path: path.to_path_buf(),
                reason: "exists, is not empty and is not a Zarr store".into(),
            });
        }
        // The root is made beside the store and renamed into place: several processes (the
        // shards of one ingest) may create the store at once, and none may see it half made.
        // A store path that is a link (say to an empty folder on a bigger disk) is made where the
        // link points: a folder cannot be renamed onto the link itself.
        let place = if path.is_symlink() {
            std::fs::canonicalize(path).map_err(|e| StoreError::io(path, e))?
        } else {
            path.to_path_buf()
        };
        let tmp = crate::manifest::temporary_path(&place);
        if let Some(parent) = tmp.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        }
        Self::write_root(&tmp, &attrs)?;
        match std::fs::rename(&tmp, &place) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                // Another process made it first: it must be the store this run asks for.
                if root_meta.exists() {
                    return Self::open_or_create(path, attrs);
                }
                return Err(StoreError::io(path, e));
            }
        }
        Self::open(path)
    }

    fn write_root(path: &Path, attrs: &StoreAttrs) -> Result<(), StoreError> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::io(path, e))?;
        let fs = Arc::new(FilesystemStore::new(path).map_err(|e| StoreError::zarr(path, e))?);
        let mut root_attrs = Map::new();
        root_attrs.insert(
            "icefm".into(),
            serde_json::to_value(attrs).map_err(|e| StoreError::zarr(path, e))?,
        );
        let group: Group<FilesystemStore> = GroupBuilder::new()
            .attributes(root_attrs)
            .build(fs.clone(), "/")
            .map_err(|e| StoreError::zarr(path, e))?;
        group
            .store_metadata()
            .map_err(|e| StoreError::zarr(path, e))?;
        let scenes = GroupBuilder::new()
            .build(fs, &format!("/{SCENES_GROUP}"))
            .map_err(|e| StoreError::zarr(path, e))?;
        scenes
            .store_metadata()
            .map_err(|e| StoreError::zarr(path, e))
    }

    /// Open an existing store (read its root attributes).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let attrs = StoreAttrs::read(path).map_err(|e| StoreError::Incompatible {
            path: path.to_path_buf(),
            reason: e.0,
        })?;
        let fs = Arc::new(FilesystemStore::new(path).map_err(|e| StoreError::zarr(path, e))?);
        Ok(Self {
            path: path.to_path_buf(),
            fs,
            attrs,
        })
    }

    /// Folder of a scene.
    pub fn scene_dir(&self, scene_id: &str) -> PathBuf {
        self.path.join(SCENES_GROUP).join(scene_id)
    }

    /// Write a group's metadata with attributes.
    pub fn write_group(&self, node: &str, attrs: Map<String, Value>) -> Result<(), StoreError> {
        let g = GroupBuilder::new()
            .attributes(attrs)
            .build(self.fs.clone(), node)
            .map_err(|e| StoreError::zarr(self.path.join(node.trim_start_matches('/')), e))?;
        g.store_metadata()
            .map_err(|e| StoreError::zarr(&self.path, e))
    }

    /// Create a level array `[C, H, W]` (f32 or u8), chunk `[C, P, P]`, shard `[C, P, padded W]`.
    /// `channel_dim` names the first dimension (distinct per array, so xarray can open a level
    /// group as one dataset).
    #[allow(clippy::too_many_arguments)]
    pub fn create_level_array(
        &self,
        node: &str,
        channel_dim: &str,
        channels: &[&str],
        height: usize,
        width: usize,
        float: bool,
        attrs: Map<String, Value>,
    ) -> Result<Array<FilesystemStore>, StoreError> {
        let p = u64::from(self.attrs.patch);
        let c = channels.len() as u64;
        let padded = (width as u64).div_ceil(p).max(1) * p;
        let shape = vec![c, height as u64, width as u64];
        let mut attrs = attrs;
        attrs.insert("channels".into(), json!(channels));
        attrs.insert(ALL_SHARDS_ATTR.into(), json!(true));
        let codec = codec_of(self.attrs.codec, if float { 4 } else { 1 })
            .map_err(|e| StoreError::zarr(&self.path, e))?;
        let mut builder = if float {
            ArrayBuilder::new(shape, vec![c, p, padded], data_type::float32(), f32::NAN)
        } else {
            ArrayBuilder::new(shape, vec![c, p, padded], data_type::uint8(), IGNORE)
        };
        // Patches in C order inside each shard, so a store's bytes do not depend on thread timing
        // (an interrupted and resumed ingest must write the same bytes as an uninterrupted one).
        let ordered = CodecSpecificOptions::default().with_option(
            ShardingCodecOptions::default().with_subchunk_write_order(SubchunkWriteOrder::C),
        );
        let array = builder
            .subchunk_shape(vec![c, p, p])
            .codec_specific_options(ordered)
            // Each chunk's compressed bytes end in their CRC-32C, checked on every read (the shard
            // index has its own).
            .bytes_to_bytes_codecs(vec![codec, Arc::new(Crc32cCodec::new())])
            .dimension_names(Some([channel_dim, "y", "x"]))
            .attributes(attrs)
            .build(self.fs.clone(), node)
            .map_err(|e| StoreError::zarr(self.path.join(node.trim_start_matches('/')), e))?;
        array
            .store_metadata()
            .map_err(|e| StoreError::zarr(&self.path, e))?;
        Ok(array)
    }

    /// Write a coordinate array: the names along one dimension (`task` = SIC, SOD, FLOE), as a
    /// 1-D `string` array (`vlen-utf8`, checksummed) whose one dimension is its own name, so
    /// xarray takes it as that dimension's index (`ds.labels.sel(task="SOD")`).
    pub fn write_names(&self, node: &str, names: &[&str]) -> Result<(), StoreError> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_string()).collect();
        let dim = node.rsplit('/').next().unwrap_or(node);
        let n = names.len();
        self.write_one_chunk(
            node,
            &[n],
            &[dim],
            names,
            data_type::string(),
            "",
            Map::new(),
        )
    }

    /// Write a coordinate array of positions (`y`, `x` of a level: metres along the grid), as
    /// a 1-D float64 array (checksummed) whose one dimension is its own name, with `attrs`
    /// (units, what it measures).
    pub fn write_positions(
        &self,
        node: &str,
        values: Vec<f64>,
        attrs: Map<String, Value>,
    ) -> Result<(), StoreError> {
        let dim = node.rsplit('/').next().unwrap_or(node);
        let n = values.len();
        self.write_one_chunk(
            node,
            &[n],
            &[dim],
            values,
            data_type::float64(),
            f64::NAN,
            attrs,
        )
    }

    /// Write a 2-D float64 array of `shape` over the dimensions `dims` in one checksummed chunk
    /// (the 2 km grid's latitude and longitude), with `attrs`.
    pub fn write_grid_f64(
        &self,
        node: &str,
        shape: [usize; 2],
        dims: [&str; 2],
        values: Vec<f64>,
        attrs: Map<String, Value>,
    ) -> Result<(), StoreError> {
        self.write_one_chunk(
            node,
            &shape,
            &dims,
            values,
            data_type::float64(),
            f64::NAN,
            attrs,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write_one_chunk<T: zarrs::array::Element>(
        &self,
        node: &str,
        shape: &[usize],
        dims: &[&str],
        values: Vec<T>,
        data_type: zarrs::array::DataType,
        fill: impl Into<zarrs::array::builder::ArrayBuilderFillValue>,
        attrs: Map<String, Value>,
    ) -> Result<(), StoreError> {
        let at = self.path.join(node.trim_start_matches('/'));
        let err = |e: &dyn std::fmt::Display| StoreError::zarr(&at, e);
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(err(&format!(
                "{} values for an array of shape {shape:?}",
                values.len()
            )));
        }
        let mut attrs = attrs;
        attrs.insert(ALL_SHARDS_ATTR.into(), json!(n > 0));
        let shape: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
        let chunk: Vec<u64> = shape.iter().map(|&s| s.max(1)).collect();
        let array = ArrayBuilder::new(shape, chunk, data_type, fill)
            .bytes_to_bytes_codecs(vec![Arc::new(Crc32cCodec::new())])
            .dimension_names(Some(dims.to_vec()))
            .attributes(attrs)
            .build(self.fs.clone(), node)
            .map_err(|e| err(&e))?;
        array.store_metadata().map_err(|e| err(&e))?;
        if n > 0 {
            let origin = vec![0; dims.len()];
            array
                .store_chunk_opt(&origin, values, &write_options())
                .map_err(|e| err(&e))?;
        }
        Ok(())
    }

    /// Write a small array in one chunk (the 2 km grids).
    pub fn write_small_array(
        &self,
        node: &str,
        shape: [usize; 3],
        data: &[f32],
        attrs: Map<String, Value>,
    ) -> Result<(), StoreError> {
        let shape: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
        let chunk: Vec<u64> = shape.iter().map(|&s| s.max(1)).collect();
        let codec = codec_of(self.attrs.codec, 4).map_err(|e| StoreError::zarr(&self.path, e))?;
        // Like the level arrays: the chunk checksummed, and written whenever there is data.
        let mut attrs = attrs;
        attrs.insert(ALL_SHARDS_ATTR.into(), json!(!data.is_empty()));
        let array = ArrayBuilder::new(shape, chunk, data_type::float32(), f32::NAN)
            .bytes_to_bytes_codecs(vec![codec, Arc::new(Crc32cCodec::new())])
            // Not `y`, `x`: the level groups below the scene use those at their own sizes, and
            // xarray's DataTree refuses a child whose dimensions clash with its parent's.
            .dimension_names(Some(["variable", "y_2km", "x_2km"]))
            .attributes(attrs)
            .build(self.fs.clone(), node)
            .map_err(|e| StoreError::zarr(&self.path, e))?;
        array
            .store_metadata()
            .map_err(|e| StoreError::zarr(&self.path, e))?;
        if !data.is_empty() {
            array
                .store_chunk_opt(&[0, 0, 0], data, &write_options())
                .map_err(|e| StoreError::zarr(self.path.join(node.trim_start_matches('/')), e))?;
        }
        Ok(())
    }
}

/// Read a region `[c0..c1, y0..y1, x0..x1]` of a float level array (tests, inspect).
pub fn read_f32(
    store: &Path,
    node: &str,
    ranges: [std::ops::Range<u64>; 3],
) -> Result<Vec<f32>, StoreError> {
    let fs = Arc::new(FilesystemStore::new(store).map_err(|e| StoreError::zarr(store, e))?);
    let a = Array::open(fs, node)
        .map_err(|e| StoreError::zarr(store.join(node.trim_start_matches('/')), e))?;
    a.retrieve_array_subset::<Vec<f32>>(&ArraySubset::new_with_ranges(&ranges))
        .map_err(|e| StoreError::zarr(store.join(node.trim_start_matches('/')), e))
}

/// Read a region of a u8 level array.
pub fn read_u8(
    store: &Path,
    node: &str,
    ranges: [std::ops::Range<u64>; 3],
) -> Result<Vec<u8>, StoreError> {
    let fs = Arc::new(FilesystemStore::new(store).map_err(|e| StoreError::zarr(store, e))?);
    let a = Array::open(fs, node)
        .map_err(|e| StoreError::zarr(store.join(node.trim_start_matches('/')), e))?;
    a.retrieve_array_subset::<Vec<u8>>(&ArraySubset::new_with_ranges(&ranges))
        .map_err(|e| StoreError::zarr(store.join(node.trim_start_matches('/')), e))
}

/// Shape `[C, H, W]` of an array.
pub fn array_shape(store: &Path, node: &str) -> Result<Vec<u64>, StoreError> {
    let fs = Arc::new(FilesystemStore::new(store).map_err(|e| StoreError::zarr(store, e))?);
    let a = Array::open(fs, node)
        .map_err(|e| StoreError::zarr(store.join(node.trim_start_matches('/')), e))?;
    Ok(a.shape().to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn processes_creating_one_store_at_once_all_open_it_or_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.zarr");
        let attrs = |patch| {
            new_attrs(
                &Level::defaults(),
                patch,
                icefm_schemas::store::DEFAULT_CODEC,
            )
        };
        let results: Vec<Result<Store, StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let path = path.clone();
                    s.spawn(move || {
                        Store::open_or_create(&path, attrs(if i == 15 { 256 } else { 384 }))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let patch = Store::open(&path).unwrap().attrs.patch;
        for (i, r) in results.iter().enumerate() {
            let asked = if i == 15 { 256 } else { 384 };
            match r {
                Ok(store) => assert_eq!((store.attrs.patch, asked), (patch, patch)),
                Err(e) => {
                    assert_ne!(asked, patch);
                    assert!(e.to_string().contains("use another store"), "{e}");
                }
            }
        }
        // One store, its scenes group, nothing left beside it.
        assert!(path.join("scenes/zarr.json").exists());
        let beside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(beside.len(), 1);
        // A folder with other things in it is never taken for a store.
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "x").unwrap();
        let e = Store::open_or_create(&other, attrs(384)).err().unwrap();
        assert!(e.to_string().contains("is not a Zarr store"), "{e}");
        // An empty folder becomes the store.
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        Store::open_or_create(&empty, attrs(384)).unwrap();
        assert!(empty.join("zarr.json").exists());
    }
}
