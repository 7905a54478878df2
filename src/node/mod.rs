//! What podckptd reads and changes on the node itself, runtime-agnostic:
//! cgroup freezers, mount tables, the overlay writable layer, /proc, and the
//! trusted directories podckpt writes into (owned by root, opened without
//! following links).

pub mod cgroup;
pub mod memory;
pub mod mountinfo;
pub mod proc;
pub mod rootfs_diff;
pub mod safe_dir;
pub mod tree;
