//! The calls podckptd serves itself (and the ones it looks at before
//! deciding): their requests are read whole, within a per-call and a
//! daemon-wide byte budget, and answered by the gRPC service on the
//! engine's runtime, a limited number at once, so that checkpoint and
//! restore work never runs on the proxy's thread.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tower::{Service, ServiceExt};

use super::limits::Limits;
use super::route::Sniffer;
use super::status::ProxyError;
use super::{Holding, Work};

/// The gRPC service answering the calls podckptd serves (in podckptd the
/// generated `RuntimeServiceServer` of [`PodckptService`](crate::cri::service::PodckptService)).
pub trait ServedCalls:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> ServedCalls for T where
    T: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// The served calls' service and budgets, shared by every connection.
pub(crate) struct Served<S> {
    service: S,
    work: Work,
    calls: Arc<Semaphore>,
    max_calls: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    max_request: usize,
}

/// A request read whole, holding its share of the byte budget until it is
/// dropped.
pub(crate) struct Collected {
    pub(crate) parts: http::request::Parts,
    pub(crate) bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// A served call's place among the calls at once.
pub(crate) struct CallPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// What to do with a looked-at request.
pub(crate) enum Decision {
    /// podckptd answered it.
    Answered(http::Response<Body>),
    /// It goes to the runtime as it is.
    Forward(http::Request<Body>),
}

impl<S: ServedCalls> Served<S> {
    pub(crate) fn new(service: S, work: Work, limits: &Limits) -> Self {
        Self {
            service,
            work,
            calls: Arc::new(Semaphore::new(limits.max_served_calls)),
            max_calls: limits.max_served_calls,
            bytes: Arc::new(Semaphore::new(limits.max_buffered_bytes)),
            max_bytes: limits.max_buffered_bytes,
            max_request: limits.max_served_request_bytes,
        }
    }

    /// A place for one more served call, or ResourceExhausted at once.
    pub(crate) fn admit(&self) -> Result<CallPermit, ProxyError> {
        self.calls
            .clone()
            .try_acquire_owned()
            .map(CallPermit)
            .map_err(|_| ProxyError::ServedBusy {
                limit: self.max_calls,
            })
    }

    /// Reads a request whole. Each chunk takes its bytes from the budget as
    /// it arrives, so a request past either limit is refused at its first
    /// excess byte, not after it was held.
    pub(crate) async fn collect(
        &self,
        req: http::Request<Incoming>,
    ) -> Result<Collected, ProxyError> {
        let (parts, mut body) = req.into_parts();
        let mut buf = BytesMut::new();
        let mut budget: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ProxyError::Request(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue; // request trailers carry nothing for a unary call
            };
            if buf.len() + data.len() > self.max_request {
                return Err(ProxyError::RequestTooLarge {
                    limit: self.max_request,
                });
            }
            let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let more = self.bytes.clone().try_acquire_many_owned(n).map_err(|_| {
                ProxyError::BufferFull {
                    limit: self.max_bytes,
                }
            })?;
            match &mut budget {
                Some(held) => held.merge(more),
                None => budget = Some(more),
            }
            buf.extend_from_slice(&data);
        }
        Ok(Collected {
            parts,
            bytes: buf.freeze(),
            _budget: budget,
        })
    }

    /// Answers a collected request with the service, on the engine's
    /// runtime. A caller that goes away cancels the call (its task is
    /// aborted, as a gRPC server drops a cancelled handler).
    pub(crate) async fn answer(&self, req: Collected, _permit: CallPermit) -> http::Response<Body> {
        let service = self.service.clone();
        let Collected {
            parts,
            bytes,
            _budget,
        } = req;
        let request = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
        let task = AbortOnDrop(self.work.spawn(async move {
            let resp = service.oneshot(request).await;
            drop(_budget);
            resp
        }));
        match task.join().await {
            Ok(Ok(resp)) => resp,
            Ok(Err(never)) => match never {},
            Err(err) => ProxyError::Internal(err.to_string()).into_response(),
        }
    }

    /// Looks at a collected request with `sniffer` on the engine's runtime,
    /// then answers it or hands it back to be forwarded byte for byte.
    pub(crate) async fn decide(&self, req: Collected, sniffer: Sniffer) -> Decision {
        let bytes = req.bytes.clone();
        let ours = self
            .work
            .spawn(async move { sniffer(&bytes) })
            .await
            .unwrap_or(false);
        if ours {
            return match self.admit() {
                Ok(permit) => Decision::Answered(self.answer(req, permit).await),
                Err(err) => Decision::Answered(err.into_response()),
            };
        }
        // The bytes stay counted against the budget until they are sent.
        let Collected {
            parts,
            bytes,
            _budget,
        } = req;
        let body = Holding::new(Body::new(http_body_util::Full::new(bytes)), _budget);
        Decision::Forward(http::Request::from_parts(parts, Body::new(body)))
    }
}

/// A served call's task, aborted when its caller stops waiting.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
