//! A fake upstream container runtime: a tonic CRI server on a temporary unix
//! socket whose connections can be killed abruptly, as when a runtime dies.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use podckpt::cri::api::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use podckpt::cri::api::*;
use tokio::net::UnixListener;
use tokio::task::JoinSet;
use tonic::body::Body;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};
use tower::ServiceExt;

/// Path of a method the proto does not know: the proxy must forward it.
pub const FUTURE_METHOD: &str = "/runtime.v1.RuntimeService/FutureMethod";

/// What the fake saw of the last request, for assertions.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub grpc_timeout: Option<String>,
    pub test_header: Option<String>,
    pub bin_header: Option<Vec<u8>>,
}

#[derive(Clone, Default)]
pub struct Fake {
    pub seen: Arc<Mutex<Seen>>,
    /// Number of containers ListContainers returns.
    pub containers: usize,
    /// Stream events sent before the stream stalls (0 = end cleanly after 3).
    pub stall_after: usize,
}

fn record<T>(seen: &Mutex<Seen>, req: &Request<T>) {
    let md = req.metadata();
    let mut s = seen.lock().unwrap();
    s.grpc_timeout = md
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    s.test_header = md
        .get("x-podckpt-test")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    s.bin_header = md
        .get_bin("x-podckpt-bin")
        .and_then(|v| v.to_bytes().ok())
        .map(|b| b.to_vec());
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RuntimeService for Fake {
    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        record(&self.seen, &req);
        let mut resp = Response::new(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "fake".into(),
            runtime_version: "1.2.3".into(),
            runtime_api_version: "v1".into(),
        });
        // Echo the test header back as response metadata.
        if let Some(v) = req.metadata().get("x-podckpt-test") {
            resp.metadata_mut().insert("x-podckpt-echo", v.clone());
        }
        Ok(resp)
    }

    async fn container_status(
        &self,
        req: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        record(&self.seen, &req);
        match req.get_ref().container_id.as_str() {
            "missing" => {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert("x-podckpt-trailer", MetadataValue::from_static("t1"));
                Err(Status::with_details_and_metadata(
                    Code::NotFound,
                    "container \"missing\" not found",
                    Bytes::from_static(b"\x08\x05\x12\x07details"),
                    md,
                ))
            }
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(Response::new(ContainerStatusResponse::default()))
            }
            id => Ok(Response::new(ContainerStatusResponse {
                status: Some(ContainerStatus {
                    id: id.into(),
                    state: ContainerState::ContainerRunning as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    async fn list_containers(
        &self,
        _req: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        // Not recorded: podckptd's own garbage collection lists containers
        // at start, and would overwrite what a test's call left in `seen`.
        let containers = (0..self.containers)
            .map(|i| Container {
                id: format!("{i:064}"),
                pod_sandbox_id: "p".repeat(64),
                labels: [("io.kubernetes.pod.name".to_string(), "x".repeat(100))].into(),
                annotations: [("big".to_string(), "y".repeat(512))].into(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ListContainersResponse { containers }))
    }

    async fn get_container_events(
        &self,
        req: Request<GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        record(&self.seen, &req);
        let stall_after = self.stall_after;
        let stream = async_stream(stall_after);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn async_stream(
    stall_after: usize,
) -> impl Stream<Item = Result<ContainerEventResponse, Status>> + Send {
    let n = if stall_after == 0 { 3 } else { stall_after };
    let events = (0..n).map(|i| {
        Ok(ContainerEventResponse {
            container_id: format!("c{i}"),
            container_event_type: ContainerEventType::ContainerStartedEvent as i32,
            created_at: i as i64,
            ..Default::default()
        })
    });
    let head = futures_util::stream::iter(events.collect::<Vec<_>>());
    if stall_after == 0 {
        Box::pin(head) as EventStream
    } else {
        Box::pin(futures_util::StreamExt::chain(
            head,
            futures_util::stream::pending(),
        ))
    }
}

type RespFuture = Pin<
    Box<
        dyn std::future::Future<Output = Result<http::Response<Body>, std::convert::Infallible>>
            + Send,
    >,
>;

/// The fake's router: the generated server plus one method the proto lacks.
fn router(
    fake: Fake,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<Body>,
    Error = std::convert::Infallible,
    Future = RespFuture,
> + Clone {
    let server = RuntimeServiceServer::new(fake).max_encoding_message_size(usize::MAX);
    tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let server = server.clone();
        Box::pin(async move {
            let req = req.map(Body::new);
            if req.uri().path() == FUTURE_METHOD {
                // Answer with a recognisable status so the test can tell the
                // fake served it (not the proxy).
                let mut resp =
                    Status::new(Code::AlreadyExists, "future method reached the runtime")
                        .into_http::<Body>();
                resp.headers_mut()
                    .insert("x-podckpt-future", http::HeaderValue::from_static("1"));
                return Ok(resp);
            }
            server.oneshot(req).await
        }) as RespFuture
    })
}

/// A running fake runtime. Dropping it kills every connection at once.
pub struct FakeRuntime {
    pub path: PathBuf,
    pub fake: Fake,
    tasks: JoinSet<()>,
}

impl FakeRuntime {
    pub async fn start(path: &Path, fake: Fake) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let svc = router(fake.clone());
        let mut tasks = JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = conn_tx.send(stream);
            }
        });
        let svc2 = svc.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Some(stream) = conn_rx.recv().await {
                let svc = svc2.clone();
                conns.spawn(async move {
                    let _ = http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                        .await;
                });
            }
            // Aborting this task drops `conns`, which aborts every connection.
        });
        Self {
            path: path.to_path_buf(),
            fake,
            tasks,
        }
    }

    /// Kills the runtime abruptly: listener closed, every connection dropped.
    pub async fn kill(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_file(&self.path);
    }
}
