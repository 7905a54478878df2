//! podckptd's lifecycle: bind the socket, serve the proxy on every accepted
//! connection, and on shutdown stop accepting, drain in-flight calls within
//! a grace period and remove the socket.

use std::future::Future;

use crate::config::Validated;
use crate::cri::client::{self, CriClient};
use crate::cri::service::PodckptService;
use crate::criu::CriuConfig;
use crate::health::{self, HealthService};
use crate::metrics::Metrics;
use crate::pod::checkpoint::{self, Checkpointer, Settings};
use crate::pod::restore::Restorer;
use crate::pod::seen::SeenConfigs;
use crate::proxy::{self, Proxy};
use crate::socket::{self, SocketError};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The listening socket could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The metrics address could not be bound.
    #[error("--metrics-listen {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs podckptd until `shutdown` completes.
pub async fn run(config: Validated, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    raise_open_files();
    // Under socket activation systemd owns the socket (and keeps it across
    // restarts); otherwise podckptd binds, locks and later removes it.
    let (listener, bound) = match socket::from_systemd()? {
        Some(listener) => {
            tracing::info!("serving the socket systemd passed (socket activation)");
            (listener, None)
        }
        None => {
            let mut bound = socket::bind(&config.config.listen)?;
            let Some(listener) = bound.take_listener() else {
                unreachable!("a freshly bound socket has its listener");
            };
            (listener, Some(bound))
        }
    };
    let metrics = Metrics::new();
    // Bound before serving: a wrong address stops podckptd at start.
    let scrapes = match config.config.metrics_listen {
        Some(addr) => {
            let listener = crate::metrics::http::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            // The bound address: with port 0 the kernel picked it.
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %bound, "serving metrics");
            Some(AbortOnDrop(tokio::spawn(crate::metrics::http::serve(
                listener,
                metrics.clone(),
                config.config.scrape_limits.clone(),
            ))))
        }
        None => None,
    };
    let upstream = client::channel(&config.runtime_socket, config.config.connect_timeout);
    let (checkpointer, restorer) = engines(&config, upstream.clone(), &metrics).await;
    let background = restorer.clone();
    let health = HealthService::new(
        CriClient::from_channel(upstream),
        &config.runtime_socket,
        checkpointer.criu_readiness().clone(),
        metrics.clone(),
    );
    let service = PodckptService::new(
        checkpointer,
        restorer,
        config.config.allow_create_from_archive,
        metrics.clone(),
    );
    let routes = service
        .intercept()
        .with_service(health::SERVICE, &["Check", "Watch"]);
    let served =
        tonic::service::Routes::new(service.into_server()).add_service(health.into_server());
    let proxy = Proxy::new(
        &config.runtime_socket,
        config.config.connect_timeout,
        config.config.limits.clone(),
        routes,
        served,
        tokio::runtime::Handle::current(),
        metrics,
    );
    tracing::info!(
        listen = %config.config.listen.display(),
        runtime = %config.runtime_socket.display(),
        "podckptd serving"
    );
    let _watchdog = crate::health::notify::ready(&config.config.listen).map(AbortOnDrop);
    proxy::serve(listener, proxy, shutdown, config.config.shutdown_grace).await;
    crate::health::notify::stopping();
    drop(scrapes);
    // Dropping the bound socket removes the socket file and the lock (an
    // activated socket stays with systemd).
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

/// Raises the soft limit of open files to the hard one, as Go programs
/// (containerd, the kubelet) do at start: every client connection holds two
/// descriptors here (its own and its runtime connection), and the soft
/// default of 1024 would stop accepting long before --max-connections.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%err, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(%err, "cannot read the open-file limit"),
    }
}

/// Sets up the checkpoint and restore engines: first undo what an interrupted
/// checkpoint of a previous podckptd left (frozen cgroups, partial files),
/// then check CRIU. A missing or too old CRIU does not stop the daemon: the
/// proxy keeps working and checkpoint calls say why they cannot run.
async fn engines(
    config: &Validated,
    upstream: tonic::transport::Channel,
    metrics: &Metrics,
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
    metrics.criu_ready(readiness.is_ok());
    let workers = if c.zstd_workers > 0 {
        c.zstd_workers
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    };
    // One store of noted configs: the proxy notes into it, checkpoints read
    // it, restores note their own requests.
    let seen = SeenConfigs::new(&c.state_dir, c.max_seen_configs);
    let settings = Settings {
        criu,
        staging_dir: c.staging_dir.clone(),
        state_dir: c.state_dir.clone(),
        max_parallel_dumps: c.max_parallel_dumps,
        zstd_workers: workers,
        warm_staging: c.warm_staging,
        guardian_exe: c.guardian_exe.clone(),
        seen: seen.clone(),
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
        metrics.clone(),
    )
    .with_seen(seen)
    .with_undo_call_timeout(c.undo_call_timeout);
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

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
