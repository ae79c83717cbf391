//! Object storage through the object_store crate: one client per bucket (or host), built from
//! the URL and the environment, shared by all reads; one small tokio runtime that the callers'
//! threads block on.
//!
//! Outages: the object_store client retries each request for a few seconds. A client that has
//! answered once is then taken to be reachable, and a request of it that still fails for a
//! reason that may pass (a refused or dropped connection, a timeout, a 5xx) is tried again,
//! backing off, for up to `ICEFM_STORE_RETRY` seconds ([`DEFAULT_RETRY`]), so a training run
//! waits out a network outage instead of ending. One that never answered fails at once (a wrong
//! host or endpoint is not waited on).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions,
    PutPayload,
};
use url::Url;
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    MaybeBytes, MaybeBytesIterator, ReadableStorage, ReadableStorageTraits, StorageError, StoreKey,
};

mod aws_profile;

/// How long a request of a client that has answered before is tried again while it fails for a
/// reason that may pass, unless `ICEFM_STORE_RETRY` says otherwise (seconds; 0: not at all).
pub const DEFAULT_RETRY: Duration = Duration::from_secs(600);

/// The first wait before a request is tried again, doubled at each try up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest wait between two tries of a request.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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

/// `ICEFM_STORE_RETRY` as a duration: whole or fractional seconds, at least 0.
fn retry_window() -> Result<Duration, String> {
    static WINDOW: OnceLock<Result<Duration, String>> = OnceLock::new();
    WINDOW
        .get_or_init(|| match std::env::var("ICEFM_STORE_RETRY") {
            Err(std::env::VarError::NotPresent) => Ok(DEFAULT_RETRY),
            Ok(text) => parse_seconds(&text).ok_or_else(|| {
                format!(
                    "ICEFM_STORE_RETRY={text}: not a number of seconds (how long a request to \
                     object storage is tried again during an outage; 0 turns it off)"
                )
            }),
            Err(e) => Err(format!("ICEFM_STORE_RETRY: {e}")),
        })
        .clone()
}

fn parse_seconds(text: &str) -> Option<Duration> {
    let s: f64 = text.trim().parse().ok()?;
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(1e9)))
}

/// One bucket's (or host's) client, and what it has shown of its reachability.
struct Client {
    store: Arc<dyn ObjectStore>,
    /// The bucket or host, for messages.
    name: String,
    /// Whether failures may be waited out: a service over the network, not `file://`.
    remote: bool,
    /// Whether a request of it has succeeded.
    answered: AtomicBool,
    /// Whether an outage is being waited out (so that one thread reports it, not each).
    waiting: AtomicBool,
}

/// Whether `e` may pass by itself: a failure to reach the service or a server error, not an
/// answer about the object (missing, refused, malformed request).
fn may_pass(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. }) && !about_credentials(e)
}

/// Run the request `op` makes on the runtime, trying again while it fails for a reason that may
/// pass, if `client` answered before, for up to `window`, backing off from `backoff` to
/// [`MAX_BACKOFF`].
fn call<T, F, Fut>(
    client: &Client,
    window: Duration,
    mut backoff: Duration,
    op: F,
) -> object_store::Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = object_store::Result<T>>,
{
    let start = Instant::now();
    let mut reported = false;
    loop {
        match runtime().block_on(op()) {
            Ok(v) => {
                client.answered.store(true, Ordering::Relaxed);
                if client.waiting.swap(false, Ordering::Relaxed) {
                    eprintln!(
                        "note: object storage {} answers again (after {:.0} s)",
                        client.name,
                        start.elapsed().as_secs_f64()
                    );
                }
                return Ok(v);
            }
            Err(e) => {
                let left = window.saturating_sub(start.elapsed());
                if !(client.remote && client.answered.load(Ordering::Relaxed) && may_pass(&e))
                    || left.is_zero()
                {
                    return Err(e);
                }
                if !reported && !client.waiting.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "warning: object storage {} failed ({e}); trying again for up to {:.0} s \
                         (ICEFM_STORE_RETRY)",
                        client.name,
                        window.as_secs_f64()
                    );
                }
                reported = true;
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// [`call`] with the window of `ICEFM_STORE_RETRY`.
fn request<T, F, Fut>(client: &Client, op: F) -> object_store::Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = object_store::Result<T>>,
{
    // `locate` refused an unreadable value before any client was made.
    let window = retry_window().unwrap_or(DEFAULT_RETRY);
    call(client, window, FIRST_BACKOFF, op)
}

/// The client for the bucket (or host) of `path`, and the object's path in it.
fn locate(path: &Path) -> io::Result<(Arc<Client>, ObjectPath)> {
    retry_window().map_err(|e| invalid(path, e))?;
    let text = path.to_str().ok_or_else(|| invalid(path, "not UTF-8"))?;
    let url = Url::parse(text).map_err(|e| invalid(path, e))?;
    let (scheme, object) = ObjectStoreScheme::parse(&url).map_err(|e| invalid(path, e))?;
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
    static CLIENTS: OnceLock<Mutex<HashMap<String, Arc<Client>>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    // A panic while holding the map cannot leave it inconsistent (inserts are whole).
    let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = clients.get(&key) {
        return Ok((c.clone(), object));
    }
    // (`vars_os`: `vars` panics on a variable that is not UTF-8, which no key here is.)
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    // For S3, the AWS CLI's profile first (`~/.aws`), so that the environment wins over it.
    let mut options = if scheme == ObjectStoreScheme::AmazonS3 {
        let files = aws_profile::Files::read(&env).map_err(|e| invalid(path, e))?;
        aws_profile::options(&env, &files).map_err(|e| invalid(path, e))?
    } else {
        Vec::new()
    };
    options.extend(env);
    // A URL that says http:// allows plain HTTP (object_store refuses it by default).
    if url.scheme() == "http" {
        options.push(("allow_http".into(), "true".into()));
    }
    // An endpoint given as http:// (a MinIO on the lab's network, an emulator) asks for plain
    // HTTP as plainly: object_store would otherwise fail with "builder error" alone.
    let endpoint = |k: &str| {
        let k = k.to_ascii_lowercase();
        k == "aws_endpoint" || k == "aws_endpoint_url"
    };
    if options
        .iter()
        .any(|(k, v)| endpoint(k) && v.starts_with("http://"))
    {
        options.push(("allow_http".into(), "true".into()));
    }
    let (client, _) = object_store::parse_url_opts(&url, options)
        .map_err(|e| invalid(path, format!("cannot open object storage: {e}")))?;
    let client = Arc::new(Client {
        store: Arc::from(client),
        remote: !matches!(scheme, ObjectStoreScheme::Local | ObjectStoreScheme::Memory),
        name: key.clone(),
        answered: AtomicBool::new(false),
        waiting: AtomicBool::new(false),
    });
    clients.insert(key, client.clone());
    Ok((client, object))
}

pub(super) fn read(path: &Path) -> io::Result<Bytes> {
    let (client, object) = locate(path)?;
    request(&client, || async {
        let got = client.store.get(&object).await?;
        got.bytes().await
    })
    .map_err(io_error)
}

pub(super) fn exists(path: &Path) -> io::Result<bool> {
    let (client, object) = locate(path)?;
    match request(&client, || client.store.head(&object)) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(io_error(e)),
    }
}

pub(super) fn list(dir: &Path) -> io::Result<Vec<String>> {
    let (client, prefix) = locate(dir)?;
    let listed =
        request(&client, || client.store.list_with_delimiter(Some(&prefix))).map_err(io_error)?;
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
    // One payload, shared by the tries (its bytes are reference-counted).
    let payload = PutPayload::from(bytes);
    request(&client, || client.store.put(&object, payload.clone()))
        .map(|_| ())
        .map_err(io_error)
}

pub(super) fn write_new(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    let (client, object) = locate(path)?;
    let payload = PutPayload::from(bytes);
    let create = || {
        client.store.put_opts(
            &object,
            payload.clone(),
            PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            },
        )
    };
    match request(&client, create) {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "made by another process meanwhile",
        )),
        // A service without create-only puts: check, then put.
        Err(object_store::Error::NotImplemented { .. }) => {
            if exists(path)? {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "made by another process meanwhile",
                ));
            }
            request(&client, || client.store.put(&object, payload.clone()))
                .map(|_| ())
                .map_err(io_error)
        }
        Err(e) => Err(io_error(e)),
    }
}

/// The error of a [`write_replacing`] whose object another process replaced meanwhile (the
/// callers name the object).
fn replaced_meanwhile() -> io::Error {
    io::Error::other(
        "replaced by another process since this one read it; nothing was written over it",
    )
}

pub(super) fn read_seen(path: &Path) -> io::Result<Option<super::Seen>> {
    let (client, object) = locate(path)?;
    let got = request(&client, || async {
        let got = client.store.get(&object).await?;
        let (e_tag, version) = (got.meta.e_tag.clone(), got.meta.version.clone());
        Ok((got.bytes().await?, e_tag, version))
    });
    match got {
        Ok((bytes, e_tag, version)) => Ok(Some(super::Seen {
            bytes,
            e_tag,
            version,
        })),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io_error(e)),
    }
}

pub(super) fn write_replacing(
    path: &Path,
    bytes: Vec<u8>,
    seen: &super::Seen,
) -> io::Result<super::Seen> {
    let (client, object) = locate(path)?;
    let bytes = Bytes::from(bytes);
    let payload = PutPayload::from(bytes.clone());
    let written = |r: object_store::PutResult| super::Seen {
        bytes: bytes.clone(),
        e_tag: r.e_tag,
        version: r.version,
    };
    if seen.e_tag.is_some() || seen.version.is_some() {
        let update = || {
            client.store.put_opts(
                &object,
                payload.clone(),
                PutOptions {
                    mode: PutMode::Update(object_store::UpdateVersion {
                        e_tag: seen.e_tag.clone(),
                        version: seen.version.clone(),
                    }),
                    ..PutOptions::default()
                },
            )
        };
        match request(&client, update) {
            Ok(r) => return Ok(written(r)),
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                return Err(replaced_meanwhile());
            }
            // A service without conditional updates: compare, then put (below).
            Err(object_store::Error::NotImplemented { .. }) => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    match read_seen(path)? {
        Some(now) if now.bytes == seen.bytes => {}
        _ => return Err(replaced_meanwhile()),
    }
    request(&client, || client.store.put(&object, payload.clone()))
        .map(written)
        .map_err(io_error)
}

pub(super) fn remove(path: &Path) -> io::Result<()> {
    let (client, object) = locate(path)?;
    match request(&client, || client.store.delete(&object)) {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(io_error(e)),
    }
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
    client: Arc<Client>,
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
        found(request(&self.client, || async {
            self.client.store.get(&path).await?.bytes().await
        }))
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let path = self.path(key);
        let ranges: Vec<ByteRange> = byte_ranges.collect();
        let got = request(&self.client, || async {
            let mut parts = Vec::with_capacity(ranges.len());
            for r in &ranges {
                let options = GetOptions {
                    range: Some(get_range(*r)),
                    ..GetOptions::default()
                };
                let g = self.client.store.get_opts(&path, options).await?;
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
        Ok(found(request(&self.client, || self.client.store.head(&path)))?.map(|m| m.size))
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

    fn client(remote: bool, answered: bool) -> Client {
        Client {
            store: Arc::new(object_store::memory::InMemory::new()),
            name: "s3://bucket".into(),
            remote,
            answered: AtomicBool::new(answered),
            waiting: AtomicBool::new(false),
        }
    }

    fn unreachable() -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: source("error sending request: Connection refused"),
        }
    }

    /// `call` on an operation that fails `fails` times with `error`, then gives 7: the result
    /// and the tries.
    fn tries(
        client: &Client,
        window: Duration,
        fails: usize,
        error: fn() -> object_store::Error,
    ) -> (object_store::Result<i32>, usize) {
        let count = std::sync::atomic::AtomicUsize::new(0);
        let got = call(client, window, Duration::from_millis(10), || {
            let n = count.fetch_add(1, Ordering::SeqCst);
            async move { if n < fails { Err(error()) } else { Ok(7) } }
        });
        (got, count.load(Ordering::SeqCst))
    }

    #[test]
    fn an_outage_is_waited_out_once_the_service_has_answered() {
        let long = Duration::from_secs(60);
        // Reachable before: three failures are waited out, and the request succeeds.
        let c = client(true, true);
        let (got, n) = tries(&c, long, 3, unreachable);
        assert_eq!((got.unwrap(), n), (7, 4));
        assert!(!c.waiting.load(Ordering::SeqCst));

        // Never answered (a wrong host or endpoint): the first failure is the answer.
        let c = client(true, false);
        let (got, n) = tries(&c, long, 3, unreachable);
        assert!(got.unwrap_err().to_string().contains("Connection refused"));
        assert_eq!(n, 1);
        // Once it answers, it counts as reachable.
        assert_eq!(tries(&c, long, 0, unreachable).0.unwrap(), 7);
        assert!(c.answered.load(Ordering::SeqCst));
        let (got, n) = tries(&c, long, 2, unreachable);
        assert_eq!((got.unwrap(), n), (7, 3));

        // Answers about the object, and credentials, are not tried again.
        let missing = || object_store::Error::NotFound {
            path: "a.zarr/zarr.json".into(),
            source: source("404"),
        };
        let refused = || object_store::Error::PermissionDenied {
            path: "a.zarr/zarr.json".into(),
            source: source("403"),
        };
        let c = client(true, true);
        for error in [missing, refused] {
            let (got, n) = tries(&c, long, 3, error);
            assert!(got.is_err());
            assert_eq!(n, 1);
        }

        // The local file system is not waited on.
        let c = client(false, true);
        assert_eq!(tries(&c, long, 3, unreachable).1, 1);

        // An outage longer than the window ends the request with its error.
        let c = client(true, true);
        let (got, n) = tries(&c, Duration::from_millis(100), usize::MAX, unreachable);
        assert!(got.unwrap_err().to_string().contains("Connection refused"));
        assert!((2..=8).contains(&n), "{n} tries");
        // A window of 0 (ICEFM_STORE_RETRY=0) tries once.
        assert_eq!(tries(&c, Duration::ZERO, 3, unreachable).1, 1);
    }

    /// Two writers that read one object, then replace it: the second to write is refused and
    /// writes nothing; one that read the first's result replaces it.
    fn replacing_refuses_the_second_writer(path: &Path) {
        super::super::write(path, b"first".to_vec()).unwrap();
        let a = read_seen(path).unwrap().unwrap();
        let b = read_seen(path).unwrap().unwrap();
        assert_eq!(a.bytes, Bytes::from_static(b"first"));
        let a_wrote = write_replacing(path, b"a's".to_vec(), &a).unwrap();
        let e = write_replacing(path, b"b's".to_vec(), &b).unwrap_err();
        assert!(
            e.to_string()
                .contains("replaced by another process since this one read it"),
            "{e}"
        );
        assert_eq!(read(path).unwrap(), Bytes::from_static(b"a's"));
        // What a's write returned replaces it (a's own undo, say).
        write_replacing(path, b"first".to_vec(), &a_wrote).unwrap();
        assert_eq!(read(path).unwrap(), Bytes::from_static(b"first"));
        // An object removed meanwhile is not written again either.
        let c = read_seen(path).unwrap().unwrap();
        remove(path).unwrap();
        assert!(read_seen(path).unwrap().is_none());
        assert!(write_replacing(path, b"c's".to_vec(), &c).is_err());
        assert!(read_seen(path).unwrap().is_none());
    }

    #[test]
    fn a_replacement_is_conditional_on_what_was_read() {
        // In memory: conditional on the ETag, as S3, GCS and Azure do it.
        let memory = Path::new("memory:///regimes/r.parquet");
        replacing_refuses_the_second_writer(memory);
        // A service without conditional updates (object_store's local files): read again and
        // compared before the put.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/r.parquet", dir.path().display());
        replacing_refuses_the_second_writer(Path::new(&url));
    }

    #[test]
    fn retry_windows_are_seconds() {
        assert_eq!(parse_seconds("600"), Some(Duration::from_secs(600)));
        assert_eq!(parse_seconds(" 2.5 "), Some(Duration::from_millis(2500)));
        assert_eq!(parse_seconds("0"), Some(Duration::ZERO));
        for bad in ["-1", "inf", "NaN", "10s", ""] {
            assert_eq!(parse_seconds(bad), None, "{bad}");
        }
    }
}
