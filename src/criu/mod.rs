//! CRIU driven through its RPC protocol (`criu swrk` or a `criu service`
//! socket), and CRIU's image files read offline ([`image`]).

mod client;
pub mod image;

pub use client::{probe, Canceller, CriuConfig, CriuError, Notification, Session, Version};

/// The oldest CRIU podckpt drives. Older releases fail on current kernels
/// (Debian 12's 3.17 cannot even `check` on 6.x); 4.x is what we test.
pub const MIN_VERSION: (i32, i32) = (4, 0);

/// Generated CRIU RPC messages (from `proto/criu/rpc.proto`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}
