//! The Container Runtime Interface: the generated `runtime.v1` API, a client
//! for it over a unix socket, and podckptd's own CRI methods.

pub mod client;
pub mod json_bytes;
pub mod raw;
pub mod service;
pub mod wire;

/// Generated `runtime.v1` messages, clients and servers (from `proto/cri/api.proto`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

/// Fully-qualified gRPC service names, as they appear in request paths.
pub const RUNTIME_SERVICE: &str = "runtime.v1.RuntimeService";
/// See [`RUNTIME_SERVICE`].
pub const IMAGE_SERVICE: &str = "runtime.v1.ImageService";
