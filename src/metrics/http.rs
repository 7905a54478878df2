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
use crate::config::parse_duration;

/// The scrape endpoint's limits, as settings (`podckptd --help`): a
/// Prometheus server keeps one connection per target and sends a request of
/// a few hundred bytes, so the defaults are small.
#[derive(Clone, Debug, clap::Args)]
pub struct ScrapeLimits {
    /// Scrape connections (--metrics-listen) served at once; more are closed
    /// at accept.
    #[arg(
        long,
        env = "PODCKPT_METRICS_MAX_CONNECTIONS",
        default_value_t = 4,
        value_name = "N"
    )]
    pub metrics_max_connections: usize,

    /// The most one scrape connection may stay open (request, answer,
    /// keep-alive).
    #[arg(long, env = "PODCKPT_METRICS_CONNECTION_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub metrics_connection_timeout: Duration,

    /// Time a scraper has to send its request headers.
    #[arg(long, env = "PODCKPT_METRICS_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub metrics_header_timeout: Duration,

    /// The most bytes of a scrape request (request line and headers)
    /// buffered; a larger one is refused and its connection closed. At
    /// least 8192.
    #[arg(
        long,
        env = "PODCKPT_METRICS_MAX_REQUEST_BYTES",
        default_value_t = 16 * 1024,
        value_name = "BYTES"
    )]
    pub metrics_max_request_bytes: usize,
}

/// hyper's smallest read buffer (its `max_buf_size` panics below it).
const MIN_REQUEST_BYTES: usize = 8192;

impl ScrapeLimits {
    /// Checks the limits; the error names the flag.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.metrics_max_connections == 0 {
            return Err(("metrics-max-connections", "must be at least 1".into()));
        }
        for (flag, d) in [
            (
                "metrics-connection-timeout",
                self.metrics_connection_timeout,
            ),
            ("metrics-header-timeout", self.metrics_header_timeout),
        ] {
            if d.is_zero() {
                return Err((flag, "must be greater than zero".into()));
            }
        }
        if self.metrics_max_request_bytes < MIN_REQUEST_BYTES {
            return Err((
                "metrics-max-request-bytes",
                format!("must be at least {MIN_REQUEST_BYTES}"),
            ));
        }
        Ok(())
    }
}

/// The content type of the OpenMetrics text format the encoder writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves scrapes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics, limits: ScrapeLimits) {
    let slots = Arc::new(Semaphore::new(limits.metrics_max_connections));
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
            tracing::debug!(%peer, limit = limits.metrics_max_connections, "metrics: too many scrape connections, closing");
            continue;
        };
        let metrics = metrics.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.metrics_header_timeout)
                .max_buf_size(limits.metrics_max_request_bytes)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.metrics_connection_timeout, conn).await {
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
