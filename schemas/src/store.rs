//! The store layout (format version 1): levels, array names, root attributes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Store format version written to `zarr.json` (`attributes.icefm.format_version`).
pub const FORMAT_VERSION: u32 = 1;
/// Level-array attribute (`true`) of arrays whose every shard (chunk-row) file was written,
/// all-fill rows included, and whose chunks end in a `crc32c` codec: a missing shard file there is
/// damage, not "all fill". Arrays written before icefm 0.1 wrote it lack it; readers keep
/// reading a missing shard of those as fill.
pub const ALL_SHARDS_ATTR: &str = "all_shards_written";
/// Default patch (= chunk) edge in pixels.
pub const DEFAULT_PATCH: u32 = 384;
/// SAR-IceFM's levels: 2 … 10 × 40 m.
pub const DEFAULT_LEVELS_M: [u32; 9] = [80, 120, 160, 200, 240, 280, 320, 360, 400];
/// SAR channels of the `sar` arrays.
pub const SAR_CHANNELS: [&str; 2] = ["HH", "HV"];
/// Channels of the `aux` arrays.
pub const AUX_CHANNELS: [&str; 2] = ["incidence_angle", "distance_map"];
/// Channels of the `labels` arrays.
pub const LABEL_CHANNELS: [&str; 3] = ["SIC", "SOD", "FLOE"];
/// Group holding the scenes.
pub const SCENES_GROUP: &str = "scenes";
/// Folder of the Parquet manifests inside the store.
pub const MANIFESTS_DIR: &str = "manifests";
/// Folder of the per-scene manifest parts (the commit records of complete scenes).
pub const PARTS_DIR: &str = "manifests/parts";
/// Folder of the shard records of a sharded ingest (`<K>-of-<N>.json`).
pub const SHARDS_DIR: &str = "manifests/shards";
/// Folder of the claims on scene ids held by running ingests (`<scene_id>.claim`).
pub const CLAIMS_DIR: &str = "manifests/claims";
/// Name of the 2 km grid array inside a scene group.
pub const GRID2KM_ARRAY: &str = "grid2km";

/// The rule used to make label pyramids (stored in the root attributes).
pub const LABEL_RULE: &str = "area-weighted majority of the valid (non-255) native pixels of each \
cell, per task; 255 where valid pixels cover less than half of the cell's area; ties go to the \
lower class; native pixels with invalid HH are 255 before resampling";
/// The rule used to make SAR and continuous pyramids.
pub const CONTINUOUS_RULE: &str = "exact area-weighted mean of the valid native pixels overlapping \
each cell (non-integer ratios weight partly covered pixels by their overlap); NaN where no valid \
pixel overlaps; cells past the scene edge cover only its remaining pixels";
/// The rule of HH and HV in a store made with [`SarResample::Bilinear`] (the other continuous
/// channels keep [`CONTINUOUS_RULE`]).
pub const BILINEAR_SAR_RULE: &str = "HH and HV: bilinear interpolation of the native grid as PyTorch's interpolate(mode=bilinear, align_corners=False, antialias=False, scale_factor=1/ratio) samples it (source index max((k + 0.5) ratio - 0.5, 0), its two neighbours clamped to the scene), as SAR-IceFM made its levels; NaN where a neighbour with a weight is invalid";

/// How a store's levels resample HH and HV from the native grid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SarResample {
    /// The exact area mean of each cell ([`CONTINUOUS_RULE`]): icefm's default.
    #[default]
    Area,
    /// Bilinear interpolation without antialiasing ([`BILINEAR_SAR_RULE`]): what SAR-IceFM's
    /// encoders were pre-trained on.
    Bilinear,
}

impl SarResample {
    /// `area` or `bilinear`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Area => "area",
            Self::Bilinear => "bilinear",
        }
    }

    /// Whether this is the default (stores made with it do not record it).
    pub fn is_area(&self) -> bool {
        *self == Self::Area
    }
}

impl FromStr for SarResample {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "area" => Ok(Self::Area),
            "bilinear" => Ok(Self::Bilinear),
            other => Err(format!("SAR resampling `{other}`: give area or bilinear")),
        }
    }
}

/// A pyramid level, named by its ground spacing in metres (`80m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Level(u32);

/// An invalid level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid level {0:?}: expected a ground spacing in metres such as 80 or 80m")]
pub struct LevelError(pub String);

impl Level {
    /// A level of `spacing_m` metres; errors on zero.
    pub fn new(spacing_m: u32) -> Result<Self, LevelError> {
        if spacing_m == 0 {
            Err(LevelError(spacing_m.to_string()))
        } else {
            Ok(Self(spacing_m))
        }
    }
    /// Ground spacing in metres.
    pub fn spacing_m(self) -> u32 {
        self.0
    }
    /// Group name (`80m`).
    pub fn name(self) -> String {
        format!("{}m", self.0)
    }
    /// Parse a comma-separated list (`80,200,400` or `80m,200m`), sorted and de-duplicated.
    pub fn parse_list(s: &str) -> Result<Vec<Level>, LevelError> {
        let mut v = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Level>, _>>()?;
        v.sort();
        v.dedup();
        if v.is_empty() {
            return Err(LevelError(s.to_string()));
        }
        Ok(v)
    }
    /// SAR-IceFM's default levels.
    pub fn defaults() -> Vec<Level> {
        DEFAULT_LEVELS_M.iter().map(|&m| Level(m)).collect()
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0)
    }
}

impl FromStr for Level {
    type Err = LevelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let num = t.strip_suffix('m').unwrap_or(t);
        num.parse::<u32>()
            .ok()
            .and_then(|m| Level::new(m).ok())
            .ok_or_else(|| LevelError(s.to_string()))
    }
}

impl TryFrom<String> for Level {
    type Error = LevelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Level> for String {
    fn from(l: Level) -> String {
        l.name()
    }
}

/// Compression codec of the store arrays (inside each shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum Codec {
    /// zstd at a level.
    Zstd {
        /// Compression level.
        level: i32,
    },
    /// Blosc (zstd inside) with byte shuffle.
    BloscZstd {
        /// Compression level.
        level: u8,
    },
}

/// The default codec: byte-shuffled zstd (level 1) inside blosc. On synthetic SAR it was as fast
/// as plain zstd and 14 % smaller with 1 MiB blocks (`docs/benchmarks.md`); SAR speckle leaves
/// little to compress.
pub const DEFAULT_CODEC: Codec = Codec::BloscZstd { level: 1 };

/// icefm's root attributes, stored under `attributes.icefm` of the root `zarr.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreAttrs {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Pyramid levels of every scene.
    pub levels: Vec<Level>,
    /// Patch = chunk edge.
    pub patch: u32,
    /// Channel names of `sar`.
    pub sar_channels: Vec<String>,
    /// Channel names of `aux`.
    pub aux_channels: Vec<String>,
    /// Channel names of `labels`.
    pub label_channels: Vec<String>,
    /// Class names per task.
    pub classes: serde_json::Value,
    /// Normalisation constants (raw units) for every input variable.
    pub normalisation: serde_json::Value,
    /// [`LABEL_RULE`].
    pub label_rule: String,
    /// [`CONTINUOUS_RULE`].
    pub continuous_rule: String,
    /// Codec of the arrays.
    pub codec: Codec,
    /// How HH and HV were resampled to the levels; absent (area means) in stores made without
    /// `ingest --sar-resample bilinear`, which then read as before.
    #[serde(default, skip_serializing_if = "SarResample::is_area")]
    pub sar_resample: SarResample,
    /// icefm version that created the store.
    pub tool_version: String,
}

/// Why a folder is not a readable icefm store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreAttrsError(pub String);

impl StoreAttrs {
    /// Read the root attributes of the store at `path` (`zarr.json`, `attributes.icefm`) and check
    /// the format version.
    pub fn read(path: &std::path::Path) -> Result<Self, StoreAttrsError> {
        let meta = path.join("zarr.json");
        let text = std::fs::read_to_string(&meta).map_err(|e| {
            StoreAttrsError(format!("not an icefm store (cannot read zarr.json: {e})"))
        })?;
        Self::from_zarr_json(&text)
    }

    /// The root attributes from the text of a store's root `zarr.json`, the format version
    /// checked.
    pub fn from_zarr_json(text: &str) -> Result<Self, StoreAttrsError> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| StoreAttrsError(format!("zarr.json is not JSON: {e}")))?;
        let icefm = v.pointer("/attributes/icefm").cloned().ok_or_else(|| {
            StoreAttrsError("zarr.json has no attributes.icefm: not an icefm store".into())
        })?;
        let attrs: StoreAttrs = serde_json::from_value(icefm)
            .map_err(|e| StoreAttrsError(format!("unreadable icefm attributes: {e}")))?;
        if attrs.format_version != FORMAT_VERSION {
            return Err(StoreAttrsError(format!(
                "store format version {} (this icefm reads {FORMAT_VERSION})",
                attrs.format_version
            )));
        }
        Ok(attrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_name() {
        let l = Level::parse_list("200, 80m,400,80").unwrap();
        assert_eq!(
            l.iter().map(|l| l.spacing_m()).collect::<Vec<_>>(),
            vec![80, 200, 400]
        );
        assert_eq!(l[0].name(), "80m");
        assert!(Level::parse_list("80,x").is_err());
        assert!(Level::parse_list("0").is_err());
        assert!(Level::parse_list("").is_err());
        assert_eq!(Level::defaults().len(), 9);
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(j, r#"["80m","200m","400m"]"#);
        assert_eq!(serde_json::from_str::<Vec<Level>>(&j).unwrap(), l);
    }
}
