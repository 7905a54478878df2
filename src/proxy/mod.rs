//! podckptd's CRI proxy: the only HTTP/2 code in podckpt, on `hyper` and
//! `h2` (the stack tonic and linkerd2-proxy run on, hardened against the
//! HTTP/2 denial-of-service classes: HPACK and CONTINUATION abuse, rapid
//! reset, SETTINGS and PING floods, oversized frames, flow-control
//! violations).
//!
//! Every client connection is served by hyper with the [`Limits`], and
//! each call is routed by its path:
//! - the calls podckptd serves ([`Intercept`]) are read whole within a
//!   byte budget and answered by the gRPC service on the engine's runtime
//!   ([`served`]);
//! - a method whose requests podckptd looks at first (CreateContainer from
//!   an archive) is read whole, then answered or forwarded as the same
//!   bytes;
//! - everything else is forwarded by path without decoding ([`forward`]):
//!   headers, body and trailers stream both ways, with each side's own
//!   flow control, so backpressure holds end to end.
//!
//! Connection-level frames (SETTINGS, PING, WINDOW_UPDATE) are each side's
//! own business: podckptd answers the client's and the runtime's, and
//! relays none. Failures of the proxy's own (runtime down, deadline, limits)
//! become gRPC statuses in one place ([`status`]).

mod forward;
pub mod limits;
pub mod route;
mod served;
mod server;
pub mod status;

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tonic::body::Body;

use forward::{RuntimeEndpoint, Upstream};
pub use limits::Limits;
pub use route::{grpc_message, grpc_timeout, Intercept, Observer, Sniffer};
pub use served::ServedCalls;
use served::{Decision, Served};
pub use server::serve;

/// Where the proxy hands work that must not run on its own thread: the
/// engine's runtime (served calls, sniffing, observers).
pub type Work = tokio::runtime::Handle;

/// The proxy: routes, limits, the runtime's endpoint and the service for
/// the calls podckptd serves. One per daemon; each client connection gets
/// its own runtime connection from it.
pub struct Proxy<S> {
    shared: Arc<Shared<S>>,
}

struct Shared<S> {
    routes: Intercept,
    served: Served<S>,
    runtime: Arc<RuntimeEndpoint>,
    limits: Limits,
    work: Work,
}

impl<S: ServedCalls> Proxy<S> {
    /// A proxy to the runtime socket `runtime`, serving `routes` with
    /// `served` on `work`.
    pub fn new(
        runtime: &Path,
        connect_timeout: Duration,
        limits: Limits,
        routes: Intercept,
        served: S,
        work: Work,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        let runtime = Arc::new(RuntimeEndpoint::new(
            runtime,
            connect_timeout,
            &limits,
            metrics,
        ));
        let served = Served::new(served, work.clone(), &limits);
        Self {
            shared: Arc::new(Shared {
                routes,
                served,
                runtime,
                limits,
                work,
            }),
        }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// The service for one client connection, and that connection's
    /// activity (what its idle timeout and eviction look at).
    fn connection(&self) -> (Connection<S>, Arc<Activity>) {
        let activity = Arc::new(Activity::new());
        let conn = Connection {
            shared: self.shared.clone(),
            upstream: Arc::new(Upstream::new(self.shared.runtime.clone())),
            activity: activity.clone(),
        };
        (conn, activity)
    }
}

/// One client connection's service.
struct Connection<S> {
    shared: Arc<Shared<S>>,
    upstream: Arc<Upstream>,
    activity: Arc<Activity>,
}

impl<S> Clone for Connection<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            upstream: self.upstream.clone(),
            activity: self.activity.clone(),
        }
    }
}

impl<S: ServedCalls> hyper::service::Service<http::Request<Incoming>> for Connection<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let this = self.clone();
        // In flight until the answer's last frame went out (or the call
        // was cancelled): the idle timeout counts from then.
        let busy = Busy::new(self.activity.clone());
        Box::pin(async move {
            let resp = this.route(req).await;
            Ok(resp.map(|body| Body::new(Holding::new(body, busy))))
        })
    }
}

impl<S: ServedCalls> Connection<S> {
    async fn route(&self, req: http::Request<Incoming>) -> http::Response<Body> {
        let shared = &self.shared;
        let path = req.uri().path();
        if shared.routes.matches(path) {
            tracing::debug!(path, "serving");
            let permit = match shared.served.admit() {
                Ok(p) => p,
                Err(err) => return err.into_response(),
            };
            return match shared.served.collect(req).await {
                Ok(collected) => shared.served.answer(collected, permit).await,
                Err(err) => err.into_response(),
            };
        }
        if let Some(sniffer) = shared.routes.sniffer(path) {
            let collected = match shared.served.collect(req).await {
                Ok(c) => c,
                Err(err) => return err.into_response(),
            };
            return match shared.served.decide(collected, sniffer).await {
                Decision::Answered(resp) => resp,
                Decision::Forward(req) => self.upstream.forward(req, None).await,
            };
        }
        let observer = shared
            .routes
            .observer(path)
            .map(|o| (o, shared.work.clone()));
        self.upstream.forward(req.map(Body::new), observer).await
    }
}

/// A connection's calls in flight and when the last one ended.
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    /// Nanoseconds from `epoch` to the end of the last call.
    last: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Since when the connection has had no call in flight, if it has none.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| self.epoch + Duration::from_nanos(self.last.load(Ordering::Acquire)))
    }
}

/// One call in flight on a connection.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        let now = u64::try_from(a.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        a.last.store(now, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A body that holds something (a budget permit, a call's place) until
    /// it is done or dropped.
    pub(crate) struct Holding<G> {
        #[pin]
        inner: Body,
        guard: G,
    }
}

impl<G> Holding<G> {
    pub(crate) fn new(inner: Body, guard: G) -> Self {
        Self { inner, guard }
    }
}

impl<G> HttpBody for Holding<G> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
