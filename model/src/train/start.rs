//! The record of each start (or resumption) of a run: when, which icefm, where and how it was
//! started, and the exact data it read, by the hashes of the store's manifests and of the
//! regimes' scene lists (a store re-ingested or a regime redrawn under the same name shows as
//! another hash). `log.txt` gets it as two lines, `starts.jsonl` as one JSON object per start,
//! which `icefm inspect RUN` and `icefm eval` (its default store) read back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::DeviceLocation;
use icefm_dataset::regime::{Regime, TrainingScenes};
use icefm_dataset::table::manifests_hash;
use icefm_schemas::calendar;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;

use super::{RunOptions, TrainError, io_err};

/// The run folder's file of start records, one JSON object per line.
pub const STARTS_FILE: &str = "starts.jsonl";

/// A regime a run read at its start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegimeRead {
    /// The configuration key naming it (`data.regime`, `seg.val_regime`).
    pub key: String,
    /// Its name in the store.
    pub name: String,
    /// Its number of scenes; none when it could not be read.
    pub scenes: Option<usize>,
    /// BLAKE3 (hex) of its scene list ([`Regime::scenes_hash`]).
    pub blake3: Option<String>,
}

/// One start of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStart {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
    /// icefm's version.
    pub icefm: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The command line, each argument as given.
    pub command: Vec<String>,
    /// The store, as an absolute path where it resolves.
    pub store: PathBuf,
    /// BLAKE3 (hex) of the store's manifests ([`manifests_hash`]); none when unread.
    pub manifests_blake3: Option<String>,
    /// The regimes read (none: every scene of the store).
    pub regimes: Vec<RegimeRead>,
    /// The scenes the run trains on from this start, by id
    /// ([`icefm_dataset::regime::training_scenes`]); absent in records older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_scenes: Option<Vec<String>>,
    /// What `trained_scenes` are, in words (the regime, or every scene less the held-out ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_on: Option<String>,
    /// The kind of run: [`MAE_RUN`] or [`FINE_TUNING_RUN`] (absent in older records). A
    /// `config.toml` cut just before its `[seg]` section reads as an MAE configuration; this
    /// tells it from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The ranks of a data-parallel start (absent for one process); the record is rank 0's,
    /// its command rank 0's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
    /// How the store's levels resample HH and HV, when not by area means (`bilinear`, a store
    /// of `ingest --sar-resample bilinear`): `icefm predict` makes its levels the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sar_resample: Option<String>,
}

/// [`RunStart::kind`] of MAE pre-training.
pub const MAE_RUN: &str = "mae";
/// [`RunStart::kind`] of fine-tuning.
pub const FINE_TUNING_RUN: &str = "fine-tuning";

fn short(h: &str) -> String {
    h.chars().take(16).collect()
}

/// This machine's name (Linux, else `$HOSTNAME`), for the records of who runs a run.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unnamed host".to_string())
}

impl RunStart {
    /// This process's start of a run of `cfg` with `opts`.
    pub(crate) fn now(cfg: &TrainConfig, opts: &RunOptions, trained: &TrainingScenes) -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let host = host_name();
        let device = match opts.device.location() {
            DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            DeviceLocation::Cpu => "cpu".to_string(),
            other => format!("{other:?}"),
        };
        let named = [("data.regime", cfg.data.regime.as_str())]
            .into_iter()
            .chain(
                cfg.seg
                    .as_ref()
                    .map(|s| ("seg.val_regime", s.val_regime.as_str())),
            );
        let regimes = named
            .filter(|(_, n)| !n.is_empty())
            .map(|(key, name)| {
                let r = Regime::open(Some(&opts.store), name).ok();
                RegimeRead {
                    key: key.to_string(),
                    name: name.to_string(),
                    scenes: r.as_ref().map(|r| r.scenes.len()),
                    blake3: r.as_ref().map(Regime::scenes_hash),
                }
            })
            .collect();
        Self {
            time: calendar::utc_stamp(secs),
            icefm: env!("CARGO_PKG_VERSION").to_string(),
            host,
            pid: std::process::id(),
            device,
            command: std::env::args().collect(),
            store: std::fs::canonicalize(&opts.store).unwrap_or_else(|_| opts.store.clone()),
            manifests_blake3: manifests_hash(&opts.store).ok(),
            regimes,
            trained_scenes: Some(trained.regime.scenes.clone()),
            trained_on: Some(trained.describe()),
            kind: Some(
                if cfg.is_seg() {
                    FINE_TUNING_RUN
                } else {
                    MAE_RUN
                }
                .to_string(),
            ),
            ranks: None,
            sar_resample: icefm_dataset::store::read_attrs(&opts.store)
                .ok()
                .map(|a| a.sar_resample)
                .filter(|m| !m.is_area())
                .map(|m| m.name().to_string()),
        }
    }

    /// The two lines `log.txt` gets.
    pub fn log_lines(&self) -> [String; 2] {
        let command: Vec<String> = self
            .command
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                    format!("'{}'", a.replace('\'', r"'\''"))
                } else {
                    a.clone()
                }
            })
            .collect();
        let mut regimes: Vec<String> = self
            .regimes
            .iter()
            .map(|r| match (r.scenes, &r.blake3) {
                (Some(n), Some(h)) => format!(
                    "{} {}: {n} scene{}, BLAKE3 {}",
                    r.key,
                    r.name,
                    if n == 1 { "" } else { "s" },
                    short(h)
                ),
                _ => format!("{} {}: unread", r.key, r.name),
            })
            .collect();
        if !self.regimes.iter().any(|r| r.key == "data.regime") {
            regimes.insert(
                0,
                format!(
                    "data.regime: {}",
                    self.trained_on.as_deref().unwrap_or("every scene")
                ),
            );
        }
        [
            format!(
                "{} icefm {} on {} (pid {}, device {}{}): {}",
                self.time,
                self.icefm,
                self.host,
                self.pid,
                self.device,
                self.ranks.map_or(String::new(), |w| format!(
                    ", rank 0 of {w} data-parallel ranks"
                )),
                command.join(" ")
            ),
            format!(
                "  store {}, manifests BLAKE3 {}; {}",
                self.store.display(),
                self.manifests_blake3
                    .as_deref()
                    .map_or("unread".to_string(), short),
                regimes.join("; ")
            ),
        ]
    }

    /// Append this start to `run`'s [`STARTS_FILE`].
    pub(crate) fn record(&self, run: &Path) -> Result<(), TrainError> {
        let path = run.join(STARTS_FILE);
        let line = serde_json::to_string(self).map_err(|e| io_err(&path, e))?;
        // A last line cut short (a crash, a full disk) is ended first, so that this record is a
        // line of its own and not lost with it.
        let cut = std::fs::read(&path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n'));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                if cut {
                    writeln!(f)?;
                }
                writeln!(f, "{line}")
            })
            .map_err(|e| io_err(&path, e))
    }
}

/// How the store of `run`'s last start resampled HH and HV ([`RunStart::sar_resample`]; area
/// means for runs that record none). An error for a mode this icefm does not know.
pub fn run_sar_resample(run: &Path) -> Result<icefm_schemas::store::SarResample, String> {
    run_starts(run)
        .pop()
        .and_then(|s| s.sar_resample)
        .map_or(Ok(Default::default()), |m| m.parse())
}

/// The starts recorded in a run folder, oldest first (none for runs older than the record;
/// a line that does not parse is skipped).
pub fn run_starts(run: &Path) -> Vec<RunStart> {
    std::fs::read_to_string(run.join(STARTS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
