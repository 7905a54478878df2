//! Pod checkpoint and restore orchestration.

pub mod criu_opts;
pub mod options;
pub mod spec;
