//! Workers sharing one grid. Several `icefm ablate` processes (one per GPU, a Slurm array, or
//! nodes on a shared file system) may run the same grid into the same output folder: each takes
//! a cell by an exclusive advisory lock on `claims/<key>.lock` and holds it while the cell trains
//! and is scored. The operating system drops a lock when its process ends, however it ends, so
//! the cell of a killed worker is free for the next one and no lock file ever needs removing.
//! A cell that fails leaves `claims/<key>.failed` (the reason), so the other workers of the same
//! run do not try it again; a later invocation does.
//!
//! On a file system without locks (some parallel file systems are mounted so) the claims are
//! off, with one warning: one worker at a time then.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use icefm_ingest::claim::host_name;

/// The claims' folder inside the output folder.
pub(super) const CLAIMS_DIR: &str = "claims";
/// The lock that serialises rewriting the table and the plot.
const OUTPUTS_LOCK: &str = "outputs.lock";
/// Tries before a held lock counts as another worker's: a dry run's probe holds one for
/// microseconds, a worker for a whole cell.
const TRIES: u32 = 3;
const RETRY: Duration = Duration::from_millis(30);

/// A cell this worker holds (or, without locks, simply runs); dropping it frees the cell.
#[derive(Debug)]
pub(super) struct Held {
    file: Option<File>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Empty the holder's line before the lock goes (with the file's close), so a file with
        // text names a live worker or one that was killed.
        if let Some(f) = &self.file {
            let _ = f.set_len(0);
        }
    }
}

/// The outcome of claiming a cell.
#[derive(Debug)]
pub(super) enum Claim {
    /// This worker runs it.
    Mine(Held),
    /// Another live worker holds it: who, where and for how long.
    Taken(String),
}

/// This worker's claims on one output folder.
#[derive(Debug)]
pub(super) struct Claims {
    dir: PathBuf,
    /// Whether the file system locks files (false after the first refusal).
    locking: bool,
    /// The failure marks there were when this worker started (key → text): those cells it
    /// tries again; a mark written since (new text, with its writer's process) is of this run.
    /// No clocks are compared: a re-run right after a failure retries the cell.
    old_failures: HashMap<String, String>,
    /// This worker's line in a lock file: host, process and device.
    me: String,
}

impl Claims {
    /// Claims in `out/claims`, made by a worker on `device`.
    pub(super) fn open(out: &Path, device: &str) -> Result<Self> {
        let dir = out.join(CLAIMS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut old_failures = HashMap::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if let (Some(key), Some("failed")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) && let Ok(text) = std::fs::read_to_string(&path)
            {
                old_failures.insert(key.to_string(), text);
            }
        }
        Ok(Self {
            dir,
            locking: true,
            old_failures,
            me: format!("{} pid {}, {device}", host_name(), std::process::id()),
        })
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.lock"))
    }

    fn failed_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.failed"))
    }

    /// Take the cell `key`, unless a live worker holds it.
    pub(super) fn claim(&mut self, key: &str) -> Result<Claim> {
        let path = self.lock_path(key);
        let Some(file) = self.open_lock(&path)? else {
            return Ok(Claim::Mine(Held { file: None }));
        };
        let mut attempt = 1;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    let mut f = &file;
                    // The holder's line is for people (`--dry-run`, the other workers' logs);
                    // nothing depends on it, so failing to write it is no error.
                    let _ = f.set_len(0).and_then(|()| writeln!(f, "{}", self.me));
                    return Ok(Claim::Mine(Held { file: Some(file) }));
                }
                Err(TryLockError::WouldBlock) if attempt < TRIES => {
                    attempt += 1;
                    std::thread::sleep(RETRY);
                }
                Err(TryLockError::WouldBlock) => return Ok(Claim::Taken(holder(&path))),
                Err(TryLockError::Error(e)) => {
                    self.no_locks(&e);
                    return Ok(Claim::Mine(Held { file: None }));
                }
            }
        }
    }

    /// Wait for the lock on rewriting the table and the plot.
    pub(super) fn outputs(&mut self) -> Result<Held> {
        let path = self.dir.join(OUTPUTS_LOCK);
        let Some(file) = self.open_lock(&path)? else {
            return Ok(Held { file: None });
        };
        match file.lock() {
            Ok(()) => Ok(Held { file: Some(file) }),
            Err(e) => {
                self.no_locks(&e);
                Ok(Held { file: None })
            }
        }
    }

    /// The lock file at `path`, opened for locking; `None` when locks are off.
    fn open_lock(&self, path: &Path) -> Result<Option<File>> {
        if !self.locking {
            return Ok(None);
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Some(file))
    }

    /// The file system refused a lock: go on as the only worker.
    fn no_locks(&mut self, e: &std::io::Error) {
        if self.locking {
            eprintln!(
                "warning: {} cannot be locked ({e}): cells are not claimed, so run only one \
                 icefm ablate on this output folder at a time",
                self.dir.display()
            );
        }
        self.locking = false;
    }

    /// Why the cell `key` failed in another worker since this one started, if it did.
    pub(super) fn failed_elsewhere(&self, key: &str) -> Option<String> {
        let path = self.failed_path(key);
        let why = std::fs::read_to_string(&path).ok()?;
        if self.old_failures.get(key) == Some(&why) {
            return None;
        }
        Some(why.trim().to_string())
    }

    /// Mark the cell `key` failed, with `why`, for the workers running now.
    pub(super) fn mark_failed(&self, key: &str, why: &str) {
        let path = self.failed_path(key);
        if let Err(e) = std::fs::write(&path, format!("{why} ({})\n", self.me)) {
            eprintln!("warning: cannot write {}: {e}", path.display());
        }
    }

    /// The cell `key` is done: forget any failure of it.
    pub(super) fn clear_failed(&self, key: &str) {
        let _ = std::fs::remove_file(self.failed_path(key));
    }
}

/// For `--dry-run`: the worker holding the cell `key` of `out`, if one does. Creates nothing.
pub(super) fn probe(out: &Path, key: &str) -> Option<String> {
    let path = out.join(CLAIMS_DIR).join(format!("{key}.lock"));
    let file = File::open(&path).ok()?;
    // A shared lock: probes do not block each other, and a worker's exclusive lock blocks it.
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(TryLockError::WouldBlock) => Some(holder(&path)),
        Err(TryLockError::Error(_)) => None,
    }
}

/// For `--dry-run`: why the cell `key` of `out` failed when it last ran, if it did (its
/// `.failed` mark is there). Creates nothing.
pub(super) fn failed_before(out: &Path, key: &str) -> Option<String> {
    let why = std::fs::read_to_string(out.join(CLAIMS_DIR).join(format!("{key}.failed"))).ok()?;
    Some(why.trim().to_string())
}

/// The holder's line of a held lock file and how long it has held it.
fn holder(path: &Path) -> String {
    let who = std::fs::read_to_string(path).unwrap_or_default();
    let who = who.trim();
    let who = if who.is_empty() {
        "another worker"
    } else {
        who
    };
    let since = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    match since {
        Some(d) => format!("{who}, for {}", duration_text(d)),
        None => who.to_string(),
    }
}

/// `42 s`, `12 min`, `3.5 h`.
fn duration_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_cell_is_taken_for_others_and_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Claims::open(dir.path(), "cuda:0").unwrap();
        let mut b = Claims::open(dir.path(), "cuda:1").unwrap();
        assert_eq!(probe(dir.path(), "k"), None);
        let held = match a.claim("k").unwrap() {
            Claim::Mine(h) => h,
            Claim::Taken(who) => panic!("taken by {who}"),
        };
        let who = match b.claim("k").unwrap() {
            Claim::Taken(who) => who,
            Claim::Mine(_) => panic!("claimed twice"),
        };
        let me = format!("pid {}, cuda:0, for ", std::process::id());
        assert!(who.contains(&me), "{who}");
        assert!(probe(dir.path(), "k").unwrap().contains(&me));
        // Another cell is free meanwhile.
        assert!(matches!(b.claim("other").unwrap(), Claim::Mine(_)));
        drop(held);
        assert_eq!(probe(dir.path(), "k"), None);
        assert!(matches!(b.claim("k").unwrap(), Claim::Mine(_)));
        // The lock file stays, emptied: a stale file blocks nothing.
        assert!(dir.path().join("claims/k.lock").is_file());
    }

    #[test]
    fn a_failure_counts_for_the_workers_running_and_not_for_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let early = Claims::open(dir.path(), "cpu").unwrap();
        early.mark_failed("k", "loss diverged");
        let why = early.failed_elsewhere("k").unwrap();
        let me = format!("pid {}, cpu)", std::process::id());
        assert!(
            why.starts_with("loss diverged (") && why.ends_with(&me),
            "{why}"
        );
        // A worker started after the failure (a re-run, at once or later) tries the cell again.
        let late = Claims::open(dir.path(), "cpu").unwrap();
        assert_eq!(late.failed_elsewhere("k"), None);
        assert_eq!(late.failed_elsewhere("never"), None);
        // A new failure is of the run of both.
        early.mark_failed("k", "again");
        assert!(late.failed_elsewhere("k").unwrap().starts_with("again ("));
        late.clear_failed("k");
        assert_eq!(early.failed_elsewhere("k"), None);
    }

    #[test]
    fn durations_read_in_the_unit_that_fits() {
        assert_eq!(duration_text(Duration::from_secs(42)), "42 s");
        assert_eq!(duration_text(Duration::from_secs(12 * 60 + 10)), "12 min");
        assert_eq!(duration_text(Duration::from_secs(3 * 3600 + 1800)), "3.5 h");
    }
}
