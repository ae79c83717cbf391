//! Data regimes and the multi-scale patch loader of an icefm store. No candle here.
//!
//! ```
//! use icefm_dataset::regime::{Regime, RegimeSpec, Role, Rule, draw_ladder};
//! use icefm_dataset::table::SceneTable;
//! let ids = ["20180124T194759_dmi", "20190430T101830_cis", "20200626T104258_cis"];
//! let table = SceneTable::from_ids(ids, std::path::Path::new("ids"));
//! let spec = RegimeSpec {
//!     name: "ft".into(), rule: Rule::Fraction, percent: None, seed: 1,
//!     role: Role::Finetune, list: None, exclude: vec![], within: vec![], include_test: false,
//! };
//! let ladder = draw_ladder(&table, &spec, &[Some(34.0), Some(67.0)]).unwrap();
//! assert_eq!(ladder[0].name, "ft_34");
//! assert!(ladder[1].scenes.starts_with(&ladder[0].scenes)); // nested
//! ```

pub mod cache;
pub mod error;
pub mod loader;
pub mod location;
pub mod merged;
pub mod regime;
pub mod rng;
pub mod sampler;
pub mod scene;
pub mod store;
pub mod table;
pub mod verify;

pub use error::DatasetError;
pub use loader::{Batch, Batches, Loader, LoaderOptions, SampleInfo};
pub use sampler::{Augment, Sampler, Transform};
pub use scene::{SceneLevel, SceneReader};
