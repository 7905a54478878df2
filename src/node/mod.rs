//! What podckptd reads and changes on the node itself, runtime-agnostic:
//! cgroup freezers, mount tables, the overlay writable layer, /proc.

pub mod cgroup;
pub mod memory;
pub mod mountinfo;
pub mod proc;
pub mod rootfs_diff;
pub mod tree;
