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

/// Write `bytes` to `path` whole: a local file through a temporary file and a rename, an object
/// with one upload (object stores make an object visible only once it is complete). Either way a
/// reader never sees part of it.
pub fn write(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    if is_url(path) {
        return remote::write(path, bytes);
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
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

    pub(super) fn zarr_storage(path: &Path) -> io::Result<ReadableStorage> {
        Err(refused(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(exists(&sub.join("b.parquet")).unwrap());
        let missing = read(&sub.join("c.parquet")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
