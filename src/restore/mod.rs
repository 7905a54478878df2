//! Restoring containers: the registrations podckptd writes when it creates
//! a container to be restored, and `podckpt-runc`, the OCI-runtime wrapper
//! that restores such a container from its CRIU images when the runtime
//! creates it.

pub mod lazy;
pub mod progress;
pub mod registration;
pub mod wrapper;

pub use registration::{Registration, Registry, Stage};
