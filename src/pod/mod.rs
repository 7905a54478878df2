//! Pod checkpoint and restore orchestration.

pub mod checkpoint;
pub mod criu_opts;
pub mod error;
pub mod guardian;
pub mod inspect;
pub mod options;
pub mod restore;
pub mod restore_check;
pub mod seen;
pub mod spec;
