//! A static-file HTTP server for tests of stores read over HTTP: GET and HEAD of the files under
//! a folder, with byte ranges (`bytes=a-b`, `bytes=a-`, `bytes=-n`), as a web server or a
//! public bucket's endpoint serves them. It counts the requests it answers, so a test can prove
//! the reads went through it. One thread per connection; each answer closes its connection.
//! [`HttpFiles::set_down`] makes it drop every connection unanswered, as during an outage.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A server running until the test process ends.
pub struct HttpFiles {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    requests: Arc<AtomicUsize>,
    ranged: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
}

impl HttpFiles {
    /// Serve the files under `root`.
    pub fn serve(root: &Path) -> Self {
        Self::serve_with_latency(root, Duration::ZERO)
    }

    /// Serve the files under `root`, each answer after `latency` (an object store's time to
    /// first byte; S3 in the same region takes some 10–30 ms).
    pub fn serve_with_latency(root: &Path, latency: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a local port");
        let base = format!("http://{}", listener.local_addr().expect("its address"));
        let requests = Arc::new(AtomicUsize::new(0));
        let ranged = Arc::new(AtomicUsize::new(0));
        let root = root.to_path_buf();
        let down = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (r, g, d, x) = (
            requests.clone(),
            ranged.clone(),
            down.clone(),
            dropped.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if d.load(Ordering::SeqCst) {
                    x.fetch_add(1, Ordering::SeqCst);
                    drop(conn);
                    continue;
                }
                let (root, r, g) = (root.clone(), r.clone(), g.clone());
                std::thread::spawn(move || answer(conn, &root, latency, &r, &g));
            }
        });
        Self {
            base,
            requests,
            ranged,
            down,
            dropped,
        }
    }

    /// Drop every connection unanswered from now on (`true`), or answer again (`false`).
    #[allow(dead_code)]
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Connections dropped unanswered while down.
    #[allow(dead_code)]
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Requests answered so far, and how many of them asked for a byte range.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.requests.load(Ordering::SeqCst),
            self.ranged.load(Ordering::SeqCst),
        )
    }
}

fn answer(
    conn: TcpStream,
    root: &Path,
    latency: Duration,
    requests: &AtomicUsize,
    ranged: &AtomicUsize,
) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    requests.fetch_add(1, Ordering::SeqCst);
    let path: PathBuf = root.join(target.trim_start_matches('/'));
    let mut out = conn;
    std::thread::sleep(latency);
    let file = match (method, target.contains("..")) {
        ("GET" | "HEAD", false) => std::fs::File::open(&path).ok().filter(|_| path.is_file()),
        _ => None,
    };
    let Some(mut file) = file else {
        let _ = out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let total = file.metadata().map_or(0, |m| m.len() as usize);
    let (status, span) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            ranged.fetch_add(1, Ordering::SeqCst);
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let (start, end) = match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) => (a, (b + 1).min(total)),
                (Ok(a), Err(_)) => (a, total),
                (Err(_), Ok(n)) => (total.saturating_sub(n), total),
                _ => (0, total),
            };
            ("206 Partial Content", start..end.max(start))
        }
        None => ("200 OK", 0..total),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nLast-Modified: Thu, 26 Nov 2026 00:00:00 GMT\r\n\
         ETag: \"{total}\"\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        span.len()
    );
    if status.starts_with("206") {
        head.push_str(&format!(
            "Content-Range: bytes {}-{}/{total}\r\n",
            span.start,
            span.end.saturating_sub(1)
        ));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    if method == "GET" {
        // Only the bytes asked for are read, as a server of large objects does.
        let mut body = vec![0; span.len()];
        if file.seek(SeekFrom::Start(span.start as u64)).is_ok()
            && file.read_exact(&mut body).is_ok()
        {
            let _ = out.write_all(&body);
        }
    }
}
