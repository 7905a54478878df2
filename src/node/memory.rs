//! Memory habits of podckptd: warming the staging memory before a freeze,
//! and giving large buffers back after use.
//!
//! Many nodes are VMs whose hypervisor backs guest memory lazily and takes
//! back what the guest frees (virtio-balloon free page reporting,
//! Firecracker, most "memory overcommit" setups). There the first touch of
//! a page the guest had freed costs a hypervisor fault, and writing CRIU's
//! images into fresh staging memory is bounded by those faults rather than
//! by copying: measured on such a VM, three parallel 512 MiB dumps into
//! tmpfs took 0.8–2.1 s cold and 0.43–0.53 s right after the same amount of
//! memory had been touched and freed. Writing (and deleting) that much in
//! the staging tmpfs before the pod is frozen moves the cost out of the
//! frozen window; on a machine with fully backed memory it costs one cheap
//! pass. The memory is the staging dir's, as the images' will be, not
//! podckptd's own.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Size of each write.
const PIECE: usize = 1 << 20;

/// Writes `bytes` of zeros into temporary files under `dir` (on
/// `threads` threads), then deletes them, leaving the kernel's free lists
/// with pages the hypervisor has backed. Returns how long it took.
pub fn warm(dir: &Path, bytes: u64, threads: usize) -> io::Result<Duration> {
    let started = Instant::now();
    let threads = threads.max(1) as u64;
    let per = bytes.div_ceil(threads);
    let results: Vec<io::Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|i| s.spawn(move || warm_file(&dir.join(format!(".warm-{i}")), per)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("warming thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect::<io::Result<Vec<()>>>()?;
    Ok(started.elapsed())
}

fn warm_file(path: &Path, bytes: u64) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // Gone from the namespace at once; the pages go when the fd closes.
    fs::remove_file(path)?;
    let zeros = vec![0u8; PIECE];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(PIECE as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Buffers at least this big are mmapped of their own.
const MMAP_THRESHOLD: i32 = 1 << 20;

/// Makes glibc give large buffers (archive blocks, extraction chunks) back
/// to the system when they are freed. By default glibc raises its mmap
/// threshold after the first large free, so the next megabyte-sized
/// buffers come from its heaps and stay there: measured, podckptd kept
/// 70 MiB resident after a checkpoint instead of going back to 10 MiB.
/// Fixing the threshold keeps the dynamic adjustment off.
pub fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets one of glibc's allocator parameters and is
    // thread-safe (it takes the arena lock); no memory is touched.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        warm(dir.path(), 8 << 20, 2).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        warm(dir.path(), 0, 2).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_full_filesystem_is_an_error_and_leaves_nothing() {
        // /dev/shm may be small in containers; a tiny private tmpfs is not
        // available without root, so use a directory that cannot be written.
        let err = warm(Path::new("/proc"), 1 << 20, 1).unwrap_err();
        assert!(err.raw_os_error().is_some(), "{err}");
    }
}
