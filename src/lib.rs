//! podckpt: pod-level checkpoint/restore for Kubernetes nodes.
//!
//! The library holds the engine; the binaries in `src/bin/` only parse
//! configuration, set up tracing and call into it.
//!
//! - [`cri`]: the CRI API, a client, and podckptd's own CRI methods.
//! - [`proxy`]: the HTTP/2 proxy between the kubelet and the container
//!   runtime: limits, routing, forwarding.
//! - [`daemon`]: podckptd's lifecycle: socket, serving, graceful shutdown.
//! - [`config`]: podckptd's configuration, validated at start.
//! - [`health`]: the health service podckptd serves, and `podckpt health`.
//! - [`metrics`]: Prometheus metrics, served on an opt-in address.
//! - [`pod`]: the checkpoint and restore engines behind the intercepted calls.
//! - [`restore`]: containers registered for restore, and `podckpt-runc`,
//!   the OCI-runtime wrapper that restores them when the runtime creates them.
//! - [`telemetry`]: tracing setup shared by the binaries.
//! - [`archive`]: pod and container checkpoint archives: writing, reading,
//!   inspecting.
//! - [`cli`]: the operator CLI's logic (restore configuration, inspect output).
#![deny(rust_2018_idioms)]

pub mod archive;
pub mod cli;
pub mod config;
pub mod cri;
pub mod criu;
pub mod daemon;
pub mod health;
pub mod metrics;
pub mod node;
pub mod pod;
pub mod proxy;
pub mod restore;
pub mod socket;
pub mod telemetry;
