//! Lazy restore: the restored processes start before their memory is back,
//! and a `criu lazy-pages` daemon fills it through userfaultfd, on demand
//! and in the background, from the container's extracted images.
//!
//! `runc restore` then takes only as long as the process tree, files and
//! sockets need, not the copy of every page, so StartContainer returns in a
//! fraction of the time and the containers of a pod fill their memory side
//! by side, where the runtime's shim would otherwise restore them one after
//! the other, each copying all its pages before the next may begin.
//!
//! The daemon must outlive podckpt-runc's `create` (the shim waits for it)
//! and the images must go once it is done, so it runs under a small
//! supervisor: podckpt-runc itself, re-executed with [`SERVE_ENV`] set, in
//! a process group of its own and with no stdio of the container. The
//! supervisor runs CRIU, waits for it, logs how it ended and removes the
//! images. The readiness handshake is CRIU's `--status-fd`: it writes one
//! byte when its socket listens; end of file instead means it failed, and
//! the caller restores eagerly instead.
//!
//! A daemon that dies before the fill is done must not leave the container
//! running: once its userfaultfd is released, the kernel serves the pages
//! not filled yet as zero pages, and the process would go on with memory
//! that is silently wrong. So the supervisor shields the daemon from the
//! OOM killer, and if CRIU still ends in failure it kills the container's
//! process (from runc's pid file): the runtime then sees the container
//! exit, and its restart policy applies.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Set (to anything) in the environment of podckpt-runc re-executed as the
/// supervisor; never set by a runtime.
pub const SERVE_ENV: &str = "_PODCKPT_RUNC_LAZY_SERVE";

/// CRIU's log of the daemon, in the restore's work dir (next to runc's
/// restore.log).
const DAEMON_LOG: &str = "lazy-pages.log";

/// A running lazy-pages daemon, ready for `runc restore --lazy-pages` with
/// the same work dir.
#[derive(Debug)]
pub struct LazyServer {
    /// The supervisor's pid, which is also its process group (CRIU's too).
    group: Pid,
}

impl LazyServer {
    /// Starts the supervisor and its daemon serving `images`, with CRIU's
    /// socket in `work`; returns once the daemon listens. The supervisor
    /// reports to podckpt-runc's log (it inherits the environment), its
    /// lines starting with `label`. `pid_file` is where runc restore will
    /// write the container's pid (the process killed if the fill fails).
    pub fn start(
        label: &str,
        criu: &Path,
        images: &Path,
        work: &Path,
        pid_file: Option<&Path>,
        ready_within: Duration,
    ) -> Result<Self, String> {
        // The write end goes to the supervisor and on to CRIU; ours must
        // not leak into runc restore, which runs next.
        let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
        cloexec(&ready_r)?;
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let child = Command::new(exe)
            .env(SERVE_ENV, "1")
            .arg(label)
            .arg(criu)
            .arg(images)
            .arg(work)
            .arg(ready_w.as_raw_fd().to_string())
            .arg(pid_file.unwrap_or(Path::new("")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group, so that a failed restore can kill it and CRIU
            // in one go, and no signal for the shim's group reaches it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("start the lazy-pages supervisor: {e}"))?;
        drop(ready_w);
        let server = LazyServer {
            group: Pid::from_raw(child.id() as i32),
        };
        // The supervisor is reaped by the shim (a subreaper) once we are
        // gone; `child` is dropped without waiting on purpose.
        match wait_ready(ready_r, ready_within) {
            Ok(()) => Ok(server),
            Err(e) => {
                server.kill();
                Err(e)
            }
        }
    }

    /// The restore failed: nobody will connect, stop the daemon.
    pub fn kill(self) {
        let _ = killpg(self.group, Signal::SIGKILL);
    }
}

fn cloexec(fd: &OwnedFd) -> Result<(), String> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(|e| format!("fcntl: {e}"))
}

/// One byte from CRIU's status fd within `limit`, else why not.
fn wait_ready(fd: OwnedFd, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("criu lazy-pages not ready within {limit:?}"));
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
    let mut byte = [0u8; 1];
    match fs::File::from(fd).read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => Err(format!(
            "criu lazy-pages exited before it was ready (its log: {DAEMON_LOG} in the restore work dir)"
        )),
        Err(e) => Err(format!("reading criu lazy-pages' status: {e}")),
    }
}

/// The supervisor: `podckpt-runc` with [`SERVE_ENV`] set and the arguments
/// label, CRIU, images dir, work dir, status fd, pid file (or empty). Runs
/// the daemon to its end, kills the container if the daemon failed, then
/// removes the images, which nothing needs any more.
pub fn serve(args: &[OsString], log: &dyn Fn(&str)) -> i32 {
    let [label, criu, images, work, status_fd, pid_file] = args else {
        log(&format!("lazy-pages supervisor: bad arguments {args:?}"));
        return 2;
    };
    let log = |m: &str| log(&format!("{}: {m}", label.to_string_lossy()));
    let images = PathBuf::from(images);
    let t = Instant::now();
    let child = Command::new(criu)
        .env_remove(SERVE_ENV)
        .arg("lazy-pages")
        .arg("--images-dir")
        .arg(&images)
        .arg("--work-dir")
        .arg(work)
        .arg("--status-fd")
        .arg(status_fd)
        .arg("--log-file")
        .arg(DAEMON_LOG)
        .arg("-v2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let status = child.and_then(|mut child| {
        // Under memory pressure the kernel must pick something else than
        // the process the container's memory waits on.
        let adj = format!("/proc/{}/oom_score_adj", child.id());
        if let Err(e) = fs::write(&adj, "-1000") {
            log(&format!("{adj}: {e}"));
        }
        child.wait()
    });
    let code = match status {
        Ok(s) if s.success() => {
            log(&format!("lazy pages all served in {:?}", t.elapsed()));
            0
        }
        Ok(s) => {
            log(&format!(
                "criu lazy-pages ended with {s} after {:?}; its log: {}",
                t.elapsed(),
                Path::new(work).join(DAEMON_LOG).display()
            ));
            log(&kill_unfilled(Path::new(pid_file)));
            1
        }
        Err(e) => {
            log(&format!("run {}: {e}", Path::new(criu).display()));
            1
        }
    };
    if let Err(e) = fs::remove_dir_all(&images) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log(&format!("remove {}: {e}", images.display()));
        }
    }
    code
}

/// Kills the restored container's process after a failed fill; says what
/// it did.
fn kill_unfilled(pid_file: &Path) -> String {
    if pid_file.as_os_str().is_empty() {
        return "no pid file given: the container cannot be stopped from here".into();
    }
    let pid = match fs::read_to_string(pid_file) {
        Ok(text) => match text.trim().parse::<i32>() {
            Ok(pid) if pid > 1 => pid,
            _ => return format!("{}: no pid in {text:?}", pid_file.display()),
        },
        // No pid file: the restore never completed, nothing runs.
        Err(e) => return format!("{}: {e}; nothing to stop", pid_file.display()),
    };
    match nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) => format!(
            "killed the container's process {pid}: its memory was not all back, and the pages \
             not filled would read as zeros"
        ),
        Err(nix::errno::Errno::ESRCH) => format!("the container's process {pid} is gone already"),
        Err(e) => format!("kill {pid}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_byte_is_ready() {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, &[0]).unwrap();
        assert_eq!(wait_ready(r, Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn end_of_file_is_a_failed_daemon() {
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(w);
        let err = wait_ready(r, Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("exited before it was ready"), "{err}");
    }

    #[test]
    fn silence_times_out() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let t = Instant::now();
        let err = wait_ready(r, Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("not ready within"), "{err}");
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn the_supervisor_removes_the_images_when_criu_fails() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        fs::create_dir(&images).unwrap();
        fs::write(images.join("pages-1.img"), b"x").unwrap();
        let logged = std::cell::RefCell::new(Vec::new());
        let args: Vec<OsString> = vec![
            "hog-0".into(),
            "/bin/false".into(),
            images.clone().into(),
            dir.path().into(),
            "99".into(),
            dir.path().join("no-such.pid").into(),
        ];
        let code = serve(&args, &|m| logged.borrow_mut().push(m.to_string()));
        assert_eq!(code, 1);
        assert!(!images.exists());
        let logged = logged.borrow();
        let ended = logged
            .iter()
            .position(|l| l.starts_with("hog-0: criu lazy-pages ended with"))
            .unwrap_or_else(|| panic!("{logged:?}"));
        assert!(logged[ended + 1].contains("nothing to stop"), "{logged:?}");
    }

    #[test]
    fn a_failed_fill_kills_the_container_process() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
        let pid_file = dir.path().join("init.pid");
        fs::write(&pid_file, victim.id().to_string()).unwrap();
        let said = kill_unfilled(&pid_file);
        assert!(said.starts_with("killed the container's process"), "{said}");
        assert_eq!(
            victim.wait().unwrap().signal(),
            Some(Signal::SIGKILL as i32)
        );
        assert!(kill_unfilled(Path::new("")).contains("no pid file"));
        fs::write(&pid_file, "garbage").unwrap();
        assert!(kill_unfilled(&pid_file).contains("no pid in"));
    }
}
