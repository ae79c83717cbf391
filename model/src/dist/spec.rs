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
    /// `HOST:PORT` of rank 0 (rank 0 listens at `PORT` on the loopback when `HOST` is a
    /// loopback address or `localhost`, else on every interface).
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

/// The wait at the start: `ICEFM_DIST_TIMEOUT` seconds, or [`DEFAULT_TIMEOUT`]. A value
/// that is not a positive number of seconds is an error, not the default.
pub fn timeout_from_env() -> Result<Duration, String> {
    seconds_from_env("ICEFM_DIST_TIMEOUT", DEFAULT_TIMEOUT)
}

/// How long a rank waits for another's word once training runs, unless
/// `ICEFM_DIST_STEP_TIMEOUT` (seconds) says otherwise: a rank that froze (a stalled file
/// system, a hung GPU, a stopped process) ends the run with an error instead of holding the
/// others for ever. It must exceed the longest pause between exchanges: a step, and rank 0's
/// validation pass.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(1800);

/// The wait between exchanges: `ICEFM_DIST_STEP_TIMEOUT` seconds, or
/// [`DEFAULT_STEP_TIMEOUT`].
pub fn step_timeout_from_env() -> Result<Duration, String> {
    seconds_from_env("ICEFM_DIST_STEP_TIMEOUT", DEFAULT_STEP_TIMEOUT)
}

/// The longest wait a variable may ask for (a year: a socket timeout must be finite).
const MOST_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

fn seconds_from_env(name: &str, default: Duration) -> Result<Duration, String> {
    let v = std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    seconds(name, v.as_deref(), default)
}

/// The seconds variable `name` gives as `value` (unset: `default`).
pub(super) fn seconds(
    name: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, String> {
    let Some(v) = value else {
        return Ok(default);
    };
    match v.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= MOST_SECONDS => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "{name}={v}: expected a number of seconds above 0 and at most {MOST_SECONDS:.0} \
             (a year), or leave it unset for {} s",
            default.as_secs()
        )),
    }
}
