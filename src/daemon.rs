//! podckptd's lifecycle: bind the socket, serve the proxy on every accepted
//! connection, and on shutdown stop accepting, drain in-flight calls within
//! a grace period and remove the socket.

use std::future::Future;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::UnixListener;
use tokio::task::JoinSet;

use crate::config::Validated;
use crate::cri::client::{self, CriClient};
use crate::cri::proxy::CriProxy;
use crate::cri::service::PodckptService;
use crate::criu::CriuConfig;
use crate::pod::checkpoint::{self, Checkpointer, Settings};
use crate::pod::restore::Restorer;
use crate::socket::{self, SocketError};

/// At most this many client connections are served at once; the kubelet
/// holds a few, crictl one per invocation.
pub const MAX_CONNECTIONS: usize = 1024;
/// HTTP/2 streams (calls) allowed at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The listening socket could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
}

/// Runs podckptd until `shutdown` completes.
pub async fn run(config: Validated, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let mut bound = socket::bind(&config.config.listen)?;
    let Some(listener) = bound.take_listener() else {
        unreachable!("a freshly bound socket has its listener");
    };
    let upstream = client::channel(&config.runtime_socket, config.config.connect_timeout);
    let (checkpointer, restorer) = engines(&config, upstream.clone()).await;
    let background = restorer.clone();
    let service = PodckptService::new(checkpointer, restorer);
    let proxy = CriProxy::new(
        upstream,
        config.runtime_socket.clone(),
        service.intercept(),
        service.into_server(),
    );
    tracing::info!(
        listen = %config.config.listen.display(),
        runtime = %config.runtime_socket.display(),
        "podckptd serving"
    );
    serve(listener, proxy, shutdown, config.config.shutdown_grace).await;
    // Dropping the bound socket removes the socket file and the lock.
    drop(bound);
    // Restored pods whose archives are still being extracted would fail to
    // start if podckptd went away now: give them the same grace.
    if !background
        .finish_extractions(config.config.shutdown_grace)
        .await
    {
        tracing::warn!(grace = ?config.config.shutdown_grace, "background extractions still running at exit: their containers will fail to start");
    }
    tracing::info!("podckptd stopped");
    Ok(())
}

/// Sets up the checkpoint and restore engines: first undo what an interrupted
/// checkpoint of a previous podckptd left (frozen cgroups, partial files),
/// then check CRIU. A missing or too old CRIU does not stop the daemon: the
/// proxy keeps working and checkpoint calls say why they cannot run.
async fn engines(
    config: &Validated,
    upstream: tonic::transport::Channel,
) -> (Checkpointer, Restorer) {
    let c = &config.config;
    let state_dir = c.state_dir.clone();
    let undone = tokio::task::spawn_blocking(move || checkpoint::recover(&state_dir))
        .await
        .unwrap_or(0);
    if undone > 0 {
        tracing::warn!(undone, "recovered from interrupted checkpoints");
    }
    let criu = CriuConfig {
        binary: c.criu.clone(),
        service_socket: c.criu_service_socket.clone(),
    };
    let probe_cfg = criu.clone();
    let readiness = match tokio::task::spawn_blocking(move || {
        crate::criu::probe(&probe_cfg, crate::criu::MIN_VERSION)
    })
    .await
    {
        Ok(Ok(version)) => {
            tracing::info!(criu = %version, "CRIU ready: CheckpointPod and CheckpointContainer served");
            Ok(version.to_string())
        }
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "CRIU unusable: checkpoint calls will fail with FailedPrecondition; the proxy works");
            Err(err.to_string())
        }
        Err(err) => Err(format!("CRIU probe failed: {err}")),
    };
    let workers = if c.zstd_workers > 0 {
        c.zstd_workers
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    };
    let settings = Settings {
        criu,
        staging_dir: c.staging_dir.clone(),
        state_dir: c.state_dir.clone(),
        max_parallel_dumps: c.max_parallel_dumps,
        zstd_workers: workers,
        warm_staging: c.warm_staging,
    };
    let cri = CriClient::from_channel(upstream);
    // podckpt-runc restores with the CRIU that dumped, when it is named by
    // path (a bare `criu` means the one on the runtime's PATH).
    let restore_criu =
        (c.criu_service_socket.is_none() && c.criu.is_absolute()).then(|| c.criu.clone());
    let restorer = Restorer::new(
        cri.clone(),
        c.restore_dir.clone(),
        readiness.clone(),
        restore_criu,
    );
    // Registrations of containers removed while podckptd was down, in the
    // background: serving must not wait for a slow or absent runtime (the
    // next RestorePod or removal collects again).
    let gc = restorer.clone();
    tokio::spawn(async move {
        if let Err(err) = gc.collect_garbage().await {
            tracing::debug!(error = %err, "restore garbage collection postponed");
        }
    });
    (Checkpointer::new(settings, cri, readiness), restorer)
}

/// Serves `proxy` on `listener` until `shutdown`, then drains for at most
/// `grace`. Separate from [`run`] so tests can serve on their own listener.
pub async fn serve<S>(
    listener: UnixListener,
    proxy: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    // Connections live in a JoinSet so that, when the grace period is over,
    // the ones still open are cut instead of outliving the daemon; its size
    // also bounds how many clients are served at once.
    let mut conns = JoinSet::new();
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .adaptive_window(true)
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_send_buf_size(4 * 1024 * 1024);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            // At the limit, stop accepting: further clients wait in the
            // kernel's backlog rather than in our memory.
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, _)) => {
                    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(proxy.clone()));
                    let conn = graceful.watch(conn);
                    conns.spawn(async move {
                        if let Err(err) = conn.await {
                            tracing::debug!(%err, "connection ended with error");
                        }
                    });
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    tracing::info!(grace = ?grace, connections = conns.len(), "shutting down: draining in-flight calls");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?grace, connections = conns.len(), "grace period over; closing remaining connections");
        conns.abort_all();
    }
    while conns.join_next().await.is_some() {}
}

/// Completes on the first SIGTERM or SIGINT: the one place signals are
/// handled.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => tracing::info!("SIGINT received"),
            Err(err) => tracing::error!(%err, "cannot listen for SIGINT"),
        },
    }
}
