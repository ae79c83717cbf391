//! Batches onto the device: the loader's host batches copied (pinned and overlapped on a GPU),
//! prepared on the device where it can, and each step's drop-path draws.

use candle_core::{Device, Tensor};
use icefm_dataset::Loader;
use icefm_dataset::rng::Rng;

use crate::fused::normalise_augment;
use crate::mae::Masking;
use crate::ops::Draws;
use crate::vit::Vit;

use super::{DROP_STREAM, Share, TrainError};

/// Whether batches are normalised and turned on the device ([`normalise_augment`]) rather
/// than on the host: on a GPU with icefm's kernels.
pub(super) fn device_prepares(dev: &Device) -> bool {
    dev.is_cuda() && crate::fused::fused()
}

/// A training batch on the device: images `[B, C, n, n]` and validity `[B, n, n]`, with the
/// host-side facts the step needs.
pub(crate) struct DeviceBatch {
    pub images: Tensor,
    pub valid: Tensor,
    /// `u8 [B, 3, n, n]` (the loader's labels).
    pub labels: Vec<u8>,
    /// The labels already on the device, `u8 [B, 3, n·n]` ([`Feeder::with_labels`]).
    pub labels_on: Option<Tensor>,
    pub samples: Vec<icefm_dataset::SampleInfo>,
    pub channels: usize,
    pub size: usize,
}

/// A training loop's batches on its device, in the loader's order.
///
/// On the CPU a batch is made when [`Feeder::next`] asks for it. On a GPU (feature `cuda`),
/// [`Feeder::prefetch`], called once a step's forward pass is queued, takes the next batch
/// from the loader and starts its copy through page-locked buffers on a stream of its own
/// ([`crate::cuda::Uploader`]), so that the copy runs beside the step; with icefm's kernels
/// the loader ships raw windows, normalised and turned on the device ([`normalise_augment`]).
/// `ICEFM_UPLOAD=pageable` copies from pageable memory when asked for (for comparisons).
pub(crate) struct Feeder<'a> {
    batches: icefm_dataset::Batches,
    loader: &'a Loader,
    dev: Device,
    staged: Option<DeviceBatch>,
    #[cfg(feature = "cuda")]
    uploader: Option<crate::cuda::Uploader>,
    /// The masking's indices ([`Feeder::stage_masking`]).
    #[cfg(feature = "cuda")]
    indices: Option<crate::cuda::Uploader<u32>>,
    /// The batches' labels, when asked for ([`Feeder::with_labels`]).
    #[cfg(feature = "cuda")]
    labels: Option<crate::cuda::Uploader<u8>>,
    /// Stochastic depth's scales ([`Feeder::stage_draws`]).
    #[cfg(feature = "cuda")]
    draws: Option<crate::cuda::Uploader<f32>>,
}

impl<'a> Feeder<'a> {
    /// Batches of `loader` from batch index `start`, for `dev`.
    pub fn new(loader: &'a Loader, start: u64, dev: &Device) -> Result<Self, TrainError> {
        #[cfg(feature = "cuda")]
        let uploader = match dev {
            Device::Cuda(cd) if !std::env::var("ICEFM_UPLOAD").is_ok_and(|v| v == "pageable") => {
                Some(crate::cuda::Uploader::new(cd)?)
            }
            _ => None,
        };
        Ok(Self {
            batches: loader.iter(start),
            loader,
            dev: dev.clone(),
            staged: None,
            #[cfg(feature = "cuda")]
            uploader,
            #[cfg(feature = "cuda")]
            indices: None,
            #[cfg(feature = "cuda")]
            labels: None,
            #[cfg(feature = "cuda")]
            draws: None,
        })
    }

    /// `draws` with the scales they give `vit`'s blocks on their way to the device through
    /// page-locked memory (a GPU with page-locked uploads, and a model with stochastic depth;
    /// elsewhere as they are, and each block copies its scales from the host).
    pub fn stage_draws(&mut self, draws: Draws, vit: &Vit) -> Result<Draws, TrainError> {
        #[cfg(feature = "cuda")]
        if vit.cfg.drop_path > 0.0
            && let Some(up) = side_uploader(&self.dev, self.uploader.is_some(), &mut self.draws)?
        {
            let b = draws.per_block.first().map_or(0, |(a, _)| a.len());
            let scales = up.upload(&vit.drop_scales(&draws), (draws.per_block.len(), 2, b))?;
            return Ok(draws.staged(scales)?);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = vit;
        Ok(draws)
    }

    /// Also copy each batch's labels to the device beside the step (a GPU with page-locked
    /// uploads: [`DeviceBatch::labels_on`]), for fine-tuning's loss.
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    pub fn with_labels(mut self) -> Result<Self, TrainError> {
        #[cfg(feature = "cuda")]
        side_uploader(&self.dev, self.uploader.is_some(), &mut self.labels)?;
        Ok(self)
    }

    /// `masking` with its indices on their way to the device through page-locked memory (on
    /// a GPU with page-locked uploads; elsewhere as it is, and the forward pass copies them).
    pub fn stage_masking(&mut self, masking: Masking) -> Result<Masking, TrainError> {
        #[cfg(feature = "cuda")]
        if let Some(up) = side_uploader(&self.dev, self.uploader.is_some(), &mut self.indices)? {
            return Ok(masking.staged_through(up)?);
        }
        Ok(masking)
    }

    /// The next batch: the one [`Feeder::prefetch`] started, or a new one.
    pub fn next(&mut self) -> Result<DeviceBatch, TrainError> {
        match self.staged.take() {
            Some(b) => Ok(b),
            None => self.fetch(),
        }
    }

    /// Start the next batch's copy now (a GPU with page-locked uploads; elsewhere nothing, the
    /// batch is made when asked for).
    pub fn prefetch(&mut self) -> Result<(), TrainError> {
        #[cfg(feature = "cuda")]
        if self.uploader.is_some() && self.staged.is_none() {
            self.staged = Some(self.fetch()?);
        }
        Ok(())
    }

    fn fetch(&mut self) -> Result<DeviceBatch, TrainError> {
        let batch = self
            .batches
            .next()
            .ok_or_else(|| TrainError::Setup("the loader stopped".into()))??;
        let (b, c, n) = (batch.len(), batch.channels, batch.size);
        let images = self.upload(&batch.inputs, (b, c, n, n))?;
        let (images, valid) = if device_prepares(&self.dev) {
            let (mean, inv): (Vec<f32>, Vec<f32>) = self.loader.channel_norms().into_iter().unzip();
            let tf: Vec<icefm_dataset::Transform> =
                batch.samples.iter().map(|s| s.transform).collect();
            normalise_augment(&images, &mean, &inv, &tf)?
        } else {
            let valid: Vec<f32> = batch.valid.iter().map(|&v| f32::from(v)).collect();
            (images, Tensor::from_vec(valid, (b, n, n), &self.dev)?)
        };
        #[cfg(feature = "cuda")]
        let labels_on = match self.labels.as_mut() {
            Some(up) => Some(up.upload(&batch.labels, (b, 3, n * n))?),
            None => None,
        };
        #[cfg(not(feature = "cuda"))]
        let labels_on = None;
        let out = DeviceBatch {
            images,
            valid,
            labels_on,
            labels: batch.labels.clone(),
            samples: batch.samples.clone(),
            channels: c,
            size: n,
        };
        self.batches.recycle(batch);
        Ok(out)
    }

    fn upload(
        &mut self,
        data: &[f32],
        shape: (usize, usize, usize, usize),
    ) -> Result<Tensor, TrainError> {
        #[cfg(feature = "cuda")]
        if let Some(up) = self.uploader.as_mut() {
            return Ok(up.upload(data, shape)?);
        }
        Ok(Tensor::from_slice(data, shape, &self.dev)?)
    }
}

/// `slot`'s uploader beside the batches' (made on first use) when batches go up through
/// page-locked memory (`page_locked`, a GPU); `None` elsewhere.
#[cfg(feature = "cuda")]
fn side_uploader<'s, T: crate::cuda::Upload>(
    dev: &Device,
    page_locked: bool,
    slot: &'s mut Option<crate::cuda::Uploader<T>>,
) -> Result<Option<&'s mut crate::cuda::Uploader<T>>, TrainError> {
    let Device::Cuda(cd) = dev else {
        return Ok(None);
    };
    if page_locked && slot.is_none() {
        *slot = Some(crate::cuda::Uploader::new(cd)?);
    }
    Ok(slot.as_mut())
}

/// Stochastic-depth draws of step `step` for `depth` blocks and the samples of `share` (a
/// function of the seed and the step alone, so a resumed run draws the same, and drawn for
/// the whole batch, so each rank's share draws what one process would for those samples).
pub(crate) fn drop_draws(seed: u64, step: u64, depth: usize, share: &Share) -> Draws {
    let mine = share.first..share.first + share.len;
    Draws::new(
        (0..depth)
            .map(|i| {
                let mut r = Rng::new(seed ^ DROP_STREAM, step * 1024 + i as u64);
                let mut draw = || {
                    let all: Vec<f32> = (0..share.batch).map(|_| r.unit() as f32).collect();
                    all[mine.clone()].to_vec()
                };
                (draw(), draw())
            })
            .collect(),
    )
}
