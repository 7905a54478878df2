//! The daemon's listening unix socket: created with mode 0660 under a
//! directory made on demand, guarded by a lock file so that exactly one
//! daemon owns a path, a stale socket left by a crash replaced, and the
//! socket removed again when the daemon stops. Or, under systemd socket
//! activation, the socket systemd holds and passes in ([`from_systemd`]):
//! then it outlives every podckptd, and clients that connect while one
//! restarts wait in its backlog for the next.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;

/// Mode of the listening socket: root and the socket's group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a socket directory podckptd creates.
pub const DIR_MODE: u32 = 0o750;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another live daemon owns this socket path.
    #[error("{path} is in use by another running podckptd (pid {pid}); stop it or choose another --listen path")]
    InUse {
        /// The socket path.
        path: PathBuf,
        /// The pid recorded by the owner, or "unknown".
        pid: String,
    },
    /// Something that is not a socket sits at the path; it is not removed.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The offending path.
        path: PathBuf,
    },
    /// systemd passed something podckptd cannot serve on.
    #[error("socket activation: {reason}")]
    Activation {
        /// What is wrong with what was passed.
        reason: String,
    },
    /// A filesystem or socket call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A bound listening socket; dropping it removes the socket file (if it is
/// still the one this daemon created) and releases the lock.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    ino: u64,
    _lock: Flock<File>,
}

impl BoundSocket {
    /// Takes the listener out (once).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        // Only remove the file if it is still ours: an operator may have
        // started another daemon on the path after removing ours by hand.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.ino() == self.ino {
                if let Err(err) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %err, "could not remove socket");
                }
            }
        }
    }
}

/// Binds `path` as described in the module docs. Must run inside a tokio
/// runtime (the listener is registered with it).
pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io_err("create directory", dir))?;
    }

    // The lock decides ownership; the socket file alone cannot, since a
    // crashed daemon leaves it behind.
    let lock_path = lock_path(path);
    let lock_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err("open lock file", &lock_path))?;
    let mut lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(SocketError::InUse {
                path: path.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.into()
                },
            });
        }
        Err((_, errno)) => {
            return Err(SocketError::Io {
                op: "lock",
                path: lock_path,
                source: errno.into(),
            })
        }
    };
    lock.set_len(0)
        .map_err(io_err("truncate lock file", &lock_path))?;
    lock.rewind()
        .map_err(io_err("rewind lock file", &lock_path))?;
    write!(lock, "{}", std::process::id()).map_err(io_err("write lock file", &lock_path))?;

    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // We hold the lock, so no live podckptd owns it: a crash leftover.
            tracing::info!(path = %path.display(), "replacing stale socket");
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_err("stat", path)(err)),
    }

    // Bind under a temporary name, set the mode, then rename over the final
    // path: clients never see the socket with the wrong mode, and a stale
    // socket is replaced in one step.
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io_err("bind", &tmp))?;
    let setup = fs::set_permissions(&tmp, fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io_err("chmod", &tmp))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("rename socket to", path)))
        .and_then(|()| fs::symlink_metadata(path).map_err(io_err("stat", path)));
    let meta = match setup {
        Ok(meta) => meta,
        Err(err) => {
            let _ = fs::remove_file(&tmp);
            return Err(err);
        }
    };
    Ok(BoundSocket {
        listener: Some(listener),
        path: path.to_path_buf(),
        ino: meta.ino(),
        _lock: lock,
    })
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed, when podckptd was started by socket
/// activation (`LISTEN_PID` is this process and `LISTEN_FDS` at least 1),
/// or None. The variables are removed so that children do not take them.
/// podckptd serves the first descriptor; it must be a listening unix
/// stream socket. Must run inside a tokio runtime.
pub fn from_systemd() -> Result<Option<UnixListener>, SocketError> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    if !ours || count < 1 {
        return Ok(None);
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let invalid = |reason: String| SocketError::Activation { reason };
    // SAFETY: systemd's protocol hands this process descriptor 3 (LISTEN_PID
    // names us); nothing in podckptd opened or owns it before.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let listening = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|e| invalid(format!("descriptor 3 is not a socket: {e}")))?;
    if !listening {
        return Err(invalid(
            "descriptor 3 is not a listening socket (ListenStream=)".into(),
        ));
    }
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| invalid(format!("descriptor 3: {e}")))?;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    std_listener
        .local_addr()
        .map_err(|e| invalid(format!("descriptor 3 is not a unix socket: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| invalid(format!("descriptor 3: {e}")))?;
    UnixListener::from_std(std_listener)
        .map(Some)
        .map_err(|e| invalid(format!("descriptor 3: {e}")))
}

/// The lock file beside a socket path.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_mode_and_removes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/podckpt.sock");
        let sock = bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        let lock = fs::read_to_string(lock_path(&path)).unwrap();
        assert_eq!(lock, std::process::id().to_string());
        drop(sock);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn second_bind_is_refused_while_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podckpt.sock");
        let first = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(err.to_string().contains(&std::process::id().to_string()));
        // The refused attempt must not have removed the live socket.
        assert!(path.exists());
        drop(first);
        bind(&path).unwrap();
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podckpt.sock");
        // A socket left behind by a crashed daemon: bound, never unlinked.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        let sock = bind(&path).unwrap();
        tokio::net::UnixStream::connect(&path).await.unwrap();
        drop(sock);
    }

    #[tokio::test]
    async fn regular_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podckpt.sock");
        fs::write(&path, b"precious").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }
}
