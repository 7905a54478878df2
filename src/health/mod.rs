//! Health of podckptd and of what it depends on, served as the standard gRPC
//! health service (`grpc.health.v1.Health/Check`) on podckptd's own socket,
//! and the client check behind `podckpt health` and the unit's watchdog.
//!
//! Services (the request's `service` field):
//! - [`DAEMON`]: podckptd answers (always SERVING when it does);
//! - [`RUNTIME`]: the runtime behind it answers a CRI Version, asked by
//!   podckptd at the time of the check;
//! - [`CRIU`]: CRIU passed podckptd's check at start (version and
//!   `criu check`): what decides whether checkpoint and restore calls run;
//! - `""`: all of them.
//!
//! A NOT_SERVING answer says why in the `podckpt-health-reason` metadata.
//! Any standard prober (grpc_health_probe `-addr unix://...`) can ask too.

pub mod notify;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

use crate::cri::api::VersionRequest;
use crate::cri::client::CriClient;
use crate::metrics::Metrics;
use crate::pod::checkpoint::CriuReadiness;
use crate::proxy::grpc_timeout;

/// The gRPC service name, as it appears in request paths.
pub const SERVICE: &str = "grpc.health.v1.Health";
/// Health of podckptd itself.
pub const DAEMON: &str = "podckpt.daemon";
/// Health of the runtime behind podckptd.
pub const RUNTIME: &str = "podckpt.runtime";
/// Whether CRIU is usable.
pub const CRIU: &str = "podckpt.criu";
/// Response metadata key carrying the reason of a NOT_SERVING answer (and
/// what was found on a SERVING one).
pub const REASON: &str = "podckpt-health-reason";

/// How long podckptd waits for the runtime's Version when the caller set
/// no deadline.
const RUNTIME_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// podckptd's side: the health service.
#[derive(Clone)]
pub struct HealthService {
    cri: CriClient,
    runtime_socket: PathBuf,
    criu: CriuReadiness,
    metrics: Metrics,
}

impl HealthService {
    /// Checks the runtime through `cri` (podckptd's own channel to it).
    pub fn new(
        cri: CriClient,
        runtime_socket: &Path,
        criu: CriuReadiness,
        metrics: Metrics,
    ) -> Self {
        Self {
            cri,
            runtime_socket: runtime_socket.to_path_buf(),
            criu,
            metrics,
        }
    }

    /// The gRPC server for it.
    pub fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }

    /// Asks the runtime for its Version, within most of the caller's
    /// deadline (so that the answer is NOT_SERVING with a reason rather
    /// than the caller's own DeadlineExceeded).
    async fn runtime(&self, deadline: Option<Duration>) -> Result<String, String> {
        let limit = deadline
            .map(|d| d.mul_f64(0.8))
            .unwrap_or(RUNTIME_CHECK_TIMEOUT)
            .min(RUNTIME_CHECK_TIMEOUT);
        let mut client = self.cri.runtime.clone();
        let mut req = Request::new(VersionRequest::default());
        req.set_timeout(limit);
        let socket = self.runtime_socket.display();
        let result = match tokio::time::timeout(limit, client.version(req)).await {
            Ok(Ok(v)) => {
                let v = v.into_inner();
                Ok(format!(
                    "{socket}: {} {}",
                    v.runtime_name, v.runtime_version
                ))
            }
            Ok(Err(status)) => Err(format!(
                "{socket}: Version failed: {:?}: {}",
                status.code(),
                status.message()
            )),
            Err(_) => Err(format!("{socket}: no answer to Version within {limit:?}")),
        };
        self.metrics.runtime_up(result.is_ok());
        result
    }

    fn criu(&self) -> Result<String, String> {
        self.criu.clone()
    }
}

/// A header-safe rendering of a reason (printable ASCII only).
fn header_value(reason: &str) -> MetadataValue<tonic::metadata::Ascii> {
    let clean: String = reason
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(1024)
        .collect();
    MetadataValue::try_from(clean.as_str()).unwrap_or_else(|_| MetadataValue::from_static("?"))
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let deadline = grpc_timeout(&request.metadata().clone().into_headers());
        let service = request.into_inner().service;
        let result = match service.as_str() {
            DAEMON => Ok(format!("podckptd {}", env!("CARGO_PKG_VERSION"))),
            RUNTIME => self.runtime(deadline).await,
            CRIU => self.criu(),
            "" => match (self.runtime(deadline).await, self.criu()) {
                (Ok(r), Ok(c)) => Ok(format!("runtime {r}; CRIU {c}")),
                (Err(r), _) => Err(format!("runtime: {r}")),
                (_, Err(c)) => Err(format!("CRIU: {c}")),
            },
            other => {
                return Err(Status::not_found(format!(
                    "unknown health service {other:?}: podckptd knows \"\", {DAEMON}, {RUNTIME}, {CRIU}"
                )))
            }
        };
        let (status, reason) = match result {
            Ok(found) => (ServingStatus::Serving, found),
            Err(reason) => (ServingStatus::NotServing, reason),
        };
        let mut resp = Response::new(HealthCheckResponse {
            status: status as i32,
        });
        resp.metadata_mut().insert(REASON, header_value(&reason));
        Ok(resp)
    }

    type WatchStream = Pin<
        Box<dyn futures_util::Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The runtime's health is found by asking it: there is no state to
        // watch, only to poll. Unimplemented tells clients not to retry.
        Err(Status::unimplemented(
            "podckptd answers Check only: poll it",
        ))
    }
}

/// What failed, for `podckpt health`: each part has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// podckptd did not answer (not running, socket missing, hung, or the
    /// endpoint is not podckptd).
    #[error("podckptd: {0}")]
    Daemon(String),
    /// podckptd answers, the runtime behind it does not.
    #[error("runtime: {0}")]
    Runtime(String),
    /// CRIU is not usable by podckptd.
    #[error("CRIU: {0}")]
    Criu(String),
}

impl Unhealthy {
    /// The exit code of `podckpt health` for this failure (1 and 2 are
    /// taken by other errors and by usage errors).
    pub fn exit_code(&self) -> u8 {
        match self {
            Unhealthy::Daemon(_) => 3,
            Unhealthy::Runtime(_) => 4,
            Unhealthy::Criu(_) => 5,
        }
    }
}

/// What a healthy check found, per part.
#[derive(Debug)]
pub struct Healthy {
    /// podckptd's version.
    pub daemon: String,
    /// The runtime's socket, name and version.
    pub runtime: String,
    /// CRIU's version.
    pub criu: String,
}

/// Asks podckptd at `socket` about each part in turn, podckptd first; the
/// whole check within `timeout`.
pub async fn check(socket: &Path, timeout: Duration) -> Result<Healthy, Unhealthy> {
    let deadline = tokio::time::Instant::now() + timeout;
    let channel = crate::cri::client::channel(socket, timeout);
    let mut client = HealthClient::new(channel);
    let daemon = ask(&mut client, socket, DAEMON, deadline)
        .await?
        .map_err(Unhealthy::Daemon)?;
    let runtime = ask(&mut client, socket, RUNTIME, deadline)
        .await?
        .map_err(Unhealthy::Runtime)?;
    let criu = ask(&mut client, socket, CRIU, deadline)
        .await?
        .map_err(Unhealthy::Criu)?;
    Ok(Healthy {
        daemon,
        runtime,
        criu,
    })
}

/// Only whether podckptd itself answers: what the unit's watchdog needs (a
/// runtime that is down is no reason to restart podckptd).
pub async fn check_daemon(socket: &Path, timeout: Duration) -> Result<String, Unhealthy> {
    let deadline = tokio::time::Instant::now() + timeout;
    let channel = crate::cri::client::channel(socket, timeout);
    let mut client = HealthClient::new(channel);
    ask(&mut client, socket, DAEMON, deadline)
        .await?
        .map_err(Unhealthy::Daemon)
}

/// One Check: `Err` when podckptd gave no answer, `Ok(Err(reason))` for
/// NOT_SERVING.
async fn ask(
    client: &mut HealthClient<tonic::transport::Channel>,
    socket: &Path,
    service: &str,
    deadline: tokio::time::Instant,
) -> Result<Result<String, String>, Unhealthy> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut req = Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    req.set_timeout(left);
    let at = socket.display();
    let resp = match tokio::time::timeout_at(deadline, client.check(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(status)) => {
            let why = match status.code() {
                tonic::Code::Unimplemented | tonic::Code::NotFound => format!(
                    "{at} answers but not as podckptd ({service}: {:?}: {}); is it the runtime's socket?",
                    status.code(),
                    status.message()
                ),
                code => format!("{at}: {code:?}: {}", chain(&status)),
            };
            return Err(Unhealthy::Daemon(why));
        }
        Err(_) => {
            return Err(Unhealthy::Daemon(format!(
                "{at}: no answer to {service} within the timeout"
            )))
        }
    };
    let reason = resp
        .metadata()
        .get(REASON)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok(match resp.into_inner().status() {
        ServingStatus::Serving => Ok(reason),
        other => Err(if reason.is_empty() {
            format!("{other:?}")
        } else {
            reason
        }),
    })
}

/// A status's message and the errors under it (a refused connection says
/// only "transport error" at the top).
fn chain(status: &Status) -> String {
    let mut out = status.message().to_owned();
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}
