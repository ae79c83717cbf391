//! SIGRID-3 polygon codes and their conversion to SIC / SOD / FLOE classes.
//!
//! The tables and the per-polygon algorithm follow the AI4Arctic toolbox
//! (`reference/ai4arctic.md` §2), with two deliberate differences:
//! a code that is in no table becomes [`IGNORE`] and is reported (the toolbox passes it through),
//! and equal partials are summed ([`MergeMode::Sum`]); [`MergeMode::ToolboxAssign`] reproduces the
//! toolbox's assignment for exact parity.

use std::fmt;

use crate::classes::IGNORE;

/// Threshold on `partial / total` for SOD and FLOE (the toolbox uses 0.65 for both).
pub const DOMINANCE_THRESHOLD: f64 = 0.65;

/// The 15 field names of a `polygon_codes` row, in file order.
pub const FIELDS: [&str; 15] = [
    "poly_id",
    "CT",
    "CA",
    "SA",
    "FA",
    "CB",
    "SB",
    "FB",
    "CC",
    "SC",
    "FC",
    "CN",
    "CD",
    "CF",
    "POLY_TYPE",
];

/// Concentration code (CT, CA, CB, CC) → SIC class (k means k × 10 %).
/// `Some(IGNORE)` for the known "unknown" code 99; `None` for a code in no table.
pub fn concentration_class(code: i32) -> Option<u8> {
    match code {
        0 | 1 | 2 | 55 => Some(0),
        10 | 20 | 30 | 40 | 50 | 60 | 70 | 80 | 90 => Some((code / 10) as u8),
        91 | 92 => Some(10),
        99 => Some(IGNORE),
        _ => None,
    }
}

/// Stage-of-development code (SA, SB, SC) → SOD class; `None` for a code in no table.
pub fn stage_class(code: i32) -> Option<u8> {
    match code {
        0 | 80 => Some(0),
        81 | 82 => Some(1),
        83..=85 => Some(2),
        87..=89 => Some(3),
        86 | 91 | 93 => Some(4),
        95..=97 => Some(5),
        98 | 99 => Some(IGNORE),
        _ => None,
    }
}

/// Form code (FA, FB, FC) → FLOE class; `None` for a code in no table.
pub fn form_class(code: i32) -> Option<u8> {
    match code {
        0 => Some(0),
        2 => Some(1),
        3 => Some(2),
        4 => Some(3),
        5 => Some(4),
        6 | 7 => Some(5),
        9 | 10 => Some(6),
        1 | 8 | 21 | 22 | 99 => Some(IGNORE),
        _ => None,
    }
}

/// How partials of equal class are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeMode {
    /// Add the merged partials (A = B = C puts CA + CB + CC in A).
    #[default]
    Sum,
    /// The toolbox's behaviour: each pair assigns `first = original first + second`, so with
    /// A = B = C position A ends with CA + CC only.
    ToolboxAssign,
}

/// Polygon type: ice or water.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolyType {
    /// `I`
    Ice,
    /// `W`
    Water,
}

/// One parsed `polygon_codes` row. Numeric fields are `None` where the file says `-9`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolygonCode {
    /// Polygon id, as used in `polygon_icechart`.
    pub poly_id: i64,
    /// Total concentration.
    pub ct: Option<i32>,
    /// Partial concentrations A, B, C.
    pub c: [Option<i32>; 3],
    /// Stages A, B, C.
    pub s: [Option<i32>; 3],
    /// Forms A, B, C.
    pub f: [Option<i32>; 3],
    /// The row's fields exactly as read (trimmed), in [`FIELDS`] order.
    pub raw: [String; 15],
    /// `I` or `W`.
    pub poly_type: PolyType,
}

/// Why a code row could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeRowError {
    /// The row does not have 15 `;`-separated fields.
    #[error("expected 15 ';'-separated fields, found {found} in {row:?}")]
    FieldCount {
        /// Fields found.
        found: usize,
        /// The row.
        row: String,
    },
    /// A numeric field is not a number.
    #[error("field {field} = {value:?} is not a number in {row:?}")]
    NotNumeric {
        /// Field name.
        field: &'static str,
        /// Its text.
        value: String,
        /// The row.
        row: String,
    },
    /// POLY_TYPE is neither `I` nor `W`.
    #[error("POLY_TYPE = {value:?} is neither I nor W in {row:?}")]
    PolyType {
        /// Its text.
        value: String,
        /// The row.
        row: String,
    },
}

fn parse_field(field: &'static str, text: &str, row: &str) -> Result<Option<i32>, CodeRowError> {
    let t = text.trim();
    let v: i32 = t.parse().map_err(|_| CodeRowError::NotNumeric {
        field,
        value: t.to_string(),
        row: row.to_string(),
    })?;
    Ok(if v == -9 { None } else { Some(v) })
}

impl PolygonCode {
    /// Parse one row (`26;91;-9;93;08;-9;-9;-9;-9;-9;-9;-9;-9;08-9;I`). Fields may be zero- or
    /// space-padded; `-9` means not filled.
    pub fn parse(row: &str) -> Result<Self, CodeRowError> {
        let row_trim = row.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        let parts: Vec<&str> = row_trim.split(';').collect();
        if parts.len() != 15 {
            return Err(CodeRowError::FieldCount {
                found: parts.len(),
                row: row_trim.to_string(),
            });
        }
        let raw: [String; 15] = std::array::from_fn(|i| parts[i].trim().to_string());
        let num = |i: usize| parse_field(FIELDS[i], parts[i], row_trim);
        let poly_id = raw[0]
            .parse::<i64>()
            .map_err(|_| CodeRowError::NotNumeric {
                field: "poly_id",
                value: raw[0].clone(),
                row: row_trim.to_string(),
            })?;
        let poly_type = match raw[14].as_str() {
            "I" | "i" => PolyType::Ice,
            "W" | "w" => PolyType::Water,
            other => {
                return Err(CodeRowError::PolyType {
                    value: other.to_string(),
                    row: row_trim.to_string(),
                });
            }
        };
        Ok(Self {
            poly_id,
            ct: num(1)?,
            c: [num(2)?, num(5)?, num(8)?],
            s: [num(3)?, num(6)?, num(9)?],
            f: [num(4)?, num(7)?, num(10)?],
            raw,
            poly_type,
        })
    }

    /// Derive SIC, SOD and FLOE for this polygon.
    pub fn derive(&self, mode: MergeMode) -> DerivedLabels {
        derive(self, mode)
    }
}

/// A code found in no table, reported per scene.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCode {
    /// Field name (`CT`, `SA`, …).
    pub field: &'static str,
    /// The value.
    pub value: i32,
}

impl fmt::Display for UnknownCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.field, self.value)
    }
}

/// SIC, SOD, FLOE of one polygon, with the codes that were in no table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedLabels {
    /// SIC class 0–10 or [`IGNORE`].
    pub sic: u8,
    /// SOD class 0–5 or [`IGNORE`].
    pub sod: u8,
    /// FLOE class 0–6 or [`IGNORE`].
    pub floe: u8,
    /// Codes outside the tables (each made the affected task [`IGNORE`]).
    pub unknown: Vec<UnknownCode>,
}

const PARTIAL_NAMES: [[&str; 3]; 3] = [["CA", "CB", "CC"], ["SA", "SB", "SC"], ["FA", "FB", "FC"]];

fn derive(code: &PolygonCode, mode: MergeMode) -> DerivedLabels {
    let mut unknown = Vec::new();
    let mut lookup = |field: &'static str, v: Option<i32>, table: fn(i32) -> Option<u8>| {
        v.map(|v| {
            table(v).unwrap_or_else(|| {
                unknown.push(UnknownCode { field, value: v });
                IGNORE
            })
        })
    };
    // 1. SIC from CT; water polygons are open water whatever CT says.
    let ct_class = lookup("CT", code.ct, concentration_class);
    let mut partial_c: [Option<u8>; 3] =
        std::array::from_fn(|i| lookup(PARTIAL_NAMES[0][i], code.c[i], concentration_class));
    let stage: [Option<u8>; 3] =
        std::array::from_fn(|i| lookup(PARTIAL_NAMES[1][i], code.s[i], stage_class));
    let form: [Option<u8>; 3] =
        std::array::from_fn(|i| lookup(PARTIAL_NAMES[2][i], code.f[i], form_class));

    let sic = match code.poly_type {
        PolyType::Water => 0,
        PolyType::Ice => ct_class.unwrap_or(IGNORE),
    };
    if sic == 0 {
        return DerivedLabels {
            sic,
            sod: 0,
            floe: 0,
            unknown,
        };
    }
    if sic == IGNORE {
        return DerivedLabels {
            sic,
            sod: IGNORE,
            floe: IGNORE,
            unknown,
        };
    }
    // 2. A single-type polygon: CA := SIC.
    if partial_c[0].is_none() {
        partial_c[0] = Some(sic);
    }
    // A partial concentration that is unknown makes every ratio meaningless.
    let partials_known = partial_c.iter().flatten().all(|&c| c != IGNORE);
    let sod = if partials_known {
        dominant_class(sic, &partial_c, &stage, mode)
    } else {
        IGNORE
    };
    let any_form_ignored = form.iter().flatten().any(|&f| f == IGNORE);
    let floe = if partials_known && !any_form_ignored {
        dominant_class(sic, &partial_c, &form, mode)
    } else {
        IGNORE
    };
    DerivedLabels {
        sic,
        sod,
        floe,
        unknown,
    }
}

/// Steps 3–4: merge partials of equal class, take the largest (first wins ties), accept it if it
/// holds at least [`DOMINANCE_THRESHOLD`] of the total.
fn dominant_class(
    total: u8,
    partial_c: &[Option<u8>; 3],
    class: &[Option<u8>; 3],
    mode: MergeMode,
) -> u8 {
    let orig: [u32; 3] = std::array::from_fn(|i| partial_c[i].map_or(0, u32::from));
    let mut merged = orig;
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        let both = partial_c[a].is_some() && partial_c[b].is_some();
        if both && class[a].is_some() && class[a] == class[b] {
            merged[a] = match mode {
                MergeMode::Sum => merged[a] + merged[b],
                MergeMode::ToolboxAssign => orig[a] + orig[b],
            };
            merged[b] = 0;
        }
    }
    let mut best = 0;
    for i in 1..3 {
        if merged[i] > merged[best] {
            best = i;
        }
    }
    match class[best] {
        Some(c) if f64::from(merged[best]) / f64::from(total) >= DOMINANCE_THRESHOLD => c,
        _ => IGNORE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(s: &str) -> DerivedLabels {
        PolygonCode::parse(s).unwrap().derive(MergeMode::Sum)
    }

    /// The worked vectors of `reference/ai4arctic.md` §2 (toolbox output).
    #[test]
    fn worked_vectors() {
        let cases = [
            (
                "26;91;-9;93;08;-9;-9;-9;-9;-9;-9;-9;-9;08-9;I",
                (10, 4, 255),
            ),
            ("28;90;-9;93;07;-9;-9;-9;-9;-9;-9;-9;-9;07-9;I", (9, 4, 5)),
            (
                "29;92;30;95;05;70;93;08;-9;-9;-9;-9;-9;08-9;I",
                (10, 4, 255),
            ),
            ("31;20;-9;93;05;-9;-9;-9;-9;-9;-9;-9;-9;05-9;I", (2, 4, 4)),
            ("46;91;90;95;06;10;93;06;-9;-9;-9;-9;-9;06-9;I", (10, 5, 5)),
            ("47;80;20;95;06;60;93;06;-9;-9;-9;-9;-9;06-9;I", (8, 4, 5)),
            ("69;10;-9;95;-9;-9;-9;-9;-9;-9;-9;-9;-9;-9;I", (1, 5, 255)),
            ("75;30;20;95;06;10;93;06;-9;-9;-9;-9;-9;06-9;I", (3, 5, 5)),
            ("76;02;-9;98;10;-9;-9;-9;-9;-9;-9;-9;-9;10-9;W", (0, 0, 0)),
        ];
        for (s, (sic, sod, floe)) in cases {
            let d = row(s);
            assert_eq!((d.sic, d.sod, d.floe), (sic, sod, floe), "{s}");
            assert!(d.unknown.is_empty(), "{s}");
        }
    }

    #[test]
    fn dominance_threshold() {
        // 5/9 < 0.65 → SOD ignored.
        let d = row("1;90;50;87;-9;40;93;-9;-9;-9;-9;-9;-9;-9;I");
        assert_eq!((d.sic, d.sod), (9, 255));
        // Three young-ice stages merge to 9/9.
        let d = row("2;90;40;83;-9;30;84;-9;20;85;-9;-9;-9;-9;I");
        assert_eq!((d.sic, d.sod), (9, 2));
    }

    #[test]
    fn toolbox_assign_parity() {
        // A = B = C: the toolbox leaves A = CA + CC (6 of 9), we sum to 9 of 9; both pass 0.65.
        let c = PolygonCode::parse("2;90;40;83;-9;30;84;-9;20;85;-9;-9;-9;-9;I").unwrap();
        assert_eq!(c.derive(MergeMode::ToolboxAssign).sod, 2);
        // Each toolbox pair assigns from the originals: A = CA + CC and B = CB + CC. With 4 + 4 + 1
        // of 9 that is 5/9 < 0.65 → 255, where summing gives 9/9 → thin first-year ice.
        let c = PolygonCode::parse("3;90;40;87;-9;40;88;-9;10;89;-9;-9;-9;-9;I").unwrap();
        assert_eq!(c.derive(MergeMode::ToolboxAssign).sod, 255);
        assert_eq!(c.derive(MergeMode::Sum).sod, 3);
    }

    #[test]
    fn unknown_codes_are_ignored_and_reported() {
        // Range code 12 is in no concentration table.
        let d = row("5;12;-9;93;05;-9;-9;-9;-9;-9;-9;-9;-9;-9;I");
        assert_eq!((d.sic, d.sod, d.floe), (255, 255, 255));
        assert_eq!(
            d.unknown,
            vec![UnknownCode {
                field: "CT",
                value: 12
            }]
        );
        // Stage 90 is in no stage table: SOD ignored, SIC kept, FLOE from the form.
        let d = row("6;91;-9;90;05;-9;-9;-9;-9;-9;-9;-9;-9;-9;I");
        assert_eq!((d.sic, d.sod, d.floe), (10, 255, 4));
        assert_eq!(
            d.unknown,
            vec![UnknownCode {
                field: "SA",
                value: 90
            }]
        );
        // Unknown concentration 99 is a known code: ignored, not reported.
        let d = row("7;99;-9;93;05;-9;-9;-9;-9;-9;-9;-9;-9;-9;I");
        assert_eq!((d.sic, d.sod, d.floe), (255, 255, 255));
        assert!(d.unknown.is_empty());
    }

    #[test]
    fn padding_and_bad_rows() {
        let c =
            PolygonCode::parse(" 26; 91; -9; 93; 08;-9;-9;-9;-9;-9;-9;-9;-9;08-9; I\0\0").unwrap();
        assert_eq!(
            (c.poly_id, c.ct, c.s[0], c.f[0]),
            (26, Some(91), Some(93), Some(8))
        );
        assert_eq!(c.raw[13], "08-9");
        assert!(matches!(
            PolygonCode::parse("26;91;-9;93"),
            Err(CodeRowError::FieldCount { found: 4, .. })
        ));
        assert!(matches!(
            PolygonCode::parse("26;9x;-9;93;08;-9;-9;-9;-9;-9;-9;-9;-9;08-9;I"),
            Err(CodeRowError::NotNumeric { field: "CT", .. })
        ));
        assert!(matches!(
            PolygonCode::parse("26;91;-9;93;08;-9;-9;-9;-9;-9;-9;-9;-9;08-9;X"),
            Err(CodeRowError::PolyType { .. })
        ));
    }
}
