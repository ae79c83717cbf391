//! Where a store lives: a local folder, or an object in object storage named by a URL.
//!
//! A store is a `Path` everywhere in icefm. One that starts with `scheme://` names a store in
//! object storage (feature `object-store`): `s3://bucket/prefix/ai4a.zarr`, `gs://…`, `az://…`,
//! `https://host/…` or `file:///abs/ai4a.zarr`. Joining names onto such a path
//! (`store.join("manifests")`) gives the URL of the object below it, so the code that builds paths
//! under a store is the same for both; it reads and writes through [`read`], [`exists`],
//! [`list`], [`write()`] and [`zarr_storage`] instead of `std::fs`.
//!
//! Credentials and endpoints come from the environment, as the object_store crate names them:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` (S3-compatible
//! services), `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, …, and
//! for S3 from the AWS CLI's profile in `~/.aws` (`AWS_PROFILE`). A bucket that has answered
//! once is waited for through an outage, up to `ICEFM_STORE_RETRY` seconds (see
//! `docs/object-store.md`).
//!
//! ```
//! use std::path::Path;
//! use icefm_dataset::location;
//!
//! assert!(location::is_url(Path::new("s3://ice/ai4a.zarr")));
//! assert!(!location::is_url(Path::new("/data/ai4a.zarr")));
//! let manifests = Path::new("s3://ice/ai4a.zarr").join("manifests");
//! assert_eq!(manifests.to_str(), Some("s3://ice/ai4a.zarr/manifests"));
//! ```

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use zarrs::storage::ReadableStorage;

/// Whether `path` is a URL (`scheme://…`) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    let Some(s) = path.to_str() else {
        return false;
    };
    let Some((scheme, _)) = s.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The local path a `file://` URL names; `None` for other URLs and for local paths. Writers
/// that take turns on a lock file (regime draws) take it there too, since such a store is a
/// local folder.
pub fn file_url_path(path: &Path) -> Option<std::path::PathBuf> {
    let text = path.to_str().filter(|t| t.starts_with("file://"))?;
    #[cfg(feature = "object-store")]
    {
        url::Url::parse(text).ok()?.to_file_path().ok()
    }
    #[cfg(not(feature = "object-store"))]
    {
        Some(std::path::PathBuf::from(&text["file://".len()..]))
    }
}

/// `path` as a record names it: a URL as it is, a local path made absolute (against the
/// current folder, without resolving links), so that it still names the same place when read
/// from elsewhere.
pub fn recorded(path: &Path) -> String {
    if is_url(path) {
        return path.display().to_string();
    }
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// The whole content of the file or object at `path`.
pub fn read(path: &Path) -> io::Result<Bytes> {
    if is_url(path) {
        remote::read(path)
    } else {
        std::fs::read(path).map(Bytes::from)
    }
}

/// Whether a folder at `path` can be listed: not over plain HTTP(S), whose servers list no
/// folder (their answer, an error or nothing, says nothing of what is there).
pub fn lists_folders(path: &Path) -> bool {
    let s = path.to_string_lossy();
    !(s.starts_with("http://") || s.starts_with("https://"))
}

/// Whether a file or object exists at `path`.
pub fn exists(path: &Path) -> io::Result<bool> {
    if is_url(path) {
        remote::exists(path)
    } else {
        Ok(path.exists())
    }
}

/// Names of the files (objects) directly in `dir`, sorted; empty when there is no such folder.
pub fn list(dir: &Path) -> io::Result<Vec<String>> {
    if is_url(dir) {
        return remote::list(dir);
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e?;
        if e.file_type()?.is_file()
            && let Some(n) = e.file_name().to_str()
        {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Write `bytes` to `path` whole: a local file through a temporary file of this process and a
/// rename, an object with one upload (object stores make an object visible only once it is
/// complete). Either way a reader never sees part of it, and a failed write leaves no
/// temporary file.
pub fn write(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    if is_url(path) {
        return remote::write(path, bytes);
    }
    let tmp = write_temporary(path, &bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// What a read saw of a file or object, so that a write replaces exactly that
/// ([`write_replacing`]): its bytes, and in object storage its ETag and version where the
/// service gives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// The content read (or written).
    pub bytes: Bytes,
    /// The object's ETag (object storage).
    pub e_tag: Option<String>,
    /// The object's version (object storage with versioning).
    pub version: Option<String>,
}

/// The content at `path` with what a later [`write_replacing`] needs to replace exactly it;
/// `None` where nothing is there.
pub fn read_seen(path: &Path) -> io::Result<Option<Seen>> {
    if is_url(path) {
        return remote::read_seen(path);
    }
    match std::fs::read(path) {
        Ok(b) => Ok(Some(Seen {
            bytes: Bytes::from(b),
            ..Seen::default()
        })),
        // A name the file system cannot hold has nothing there either (as [`exists`] says);
        // writing it fails with the reason.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidFilename
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// [`write()`], but only if `path` still holds what `seen` read: of two processes replacing
/// one object at once, the second to write gets an error saying another replaced it, and
/// writes nothing. In object storage the upload is conditional on the ETag (or version) read,
/// where the service supports that (S3, GCS and Azure do); elsewhere the object is read again
/// and compared first, which leaves a short window. A local file is written as [`write()`]
/// does: local writers take turns on a lock of their own (`regimes/.lock`). Returns what
/// was written, for a later replacement of it.
pub fn write_replacing(path: &Path, bytes: Vec<u8>, seen: &Seen) -> io::Result<Seen> {
    if is_url(path) {
        return remote::write_replacing(path, bytes, seen);
    }
    let written = Bytes::from(bytes);
    write(path, written.to_vec())?;
    Ok(Seen {
        bytes: written,
        ..Seen::default()
    })
}

/// [`write()`], but only if nothing is at `path`: of two processes creating the same file at
/// once, one succeeds and the other gets [`io::ErrorKind::AlreadyExists`] (a local file is
/// linked into place, which fails where one exists; an object is put with the service's
/// create-only condition, or, where it has none, after a check that leaves a short window).
pub fn write_new(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    if is_url(path) {
        return remote::write_new(path, bytes);
    }
    let tmp = write_temporary(path, &bytes)?;
    let linked = match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            // A file system without hard links: check, then rename.
            if path.exists() {
                Err(io::Error::from(io::ErrorKind::AlreadyExists))
            } else {
                std::fs::rename(&tmp, path)
            }
        }
        r => r,
    };
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => io::Error::new(
            io::ErrorKind::AlreadyExists,
            "made by another process meanwhile",
        ),
        _ => e,
    })
}

/// `bytes` in a temporary file beside `path`, named for this process, its folder made.
fn write_temporary(path: &Path, bytes: &[u8]) -> io::Result<std::path::PathBuf> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(tmp)
}

/// Remove the file or object at `path`; nothing there is not an error.
pub fn remove(path: &Path) -> io::Result<()> {
    if is_url(path) {
        return remote::remove(path);
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// The Zarr storage of the store at `root`, for reading.
pub fn zarr_storage(root: &Path) -> io::Result<ReadableStorage> {
    if is_url(root) {
        return remote::zarr_storage(root);
    }
    let fs = zarrs::filesystem::FilesystemStore::new(root).map_err(io::Error::other)?;
    Ok(Arc::new(fs))
}

#[cfg(feature = "object-store")]
mod remote;

#[cfg(not(feature = "object-store"))]
mod remote {
    //! Without the feature every URL is refused, naming it.
    use super::*;

    fn refused(path: &Path) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: this icefm was built without object-store support (build with the \
                 `object-store` feature, the default of the icefm binary)",
                path.display()
            ),
        )
    }

    pub(super) fn read(path: &Path) -> io::Result<Bytes> {
        Err(refused(path))
    }

    pub(super) fn exists(path: &Path) -> io::Result<bool> {
        Err(refused(path))
    }

    pub(super) fn list(path: &Path) -> io::Result<Vec<String>> {
        Err(refused(path))
    }

    pub(super) fn write(path: &Path, _: Vec<u8>) -> io::Result<()> {
        Err(refused(path))
    }

    pub(super) fn write_new(path: &Path, _: Vec<u8>) -> io::Result<()> {
        Err(refused(path))
    }

    pub(super) fn read_seen(path: &Path) -> io::Result<Option<Seen>> {
        Err(refused(path))
    }

    pub(super) fn write_replacing(path: &Path, _: Vec<u8>, _: &Seen) -> io::Result<Seen> {
        Err(refused(path))
    }

    pub(super) fn remove(path: &Path) -> io::Result<()> {
        Err(refused(path))
    }

    pub(super) fn zarr_storage(path: &Path) -> io::Result<ReadableStorage> {
        Err(refused(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_url_names_its_local_folder() {
        assert_eq!(
            file_url_path(Path::new("file:///data/a.zarr")),
            Some(std::path::PathBuf::from("/data/a.zarr"))
        );
        assert_eq!(file_url_path(Path::new("s3://b/a.zarr")), None);
        assert_eq!(file_url_path(Path::new("/data/a.zarr")), None);
    }

    #[test]
    fn records_name_local_paths_absolutely_and_urls_as_given() {
        assert_eq!(recorded(Path::new("s3://b/a.zarr")), "s3://b/a.zarr");
        assert_eq!(recorded(Path::new("/data/a.zarr")), "/data/a.zarr");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            recorded(Path::new("s/a.zarr")),
            cwd.join("s/a.zarr").display().to_string()
        );
    }

    #[test]
    fn urls_are_told_from_paths() {
        for url in [
            "s3://bucket/a.zarr",
            "gs://b/x",
            "az://c/d",
            "https://host:8080/a/b.zarr",
            "file:///tmp/a.zarr",
            "s3+http://x/y",
        ] {
            assert!(is_url(Path::new(url)), "{url}");
        }
        for path in [
            "/data/a.zarr",
            "a.zarr",
            "./s3:/x",
            "1s3://x",
            "://x",
            "dir/with://inside",
        ] {
            assert!(!is_url(Path::new(path)), "{path}");
        }
    }

    #[test]
    fn local_files_are_written_whole_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("regimes");
        assert_eq!(list(&sub).unwrap(), Vec::<String>::new());
        assert!(!exists(&sub.join("a.parquet")).unwrap());
        write(&sub.join("b.parquet"), b"two".to_vec()).unwrap();
        write(&sub.join("a.parquet"), b"one".to_vec()).unwrap();
        std::fs::create_dir(sub.join("folder")).unwrap();
        assert_eq!(list(&sub).unwrap(), ["a.parquet", "b.parquet"]);
        assert_eq!(&read(&sub.join("a.parquet")).unwrap()[..], b"one");
        // Created once only; no temporary file is left either way.
        let c = sub.join("c.parquet");
        write_new(&c, b"first".to_vec()).unwrap();
        let e = write_new(&c, b"second".to_vec()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            e.to_string().contains("made by another process meanwhile"),
            "{e}"
        );
        assert_eq!(&read(&c).unwrap()[..], b"first");
        assert_eq!(list(&sub).unwrap(), ["a.parquet", "b.parquet", "c.parquet"]);
        remove(&c).unwrap();
        remove(&c).unwrap();
        assert!(!exists(&c).unwrap());
        // A write that fails (its target a folder) leaves no temporary file.
        assert!(write(&sub.join("folder"), b"x".to_vec()).is_err());
        assert_eq!(list(&sub).unwrap(), ["a.parquet", "b.parquet"]);
        assert!(exists(&sub.join("b.parquet")).unwrap());
        let missing = read(&sub.join("c.parquet")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
