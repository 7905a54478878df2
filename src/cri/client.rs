//! A CRI client over a unix socket: podckptd uses it to reach the runtime,
//! the CLI and the tests use it to reach podckptd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::api::image_service_client::ImageServiceClient;
use super::api::runtime_service_client::RuntimeServiceClient;

/// Largest message a CRI client accepts or sends. The kubelet allows 16 MiB;
/// a `ListContainers` of a few thousand containers is bigger than tonic's
/// 4 MiB default, so the limit is set well above both.
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

/// Parses a CRI endpoint as the kubelet spells it (`unix:///run/x.sock`) or
/// as a bare absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(format!(
            "endpoint {endpoint:?}: only unix sockets are supported (unix:///path or /path)"
        ));
    }
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(format!(
            "endpoint {endpoint:?}: the socket path must be absolute"
        ));
    }
    Ok(path.to_path_buf())
}

/// A lazily connected channel to a unix socket. It connects on first use
/// and reconnects after the peer went away; while the peer is down each call
/// fails fast (the socket connect is refused at once) instead of queueing.
pub fn channel(path: impl Into<PathBuf>, connect_timeout: Duration) -> Channel {
    let path: PathBuf = path.into();
    // The authority is what grpc-go sends for unix sockets; runtimes ignore it.
    Endpoint::from_static("http://localhost")
        .connect_timeout(connect_timeout)
        .http2_adaptive_window(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
}

/// Both CRI services on one channel.
#[derive(Clone, Debug)]
pub struct CriClient {
    /// `runtime.v1.RuntimeService`.
    pub runtime: RuntimeServiceClient<Channel>,
    /// `runtime.v1.ImageService`.
    pub image: ImageServiceClient<Channel>,
    /// The channel both use, for calls that send already encoded messages
    /// ([`super::raw::unary`]).
    pub channel: Channel,
}

impl CriClient {
    /// A client for the CRI endpoint at `path` (connects lazily).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::from_channel(channel(path, Duration::from_secs(5)))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            image: ImageServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            channel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").unwrap(),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(
            socket_path("/var/run/crio/crio.sock").unwrap(),
            PathBuf::from("/var/run/crio/crio.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1234").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
        assert!(socket_path("relative.sock").is_err());
    }
}
