//! The transparent CRI proxy.
//!
//! Every call that podckptd does not serve itself is forwarded to the
//! runtime by its HTTP/2 path, without decoding: headers (metadata and
//! `grpc-timeout`), message bytes, trailers (status, message, details) and
//! server-streamed responses pass both ways untouched, so a kubelet or
//! runtime newer than this proto keeps working. Only the paths in the
//! [`Intercept`] set go to podckptd's own service, and the requests a
//! sniffer claims: for those paths the (unary) request is buffered and
//! looked at, then either served locally or forwarded as the very same
//! bytes.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::Status;
use tower::{Service, ServiceExt};

/// Decides from a unary request's encoded gRPC frame whether podckptd
/// serves it.
pub type Sniffer = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Called after a forwarded call of an observed method was answered.
pub type Observer = Arc<dyn Fn() + Send + Sync>;

/// The request paths podckptd answers itself instead of forwarding.
#[derive(Clone, Default)]
pub struct Intercept {
    paths: Arc<[String]>,
    sniffed: Arc<[(String, Sniffer)]>,
    observed: Arc<[(String, Observer)]>,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("paths", &self.paths)
            .field(
                "sniffed",
                &self.sniffed.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Intercept {
    /// Intercepts exactly the given `(service, method)` pairs.
    pub fn new<'a>(methods: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let paths: Vec<String> = methods
            .into_iter()
            .map(|(service, method)| format!("/{service}/{method}"))
            .collect();
        Self {
            paths: paths.into(),
            sniffed: Arc::new([]),
            observed: Arc::new([]),
        }
    }

    /// Calls `observer` after each forwarded call of this method has been
    /// answered by the runtime (the call itself passes untouched).
    pub fn with_observer(mut self, service: &str, method: &str, observer: Observer) -> Self {
        let mut v: Vec<(String, Observer)> = self.observed.iter().cloned().collect();
        v.push((format!("/{service}/{method}"), observer));
        self.observed = v.into();
        self
    }

    /// The observer of a forwarded method, if it has one.
    pub(crate) fn observer(&self, path: &str) -> Option<Observer> {
        self.observed
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, o)| o.clone())
    }

    /// Also intercepts the requests of a unary method that `sniffer`
    /// claims; the others are forwarded byte for byte.
    pub fn with_sniffer(mut self, service: &str, method: &str, sniffer: Sniffer) -> Self {
        let mut v: Vec<(String, Sniffer)> = self.sniffed.iter().cloned().collect();
        v.push((format!("/{service}/{method}"), sniffer));
        self.sniffed = v.into();
        self
    }

    /// Whether a request with this path is served locally.
    pub fn matches(&self, path: &str) -> bool {
        // A handful of entries: a linear scan beats hashing here.
        self.paths.iter().any(|p| p == path)
    }

    /// Whether podckptd takes calls of this path in (to serve, or to sniff
    /// and then serve or forward); every other path is relayed.
    pub fn serves(&self, path: &str) -> bool {
        self.matches(path) || self.sniffed.iter().any(|(p, _)| p == path)
    }

    fn sniffer(&self, path: &str) -> Option<Sniffer> {
        self.sniffed
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, s)| s.clone())
    }
}

/// The message of a single, uncompressed gRPC frame.
pub fn grpc_message(frame: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = frame.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    rest[4..].get(..len)
}

/// The proxy service: one clone per connection, cheap to clone.
#[derive(Clone)]
pub struct CriProxy<L> {
    upstream: Channel,
    upstream_path: Arc<Path>,
    intercept: Intercept,
    local: L,
}

impl<L> CriProxy<L> {
    /// A proxy forwarding to `upstream` (a channel to the runtime socket at
    /// `upstream_path`, named in errors), serving `intercept` with `local`.
    pub fn new(upstream: Channel, upstream_path: PathBuf, intercept: Intercept, local: L) -> Self {
        Self {
            upstream,
            upstream_path: upstream_path.into(),
            intercept,
            local,
        }
    }
}

impl<L, B> Service<http::Request<B>> for CriProxy<L>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
    L: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    L::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is checked per call below, so that a runtime that is down
        // fails the call with Unavailable instead of stalling the connection.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let req = req.map(Body::new);
        if self.intercept.matches(req.uri().path()) {
            tracing::debug!(path = req.uri().path(), "serving locally");
            let local = self.local.clone();
            return Box::pin(local.oneshot(req));
        }
        let upstream = self.upstream.clone();
        let upstream_path = self.upstream_path.clone();
        if let Some(sniffer) = self.intercept.sniffer(req.uri().path()) {
            let local = self.local.clone();
            return Box::pin(async move {
                let (parts, body) = req.into_parts();
                let bytes = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
                    body,
                    SNIFF_LIMIT,
                ))
                .await
                {
                    Ok(collected) => collected.to_bytes(),
                    Err(err) => {
                        return Ok(Status::invalid_argument(format!(
                            "podckptd: reading the request: {err}"
                        ))
                        .into_http())
                    }
                };
                let ours = sniffer(&bytes);
                let req =
                    http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
                if ours {
                    tracing::debug!(path = req.uri().path(), "serving locally (sniffed)");
                    local.oneshot(req).await
                } else {
                    forward(upstream, upstream_path, req).await
                }
            });
        }
        if let Some(observer) = self.intercept.observer(req.uri().path()) {
            return Box::pin(async move {
                let resp = forward(upstream, upstream_path, req).await;
                observer();
                resp
            });
        }
        Box::pin(forward(upstream, upstream_path, req))
    }
}

/// The largest request the proxy buffers to sniff.
const SNIFF_LIMIT: usize = crate::cri::client::MAX_MESSAGE_SIZE;

/// Forwards one call to the runtime.
async fn forward(
    upstream: Channel,
    upstream_path: Arc<Path>,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    // The runtime gets the caller's grpc-timeout header and enforces
    // it; the channel enforces it too (tonic reads the same header),
    // so a wedged runtime cannot hold a call past its deadline.
    match upstream.oneshot(req).await {
        Ok(resp) => Ok(resp.map(|body| {
            Body::new(UpstreamBody {
                inner: body,
                upstream_path: upstream_path.clone(),
                done: false,
            })
        })),
        Err(err) if is_timeout(&err) => {
            tracing::debug!(%path, "deadline expired waiting for the runtime");
            Ok(Status::deadline_exceeded(format!(
                "podckptd: deadline expired waiting for the container runtime at {}",
                upstream_path.display()
            ))
            .into_http())
        }
        Err(err) => {
            let msg = format!(
                "podckptd: container runtime at {} is unavailable: {}",
                upstream_path.display(),
                error_chain(&err)
            );
            tracing::debug!(%path, error = %msg, "forward failed");
            Ok(Status::unavailable(msg).into_http())
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body from the runtime. If the runtime goes away mid-stream
    /// the client gets a proper gRPC `Unavailable` status in the trailers
    /// rather than a reset HTTP/2 stream it cannot interpret.
    struct UpstreamBody {
        #[pin]
        inner: Body,
        upstream_path: Arc<Path>,
        done: bool,
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            None => {
                *this.done = true;
                Poll::Ready(None)
            }
            Some(Err(err)) => {
                *this.done = true;
                let status = Status::unavailable(format!(
                    "podckptd: container runtime at {} went away mid-call: {}",
                    this.upstream_path.display(),
                    err
                ));
                tracing::debug!(error = %err, "upstream body failed");
                let mut trailers = http::HeaderMap::new();
                match status.add_header(&mut trailers) {
                    Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Err(status) => Poll::Ready(Some(Err(status))),
                }
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

/// The caller's deadline from a `grpc-timeout` header (gRPC over HTTP/2:
/// at most 8 digits and a unit of H, M, S, m, u or n). A malformed header
/// is ignored, as gRPC servers do.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    grpc_timeout_value(headers.get("grpc-timeout")?.as_bytes())
}

/// A `grpc-timeout` header's value as a duration.
pub fn grpc_timeout_value(value: &[u8]) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether the channel gave up because the call's `grpc-timeout` passed.
fn is_timeout(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// An error and its sources on one line (tonic's transport errors put the
/// useful part, e.g. "Connection refused", in a source).
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercept_matches_exact_paths_only() {
        let i = Intercept::new([("runtime.v1.RuntimeService", "CheckpointPod")]);
        assert!(i.matches("/runtime.v1.RuntimeService/CheckpointPod"));
        assert!(!i.matches("/runtime.v1.RuntimeService/CheckpointPodX"));
        assert!(!i.matches("/runtime.v1.ImageService/CheckpointPod"));
        assert!(!i.matches("/runtime.v1.RuntimeService/Version"));
    }

    #[test]
    fn grpc_timeout_units() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("200m"), Some(Duration::from_millis(200)));
        assert_eq!(h("3S"), Some(Duration::from_secs(3)));
        assert_eq!(h("2M"), Some(Duration::from_secs(120)));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(h("5n"), Some(Duration::from_nanos(5)));
        assert_eq!(h("123456789S"), None, "more than 8 digits");
        assert_eq!(h("10x"), None);
        assert_eq!(h("m"), None);
        assert_eq!(h("-1S"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
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
