//! The endpoint Prometheus scrapes, when `--metrics-listen` is set:
//! `GET /metrics` over HTTP/1.1 on a TCP address of the operator's choice
//! (off by default: podckptd opens no TCP port unless told to). Bounded like
//! everything else podckptd serves: a few connections at once, each with a
//! time limit, so a stuck scraper costs nothing else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Metrics;

/// Scrape connections served at once; more are closed at accept. A
/// Prometheus server keeps one per target.
pub const MAX_SCRAPE_CONNECTIONS: usize = 4;
/// The most one scrape connection may stay open (headers, answer, keep-alive).
pub const SCRAPE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a scraper has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the OpenMetrics text format the encoder writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves scrapes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%err, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, limit = MAX_SCRAPE_CONNECTIONS, "metrics: too many scrape connections, closing");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(SCRAPE_CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(%peer, %err, "metrics: scrape connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics: scrape connection timed out"),
            }
            drop(slot);
        });
    }
}

fn answer<B>(req: &http::Request<B>, metrics: &Metrics) -> http::Response<Full<Bytes>> {
    let response = |status: http::StatusCode, ctype: &'static str, body: Bytes| {
        let mut r = http::Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return response(
            http::StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"podckptd serves /metrics only\n"),
        );
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return response(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"GET /metrics\n"),
        );
    }
    response(
        http::StatusCode::OK,
        CONTENT_TYPE,
        Bytes::from(metrics.encode()),
    )
}
