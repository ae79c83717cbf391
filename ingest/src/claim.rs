//! Claims on scene ids, so that two ingest processes writing one store (the shards of a sharded
//! ingest, or two runs started by hand) never write the same scene at once.
//!
//! Before it touches a scene's folder, an ingest creates `manifests/claims/<scene_id>.claim`
//! (an exclusive create: one process wins), holding the input's file name, the host name and
//! the process id; it removes the claim when the scene is committed or has failed. A claim left
//! by a killed run is taken over by the next ingest of the same file, unless its process is
//! still alive on this host. A claim for another file is refused with a line naming the claim.

use std::io::Write;
use std::path::{Path, PathBuf};

use icefm_schemas::store::CLAIMS_DIR;

use crate::error::{IngestError, SceneError, StoreError};
use crate::file_name;

/// A held claim; dropping it releases the scene id.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Path of the claim on `scene_id`.
pub fn claim_path(store: &Path, scene_id: &str) -> PathBuf {
    store.join(CLAIMS_DIR).join(format!("{scene_id}.claim"))
}

/// Whether process `pid` of this host is running (this one included; Linux's `/proc`).
pub fn process_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

/// This machine's name (Linux), else `unknown`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Who holds a claim, as written in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    source: String,
    host: String,
    pid: u32,
}

impl Holder {
    fn me(source: &str) -> Self {
        Self {
            source: source.to_string(),
            host: host_name(),
            pid: std::process::id(),
        }
    }

    fn text(&self) -> String {
        format!("{}\n{}\n{}\n", self.source, self.host, self.pid)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let source = lines.next()?.to_string();
        let host = lines.next()?.to_string();
        let pid = lines.next()?.trim().parse().ok()?;
        Some(Self { source, host, pid })
    }

    /// Whether the holder is a live process of this host (this one included).
    fn alive_here(&self) -> bool {
        self.host == host_name() && process_alive(self.pid)
    }
}

impl Claim {
    /// Claim `scene_id` for the ingest of `input`.
    pub fn take(store: &Path, scene_id: &str, input: &Path) -> Result<Self, IngestError> {
        let path = claim_path(store, scene_id);
        let dir = store.join(CLAIMS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let source = file_name(input);
        let me = Holder::me(&source);
        // Two tries: a claim released between our create and our read is simply taken.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(me.text().as_bytes())
                        .map_err(|e| StoreError::io(&path, e))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io(&path, e).into()),
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(&path, e).into()),
            };
            let reason = match Holder::parse(&text) {
                Some(h) if h.alive_here() => format!(
                    "scene {scene_id} is being ingested from {} by process {} of this host \
                     (claim {})",
                    h.source,
                    h.pid,
                    path.display()
                ),
                Some(h) if h.source != source => format!(
                    "scene {scene_id} is claimed by an ingest of {} (host {}, process {}); if \
                     no ingest of it is running, remove {}",
                    h.source,
                    h.host,
                    h.pid,
                    path.display()
                ),
                // A dead run's claim for this file, or one torn by a crash right after its
                // creation: stale, taken over.
                _ => {
                    std::fs::write(&path, me.text()).map_err(|e| StoreError::io(&path, e))?;
                    return Ok(Self { path });
                }
            };
            return Err(SceneError::file(input, reason).into());
        }
        Err(SceneError::file(
            input,
            format!(
                "scene {scene_id}: its claim {} keeps changing",
                path.display()
            ),
        )
        .into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_per_scene_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let a = Claim::take(store, "s1", Path::new("/x/a.nc")).unwrap();
        let text = std::fs::read_to_string(claim_path(store, "s1")).unwrap();
        assert_eq!(
            Holder::parse(&text).unwrap(),
            Holder {
                source: "a.nc".into(),
                host: host_name(),
                pid: std::process::id()
            }
        );
        // Another file for the same scene, from this same (live) process: refused.
        let e = Claim::take(store, "s1", Path::new("/y/b.nc")).unwrap_err();
        let e = e.to_string();
        assert!(
            e.starts_with("/y/b.nc: scene s1 is being ingested from a.nc"),
            "{e}"
        );
        // Another scene is free.
        let c = Claim::take(store, "s2", Path::new("/y/b.nc")).unwrap();
        drop(a);
        assert!(!claim_path(store, "s1").exists());
        let b = Claim::take(store, "s1", Path::new("/y/b.nc")).unwrap();
        drop((b, c));
        assert_eq!(
            std::fs::read_dir(store.join(CLAIMS_DIR)).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_dead_runs_claim_is_taken_over_by_its_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        std::fs::create_dir_all(store.join(CLAIMS_DIR)).unwrap();
        // A process id that cannot be alive (above Linux's pid_max).
        let dead = |source: &str, host: &str| Holder {
            source: source.into(),
            host: host.into(),
            pid: 4_194_304 + 7,
        };
        let path = claim_path(store, "s1");
        std::fs::write(&path, dead("a.nc", &host_name()).text()).unwrap();
        let e = Claim::take(store, "s1", Path::new("b.nc"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is claimed by an ingest of a.nc"), "{e}");
        assert!(e.contains(&format!("remove {}", path.display())), "{e}");
        // The same file takes it over, from another host too.
        let c = Claim::take(store, "s1", Path::new("/data/a.nc")).unwrap();
        assert_eq!(
            Holder::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            Holder::me("a.nc")
        );
        drop(c);
        std::fs::write(&path, dead("a.nc", "node-17").text()).unwrap();
        drop(Claim::take(store, "s1", Path::new("a.nc")).unwrap());
        // A claim torn by a crash right after its creation is stale.
        std::fs::write(&path, "").unwrap();
        drop(Claim::take(store, "s1", Path::new("b.nc")).unwrap());
        assert!(!path.exists());
    }
}
