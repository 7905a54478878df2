//! podckptd's own `runtime.v1.RuntimeService` methods: the few calls it
//! answers instead of the runtime. The proxy routes only the paths in
//! [`PodckptService::intercept`] here; the generated server's defaults
//! (Unimplemented) are never reached for anything else.

use tonic::{Request, Response, Status};

use super::api::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use super::api::{
    CheckpointPodRequest, CheckpointPodResponse, RestorePodRequest, RestorePodResponse,
};
use super::client::MAX_MESSAGE_SIZE;
use super::proxy::Intercept;
use super::RUNTIME_SERVICE;

/// The engine behind podckptd's intercepted CRI methods.
#[derive(Clone, Debug, Default)]
pub struct PodckptService {}

impl PodckptService {
    /// The methods this service answers itself; everything else is forwarded.
    pub fn intercept(&self) -> Intercept {
        // CheckpointContainer still passes through to the runtime until
        // podckptd serves it itself.
        Intercept::new([
            (RUNTIME_SERVICE, "CheckpointPod"),
            (RUNTIME_SERVICE, "RestorePod"),
        ])
    }

    /// The gRPC server for the intercepted methods.
    pub fn into_server(self) -> RuntimeServiceServer<Self> {
        RuntimeServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

#[tonic::async_trait]
impl RuntimeService for PodckptService {
    async fn checkpoint_pod(
        &self,
        _request: Request<CheckpointPodRequest>,
    ) -> Result<Response<CheckpointPodResponse>, Status> {
        Err(Status::unimplemented(
            "podckptd: CheckpointPod is not implemented in this version of podckptd",
        ))
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
