//! CRIU driven through its RPC protocol (`criu swrk` or a `criu service`
//! socket).

/// Generated CRIU RPC messages (from `proto/criu/rpc.proto`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}
