//! Checkpoint archives: writing them atomically and compressed, and (for
//! restore) reading them back after validating every entry.

pub mod extract;
pub mod manifest;
pub mod reader;
pub mod writer;

pub use writer::{ArchiveError, ArchiveWriter, Compression, TempFile};
