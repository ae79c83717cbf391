//! Data-parallel training: one process per rank, each with the whole model and a share of
//! every batch ([`icefm_dataset::LoaderOptions::part`]).
//!
//! The ranks meet at rank 0 over TCP ([`Group::connect`]): rank 0 listens, the others connect
//! to it, and the small messages of a run (agreements, checks) go through rank 0 (a star).
//! After each backward pass [`Group::reduce`] replaces every rank's gradients by their
//! weighted mean over the ranks. On the hosts the sum runs down a chain of the ranks and
//! back ([`SumPath::Chain`], `chain.rs`); [`SumPath::Star`] sums through rank 0 instead, for
//! networks where only rank 0's port is reachable. Both add the values in rank order, so
//! every rank receives the same bits, the two paths give the same bits, and every rank takes
//! the same AdamW step and keeps the same weights (checked at every checkpoint). Rank 0 alone
//! writes the run directory. A stop asked of any rank (Ctrl-C, Slurm's signal) stops them all
//! at the same step boundary ([`Group::agree`]); a rank that fails ends the others with an
//! error rather than leaving them waiting.
//!
//! Per step, the star moves `2 · (world − 1)` copies of the gradients through rank 0, one
//! after another. On the chain a rank sends and receives at most two copies, both ways at
//! once, whatever the number of ranks. The order of summation is fixed, so a run is
//! reproducible for a given world size.

use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::train::TrainError;

mod chain;
mod connect;
mod frames;

use connect::{accept_ranks, reach_rank0};
use frames::{join_frames, read_exact, read_frame, read_len, split_frames, write_frame};

/// The first bytes of every rank's greeting.
const MAGIC: &[u8; 8] = b"ICEFMDP1";

/// Port used under Slurm when `MASTER_PORT` is not set: this plus the job id modulo 10,000,
/// so that two jobs sharing a node do not meet on one port.
pub const SLURM_BASE_PORT: u16 = 29500;

/// How long ranks wait for each other at the start, unless `ICEFM_DIST_TIMEOUT` (seconds)
/// says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

fn dist_err(msg: impl std::fmt::Display) -> TrainError {
    TrainError::Setup(format!("data-parallel: {msg}"))
}

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
            format!("--dist {s}: expected RANK/WORLD@HOST:PORT (e.g. 0/2@localhost:29500) or slurm")
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

    fn port(&self) -> u16 {
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

/// How the ranks' gradients are summed on the hosts (`ICEFM_DIST_SUM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SumPath {
    /// Down a chain of the ranks and back, every link busy both ways at once (the default):
    /// each rank must reach the next one on a port it chooses.
    #[default]
    Chain,
    /// Through rank 0: only rank 0's port need be reachable, but rank 0 receives and sends
    /// `world − 1` copies of the gradients, one after another.
    Star,
}

impl SumPath {
    /// `ICEFM_DIST_SUM` (`chain` or `star`), or the default.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("ICEFM_DIST_SUM") {
            Err(_) => Ok(Self::default()),
            Ok(v) => Self::parse(&v),
        }
    }

    /// `chain` or `star`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "chain" | "" => Ok(Self::Chain),
            "star" => Ok(Self::Star),
            other => Err(format!("ICEFM_DIST_SUM={other}: expected chain or star")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Chain => "chain",
            Self::Star => "star",
        }
    }
}

/// Where a group sums its gradients ([`Group::attach`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// One process: nothing to sum.
    Alone,
    /// On the hosts, over TCP ([`SumPath`]).
    Host,
    /// By NCCL on the GPUs.
    Nccl,
}

/// How one rank's gradients weigh in [`Group::reduce`].
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// Every rank's gradients weigh 1 (PyTorch DDP's rule).
    Equal,
    /// This rank's gradients are to be multiplied by this scalar (e.g. the number of terms
    /// its loss averages), which is also their weight.
    Scale(&'a Tensor),
    /// This rank's gradients are already a weighted sum (of its micro-batches' gradients);
    /// this scalar is the sum of their weights.
    Summed(&'a Tensor),
}

enum Link {
    /// One process: nothing to exchange.
    Alone,
    /// Rank 0: a connection to each other rank, by rank (`peers[k]` is rank `k + 1`).
    Hub(Vec<TcpStream>),
    /// Another rank: its connection to rank 0.
    Spoke(TcpStream),
}

/// The ranks of a data-parallel run, as seen from one of them.
pub struct Group {
    rank: usize,
    world: usize,
    link: Link,
    /// Reused receive buffer of rank 0's sums.
    scratch: Vec<f32>,
    /// The links of [`SumPath::Chain`]; none for the star or one process.
    chain: Option<chain::Chain>,
    /// Whether [`Group::attach`] may use NCCL.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    nccl_allowed: bool,
    /// On GPUs, gradients are summed by NCCL on the devices ([`Group::attach`]).
    #[cfg(feature = "cuda")]
    nccl: Option<crate::cuda::Nccl>,
}

impl Group {
    /// A run of one process.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            link: Link::Alone,
            scratch: Vec::new(),
            chain: None,
            nccl_allowed: true,
            #[cfg(feature = "cuda")]
            nccl: None,
        }
    }

    /// Meet the other ranks of `spec`, waiting at most `timeout` for all of them, and sum
    /// gradients the way `ICEFM_DIST_SUM` says ([`SumPath::from_env`]).
    pub fn connect(spec: &DistSpec, timeout: Duration) -> Result<Self, TrainError> {
        Self::connect_with(spec, timeout, SumPath::from_env().map_err(dist_err)?)
    }

    /// Meet the other ranks of `spec`, waiting at most `timeout` for all of them. Rank 0
    /// listens on `spec`'s port (every interface); the others connect to `spec.addr`,
    /// trying again until rank 0 is up. With [`SumPath::Chain`] the ranks then link the
    /// chain; every rank must choose the same `sum`.
    pub fn connect_with(
        spec: &DistSpec,
        timeout: Duration,
        sum: SumPath,
    ) -> Result<Self, TrainError> {
        if spec.world == 1 {
            return Ok(Self::single());
        }
        let link = if spec.rank == 0 {
            Link::Hub(accept_ranks(spec, timeout)?)
        } else {
            Link::Spoke(reach_rank0(spec, timeout)?)
        };
        let mut group = Self {
            rank: spec.rank,
            world: spec.world,
            link,
            scratch: Vec::new(),
            chain: None,
            nccl_allowed: true,
            #[cfg(feature = "cuda")]
            nccl: None,
        };
        match sum {
            SumPath::Chain => group.link_chain(timeout)?,
            SumPath::Star => group.check_same("gradient sums (ICEFM_DIST_SUM)", sum.name())?,
        }
        Ok(group)
    }

    /// Let [`Group::attach`] use NCCL on GPUs (the default) or not (`icefm train` reads
    /// `ICEFM_NCCL=0`; two ranks on one GPU, which NCCL refuses, need it off).
    pub fn allow_nccl(&mut self, allowed: bool) {
        self.nccl_allowed = allowed;
    }

    /// Where the gradients are summed, for a model on `dev`: on GPUs by NCCL, device to
    /// device, when allowed ([`Group::allow_nccl`]) and every rank can load it; otherwise,
    /// and on CPUs, on the hosts ([`SumPath`]). Returns which. Every rank must call it.
    pub fn attach(&mut self, dev: &Device) -> Result<Route, TrainError> {
        if self.world == 1 {
            return Ok(Route::Alone);
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cd) = dev {
            if self.nccl.is_some() {
                return Ok(Route::Nccl);
            }
            let able = self.nccl_allowed && crate::cuda::Nccl::available();
            let all = self.all_gather(&[u8::from(able)])?;
            if all.iter().all(|a| a.first() == Some(&1)) {
                let id = if self.is_leader() {
                    crate::cuda::Nccl::unique_id()?
                } else {
                    Vec::new()
                };
                let ids = self.all_gather(&id)?;
                let nccl =
                    crate::cuda::Nccl::new(cd, self.rank, self.world, &ids[0]).map_err(|e| {
                        dist_err(format!(
                            "rank {}: {e} (NCCL takes one rank per GPU: ranks that share a GPU \
                             need ICEFM_NCCL=0)",
                            self.rank
                        ))
                    })?;
                self.nccl = Some(nccl);
                return Ok(Route::Nccl);
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = dev;
        Ok(Route::Host)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// How this group sums gradients on the hosts: [`SumPath::Chain`] once the chain is
    /// linked, else [`SumPath::Star`] (also for one process, which sums nothing).
    pub fn sum_path(&self) -> SumPath {
        if self.chain.is_some() {
            SumPath::Chain
        } else {
            SumPath::Star
        }
    }

    /// Rank 0, the one that writes the run directory.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// Every rank's `mine`, by rank, on every rank.
    pub fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, TrainError> {
        match &mut self.link {
            Link::Alone => Ok(vec![mine.to_vec()]),
            Link::Hub(peers) => {
                let mut all = vec![mine.to_vec()];
                for (k, p) in peers.iter_mut().enumerate() {
                    all.push(read_frame(p, k + 1)?);
                }
                let joined = join_frames(&all);
                for (k, p) in peers.iter_mut().enumerate() {
                    write_frame(p, &joined, k + 1)?;
                }
                Ok(all)
            }
            Link::Spoke(s) => {
                write_frame(s, mine, 0)?;
                split_frames(&read_frame(s, 0)?, self.world)
            }
        }
    }

    /// Fail, on every rank, unless every rank has the same `value` of `what`: naming the
    /// ranks that differ from rank 0.
    pub fn check_same(&mut self, what: &str, value: &str) -> Result<(), TrainError> {
        let all = self.all_gather(value.as_bytes())?;
        let differ: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, v)| *v != &all[0])
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v);
                let short: String = v.chars().take(80).collect();
                format!("rank {k} has {short:?}")
            })
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        let first = String::from_utf8_lossy(&all[0]);
        let first: String = first.chars().take(80).collect();
        Err(dist_err(format!(
            "the ranks' {what} differ: rank 0 has {first:?}, {}",
            differ.join(", ")
        )))
    }

    /// Whether any rank says `yes` (every rank gets the same answer).
    pub fn agree(&mut self, yes: bool) -> Result<bool, TrainError> {
        if self.world == 1 {
            return Ok(yes);
        }
        let all = self.all_gather(&[u8::from(yes)])?;
        Ok(all.iter().any(|v| v.first() == Some(&1)))
    }

    /// `buf` replaced, on every rank, by the sum of every rank's `buf`, added in rank order
    /// (the same bits on every rank, by either [`SumPath`]). The ranks' buffers must have one
    /// length.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), TrainError> {
        if let Some(chain) = &mut self.chain {
            return chain.sum(buf);
        }
        match &mut self.link {
            Link::Alone => Ok(()),
            Link::Hub(peers) => {
                self.scratch.resize(buf.len(), 0.0);
                for (k, p) in peers.iter_mut().enumerate() {
                    let n = read_len(p, k + 1)?;
                    if n != std::mem::size_of_val(buf) as u64 {
                        return Err(dist_err(format!(
                            "rank {} sent {} gradient values, rank 0 has {}: the ranks' models differ",
                            k + 1,
                            n / 4,
                            buf.len()
                        )));
                    }
                    read_exact(p, bytemuck::cast_slice_mut(&mut self.scratch), k + 1)?;
                    for (a, b) in buf.iter_mut().zip(&self.scratch) {
                        *a += *b;
                    }
                }
                for (k, p) in peers.iter_mut().enumerate() {
                    write_frame(p, bytemuck::cast_slice(buf), k + 1)?;
                }
                Ok(())
            }
            Link::Spoke(s) => {
                write_frame(s, bytemuck::cast_slice(buf), 0)?;
                let n = read_len(s, 0)?;
                if n != std::mem::size_of_val(buf) as u64 {
                    return Err(dist_err(format!(
                        "rank 0 sent {} values for {}",
                        n / 4,
                        buf.len()
                    )));
                }
                read_exact(s, bytemuck::cast_slice_mut(buf), 0)
            }
        }
    }

    /// After the backward passes of a step: each gradient of `vars` in `grads`, and each of
    /// `values` (the step's loss and other figures, for its record), replaced by its mean over
    /// the ranks (and over each rank's micro-batches) as `weights` says: `Σ wᵣ·gᵣ / Σ wᵣ`.
    /// With each rank's loss a mean over its `wᵣ` terms, that is the gradient of the mean over
    /// all the ranks' terms, the one process's gradient of the whole batch. Returns `values`
    /// reduced; in a run of one process with [`Weights::Equal`] or [`Weights::Scale`],
    /// `values` as they are and `grads` untouched.
    pub fn reduce(
        &mut self,
        grads: &mut GradStore,
        vars: &[Var],
        values: &[Tensor],
        weights: Weights<'_>,
    ) -> Result<Vec<Tensor>, TrainError> {
        if self.world == 1 {
            let Weights::Summed(total) = weights else {
                return Ok(values.to_vec());
            };
            // One process, several micro-batches: the sums over its own weights.
            let total = total
                .to_dtype(DType::F32)?
                .clamp(f64::from(f32::MIN_POSITIVE), f64::MAX)?;
            for v in vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let mean = g.broadcast_div(&total.to_dtype(g.dtype())?)?;
                    grads.insert(v.as_tensor(), mean);
                }
            }
            return Ok(values
                .iter()
                .map(|v| v.broadcast_div(&total.to_dtype(v.dtype())?))
                .collect::<candle_core::Result<_>>()?);
        }
        let mut parts = Vec::with_capacity(vars.len() + values.len() + 1);
        let mut slots = Vec::with_capacity(vars.len());
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                slots.push((v.as_tensor().clone(), g.dims().to_vec(), g.dtype()));
                parts.push(g.flatten_all()?.to_dtype(DType::F32)?);
            }
        }
        let dev = values
            .first()
            .or(parts.first())
            .map(|t| t.device().clone())
            .ok_or_else(|| dist_err("nothing to reduce"))?;
        for v in values {
            parts.push(v.flatten_all()?.to_dtype(DType::F32)?);
        }
        parts.push(match weights {
            Weights::Summed(w) => w.to_dtype(DType::F32)?.reshape(1)?,
            _ => Tensor::ones(1, DType::F32, &dev)?,
        });
        let mut flat = Tensor::cat(&parts, 0)?;
        if let Weights::Scale(w) = weights {
            flat = flat.broadcast_mul(&w.to_dtype(DType::F32)?.reshape(1)?)?;
        }
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            // On the devices, queued behind the backward pass: the host does not wait.
            let sum = nccl.sum(&flat)?;
            let n = sum.elem_count();
            // A total of 0 (no rank had a term) leaves the zero sums as they are.
            let total = sum
                .narrow(0, n - 1, 1)?
                .clamp(f64::from(f32::MIN_POSITIVE), f64::MAX)?;
            return Ok(split(&sum.broadcast_div(&total)?, slots, grads, values)?);
        }
        let mut host = flat.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        let total = host.last().copied().unwrap_or(0.0);
        // No rank had a term: the gradients are zero, as in one process.
        if total > 0.0 {
            host.iter_mut().for_each(|x| *x /= total);
        } else {
            host.fill(0.0);
        }
        let n = host.len();
        Ok(split(
            &Tensor::from_vec(host, n, &dev)?,
            slots,
            grads,
            values,
        )?)
    }
}

/// The gradients of `slots` (tensor, shape, dtype) and then `values`' shapes, back out of
/// the reduced `flat`: gradients into `grads`, values returned.
fn split(
    flat: &Tensor,
    slots: Vec<(Tensor, Vec<usize>, DType)>,
    grads: &mut GradStore,
    values: &[Tensor],
) -> candle_core::Result<Vec<Tensor>> {
    let mut at = 0;
    for (var, dims, dtype) in slots {
        let len: usize = dims.iter().product();
        let g = flat.narrow(0, at, len)?.reshape(dims)?.to_dtype(dtype)?;
        grads.insert(&var, g);
        at += len;
    }
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        let len = v.elem_count();
        out.push(
            flat.narrow(0, at, len)?
                .reshape(v.dims())?
                .to_dtype(v.dtype())?,
        );
        at += len;
    }
    Ok(out)
}

impl Drop for Group {
    fn drop(&mut self) {
        // Peers blocked on this rank see the end of the stream at once.
        if let Some(chain) = &self.chain {
            chain.shutdown();
        }
        match &self.link {
            Link::Alone => {}
            Link::Hub(peers) => peers.iter().for_each(|p| {
                let _ = p.shutdown(Shutdown::Both);
            }),
            Link::Spoke(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A checksum of weights' bits (FNV-1a over each tensor's f32 values, in order), to check
/// that the ranks still hold the same weights.
pub fn weights_digest(tensors: &[Tensor]) -> Result<String, TrainError> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tensors {
        for x in t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
            h = (h ^ u64::from(x.to_bits())).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use candle_core::Device;

    /// A port free a moment ago on this host.
    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn spec(rank: usize, world: usize, port: u16) -> DistSpec {
        DistSpec::parse(&format!("{rank}/{world}@127.0.0.1:{port}")).unwrap()
    }

    /// `world` ranks in threads, each running `f` on its group.
    fn ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(&mut Group) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        ranks_with(world, SumPath::default(), f)
    }

    /// [`ranks`] with the gradient sums of `sum`.
    fn ranks_with<T: Send + 'static>(
        world: usize,
        sum: SumPath,
        f: impl Fn(&mut Group) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut g =
                        Group::connect_with(&spec(r, world, port), Duration::from_secs(20), sum)
                            .unwrap();
                    assert_eq!((g.rank(), g.world(), g.is_leader()), (r, world, r == 0));
                    f(&mut g)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn specs_parse_and_slurm_variables_give_rank_world_and_address() {
        let s = DistSpec::parse("1/4@node01:29501").unwrap();
        assert_eq!(
            (s.rank, s.world, s.addr.as_str(), s.local_rank),
            (1, 4, "node01:29501", 1)
        );
        for bad in [
            "4/4@h:1",
            "1/0@h:1",
            "1/2",
            "1/2@h",
            "1/2@:5",
            "a/2@h:1",
            "1/2@h:99999",
        ] {
            assert!(DistSpec::parse(bad).is_err(), "{bad}");
        }
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        const SLURM: [(&str, &str); 5] = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7"),
            ("SLURM_JOB_ID", "123456"),
        ];
        let s = DistSpec::from_slurm(&env(&SLURM)).unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.addr.as_str()),
            (5, 8, 1, "10.0.0.7:32956")
        );
        const MASTER: [(&str, &str); 4] = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("MASTER_ADDR", "gpu17"),
            ("MASTER_PORT", "40000"),
        ];
        let s = DistSpec::from_slurm(&env(&MASTER)).unwrap();
        assert_eq!(
            (s.rank, s.local_rank, s.addr.as_str()),
            (0, 0, "gpu17:40000")
        );
        let e = DistSpec::from_slurm(&env(&[("SLURM_NTASKS", "2")])).unwrap_err();
        assert!(e.contains("SLURM_PROCID is not set"), "{e}");
        let e = DistSpec::from_slurm(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]))
            .unwrap_err();
        assert!(e.contains("MASTER_ADDR"), "{e}");
    }

    #[test]
    fn sums_are_added_in_rank_order_and_the_same_on_every_rank() {
        // Values whose sum depends on the order of addition in f32.
        let vals = [1e8f32, 1.0, -1e8, 0.5];
        for sum in [SumPath::Chain, SumPath::Star] {
            let out = ranks_with(4, sum, move |g| {
                let mut buf = vec![vals[g.rank()], g.rank() as f32, 2.0];
                g.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let expect = vec![((1e8f32 + 1.0) - 1e8) + 0.5, 6.0, 8.0];
            for b in &out {
                assert_eq!(b, &expect, "{sum:?}");
            }
        }
    }

    #[test]
    fn the_chain_and_the_star_give_the_same_bits_over_several_chunks() {
        // More than two of the chain's chunks, the last one partial; every rank's values
        // differ in magnitude so that the order of addition shows in the bits.
        let len = 2 * chain::CHUNK + 1_001;
        let value = |r: usize, i: usize| -> f32 {
            let x = ((i * 7_919 + r * 104_729) % 10_007) as f32 / 10_007.0 - 0.5;
            x * 10f32.powi((r as i32 * 3 + (i % 5) as i32) % 9 - 4)
        };
        for world in [2usize, 3] {
            let mut expect: Vec<f32> = (0..len).map(|i| value(0, i)).collect();
            for r in 1..world {
                expect
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, e)| *e += value(r, i));
            }
            for sum in [SumPath::Chain, SumPath::Star] {
                let out = ranks_with(world, sum, move |g| {
                    let mut buf: Vec<f32> = (0..len).map(|i| value(g.rank(), i)).collect();
                    // Twice: the links are reused from one sum to the next.
                    g.all_reduce_sum(&mut buf).unwrap();
                    let first = buf.clone();
                    let mut buf: Vec<f32> = (0..len).map(|i| value(g.rank(), i)).collect();
                    g.all_reduce_sum(&mut buf).unwrap();
                    (first, buf)
                });
                for (r, (first, second)) in out.iter().enumerate() {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert!(
                        bits(first) == bits(&expect) && bits(second) == bits(&expect),
                        "{sum:?}, {world} ranks: rank {r}'s sums are not the rank-order sums"
                    );
                }
            }
        }
    }

    #[test]
    fn sum_paths_parse_and_ranks_that_disagree_on_theirs_fail_with_the_reason() {
        assert_eq!(SumPath::parse("star"), Ok(SumPath::Star));
        assert_eq!(SumPath::parse(" chain "), Ok(SumPath::Chain));
        let e = SumPath::parse("ring").unwrap_err();
        assert!(e.contains("expected chain or star"), "{e}");
        let port = free_port();
        let handles: Vec<_> = [SumPath::Chain, SumPath::Star]
            .into_iter()
            .enumerate()
            .map(|(r, sum)| {
                std::thread::spawn(move || {
                    Group::connect_with(&spec(r, 2, port), Duration::from_secs(20), sum)
                        .err()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        for h in handles {
            let e = h.join().unwrap();
            assert!(
                e.contains("gradient sums (ICEFM_DIST_SUM) differ: rank 0 has \"chain\", rank 1 has \"star\""),
                "{e}"
            );
        }
    }

    #[test]
    fn gather_agree_and_check_same_see_every_rank() {
        let out = ranks(3, |g| {
            let all = g.all_gather(format!("r{}", g.rank()).as_bytes()).unwrap();
            let empty = g.all_gather(&[]).unwrap();
            let any = g.agree(g.rank() == 2).unwrap();
            let none = g.agree(false).unwrap();
            let same = g.check_same("seed", "7").is_ok();
            let differ = g
                .check_same("configuration", if g.rank() == 1 { "b" } else { "a" })
                .unwrap_err()
                .to_string();
            (all, empty, any, none, same, differ)
        });
        for (all, empty, any, none, same, differ) in out {
            assert_eq!(all, vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
            assert_eq!(empty, vec![Vec::<u8>::new(); 3]);
            assert!(any && !none && same);
            assert!(
                differ.contains("configuration differ: rank 0 has \"a\", rank 1 has \"b\""),
                "{differ}"
            );
        }
    }

    #[test]
    fn gradients_become_their_weighted_mean_over_the_ranks() {
        let out = ranks(2, |g| {
            let dev = Device::Cpu;
            let a = Var::from_vec(vec![0f32; 4], (2, 2), &dev).unwrap();
            let b = Var::from_vec(vec![0f32; 3], 3, &dev).unwrap();
            let r = g.rank() as f32;
            // Rank r's loss: (r + 1) · Σ a + (r + 2) · Σ b, a mean over w = 1 + 3r terms.
            let loss = ((a.as_tensor().sum_all().unwrap() * f64::from(r + 1.0)).unwrap()
                + (b.as_tensor().sum_all().unwrap() * f64::from(r + 2.0)).unwrap())
            .unwrap();
            let mut grads = loss.backward().unwrap();
            let w = Tensor::new(1.0 + 3.0 * r, &dev).unwrap();
            let vals = [Tensor::new(&[10.0 * (r + 1.0), r][..], &dev).unwrap()];
            let red = g
                .reduce(
                    &mut grads,
                    &[a.clone(), b.clone()],
                    &vals,
                    Weights::Scale(&w),
                )
                .unwrap();
            let ga = grads.get(a.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            (ga, gb, red[0].to_vec1::<f32>().unwrap())
        });
        // (1·1 + 4·2) / 5 for a, (1·2 + 4·3) / 5 for b; values (1·[10, 0] + 4·[20, 1]) / 5.
        for (ga, gb, v) in out {
            assert_eq!(ga, vec![vec![1.8f32; 2]; 2]);
            assert_eq!(gb, vec![2.8f32; 3]);
            assert_eq!(v, vec![18.0, 0.8]);
        }
    }

    #[test]
    fn wrong_worlds_twin_ranks_and_absent_ranks_fail_with_the_reason() {
        let port = free_port();
        let hub = std::thread::spawn(move || {
            Group::connect(&spec(0, 3, port), Duration::from_secs(20))
                .err()
                .unwrap()
                .to_string()
        });
        let one = std::thread::spawn(move || {
            Group::connect(&spec(1, 3, port), Duration::from_secs(20))
                .err()
                .map(|e| e.to_string())
        });
        std::thread::sleep(Duration::from_millis(300));
        let twin = Group::connect(&spec(1, 3, port), Duration::from_secs(20))
            .err()
            .unwrap()
            .to_string();
        let hub = hub.join().unwrap();
        assert!(hub.contains("two processes say they are rank 1"), "{hub}");
        // One of the two rank 1s is told why; the other sees rank 0 go.
        let one = one.join().unwrap().unwrap_or_default();
        assert!(
            twin.contains("two processes") || one.contains("two processes"),
            "{twin} / {one}"
        );

        let port = free_port();
        let hub = std::thread::spawn(move || {
            Group::connect(&spec(0, 2, port), Duration::from_secs(20))
                .err()
                .unwrap()
                .to_string()
        });
        std::thread::sleep(Duration::from_millis(100));
        let other = Group::connect(&spec(1, 3, port), Duration::from_secs(20))
            .err()
            .unwrap()
            .to_string();
        let hub = hub.join().unwrap();
        assert!(
            hub.contains("was started with 3 ranks, rank 0 with 2"),
            "{hub}"
        );
        assert!(other.contains("was started with 3 ranks"), "{other}");

        let port = free_port();
        let alone = Group::connect(&spec(0, 3, port), Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(
            alone.contains("for ranks 1, 2 of 3: they never connected"),
            "{alone}"
        );
        let unreachable = Group::connect(&spec(2, 3, free_port()), Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(
            unreachable.contains("rank 2 could not reach rank 0"),
            "{unreachable}"
        );
    }

    #[test]
    fn a_rank_that_leaves_ends_the_others_with_an_error() {
        for sum in [SumPath::Chain, SumPath::Star] {
            let out = ranks_with(3, sum, |g| {
                if g.rank() == 2 {
                    // Leaves before the exchange (drop closes its connections).
                    return String::new();
                }
                let mut buf = vec![1.0f32; 8];
                g.all_reduce_sum(&mut buf).err().unwrap().to_string()
            });
            // The star: rank 0 sees rank 2 go, and rank 1 sees rank 0 go. The chain: each rank
            // sees its successor go, back along the chain from rank 2.
            let (zero, one) = match sum {
                SumPath::Star => ("rank 2 left the run", "rank 0 left the run"),
                SumPath::Chain => ("rank 1 left the run", "rank 2 left the run"),
            };
            assert!(out[0].contains(zero), "{sum:?}: {}", out[0]);
            assert!(out[1].contains(one), "{sum:?}: {}", out[1]);
        }
    }

    #[test]
    fn ranks_whose_buffers_differ_in_length_fail_and_none_waits() {
        for sum in [SumPath::Chain, SumPath::Star] {
            let out = ranks_with(3, sum, |g| {
                let mut buf = vec![1.0f32; if g.rank() == 2 { 9 } else { 8 }];
                g.all_reduce_sum(&mut buf).err().unwrap().to_string()
            });
            let (who, why) = match sum {
                SumPath::Chain => (
                    2,
                    "rank 1 sums 8 values, rank 2 9: the ranks' models differ",
                ),
                SumPath::Star => (0, "rank 2 sent 9 gradient values, rank 0 has 8"),
            };
            assert!(out[who].contains(why), "{sum:?}: {}", out[who]);
        }
    }
}
