//! Weight files written as the researcher's other files are.

use std::collections::HashMap;
use std::fmt::Display;
use std::path::Path;

use candle_core::{Device, Tensor};

/// Save `tensors` as a safetensors file at `path`, with the permissions the process's umask
/// gives a new file. The safetensors crate writes through a temporary file that it renames into
/// place, and temporary files are private (0600): checkpoints, imports and exports would be
/// unreadable to the rest of a group that shares its runs.
pub(crate) fn save_safetensors<K: AsRef<str> + Ord + Display>(
    tensors: &HashMap<K, Tensor>,
    path: impl AsRef<Path>,
) -> candle_core::Result<()> {
    save_safetensors_with(tensors, path.as_ref(), None)
}

/// Open (or make) the lock file at `path` for `File::lock`, keeping what it holds (a holder's
/// note).
pub fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Key of a weight file's header metadata naming the input channels its encoder reads
/// (a JSON array of names), as `icefm import` records them.
pub const CHANNELS_KEY: &str = "icefm.channels";

/// [`save_safetensors`] with `metadata` in the file's header (`None`: none, as candle's own
/// `save` writes, byte for byte).
pub(crate) fn save_safetensors_with<K: AsRef<str> + Ord + Display>(
    tensors: &HashMap<K, Tensor>,
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) -> candle_core::Result<()> {
    // candle's error says why ("No space left on device") but not which file.
    let named =
        |e: &dyn Display| candle_core::Error::msg(format!("writing {}: {e}", path.display()));
    safetensors::serialize_to_file(tensors, metadata, path).map_err(|e| named(&e))?;
    set_new_file_mode(path).map_err(|e| named(&e))?;
    Ok(())
}

/// The header metadata of the safetensors file at `path` (empty when it has none).
pub fn safetensors_metadata(path: &Path) -> std::io::Result<HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(std::io::Error::other("not a safetensors header"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(std::io::Error::other)?;
    Ok(json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Key of a weight file's header metadata giving its encoder's attention heads, which the
/// tensors' shapes do not tell, as `icefm export` records them.
pub const HEADS_KEY: &str = "icefm.heads";
/// Key of a weight file's header metadata giving its MAE decoder's attention heads.
pub const DECODER_HEADS_KEY: &str = "icefm.decoder_heads";

/// What a weight file's header records of the model beyond its tensors: the input channels
/// (`icefm import --channels`, `icefm export`) and the attention heads (`icefm export`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Input channels of the encoder, in order ([`CHANNELS_KEY`]).
    pub channels: Option<Vec<String>>,
    /// Encoder attention heads ([`HEADS_KEY`]).
    pub heads: Option<usize>,
    /// MAE decoder attention heads ([`DECODER_HEADS_KEY`]).
    pub decoder_heads: Option<usize>,
}

impl Recorded {
    /// What the safetensors file at `path` records; nothing for a file without a header's
    /// metadata, or one that cannot be read (its reader then says why).
    pub fn read(path: &Path) -> Self {
        Self::read_checked(path).0
    }

    /// [`Recorded::read`], with a note for each entry of icefm's that does not parse (it is
    /// left out).
    pub fn read_checked(path: &Path) -> (Self, Vec<String>) {
        let Ok(meta) = safetensors_metadata(path) else {
            return Default::default();
        };
        let mut notes = Vec::new();
        let mut ignored = |key: &str, value: &str, what: &str| {
            notes.push(format!(
                "the file's header has {key} = {value:?}, not {what}: ignored"
            ));
        };
        let mut count = |key: &str| {
            let v = meta.get(key)?;
            match v.parse::<usize>() {
                Ok(h) if h > 0 => Some(h),
                _ => {
                    ignored(key, v, "a count of heads");
                    None
                }
            }
        };
        let heads = count(HEADS_KEY);
        let decoder_heads = count(DECODER_HEADS_KEY);
        let channels = meta.get(CHANNELS_KEY).and_then(|t| {
            serde_json::from_str(t)
                .inspect_err(|_| ignored(CHANNELS_KEY, t, "a JSON array of channel names"))
                .ok()
        });
        (
            Self {
                channels,
                heads,
                decoder_heads,
            },
            notes,
        )
    }

    /// The header metadata recording these (`None` when there is nothing to record, so the file
    /// is what candle's own `save` writes).
    pub fn metadata(&self) -> Option<HashMap<String, String>> {
        let mut meta = HashMap::new();
        if let Some(c) = &self.channels {
            meta.insert(
                CHANNELS_KEY.to_string(),
                serde_json::to_string(c).unwrap_or_default(),
            );
        }
        if let Some(h) = self.heads {
            meta.insert(HEADS_KEY.to_string(), h.to_string());
        }
        if let Some(h) = self.decoder_heads {
            meta.insert(DECODER_HEADS_KEY.to_string(), h.to_string());
        }
        (!meta.is_empty()).then_some(meta)
    }
}

/// The input channels a weight file records ([`CHANNELS_KEY`]), if it records them.
pub fn recorded_channels(path: &Path) -> Option<Vec<String>> {
    Recorded::read(path).channels
}

/// Key of a checkpoint's `state.json` that maps each of its weight files to its BLAKE3 (hex).
/// Whether `a` and `b` are one existing file or folder (a link or another spelling of its path
/// included): the same device and inode.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

pub(crate) const HASHES_KEY: &str = "blake3";

/// BLAKE3 (hex) of the file at `path`.
pub fn file_blake3(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// [`save_safetensors`] into a checkpoint folder, recording the file's BLAKE3 in `hashes`
/// (written into the folder's `state.json`, [`load_checked`] checks it).
pub(crate) fn save_hashed<K: AsRef<str> + Ord + Display>(
    tensors: &HashMap<K, Tensor>,
    dir: &Path,
    name: &str,
    hashes: &mut std::collections::BTreeMap<String, String>,
) -> candle_core::Result<()> {
    let path = dir.join(name);
    save_safetensors(tensors, &path)?;
    hashes.insert(name.to_string(), file_blake3(&path)?);
    Ok(())
}

/// Load a safetensors file; when the `state.json` beside it (a checkpoint's) records the file's
/// BLAKE3, the file is checked against it first, so that changed or damaged weights are an error
/// instead of a model that scores or trains on them. Files without a record (checkpoints written
/// before icefm recorded them, imports, other files) load unchecked.
pub(crate) fn load_checked(
    path: &Path,
    dev: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    check_recorded_hash(path)?;
    candle_core::safetensors::load(path, dev)
}

/// Err when the `state.json` beside the weights file `path` records a BLAKE3 for it that the
/// file no longer has, or cannot be read although it is there (a damaged `state.json` must not
/// switch the check off). Files without a `state.json`, or whose `state.json` predates the
/// hashes (no `blake3` key), pass unchecked.
pub(crate) fn check_recorded_hash(path: &Path) -> candle_core::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let state = dir.join("state.json");
    let text = match std::fs::read_to_string(&state) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let unreadable = |why: &str| {
        candle_core::Error::msg(format!(
            "{} {why}, so the weights cannot be checked against it",
            state.display()
        ))
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| unreadable(&format!("is not JSON ({e})")))?;
    let Some(hashes) = json.get(HASHES_KEY) else {
        return Ok(());
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let want = hashes
        .get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| unreadable(&format!("records no {HASHES_KEY} hash of {name}")))?;
    let found = file_blake3(path)?;
    if found != want {
        return Err(candle_core::Error::msg(format!(
            "the file is not the one this checkpoint wrote (BLAKE3 {found}, its state.json \
             records {want}): it was changed or damaged"
        )));
    }
    Ok(())
}

#[cfg(unix)]
fn set_new_file_mode(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask()))
}

#[cfg(not(unix))]
fn set_new_file_mode(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// The process's file-mode creation mask, as Linux reports it (`Umask:` of /proc/self/status,
/// since 4.7); 022, the usual one, where it cannot be read. (umask(2) itself only reads the mask
/// by setting it, which races with other threads creating files.)
#[cfg(unix)]
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
        })
        .unwrap_or(0o022)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// What a header records reads back; an entry that does not parse is left out with a note.
    #[test]
    fn a_header_records_channels_and_heads_and_malformed_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let tensors = HashMap::from([("w", t)]);
        let path = dir.path().join("r.safetensors");
        let record = Recorded {
            channels: Some(vec!["HH".into(), "HV".into()]),
            heads: Some(5),
            decoder_heads: None,
        };
        save_safetensors_with(&tensors, &path, record.metadata()).unwrap();
        assert_eq!(Recorded::read_checked(&path), (record, Vec::new()));
        let bad = HashMap::from([
            (HEADS_KEY.to_string(), "two".to_string()),
            (DECODER_HEADS_KEY.to_string(), "0".to_string()),
            (CHANNELS_KEY.to_string(), "HH,HV".to_string()),
        ]);
        save_safetensors_with(&tensors, &path, Some(bad)).unwrap();
        let (read, notes) = Recorded::read_checked(&path);
        assert_eq!(read, Recorded::default());
        assert_eq!(
            notes,
            [
                "the file's header has icefm.heads = \"two\", not a count of heads: ignored",
                "the file's header has icefm.decoder_heads = \"0\", not a count of heads: ignored",
                "the file's header has icefm.channels = \"HH,HV\", not a JSON array of channel \
                 names: ignored",
            ]
        );
        // No metadata at all: nothing recorded, nothing to say.
        save_safetensors_with(&tensors, &path, None).unwrap();
        assert_eq!(Recorded::read_checked(&path), Default::default());
    }

    #[test]
    fn weights_are_checked_against_the_hash_their_state_json_records() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let mut hashes = std::collections::BTreeMap::new();
        save_hashed(
            &HashMap::from([("w", t)]),
            dir.path(),
            "model.safetensors",
            &mut hashes,
        )
        .unwrap();
        let path = dir.path().join("model.safetensors");
        let state = dir.path().join("state.json");
        let check = |text: &str| {
            std::fs::write(&state, text).unwrap();
            check_recorded_hash(&path).map_err(|e| e.to_string())
        };
        let good = serde_json::json!({ "step": 1, HASHES_KEY: hashes }).to_string();
        assert_eq!(check(&good), Ok(()));
        // Written before the hashes, or no state.json at all: unchecked.
        assert_eq!(check(r#"{"step": 1}"#), Ok(()));
        std::fs::remove_file(&state).unwrap();
        assert!(check_recorded_hash(&path).is_ok());
        // A state.json that cannot say does not switch the check off.
        let e = check("not json").unwrap_err();
        assert!(
            e.contains("is not JSON") && e.contains("cannot be checked"),
            "{e}"
        );
        let e = check(r#"{"blake3": {}}"#).unwrap_err();
        assert!(
            e.contains("records no blake3 hash of model.safetensors"),
            "{e}"
        );
        // One changed byte of a tensor.
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = check(&good).unwrap_err();
        assert!(e.contains("not the one this checkpoint wrote"), "{e}");
        assert!(load_checked(&path, &Device::Cpu).is_err());
    }

    #[test]
    fn saved_weights_get_a_new_files_permissions_not_a_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        // What the umask gives any new file: the reference.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let want = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        assert_eq!(want, 0o666 & !umask());
        let path = dir.path().join("w.safetensors");
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        save_safetensors(&HashMap::from([("w", t)]), &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{mode:o} vs {want:o}");
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back["w"].to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
    }
}
