//! Facts about a process from /proc: its standard descriptors (for
//! `descriptors.json`), namespace inodes, and whether it lives.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What runc writes as `descriptors.json`: the readlink targets of the
/// process's fds 0, 1 and 2 (e.g. `pipe:[51629]`, `/dev/null`). runc
/// restore turns the pipe entries into inherit_fd for its own stdio.
pub fn std_descriptors(pid: i32) -> io::Result<Vec<String>> {
    (0..3)
        .map(|fd| {
            fs::read_link(format!("/proc/{pid}/fd/{fd}")).map(|p| p.to_string_lossy().into_owned())
        })
        .collect()
}

/// The inode of a namespace file (`/proc/<pid>/ns/net`, or a bind-mounted
/// path such as `/var/run/netns/cni-...`), as CRIU names external
/// namespaces: `net[<inode>]:extRootNetNS`.
pub fn ns_inode(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The process's root directory as seen from the host.
pub fn root_of(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root"))
}

/// Whether a process with this pid exists.
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_descriptors_and_namespaces() {
        let me = std::process::id() as i32;
        let fds = std_descriptors(me).unwrap();
        assert_eq!(fds.len(), 3);
        let net = ns_inode(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(
            net,
            ns_inode(&PathBuf::from(format!("/proc/{me}/ns/net"))).unwrap()
        );
        assert!(alive(me));
    }
}
