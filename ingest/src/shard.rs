//! Sharded ingest: N processes (a Slurm array, or any launcher) each ingest one share of the
//! inputs into one store on a shared file system.
//!
//! Shard `K` of `N` takes the inputs whose position in the list sorted by file name is `K`
//! modulo `N`: the shares are disjoint, cover every input, differ in size by at most one, and do
//! not depend on the order or the directories the inputs were given in. Each shard writes its
//! scenes' parts as an unsharded run does; at its end it writes a record,
//! `manifests/shards/<K>-of-<N>.json` (its inputs, what it did, what failed), and the shard
//! that finds all `N` records of its run present rebuilds the merged manifests.
//! `icefm manifest merge` does the same on demand and names the shards that have not finished.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use icefm_schemas::store::SHARDS_DIR;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::file_name;
use crate::manifest::temporary_path;

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0 ≤ index < count`.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Parse `K/N` (0 ≤ K < N).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard {s}: expected K/N with 0 <= K < N (e.g. 0/8), or `slurm`");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// The shard of a Slurm array task: `K = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`,
    /// `N = SLURM_ARRAY_TASK_COUNT`. The array must be a contiguous range (`--array=0-15` or
    /// `1-16`, any `%` limit); `var` reads one environment variable.
    pub fn from_slurm(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let get = |name: &str| -> Result<usize, String> {
            let v = var(name).ok_or_else(|| {
                format!("--shard slurm: {name} is not set (is this a Slurm array task?)")
            })?;
            v.trim()
                .parse()
                .map_err(|_| format!("--shard slurm: {name}={v} is not a number"))
        };
        let (id, min, max, count) = (
            get("SLURM_ARRAY_TASK_ID")?,
            get("SLURM_ARRAY_TASK_MIN")?,
            get("SLURM_ARRAY_TASK_MAX")?,
            get("SLURM_ARRAY_TASK_COUNT")?,
        );
        if max < min || max - min + 1 != count {
            return Err(format!(
                "--shard slurm: the array {min}-{max} has {count} tasks, not one per index; \
                 use a contiguous --array range (e.g. 0-{}) or --shard K/N",
                count.saturating_sub(1)
            ));
        }
        if id < min || id > max {
            return Err(format!(
                "--shard slurm: SLURM_ARRAY_TASK_ID={id} is outside the array {min}-{max}"
            ));
        }
        Ok(Self {
            index: id - min,
            count,
        })
    }

    /// This shard's inputs out of all of them, and the plan its record will carry. Two inputs
    /// with one file name are refused: shards on two hosts could write that scene at once.
    pub fn plan(&self, all: &[PathBuf]) -> Result<(Vec<PathBuf>, ShardPlan), String> {
        let mut sorted: Vec<&PathBuf> = all.iter().collect();
        sorted.sort_by(|a, b| file_name(a).cmp(&file_name(b)).then_with(|| a.cmp(b)));
        if let Some(w) = sorted
            .windows(2)
            .find(|w| file_name(w[0]) == file_name(w[1]))
        {
            return Err(format!(
                "{} is given twice ({} and {}); a sharded ingest takes each file once",
                file_name(w[0]),
                w[0].display(),
                w[1].display()
            ));
        }
        let mut hasher = blake3::Hasher::new();
        for p in &sorted {
            hasher.update(file_name(p).as_bytes());
            hasher.update(b"\n");
        }
        let mine = sorted
            .iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, p)| (*p).clone())
            .collect();
        Ok((
            mine,
            ShardPlan {
                shard: *self,
                total: all.len(),
                digest: hasher.finalize().to_hex()[..16].to_string(),
            },
        ))
    }
}

/// What a sharded run knows about the run as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// This shard.
    pub shard: Shard,
    /// Inputs of all shards together.
    pub total: usize,
    /// Digest of all shards' input file names (sorted): shards of one run share it.
    pub digest: String,
}

/// `manifests/shards/<K>-of-<N>.json`: what one shard did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// K.
    pub shard: usize,
    /// N.
    pub of: usize,
    /// Digest of all shards' input file names.
    pub inputs_digest: String,
    /// Inputs of all shards together.
    pub inputs_total: usize,
    /// This shard's input file names.
    pub assigned: Vec<String>,
    /// Scene ids ingested.
    pub done: Vec<String>,
    /// Scene ids skipped as already complete.
    pub skipped: Vec<String>,
    /// Inputs that failed: file name, reason.
    pub failed: Vec<(String, String)>,
    /// Wall time of the shard's run in seconds.
    pub seconds: f64,
}

/// Path of shard `K` of `N`'s record.
pub fn record_path(store: &Path, shard: Shard) -> PathBuf {
    store
        .join(SHARDS_DIR)
        .join(format!("{}-of-{}.json", shard.index, shard.count))
}

/// Write a shard's record atomically (temporary file, fsync, rename).
pub fn write_record(store: &Path, record: &ShardRecord) -> Result<(), StoreError> {
    let path = record_path(
        store,
        Shard {
            index: record.shard,
            count: record.of,
        },
    );
    let dir = store.join(SHARDS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
    let text = serde_json::to_string_pretty(record).map_err(|e| StoreError::Incompatible {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let tmp = temporary_path(&path);
    std::fs::write(&tmp, text).map_err(|e| StoreError::io(&tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))
}

/// Remove a shard's record (its run starts again, so it has not finished).
pub fn remove_record(store: &Path, shard: Shard) -> Result<(), StoreError> {
    let path = record_path(store, shard);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(&path, e)),
    }
}

/// Every shard record of the store.
pub fn read_records(store: &Path) -> Result<Vec<ShardRecord>, StoreError> {
    let dir = store.join(SHARDS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| StoreError::io(&dir, e))?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| StoreError::io(&path, e))?;
        let record: ShardRecord =
            serde_json::from_str(&text).map_err(|e| StoreError::Incompatible {
                path: path.clone(),
                reason: format!("not a shard record ({e})"),
            })?;
        out.push(record);
    }
    out.sort_by_key(|r| (r.of, r.shard));
    Ok(out)
}

/// The shards of one sharded run found in the store (records sharing `N` and the digest).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRun {
    /// N.
    pub of: usize,
    /// Digest of the run's input file names.
    pub digest: String,
    /// Inputs of all shards together.
    pub inputs_total: usize,
    /// Shards with a record.
    pub finished: Vec<usize>,
    /// Shards without one: still running, never started, or stopped before their end.
    pub missing: Vec<usize>,
    /// Failed inputs of the finished shards: shard, file name, reason.
    pub failed: Vec<(usize, String, String)>,
}

impl ShardRun {
    /// Whether every shard has finished.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// The sharded runs whose records are in the store, by `N` then digest.
pub fn shard_runs(store: &Path) -> Result<Vec<ShardRun>, StoreError> {
    let mut runs: BTreeMap<(usize, String), ShardRun> = BTreeMap::new();
    for r in read_records(store)? {
        let run = runs
            .entry((r.of, r.inputs_digest.clone()))
            .or_insert_with(|| ShardRun {
                of: r.of,
                digest: r.inputs_digest.clone(),
                inputs_total: r.inputs_total,
                finished: Vec::new(),
                missing: Vec::new(),
                failed: Vec::new(),
            });
        run.finished.push(r.shard);
        run.failed.extend(
            r.failed
                .iter()
                .map(|(file, why)| (r.shard, file.clone(), why.clone())),
        );
    }
    let mut out: Vec<ShardRun> = runs.into_values().collect();
    for run in &mut out {
        run.finished.sort_unstable();
        run.missing = (0..run.of)
            .filter(|k| run.finished.binary_search(k).is_err())
            .collect();
    }
    Ok(out)
}

/// Shard indices as `0, 3, 5` (at most 20, then a count).
pub fn list_shards(shards: &[usize]) -> String {
    let mut s = shards
        .iter()
        .take(20)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if shards.len() > 20 {
        s.push_str(&format!(" and {} more", shards.len() - 20));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn parse_takes_k_of_n_and_refuses_the_rest() {
        assert_eq!(Shard::parse("3/8").unwrap(), Shard { index: 3, count: 8 });
        assert_eq!(Shard::parse("0/1").unwrap(), Shard { index: 0, count: 1 });
        for bad in ["8/8", "1/0", "3", "a/4", "-1/4", "2/x", ""] {
            let e = Shard::parse(bad).unwrap_err();
            assert!(e.contains("expected K/N"), "{bad}: {e}");
        }
    }

    fn slurm(vars: &[(&str, &str)]) -> Result<Shard, String> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Shard::from_slurm(|k| map.get(k).cloned())
    }

    #[test]
    fn slurm_arrays_give_their_task_offset_from_the_first() {
        let one_based = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(slurm(&one_based).unwrap(), Shard { index: 2, count: 4 });
        let zero_based = [
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "15"),
            ("SLURM_ARRAY_TASK_COUNT", "16"),
        ];
        assert_eq!(
            slurm(&zero_based).unwrap(),
            Shard {
                index: 0,
                count: 16
            }
        );
        // `--array=1,3,5`: three tasks over 1-5 would leave shards without a task.
        let gaps = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert!(slurm(&gaps).unwrap_err().contains("contiguous"));
        let e = slurm(&one_based[1..]).unwrap_err();
        assert!(e.contains("SLURM_ARRAY_TASK_ID is not set"), "{e}");
        let mut outside = one_based;
        outside[0].1 = "9";
        assert!(slurm(&outside).unwrap_err().contains("outside the array"));
    }

    #[test]
    fn shards_split_inputs_disjointly_evenly_and_whatever_their_order() {
        let all = paths(&[
            "/a/s05.nc",
            "/b/s01.nc",
            "/a/s03.nc",
            "/a/s02.nc",
            "/b/s04.nc",
            "/a/s07.nc",
            "/a/s06.nc",
        ]);
        let mut reversed = all.clone();
        reversed.reverse();
        // The same files under another mount point.
        let moved: Vec<PathBuf> = all
            .iter()
            .map(|p| Path::new("/mnt").join(p.file_name().unwrap()))
            .collect();
        let n = 3;
        let mut seen = Vec::new();
        let mut digest = None;
        for k in 0..n {
            let shard = Shard { index: k, count: n };
            let (mine, plan) = shard.plan(&all).unwrap();
            let (mine_rev, plan_rev) = shard.plan(&reversed).unwrap();
            let (mine_moved, plan_moved) = shard.plan(&moved).unwrap();
            assert_eq!(mine, mine_rev);
            assert_eq!(plan, plan_rev);
            assert_eq!(plan.digest, plan_moved.digest);
            let names = |v: &[PathBuf]| -> Vec<String> { v.iter().map(|p| file_name(p)).collect() };
            assert_eq!(names(&mine), names(&mine_moved));
            assert_eq!(plan.total, 7);
            assert!(mine.len() == 2 || mine.len() == 3, "{mine:?}");
            assert_eq!(*digest.get_or_insert(plan.digest.clone()), plan.digest);
            seen.extend(names(&mine));
        }
        // Shard 0 takes the 1st, 4th and 7th names in order.
        let (first, _) = Shard { index: 0, count: n }.plan(&all).unwrap();
        assert_eq!(first, paths(&["/b/s01.nc", "/b/s04.nc", "/a/s07.nc"]));
        seen.sort();
        let mut want: Vec<String> = all.iter().map(|p| file_name(p)).collect();
        want.sort();
        assert_eq!(seen, want);
        // Another input list is another run.
        let (_, other) = Shard { index: 0, count: n }.plan(&all[1..]).unwrap();
        assert_ne!(other.digest, digest.unwrap());
        // One file name twice (the same scene in two folders) is refused.
        let mut twice = all.clone();
        twice.push(PathBuf::from("/c/s03.nc"));
        let e = Shard { index: 0, count: n }.plan(&twice).unwrap_err();
        assert_eq!(
            e,
            "s03.nc is given twice (/a/s03.nc and /c/s03.nc); a sharded ingest takes each file once"
        );
        // More shards than inputs: some shards get nothing.
        let (none, _) = Shard {
            index: 9,
            count: 10,
        }
        .plan(&all)
        .unwrap();
        assert!(none.is_empty());
    }

    fn record(k: usize, n: usize, digest: &str, failed: &[(&str, &str)]) -> ShardRecord {
        ShardRecord {
            shard: k,
            of: n,
            inputs_digest: digest.into(),
            inputs_total: 10,
            assigned: vec![format!("s{k}.nc")],
            done: vec![format!("scene{k}")],
            skipped: Vec::new(),
            failed: failed
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            seconds: 1.5,
        }
    }

    #[test]
    fn runs_are_grouped_by_count_and_digest_and_name_their_missing_shards() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        assert!(shard_runs(store).unwrap().is_empty());
        write_record(store, &record(0, 3, "aaaa", &[])).unwrap();
        write_record(store, &record(2, 3, "aaaa", &[("s2.nc", "truncated")])).unwrap();
        write_record(store, &record(0, 2, "bbbb", &[])).unwrap();
        write_record(store, &record(1, 2, "bbbb", &[])).unwrap();
        let back = read_records(store).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back[2], record(0, 3, "aaaa", &[]));
        let runs = shard_runs(store).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].of, runs[0].complete()), (2, true));
        assert_eq!(runs[1].of, 3);
        assert_eq!(runs[1].finished, vec![0, 2]);
        assert_eq!(runs[1].missing, vec![1]);
        assert_eq!(
            runs[1].failed,
            vec![(2, "s2.nc".to_string(), "truncated".to_string())]
        );
        // A shard that starts again has not finished.
        remove_record(store, Shard { index: 1, count: 2 }).unwrap();
        remove_record(store, Shard { index: 1, count: 2 }).unwrap();
        let runs = shard_runs(store).unwrap();
        assert_eq!(runs[0].missing, vec![1]);
        // Nothing but records is left behind (no temporary files).
        let names: Vec<String> = std::fs::read_dir(store.join(SHARDS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(
            list_shards(&(0..25).collect::<Vec<_>>())
                .matches(", ")
                .count(),
            19
        );
        assert!(list_shards(&(0..25).collect::<Vec<_>>()).ends_with("19 and 5 more"));
    }
}
