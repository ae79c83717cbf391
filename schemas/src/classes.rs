//! Label tasks and their classes.

/// Label value meaning "ignore" (no data, unknown, or not enough valid pixels).
pub const IGNORE: u8 = 255;

/// One of the three charting tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Sea-ice concentration, classes 0–10 (k × 10 %).
    Sic,
    /// Stage of development, classes 0–5.
    Sod,
    /// Floe size, classes 0–6.
    Floe,
}

impl Task {
    /// The three tasks in label-channel order.
    pub const ALL: [Task; 3] = [Task::Sic, Task::Sod, Task::Floe];

    /// Number of classes, not counting [`IGNORE`].
    pub const fn n_classes(self) -> usize {
        match self {
            Task::Sic => 11,
            Task::Sod => 6,
            Task::Floe => 7,
        }
    }

    /// Channel index in the `labels` array.
    pub const fn channel(self) -> usize {
        match self {
            Task::Sic => 0,
            Task::Sod => 1,
            Task::Floe => 2,
        }
    }

    /// Upper-case name as in the RTT files (`SIC`, `SOD`, `FLOE`).
    pub const fn name(self) -> &'static str {
        match self {
            Task::Sic => "SIC",
            Task::Sod => "SOD",
            Task::Floe => "FLOE",
        }
    }

    /// Human-readable class names (legends, summaries).
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            Task::Sic => &[
                "0%", "10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "100%",
            ],
            Task::Sod => &[
                "open water",
                "new ice",
                "young ice",
                "thin FYI",
                "thick FYI",
                "old ice",
            ],
            Task::Floe => &[
                "open water",
                "cake",
                "small floe",
                "medium floe",
                "big floe",
                "vast floe",
                "bergs",
            ],
        }
    }

    /// Histogram length used in manifests: one bin per class plus a last bin for [`IGNORE`].
    pub const fn hist_len(self) -> usize {
        self.n_classes() + 1
    }

    /// Histogram bin of a label value (the last bin for [`IGNORE`] or any out-of-range value).
    pub fn hist_bin(self, value: u8) -> usize {
        let v = usize::from(value);
        if v < self.n_classes() {
            v
        } else {
            self.n_classes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_tables_are_consistent() {
        for t in Task::ALL {
            assert_eq!(t.class_names().len(), t.n_classes());
            assert_eq!(t.hist_bin(IGNORE), t.n_classes());
            assert_eq!(t.hist_bin(0), 0);
        }
        assert_eq!(Task::Sod.hist_bin(6), 6); // out of range → ignore bin
        assert_eq!(Task::ALL.map(Task::channel), [0, 1, 2]);
    }
}
