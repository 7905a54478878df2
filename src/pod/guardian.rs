//! The checkpoint guardian: one small process per checkpoint that owns what
//! a checkpoint must never leave behind when podckptd dies.
//!
//! Why a process: a pod frozen by a podckptd that then dies (SIGKILL, the
//! OOM killer, a crash) stays frozen, its processes in D state, until
//! something thaws it. The start-up recovery ([`super::checkpoint::recover`])
//! does that, but only when podckptd starts again: seconds later under
//! systemd, never on a node where nothing restarts it. A thread or a drop
//! guard dies with the process; a child process does not.
//!
//! How: podckptd spawns the guardian (its own binary, re-executed with
//! [`GUARDIAN_ARG`]) before the freeze, and keeps the write end of a pipe
//! to its stdin. It sends the plan (the marker: cgroups, staging dir,
//! temporary archive), then one line per cgroup *before* freezing it, one
//! when all are thawed, and "done" when the checkpoint is over and undone
//! by podckptd itself. The kernel closes podckptd's end of the pipe when
//! podckptd dies, however it dies; the guardian then reads end-of-file
//! without "done", thaws what may be frozen, and removes the staging dir,
//! the temporary archive and the marker, in that order, so that a later
//! start finds nothing to clean. It ignores SIGTERM, SIGINT and SIGHUP: a
//! service manager stopping podckptd's cgroup signals every process in it,
//! and the guardian must outlive podckptd to do its job (it exits on its
//! own right after).
//!
//! Telling the guardian before freezing, not after, means that a podckptd
//! killed between the freeze and the message still has that cgroup thawed.
//! A guardian that is itself killed leaves the marker, and the start-up
//! recovery stays as the second line.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::checkpoint::{Marker, FREEZE_TIMEOUT};

/// The first argument that turns podckptd into a guardian.
pub const GUARDIAN_ARG: &str = "__checkpoint-guardian";
/// What podckptd re-executes by default: itself, even if its file was
/// replaced by an upgrade since it started.
pub const SELF_EXE: &str = "/proc/self/exe";

/// What the guardian is told first.
#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    /// The marker podckptd writes for the same checkpoint.
    marker_path: PathBuf,
    marker: Marker,
}

/// podckptd's side: the write end of the guardian's pipe. Dropping it says
/// "done" (podckptd undid everything itself); only podckptd's death closes
/// the pipe without it.
pub struct Guardian {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl Guardian {
    /// Starts the guardian of one checkpoint (`exe` is podckptd's binary).
    pub fn spawn(exe: &Path, marker_path: &Path, marker: &Marker) -> io::Result<Self> {
        let mut child = Command::new(exe)
            .arg(GUARDIAN_ARG)
            // Read by nobody (the plan comes on stdin): it tells an operator
            // looking at `ps` which checkpoint a guardian belongs to.
            .arg(marker_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let mut g = Self {
            child: Some(child),
            stdin,
        };
        let plan = Plan {
            marker_path: marker_path.to_path_buf(),
            marker: Marker {
                pid: marker.pid,
                freezers: marker.freezers.clone(),
                archive_tmp: marker.archive_tmp.clone(),
                staging: marker.staging.clone(),
            },
        };
        let mut line = serde_json::to_vec(&plan).map_err(io::Error::other)?;
        line.push(b'\n');
        g.send(&line)?;
        Ok(g)
    }

    /// The guardian's pid (for logs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Says that the cgroup at `index` of the plan is about to be frozen.
    pub fn freezing(&mut self, index: usize) -> io::Result<()> {
        self.send(format!("F {index}\n").as_bytes())
    }

    /// Says that every cgroup is thawed again.
    pub fn thawed(&mut self) -> io::Result<()> {
        self.send(b"T\n")
    }

    fn send(&mut self, line: &[u8]) -> io::Result<()> {
        match self.stdin.as_mut() {
            Some(s) => s.write_all(line),
            None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        }
    }

    /// Closes the pipe without "done", as podckptd's death would: the
    /// guardian undoes the checkpoint. For tests of the guardian itself.
    #[doc(hidden)]
    pub fn abandon(mut self) -> Option<Child> {
        self.stdin = None;
        self.child.take()
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            if let Err(err) = s.write_all(b"D\n") {
                tracing::warn!(guardian = ?self.pid(), %err, "checkpoint guardian gone before the checkpoint ended");
            }
        }
        // Reaped here: it exits as soon as it reads "done".
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// Whether this process was started as a guardian.
pub fn is_guardian_invocation(args: &[OsString]) -> bool {
    args.get(1).is_some_and(|a| a == GUARDIAN_ARG)
}

/// The guardian's main: reads the plan and the progress from stdin, and
/// undoes the checkpoint if stdin ends without "done".
pub fn run() -> ExitCode {
    // Outlive podckptd whatever signals its service manager sends to all
    // of its processes; end-of-file is the only signal that matters here.
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let stdin = io::stdin().lock();
    match watch(stdin) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some((plan, frozen))) => {
            undo(&plan, &frozen);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("podckptd-guardian: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Reads until "done" (None) or end-of-file (the plan and the indexes of
/// cgroups that may be frozen).
fn watch(input: impl BufRead) -> io::Result<Option<(Plan, Vec<usize>)>> {
    let mut lines = BufReader::new(input).lines();
    let Some(first) = lines.next().transpose()? else {
        // podckptd died before sending the plan: nothing was done yet.
        return Ok(None);
    };
    let plan: Plan = serde_json::from_str(&first)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad plan: {e}")))?;
    let mut frozen = Vec::new();
    for line in lines {
        // A read error is the same as end-of-file: podckptd is gone.
        let Ok(line) = line else { break };
        match line.trim() {
            "D" => return Ok(None),
            "T" => frozen.clear(),
            l => match l.strip_prefix("F ").and_then(|i| i.parse::<usize>().ok()) {
                Some(i) if i < plan.marker.freezers.len() => frozen.push(i),
                _ => eprintln!("podckptd-guardian: ignoring an unknown message"),
            },
        }
    }
    Ok(Some((plan, frozen)))
}

/// Thaws first (the pod's processes are what users wait on), then frees the
/// staging memory, then removes the marker.
fn undo(plan: &Plan, frozen: &[usize]) {
    let started = Instant::now();
    for &i in frozen {
        let f = &plan.marker.freezers[i];
        match f.thaw(FREEZE_TIMEOUT) {
            Ok(()) => eprintln!(
                "podckptd-guardian: podckptd died during a checkpoint: thawed cgroup={} after={:?}",
                f.dir.display(),
                started.elapsed()
            ),
            Err(err) => eprintln!(
                "podckptd-guardian: could not thaw cgroup={} (container gone?): {err}",
                f.dir.display()
            ),
        }
    }
    let _ = std::fs::remove_file(&plan.marker.archive_tmp);
    if let Err(err) = std::fs::remove_dir_all(&plan.marker.staging) {
        if err.kind() != io::ErrorKind::NotFound {
            eprintln!(
                "podckptd-guardian: could not remove staging={}: {err}",
                plan.marker.staging.display()
            );
        }
    }
    let _ = std::fs::remove_file(&plan.marker_path);
    eprintln!(
        "podckptd-guardian: cleaned up an interrupted checkpoint marker={} took={:?}",
        plan.marker_path.display(),
        started.elapsed()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::cgroup::{Freezer, FreezerKind};

    fn plan(dir: &Path) -> Plan {
        Plan {
            marker_path: dir.join("marker.json"),
            marker: Marker {
                pid: 1,
                freezers: vec![
                    Freezer {
                        kind: FreezerKind::V1,
                        dir: dir.join("a"),
                    },
                    Freezer {
                        kind: FreezerKind::V1,
                        dir: dir.join("b"),
                    },
                ],
                archive_tmp: dir.join("archive.tmp"),
                staging: dir.join("staging"),
            },
        }
    }

    fn input(plan: &Plan, rest: &str) -> Vec<u8> {
        let mut v = serde_json::to_vec(plan).unwrap();
        v.push(b'\n');
        v.extend_from_slice(rest.as_bytes());
        v
    }

    #[test]
    fn done_means_nothing_to_undo() {
        let d = tempfile::tempdir().unwrap();
        let p = plan(d.path());
        assert!(watch(&input(&p, "F 0\nF 1\nT\nD\n")[..]).unwrap().is_none());
        assert!(watch(&b""[..]).unwrap().is_none(), "no plan: nothing done");
    }

    #[test]
    fn end_of_file_undoes_only_what_may_be_frozen() {
        let d = tempfile::tempdir().unwrap();
        let p = plan(d.path());
        let (_, frozen) = watch(&input(&p, "F 0\nF 1\n")[..]).unwrap().unwrap();
        assert_eq!(frozen, vec![0, 1]);
        let (_, frozen) = watch(&input(&p, "F 0\nF 1\nT\n")[..]).unwrap().unwrap();
        assert!(frozen.is_empty(), "thawed by podckptd already");
        let (_, frozen) = watch(&input(&p, "F 0\nF 9\nbogus\n")[..]).unwrap().unwrap();
        assert_eq!(frozen, vec![0], "out-of-plan indexes ignored");
    }

    #[test]
    fn undo_thaws_then_removes_staging_archive_and_marker() {
        let d = tempfile::tempdir().unwrap();
        let p = plan(d.path());
        for c in ["a", "b"] {
            std::fs::create_dir(d.path().join(c)).unwrap();
            std::fs::write(d.path().join(c).join("freezer.state"), "FROZEN").unwrap();
        }
        std::fs::create_dir_all(d.path().join("staging/c")).unwrap();
        std::fs::write(d.path().join("archive.tmp"), "x").unwrap();
        std::fs::write(d.path().join("marker.json"), "{}").unwrap();
        undo(&p, &[1]);
        assert_eq!(
            std::fs::read_to_string(d.path().join("b/freezer.state")).unwrap(),
            "THAWED"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("a/freezer.state")).unwrap(),
            "FROZEN",
            "never announced: not touched"
        );
        for gone in ["staging", "archive.tmp", "marker.json"] {
            assert!(!d.path().join(gone).exists(), "{gone}");
        }
    }
}
