//! Scene identity from AI4Arctic file names and attributes.
//!
//! Raw: `S1A_EW_GRDM_1SDH_<start>_<stop>_<orbit>_<datatake>_<uid>_icechart_<dmi|cis>_…nc`;
//! RTT: `<YYYYMMDDTHHMMSS>_<dmi|cis>_prep.nc`. Both map to the scene id `<start>_<service>`.

/// Identity of a scene parsed from a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SceneName {
    /// `20180124T194759_dmi`.
    pub scene_id: String,
    /// `dmi` or `cis`.
    pub service: String,
    /// `20180124T194759`.
    pub start: String,
    /// `S1A` / `S1B`, raw names only.
    pub satellite: Option<String>,
}

fn is_timestamp(s: &str) -> bool {
    s.len() == 15
        && s.as_bytes()[8] == b'T'
        && s.bytes()
            .enumerate()
            .all(|(i, b)| i == 8 || b.is_ascii_digit())
}

/// Parse a raw (`S1…_icechart_<svc>_…`) or RTT (`<time>_<svc>[_prep…]`) name or a scene id;
/// directories and `.nc` are ignored.
pub fn parse_scene_name(name: &str) -> Option<SceneName> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let stem = base.strip_suffix(".nc").unwrap_or(base);
    let parts: Vec<&str> = stem.split('_').collect();
    if parts.len() >= 11 && parts[0].starts_with("S1") && parts[9] == "icechart" {
        let start = parts[4];
        let service = parts[10].to_lowercase();
        if is_timestamp(start) {
            return Some(SceneName {
                scene_id: format!("{start}_{service}"),
                service,
                start: start.to_string(),
                satellite: Some(parts[0].to_string()),
            });
        }
    }
    if parts.len() >= 2 && is_timestamp(parts[0]) {
        let service = parts[1].to_lowercase();
        if service.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Some(SceneName {
                scene_id: format!("{}_{service}", parts[0]),
                service,
                start: parts[0].to_string(),
                satellite: None,
            });
        }
    }
    None
}

/// The scene ids of the AutoICE test release (`ai4arctic_test_scenes.json`, 20 scenes): held
/// out of every training regime whatever files a store got them from.
pub const AUTOICE_TEST_SCENES: [&str; 20] = [
    "20180124T194759_dmi",
    "20180623T114935_cis",
    "20180707T113313_cis",
    "20180716T110418_cis",
    "20180903T123331_cis",
    "20180917T121813_cis",
    "20190406T102029_cis",
    "20190810T110422_dmi",
    "20191011T131651_cis",
    "20200217T102731_cis",
    "20200319T101935_cis",
    "20200701T114012_cis",
    "20200719T123046_cis",
    "20201013T080448_dmi",
    "20210328T202742_dmi",
    "20210410T201933_dmi",
    "20210430T205436_dmi",
    "20210506T075557_dmi",
    "20210512T214149_cis",
    "20211212T211242_dmi",
];

/// The release a scene belongs to: `train` (charts in the file) or `test` (held out: the
/// AutoICE test release, or a scene without charts of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Release {
    /// Training release: may be drawn into pre-training, fine-tuning and validation regimes.
    Train,
    /// Test release: held out of those unless asked for.
    Test,
}

impl Release {
    /// Name in the scenes manifest's `release` column.
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "test",
        }
    }

    /// Parse a `release` column value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "train" => Some(Self::Train),
            "test" => Some(Self::Test),
            _ => None,
        }
    }

    /// The release of a scene recorded before the `release` column, from what its record says:
    /// test for an AutoICE test scene or a scene without a labelled pixel (no charts: the
    /// rule ingest follows), else train. `sic_pixels`: its SIC histogram (classes, then 255).
    pub fn of_record(scene_id: &str, sic_pixels: &[u64]) -> Self {
        let labelled: u64 = sic_pixels[..sic_pixels.len().saturating_sub(1)]
            .iter()
            .sum();
        if labelled == 0 {
            Self::Test
        } else {
            Self::of_id(scene_id)
        }
    }

    /// The release of a scene from its id alone: test for the AutoICE test scenes, else train.
    pub fn of_id(scene_id: &str) -> Self {
        if AUTOICE_TEST_SCENES.contains(&scene_id) {
            Self::Test
        } else {
            Self::Train
        }
    }
}

/// The first `n` of `items` joined with `, `, and `, …` when there are more: scene ids and
/// such in one-line messages.
pub fn first_few<T: std::fmt::Display>(items: &[T], n: usize) -> String {
    let mut s = items
        .iter()
        .take(n)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > n {
        s.push_str(", …");
    }
    s
}

/// Microseconds since the Unix epoch of a `YYYYMMDDTHHMMSS` UTC timestamp.
pub fn timestamp_micros(s: &str) -> Option<i64> {
    if !is_timestamp(s) {
        return None;
    }
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0, 4)?,
        n(4, 6)?,
        n(6, 8)?,
        n(9, 11)?,
        n(11, 13)?,
        n(13, 15)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from civil (proleptic Gregorian), H. Hinnant's algorithm.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 3600 + mi * 60 + se) * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_few_names_say_when_there_are_more() {
        assert_eq!(super::first_few(&["a", "b"], 3), "a, b");
        assert_eq!(super::first_few(&["a", "b", "c", "d"], 3), "a, b, c, …");
        assert_eq!(super::first_few(&[7_i64], 5), "7");
        assert_eq!(super::first_few::<&str>(&[], 5), "");
    }

    #[test]
    fn raw_and_rtt_names_map_to_one_id() {
        let raw = "S1A_EW_GRDM_1SDH_20180124T194759_20180124T194859_020301_022AA4_1F75_icechart_dmi_201801241950_SouthEast_RIC.nc";
        let r = parse_scene_name(raw).unwrap();
        assert_eq!(r.scene_id, "20180124T194759_dmi");
        assert_eq!(r.satellite.as_deref(), Some("S1A"));
        // The reference's rule: characters 17..32 and 77..80 of the raw name.
        assert_eq!(format!("{}_{}", &raw[17..32], &raw[77..80]), r.scene_id);
        let t = parse_scene_name("/data/20180124T194759_dmi_prep.nc").unwrap();
        assert_eq!(t.scene_id, r.scene_id);
        assert_eq!(t.satellite, None);
        assert_eq!(
            parse_scene_name("20180124T194759_dmi").unwrap().scene_id,
            r.scene_id
        );
        let cis = "S1B_EW_GRDM_1SDH_20190430T101830_20190430T101930_027018_030AD3_9C47_icechart_cis_SGRDIEA_20190430T1020Z_pl_a.nc";
        assert_eq!(
            parse_scene_name(cis).unwrap().scene_id,
            "20190430T101830_cis"
        );
        assert_eq!(parse_scene_name("scene.nc"), None);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp_micros("19700101T000000"), Some(0));
        // 2018-01-24T19:47:59Z = 1516823279 s.
        assert_eq!(
            timestamp_micros("20180124T194759"),
            Some(1_516_823_279_000_000)
        );
        assert_eq!(timestamp_micros("20181324T194759"), None);
    }
}
