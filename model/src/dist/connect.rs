//! How the ranks meet: rank 0 accepts every other rank (checking its greeting, rank and world
//! size), the others reach rank 0, each within the timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::train::TrainError;

use super::frames::{read_frame, write_frame};
use super::{DistSpec, MAGIC, dist_err};

/// Rank 0: accept one connection from each other rank before `timeout`.
pub(super) fn accept_ranks(
    spec: &DistSpec,
    timeout: Duration,
) -> Result<Vec<TcpStream>, TrainError> {
    let port = spec.port();
    // Ranks that all run on this machine (`local:N`, or a loopback address) need no other
    // interface; ranks on other nodes reach rank 0 on any.
    let host = spec.addr.rsplit_once(':').map_or("", |(h, _)| h);
    let bind: std::net::IpAddr = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => ip,
        _ if host == "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
    };
    let listener = TcpListener::bind((bind, port)).map_err(|e| {
        dist_err(format!(
            "rank 0 cannot listen on port {port}: {e} (another run on this node? choose another port)"
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| dist_err(format!("port {port}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (1..spec.world).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, from)) => {
                let Some((rank, world)) = read_greeting(&mut s) else {
                    // Not an icefm rank (a port scan, a stale client): ignore it.
                    continue;
                };
                let problem = if world != spec.world {
                    Some(format!(
                        "rank {rank} (from {from}) was started with {world} ranks, rank 0 with {}",
                        spec.world
                    ))
                } else if rank == 0 || rank >= spec.world {
                    Some(format!(
                        "a rank from {from} says it is rank {rank} of {world}"
                    ))
                } else if peers[rank - 1].is_some() {
                    Some(format!(
                        "two processes say they are rank {rank} (the second from {from})"
                    ))
                } else {
                    None
                };
                if let Some(p) = problem {
                    let _ = write_frame(&mut s, p.as_bytes(), rank);
                    return Err(dist_err(p));
                }
                peers[rank - 1] = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(k, _)| (k + 1).to_string())
                        .collect();
                    return Err(dist_err(format!(
                        "rank 0 waited {:.0} s on port {port} for ranks {} of {}: they never \
                         connected (were they started, with --dist …@<this host>:{port}?)",
                        timeout.as_secs_f64(),
                        missing.join(", "),
                        spec.world
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(dist_err(format!("port {port}: {e}"))),
        }
    }
    let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
    for (k, p) in peers.iter_mut().enumerate() {
        write_frame(p, b"ok", k + 1)?;
    }
    Ok(peers)
}

/// Another rank: connect to rank 0, trying again until `timeout`, and introduce itself.
pub(super) fn reach_rank0(spec: &DistSpec, timeout: Duration) -> Result<TcpStream, TrainError> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no address");
    let mut stream = loop {
        let addrs: Vec<_> = match spec.addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last_error = e.to_string();
                Vec::new()
            }
        };
        let got = addrs.iter().find_map(|a| {
            TcpStream::connect_timeout(a, Duration::from_secs(5))
                .map_err(|e| last_error = e.to_string())
                .ok()
        });
        if let Some(s) = got {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(dist_err(format!(
                "rank {} could not reach rank 0 at {} within {:.0} s: {last_error}",
                spec.rank,
                spec.addr,
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&greeting(spec.rank, spec.world))
        .map_err(|e| dist_err(format!("rank {}: {e}", spec.rank)))?;
    // Rank 0 answers once every rank is there.
    let _ = stream.set_read_timeout(Some(timeout + Duration::from_secs(30)));
    let reply = read_frame(&mut stream, 0)?;
    if reply != b"ok" {
        return Err(dist_err(String::from_utf8_lossy(&reply)));
    }
    let _ = stream.set_read_timeout(None);
    Ok(stream)
}

/// What a rank first sends on a connection: [`MAGIC`], its rank and the world size.
pub(super) fn greeting(rank: usize, world: usize) -> Vec<u8> {
    let mut hello = MAGIC.to_vec();
    hello.extend((rank as u64).to_le_bytes());
    hello.extend((world as u64).to_le_bytes());
    hello
}

/// The rank and world size of a newly accepted connection's [`greeting`], with the stream
/// made blocking, without Nagle's delay and (again) without a read timeout; `None` for a
/// stranger or a connection that says nothing within 30 s.
pub(super) fn read_greeting(s: &mut TcpStream) -> Option<(usize, usize)> {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut hello = [0u8; 24];
    if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
        return None;
    }
    let _ = s.set_read_timeout(None);
    let field = |i: usize| {
        u64::from_le_bytes(hello[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0; 8])) as usize
    };
    Some((field(0), field(1)))
}
