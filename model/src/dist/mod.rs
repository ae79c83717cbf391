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
mod spec;
#[cfg(test)]
mod tests;

use connect::{accept_ranks, reach_rank0};
use frames::{join_frames, read_exact, read_frame, read_len, split_frames, write_frame};
pub use spec::{
    DEFAULT_STEP_TIMEOUT, DEFAULT_TIMEOUT, DistSpec, SLURM_BASE_PORT, step_timeout_from_env,
    timeout_from_env,
};

fn dist_err(msg: impl std::fmt::Display) -> TrainError {
    TrainError::Setup(format!("data-parallel: {msg}"))
}

/// The first bytes of every rank's greeting.
const MAGIC: &[u8; 8] = b"ICEFMDP1";

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

    /// Wait at most `limit` for another rank's word (and for a send to go through) from now
    /// on: a rank that froze then ends the run with an error naming it.
    pub fn set_exchange_timeout(&self, limit: Duration) {
        let mut streams: Vec<&std::net::TcpStream> = match &self.link {
            Link::Alone => Vec::new(),
            Link::Hub(peers) => peers.iter().collect(),
            Link::Spoke(s) => vec![s],
        };
        if let Some(c) = &self.chain {
            streams.extend(c.links());
        }
        for s in streams {
            let _ = s.set_read_timeout(Some(limit));
            let _ = s.set_write_timeout(Some(limit));
        }
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
