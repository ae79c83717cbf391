//! Where a rank stands in a data-parallel run: `--dist RANK/WORLD@HOST:PORT` or Slurm's
//! variables, and the wait at the start.

use std::time::Duration;

/// Port used under Slurm when `MASTER_PORT` is not set: this plus the job id modulo 10,000,
/// so that two jobs sharing a node do not meet on one port.
pub const SLURM_BASE_PORT: u16 = 29500;

/// How long ranks wait for each other at the start, unless `ICEFM_DIST_TIMEOUT` (seconds)
/// says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// One rank of a data-parallel run: which rank, how many, and where rank 0 listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistSpec {
    /// This process's rank, `0 .. world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// `HOST:PORT` of rank 0 (rank 0 listens on every interface at `PORT`).
    pub addr: String,
    /// Rank on this node: the GPU ordinal of `--device cuda` (Slurm's `SLURM_LOCALID`).
    pub local_rank: usize,
}

impl DistSpec {
    /// `RANK/WORLD@HOST:PORT` (e.g. `1/4@node01:29500`; the local rank is then `RANK`), or
    /// `slurm` ([`DistSpec::from_slurm`] on this process's environment).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "slurm" {
            return Self::from_slurm(&|k| std::env::var(k).ok());
        }
        let bad = || {
            format!(
                "--dist {s}: expected local:N (N ranks on this machine), RANK/WORLD@HOST:PORT \
                 (e.g. 0/2@localhost:29500) or slurm"
            )
        };
        let (ranks, addr) = s.split_once('@').ok_or_else(bad)?;
        let (rank, world) = ranks.split_once('/').ok_or_else(bad)?;
        let rank: usize = rank.trim().parse().map_err(|_| bad())?;
        let world: usize = world.trim().parse().map_err(|_| bad())?;
        Self::checked(rank, world, addr.trim(), rank).map_err(|e| format!("--dist {s}: {e}"))
    }

    /// From a Slurm task's variables (`get` reads one): rank `SLURM_PROCID` of `SLURM_NTASKS`,
    /// local rank `SLURM_LOCALID`; rank 0 at `MASTER_ADDR` (default `SLURM_LAUNCH_NODE_IPADDR`,
    /// the node where `srun` ran, which holds rank 0 under Slurm's default block placement)
    /// and port `MASTER_PORT` (default [`SLURM_BASE_PORT`] + `SLURM_JOB_ID` mod 10,000).
    pub fn from_slurm(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let num = |k: &str| -> Result<usize, String> {
            let v = get(k)
                .ok_or_else(|| format!("--dist slurm: {k} is not set (run each rank with srun)"))?;
            v.trim()
                .parse()
                .map_err(|_| format!("--dist slurm: {k}={v} is not a number"))
        };
        let rank = num("SLURM_PROCID")?;
        let world = num("SLURM_NTASKS")?;
        let local = get("SLURM_LOCALID")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let host = get("MASTER_ADDR")
            .or_else(|| get("SLURM_LAUNCH_NODE_IPADDR"))
            .ok_or("--dist slurm: neither MASTER_ADDR nor SLURM_LAUNCH_NODE_IPADDR is set")?;
        let port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| format!("--dist slurm: MASTER_PORT={p} is not a port"))?,
            None => {
                let job = num("SLURM_JOB_ID")?;
                SLURM_BASE_PORT + (job % 10_000) as u16
            }
        };
        Self::checked(rank, world, &format!("{}:{port}", host.trim()), local)
            .map_err(|e| format!("--dist slurm: {e}"))
    }

    fn checked(rank: usize, world: usize, addr: &str, local_rank: usize) -> Result<Self, String> {
        if world == 0 || rank >= world {
            return Err(format!("rank {rank} of {world} ranks does not exist"));
        }
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("{addr} is not HOST:PORT"));
        }
        Ok(Self {
            rank,
            world,
            addr: addr.to_string(),
            local_rank,
        })
    }

    pub(super) fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0)
    }
}

/// The wait at the start: `ICEFM_DIST_TIMEOUT` seconds, or [`DEFAULT_TIMEOUT`].
pub fn timeout_from_env() -> Duration {
    std::env::var("ICEFM_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
}
