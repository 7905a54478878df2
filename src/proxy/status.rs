//! The one place where the proxy's own failures become gRPC statuses: a
//! runtime that is down, went away or refused a call, a deadline that
//! passed, a limit a caller went past. Everything the runtime answers
//! itself passes through untouched and never comes here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::body::Body;
use tonic::{Code, Status};

/// Why the proxy answered a call itself instead of relaying the runtime's
/// answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No connection to the runtime could be made.
    #[error("podckptd: container runtime at {} is unavailable: {reason}", socket.display())]
    RuntimeUnavailable {
        /// The runtime's socket.
        socket: Arc<Path>,
        /// What connecting said.
        reason: String,
    },
    /// The runtime's connection ended while the call was on it.
    #[error("podckptd: container runtime at {} went away mid-call: {reason}", socket.display())]
    RuntimeLost {
        /// The runtime's socket.
        socket: Arc<Path>,
        /// What the connection said.
        reason: String,
    },
    /// The runtime refused the call without processing it (GOAWAY or
    /// REFUSED_STREAM): safe to retry.
    #[error("podckptd: container runtime at {} refused the call (it is shutting down or restarting; safe to retry): {reason}", socket.display())]
    RuntimeRefused {
        /// The runtime's socket.
        socket: Arc<Path>,
        /// What the connection said.
        reason: String,
    },
    /// The caller's `grpc-timeout` passed.
    #[error("podckptd: deadline of {deadline:?} expired waiting for the container runtime at {}", socket.display())]
    DeadlineExceeded {
        /// The runtime's socket.
        socket: Arc<Path>,
        /// The caller's timeout.
        deadline: Duration,
    },
    /// A request body past `--max-served-request-bytes`.
    #[error("podckptd: request body larger than {limit} bytes (--max-served-request-bytes)")]
    RequestTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Requests podckptd holds at once past `--max-buffered-bytes`.
    #[error(
        "podckptd: {limit} bytes of requests already held (--max-buffered-bytes); retry later"
    )]
    BufferFull {
        /// The limit.
        limit: usize,
    },
    /// Served calls at once past `--max-served-calls`.
    #[error("podckptd: {limit} checkpoint/restore calls already running (--max-served-calls); retry later")]
    ServedBusy {
        /// The limit.
        limit: usize,
    },
    /// The client's request stream failed before it was complete.
    #[error("podckptd: reading the request: {0}")]
    Request(String),
    /// A call podckptd serves ended without an answer (a bug).
    #[error("podckptd: serving the call failed: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The gRPC code of this failure.
    pub fn code(&self) -> Code {
        match self {
            Self::RuntimeUnavailable { .. }
            | Self::RuntimeLost { .. }
            | Self::RuntimeRefused { .. } => Code::Unavailable,
            Self::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Self::RequestTooLarge { .. } | Self::BufferFull { .. } | Self::ServedBusy { .. } => {
                Code::ResourceExhausted
            }
            Self::Request(_) => Code::Cancelled,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// As a gRPC status.
    pub fn status(&self) -> Status {
        Status::new(self.code(), self.to_string())
    }

    /// As a trailers-only gRPC response.
    pub fn into_response(self) -> http::Response<Body> {
        self.status().into_http()
    }

    /// As trailers ending a response whose headers were already sent.
    pub fn trailers(&self) -> http::HeaderMap {
        let mut trailers = http::HeaderMap::new();
        // The message is percent-encoded by tonic; adding cannot fail for
        // our own ASCII messages, and an empty map still ends the stream.
        let _ = self.status().add_header(&mut trailers);
        trailers
    }
}

/// An error and its sources on one line (hyper's and h2's errors put the
/// useful part, e.g. "Connection refused" or a GOAWAY's code, in a source).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    use std::fmt::Write as _;
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        source = s.source();
    }
    out
}

/// The HTTP/2 error under an error chain, if any (GOAWAY and RST_STREAM
/// codes, with a GOAWAY's debug text).
pub fn h2_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a h2::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> Arc<Path> {
        Path::new("/run/containerd/containerd.sock").into()
    }

    #[test]
    fn codes() {
        let cases = [
            (
                ProxyError::RuntimeUnavailable {
                    socket: socket(),
                    reason: "refused".into(),
                },
                Code::Unavailable,
            ),
            (
                ProxyError::RuntimeRefused {
                    socket: socket(),
                    reason: "GOAWAY".into(),
                },
                Code::Unavailable,
            ),
            (
                ProxyError::DeadlineExceeded {
                    socket: socket(),
                    deadline: Duration::from_millis(5),
                },
                Code::DeadlineExceeded,
            ),
            (
                ProxyError::RequestTooLarge { limit: 1 },
                Code::ResourceExhausted,
            ),
            (ProxyError::BufferFull { limit: 1 }, Code::ResourceExhausted),
            (ProxyError::ServedBusy { limit: 1 }, Code::ResourceExhausted),
            (ProxyError::Request("reset".into()), Code::Cancelled),
            (ProxyError::Internal("panic".into()), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
            let status = Status::from_header_map(&err.trailers()).unwrap();
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), err.to_string());
        }
    }

    #[test]
    fn messages_name_the_runtime_socket() {
        let e = ProxyError::RuntimeUnavailable {
            socket: socket(),
            reason: "Connection refused".into(),
        };
        assert!(e.to_string().contains("/run/containerd/containerd.sock"));
        assert!(e.to_string().contains("Connection refused"));
    }

    #[test]
    fn error_chain_includes_sources_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(error_chain(&e), "transport error: Connection refused");
    }
}
