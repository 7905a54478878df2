//! podckptd's lifecycle: bind the socket, serve the proxy on every accepted
//! connection, and on shutdown stop accepting, drain in-flight calls within
//! a grace period and remove the socket.

use std::future::Future;
use std::time::Duration;

use std::rc::Rc;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Validated;
use crate::cri::client::{self, CriClient};
use crate::cri::proxy::CriProxy;
use crate::cri::relay::{Relay, ServedCalls};
use crate::cri::service::PodckptService;
use crate::criu::CriuConfig;
use crate::pod::checkpoint::{self, Checkpointer, Settings};
use crate::pod::restore::Restorer;
use crate::socket::{self, SocketError};

/// At most this many client connections are served at once; the kubelet
/// holds a few, crictl one per invocation.
pub const MAX_CONNECTIONS: usize = 1024;

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
    let intercept = service.intercept();
    let proxy = CriProxy::new(
        upstream,
        config.runtime_socket.clone(),
        intercept.clone(),
        service.into_server(),
    );
    let relay = Relay::new(
        &config.runtime_socket,
        config.config.connect_timeout,
        intercept,
        proxy,
        tokio::runtime::Handle::current(),
    );
    tracing::info!(
        listen = %config.config.listen.display(),
        runtime = %config.runtime_socket.display(),
        "podckptd serving"
    );
    serve(listener, relay, shutdown, config.config.shutdown_grace).await;
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
    let restorer = Restorer::new(
        cri.clone(),
        c.restore_dir.clone(),
        readiness.clone(),
        crate::archive::extract::Limits {
            max_bytes: c.max_restore_bytes,
            max_entries: c.max_archive_entries,
        },
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

/// Serves `relay` on `listener` until `shutdown`, then drains for at most
/// `grace`. Separate from [`run`] so tests can serve on their own listener.
///
/// The relay runs on a thread of its own with a single-threaded runtime:
/// passed-through calls never wait behind checkpoint or restore work on the
/// main runtime, and one thread polling every connection batches their
/// events instead of handing each one between worker threads. The calls
/// podckptd serves itself run on the main runtime (the relay's `spawner`).
pub async fn serve<S>(
    listener: UnixListener,
    relay: Relay<S>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: ServedCalls + Sync,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%err, "cannot hand the socket to the relay thread");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("podckptd-relay".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(%err, "cannot start the relay's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                match UnixListener::from_std(listener) {
                    Ok(listener) => accept(listener, relay, stop_rx, grace).await,
                    Err(err) => tracing::error!(%err, "cannot serve the socket"),
                }
            });
            let _ = done_tx.send(());
        });
    if let Err(err) = spawned {
        tracing::error!(%err, "cannot start the relay thread");
        return;
    }
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => {
            let _ = stop_tx.send(true);
            // The relay bounds its own drain by `grace`.
            let _ = (&mut done_rx).await;
        }
        _ = &mut done_rx => tracing::error!("the relay stopped by itself"),
    }
}

/// The relay thread's accept loop, and its drain once `stop` turns true.
async fn accept<S>(
    listener: UnixListener,
    relay: Relay<S>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) where
    S: ServedCalls,
{
    let relay = Rc::new(relay);
    // Connections live in a JoinSet so that, when the grace period is over,
    // the ones still open are cut instead of outliving the daemon; its size
    // also bounds how many clients are served at once.
    let mut conns = JoinSet::new();
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            loop {
                tokio::select! {
                    biased;
                    r = stop.changed() => if r.is_err() || *stop.borrow() { break },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    // At the limit, stop accepting: further clients wait in
                    // the kernel's backlog rather than in our memory.
                    accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                        Ok((stream, _)) => {
                            let relay = relay.clone();
                            let stop = stop.clone();
                            conns.spawn_local(async move { relay.serve(stream, stop).await });
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
            // Every connection has seen `stop`: it says GOAWAY and ends once
            // its calls are answered.
            let drained = tokio::time::timeout(grace, async {
                while conns.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(grace = ?grace, connections = conns.len(), "grace period over; closing remaining connections");
                conns.abort_all();
                while conns.join_next().await.is_some() {}
            }
        })
        .await;
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
