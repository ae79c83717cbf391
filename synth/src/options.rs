//! What scene to make: kind, size, seed, ice service, encoding, defect; and its file names.

use icefm_schemas::calendar::{civil_from_days, days_from_civil};

use crate::encoding::Encoding;
use crate::error::SynthError;
use crate::rng::{SplitMix64, hash, tag};

/// Smallest height or width accepted (the 2 km grid of an RTT file needs 25 pixels; 100 keeps
/// every structure of the scene visible).
pub const MIN_SIZE: usize = 100;

/// Seconds of the acquisition window, 2018-01-01 … 2021-12-31 (1461 days).
const WINDOW_S: u64 = 1461 * 86_400;
/// Step between consecutive `index` values: coprime with [`WINDOW_S`], about 37 days, so indices
/// visit every season and never repeat a time within the window.
const INDEX_STEP_S: u64 = 3_200_003;
/// 2018-01-01T00:00:00Z in Unix seconds.
const WINDOW_START_UNIX: u64 = 1_514_764_800;

/// Which release of the dataset a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Release {
    /// A training file, with its chart.
    #[default]
    Train,
    /// A test file, without its chart: raw files lack `polygon_icechart` and `polygon_codes`;
    /// RTT files lack `SIC`, `SOD` and `FLOE`, which are written to the reference file beside
    /// them ([`SynthOptions::reference_file_name`]).
    Test,
}

/// Which of the two AI4Arctic file kinds to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SceneKind {
    /// The raw 40 m release: SAR in dB, polygon raster + SIGRID-3 code table.
    Raw,
    /// The ready-to-train 80 m release: standard-scaled inputs, `SIC`/`SOD`/`FLOE` rasters.
    Rtt,
}

impl SceneKind {
    /// Nominal pixel spacing in metres.
    pub const fn pixel_spacing_m(self) -> f64 {
        match self {
            SceneKind::Raw => 40.0,
            SceneKind::Rtt => 80.0,
        }
    }

    /// SAR pixels per 2 km grid cell along each axis (50 raw, 25 RTT).
    pub const fn grid2km_factor(self) -> usize {
        match self {
            SceneKind::Raw => 50,
            SceneKind::Rtt => 25,
        }
    }

    /// Every variable a complete file of this kind holds.
    pub fn variables(self) -> Vec<&'static str> {
        use icefm_schemas::norm::{AMSR2_VARIABLES, ERA5_VARIABLES};
        let mut v: Vec<&'static str> = match self {
            SceneKind::Raw => vec![
                "nersc_sar_primary",
                "nersc_sar_secondary",
                "polygon_icechart",
                "polygon_codes",
                "distance_map",
                "sar_grid_line",
                "sar_grid_sample",
                "sar_grid_latitude",
                "sar_grid_longitude",
                "sar_grid_incidenceangle",
                "sar_grid_height",
            ],
            SceneKind::Rtt => vec![
                "SIC",
                "SOD",
                "FLOE",
                "nersc_sar_primary",
                "nersc_sar_secondary",
                "sar_incidenceangle",
                "distance_map",
                "sar_grid2d_latitude",
                "sar_grid2d_longitude",
            ],
        };
        v.extend(AMSR2_VARIABLES);
        v.extend(ERA5_VARIABLES);
        if self == SceneKind::Raw {
            v.extend(["amsr2_swath_map", "swath_segmentation"]);
        }
        v
    }
}

/// The ice service that drew the chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Danish Meteorological Institute (Greenland waters).
    Dmi,
    /// Canadian Ice Service (Canadian Arctic).
    Cis,
}

impl Service {
    /// Lower-case name as in file names (`dmi`, `cis`).
    pub const fn name(self) -> &'static str {
        match self {
            Service::Dmi => "dmi",
            Service::Cis => "cis",
        }
    }
}

/// A deliberate fault, for testing readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// The named variable is not written (it must be one of [`SceneKind::variables`]).
    MissingVariable(&'static str),
    /// `distance_map` is one row short (its own first dimension `distance_map_lines`).
    MismatchedShape,
    /// One `polygon_codes` row (the first ice polygon's) has a non-numeric CT, e.g.
    /// `12;9x;-9;…` (raw only).
    BadCodeRow,
    /// Every SAR pixel is invalid: NaN in raw files, 0 in RTT files (whose labels are then all 255).
    AllInvalid,
}

/// Default ice service of [`SynthOptions::new`].
pub const DEFAULT_SERVICE: Service = Service::Dmi;

/// Everything that determines one synthetic scene. The decoded content is a pure function of
/// `(kind, height, width, seed, index, service)`; `encoding` changes only the bytes on disk and
/// `defect` only its own fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Raw (40 m) or RTT (80 m).
    pub kind: SceneKind,
    /// SAR rows (`sar_lines`).
    pub height: usize,
    /// SAR columns (`sar_samples`).
    pub width: usize,
    /// Seed of all content.
    pub seed: u64,
    /// Ice service (names, chart id, geographic region, code formatting).
    pub service: Service,
    /// Scene number: with `seed`, makes the acquisition time and file name unique.
    pub index: u32,
    /// On-disk encoding.
    pub encoding: Encoding,
    /// Optional fault.
    pub defect: Option<Defect>,
    /// Training or test release.
    pub release: Release,
}

/// Acquisition time, broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acquisition {
    pub unix: u64,
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Acquisition {
    pub(crate) fn from_unix(unix: u64) -> Self {
        let days = (unix / 86_400) as i64;
        let sod = unix % 86_400;
        let (year, month, day) = civil_from_days(days);
        Self {
            unix,
            year,
            month,
            day,
            hour: (sod / 3600) as u32,
            minute: (sod / 60 % 60) as u32,
            second: (sod % 60) as u32,
        }
    }

    /// `YYYYMMDDTHHMMSS`.
    pub(crate) fn stamp(&self) -> String {
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// Day of year, 0-based.
    pub(crate) fn day_of_year(&self) -> u32 {
        let jan1 = days_from_civil(self.year, 1, 1);
        ((self.unix / 86_400) as i64 - jan1) as u32
    }
}

const DMI_REGIONS: [&str; 9] = [
    "SouthEast",
    "SouthWest",
    "CentralEast",
    "CentralWest",
    "NorthEast",
    "NorthWest",
    "North",
    "CapeFarewell",
    "Qaanaaq",
];
const CIS_REGIONS: [&str; 5] = ["SGRDIEA", "SGRDIWA", "SGRDIHA", "SGRDIMID", "SGRDIFOXE"];

impl SynthOptions {
    /// A scene with the default service ([`DEFAULT_SERVICE`]), index 0, the `default` encoding
    /// and no defect.
    pub fn new(kind: SceneKind, height: usize, width: usize, seed: u64) -> Self {
        Self {
            kind,
            height,
            width,
            seed,
            service: DEFAULT_SERVICE,
            index: 0,
            encoding: Encoding::default(),
            defect: None,
            release: Release::Train,
        }
    }

    /// The file name of this scene: [`Self::raw_file_name`] or [`Self::rtt_file_name`].
    pub fn file_name(&self) -> String {
        match self.kind {
            SceneKind::Raw => self.raw_file_name(),
            SceneKind::Rtt => self.rtt_file_name(),
        }
    }

    /// Acquisition start, `YYYYMMDDTHHMMSS` (field 4 of the raw name, the RTT name's prefix).
    pub fn start_time(&self) -> String {
        self.acquisition().stamp()
    }

    /// Sentinel-1 style raw name, e.g.
    /// `S1B_EW_GRDM_1SDH_20180124T194759_20180124T194859_020301_022AA4_1F75_icechart_dmi_201801241950_SouthEast_RIC.nc`
    /// or `S1A_…_icechart_cis_SGRDIEA_20190430T1020Z_pl_a.nc`: split on `_`, field 4 is the
    /// start, field 9 `icechart`, field 10 the service.
    pub fn raw_file_name(&self) -> String {
        let start = self.acquisition();
        let stop = Acquisition::from_unix(start.unix + 60);
        let mut rng = SplitMix64::new(hash(&[self.seed, u64::from(self.index), tag::NAME]));
        let s1b = rng.chance(0.4);
        // Absolute orbit: 175 orbits per 12-day cycle since launch.
        let launch = if s1b { 1_461_542_400 } else { 1_396_828_800 };
        let orbit = (start.unix - launch) * 175 / (12 * 86_400) + 1;
        let datatake = rng.below(0x100_0000);
        let uid = rng.below(0x1_0000);
        // The chart is valid near the acquisition: round to 10 minutes.
        let chart = Acquisition::from_unix((start.unix + 300) / 600 * 600);
        let chart_id = match self.service {
            Service::Dmi => format!(
                "{:04}{:02}{:02}{:02}{:02}_{}_RIC",
                chart.year,
                chart.month,
                chart.day,
                chart.hour,
                chart.minute,
                rng.pick(&DMI_REGIONS)
            ),
            Service::Cis => format!(
                "{}_{:04}{:02}{:02}T{:02}{:02}Z_pl_a",
                rng.pick(&CIS_REGIONS),
                chart.year,
                chart.month,
                chart.day,
                chart.hour,
                chart.minute
            ),
        };
        format!(
            "S1{}_EW_GRDM_1SDH_{}_{}_{:06}_{:06X}_{:04X}_icechart_{}_{}.nc",
            if s1b { 'B' } else { 'A' },
            start.stamp(),
            stop.stamp(),
            orbit,
            datatake,
            uid,
            self.service.name(),
            chart_id
        )
    }

    /// RTT name: `<YYYYMMDDTHHMMSS>_<dmi|cis>_prep.nc`.
    pub fn rtt_file_name(&self) -> String {
        format!("{}_{}_prep.nc", self.start_time(), self.service.name())
    }

    /// The reference file of an RTT test scene, `<YYYYMMDDTHHMMSS>_<dmi|cis>_prep_reference.nc`
    /// (its `SIC`, `SOD` and `FLOE`); `None` for other files.
    pub fn reference_file_name(&self) -> Option<String> {
        (self.kind == SceneKind::Rtt && self.release == Release::Test).then(|| {
            format!(
                "{}_{}_prep_reference.nc",
                self.start_time(),
                self.service.name()
            )
        })
    }

    /// The chart id: the raw name's fields after the service (without `.nc`).
    pub(crate) fn chart_id(&self) -> String {
        let name = self.raw_file_name();
        let stem = name.trim_end_matches(".nc");
        stem.splitn(12, '_').nth(11).unwrap_or_default().to_string()
    }

    pub(crate) fn acquisition(&self) -> Acquisition {
        let base = hash(&[self.seed, tag::TIME]) % WINDOW_S;
        let offset =
            (u128::from(self.index) * u128::from(INDEX_STEP_S) % u128::from(WINDOW_S)) as u64;
        Acquisition::from_unix(WINDOW_START_UNIX + (base + offset) % WINDOW_S)
    }

    /// Seed of the scene content (independent of encoding and defect).
    pub(crate) fn content_seed(&self) -> u64 {
        hash(&[
            self.seed,
            u64::from(self.index),
            tag::CONTENT,
            match self.service {
                Service::Dmi => 0,
                Service::Cis => 1,
            },
        ])
    }

    pub(crate) fn validate(&self) -> Result<(), SynthError> {
        if self.height < MIN_SIZE || self.width < MIN_SIZE {
            return Err(SynthError::options(format!(
                "scene {} × {} is smaller than {MIN_SIZE} × {MIN_SIZE}",
                self.height, self.width
            )));
        }
        if self
            .height
            .checked_mul(self.width)
            .is_none_or(|n| n > 400_000_000)
        {
            return Err(SynthError::options(format!(
                "scene {} × {} is too large",
                self.height, self.width
            )));
        }
        let enc = &self.encoding;
        if let Some(level) = enc.deflate
            && !(0..=9).contains(&level)
        {
            return Err(SynthError::options(format!(
                "deflate level {level} is not in 0–9"
            )));
        }
        if enc.deflate.is_some() && enc.chunking == crate::Chunking::Contiguous {
            return Err(SynthError::options(
                "contiguous storage cannot be deflated (HDF5 filters need chunks)",
            ));
        }
        match self.defect {
            Some(Defect::MissingVariable(name)) if !self.kind.variables().contains(&name) => {
                Err(SynthError::options(format!(
                    "defect MissingVariable({name:?}): a {:?} file has no such variable",
                    self.kind
                )))
            }
            Some(Defect::BadCodeRow) if self.kind == SceneKind::Rtt => Err(SynthError::options(
                "defect BadCodeRow needs a raw file (RTT files have no polygon_codes)",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            days_from_civil(2018, 1, 1) * 86_400,
            WINDOW_START_UNIX as i64
        );
        assert_eq!(civil_from_days(days_from_civil(2020, 2, 29)), (2020, 2, 29));
        assert_eq!(
            days_from_civil(2022, 1, 1) - days_from_civil(2018, 1, 1),
            1461
        );
        let a = Acquisition::from_unix(1_548_352_079); // 2019-01-24T17:47:59Z
        assert_eq!(a.stamp(), "20190124T174759");
        assert_eq!(a.day_of_year(), 23);
    }

    #[test]
    fn index_step_visits_every_time_once() {
        assert_eq!(gcd(INDEX_STEP_S, WINDOW_S), 1);
    }

    #[test]
    fn raw_names_have_the_real_layout() {
        for (service, seed) in [(Service::Dmi, 1), (Service::Cis, 2)] {
            let mut o = SynthOptions::new(SceneKind::Raw, 300, 320, seed);
            o.service = service;
            let name = o.raw_file_name();
            let f: Vec<&str> = name.split('_').collect();
            assert_eq!(f[0].len(), 3);
            assert_eq!(&f[1..4], ["EW", "GRDM", "1SDH"]);
            assert_eq!(f[4], o.start_time());
            assert_eq!(f[9], "icechart");
            assert_eq!(f[10], service.name());
            // The reference's character positions: 17..32 start, 77..80 service.
            assert_eq!(&name[17..32], o.start_time());
            assert_eq!(&name[77..80], service.name());
            assert!(name.ends_with(".nc"));
            let rtt = format!("{}_{}_prep.nc", &name[17..32], &name[77..80]);
            assert_eq!(rtt, o.rtt_file_name());
            match service {
                Service::Dmi => assert!(o.chart_id().ends_with("_RIC"), "{name}"),
                Service::Cis => assert!(o.chart_id().ends_with("Z_pl_a"), "{name}"),
            }
        }
    }

    #[test]
    fn times_spread_over_years_and_seasons() {
        let mut o = SynthOptions::new(SceneKind::Rtt, 300, 320, 5);
        let mut months = [0u32; 12];
        let mut years = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        for i in 0..120 {
            o.index = i;
            let a = o.acquisition();
            months[a.month as usize - 1] += 1;
            years.insert(a.year);
            names.insert(o.rtt_file_name());
        }
        assert!(months.iter().all(|&m| m > 0), "{months:?}");
        assert_eq!(years.len(), 4);
        assert_eq!(names.len(), 120);
        o.index = 0;
        let a = o.start_time();
        o.seed = 6;
        assert_ne!(a, o.start_time());
    }
}
