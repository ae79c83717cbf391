//! Object storage through the object_store crate: one client per bucket (or host), built from
//! the URL and the environment, shared by all reads; one small tokio runtime that the callers'
//! threads block on.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload,
};
use url::Url;
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    MaybeBytes, MaybeBytesIterator, ReadableStorage, ReadableStorageTraits, StorageError, StoreKey,
};

/// Worker threads of the runtime: they only drive sockets and timers (the loader's threads
/// block on the requests and decode on their own), so two keep many requests in flight.
const RUNTIME_THREADS: usize = 2;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("icefm-object-store")
            .enable_all()
            .build()
            // Building a runtime fails only when the OS refuses threads or an epoll instance.
            .unwrap_or_else(|e| panic!("cannot start the object-store runtime: {e}"))
    })
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {e}", path.display()),
    )
}

fn io_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e if about_credentials(&e) => {
            io::Error::new(io::ErrorKind::PermissionDenied, with_credentials_hint(&e))
        }
        e => io::Error::other(e),
    }
}

/// Whether `e` is the service refusing the request, or the client finding no credentials to
/// sign it with: with none in the environment, the S3 and GCS clients ask the cloud's instance
/// metadata service, whose refusal or absence then ends the request as a generic error.
fn about_credentials(e: &object_store::Error) -> bool {
    use object_store::Error::{PermissionDenied, Unauthenticated};
    if matches!(e, PermissionDenied { .. } | Unauthenticated { .. }) {
        return true;
    }
    let text = e.to_string().to_ascii_lowercase();
    ["169.254.169.254", "metadata.google.internal", "credential"]
        .iter()
        .any(|w| text.contains(w))
}

/// `e` led by what to check first, credentials.
fn with_credentials_hint(e: &object_store::Error) -> String {
    format!(
        "no credentials found, or the service refused them (docs/object-store.md lists the \
         environment variables each service reads); the storage client said: {e}"
    )
}

/// The client for the bucket (or host) of `path`, and the object's path in it.
fn locate(path: &Path) -> io::Result<(Arc<dyn ObjectStore>, ObjectPath)> {
    let text = path.to_str().ok_or_else(|| invalid(path, "not UTF-8"))?;
    let url = Url::parse(text).map_err(|e| invalid(path, e))?;
    let (_, object) = ObjectStoreScheme::parse(&url).map_err(|e| invalid(path, e))?;
    // The client is that of the URL up to its path, and of the path's first segment where the
    // scheme takes the bucket from there (Azure and path-style S3 over https).
    let whole = ObjectPath::from_url_path(url.path()).map_err(|e| invalid(path, e))?;
    let mut key = url[..url::Position::BeforePath].to_string();
    if whole != object
        && let Some(bucket) = whole.parts().next()
    {
        key.push('/');
        key.push_str(bucket.as_ref());
    }
    static CLIENTS: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    // A panic while holding the map cannot leave it inconsistent (inserts are whole).
    let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = clients.get(&key) {
        return Ok((c.clone(), object));
    }
    // A URL that says http:// allows plain HTTP (object_store refuses it by default).
    // (`vars_os`: `vars` panics on a variable that is not UTF-8, which no key here is.)
    let mut options: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if url.scheme() == "http" {
        options.push(("allow_http".into(), "true".into()));
    }
    // An endpoint given as http:// (a MinIO on the lab's network, an emulator) asks for plain
    // HTTP as plainly: object_store would otherwise fail with "builder error" alone.
    if options
        .iter()
        .any(|(k, v)| k == "AWS_ENDPOINT" && v.starts_with("http://"))
    {
        options.push(("allow_http".into(), "true".into()));
    }
    let (client, _) = object_store::parse_url_opts(&url, options)
        .map_err(|e| invalid(path, format!("cannot open object storage: {e}")))?;
    let client: Arc<dyn ObjectStore> = Arc::from(client);
    clients.insert(key, client.clone());
    Ok((client, object))
}

pub(super) fn read(path: &Path) -> io::Result<Bytes> {
    let (client, object) = locate(path)?;
    runtime()
        .block_on(async {
            let got = client.get(&object).await?;
            got.bytes().await
        })
        .map_err(io_error)
}

pub(super) fn exists(path: &Path) -> io::Result<bool> {
    let (client, object) = locate(path)?;
    match runtime().block_on(client.head(&object)) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(io_error(e)),
    }
}

pub(super) fn list(dir: &Path) -> io::Result<Vec<String>> {
    let (client, prefix) = locate(dir)?;
    let listed = runtime()
        .block_on(client.list_with_delimiter(Some(&prefix)))
        .map_err(io_error)?;
    let mut names: Vec<String> = listed
        .objects
        .iter()
        .filter_map(|o| o.location.filename().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

pub(super) fn write(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    let (client, object) = locate(path)?;
    runtime()
        .block_on(client.put(&object, PutPayload::from(bytes)))
        .map(|_| ())
        .map_err(io_error)
}

pub(super) fn zarr_storage(root: &Path) -> io::Result<ReadableStorage> {
    let (client, prefix) = locate(root)?;
    Ok(Arc::new(ObjectStorage { client, prefix }))
}

/// A store's objects as zarrs storage, read-only, on the calling thread.
///
/// Each byte range is one ranged GET: zarrs asks for a chunk by offset and length, and for a
/// shard's index as a suffix, and object storage serves both as they are. (zarrs' own
/// object_store adapter asks for the object's size first, one more round trip per chunk.)
struct ObjectStorage {
    client: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl ObjectStorage {
    fn path(&self, key: &StoreKey) -> ObjectPath {
        key.as_str()
            .split('/')
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }
}

fn storage_error(e: object_store::Error) -> StorageError {
    StorageError::Other(if about_credentials(&e) {
        with_credentials_hint(&e)
    } else {
        e.to_string()
    })
}

/// Whether the object was there: `Ok(None)` for a missing one, as zarrs expects.
fn found<T>(r: object_store::Result<T>) -> Result<Option<T>, StorageError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(storage_error(e)),
    }
}

fn get_range(range: ByteRange) -> GetRange {
    match range {
        ByteRange::FromStart(offset, Some(length)) => GetRange::Bounded(offset..offset + length),
        ByteRange::FromStart(offset, None) => GetRange::Offset(offset),
        ByteRange::Suffix(length) => GetRange::Suffix(length),
    }
}

impl ReadableStorageTraits for ObjectStorage {
    fn get(&self, key: &StoreKey) -> Result<MaybeBytes, StorageError> {
        let path = self.path(key);
        found(runtime().block_on(async { self.client.get(&path).await?.bytes().await }))
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let path = self.path(key);
        let ranges: Vec<ByteRange> = byte_ranges.collect();
        let got = runtime().block_on(async {
            let mut parts = Vec::with_capacity(ranges.len());
            for r in &ranges {
                let options = GetOptions {
                    range: Some(get_range(*r)),
                    ..GetOptions::default()
                };
                let g = self.client.get_opts(&path, options).await?;
                parts.push(g.bytes().await?);
            }
            Ok(parts)
        });
        let Some(parts) = found(got)? else {
            return Ok(None);
        };
        for (r, p) in ranges.iter().zip(&parts) {
            if let ByteRange::FromStart(_, Some(length)) | ByteRange::Suffix(length) = *r
                && p.len() as u64 != length
            {
                return Err(StorageError::Other(format!(
                    "{path}: asked for {length} bytes ({r:?}), got {}",
                    p.len()
                )));
            }
        }
        Ok(Some(Box::new(parts.into_iter().map(Ok))))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        let path = self.path(key);
        Ok(found(runtime().block_on(self.client.head(&path)))?.map(|m| m.size))
    }

    fn supports_get_partial(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(io::Error::other(text.to_string()))
    }

    #[test]
    fn credential_failures_say_so_first_and_other_failures_do_not() {
        // The S3 client with no credentials in the environment, off the cloud: its fall-back
        // to the instance metadata service fails.
        let metadata = object_store::Error::Generic {
            store: "S3",
            source: source(
                "Error performing token request: error sending request for url                  (http://169.254.169.254/latest/api/token)",
            ),
        };
        let refused = object_store::Error::PermissionDenied {
            path: "a.zarr/zarr.json".into(),
            source: source("403 Forbidden"),
        };
        for e in [metadata, refused] {
            let said = e.to_string();
            let io = io_error(e);
            assert_eq!(io.kind(), io::ErrorKind::PermissionDenied);
            let text = io.to_string();
            assert!(text.starts_with("no credentials found"), "{text}");
            assert!(text.ends_with(&said), "{text}");
        }
        let timeout = object_store::Error::Generic {
            store: "S3",
            source: source("operation timed out"),
        };
        let io = io_error(timeout);
        assert_eq!(io.kind(), io::ErrorKind::Other);
        assert!(!io.to_string().contains("credentials"), "{io}");
        let missing = object_store::Error::NotFound {
            path: "a.zarr/zarr.json".into(),
            source: source("404"),
        };
        assert_eq!(io_error(missing).kind(), io::ErrorKind::NotFound);
    }
}
