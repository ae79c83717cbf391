//! Values made on first use and kept for the process, by key.

use candle_core::{Device, Result};
use std::sync::OnceLock;

/// Values made on first use and kept for the process, by key (a device, a kernel, a shape).
/// Lookups are linear: for the few dozen keys a process makes.
pub(crate) struct Memo<K, V>(OnceLock<std::sync::Mutex<Vec<(K, V)>>>);

impl<K: PartialEq, V: Clone> Memo<K, V> {
    /// An empty memo (for a `static`).
    pub(crate) const fn new() -> Self {
        Self(OnceLock::new())
    }

    /// The value for `key`, made by `make` the first time (an error is returned, not kept).
    pub(crate) fn get_or_make(&self, key: K, make: impl FnOnce() -> Result<V>) -> Result<V> {
        let mut memo = self
            .0
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| candle_core::Error::Msg("memo: a thread panicked".into()))?;
        if let Some((_, v)) = memo.iter().find(|(k, _)| *k == key) {
            return Ok(v.clone());
        }
        let v = make()?;
        memo.push((key, v.clone()));
        Ok(v)
    }
}

/// A device as a key: equal to the same device only (on CUDA, the same candle device, whose
/// stream orders the work on what is kept).
#[derive(Debug, Clone)]
pub(crate) struct DeviceKey(pub(crate) Device);

impl PartialEq for DeviceKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.same_device(&other.0)
    }
}
