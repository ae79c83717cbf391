//! Checkpoints: saved at the steps the config names and at a stop, listed, loaded for resume, pruned.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::dist::{Group, weights_digest};
use crate::optim::AdamW;

use super::{RunDir, StepRecord, TrainError, io_err, write_metrics};

/// Checkpoint bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    /// Steps done.
    step: u64,
    /// The run's seed.
    seed: u64,
    /// Loss of the last step.
    loss: f32,
    /// BLAKE3 of each weight file, checked when the checkpoint is loaded (absent from
    /// checkpoints written before icefm recorded them).
    #[serde(default)]
    blake3: BTreeMap<String, String>,
}

fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step_{step:07}"))
}

/// The run a path belongs to (a run folder, one of its checkpoint folders, or a weights file
/// in one) and the run's configuration, from its `config.toml`.
pub fn config_of_run(path: &Path) -> Result<(PathBuf, TrainConfig), TrainError> {
    let run = path
        .ancestors()
        .take(4)
        .find(|p| p.join("config.toml").is_file())
        .ok_or_else(|| io_err(path, "no config.toml in this run or above this checkpoint"))?;
    let cfg_path = run.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io_err(&cfg_path, e))?;
    let cfg = TrainConfig::parse(&text, &[])
        .map_err(|e| TrainError::Setup(format!("{}: {}", cfg_path.display(), e.0)))?;
    if let Some(why) = cut_short(&text) {
        // Parsing fills what is missing with defaults: a cut file would read as another run.
        return Err(TrainError::Setup(format!(
            "{}: damaged or cut short ({why}); a run's config.toml, as icefm writes it, holds \
             every section, [model], [mae], [data] and [train]",
            cfg_path.display()
        )));
    }
    // Cut just before `[seg]`, a fine-tuning run's file reads as a whole MAE configuration:
    // its start records say which it is.
    let kind = if cfg.is_seg() {
        super::start::FINE_TUNING_RUN
    } else {
        super::start::MAE_RUN
    };
    if let Some(recorded) = super::run_starts(run)
        .last()
        .and_then(|s| s.kind.clone())
        .filter(|k| k != kind)
    {
        return Err(TrainError::Setup(format!(
            "{}: damaged or cut short: it reads as a{} {kind} configuration, and the run's \
             starts.jsonl records a {recorded} run",
            cfg_path.display(),
            if kind == super::start::MAE_RUN {
                "n"
            } else {
                ""
            }
        )));
    }
    Ok((run.to_path_buf(), cfg))
}

/// Why a run's `config.toml` text is not whole, if it is not: a section every run's file
/// holds is missing, or the text ends mid-line (icefm writes it whole, through a rename).
fn cut_short(text: &str) -> Option<String> {
    let missing: Vec<&str> = ["[model]", "[mae]", "[data]", "[train]"]
        .into_iter()
        .filter(|s| !text.lines().any(|l| l.trim() == *s))
        .collect();
    if !missing.is_empty() {
        return Some(format!("no {} section", missing.join(", ")));
    }
    (!text.ends_with('\n')).then(|| "it ends mid-line".to_string())
}

/// Checkpoints of a run directory, oldest first.
pub fn checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step_")?.parse().ok()?;
            e.path()
                .join("state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Whether a checkpoint is due after `done` steps: every `checkpoint_every` steps, after the
/// last step, or when stopping.
pub(crate) fn checkpoint_due(cfg: &TrainConfig, done: u64, stopping: bool) -> bool {
    let every = cfg.train.checkpoint_every;
    // 0: at the end (or a stop) only, as `seg.val_every = 0` validates at the end only.
    done == cfg.train.steps || stopping || (every > 0 && done.is_multiple_of(every))
}

/// The end of a step: a checkpoint (with the metrics so far) when one is due, every
/// `checkpoint_every` steps, after the last step, or when stopping. Returns `true` when the
/// run stops here early.
#[allow(clippy::too_many_arguments)]
pub(crate) fn end_step(
    run: &mut RunDir,
    group: &mut Group,
    cfg: &TrainConfig,
    out: &Path,
    done: u64,
    stopping: bool,
    records: &[StepRecord],
    named: &[(String, Var)],
    opt: &AdamW,
    checkpoint: &mut Option<PathBuf>,
) -> Result<bool, TrainError> {
    let total = cfg.train.steps;
    let loss = records.last().map_or(f32::NAN, |r| r.loss);
    let due = checkpoint_due(cfg, done, stopping);
    if due {
        // The ranks took the same steps from the same gradients: their weights must agree.
        agree_on_weights(group, named, &format!("weights after step {done}"))?;
    }
    if due && group.is_leader() {
        // The records first: a checkpoint never exists without the records of its steps (a
        // resume drops those past its checkpoint), whatever stops the process in between.
        write_metrics(&out.join("metrics.parquet"), records)?;
        *checkpoint = Some(save_checkpoint(
            out,
            done,
            cfg.train.seed,
            loss,
            named,
            opt,
        )?);
        prune(out, cfg.train.keep_last.max(1))?;
        run.log(&format!("step {done}: loss {loss:.5}, checkpoint saved"))?;
    }
    if stopping && done < total {
        run.log(&format!("stopped at step {done} (interrupt)"))?;
        return Ok(true);
    }
    Ok(false)
}

pub(crate) fn save_checkpoint(
    out: &Path,
    step: u64,
    seed: u64,
    loss: f32,
    named: &[(String, Var)],
    opt: &AdamW,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoint_dir(out, step);
    let weights = tensors_of(named);
    let (_, moments) = opt.state();
    let moments: HashMap<String, Tensor> = moments.into_iter().collect();
    write_checkpoint_folder(
        &dir,
        &[
            ("model.safetensors", &weights),
            ("optimizer.safetensors", &moments),
        ],
        |blake3| {
            serde_json::to_string_pretty(&CheckpointState {
                step,
                seed,
                loss,
                blake3,
            })
        },
    )?;
    Ok(dir)
}

/// The tensors of `named`, by name.
pub(crate) fn tensors_of(named: &[(String, Var)]) -> HashMap<String, Tensor> {
    named
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// The name an earlier checkpoint folder `dir` holds while a new one takes its place.
pub(crate) fn set_aside(dir: &Path) -> PathBuf {
    dir.with_extension("old")
}

/// The checkpoint folder `dir` as a process stopped while replacing it left it: `dir` itself,
/// or else the earlier folder it had set aside ([`set_aside`]).
pub(crate) fn whole_folder(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), set_aside(dir)]
        .into_iter()
        .find(|d| d.join("state.json").is_file())
}

/// Put back an earlier checkpoint folder that a process stopped while replacing `dir` left
/// set aside, and remove one set aside beside a whole `dir`.
pub(crate) fn recover_folder(dir: &Path) -> Result<(), TrainError> {
    let aside = set_aside(dir);
    if !aside.exists() {
        return Ok(());
    }
    if dir.join("state.json").is_file() {
        std::fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, e))
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        std::fs::rename(&aside, dir).map_err(|e| io_err(dir, e))
    }
}

/// Write the checkpoint folder `dir` whole: each weights file, its BLAKE3 recorded, then the
/// `state.json` that `state` makes of those hashes, all into `DIR.tmp`, which then takes the
/// place of `dir`. An earlier `dir` is renamed aside (`DIR.old`) first and removed once the new
/// one is in place, so a whole folder is there at every moment ([`whole_folder`]). On an error
/// the temporary folder is removed: a full disk is not left fuller by a half-written
/// checkpoint.
pub(crate) fn write_checkpoint_folder(
    dir: &Path,
    files: &[(&str, &HashMap<String, Tensor>)],
    state: impl FnOnce(BTreeMap<String, String>) -> serde_json::Result<String>,
) -> Result<(), TrainError> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut blake3 = BTreeMap::new();
        for (name, tensors) in files {
            crate::files::save_hashed(tensors, &tmp, name, &mut blake3)?;
        }
        let state = state(blake3).map_err(|e| io_err(&tmp, e))?;
        let path = tmp.join("state.json");
        std::fs::write(&path, state).map_err(|e| io_err(&path, e))?;
        let aside = set_aside(dir);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(dir, &aside).map_err(|e| io_err(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, e))?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

pub(crate) fn load_checkpoint(
    dir: &Path,
    named: &[(String, Var)],
    opt: &mut AdamW,
    dev: &Device,
) -> Result<(), TrainError> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| io_err(&state_path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| io_err(&state_path, e))?;
    // A damaged file is named, with what is wrong with it.
    let load = |name: &str| {
        let path = dir.join(name);
        crate::files::load_checked(&path, dev).map_err(|e| {
            io_err(
                &path,
                format!("{e}; remove this checkpoint's folder to resume from the one before"),
            )
        })
    };
    let weights = load("model.safetensors")?;
    for (n, v) in named {
        let t = weights
            .get(n)
            .ok_or_else(|| io_err(dir, format!("the checkpoint has no weight {n}")))?;
        v.set(t)?;
    }
    let moments: BTreeMap<String, Tensor> = load("optimizer.safetensors")?.into_iter().collect();
    opt.load_state(state.step, &moments)?;
    Ok(())
}

pub(crate) fn prune(out: &Path, keep: usize) -> Result<(), TrainError> {
    let all = checkpoints(out);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            remove_checkpoint(p)?;
        }
    }
    Ok(())
}

/// Remove a checkpoint folder: its `state.json` first, so that one stopped half-way is no
/// longer a checkpoint, and [`sweep`] removes the rest.
fn remove_checkpoint(dir: &Path) -> Result<(), TrainError> {
    let state = dir.join("state.json");
    match std::fs::remove_file(&state) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&state, e)),
    }
    std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))
}

/// Tidy `out/checkpoints` at the start of a run that holds its lock: put back a best
/// checkpoint a stopped replacement set aside ([`recover_folder`]), and remove what stopped
/// processes left: half-written (`*.tmp`) folders and step folders without a `state.json` (a
/// removal stopped half-way). The names removed, for the log.
pub(crate) fn sweep(out: &Path) -> Result<Vec<String>, TrainError> {
    let dir = out.join("checkpoints");
    recover_folder(&dir.join("best"))?;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let leftover = name.ends_with(".tmp")
            || name.ends_with(".old")
            || (name.starts_with("step_") && !path.join("state.json").is_file());
        if leftover && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| io_err(&path, e))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// In a data-parallel run, fail on every rank unless all hold the same weights (`what`
/// names when): at a checkpoint, and at the start, where ranks that loaded different
/// checkpoints (an `--out` not shared between nodes) or initial encoders would otherwise train
/// apart until the first checkpoint.
pub(crate) fn agree_on_weights(
    group: &mut Group,
    named: &[(String, Var)],
    what: &str,
) -> Result<(), TrainError> {
    if group.world() == 1 {
        return Ok(());
    }
    let weights: Vec<Tensor> = named.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    group.check_same(what, &weights_digest(&weights)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_config_cut_short_is_refused_not_read_as_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let whole = TrainConfig::parse("[seg]\ntasks = [\"SOD\"]\n", &[])
            .unwrap()
            .to_toml();
        std::fs::write(dir.path().join("config.toml"), &whole).unwrap();
        let (_, cfg) = config_of_run(dir.path()).unwrap();
        assert!(cfg.is_seg());
        // Cut after its first section, and cut mid-line.
        for (cut, why) in [
            (whole.find("[mae]").unwrap(), "no [mae], [data], [train]"),
            (whole.len() - 1, "mid-line"),
        ] {
            std::fs::write(dir.path().join("config.toml"), &whole[..cut]).unwrap();
            let e = config_of_run(dir.path()).unwrap_err().to_string();
            assert!(e.contains("damaged or cut short") && e.contains(why), "{e}");
        }
        // Cut just before [seg], the last section: a whole MAE configuration to read, which
        // the run's start record, of a fine-tuning run, gives away.
        let mae = &whole[..whole.find("[seg]").unwrap()];
        std::fs::write(dir.path().join("config.toml"), mae).unwrap();
        assert!(!config_of_run(dir.path()).unwrap().1.is_seg());
        let start = serde_json::json!({
            "time": "2026-11-29T08:00:00Z", "icefm": "0", "host": "h", "pid": 1,
            "device": "cpu", "command": [], "store": "s.zarr", "regimes": [],
            "kind": "fine-tuning",
        });
        std::fs::write(dir.path().join("starts.jsonl"), format!("{start}\n")).unwrap();
        let e = config_of_run(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(
                "damaged or cut short: it reads as an mae configuration, and the run's \
                        starts.jsonl records a fine-tuning run"
            ),
            "{e}"
        );
        std::fs::write(dir.path().join("config.toml"), &whole).unwrap();
        assert!(config_of_run(dir.path()).unwrap().1.is_seg());
    }

    #[test]
    fn a_failed_checkpoint_write_leaves_nothing_behind_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("checkpoints/step_0000003");
        let t = Tensor::arange(0f32, 6., &Device::Cpu).unwrap();
        let weights = HashMap::from([("w".to_string(), t)]);
        // The second file cannot be written (its folder does not exist), as on a full disk.
        let e = write_checkpoint_folder(
            &ckpt,
            &[
                ("model.safetensors", &weights),
                ("absent/optimizer.safetensors", &weights),
            ],
            |_| Ok("{}".to_string()),
        )
        .expect_err("the second file cannot be written");
        assert!(
            e.to_string()
                .contains("step_0000003.tmp/absent/optimizer.safetensors"),
            "{e}"
        );
        // Neither the folder nor its half-written temporary is left.
        assert!(!ckpt.exists());
        assert!(!ckpt.with_extension("tmp").exists());
        // Written whole: the files, state.json with their hashes.
        write_checkpoint_folder(&ckpt, &[("model.safetensors", &weights)], |h| {
            assert_eq!(h.len(), 1);
            serde_json::to_string(&h)
        })
        .unwrap();
        let state = std::fs::read_to_string(ckpt.join("state.json")).unwrap();
        let hash = crate::files::file_blake3(&ckpt.join("model.safetensors")).unwrap();
        assert!(state.contains(&hash), "{state}");
        assert!(!ckpt.with_extension("tmp").exists());
    }

    fn folder(dir: &Path, tag: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("state.json"), tag).unwrap();
    }

    fn tag(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("state.json")).unwrap()
    }

    #[test]
    fn a_replacement_stopped_half_way_leaves_a_whole_folder_that_is_put_back() {
        let tmp = tempfile::tempdir().unwrap();
        let best = tmp.path().join("checkpoints/best");
        // Replaced whole: the new folder, nothing set aside.
        folder(&best, "old");
        let tensors = HashMap::new();
        write_checkpoint_folder(&best, &[("model.safetensors", &tensors)], |_| {
            Ok("new".to_string())
        })
        .unwrap();
        assert_eq!(tag(&best), "new");
        assert!(!set_aside(&best).exists() && !best.with_extension("tmp").exists());

        // Stopped between setting the earlier one aside and renaming the new one in: the
        // earlier is the whole folder, and a run's start puts it back.
        std::fs::rename(&best, set_aside(&best)).unwrap();
        assert_eq!(whole_folder(&best), Some(set_aside(&best)));
        sweep(tmp.path()).unwrap();
        assert_eq!(
            (tag(&best), set_aside(&best).exists()),
            ("new".into(), false)
        );

        // Stopped before removing the one set aside: the new one stays, the other goes.
        folder(&set_aside(&best), "older");
        assert_eq!(whole_folder(&best), Some(best.clone()));
        recover_folder(&best).unwrap();
        assert_eq!(
            (tag(&best), set_aside(&best).exists()),
            ("new".into(), false)
        );
        assert_eq!(whole_folder(&tmp.path().join("nothing")), None);
    }
}
