//! Forwarding a call to the runtime by its path, without decoding it: the
//! request's headers and body stream into a request on podckptd's own
//! HTTP/2 connection to the runtime, and the response's headers, body and
//! trailers stream back, each side with its own flow control, so a slow
//! reader slows only its own call.
//!
//! Each client connection gets its own runtime connection, made on its first
//! forwarded call: one client's stalled stream (an unread event stream
//! fills a connection window) can never hold up another client's calls.
//! podckptd's connection sends the runtime no PINGs of its own and none of
//! the client's (gRPC servers count PINGs that follow no data of theirs as
//! abuse and close the connection).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixStream;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;

use super::limits::Limits;
use super::route::{grpc_timeout, Observer};
use super::status::{error_chain, h2_error, ProxyError};
use super::Work;
use crate::metrics::{ErrorSource, MethodClass, Metrics};

/// How to reach the runtime: its socket, the limits of the connection, the
/// time a connection may take.
pub(crate) struct RuntimeEndpoint {
    pub(crate) socket: Arc<Path>,
    pub(crate) connect_timeout: Duration,
    builder: http2::Builder<TokioExecutor>,
    metrics: Metrics,
}

impl RuntimeEndpoint {
    pub(crate) fn new(
        socket: &Path,
        connect_timeout: Duration,
        limits: &Limits,
        metrics: Metrics,
    ) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(limits.stream_window)
            .initial_connection_window_size(limits.connection_window)
            // BDP pings would count against the runtime's ping policy.
            .adaptive_window(false)
            .max_frame_size(limits.max_frame_size)
            .max_header_list_size(limits.runtime_max_header_list_size)
            .max_send_buf_size(limits.max_send_buffer)
            .max_pending_accept_reset_streams(limits.max_pending_reset_streams)
            .max_local_error_reset_streams(limits.max_error_reset_streams)
            // As many calls as a client may have open with us.
            .initial_max_send_streams(limits.max_concurrent_streams as usize);
        Self {
            socket: socket.into(),
            connect_timeout,
            builder,
            metrics,
        }
    }
}

/// One client connection's connection to the runtime, made on first use
/// and made again after the runtime went away.
pub(crate) struct Upstream {
    endpoint: Arc<RuntimeEndpoint>,
    current: Mutex<Option<Live>>,
    /// Held while connecting, so that concurrent first calls share one
    /// connection instead of racing to make several.
    connecting: tokio::sync::Mutex<()>,
}

/// A runtime connection in use, and whether podckptd is the one closing it
/// (so the driver knows an ending was not the runtime's doing).
#[derive(Clone)]
struct Live {
    sender: SendRequest<Body>,
    closing: Arc<AtomicBool>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Ok(Some(live)) = self.current.get_mut().map(Option::take) {
            live.closing.store(true, Ordering::Relaxed);
        }
    }
}

impl Upstream {
    pub(crate) fn new(endpoint: Arc<RuntimeEndpoint>) -> Self {
        Self {
            endpoint,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn socket(&self) -> Arc<Path> {
        self.endpoint.socket.clone()
    }

    fn live(&self) -> Option<SendRequest<Body>> {
        let current = self.current.lock().ok()?;
        current
            .as_ref()
            .filter(|l| !l.sender.is_closed())
            .map(|l| l.sender.clone())
    }

    fn forget(&self) {
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }

    /// A sender on a live connection, connecting if there is none.
    async fn sender(&self) -> Result<SendRequest<Body>, ProxyError> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let _one = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let live = self.connect().await?;
        let sender = live.sender.clone();
        if let Ok(mut current) = self.current.lock() {
            *current = Some(live);
        }
        Ok(sender)
    }

    async fn connect(&self) -> Result<Live, ProxyError> {
        let ep = &self.endpoint;
        let unavailable = |reason: String| ProxyError::RuntimeUnavailable {
            socket: self.socket(),
            reason,
        };
        let handshake = async {
            let stream = UnixStream::connect(&*ep.socket)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            ep.builder
                .handshake::<_, Body>(TokioIo::new(stream))
                .await
                .map_err(|e| unavailable(error_chain(&e)))
        };
        let connected = tokio::time::timeout(ep.connect_timeout, handshake)
            .await
            .map_err(|_| unavailable(format!("no connection within {:?}", ep.connect_timeout)))
            .and_then(|r| r);
        ep.metrics.runtime_up(connected.is_ok());
        let (sender, conn) = connected?;
        let closing = Arc::new(AtomicBool::new(false));
        ep.metrics.runtime_connection(true);
        tokio::spawn(drive(
            conn,
            self.socket(),
            closing.clone(),
            ep.metrics.clone(),
        ));
        tracing::debug!(runtime = %ep.socket.display(), "connected to the runtime");
        Ok(Live { sender, closing })
    }

    /// Forwards one call; its answer, or the proxy's own status when the
    /// runtime cannot give one. `observer` runs (on the engine's runtime)
    /// once the runtime answered the call.
    pub(crate) async fn forward(
        &self,
        req: http::Request<Body>,
        observer: Option<(Observer, Work)>,
    ) -> http::Response<Body> {
        let req = with_authority(req);
        let class = MethodClass::of(req.uri().path());
        let metrics = &self.endpoint.metrics;
        metrics.relayed(class);
        let timeout = grpc_timeout(req.headers());
        let deadline = timeout.map(|t| Instant::now() + t);
        let sent = self.send(req);
        let resp = match deadline {
            Some(at) => match tokio::time::timeout_at(at, sent).await {
                Ok(r) => r,
                Err(_) => Err(self.deadline_exceeded(timeout)),
            },
            None => sent.await,
        };
        match resp {
            Ok(resp) => {
                // A trailers-only answer (an error at once) has its status
                // in the headers.
                if failed(resp.headers()) {
                    metrics.relay_error(class, ErrorSource::Runtime);
                }
                resp.map(|inner| {
                    Body::new(UpstreamBody {
                        inner,
                        socket: self.socket(),
                        deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
                        timeout,
                        observer,
                        done: false,
                        metrics: metrics.clone(),
                        class,
                    })
                })
            }
            Err(err) => {
                metrics.relay_error(class, ErrorSource::Podckptd);
                tracing::debug!(error = %err, "call answered by podckptd");
                err.into_response()
            }
        }
    }

    fn deadline_exceeded(&self, timeout: Option<Duration>) -> ProxyError {
        ProxyError::DeadlineExceeded {
            socket: self.socket(),
            deadline: timeout.unwrap_or_default(),
        }
    }

    /// Sends the request, once more on a new connection if the current one
    /// turned out closed before the request went out (the runtime restarted
    /// since the last call): that retry is safe, nothing reached it.
    async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Incoming>, ProxyError> {
        let mut req = req;
        let mut retried = false;
        loop {
            let mut sender = self.sender().await?;
            let outcome = match sender.ready().await {
                Ok(()) => sender.try_send_request(req).await,
                Err(err) => {
                    self.forget();
                    if retried {
                        return Err(self.lost(&err));
                    }
                    retried = true;
                    continue;
                }
            };
            match outcome {
                Ok(resp) => return Ok(resp),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if !retried => {
                        self.forget();
                        retried = true;
                        req = unsent;
                    }
                    _ => return Err(self.lost(err.error())),
                },
            }
        }
    }

    fn lost(&self, err: &hyper::Error) -> ProxyError {
        let reason = error_chain(err);
        let refused = h2_error(err).and_then(h2::Error::reason) == Some(h2::Reason::REFUSED_STREAM);
        if refused {
            ProxyError::RuntimeRefused {
                socket: self.socket(),
                reason,
            }
        } else {
            ProxyError::RuntimeLost {
                socket: self.socket(),
                reason,
            }
        }
    }
}

/// The request with `localhost` as its authority when the client sent
/// none usable (C-core clients send the socket's path, which h2 leaves
/// out): HTTP/2 needs `:scheme` with it, and grpc-go and the kubelet send
/// `localhost` over unix sockets.
fn with_authority(req: http::Request<Body>) -> http::Request<Body> {
    if req.uri().authority().is_some() {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    let mut uri = http::uri::Parts::from(std::mem::take(&mut parts.uri));
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(http::uri::Authority::from_static("localhost"));
    if let Ok(u) = http::Uri::from_parts(uri) {
        parts.uri = u;
    }
    http::Request::from_parts(parts, body)
}

/// Drives a runtime connection to its end and says how it ended: the
/// runtime's GOAWAY (its code and debug text) or a lost connection at WARN,
/// podckptd's own closing at DEBUG.
async fn drive<F>(conn: F, socket: Arc<Path>, closing: Arc<AtomicBool>, metrics: Metrics)
where
    F: Future<Output = hyper::Result<()>>,
{
    let result = conn.await;
    metrics.runtime_connection(false);
    let ours = closing.load(Ordering::Relaxed);
    match result {
        Ok(()) if ours => tracing::debug!(runtime = %socket.display(), "runtime connection closed"),
        Ok(()) => {
            tracing::warn!(runtime = %socket.display(), "the runtime closed its connection (GOAWAY NO_ERROR or end of stream)")
        }
        Err(err) => {
            let h2 = h2_error(&err);
            tracing::warn!(
                runtime = %socket.display(),
                code = ?h2.and_then(h2::Error::reason),
                goaway = h2.is_some_and(h2::Error::is_go_away),
                remote = h2.is_some_and(h2::Error::is_remote),
                error = %error_chain(&err),
                "runtime connection lost"
            );
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body from the runtime, relayed frame by frame. It ends
    /// the call with a gRPC status of podckptd's when the runtime cannot:
    /// Unavailable if the runtime's connection fails mid-stream,
    /// DeadlineExceeded (and the runtime's stream cancelled) when the
    /// caller's deadline passes first.
    struct UpstreamBody {
        #[pin]
        inner: Incoming,
        socket: Arc<Path>,
        deadline: Option<Pin<Box<Sleep>>>,
        timeout: Option<Duration>,
        observer: Option<(Observer, Work)>,
        done: bool,
        metrics: Metrics,
        class: MethodClass,
    }
}

/// Whether response headers or trailers carry a non-OK `grpc-status`.
fn failed(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() != b"0")
}

impl UpstreamBody {
    fn end(
        self: Pin<&mut Self>,
        err: ProxyError,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        *this.done = true;
        this.metrics.relay_error(*this.class, ErrorSource::Podckptd);
        tracing::debug!(error = %err, "relayed call ended by podckptd");
        Poll::Ready(Some(Ok(Frame::trailers(err.trailers()))))
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.as_mut().project().deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                let err = ProxyError::DeadlineExceeded {
                    socket: self.socket.clone(),
                    deadline: self.timeout.unwrap_or_default(),
                };
                return self.end(err);
            }
        }
        let polled = ready!(self.as_mut().project().inner.poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if failed(trailers) {
                        self.metrics.relay_error(self.class, ErrorSource::Runtime);
                    }
                    self.as_mut().finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                self.as_mut().finish();
                Poll::Ready(None)
            }
            Some(Err(err)) => {
                let err = ProxyError::RuntimeLost {
                    socket: self.socket.clone(),
                    reason: error_chain(&err),
                };
                self.end(err)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl UpstreamBody {
    /// The runtime answered the call: tell its observer, on the engine's
    /// runtime (an observer may start engine work).
    fn finish(self: Pin<&mut Self>) {
        let this = self.project();
        *this.done = true;
        if let Some((observer, work)) = this.observer.take() {
            work.spawn(async move { observer() });
        }
    }
}
