//! Checkpoint archives: writing them atomically and compressed, and (for
//! restore) reading them back after validating every entry; [`inspect`]
//! describes one offline.

pub mod direct;
pub mod export;
pub mod extract;
pub mod footer;
pub mod frames;
pub mod inspect;
pub mod manifest;
pub mod reader;
pub mod writer;

pub use writer::{ArchiveError, ArchiveWriter, Compression, TempFile};
