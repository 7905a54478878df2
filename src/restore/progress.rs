//! How a background extraction tells `podckpt-runc` that a container's
//! files are on disk.
//!
//! RestorePod answers once the sandbox and containers exist; the archive
//! is still being extracted, container after container, in the order the
//! caller will start them, so that restoring the first container overlaps
//! extracting the next. The extraction keeps its state in `.podckpt/` at
//! the top of the work dir (archive entries may not use that name):
//! `ready-<group>` per finished group, `failed` with the reason, and
//! `lock`, held (flock) for as long as the extraction runs, so that a
//! waiting `podckpt-runc` can tell a slow extraction from a dead one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// The state directory's name under the work dir.
pub const STATE_DIR: &str = ".podckpt";

/// The extraction state of one work dir.
#[derive(Clone, Debug)]
pub struct Progress {
    dir: PathBuf,
}

/// Held by the extraction while it runs.
pub type RunningLock = Flock<File>;

impl Progress {
    /// The state of the extraction into `work_dir`.
    pub fn of(work_dir: &Path) -> Self {
        Self {
            dir: work_dir.join(STATE_DIR),
        }
    }

    /// Creates `work_dir` and its state (both 0700) and takes the lock.
    pub fn start(work_dir: &Path) -> io::Result<(Self, RunningLock)> {
        fs::DirBuilder::new().mode(0o700).create(work_dir)?;
        let p = Self::of(work_dir);
        fs::DirBuilder::new().mode(0o700).create(&p.dir)?;
        let f = p.open_lock()?;
        let lock =
            Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| io::Error::from(e))?;
        Ok((p, lock))
    }

    fn open_lock(&self) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join("lock"))
    }

    fn ready_path(&self, group: usize) -> PathBuf {
        self.dir.join(format!("ready-{group}"))
    }

    /// Group `group` is complete on disk.
    pub fn mark_ready(&self, group: usize) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.ready_path(group))
            .map(drop)
    }

    /// The extraction failed; `why` is what a waiting container reports.
    pub fn mark_failed(&self, why: &str) -> io::Result<()> {
        let tmp = self.dir.join("failed.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(why.as_bytes())?;
        drop(f);
        fs::rename(tmp, self.dir.join("failed"))
    }

    /// Whether this work dir is (or was) filled in the background.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Waits until every group in `groups` is ready. Fails with the
    /// extraction's reason if it failed, or if it stopped (its lock is
    /// free) without finishing them.
    pub fn wait(&self, groups: &[usize], poll: Duration) -> Result<(), String> {
        loop {
            if groups.iter().all(|&g| self.ready_path(g).exists()) {
                return Ok(());
            }
            if let Ok(why) = fs::read_to_string(self.dir.join("failed")) {
                return Err(format!("extracting the checkpoint failed: {why}"));
            }
            let f = self
                .open_lock()
                .map_err(|e| format!("extraction state {}: {e}", self.dir.display()))?;
            if let Ok(free) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                drop(free);
                // Stopped: finished just now, or died.
                if groups.iter().all(|&g| self.ready_path(g).exists()) {
                    return Ok(());
                }
                if let Ok(why) = fs::read_to_string(self.dir.join("failed")) {
                    return Err(format!("extracting the checkpoint failed: {why}"));
                }
                return Err(
                    "the extraction of the checkpoint stopped before this container's files were \
                     complete (podckptd restarted?)"
                        .into(),
                );
            }
            std::thread::sleep(poll);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_ready_and_reports_failure_or_death() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("w");
        let (p, lock) = Progress::start(&work).unwrap();
        let waiter = {
            let p = Progress::of(&work);
            std::thread::spawn(move || p.wait(&[0, 1], Duration::from_millis(2)))
        };
        p.mark_ready(0).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "group 1 is not ready yet");
        p.mark_ready(1).unwrap();
        assert_eq!(waiter.join().unwrap(), Ok(()));

        // Failure is reported with its reason.
        p.mark_failed("frame checksum mismatch").unwrap();
        let err = Progress::of(&work)
            .wait(&[2], Duration::from_millis(2))
            .unwrap_err();
        assert!(err.contains("frame checksum mismatch"), "{err}");

        // A dead extraction (lock released, group never ready).
        let work2 = d.path().join("w2");
        let (_p2, lock2) = Progress::start(&work2).unwrap();
        drop(lock2);
        let err = Progress::of(&work2)
            .wait(&[0], Duration::from_millis(2))
            .unwrap_err();
        assert!(err.contains("stopped"), "{err}");
        drop(lock);
    }
}
