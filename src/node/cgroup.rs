//! Freezing and thawing a container's cgroup, on cgroup v1 (the freezer
//! controller's `freezer.state`) and v2 (`cgroup.freeze` / `cgroup.events`).
//!
//! The cgroup is found from `/proc/<pid>/cgroup`, not from the runtime's
//! configuration, so the same code serves containerd and CRI-O and both
//! cgroup drivers.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Which freezer interface a cgroup uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezerKind {
    /// cgroup v1 freezer controller.
    V1,
    /// cgroup v2 core freezer.
    V2,
}

/// Freezer state as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezerState {
    /// Running.
    Thawed,
    /// Transitioning (v1 only).
    Freezing,
    /// Every task stopped.
    Frozen,
}

/// A cgroup freezer problem.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading or writing a cgroup file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The process is in no freezer cgroup we can use.
    #[error("process {pid} has no usable freezer cgroup in /proc/{pid}/cgroup")]
    NoFreezer {
        /// The process.
        pid: i32,
    },
    /// The cgroup did not reach the state in time.
    #[error("cgroup {path} did not become {wanted} within {waited:?} (last state {last:?})")]
    Timeout {
        /// The cgroup directory.
        path: PathBuf,
        /// The state asked for.
        wanted: &'static str,
        /// How long we waited.
        waited: Duration,
        /// The last state read.
        last: FreezerState,
    },
    /// A state file held something unexpected.
    #[error("{path}: unexpected freezer state {value:?}")]
    BadState {
        /// The file.
        path: PathBuf,
        /// Its content.
        value: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A container's freezer cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freezer {
    /// v1 or v2.
    pub kind: FreezerKind,
    /// The cgroup directory, e.g. `/sys/fs/cgroup/freezer/kubepods/...`.
    pub dir: PathBuf,
}

/// Whether the node runs the unified (v2-only) hierarchy.
pub fn is_unified(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

impl Freezer {
    /// The freezer cgroup of process `pid`.
    pub fn for_pid(pid: i32) -> Result<Self, CgroupError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Self::from_proc_cgroup(&text, Path::new(CGROUP_ROOT)).ok_or(CgroupError::NoFreezer { pid })
    }

    /// Parses `/proc/<pid>/cgroup` content against a cgroup mount root.
    pub fn from_proc_cgroup(text: &str, root: &Path) -> Option<Self> {
        let unified = is_unified(root);
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if unified {
                if id == "0" && controllers.is_empty() {
                    return Some(Self {
                        kind: FreezerKind::V2,
                        dir: root.join(rel),
                    });
                }
            } else if controllers.split(',').any(|c| c == "freezer") {
                return Some(Self {
                    kind: FreezerKind::V1,
                    dir: root.join("freezer").join(rel),
                });
            }
        }
        None
    }

    fn state_file(&self) -> PathBuf {
        match self.kind {
            FreezerKind::V1 => self.dir.join("freezer.state"),
            FreezerKind::V2 => self.dir.join("cgroup.events"),
        }
    }

    /// The current state.
    pub fn state(&self) -> Result<FreezerState, CgroupError> {
        let path = self.state_file();
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        match self.kind {
            FreezerKind::V1 => match text.trim() {
                "THAWED" => Ok(FreezerState::Thawed),
                "FREEZING" => Ok(FreezerState::Freezing),
                "FROZEN" => Ok(FreezerState::Frozen),
                other => Err(CgroupError::BadState {
                    path,
                    value: other.into(),
                }),
            },
            FreezerKind::V2 => {
                let frozen = text.lines().find_map(|l| l.strip_prefix("frozen "));
                match frozen.map(str::trim) {
                    Some("1") => Ok(FreezerState::Frozen),
                    Some("0") => {
                        // cgroup.freeze=1 with events frozen=0 is "freezing".
                        let want = self.dir.join("cgroup.freeze");
                        let f = fs::read_to_string(&want).map_err(io_err("read", &want))?;
                        Ok(if f.trim() == "1" {
                            FreezerState::Freezing
                        } else {
                            FreezerState::Thawed
                        })
                    }
                    _ => Err(CgroupError::BadState { path, value: text }),
                }
            }
        }
    }

    fn write(&self, frozen: bool) -> Result<(), CgroupError> {
        let (path, value) = match self.kind {
            FreezerKind::V1 => (
                self.dir.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            FreezerKind::V2 => (
                self.dir.join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
            ),
        };
        fs::write(&path, value).map_err(io_err("write", &path))
    }

    /// Freezes the cgroup and waits until every task is stopped.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.transition(true, timeout)
    }

    /// Thaws the cgroup and waits until it reports thawed.
    pub fn thaw(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.transition(false, timeout)
    }

    fn transition(&self, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        let wanted = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        let start = Instant::now();
        let mut pause = Duration::from_micros(100);
        loop {
            // Writing again on every round matters on v1: a task that forks
            // while FREEZING can leave the cgroup stuck until the state is
            // written anew (runc retries the same way).
            self.write(frozen)?;
            let last = self.state()?;
            if last == wanted {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(CgroupError::Timeout {
                    path: self.dir.clone(),
                    wanted: if frozen { "frozen" } else { "thawed" },
                    waited: start.elapsed(),
                    last,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
}

/// Memory charged to the cgroup of process `pid` (v1 `memory.usage_in_bytes`,
/// v2 `memory.current`), to size a checkpoint before taking it.
pub fn memory_usage(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let root = Path::new(CGROUP_ROOT);
    let file = if is_unified(root) {
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        root.join(rel.trim_start_matches('/'))
            .join("memory.current")
    } else {
        let rel = text.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            ctrl.split(',').any(|c| c == "memory").then_some(path)
        })?;
        root.join("memory")
            .join(rel.trim_start_matches('/'))
            .join("memory.usage_in_bytes")
    };
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// How much more memory the cgroup of process `pid` may be charged before
/// it hits a limit: the smallest `limit - usage` from its cgroup up to the
/// root (v2 `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`/
/// `memory.usage_in_bytes`). None when no ancestor has a limit.
///
/// Why: tmpfs pages are charged to the cgroup of the process that writes
/// them. CRIU, spawned by podckptd, writes the staging: under a service
/// MemoryMax=, staging a large pod in /dev/shm would run podckptd's own
/// cgroup out of memory (and tmpfs pages cannot be reclaimed by killing).
pub fn memory_headroom(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    headroom_in(&text, Path::new(CGROUP_ROOT))
}

fn headroom_in(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let read = |p: PathBuf| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
    let (top, rel, max_file, cur_file) = if is_unified(root) {
        let rel = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
        (root.to_path_buf(), rel, "memory.max", "memory.current")
    } else {
        let rel = proc_cgroup.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            ctrl.split(',').any(|c| c == "memory").then_some(path)
        })?;
        (
            root.join("memory"),
            rel,
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
        )
    };
    let mut dir = top.join(rel.trim_start_matches('/'));
    let mut best: Option<u64> = None;
    while dir.starts_with(&top) && dir != top {
        // v2 "max" does not parse; v1 says "no limit" with a huge number.
        if let (Some(max), Some(cur)) = (read(dir.join(max_file)), read(dir.join(cur_file))) {
            if max < 1 << 60 {
                let room = max.saturating_sub(cur);
                best = Some(best.map_or(room, |b| b.min(room)));
            }
        }
        if !dir.pop() {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_is_the_tightest_limit_up_the_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::write(r.join("cgroup.controllers"), "memory").unwrap();
        let svc = r.join("system.slice/podckptd.service");
        fs::create_dir_all(&svc).unwrap();
        let text = "0::/system.slice/podckptd.service\n";
        // No limit anywhere.
        fs::write(svc.join("memory.max"), "max\n").unwrap();
        fs::write(svc.join("memory.current"), "100\n").unwrap();
        assert_eq!(headroom_in(text, r), None);
        // The service's own limit.
        fs::write(svc.join("memory.max"), "1000\n").unwrap();
        assert_eq!(headroom_in(text, r), Some(900));
        // A tighter parent wins.
        fs::write(r.join("system.slice/memory.max"), "5000\n").unwrap();
        fs::write(r.join("system.slice/memory.current"), "4800\n").unwrap();
        assert_eq!(headroom_in(text, r), Some(200));
    }

    #[test]
    fn parses_v1_and_v2_proc_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = "12:pids:/kubepods/pod1/abc\n6:freezer:/kubepods/pod1/abc\n0::/\n";
        let f = Freezer::from_proc_cgroup(v1, dir.path()).unwrap();
        assert_eq!(f.kind, FreezerKind::V1);
        assert_eq!(f.dir, dir.path().join("freezer/kubepods/pod1/abc"));

        fs::write(dir.path().join("cgroup.controllers"), "cpu memory").unwrap();
        let v2 = "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope\n";
        let f = Freezer::from_proc_cgroup(v2, dir.path()).unwrap();
        assert_eq!(f.kind, FreezerKind::V2);
        assert_eq!(
            f.dir,
            dir.path()
                .join("kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope")
        );
        assert!(Freezer::from_proc_cgroup("", dir.path()).is_none());
    }

    #[test]
    fn v2_state_from_fake_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = Freezer {
            kind: FreezerKind::V2,
            dir: dir.path().to_path_buf(),
        };
        fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        fs::write(dir.path().join("cgroup.freeze"), "0\n").unwrap();
        assert_eq!(f.state().unwrap(), FreezerState::Thawed);
        fs::write(dir.path().join("cgroup.freeze"), "1\n").unwrap();
        assert_eq!(f.state().unwrap(), FreezerState::Freezing);
        fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    }

    #[test]
    fn fake_v1_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        // A fake v1 file that never changes state by itself: the write
        // succeeds (it is a plain file) and reads back what was written,
        // so freezing "works"; a file holding FREEZING forever is a timeout.
        let f = Freezer {
            kind: FreezerKind::V1,
            dir: dir.path().to_path_buf(),
        };
        fs::write(dir.path().join("freezer.state"), "THAWED").unwrap();
        f.freeze(Duration::from_millis(50)).unwrap();
        assert_eq!(f.state().unwrap(), FreezerState::Frozen);
        f.thaw(Duration::from_millis(50)).unwrap();
        assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    }
}
