//! The ice chart: polygon kinds, their SIGRID-3 code rows, and what each polygon's surface
//! looks like to the radar (which may differ from the chart where the chart says "unknown").

use icefm_schemas::sigrid::{MergeMode, PolygonCode};

use crate::options::Service;
use crate::rng::{Noise2, SplitMix64, field_quantile};

/// Header row of `polygon_codes`.
pub(crate) const CODES_HEADER: &str = "poly_id;CT;CA;SA;FA;CB;SB;FB;CC;SC;FC;CN;CD;CF;POLY_TYPE";

/// Backscatter class of a surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Look {
    OpenWater,
    NewIce,
    YoungIce,
    ThinFirstYear,
    ThickFirstYear,
    OldIce,
    Land,
}

impl Look {
    /// The look of a SIGRID stage-of-development code.
    fn of_stage(code: i32) -> Look {
        match code {
            81 | 82 => Look::NewIce,
            83..=85 => Look::YoungIce,
            87..=89 => Look::ThinFirstYear,
            86 | 91 | 93 => Look::ThickFirstYear,
            95..=97 => Look::OldIce,
            _ => Look::OpenWater,
        }
    }

    /// Mean (HH, HV) sigma0 in dB at 34° incidence. Open water is further modulated by wind.
    pub(crate) fn means_db(self) -> (f32, f32) {
        match self {
            Look::OpenWater => (-22.0, -30.0),
            Look::NewIce => (-24.0, -31.0),
            Look::YoungIce => (-13.0, -23.0),
            Look::ThinFirstYear => (-17.0, -26.0),
            Look::ThickFirstYear => (-15.0, -24.0),
            Look::OldIce => (-10.0, -20.0),
            Look::Land => (-9.0, -17.0),
        }
    }

    /// Amplitude (dB) of the within-class texture (ridges, rubble, topography).
    pub(crate) fn texture_db(self) -> f32 {
        match self {
            Look::OpenWater => 0.6,
            Look::NewIce => 1.0,
            Look::YoungIce => 2.0,
            Look::ThinFirstYear => 1.2,
            Look::ThickFirstYear => 1.5,
            Look::OldIce => 2.0,
            Look::Land => 3.5,
        }
    }
}

/// The five kinds of chart polygon every scene holds at least once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PolygonKind {
    Water,
    SingleStage,
    MultiStage,
    FastIce,
    Unknown,
}

/// Stage groups (youngest first) with their SIGRID stage codes and plausible form codes.
const STAGES: [(&[i32], &[i32]); 5] = [
    (&[81, 82], &[1, 2]),
    (&[83, 84, 85], &[2, 3, 4, 5]),
    (&[87, 88, 89], &[3, 4, 5, 6]),
    (&[86, 91, 93], &[4, 5, 6, 7]),
    (&[95, 96, 97], &[5, 6, 7]),
];
const STAGE_WEIGHTS: [f64; 5] = [0.12, 0.15, 0.2, 0.28, 0.25];
const OLD: usize = 4;

/// Texture wavelength in metres for a form code: the floe size class sets how coarse the
/// ice / water pattern is (small floes fine, vast floes coarse, fast ice nearly uniform).
fn texture_m(form: Option<i32>) -> f64 {
    match form {
        Some(1 | 2) => 80.0,
        Some(3) => 150.0,
        Some(4) => 400.0,
        Some(5) => 1_200.0,
        Some(6) => 3_500.0,
        Some(7) => 8_000.0,
        Some(8) => 20_000.0,
        Some(9 | 10) => 100.0,
        _ => 600.0,
    }
}

/// What the pixels of a polygon look like.
#[derive(Debug, Clone)]
pub(crate) struct Surface {
    /// Fraction of the polygon's area that is ice (`tenths / 10`).
    pub ice_fraction: f64,
    /// Ice where the ice field is below this (so a fraction `tenths / 10` is ice).
    pub ice_threshold: f32,
    /// Ice / water pattern scale, metres.
    pub texture_m: f64,
    /// Cumulative thresholds of the stage field splitting ice among the partials.
    pub stage_thresholds: [f32; 2],
    /// Looks of the partials (A, B, C); unused ones repeat A.
    pub looks: [Look; 3],
    /// Field thresholded into ice / water.
    pub ice_field: Noise2,
    /// Field thresholded into partials.
    pub stage_field: Noise2,
}

/// One polygon of the chart.
#[derive(Debug, Clone)]
pub(crate) struct Polygon {
    pub id: i64,
    pub kind: PolygonKind,
    /// Its `polygon_codes` row.
    pub row: String,
    /// SIC, SOD, FLOE derived from `row` ([`MergeMode::Sum`]).
    pub labels: [u8; 3],
    pub surface: Surface,
}

/// One partial concentration: tenths of ice of one stage and form.
#[derive(Debug, Clone, Copy)]
struct Partial {
    tenths: u8,
    stage: i32,
    form: Option<i32>,
}

fn code(v: Option<i32>, service: Service) -> String {
    match (v, service) {
        (None, _) => "-9".into(),
        // CIS rows space-pad single digits, DMI rows zero-pad: a reader must parse numerically.
        (Some(v), Service::Cis) => format!("{v:>2}"),
        (Some(v), Service::Dmi) => format!("{v:02}"),
    }
}

fn ct_code(tenths: u8, rng: &mut SplitMix64) -> i32 {
    if tenths >= 10 {
        rng.pick(&[91, 92])
    } else {
        i32::from(tenths) * 10
    }
}

fn draw_partial(group: usize, tenths: u8, rng: &mut SplitMix64) -> Partial {
    let (stages, forms) = STAGES[group];
    Partial {
        tenths,
        stage: rng.pick(stages),
        form: if rng.chance(0.1) {
            None
        } else {
            Some(rng.pick(forms))
        },
    }
}

/// Fields of one row before formatting.
struct Row {
    ct: Option<i32>,
    /// (CA, SA, FA), (CB, SB, FB), (CC, SC, FC); CA is `None` for single-type polygons.
    partials: [(Option<i32>, Option<i32>, Option<i32>); 3],
    water: bool,
}

impl Row {
    fn format(&self, id: i64, service: Service) -> String {
        let mut f = vec![id.to_string(), code(self.ct, service)];
        for (c, s, fm) in self.partials {
            f.extend([code(c, service), code(s, service), code(fm, service)]);
        }
        f.extend(["-9".into(), "-9".into()]);
        f.push(match self.partials[0].2 {
            Some(fa) => format!("{fa:02}-9"),
            None => "-9".into(),
        });
        f.push(if self.water { "W" } else { "I" }.into());
        f.join(";")
    }
}

/// Draw a polygon of `kind`. `old_ice` forces a single-stage polygon of (nearly) full old ice,
/// so every scene has the open water / old ice contrast the learnability tests rely on.
pub(crate) fn draw_polygon(
    id: i64,
    kind: PolygonKind,
    old_ice: bool,
    service: Service,
    rng: &mut SplitMix64,
) -> Polygon {
    let none3 = (None, None, None);
    let (row, partials): (Row, Vec<Partial>) = match kind {
        PolygonKind::Water => {
            let variant = rng.below(3);
            let row = Row {
                ct: Some(if variant == 0 { 1 } else { 2 }),
                // The real example `76;02;-9;98;10;…;10-9;W` fills SA and FA of a water polygon.
                partials: if variant == 1 {
                    [(None, Some(98), Some(10)), none3, none3]
                } else {
                    [none3; 3]
                },
                water: true,
            };
            // "Open water" (02) may hold a trace of new ice.
            let trace = if variant == 0 { 0 } else { 1 };
            (
                row,
                vec![Partial {
                    tenths: trace,
                    stage: 81,
                    form: None,
                }],
            )
        }
        PolygonKind::SingleStage => {
            let (tenths, group) = if old_ice {
                (rng.pick(&[9, 10, 10]), OLD)
            } else {
                let t = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
                    [rng.weighted(&[0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.2, 0.4])];
                (t, rng.weighted(&STAGE_WEIGHTS))
            };
            let mut p = draw_partial(group, tenths, rng);
            if old_ice {
                p.form = Some(rng.pick(&[5, 6, 7]));
            }
            let row = Row {
                ct: Some(ct_code(tenths, rng)),
                partials: [(None, Some(p.stage), p.form), none3, none3],
                water: false,
            };
            (row, vec![p])
        }
        PolygonKind::MultiStage => {
            let n = if rng.chance(0.4) { 3 } else { 2 };
            let total = [3u8, 4, 5, 6, 7, 8, 9, 10]
                [rng.weighted(&[0.03, 0.04, 0.05, 0.08, 0.1, 0.2, 0.2, 0.3])];
            // n distinct stage groups, oldest first (SIGRID orders partials by thickness).
            let mut groups: Vec<usize> = Vec::new();
            while groups.len() < n {
                let g = rng.weighted(&STAGE_WEIGHTS);
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            groups.sort_unstable_by(|a, b| b.cmp(a));
            // Split `total` tenths into n positive parts.
            let mut cuts: Vec<u8> = Vec::new();
            while cuts.len() < n - 1 {
                let c = 1 + rng.below(u64::from(total) - 1) as u8;
                if !cuts.contains(&c) {
                    cuts.push(c);
                }
            }
            cuts.sort_unstable();
            cuts.insert(0, 0);
            cuts.push(total);
            let parts: Vec<Partial> = groups
                .iter()
                .enumerate()
                .map(|(i, &g)| draw_partial(g, cuts[i + 1] - cuts[i], rng))
                .collect();
            let mut fields = [none3; 3];
            for (f, p) in fields.iter_mut().zip(&parts) {
                *f = (Some(i32::from(p.tenths) * 10), Some(p.stage), p.form);
            }
            let row = Row {
                ct: Some(ct_code(total, rng)),
                partials: fields,
                water: false,
            };
            (row, parts)
        }
        PolygonKind::FastIce => {
            let stage = rng.pick(&[93, 93, 91, 87, 95]);
            let row = Row {
                ct: Some(92),
                partials: [(None, Some(stage), Some(8)), none3, none3],
                water: false,
            };
            (
                row,
                vec![Partial {
                    tenths: 10,
                    stage,
                    form: Some(8),
                }],
            )
        }
        PolygonKind::Unknown => {
            let row = Row {
                ct: Some(99),
                partials: if rng.chance(0.5) {
                    [(None, Some(99), Some(99)), none3, none3]
                } else {
                    [none3; 3]
                },
                water: false,
            };
            // The analyst could not tell; the radar still sees something.
            let tenths = 3 + rng.below(8) as u8;
            let group = rng.weighted(&STAGE_WEIGHTS);
            (row, vec![draw_partial(group, tenths, rng)])
        }
    };
    let row = row.format(id, service);
    let labels = PolygonCode::parse(&row)
        .map(|c| {
            let d = c.derive(MergeMode::Sum);
            [d.sic, d.sod, d.floe]
        })
        .unwrap_or([icefm_schemas::IGNORE; 3]);
    Polygon {
        id,
        kind,
        row,
        labels,
        surface: surface(&partials, rng),
    }
}

fn surface(partials: &[Partial], rng: &mut SplitMix64) -> Surface {
    let ice: u8 = partials.iter().map(|p| p.tenths).sum();
    let dominant = partials
        .iter()
        .max_by_key(|p| p.tenths)
        .copied()
        .unwrap_or(Partial {
            tenths: 0,
            stage: 0,
            form: None,
        });
    let mut looks = [Look::of_stage(dominant.stage); 3];
    for (l, p) in looks.iter_mut().zip(partials) {
        *l = Look::of_stage(p.stage);
    }
    // Cumulative share of each partial within the ice.
    let mut thresholds = [f32::INFINITY; 2];
    if ice > 0 {
        let mut cum = 0.0;
        for (t, p) in thresholds.iter_mut().zip(partials) {
            cum += f64::from(p.tenths) / f64::from(ice);
            *t = if cum >= 1.0 {
                f32::INFINITY
            } else {
                field_quantile(cum)
            };
        }
    }
    Surface {
        ice_fraction: f64::from(ice.min(10)) / 10.0,
        ice_threshold: field_quantile(f64::from(ice.min(10)) / 10.0),
        texture_m: texture_m(dominant.form),
        stage_thresholds: thresholds,
        looks,
        ice_field: Noise2::new(rng.next_u64()),
        stage_field: Noise2::new(rng.next_u64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_and_derives_as_intended() {
        for service in [Service::Dmi, Service::Cis] {
            let mut rng = SplitMix64::new(9);
            for i in 0..400 {
                let kind = [
                    PolygonKind::Water,
                    PolygonKind::SingleStage,
                    PolygonKind::MultiStage,
                    PolygonKind::FastIce,
                    PolygonKind::Unknown,
                ][i % 5];
                let p = draw_polygon(i as i64 + 3, kind, i % 10 == 1, service, &mut rng);
                let code = PolygonCode::parse(&p.row).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(code.poly_id, i as i64 + 3);
                let d = code.derive(MergeMode::Sum);
                assert!(d.unknown.is_empty(), "{}", p.row);
                let [sic, sod, floe] = p.labels;
                match kind {
                    PolygonKind::Water => assert_eq!([sic, sod, floe], [0, 0, 0]),
                    PolygonKind::SingleStage => {
                        assert!((1..=10).contains(&sic));
                        assert!(code.c[0].is_none() && code.s[0].is_some());
                        assert_ne!(sod, 255, "{}", p.row);
                        if i % 10 == 1 {
                            assert_eq!(sod, 5);
                            assert!(sic >= 9);
                        }
                    }
                    PolygonKind::MultiStage => {
                        assert!(code.c[0].is_some() && code.c[1].is_some());
                        let sum: i32 = code.c.iter().flatten().sum();
                        assert_eq!(sum, i32::from(sic) * 10, "{}", p.row);
                    }
                    PolygonKind::FastIce => {
                        assert_eq!(code.f[0], Some(8));
                        assert_eq!((sic, floe), (10, 255));
                    }
                    PolygonKind::Unknown => assert_eq!([sic, sod, floe], [255; 3]),
                }
            }
        }
    }

    #[test]
    fn services_pad_codes_differently() {
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        let dmi = draw_polygon(7, PolygonKind::FastIce, false, Service::Dmi, &mut a);
        let cis = draw_polygon(7, PolygonKind::FastIce, false, Service::Cis, &mut b);
        assert!(dmi.row.contains(";08;"), "{}", dmi.row);
        assert!(cis.row.contains("; 8;"), "{}", cis.row);
        assert_eq!(dmi.labels, cis.labels);
        assert_eq!(CODES_HEADER.split(';').count(), 15);
    }
}
