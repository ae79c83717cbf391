//! icefm's shared vocabulary: the store layout, the Arrow schemas of every manifest, the SIGRID-3
//! code tables, class tables and normalisation constants. No IO.
//!
//! ```
//! use icefm_schemas::sigrid::{MergeMode, PolygonCode};
//! let code = PolygonCode::parse("28;90;-9;93;07;-9;-9;-9;-9;-9;-9;-9;-9;07-9;I").unwrap();
//! let l = code.derive(MergeMode::Sum);
//! assert_eq!((l.sic, l.sod, l.floe), (9, 4, 5));
//! ```

pub mod calendar;
pub mod classes;
pub mod manifest;
pub mod names;
pub mod norm;
pub mod sigrid;
pub mod store;

pub use classes::{IGNORE, Task};
pub use store::Level;
