//! podckptd's own `runtime.v1.RuntimeService` methods: the few calls it
//! answers instead of the runtime. The proxy routes only the paths in
//! [`PodckptService::intercept`] here; the generated server's defaults
//! (Unimplemented) are never reached for anything else. Each handler takes
//! the request apart, calls the engine and maps its error.

use tonic::{Request, Response, Status};

use super::api::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use super::api::{
    CheckpointContainerRequest, CheckpointContainerResponse, CheckpointPodRequest,
    CheckpointPodResponse, CreateContainerRequest, CreateContainerResponse, RestorePodRequest,
    RestorePodResponse,
};
use super::client::MAX_MESSAGE_SIZE;
use super::raw::{Arrived, CaptureRaw, RawMessage};
use super::RUNTIME_SERVICE;
use crate::metrics::{Metrics, Operation};
use crate::pod::checkpoint::{Checkpointer, Deadline};
use crate::pod::restore::Restorer;
use crate::proxy::{grpc_message, grpc_timeout, Intercept};

/// The engine behind podckptd's intercepted CRI methods.
#[derive(Clone)]
pub struct PodckptService {
    checkpointer: Checkpointer,
    restorer: Restorer,
    /// Whether CreateContainer from an archive is served (opt-in).
    create_from_archive: bool,
    metrics: Metrics,
}

impl PodckptService {
    /// A service using these engines; CreateContainer from an archive is
    /// served only when `create_from_archive`.
    pub fn new(
        checkpointer: Checkpointer,
        restorer: Restorer,
        create_from_archive: bool,
        metrics: Metrics,
    ) -> Self {
        Self {
            checkpointer,
            restorer,
            create_from_archive,
            metrics,
        }
    }

    /// The methods this service answers itself; everything else is
    /// forwarded. CreateContainer only when the setting allows it and its
    /// image is a checkpoint archive's path (the CRI-O convention); every
    /// other CreateContainer goes to the runtime byte for byte.
    pub fn intercept(&self) -> Intercept {
        let routes = Intercept::new([
            (RUNTIME_SERVICE, "CheckpointPod"),
            (RUNTIME_SERVICE, "RestorePod"),
            (RUNTIME_SERVICE, "CheckpointContainer"),
        ]);
        // RunPodSandbox and CreateContainer are looked at on their way (and
        // always relayed, except CreateContainer from an archive when that
        // is on): their configs are noted for checkpoints on runtimes
        // whose status does not keep them (crate::pod::seen).
        let seen = self.checkpointer.seen().clone();
        let run_seen = seen.clone();
        let allow_archive = self.create_from_archive;
        routes
            .with_sniffer(
                RUNTIME_SERVICE,
                "RunPodSandbox",
                std::sync::Arc::new(move |frame: &[u8]| {
                    if let Some(m) = grpc_message(frame) {
                        run_seen.note_run_pod_sandbox(m);
                    }
                    false
                }),
            )
            .with_sniffer(
                RUNTIME_SERVICE,
                "CreateContainer",
                std::sync::Arc::new(move |frame: &[u8]| {
                    if allow_archive && creates_from_archive(frame) {
                        return true;
                    }
                    if let Some(m) = grpc_message(frame) {
                        seen.note_create_container(m);
                    }
                    false
                }),
            )
            // A container registered for restore but removed before it ever
            // started never reaches podckpt-runc's delete: drop its
            // registration and extracted files when the runtime removes it.
            .with_observer(RUNTIME_SERVICE, "RemoveContainer", self.gc_observer())
            .with_observer(RUNTIME_SERVICE, "RemovePodSandbox", {
                let (gc, sweep) = (self.gc_observer(), self.seen_sweeper());
                std::sync::Arc::new(move || {
                    gc();
                    sweep();
                })
            })
    }

    /// Drops the noted configs of sandboxes the runtime no longer lists.
    fn seen_sweeper(&self) -> crate::proxy::Observer {
        let seen = self.checkpointer.seen().clone();
        let cri = self.checkpointer.cri().clone();
        std::sync::Arc::new(move || {
            let (seen, mut cri) = (seen.clone(), cri.clone());
            tokio::spawn(async move {
                let live = match cri
                    .runtime
                    .list_pod_sandbox(super::api::ListPodSandboxRequest::default())
                    .await
                {
                    Ok(r) => r.into_inner().items,
                    Err(err) => {
                        tracing::debug!(error = %err, "seen configs: sweep postponed");
                        return;
                    }
                };
                match tokio::task::spawn_blocking(move || seen.sweep(&live)).await {
                    Ok(Ok(n)) if n > 0 => tracing::debug!(dropped = n, "seen configs swept"),
                    Ok(Err(err)) => tracing::warn!(error = %err, "seen configs: sweep failed"),
                    _ => {}
                }
            });
        })
    }

    fn gc_observer(&self) -> crate::proxy::Observer {
        let restorer = self.restorer.clone();
        std::sync::Arc::new(move || {
            if !restorer.registry().has_registrations() {
                return;
            }
            let restorer = restorer.clone();
            tokio::spawn(async move {
                if let Err(err) = restorer.collect_garbage().await {
                    tracing::debug!(error = %err, "restore garbage collection");
                }
            });
        })
    }

    /// The gRPC server for the intercepted methods. It keeps the bytes of
    /// the requests whose messages are passed on to the runtime, so that
    /// what podckptd does not know survives ([`crate::cri::wire`]).
    pub fn into_server(self) -> CaptureRaw<RuntimeServiceServer<Self>> {
        CaptureRaw::new(
            RuntimeServiceServer::new(self)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
    }
}

impl PodckptService {
    fn record_checkpoint(
        &self,
        op: Operation,
        started: std::time::Instant,
        result: &Result<crate::pod::checkpoint::PodSummary, crate::pod::error::PodError>,
    ) {
        let (code, done) = match result {
            Ok(s) => (tonic::Code::Ok, Some((s.frozen_window, s.bytes))),
            Err(e) => (e.code(), None),
        };
        self.metrics.checkpoint(op, code, started.elapsed(), done);
    }

    fn record_restore<T>(
        &self,
        op: Operation,
        started: std::time::Instant,
        result: &Result<T, crate::pod::error::PodError>,
    ) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        self.metrics.restore(op, code, started.elapsed());
    }
}

/// Whether an encoded CreateContainer request names a checkpoint archive
/// as its image: an absolute path (image references never start with `/`).
pub fn creates_from_archive(frame: &[u8]) -> bool {
    use prost::Message;
    grpc_message(frame)
        .and_then(|m| CreateContainerRequest::decode(m).ok())
        .and_then(|r| r.config)
        .and_then(|c| c.image)
        .is_some_and(|i| i.image.starts_with('/'))
}

/// Logs a failed call on its span and turns the error into its status.
fn failed(span: &tracing::Span, what: &str, err: crate::pod::error::PodError) -> Status {
    tracing::warn!(parent: span, error = %err, "{what} failed");
    err.into()
}

/// The request message's bytes as the caller sent them.
fn raw<T>(req: &Request<T>) -> Option<bytes::Bytes> {
    req.extensions().get::<RawMessage>().map(|r| r.0.clone())
}

/// The caller's deadline, from the request's `grpc-timeout`, counted from
/// the request's arrival (now, when the server did not note it).
fn deadline<T>(req: &Request<T>) -> Option<Deadline> {
    let remaining = grpc_timeout(&req.metadata().clone().into_headers())?;
    let arrived = req
        .extensions()
        .get::<Arrived>()
        .map_or_else(std::time::Instant::now, |a| a.0);
    Some(Deadline { arrived, remaining })
}

#[tonic::async_trait]
impl RuntimeService for PodckptService {
    async fn checkpoint_pod(
        &self,
        request: Request<CheckpointPodRequest>,
    ) -> Result<Response<CheckpointPodResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let span = tracing::info_span!("CheckpointPod", pod = %req.pod_sandbox_id, containers = req.container_ids.len(), output = %req.output_path);
        let _enter = span.enter();
        tracing::info!(?deadline, "checkpoint requested");
        drop(_enter);
        let started = std::time::Instant::now();
        let result = self.checkpointer.checkpoint_pod(req, deadline).await;
        self.record_checkpoint(Operation::Pod, started, &result);
        let summary = result.map_err(|err| failed(&span, "checkpoint", err))?;
        tracing::info!(parent: &span, archive = %summary.archive.display(), bytes = summary.bytes, frozen_window = ?summary.frozen_window, total = ?summary.total, "pod checkpointed");
        Ok(Response::new(CheckpointPodResponse {}))
    }

    async fn checkpoint_container(
        &self,
        request: Request<CheckpointContainerRequest>,
    ) -> Result<Response<CheckpointContainerResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let span = tracing::info_span!("CheckpointContainer", container = %req.container_id, location = %req.location);
        let started = std::time::Instant::now();
        let result = self.checkpointer.checkpoint_container(req, deadline).await;
        self.record_checkpoint(Operation::Container, started, &result);
        let summary = result.map_err(|err| failed(&span, "checkpoint", err))?;
        tracing::info!(parent: &span, bytes = summary.bytes, frozen_window = ?summary.frozen_window, total = ?summary.total, "container checkpointed");
        Ok(Response::new(CheckpointContainerResponse {}))
    }

    async fn restore_pod(
        &self,
        request: Request<RestorePodRequest>,
    ) -> Result<Response<RestorePodResponse>, Status> {
        let deadline = deadline(&request);
        let raw = raw(&request);
        let req = request.into_inner();
        let name = req
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default();
        let span = tracing::info_span!("RestorePod", checkpoint = %req.checkpoint_path, pod = %name, containers = req.container_configs.len());
        tracing::info!(parent: &span, ?deadline, "restore requested");
        let started = std::time::Instant::now();
        let result = self.restorer.restore_pod(req, raw, deadline).await;
        self.record_restore(Operation::Pod, started, &result);
        let resp = result.map_err(|err| failed(&span, "restore", err))?;
        tracing::info!(parent: &span, sandbox = %resp.pod_sandbox_id, took = ?started.elapsed(), "pod restored (containers created)");
        Ok(Response::new(resp))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let deadline = deadline(&request);
        let raw = raw(&request);
        let req = request.into_inner();
        let archive = req
            .config
            .as_ref()
            .and_then(|c| c.image.as_ref())
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let span = tracing::info_span!("CreateContainer", sandbox = %req.pod_sandbox_id, archive = %archive);
        let started = std::time::Instant::now();
        let result = self.restorer.create_from_archive(req, raw, deadline).await;
        self.record_restore(Operation::Container, started, &result);
        let resp = result.map_err(|err| failed(&span, "create from checkpoint", err))?;
        tracing::info!(parent: &span, id = %resp.container_id, "container created from a checkpoint");
        Ok(Response::new(resp))
    }
}
