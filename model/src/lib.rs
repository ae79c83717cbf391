//! icefm's models on candle: a ViT encoder, masked-autoencoder pre-training ([`mae`]), the
//! segmentation model for SIC, SOD and FLOE ([`seg`]: feature pyramid, UPerNet or FCN heads),
//! training loops with checkpoints and exact resume ([`train`], [`finetune`]), full-scene
//! sliding-window evaluation ([`evaluate`]) and the AutoICE metrics ([`metrics`]). Every layer
//! records its backward: candle 0.11's fast norms and softmax do not ([`ops`], [`fused`]).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use icefm_model::vit::{Vit, VitConfig};
//! let mut cfg = VitConfig::preset("tiny").unwrap();
//! cfg.depth = 1; // a quick example
//! let vars = VarMap::new();
//! let vit = Vit::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), &cfg).unwrap();
//! let x = Tensor::zeros((1, 2, 32, 32), DType::F32, &Device::Cpu).unwrap();
//! assert_eq!(vit.forward(&x).unwrap().dims(), &[1, 1 + 4, 192]);
//! ```

// Links into `crate::cuda` resolve only where the module is built (feature `cuda`); the docs
// of a CUDA build check them.
#![cfg_attr(not(feature = "cuda"), allow(rustdoc::broken_intra_doc_links))]

/// The device a model runs on (candle's), for callers that do not depend on candle.
pub use candle_core::Device;

pub mod alloc;
pub mod census;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dist;
pub mod evaluate;
pub mod export;
pub mod files;
pub mod finetune;
pub mod fused;
pub mod import;
pub mod mae;
mod memo;
pub mod metrics;
pub mod ops;
pub mod optim;
pub mod panel;
pub mod seg;
pub mod threads;
pub mod train;
pub mod vit;
