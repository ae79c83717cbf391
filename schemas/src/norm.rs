//! Global normalisation constants of the AI4Arctic toolbox (`global_meanstd`, raw units).
//! RTT files are standard-scaled with these; icefm stores raw units and the loader scales.

/// Mean and standard deviation of a variable, in its raw units.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MeanStd {
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
}

impl MeanStd {
    /// Undo standard scaling: `x * std + mean`.
    pub fn unscale(&self, x: f64) -> f64 {
        x * self.std + self.mean
    }
    /// Apply standard scaling: `(x - mean) / std`.
    pub fn scale(&self, x: f64) -> f64 {
        (x - self.mean) / self.std
    }
}

const fn ms(mean: f64, std: f64) -> MeanStd {
    MeanStd { mean, std }
}

/// `(variable, mean, std)` for every input variable of the AI4Arctic files.
pub const GLOBAL_MEAN_STD: [(&str, MeanStd); 24] = [
    ("nersc_sar_primary", ms(-14.508255, 5.659746)),
    ("nersc_sar_secondary", ms(-24.701205, 4.746759)),
    ("sar_incidenceangle", ms(33.998018, 8.322267)),
    ("distance_map", ms(23.627670, 14.990186)),
    ("btemp_6_9h", ms(148.846980, 61.648469)),
    ("btemp_6_9v", ms(203.519445, 38.666432)),
    ("btemp_7_3h", ms(149.898965, 61.675445)),
    ("btemp_7_3v", ms(204.205340, 38.666220)),
    ("btemp_10_7h", ms(153.891692, 60.875250)),
    ("btemp_10_7v", ms(208.904087, 36.244959)),
    ("btemp_18_7h", ms(165.680262, 52.617873)),
    ("btemp_18_7v", ms(218.586834, 28.060390)),
    ("btemp_23_8h", ms(182.208937, 42.887162)),
    ("btemp_23_8v", ms(226.396467, 22.117582)),
    ("btemp_36_5h", ms(185.194724, 38.644438)),
    ("btemp_36_5v", ms(228.205902, 17.652645)),
    ("btemp_89_0h", ms(212.537458, 22.584971)),
    ("btemp_89_0v", ms(241.257479, 16.310962)),
    ("u10m_rotated", ms(0.674799, 4.749647)),
    ("v10m_rotated", ms(0.607557, 5.196105)),
    ("t2m", ms(268.626549, 9.469171)),
    ("skt", ms(268.910152, 10.305256)),
    ("tcwv", ms(7.747742, 5.268575)),
    ("tclw", ms(0.041246, 0.071128)),
];

/// The constants of one variable, if it is in the table.
pub fn mean_std(variable: &str) -> Option<MeanStd> {
    GLOBAL_MEAN_STD
        .iter()
        .find(|(name, _)| *name == variable)
        .map(|(_, m)| *m)
}

/// The AI4Arctic variable behind each channel of a store's `sar` and `aux` arrays, whose
/// constants normalise it.
pub const CHANNEL_VARIABLES: [(&str, &str); 4] = [
    ("HH", "nersc_sar_primary"),
    ("HV", "nersc_sar_secondary"),
    ("incidence_angle", "sar_incidenceangle"),
    ("distance_map", "distance_map"),
];

/// The variable of a store channel (`HH` → `nersc_sar_primary`).
pub fn channel_variable(channel: &str) -> Option<&'static str> {
    CHANNEL_VARIABLES
        .iter()
        .find(|(c, _)| *c == channel)
        .map(|(_, v)| *v)
}

/// The constants of a store channel as recorded in a store's root attributes
/// (`normalisation`: variable → `{mean, std}`).
pub fn mean_std_of_store(normalisation: &serde_json::Value, channel: &str) -> Option<MeanStd> {
    let v = normalisation.get(channel_variable(channel)?)?;
    Some(MeanStd {
        mean: v.get("mean")?.as_f64()?,
        std: v.get("std")?.as_f64()?,
    })
}

/// AMSR2 brightness-temperature variables on the 2 km grid (underscore names of the 2023 release).
pub const AMSR2_VARIABLES: [&str; 14] = [
    "btemp_6_9h",
    "btemp_6_9v",
    "btemp_7_3h",
    "btemp_7_3v",
    "btemp_10_7h",
    "btemp_10_7v",
    "btemp_18_7h",
    "btemp_18_7v",
    "btemp_23_8h",
    "btemp_23_8v",
    "btemp_36_5h",
    "btemp_36_5v",
    "btemp_89_0h",
    "btemp_89_0v",
];

/// ERA5 variables on the 2 km grid.
pub const ERA5_VARIABLES: [&str; 6] =
    ["u10m_rotated", "v10m_rotated", "t2m", "skt", "tcwv", "tclw"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_grid_variables_and_round_trips() {
        for v in AMSR2_VARIABLES.iter().chain(ERA5_VARIABLES.iter()) {
            assert!(mean_std(v).is_some(), "{v}");
        }
        let hh = mean_std("nersc_sar_primary").unwrap();
        assert!((hh.unscale(hh.scale(-20.0)) + 20.0).abs() < 1e-12);
        assert!((hh.unscale(0.0) - -14.508255).abs() < 1e-12);
        assert!(mean_std("nope").is_none());
    }
}
