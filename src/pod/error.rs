//! Errors of pod checkpoint and restore, and their one mapping to gRPC
//! status codes.

use std::io;
use std::path::PathBuf;

use tonic::{Code, Status};

use crate::archive::ArchiveError;
use crate::criu::CriuError;
use crate::node::cgroup::CgroupError;

/// What went wrong in a checkpoint or restore.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The request is malformed (bad path, duplicate ids, unknown option).
    #[error("{0}")]
    InvalidArgument(String),
    /// Something the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The system is not in the state the request needs (container not
    /// running, directory not empty, checkpoint already running, CRIU
    /// unusable).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bound would be exceeded (a configured limit, the free space of a
    /// filesystem); nothing was created.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The checkpoint data is damaged (truncated, corrupt compression).
    #[error("{0}")]
    DataLoss(String),
    /// The caller's deadline neared; the call was abandoned, and what it
    /// did is undone (in the background when the undo outlives the answer).
    #[error("deadline exceeded {during}; the call was abandoned and what it did is undone")]
    DeadlineExceeded {
        /// The step that was running.
        during: &'static str,
    },
    /// The caller went away; everything was undone.
    #[error("cancelled {during}; undone")]
    Cancelled {
        /// The step that was running.
        during: &'static str,
    },
    /// The container runtime answered a call with an error.
    #[error("container runtime: {op}: {}", status.message())]
    Runtime {
        /// The CRI call.
        op: &'static str,
        /// The runtime's status (boxed: it is large, and every result
        /// carrying a `PodError` pays for its biggest variant).
        status: Box<Status>,
    },
    /// CRIU failed for a container.
    #[error("CRIU {op} of container {container}: {source}")]
    Criu {
        /// dump or restore.
        op: &'static str,
        /// Container name or id.
        container: String,
        /// CRIU's error (its message, and where its log is kept).
        #[source]
        source: Box<CriuError>,
    },
    /// Freezing or thawing a cgroup failed.
    #[error("container {container}: {source}")]
    Freezer {
        /// Container name or id.
        container: String,
        /// The cgroup error.
        #[source]
        source: CgroupError,
    },
    /// Writing or reading the archive failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A bug: an invariant did not hold or a task panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// The operation failed and undoing it failed too; both are kept.
    #[error("{error}; cleanup also failed: {cleanup}")]
    WithCleanup {
        /// The original error.
        error: Box<PodError>,
        /// What could not be undone.
        cleanup: String,
    },
}

impl PodError {
    /// Shorthand for an [`PodError::Io`] mapper.
    pub fn io<'a>(
        op: &'static str,
        path: impl Into<PathBuf> + 'a,
    ) -> impl FnOnce(io::Error) -> PodError + 'a {
        move |source| PodError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Shorthand for a mapper of an untrusted directory: FailedPrecondition
    /// naming the setting and the directory.
    pub fn unsafe_dir(
        setting: &'static str,
    ) -> impl FnOnce(crate::node::safe_dir::UnsafeDir) -> PodError {
        move |err| PodError::FailedPrecondition(format!("{setting}: untrusted directory: {err}"))
    }

    /// A runtime call failed.
    pub fn runtime(op: &'static str, status: Status) -> PodError {
        PodError::Runtime {
            op,
            status: Box::new(status),
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            PodError::InvalidArgument(_) => Code::InvalidArgument,
            PodError::NotFound(_) => Code::NotFound,
            PodError::FailedPrecondition(_) => Code::FailedPrecondition,
            PodError::DataLoss(_) => Code::DataLoss,
            PodError::ResourceExhausted(_) => Code::ResourceExhausted,
            PodError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            PodError::Cancelled { .. } => Code::Cancelled,
            // The runtime's own verdict passes through: NotFound for an
            // unknown container, Unavailable when it is down.
            PodError::Runtime { status, .. } => status.code(),
            // The capture was tried and failed, and was undone: not the
            // caller's fault (InvalidArgument), not a bug (Internal). Aborted
            // tells the caller nothing changed and a retry may succeed.
            PodError::Criu { .. } | PodError::Freezer { .. } => Code::Aborted,
            PodError::Archive(e) => io_code(e.io_error()),
            PodError::Io { source, .. } => io_code(source),
            PodError::Internal(_) => Code::Internal,
            PodError::WithCleanup { error, .. } => error.code(),
        }
    }
}

fn io_code(err: &io::Error) -> Code {
    use nix::errno::Errno;
    match err.raw_os_error().map(Errno::from_raw) {
        // A full disk or quota: the caller can free space and retry.
        Some(Errno::ENOSPC | Errno::EDQUOT) => Code::ResourceExhausted,
        _ => match err.kind() {
            io::ErrorKind::NotFound => Code::NotFound,
            io::ErrorKind::PermissionDenied => Code::PermissionDenied,
            _ => Code::Internal,
        },
    }
}

impl From<PodError> for Status {
    fn from(err: PodError) -> Status {
        Status::new(err.code(), format!("podckptd: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let enospc = || io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32);
        assert_eq!(
            PodError::InvalidArgument("x".into()).code(),
            Code::InvalidArgument
        );
        assert_eq!(PodError::NotFound("x".into()).code(), Code::NotFound);
        assert_eq!(
            PodError::FailedPrecondition("x".into()).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            PodError::DeadlineExceeded { during: "dump" }.code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            PodError::Cancelled { during: "dump" }.code(),
            Code::Cancelled
        );
        assert_eq!(
            PodError::runtime("ContainerStatus", Status::not_found("gone")).code(),
            Code::NotFound
        );
        assert_eq!(
            PodError::Io {
                op: "write",
                path: "/x".into(),
                source: enospc()
            }
            .code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            PodError::Archive(ArchiveError::Io {
                op: "w",
                path: "/x".into(),
                source: enospc()
            })
            .code(),
            Code::ResourceExhausted
        );
        assert_eq!(PodError::Internal("bug".into()).code(), Code::Internal);
        let both = PodError::WithCleanup {
            error: Box::new(PodError::NotFound("a".into())),
            cleanup: "thaw failed".into(),
        };
        assert_eq!(both.code(), Code::NotFound);
        let status = Status::from(both);
        assert!(
            status
                .message()
                .contains("a; cleanup also failed: thaw failed"),
            "{}",
            status.message()
        );
    }
}
