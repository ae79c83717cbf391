//! The gradient sum as a pipelined chain (the default, [`SumPath::Chain`]): rank `r` holds a
//! connection to rank `r − 1` and one to rank `r + 1`. The buffer goes down the chain in
//! chunks, each rank adding its own values to the partial sum it receives (so every value
//! is added in rank order, as the star adds it), and the last rank's sums come back up the
//! chain. Both directions run at once, chunk after chunk: a rank in the middle receives and
//! sends two copies of the buffer (the partial sums from one side, the sums from the other),
//! the two ends one, whatever the number of ranks. The star's rank 0 receives and then sends
//! `world − 1` copies. A ring all-reduce would move `2 · (world − 1) / world` copies per rank,
//! at most 1.5 × fewer (at 3 ranks; the same at 2), but it starts each chunk's sum at another
//! rank, so its bits would differ from the star's and from one chunk to the next.
//!
//! The links are made at the start ([`Group::link_chain`]): each rank but rank 0 listens on
//! a free port of the address it reached rank 0 from, rank 0 tells every rank where its
//! successor listens (the address it sees that rank connect from), and each rank connects
//! to its successor. A rank whose sum fails shuts its links, so the ranks on either side
//! fail at once rather than wait.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::train::TrainError;

use super::connect::{greeting, read_greeting};
use super::frames::{is_gone, is_timeout, peer_err, silent};
use super::{Group, Link, SumPath, dist_err};

/// Values per chunk: 1 MiB of f32, small enough that the chain fills in a few milliseconds,
/// large enough that each chunk is a few long socket writes.
pub(super) const CHUNK: usize = 1 << 18;

/// The longest wait for a chain link.
const LINK_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank's two links of the chain.
pub(super) struct Chain {
    rank: usize,
    world: usize,
    /// To rank `rank − 1`; none on rank 0.
    prev: Option<TcpStream>,
    /// To rank `rank + 1`; none on the last rank.
    next: Option<TcpStream>,
    /// One chunk of partial sums, reused.
    scratch: Vec<f32>,
}

impl Chain {
    /// Its links, to the previous rank and the next.
    pub(super) fn links(&self) -> impl Iterator<Item = &TcpStream> {
        self.prev.iter().chain(self.next.iter())
    }
}

impl Group {
    /// Link the chain: every rank must call it, after the star is up.
    pub(super) fn link_chain(&mut self, timeout: Duration) -> Result<(), TrainError> {
        // Every listener is up before any rank connects, so linking takes moments; a minute
        // at most, not the whole start-up wait, when something blocks the ranks' ports.
        let deadline = Instant::now() + timeout.min(LINK_TIMEOUT);
        self.check_same("gradient sums (ICEFM_DIST_SUM)", SumPath::Chain.name())?;
        let listener = match &self.link {
            Link::Spoke(s) => {
                let near = s
                    .local_addr()
                    .map_err(|e| dist_err(format!("rank {}: {e}", self.rank)))?
                    .ip();
                Some(listen(near, self.rank)?)
            }
            _ => None,
        };
        let port = match &listener {
            Some(l) => l
                .local_addr()
                .map_err(|e| dist_err(format!("rank {}: {e}", self.rank)))?
                .port()
                .to_le_bytes()
                .to_vec(),
            None => Vec::new(),
        };
        let ports = self.all_gather(&port)?;
        // Rank 0 knows where each rank connected from; it tells them all.
        let table = match &self.link {
            Link::Hub(peers) => {
                let mut lines = Vec::new();
                for (k, p) in peers.iter().enumerate() {
                    let ip = p
                        .peer_addr()
                        .map_err(|e| dist_err(format!("rank {}: {e}", k + 1)))?
                        .ip();
                    let port: [u8; 2] = ports[k + 1].as_slice().try_into().map_err(|_| {
                        dist_err(format!("rank {} sent no port for the chain", k + 1))
                    })?;
                    lines.push(SocketAddr::new(ip, u16::from_le_bytes(port)).to_string());
                }
                lines.join("\n").into_bytes()
            }
            _ => Vec::new(),
        };
        let table = self.all_gather(&table)?.swap_remove(0);
        let addrs: Vec<SocketAddr> = String::from_utf8_lossy(&table)
            .lines()
            .map(|l| l.parse())
            .collect::<Result<_, _>>()
            .map_err(|_| dist_err("rank 0 sent a malformed address table"))?;
        if addrs.len() + 1 != self.world {
            return Err(dist_err(format!(
                "rank 0 sent {} addresses for {} ranks",
                addrs.len(),
                self.world
            )));
        }
        // Connect first, then accept: every listener is already up, so no rank waits on one
        // that waits on it.
        let next = if self.rank + 1 < self.world {
            Some(reach_next(
                addrs[self.rank],
                self.rank,
                self.world,
                deadline,
            )?)
        } else {
            None
        };
        let prev = match listener {
            Some(l) => Some(accept_prev(&l, self.rank, self.world, deadline)?),
            None => None,
        };
        self.chain = Some(Chain {
            rank: self.rank,
            world: self.world,
            prev,
            next,
            scratch: Vec::new(),
        });
        Ok(())
    }
}

impl Chain {
    pub(super) fn shutdown(&self) {
        for s in [&self.prev, &self.next].into_iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// `buf` replaced by the sum over the chain, added in rank order. On failure the links
    /// are shut, which ends the neighbours' sums too.
    pub(super) fn sum(&mut self, buf: &mut [f32]) -> Result<(), TrainError> {
        let rank = self.rank;
        let (before, after) = (
            Neighbour {
                rank: rank.saturating_sub(1),
                last: rank == 1,
            },
            Neighbour {
                rank: rank + 1,
                last: rank + 2 == self.world,
            },
        );
        let (prev, next) = (self.prev.as_ref(), self.next.as_ref());
        let scratch = &mut self.scratch;
        scratch.resize(CHUNK.min(buf.len()), 0.0);
        // Any failure shuts both links, which wakes the other direction's blocked read.
        let fail = |e: TrainError| {
            for s in [prev, next].into_iter().flatten() {
                let _ = s.shutdown(Shutdown::Both);
            }
            e
        };
        std::thread::scope(|scope| {
            let (done, finished) = mpsc::channel::<&mut [f32]>();
            // Up the chain: the finished sums, from the last rank back to rank 0.
            let up = scope.spawn(move || -> Result<(), TrainError> {
                for chunk in finished {
                    if let Some(n) = next {
                        recv(n, bytemuck::cast_slice_mut(chunk), after).map_err(fail)?;
                    }
                    if let Some(p) = prev {
                        send(p, bytemuck::cast_slice(chunk), before).map_err(fail)?;
                    }
                }
                Ok(())
            });
            // Down the chain: the partial sums.
            let down = down([before, after], prev, next, scratch, buf, &done).map_err(fail);
            drop(done);
            let up = up
                .join()
                .unwrap_or_else(|_| Err(fail(dist_err("the chain's receiving thread panicked"))));
            down.and(up)
        })
    }
}

/// The partial sums' direction of [`Chain::sum`]: the length check, then each chunk
/// received, added to and passed on, and handed to the other direction once done with.
fn down<'a>(
    [before, after]: [Neighbour; 2],
    prev: Option<&TcpStream>,
    next: Option<&TcpStream>,
    scratch: &mut [f32],
    buf: &'a mut [f32],
    done: &mpsc::Sender<&'a mut [f32]>,
) -> Result<(), TrainError> {
    let len = buf.len();
    if let Some(n) = next {
        send(n, &(len as u64).to_le_bytes(), after)?;
    }
    if let Some(p) = prev {
        let mut theirs = [0u8; 8];
        recv(p, &mut theirs, before)?;
        let theirs = u64::from_le_bytes(theirs);
        if theirs != len as u64 {
            return Err(dist_err(format!(
                "rank {} sums {theirs} values, rank {} {len}: the ranks' models differ",
                before.rank,
                before.rank + 1
            )));
        }
    }
    for chunk in buf.chunks_mut(CHUNK) {
        let part = &mut scratch[..chunk.len()];
        match (prev, next) {
            // Partial sum + own values (f32 addition commutes: the star's bits).
            (Some(p), Some(n)) => {
                recv(p, bytemuck::cast_slice_mut(part), before)?;
                part.iter_mut()
                    .zip(chunk.iter())
                    .for_each(|(a, b)| *a += *b);
                send(n, bytemuck::cast_slice(part), after)?;
            }
            (Some(p), None) => {
                recv(p, bytemuck::cast_slice_mut(part), before)?;
                chunk
                    .iter_mut()
                    .zip(part.iter())
                    .for_each(|(b, a)| *b += *a);
            }
            (None, Some(n)) => send(n, bytemuck::cast_slice(chunk), after)?,
            (None, None) => {}
        }
        if done.send(chunk).is_err() {
            // The other direction failed; its error is the one to report.
            break;
        }
    }
    Ok(())
}

/// A rank next to this one on the chain, as errors name it.
#[derive(Clone, Copy)]
struct Neighbour {
    rank: usize,
    /// No rank lies beyond it (rank 0, or the last rank).
    last: bool,
}

impl Neighbour {
    /// A failed send or receive: when the link is gone, the rank that left is this
    /// neighbour or one beyond it, since a rank whose own sum fails shuts its links too.
    fn err(self, e: std::io::Error) -> TrainError {
        let r = self.rank;
        if is_timeout(&e) {
            return dist_err(silent(r));
        }
        match (is_gone(&e), self.last) {
            (false, _) => dist_err(format!("rank {r}: {e}")),
            (true, true) => dist_err(format!("rank {r} left the run (its own output says why)")),
            (true, false) => dist_err(format!(
                "rank {r}, or a rank beyond it on the chain, left the run (the output of the \
                 rank that left says why)"
            )),
        }
    }
}

fn send(mut s: &TcpStream, bytes: &[u8], to: Neighbour) -> Result<(), TrainError> {
    s.write_all(bytes).map_err(|e| to.err(e))
}

fn recv(mut s: &TcpStream, bytes: &mut [u8], from: Neighbour) -> Result<(), TrainError> {
    s.read_exact(bytes).map_err(|e| from.err(e))
}

/// A listener on a free port of `near`, the address this rank reaches rank 0 from.
fn listen(near: IpAddr, rank: usize) -> Result<TcpListener, TrainError> {
    let l = TcpListener::bind((near, 0))
        .map_err(|e| dist_err(format!("rank {rank} cannot listen on {near}: {e}")))?;
    l.set_nonblocking(true)
        .map_err(|e| dist_err(format!("rank {rank}: {e}")))?;
    Ok(l)
}

/// Connect to rank `rank + 1` at `addr` and introduce this rank.
fn reach_next(
    addr: SocketAddr,
    rank: usize,
    world: usize,
    deadline: Instant,
) -> Result<TcpStream, TrainError> {
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(dist_err(format!(
                    "rank {rank} could not reach rank {} at {addr}: {e} (the ranks must reach \
                     each other, not only rank 0; ICEFM_DIST_SUM=star sums through rank 0 alone)",
                    rank + 1
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = s.set_nodelay(true);
    s.write_all(&greeting(rank, world))
        .map_err(|e| peer_err(rank + 1, e))?;
    Ok(s)
}

/// Accept rank `rank − 1`'s connection, ignoring strangers.
fn accept_prev(
    l: &TcpListener,
    rank: usize,
    world: usize,
    deadline: Instant,
) -> Result<TcpStream, TrainError> {
    loop {
        match l.accept() {
            Ok((mut s, from)) => {
                let Some((them, their_world)) = read_greeting(&mut s) else {
                    continue;
                };
                if (them, their_world) != (rank - 1, world) {
                    return Err(dist_err(format!(
                        "rank {rank} expected rank {} of {world} on its chain link, and {from} \
                         says it is rank {them} of {their_world}",
                        rank - 1
                    )));
                }
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(dist_err(format!(
                        "rank {rank} waited for rank {} to link the chain, in vain",
                        rank - 1
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(dist_err(format!("rank {rank}: {e}"))),
        }
    }
}
