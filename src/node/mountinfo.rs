//! `/proc/<pid>/mountinfo`: the mounts a process sees, used to find a
//! container's overlay writable layer and its cgroup mounts.

use std::fs;
use std::io;
use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Mount ID.
    pub id: u32,
    /// Parent mount ID.
    pub parent: u32,
    /// Root of the mount within its filesystem (`/` unless a bind of a subtree).
    pub root: String,
    /// Mount point, relative to the process's root.
    pub mount_point: String,
    /// Per-mount options.
    pub options: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Per-superblock options (e.g. overlay's `upperdir=`).
    pub super_options: String,
}

impl Mount {
    /// The value of a superblock option such as `upperdir`.
    pub fn super_option(&self, key: &str) -> Option<&str> {
        // Overlay escapes commas inside paths with a backslash; split only
        // on unescaped commas.
        split_unescaped(&self.super_options)
            .find_map(|opt| opt.strip_prefix(key)?.strip_prefix('='))
    }
}

fn split_unescaped(s: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b',' => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&s[start..]);
    out.into_iter()
}

/// Undoes mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
pub fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    let (pre, post) = line.split_once(" - ")?;
    let mut pre = pre.split(' ');
    let id = pre.next()?.parse().ok()?;
    let parent = pre.next()?.parse().ok()?;
    let _dev = pre.next()?;
    let root = unescape(pre.next()?);
    let mount_point = unescape(pre.next()?);
    let options = pre.next()?.to_string();
    let mut post = post.splitn(3, ' ');
    Some(Mount {
        id,
        parent,
        root,
        mount_point,
        options,
        fstype: post.next()?.to_string(),
        source: unescape(post.next()?),
        super_options: post.next().unwrap_or("").to_string(),
    })
}

/// The mounts process `pid` sees.
pub fn for_pid(pid: i32) -> io::Result<Vec<Mount>> {
    let path = PathBuf::from(format!("/proc/{pid}/mountinfo"));
    Ok(parse(&fs::read_to_string(path)?))
}

/// The overlay writable layer (`upperdir`) of the mount at `/` in `mounts`
/// (the last one wins, as the kernel stacks them).
pub fn overlay_upperdir(mounts: &[Mount]) -> Option<PathBuf> {
    mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == "/" && m.fstype == "overlay")
        .and_then(|m| m.super_option("upperdir"))
        .map(|p| PathBuf::from(p.replace("\\,", ",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
1425 1291 0:112 / / rw,relatime master:560 - overlay overlay rw,lowerdir=/var/lib/containerd/snapshots/1/fs,upperdir=/var/lib/containerd/snapshots/7/fs,workdir=/var/lib/containerd/snapshots/7/work
1426 1425 0:114 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1430 1425 0:25 /kubepods/pod1/abc /sys/fs/cgroup/freezer ro,nosuid,nodev,noexec,relatime master:12 - cgroup cgroup rw,freezer
1440 1425 254:0 /var/lib/kubelet/pods/x/etc-hosts /etc/hosts rw,relatime - ext4 /dev/vda rw
1441 1425 0:120 / /my\\040dir rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].fstype, "overlay");
        assert_eq!(m[2].root, "/kubepods/pod1/abc");
        assert_eq!(m[2].super_options, "rw,freezer");
        assert_eq!(m[3].mount_point, "/etc/hosts");
        assert_eq!(m[4].mount_point, "/my dir");
        assert_eq!(
            overlay_upperdir(&m),
            Some(PathBuf::from("/var/lib/containerd/snapshots/7/fs"))
        );
    }

    #[test]
    fn skips_garbage_and_handles_no_overlay() {
        let m = parse("garbage\n\n1 2 3\n");
        assert!(m.is_empty());
        assert_eq!(
            overlay_upperdir(&parse(
                &SAMPLE.lines().skip(1).collect::<Vec<_>>().join("\n")
            )),
            None
        );
    }

    #[test]
    fn escaped_commas_in_overlay_paths() {
        let line =
            "1 0 0:1 / / rw - overlay overlay rw,lowerdir=/a\\,b,upperdir=/u\\,p/fs,workdir=/w";
        assert_eq!(
            overlay_upperdir(&parse(line)),
            Some(PathBuf::from("/u,p/fs"))
        );
    }
}
