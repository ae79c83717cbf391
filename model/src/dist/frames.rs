//! The wire format between ranks: length-prefixed frames, and several frames joined into one.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use crate::train::TrainError;

use super::dist_err;

/// Whether `e` says the other end of a connection is gone.
pub(super) fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
    )
}

/// Whether `e` is a wait that ran out ([`super::Group::set_exchange_timeout`]).
pub(super) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// The error of a wait for rank `peer` that ran out.
pub(super) fn silent(peer: usize) -> String {
    format!(
        "no word from rank {peer} within the exchange time limit (ICEFM_DIST_STEP_TIMEOUT, \
         default {} s): it froze (a stalled file system or GPU, a stopped process), or its work \
         between two exchanges (rank 0's validation pass) took longer; raise the limit if so",
        super::DEFAULT_STEP_TIMEOUT.as_secs()
    )
}

pub(super) fn peer_err(peer: usize, e: std::io::Error) -> TrainError {
    if is_timeout(&e) {
        return dist_err(silent(peer));
    }
    if is_gone(&e) {
        dist_err(format!(
            "rank {peer} left the run (its own output says why)"
        ))
    } else {
        dist_err(format!("rank {peer}: {e}"))
    }
}

pub(super) fn write_frame(s: &mut TcpStream, bytes: &[u8], peer: usize) -> Result<(), TrainError> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())
        .and_then(|()| s.write_all(bytes))
        .map_err(|e| peer_err(peer, e))
}

pub(super) fn read_len(s: &mut TcpStream, peer: usize) -> Result<u64, TrainError> {
    let mut n = [0u8; 8];
    read_exact(s, &mut n, peer)?;
    Ok(u64::from_le_bytes(n))
}

pub(super) fn read_exact(s: &mut TcpStream, buf: &mut [u8], peer: usize) -> Result<(), TrainError> {
    s.read_exact(buf).map_err(|e| peer_err(peer, e))
}

pub(super) fn read_frame(s: &mut TcpStream, peer: usize) -> Result<Vec<u8>, TrainError> {
    let n = read_len(s, peer)?;
    if n > 1 << 40 {
        return Err(dist_err(format!("rank {peer} sent a frame of {n} bytes")));
    }
    let mut buf = vec![0u8; n as usize];
    read_exact(s, &mut buf, peer)?;
    Ok(buf)
}

pub(super) fn join_frames(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend((p.len() as u64).to_le_bytes());
        out.extend(p);
    }
    out
}

pub(super) fn split_frames(mut bytes: &[u8], count: usize) -> Result<Vec<Vec<u8>>, TrainError> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let bad = || dist_err("rank 0 sent a malformed message");
        let (n, rest) = bytes.split_first_chunk::<8>().ok_or_else(bad)?;
        let n = u64::from_le_bytes(*n) as usize;
        if rest.len() < n {
            return Err(bad());
        }
        out.push(rest[..n].to_vec());
        bytes = &rest[n..];
    }
    Ok(out)
}
