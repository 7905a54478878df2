//! podckptd's own `runtime.v1.RuntimeService` methods: the few calls it
//! answers instead of the runtime. The proxy routes only the paths in
//! [`PodckptService::intercept`] here; the generated server's defaults
//! (Unimplemented) are never reached for anything else. Each handler takes
//! the request apart, calls the engine and maps its error.

use tonic::{Request, Response, Status};

use super::api::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use super::api::{
    CheckpointContainerRequest, CheckpointContainerResponse, CheckpointPodRequest,
    CheckpointPodResponse, RestorePodRequest, RestorePodResponse,
};
use super::client::MAX_MESSAGE_SIZE;
use super::proxy::{grpc_timeout, Intercept};
use super::RUNTIME_SERVICE;
use crate::pod::checkpoint::Checkpointer;

/// The engine behind podckptd's intercepted CRI methods.
#[derive(Clone)]
pub struct PodckptService {
    checkpointer: Checkpointer,
}

impl PodckptService {
    /// A service using this checkpoint engine.
    pub fn new(checkpointer: Checkpointer) -> Self {
        Self { checkpointer }
    }

    /// The methods this service answers itself; everything else is forwarded.
    pub fn intercept(&self) -> Intercept {
        Intercept::new([
            (RUNTIME_SERVICE, "CheckpointPod"),
            (RUNTIME_SERVICE, "RestorePod"),
            (RUNTIME_SERVICE, "CheckpointContainer"),
        ])
    }

    /// The gRPC server for the intercepted methods.
    pub fn into_server(self) -> RuntimeServiceServer<Self> {
        RuntimeServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

/// The caller's deadline, from the request's `grpc-timeout`.
fn deadline<T>(req: &Request<T>) -> Option<std::time::Duration> {
    grpc_timeout(&req.metadata().clone().into_headers())
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
        match self.checkpointer.checkpoint_pod(req, deadline).await {
            Ok(summary) => {
                tracing::info!(parent: &span, archive = %summary.archive.display(), bytes = summary.bytes, frozen_window = ?summary.frozen_window, total = ?summary.total, "pod checkpointed");
                Ok(Response::new(CheckpointPodResponse {}))
            }
            Err(err) => {
                tracing::warn!(parent: &span, error = %err, "checkpoint failed");
                Err(err.into())
            }
        }
    }

    async fn checkpoint_container(
        &self,
        request: Request<CheckpointContainerRequest>,
    ) -> Result<Response<CheckpointContainerResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let span = tracing::info_span!("CheckpointContainer", container = %req.container_id, location = %req.location);
        match self.checkpointer.checkpoint_container(req, deadline).await {
            Ok(summary) => {
                tracing::info!(parent: &span, bytes = summary.bytes, frozen_window = ?summary.frozen_window, total = ?summary.total, "container checkpointed");
                Ok(Response::new(CheckpointContainerResponse {}))
            }
            Err(err) => {
                tracing::warn!(parent: &span, error = %err, "checkpoint failed");
                Err(err.into())
            }
        }
    }

    async fn restore_pod(
        &self,
        _request: Request<RestorePodRequest>,
    ) -> Result<Response<RestorePodResponse>, Status> {
        Err(Status::unimplemented(
            "podckptd: RestorePod is not implemented in this version of podckptd",
        ))
    }
}
