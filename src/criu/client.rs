//! One RPC conversation with CRIU.
//!
//! CRIU speaks proto2 `criu_req`/`criu_resp` messages, one per
//! SOCK_SEQPACKET datagram with no length prefix. We either spawn
//! `criu swrk 3` with one end of a socketpair as its fd 3 (what runc,
//! go-criu and libcriu do), or connect to a `criu service --address`
//! socket. Everything here is blocking: callers run it on a blocking thread.

use std::fmt;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::unistd::Pid;
use prost::Message;

use super::rpc::{CriuReq, CriuReqType, CriuResp};

/// The fd number `criu swrk` gets its end of the socketpair on.
const SWRK_FD: RawFd = 3;
/// How much of CRIU's stderr we keep for error messages.
const STDERR_KEEP: usize = 16 * 1024;
/// How long a worker may take to exit after we hang up before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Where CRIU comes from.
#[derive(Clone, Debug)]
pub struct CriuConfig {
    /// The binary spawned as `criu swrk` (a bare name is looked up on PATH).
    pub binary: PathBuf,
    /// A running `criu service --address` socket to use instead.
    pub service_socket: Option<PathBuf>,
}

impl CriuConfig {
    /// `criu swrk` from `binary`.
    pub fn swrk(binary: impl Into<PathBuf>) -> Self {
        CriuConfig {
            binary: binary.into(),
            service_socket: None,
        }
    }

    fn describe(&self) -> String {
        match &self.service_socket {
            Some(sock) => format!("CRIU service at {}", sock.display()),
            None => format!("{} swrk", self.binary.display()),
        }
    }
}

/// Why a CRIU conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// The binary could not be started.
    #[error("cannot start {binary} swrk: {source}")]
    Spawn {
        /// The configured binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The service socket could not be reached.
    #[error("cannot connect to CRIU service {path}: {source}")]
    Connect {
        /// The configured socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving on the RPC socket failed.
    #[error("CRIU RPC {op}: {source}")]
    Transport {
        /// send or recv.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// CRIU hung up before answering (it crashed or was killed).
    #[error("CRIU ({who}) hung up during {request} without an answer{}{}", stderr_suffix(.stderr), log_suffix(.log))]
    Closed {
        /// What we talked to.
        who: String,
        /// The request in flight.
        request: &'static str,
        /// The tail of CRIU's stderr, if it wrote any.
        stderr: String,
        /// CRIU's log file, kept for the user.
        log: Option<PathBuf>,
    },
    /// CRIU's answer could not be decoded.
    #[error("undecodable answer from CRIU: {0}")]
    Decode(#[from] prost::DecodeError),
    /// CRIU answered a different request type than was asked.
    #[error("CRIU answered {got} to a {expected} request")]
    Unexpected {
        /// The request type.
        expected: &'static str,
        /// The response type.
        got: String,
    },
    /// CRIU ran the request and reported failure.
    #[error("CRIU {request} failed{}: {message}{}", errno_suffix(*.errno), log_suffix(.log))]
    Failed {
        /// The request type.
        request: &'static str,
        /// `cr_errno`, 0 when CRIU gave none.
        errno: i32,
        /// `cr_errmsg`: the first error line of CRIU's log.
        message: String,
        /// CRIU's log file, kept for the user.
        log: Option<PathBuf>,
    },
    /// Our handler of a notification refused it, so CRIU aborted.
    #[error("CRIU {request}: notification {script} failed: {message}")]
    Notify {
        /// The request type.
        request: &'static str,
        /// The notification (`post-dump`, `orphan-pts-master`, ...).
        script: String,
        /// What the handler said.
        message: String,
    },
    /// CRIU is older than we need.
    #[error("CRIU {found} is too old: podckpt needs {}.{} or newer", .min.0, .min.1)]
    TooOld {
        /// What CRIU reported.
        found: Version,
        /// The minimum.
        min: (i32, i32),
    },
    /// The conversation was cancelled (deadline, client gone, shutdown).
    #[error("cancelled")]
    Cancelled,
}

fn log_suffix(log: &Option<PathBuf>) -> String {
    log.as_ref()
        .map(|p| format!(" (log: {})", p.display()))
        .unwrap_or_default()
}

/// How many of the log's last error lines a failure message carries.
const LOG_ERROR_LINES: usize = 3;

/// CRIU's `cr_errmsg` is the FIRST error it logged, which is often a
/// harmless complaint it went on from (e.g. failing to raise its own
/// RLIMIT_NOFILE); the error that made it give up is near the end of its
/// log. So the message carries both.
fn failure_message(errmsg: Option<&str>, log: Option<&Path>) -> String {
    let first = errmsg
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .unwrap_or("no message (see its log)")
        .to_owned();
    let Some(text) = log.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return first;
    };
    let mut last: Vec<&str> = text
        .lines()
        .rev()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .map(str::trim)
        .filter(|l| !first.contains(*l))
        .take(LOG_ERROR_LINES)
        .collect();
    if last.is_empty() {
        return first;
    }
    last.reverse();
    format!("{first}; last errors in its log: {}", last.join(" | "))
}

fn errno_suffix(errno: i32) -> String {
    if errno == 0 {
        String::new()
    } else {
        format!(" ({})", Errno::from_raw(errno).desc())
    }
}

fn stderr_suffix(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!("; stderr: {s}")
    }
}

impl CriuError {
    /// CRIU's errno when it reported one (ENOSPC and friends decide the
    /// gRPC code).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            CriuError::Failed { errno, .. } if *errno != 0 => Some(Errno::from_raw(*errno)),
            CriuError::Transport { source, .. } => source.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }
}

/// CRIU's version as it reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major number.
    pub major: i32,
    /// Minor number.
    pub minor: i32,
    /// Sublevel, when released with one.
    pub sublevel: i32,
    /// Git id of a development build.
    pub gitid: Option<String>,
}

impl Version {
    /// Whether this is at least `min` (major, minor).
    pub fn at_least(&self, min: (i32, i32)) -> bool {
        (self.major, self.minor) >= min
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        if let Some(g) = &self.gitid {
            write!(f, " ({g})")?;
        }
        Ok(())
    }
}

/// A notification CRIU sent in the middle of a request.
#[derive(Debug)]
pub struct Notification {
    /// The stage: `pre-dump`, `post-dump`, `orphan-pts-master`, ...
    pub script: String,
    /// The pid CRIU names (restored init pid on `post-restore`), or 0.
    pub pid: i32,
    /// A file descriptor passed along (the pty master for
    /// `orphan-pts-master`).
    pub fd: Option<OwnedFd>,
}

/// Interrupts a conversation from another thread: hangs up the socket (a
/// blocked receive returns at once) and kills a `criu swrk` worker.
#[derive(Clone)]
pub struct Canceller {
    shared: Arc<Shared>,
}

impl Canceller {
    /// Cancels; the conversation returns [`CriuError::Cancelled`].
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
        let _ = socket::shutdown(self.shared.sock.as_raw_fd(), socket::Shutdown::Both);
        // The pid is cleared under this lock once the child is reaped, so we
        // never signal a recycled pid.
        if let Some(pid) = *self
            .shared
            .child_pid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

struct Shared {
    /// Our end of the socket; shared so that a canceller never shuts down
    /// a recycled fd number.
    sock: OwnedFd,
    cancelled: AtomicBool,
    child_pid: Mutex<Option<Pid>>,
}

/// One conversation with one CRIU worker.
pub struct Session {
    shared: Arc<Shared>,
    who: String,
    child: Option<Child>,
    stderr: Option<JoinHandle<String>>,
    log: Option<PathBuf>,
}

impl Session {
    /// Spawns `criu swrk` or connects to the configured service.
    pub fn open(config: &CriuConfig) -> Result<Session, CriuError> {
        match &config.service_socket {
            Some(path) => Self::connect(path),
            None => Self::spawn(&config.binary),
        }
    }

    fn connect(path: &Path) -> Result<Session, CriuError> {
        let err = |source: Errno| CriuError::Connect {
            path: path.to_owned(),
            source: source.into(),
        };
        let sock = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err)?;
        let addr = UnixAddr::new(path).map_err(err)?;
        socket::connect(sock.as_raw_fd(), &addr).map_err(err)?;
        Ok(Session {
            shared: Arc::new(Shared {
                sock,
                cancelled: AtomicBool::new(false),
                child_pid: Mutex::new(None),
            }),
            who: format!("service {}", path.display()),
            child: None,
            stderr: None,
            log: None,
        })
    }

    fn spawn(binary: &Path) -> Result<Session, CriuError> {
        let spawn_err = |source: io::Error| CriuError::Spawn {
            binary: binary.to_owned(),
            source,
        };
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| spawn_err(e.into()))?;
        let theirs_raw = theirs.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.arg("swrk")
            .arg(SWRK_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (dup2, fcntl, prctl) between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                if theirs_raw == SWRK_FD {
                    // dup2 onto itself would keep FD_CLOEXEC set.
                    if libc::fcntl(SWRK_FD, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_raw, SWRK_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // If podckptd dies, the worker must not outlive it holding
                // tasks seized. (PDEATHSIG follows the spawning thread; a
                // session lives on one blocking thread.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        drop(theirs);
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            if buf.len() > STDERR_KEEP {
                                buf.drain(..buf.len() - STDERR_KEEP);
                            }
                        }
                    }
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        });
        let pid = Pid::from_raw(child.id() as i32);
        Ok(Session {
            shared: Arc::new(Shared {
                sock: ours,
                cancelled: AtomicBool::new(false),
                child_pid: Mutex::new(Some(pid)),
            }),
            who: format!("{} swrk, pid {pid}", binary.display()),
            child: Some(child),
            stderr,
            log: None,
        })
    }

    /// Where CRIU writes its log for this conversation (the request's
    /// `log_file` inside its work dir): named in errors, kept for the user.
    pub fn set_log_path(&mut self, path: impl Into<PathBuf>) {
        self.log = Some(path.into());
    }

    /// A handle that cancels this conversation from another thread.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Sends `req` and answers CRIU's notifications with `on_notify` until
    /// the final response. A handler error is reported to CRIU (which then
    /// aborts the request) and returned.
    pub fn call(
        &mut self,
        req: CriuReq,
        on_notify: &mut dyn FnMut(Notification) -> Result<(), String>,
    ) -> Result<CriuResp, CriuError> {
        let request = req_name(req.r#type);
        self.send(&req).map_err(|e| self.peer_gone(e, request))?;
        let mut refused: Option<(String, String)> = None;
        loop {
            let (resp, fd) = match self.recv() {
                Ok(Some(m)) => m,
                Ok(None) => return Err(self.closed(request)),
                Err(e) => return Err(self.peer_gone(e, request)),
            };
            if resp.r#type == CriuReqType::Notify as i32 {
                let notify = resp.notify.unwrap_or_default();
                let script = notify.script.unwrap_or_default();
                tracing::debug!(request, script = %script, "CRIU notification");
                let result = if refused.is_some() {
                    Err("an earlier notification failed".to_owned())
                } else {
                    on_notify(Notification {
                        script: script.clone(),
                        pid: notify.pid.unwrap_or(0),
                        fd,
                    })
                };
                let ok = result.is_ok();
                if let Err(message) = result {
                    refused.get_or_insert((script, message));
                }
                self.send(&CriuReq {
                    r#type: CriuReqType::Notify as i32,
                    notify_success: Some(ok),
                    ..Default::default()
                })
                .map_err(|e| self.peer_gone(e, request))?;
                continue;
            }
            if let Some((script, message)) = refused {
                return Err(CriuError::Notify {
                    request,
                    script,
                    message,
                });
            }
            if resp.r#type != req.r#type {
                return Err(CriuError::Unexpected {
                    expected: request,
                    got: req_name(resp.r#type).to_owned(),
                });
            }
            if !resp.success {
                return Err(CriuError::Failed {
                    request,
                    errno: resp.cr_errno.unwrap_or(0),
                    message: failure_message(resp.cr_errmsg.as_deref(), self.log.as_deref()),
                    log: self.log.clone(),
                });
            }
            return Ok(resp);
        }
    }

    /// Asks CRIU for its version.
    pub fn version(&mut self) -> Result<Version, CriuError> {
        let resp = self.call(
            CriuReq {
                r#type: CriuReqType::Version as i32,
                ..Default::default()
            },
            &mut |_| Ok(()),
        )?;
        let v = resp.version.ok_or_else(|| CriuError::Unexpected {
            expected: "VERSION",
            got: "a VERSION answer without a version".to_owned(),
        })?;
        Ok(Version {
            major: v.major_number,
            minor: v.minor_number,
            sublevel: v.sublevel.unwrap_or(0),
            gitid: v.gitid,
        })
    }

    fn send(&self, req: &CriuReq) -> Result<(), CriuError> {
        let buf = req.encode_to_vec();
        loop {
            match socket::send(self.shared.sock.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(self.cancelled_or(CriuError::Transport {
                        op: "send",
                        source: e.into(),
                    }))
                }
            }
        }
    }

    /// Receives one message, sized by peeking; `None` when CRIU hung up.
    fn recv(&self) -> Result<Option<(CriuResp, Option<OwnedFd>)>, CriuError> {
        let fd = self.shared.sock.as_raw_fd();
        let transport = |e: Errno| CriuError::Transport {
            op: "recv",
            source: e.into(),
        };
        let size = loop {
            match socket::recv(fd, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(transport(e)),
            }
        };
        if size == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; size];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(list) = c {
                                // SAFETY: the kernel just installed these
                                // fds in our table; nobody else owns them.
                                fds.extend(
                                    list.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }),
                                );
                            }
                        }
                    }
                    break (msg.bytes, fds);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(transport(e)),
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let resp = CriuResp::decode(&buf[..n])?;
        Ok(Some((resp, fds.into_iter().next())))
    }

    fn cancelled_or(&self, e: CriuError) -> CriuError {
        if self.shared.cancelled.load(Ordering::SeqCst) {
            CriuError::Cancelled
        } else {
            e
        }
    }

    /// A reset or broken pipe means the worker died: report it like a
    /// hang-up, with its stderr.
    fn peer_gone(&mut self, e: CriuError, request: &'static str) -> CriuError {
        match e.errno() {
            Some(Errno::EPIPE | Errno::ECONNRESET) => self.closed(request),
            _ => self.cancelled_or(e),
        }
    }

    fn closed(&mut self, request: &'static str) -> CriuError {
        if self.shared.cancelled.load(Ordering::SeqCst) {
            return CriuError::Cancelled;
        }
        // The worker is gone or going: reap it so its stderr is complete.
        self.finish();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        CriuError::Closed {
            who: self.who.clone(),
            request,
            stderr,
            log: self.log.clone(),
        }
    }

    /// Hangs up and reaps the worker, killing it if it does not leave.
    fn finish(&mut self) {
        let _ = socket::shutdown(self.shared.sock.as_raw_fd(), socket::Shutdown::Both);
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            // Reap under the lock and clear the pid with it, so a concurrent
            // cancel never signals a recycled pid.
            let mut pid = self
                .shared
                .child_pid
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    *pid = None;
                    return;
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    *pid = None;
                    return;
                }
                Ok(None) => {
                    drop(pid);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.finish();
    }
}

fn req_name(t: i32) -> &'static str {
    CriuReqType::try_from(t)
        .map(|t| t.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// Checks at daemon start that CRIU answers, is at least `min` and passes
/// its own `check`. Returns the version for logs and `Status`.
pub fn probe(config: &CriuConfig, min: (i32, i32)) -> Result<Version, CriuError> {
    let mut session = Session::open(config)?;
    let version = session.version()?;
    if !version.at_least(min) {
        return Err(CriuError::TooOld {
            found: version,
            min,
        });
    }
    // A worker answers VERSION and hangs up, so CHECK gets its own. CHECK
    // runs CRIU's `check` with options from the request, so it needs an
    // images dir like any other request.
    drop(session);
    let mut session = Session::open(config)?;
    let scratch = std::env::temp_dir();
    let dir = std::fs::File::open(&scratch).map_err(|source| CriuError::Transport {
        op: "open scratch dir",
        source,
    })?;
    let opts = super::rpc::CriuOpts {
        images_dir_fd: dir.as_raw_fd(),
        log_level: Some(0),
        ..Default::default()
    };
    session.call(
        CriuReq {
            r#type: CriuReqType::Check as i32,
            opts: Some(opts),
            ..Default::default()
        },
        &mut |_| Ok(()),
    )?;
    tracing::debug!(criu = %config.describe(), %version, "CRIU probed");
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::rpc::{CriuNotify, CriuVersion};
    use std::io::IoSlice;
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;

    /// A fake `criu service`: accepts one connection and runs `script` on it.
    fn fake_service(
        dir: &Path,
        script: impl FnOnce(OwnedFd) + Send + 'static,
    ) -> (CriuConfig, JoinHandle<()>) {
        let path = dir.join("criu.sock");
        let sock = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(sock.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        socket::listen(&sock, socket::Backlog::new(1).unwrap()).unwrap();
        let handle = std::thread::spawn(move || {
            let conn = socket::accept(sock.as_raw_fd()).unwrap();
            // SAFETY: accept returned a fresh fd we own.
            script(unsafe { OwnedFd::from_raw_fd(conn) });
        });
        (
            CriuConfig {
                binary: "unused".into(),
                service_socket: Some(path),
            },
            handle,
        )
    }

    fn read_req(fd: &OwnedFd) -> CriuReq {
        let mut buf = vec![0u8; 1 << 16];
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        CriuReq::decode(&buf[..n]).unwrap()
    }

    fn write_resp(fd: &OwnedFd, resp: &CriuResp, pass: Option<RawFd>) {
        let buf = resp.encode_to_vec();
        let iov = [IoSlice::new(&buf)];
        let fds;
        let cmsgs = match pass {
            Some(f) => {
                fds = [f];
                vec![socket::ControlMessage::ScmRights(&fds)]
            }
            None => vec![],
        };
        socket::sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).unwrap();
    }

    #[test]
    fn version_from_service() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, h) = fake_service(dir.path(), |fd| {
            let req = read_req(&fd);
            assert_eq!(req.r#type, CriuReqType::Version as i32);
            let resp = CriuResp {
                r#type: CriuReqType::Version as i32,
                success: true,
                version: Some(CriuVersion {
                    major_number: 4,
                    minor_number: 1,
                    sublevel: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            };
            write_resp(&fd, &resp, None);
        });
        let v = Session::open(&cfg).unwrap().version().unwrap();
        h.join().unwrap();
        assert_eq!(v.to_string(), "4.1.1");
        assert!(v.at_least((4, 0)) && !v.at_least((4, 2)));
    }

    #[test]
    fn notify_round_trip_with_fd_then_failure_with_message() {
        let dir = tempfile::tempdir().unwrap();
        let passed = dir.path().join("passed");
        std::fs::write(&passed, b"pty master stand-in").unwrap();
        let passed2 = passed.clone();
        let (cfg, h) = fake_service(dir.path(), move |fd| {
            let req = read_req(&fd);
            assert_eq!(req.r#type, CriuReqType::Dump as i32);
            let file = std::fs::File::open(&passed2).unwrap();
            // A big notification: the client must size its buffer by peeking.
            let notify = CriuResp {
                r#type: CriuReqType::Notify as i32,
                success: true,
                notify: Some(CriuNotify {
                    script: Some("orphan-pts-master".repeat(10_000)),
                    pid: Some(42),
                }),
                ..Default::default()
            };
            write_resp(&fd, &notify, Some(file.as_fd().as_raw_fd()));
            let ack = read_req(&fd);
            assert_eq!(ack.r#type, CriuReqType::Notify as i32);
            assert_eq!(ack.notify_success, Some(true));
            let fail = CriuResp {
                r#type: CriuReqType::Dump as i32,
                success: false,
                cr_errno: Some(libc_enospc()),
                cr_errmsg: Some("Can't write pages".into()),
                ..Default::default()
            };
            write_resp(&fd, &fail, None);
        });
        let mut session = Session::open(&cfg).unwrap();
        session.set_log_path("/x/dump.log");
        let mut seen = Vec::new();
        let err = session
            .call(
                CriuReq {
                    r#type: CriuReqType::Dump as i32,
                    ..Default::default()
                },
                &mut |n| {
                    let mut f = std::fs::File::from(n.fd.expect("fd passed"));
                    let mut s = String::new();
                    f.read_to_string(&mut s).unwrap();
                    seen.push((n.script.len(), n.pid, s));
                    Ok(())
                },
            )
            .unwrap_err();
        h.join().unwrap();
        assert_eq!(seen, vec![(170_000, 42, "pty master stand-in".to_owned())]);
        assert_eq!(err.errno(), Some(Errno::ENOSPC));
        let msg = err.to_string();
        assert!(
            msg.contains("DUMP failed")
                && msg.contains("Can't write pages")
                && msg.contains("/x/dump.log"),
            "{msg}"
        );
    }

    fn libc_enospc() -> i32 {
        Errno::ENOSPC as i32
    }

    #[test]
    fn refused_notification_is_reported_to_criu_and_returned() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, h) = fake_service(dir.path(), |fd| {
            read_req(&fd);
            let notify = CriuResp {
                r#type: CriuReqType::Notify as i32,
                success: true,
                notify: Some(CriuNotify {
                    script: Some("post-dump".into()),
                    pid: None,
                }),
                ..Default::default()
            };
            write_resp(&fd, &notify, None);
            assert_eq!(read_req(&fd).notify_success, Some(false));
            write_resp(
                &fd,
                &CriuResp {
                    r#type: CriuReqType::Dump as i32,
                    success: false,
                    ..Default::default()
                },
                None,
            );
        });
        let err = Session::open(&cfg)
            .unwrap()
            .call(
                CriuReq {
                    r#type: CriuReqType::Dump as i32,
                    ..Default::default()
                },
                &mut |_| Err("no".into()),
            )
            .unwrap_err();
        h.join().unwrap();
        assert!(
            matches!(&err, CriuError::Notify { script, message, .. } if script == "post-dump" && message == "no"),
            "{err}"
        );
    }

    #[test]
    fn cancel_interrupts_a_silent_criu() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (cfg, h) = fake_service(dir.path(), move |fd| {
            read_req(&fd);
            let _ = rx.recv(); // never answers until the test ends
            drop(fd);
        });
        let mut session = Session::open(&cfg).unwrap();
        let canceller = session.canceller();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            canceller.cancel();
        });
        let started = Instant::now();
        let err = session
            .call(
                CriuReq {
                    r#type: CriuReqType::Dump as i32,
                    ..Default::default()
                },
                &mut |_| Ok(()),
            )
            .unwrap_err();
        assert!(matches!(err, CriuError::Cancelled), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        tx.send(()).unwrap();
        h.join().unwrap();
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("criu");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn swrk_dying_reports_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "echo \"criu: args $*\" >&2; exit 1");
        let err = Session::open(&CriuConfig::swrk(&bin))
            .unwrap()
            .version()
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CriuError::Closed { .. }), "{msg}");
        assert!(
            msg.contains("criu: args swrk 3") && msg.contains("VERSION"),
            "{msg}"
        );
    }

    #[test]
    fn cancel_kills_a_hung_swrk_worker() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "exec sleep 600");
        let mut session = Session::open(&CriuConfig::swrk(&bin)).unwrap();
        let pid = session.shared.child_pid.lock().unwrap().unwrap();
        let canceller = session.canceller();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            canceller.cancel();
        });
        let err = session.version().unwrap_err();
        assert!(matches!(err, CriuError::Cancelled), "{err}");
        t.join().unwrap();
        drop(session);
        // Reaped: the pid no longer exists as our child.
        assert!(kill(pid, None).is_err());
    }

    #[test]
    fn missing_binary_is_a_spawn_error() {
        let err = Session::open(&CriuConfig::swrk("/nonexistent/criu"))
            .err()
            .unwrap();
        assert!(matches!(err, CriuError::Spawn { .. }), "{err}");
    }

    #[test]
    fn missing_service_is_a_connect_error() {
        let cfg = CriuConfig {
            binary: "criu".into(),
            service_socket: Some("/nonexistent/criu.sock".into()),
        };
        assert!(matches!(
            Session::open(&cfg).err().unwrap(),
            CriuError::Connect { .. }
        ));
    }

    /// The real CRIU, when this machine has one (the e2e suite requires it).
    #[test]
    fn real_criu_probe_when_present() {
        let criu = std::env::var_os("PODCKPT_CRIU")
            .map(PathBuf::from)
            .unwrap_or_else(|| "criu".into());
        let cfg = CriuConfig::swrk(&criu);
        match Session::open(&cfg) {
            Err(CriuError::Spawn { .. }) => {
                eprintln!("skipping: no {} on this machine", criu.display())
            }
            Err(e) => panic!("{e}"),
            Ok(mut s) => {
                let v = s.version().unwrap();
                assert!(v.major >= 3, "{v}");
                if nix::unistd::geteuid().is_root() {
                    probe(&cfg, (3, 0)).unwrap();
                }
            }
        }
    }
}
