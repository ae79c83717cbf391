//! [`Stash`]: a custom op's second result, kept for the caller to take as a tensor.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// A second result of a custom op (candle's ops have one), kept for the caller to take as a
/// tensor with [`Stash::take`]: an op that launches nothing and hands the kept storage on.
#[derive(Debug, Clone, Default)]
pub struct Stash {
    inner: std::sync::Arc<std::sync::Mutex<Option<(Stashed, Shape)>>>,
}

/// A kept storage, on the device that computed it.
#[derive(Debug)]
pub(super) enum Stashed {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
}

impl Stash {
    /// Keep `storage` of `shape`, written by the op now running: an open census counts its
    /// bytes with that op's.
    pub(super) fn keep(&self, storage: Stashed, shape: Shape) {
        let dtype = match &storage {
            Stashed::Cpu(s) => s.dtype(),
            #[cfg(feature = "cuda")]
            Stashed::Cuda(s) => s.dtype(),
        };
        candle_core::census::written((shape.elem_count() * dtype.size_in_bytes()) as u64);
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some((storage, shape));
    }

    fn get(&self) -> Result<(Stashed, Shape)> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("stash: nothing kept, or taken twice".into()))
    }

    /// The kept result as a tensor on `like`'s device (no gradient). Once only.
    pub fn take(&self, like: &Tensor) -> Result<Tensor> {
        like.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for Stash {
    fn name(&self) -> &'static str {
        "icefm-stash"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::census::launchless();
        match self.get()? {
            (Stashed::Cpu(s), shape) => Ok((s, shape)),
            #[cfg(feature = "cuda")]
            _ => candle_core::bail!("stash: kept on a GPU, taken on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        candle_core::census::launchless();
        match self.get()? {
            (Stashed::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("stash: kept on the CPU, taken on a GPU"),
        }
    }
}
