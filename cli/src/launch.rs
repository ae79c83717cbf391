//! `icefm train --dist local:N`: the ranks of a data-parallel run on this machine, started by
//! icefm itself (as `torchrun` does for PyTorch). The command runs itself N times, as
//! `--dist R/N@127.0.0.1:PORT` for R = 0 … N−1, and waits for them: rank 0 shows the run, the
//! others train quietly. With `--device cuda` rank R uses `cuda:R`; on the CPU each rank gets an
//! equal share of the cores (`RAYON_NUM_THREADS`, unless it is set).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use icefm_model::train::{DeviceName, cuda_device_count};

/// The most ranks `local:N` starts.
const MAX_LOCAL: usize = 256;
/// How long the other ranks may take to end after one failed (they notice at their next
/// exchange, or when their wait for it times out) before they are killed.
const GRACE: Duration = Duration::from_secs(30);

/// `Some(N)` for `--dist local:N`, `None` for the other forms; an error for a bad N.
pub fn local_world(dist: &str) -> Result<Option<usize>> {
    let Some(n) = dist.strip_prefix("local:") else {
        return Ok(None);
    };
    match n.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_LOCAL).contains(&n) => Ok(Some(n)),
        _ => bail!(
            "--dist {dist}: expected local:N with N from 1 to {MAX_LOCAL}, the ranks to start \
             on this machine"
        ),
    }
}

/// This command's arguments with the value of `--dist` replaced by `value`.
fn with_dist(args: &[OsString], value: &str) -> Result<Vec<OsString>> {
    let mut out = Vec::with_capacity(args.len());
    let mut replaced = false;
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == "--dist" {
            iter.next();
            out.push(a.clone());
            out.push(value.into());
            replaced = true;
        } else if a.to_str().is_some_and(|s| s.starts_with("--dist=")) {
            out.push(format!("--dist={value}").into());
            replaced = true;
        } else {
            out.push(a.clone());
        }
    }
    if !replaced {
        return Err(anyhow!("--dist local:N is not among the arguments"));
    }
    Ok(out)
}

/// Whether `world` ranks can run on `device`, said once here rather than by every rank. No
/// GPU is opened: the launcher holds none.
fn check_device(world: usize, device: &str) -> Result<DeviceName> {
    let name = DeviceName::parse(device).map_err(anyhow::Error::msg)?;
    let DeviceName::Cuda(ordinal) = name else {
        return Ok(name);
    };
    let device = device.trim();
    let gpus = cuda_device_count().map_err(|e| anyhow!("--device {device}: {e}"))?;
    match ordinal {
        None if world > gpus => bail!(
            "--dist local:{world} --device cuda puts rank R on cuda:R, and this machine has \
             {gpus} GPU(s): start at most {gpus} ranks, or share one GPU with --device cuda:0 \
             and ICEFM_NCCL=0"
        ),
        Some(k) if k >= gpus => bail!("--device {device}: this machine has {gpus} GPU(s)"),
        _ => Ok(name),
    }
}

/// A free TCP port on the loopback for rank 0 (`MASTER_PORT` when set).
fn port() -> Result<u16> {
    if let Ok(p) = std::env::var("MASTER_PORT") {
        let port: u16 = p
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow!("MASTER_PORT={p} is not a port (1 to 65535)"))?;
        // Taken now, rank 0 would fail after the others had started and waited for it.
        std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| {
            format!("MASTER_PORT={port} is in use; choose another, or unset it")
        })?;
        return Ok(port);
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Start `world` ranks of this very command and wait for them. The exit status is 0 when
/// every rank trained to the end, 130 when they stopped on a signal, else the first failed
/// rank's.
pub fn launch(world: usize, device: &str) -> Result<ExitCode> {
    let name = check_device(world, device)?;
    let exe = std::env::current_exe().context("finding the icefm executable")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let port = port()?;
    let threads = (name == DeviceName::Cpu && std::env::var_os("RAYON_NUM_THREADS").is_none())
        .then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / world).max(1)
        });
    eprintln!(
        "starting {world} rank{} on this machine (rank 0 at 127.0.0.1:{port}{})",
        if world == 1 { "" } else { "s" },
        match threads {
            Some(t) => format!(", {t} compute thread(s) each"),
            None => String::new(),
        }
    );
    // Ctrl-C reaches every rank from the terminal (one process group): the ranks agree on the
    // step to stop at and rank 0 saves. A stop signal sent to the launcher alone (`kill PID`,
    // SIGTERM or SIGINT) is forwarded to the ranks; the launcher itself waits for them.
    let _ = crate::train::stop_signals();
    let mut children: Vec<Child> = Vec::with_capacity(world);
    for rank in 0..world {
        let mut c = Command::new(&exe);
        c.args(with_dist(
            &args,
            &format!("{rank}/{world}@127.0.0.1:{port}"),
        )?);
        if let Some(t) = threads {
            c.env("RAYON_NUM_THREADS", t.to_string());
        }
        end_with_parent(&mut c);
        c.env(crate::train::LAUNCHED_AS, format!("local:{world}"));
        match c.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                for mut ch in children {
                    let _ = ch.kill();
                    let _ = ch.wait();
                }
                return Err(anyhow!("starting rank {rank}: {e}"));
            }
        }
    }
    let ended = wait_all(&mut children)?;
    let asked_to_stop = crate::train::stop_signals() > 0;
    // The rank that failed first: the others fail after it, for want of it. One killed by a
    // signal (the out-of-memory killer, say) is that rank, though the others, noticing at
    // once, may be seen to end in the same moment.
    let failures: Vec<(usize, &ExitStatus)> = ended
        .order
        .iter()
        .map(|&r| (r, &ended.statuses[r]))
        .filter(|(r, s)| !ended.killed.contains(r) && failed(s, asked_to_stop))
        .collect();
    let first_failed = failures
        .iter()
        .find(|(_, s)| s.signal().is_some())
        .or(failures.first())
        .copied();
    match first_failed {
        // Every rank trained to the end, or stopped on a signal, saved (then all of them did).
        None if !ended.killed.is_empty()
            || ended.statuses.iter().any(|s| stopped(s, asked_to_stop)) =>
        {
            Ok(ExitCode::from(crate::train::STOPPED))
        }
        None => Ok(ExitCode::SUCCESS),
        Some((rank, s)) => {
            let others = if world > 1 {
                " (the other ranks ended for want of it)"
            } else {
                ""
            };
            match s.signal() {
                Some(sig) => eprintln!(
                    "rank {rank} of {world} was killed by signal {sig}{}{others}",
                    match sig {
                        libc::SIGKILL => " (SIGKILL: the out-of-memory killer, or kill -9)",
                        libc::SIGSEGV => " (SIGSEGV)",
                        _ => "",
                    }
                ),
                None => eprintln!("rank {rank} of {world} failed first, with {s}{others}"),
            }
            let code = match (s.code(), s.signal()) {
                (Some(c), _) => u8::try_from(c).unwrap_or(1),
                (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
                (None, None) => 1,
            };
            Ok(ExitCode::from(code))
        }
    }
}

/// A rank that ended on a stop signal, at a step boundary and saved ([`crate::train::STOPPED`]),
/// or, when the launcher was asked to stop, one a stop signal ended before it could take it
/// (at its start).
fn stopped(s: &ExitStatus, asked_to_stop: bool) -> bool {
    s.code() == Some(i32::from(crate::train::STOPPED))
        || (asked_to_stop && matches!(s.signal(), Some(libc::SIGINT | libc::SIGTERM)))
}

/// A rank that ended with an error (or was killed), not trained to the end nor stopped.
fn failed(s: &ExitStatus, asked_to_stop: bool) -> bool {
    !s.success() && !stopped(s, asked_to_stop)
}

/// How the ranks ended: each one's status, by rank, and the ranks in the order they ended.
struct Ended {
    statuses: Vec<ExitStatus>,
    order: Vec<usize>,
    /// Ranks the launcher killed: after a failure's grace, or on stop signals.
    killed: Vec<usize>,
}

/// Make `c`'s process get SIGTERM when the launcher dies (killed with -9, say), so that no
/// rank trains on, orphaned.
#[allow(unsafe_code)] // FFI: prctl(2) in the child before exec
fn end_with_parent(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and makes one async-signal-safe
    // system call, touching no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            #[cfg(target_os = "linux")]
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// Wait for every child; once one has failed, the others get [`GRACE`] to end, then are
/// killed. Each stop signal the launcher receives is passed on to the ranks still running, as
/// SIGINT (a rank takes one that comes with the terminal's own as one stop). A second stop
/// signal (a rank then ends without saving) gives the ranks [`GRACE`] too, and a third kills
/// them at once: a rank that froze cannot hold the launcher.
fn wait_all(children: &mut [Child]) -> Result<Ended> {
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut order = Vec::with_capacity(children.len());
    let mut killed = Vec::new();
    let mut deadline: Option<Instant> = None;
    let mut forwarded = 0;
    let asked = || crate::train::stop_signals();
    while statuses.iter().any(Option::is_none) {
        let signals = asked();
        if signals > forwarded {
            for (c, s) in children.iter().zip(&statuses) {
                if s.is_none() {
                    interrupt(c);
                }
            }
            if signals >= 2 && forwarded < 2 {
                eprintln!(
                    "stopping without saving: ranks still running in {} s are killed (once more \
                     to kill them now)",
                    GRACE.as_secs()
                );
                deadline = deadline.or(Some(Instant::now() + GRACE));
            }
            if signals >= 3 {
                deadline = Some(Instant::now());
            }
            forwarded = signals;
        }
        for (k, (c, s)) in children.iter_mut().zip(statuses.iter_mut()).enumerate() {
            if s.is_none()
                && let Some(st) = c.try_wait().context("waiting for a rank")?
            {
                if failed(&st, signals > 0) && deadline.is_none() {
                    deadline = Some(Instant::now() + GRACE);
                }
                *s = Some(st);
                order.push(k);
            }
        }
        if deadline.is_some_and(|t| Instant::now() >= t) {
            for (k, (c, s)) in children.iter_mut().zip(statuses.iter_mut()).enumerate() {
                if s.is_none() {
                    let _ = c.kill();
                    *s = Some(c.wait().context("waiting for a rank")?);
                    order.push(k);
                    killed.push(k);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !killed.is_empty() {
        eprintln!(
            "killed rank(s) {} after the wait",
            killed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(Ended {
        statuses: statuses.into_iter().flatten().collect(),
        order,
        killed,
    })
}

/// Send SIGINT to `child`.
#[allow(unsafe_code)] // FFI: kill(2)
fn interrupt(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of this process; `pid` is a child
    // that has not been waited for, so its pid cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_worlds_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(local_world("local:4").unwrap(), Some(4));
        assert_eq!(local_world("0/2@localhost:29500").unwrap(), None);
        assert_eq!(local_world("slurm").unwrap(), None);
        for bad in ["local:0", "local:x", "local:", "local:257"] {
            let e = local_world(bad).unwrap_err().to_string();
            assert!(e.contains("expected local:N with N from 1 to 256"), "{e}");
        }
    }

    #[test]
    fn devices_are_checked_once_before_any_rank_starts() {
        assert!(check_device(8, "cpu").is_ok());
        let e = check_device(2, "gpu").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        // Without CUDA in this build (or without a GPU) `cuda` is refused with the reason.
        if cuda_device_count().is_err() {
            let e = check_device(2, "cuda").unwrap_err().to_string();
            assert!(e.starts_with("--device cuda: "), "{e}");
        }
        if let Ok(n) = cuda_device_count() {
            let e = check_device(n + 1, "cuda").unwrap_err().to_string();
            assert!(e.contains(&format!("this machine has {n} GPU(s)")), "{e}");
            assert!(check_device(2, &format!("cuda:{n}")).is_err());
        }
    }

    #[test]
    fn the_ranks_get_the_same_arguments_with_their_own_dist() {
        let args: Vec<OsString> = ["train", "--store", "s", "--dist", "local:2", "--set", "a=1"]
            .iter()
            .map(OsString::from)
            .collect();
        let got = with_dist(&args, "1/2@127.0.0.1:7").unwrap();
        let want = [
            "train",
            "--store",
            "s",
            "--dist",
            "1/2@127.0.0.1:7",
            "--set",
            "a=1",
        ];
        assert_eq!(got, want.map(OsString::from));
        let eq: Vec<OsString> = ["train", "--dist=local:2"].map(OsString::from).to_vec();
        assert_eq!(
            with_dist(&eq, "0/2@h:1").unwrap(),
            ["train", "--dist=0/2@h:1"].map(OsString::from)
        );
        assert!(with_dist(&args[..3], "0/2@h:1").is_err());
    }
}
