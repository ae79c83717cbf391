//! Decoding of a variable's stored values: `_FillValue` / `missing_value`, `scale_factor` /
//! `add_offset`, RTT's standard scaling; attribute readers.

use icefm_schemas::norm::mean_std;
use netcdf::{AttributeValue, Variable};

/// Decoding of one variable: fill values, then scale and offset, then (RTT) standard scaling.
#[derive(Debug, Clone, Copy)]
pub(super) struct Decode {
    pub(super) fill: Option<f64>,
    pub(super) missing: Option<f64>,
    pub(super) scale: f64,
    pub(super) offset: f64,
    /// RTT: `0.0` is invalid, then `x * std + mean`.
    pub(super) unscale: Option<(f64, f64)>,
}

pub(super) fn attr_f64(var: &Variable<'_>, name: &str) -> Option<f64> {
    match var.attribute_value(name)?.ok()? {
        AttributeValue::Uchar(v) => Some(f64::from(v)),
        AttributeValue::Schar(v) => Some(f64::from(v)),
        AttributeValue::Ushort(v) => Some(f64::from(v)),
        AttributeValue::Short(v) => Some(f64::from(v)),
        AttributeValue::Uint(v) => Some(f64::from(v)),
        AttributeValue::Int(v) => Some(f64::from(v)),
        AttributeValue::Ulonglong(v) => Some(v as f64),
        AttributeValue::Longlong(v) => Some(v as f64),
        AttributeValue::Float(v) => Some(f64::from(v)),
        AttributeValue::Double(v) => Some(v),
        AttributeValue::Floats(v) => v.first().map(|&x| f64::from(x)),
        AttributeValue::Doubles(v) => v.first().copied(),
        AttributeValue::Shorts(v) => v.first().map(|&x| f64::from(x)),
        AttributeValue::Ints(v) => v.first().map(|&x| f64::from(x)),
        AttributeValue::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn global_str(file: &netcdf::File, name: &str) -> Option<String> {
    match file.attribute(name)?.value().ok()? {
        AttributeValue::Str(s) => Some(s),
        AttributeValue::Strs(v) => v.into_iter().next(),
        other => Some(format!("{other:?}")),
    }
}

pub(super) fn global_f64(file: &netcdf::File, name: &str) -> Option<f64> {
    match file.attribute(name)?.value().ok()? {
        AttributeValue::Str(s) => s.trim().trim_end_matches('m').trim().parse().ok(),
        AttributeValue::Double(v) => Some(v),
        AttributeValue::Float(v) => Some(f64::from(v)),
        AttributeValue::Int(v) => Some(f64::from(v)),
        AttributeValue::Short(v) => Some(f64::from(v)),
        AttributeValue::Longlong(v) => Some(v as f64),
        AttributeValue::Uint(v) => Some(f64::from(v)),
        _ => None,
    }
}

impl Decode {
    pub(super) fn of(var: &Variable<'_>, rtt_scaled: bool) -> Self {
        let unscale = if rtt_scaled {
            mean_std(&var.name()).map(|m| (m.mean, m.std))
        } else {
            None
        };
        Self {
            fill: attr_f64(var, "_FillValue"),
            missing: attr_f64(var, "missing_value"),
            scale: attr_f64(var, "scale_factor").unwrap_or(1.0),
            offset: attr_f64(var, "add_offset").unwrap_or(0.0),
            unscale,
        }
    }

    pub(super) fn apply(&self, raw: f32) -> f32 {
        self.apply_f64(f64::from(raw)) as f32
    }

    pub(super) fn apply_f64(&self, x: f64) -> f64 {
        if self.fill.is_some_and(|f| x == f) || self.missing.is_some_and(|m| x == m) {
            return f64::NAN;
        }
        let v = x * self.scale + self.offset;
        match self.unscale {
            Some(_) if v == 0.0 => f64::NAN,
            Some((mean, std)) => v * std + mean,
            None => v,
        }
    }

    pub(super) fn is_identity(&self) -> bool {
        self.fill.is_none()
            && self.missing.is_none()
            && self.scale == 1.0
            && self.offset == 0.0
            && self.unscale.is_none()
    }
}
