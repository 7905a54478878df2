//! Trusted directories: the state, staging and restore dirs that podckptd
//! and podckpt-runc (both root) write process memory into and read
//! registrations from.
//!
//! A directory is trusted when it and every directory above it are owned by
//! root (or by the process's own user, so that unprivileged unit tests can
//! use their temp dirs), the directory itself lets neither group nor others
//! write, and a directory above it lets them write only with the sticky bit
//! set (`/tmp`, `/dev/shm`: others can add entries there, but cannot rename
//! or remove ours). Paths are walked from `/` one component at a time with
//! `openat(O_NOFOLLOW | O_DIRECTORY)`: a symbolic link is followed only when
//! it sits in a directory nobody but root can write (`/var/run -> /run`),
//! because only root can have planted it; anywhere else it is refused.
//!
//! What the walk returns is an open descriptor of the verified directory:
//! entries are then created relative to it (`mkdirat`), so a path swapped
//! after the check cannot redirect them.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, OFlag, AT_FDCWD};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};

/// Symbolic links followed in one walk before giving up (as the kernel).
const MAX_LINKS: usize = 40;
/// Attempts at a fresh random name before giving up.
const NAME_ATTEMPTS: usize = 16;

/// Why a directory is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeDir {
    /// Not an absolute path, or one with `..` in it.
    #[error("{path}: must be an absolute path without ..")]
    NotAbsolute {
        /// The path concerned.
        path: PathBuf,
    },
    /// A symbolic link where a non-root user could have planted it.
    #[error("{path}: is a symbolic link in a directory others can write to; refused")]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// Something other than a directory.
    #[error("{path}: is not a directory")]
    NotDir {
        /// The path concerned.
        path: PathBuf,
    },
    /// Something other than a regular file, where a file was expected.
    #[error("{path}: is not a regular file")]
    NotFile {
        /// The path concerned.
        path: PathBuf,
    },
    /// Owned by another user.
    #[error("{path}: owned by uid {uid}, not root")]
    Owner {
        /// The path concerned.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Group or others may write to it.
    #[error("{path}: mode {mode:04o} lets group or others write to it")]
    Writable {
        /// The path concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Too many symbolic links.
    #[error("{path}: too many levels of symbolic links")]
    Loop {
        /// The path concerned.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: Errno,
    },
}

/// A verified directory, held open.
#[derive(Debug)]
pub struct TrustedDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// How the last component of a walk is judged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    /// Must not be writable by group or others.
    Private,
    /// May be world-writable when sticky (a parent for random names).
    Shared,
}

impl TrustedDir {
    /// Verifies an existing directory.
    pub fn open(path: &Path) -> Result<Self, UnsafeDir> {
        walk(path, false, Last::Private)
    }

    /// Verifies a directory, creating it and any missing parent (0700,
    /// owned by us) first.
    pub fn ensure(path: &Path) -> Result<Self, UnsafeDir> {
        walk(path, true, Last::Private)
    }

    /// Verifies a directory that may be shared with other users through the
    /// sticky bit (`/dev/shm`, `/tmp`): only fit to hold the directories
    /// [`TrustedDir::create_private`] makes under random names.
    pub fn open_shared(path: &Path) -> Result<Self, UnsafeDir> {
        walk(path, false, Last::Shared)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Walks the path again: the check "before each use".
    pub fn reverify(&self) -> Result<(), UnsafeDir> {
        let again = walk(&self.path, false, Last::Private).or_else(|e| match e {
            UnsafeDir::Writable { .. } => walk(&self.path, false, Last::Shared),
            e => Err(e),
        })?;
        let (a, b) = (stat(&self.fd, &self.path)?, stat(&again.fd, &self.path)?);
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return Err(UnsafeDir::Io {
                path: self.path.clone(),
                op: "verify (replaced since it was opened)",
                source: Errno::ESTALE,
            });
        }
        Ok(())
    }

    /// Creates a fresh directory (0700) under an unpredictable name
    /// `<prefix><16 hex digits>`; `mkdir` never reuses an existing entry,
    /// so a name another user planted first is skipped, not trusted.
    pub fn create_private(&self, prefix: &str) -> Result<TrustedDir, UnsafeDir> {
        for _ in 0..NAME_ATTEMPTS {
            let name = format!("{prefix}{}", random_hex()?);
            match mkdirat(
                self.fd.as_fd(),
                name.as_str(),
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) => return self.child(OsStr::new(&name)),
                Err(Errno::EEXIST) => continue,
                Err(source) => {
                    return Err(UnsafeDir::Io {
                        path: self.path.join(&name),
                        op: "mkdir",
                        source,
                    })
                }
            }
        }
        Err(UnsafeDir::Io {
            path: self.path.join(prefix),
            op: "mkdir (no free random name)",
            source: Errno::EEXIST,
        })
    }

    /// An unpredictable name `<prefix><16 hex digits>` for
    /// [`TrustedDir::create_new`], when the name must be known (and
    /// recorded) before the directory exists.
    pub fn random_name(prefix: &str) -> Result<String, UnsafeDir> {
        Ok(format!("{prefix}{}", random_hex()?))
    }

    /// Creates a new subdirectory (0700); an existing entry of that name
    /// is an error, never reused.
    pub fn create_new(&self, name: &str) -> Result<TrustedDir, UnsafeDir> {
        mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(0o700)).map_err(|source| {
            UnsafeDir::Io {
                path: self.path.join(name),
                op: "mkdir",
                source,
            }
        })?;
        self.child(OsStr::new(name))
    }

    /// Opens (creating it 0700 if missing) a subdirectory by name, and
    /// verifies it.
    pub fn ensure_child(&self, name: &str) -> Result<TrustedDir, UnsafeDir> {
        match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => self.child(OsStr::new(name)),
            Err(source) => Err(UnsafeDir::Io {
                path: self.path.join(name),
                op: "mkdir",
                source,
            }),
        }
    }

    /// Opens an existing subdirectory by name, and verifies it.
    pub fn child(&self, name: &OsStr) -> Result<TrustedDir, UnsafeDir> {
        let path = self.path.join(name);
        let fd = open_dir(self.fd.as_fd(), name, &path)?;
        check(&fd, &path, Last::Private)?;
        Ok(TrustedDir { path, fd })
    }
}

fn open_dir(dir: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<OwnedFd, UnsafeDir> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| match source {
        Errno::ELOOP => UnsafeDir::Symlink { path: path.into() },
        Errno::ENOTDIR => UnsafeDir::NotDir { path: path.into() },
        source => UnsafeDir::Io {
            path: path.into(),
            op: "open",
            source,
        },
    })
}

fn stat(fd: &OwnedFd, path: &Path) -> Result<FileStat, UnsafeDir> {
    fstat(fd).map_err(|source| UnsafeDir::Io {
        path: path.into(),
        op: "stat",
        source,
    })
}

/// The owners we trust: root, and ourselves.
pub fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn check(fd: &OwnedFd, path: &Path, last: Last) -> Result<FileStat, UnsafeDir> {
    let st = stat(fd, path)?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
        return Err(UnsafeDir::NotDir { path: path.into() });
    }
    if !trusted_owner(st.st_uid) {
        return Err(UnsafeDir::Owner {
            path: path.into(),
            uid: st.st_uid,
        });
    }
    let mode = st.st_mode & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(last == Last::Shared && sticky) {
        return Err(UnsafeDir::Writable {
            path: path.into(),
            mode,
        });
    }
    Ok(st)
}

/// The components of an absolute path; `None` when it is relative or has `..`.
fn components(path: &Path) -> Option<VecDeque<OsString>> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = VecDeque::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push_back(n.to_os_string()),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn walk(path: &Path, create: bool, last: Last) -> Result<TrustedDir, UnsafeDir> {
    let mut pending =
        components(path).ok_or_else(|| UnsafeDir::NotAbsolute { path: path.into() })?;
    let root = || -> Result<(OwnedFd, PathBuf), UnsafeDir> {
        let fd = openat(
            AT_FDCWD,
            "/",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| UnsafeDir::Io {
            path: "/".into(),
            op: "open",
            source,
        })?;
        Ok((fd, PathBuf::from("/")))
    };
    let (mut cur, mut cur_path) = root()?;
    let mut cur_st = check(&cur, &cur_path, Last::Shared)?;
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        let next_path = cur_path.join(&name);
        let is_last = pending.is_empty();
        let judge = if is_last { last } else { Last::Shared };
        match open_dir(cur.as_fd(), &name, &next_path) {
            Ok(fd) => {
                cur_st = check(&fd, &next_path, judge)?;
                cur = fd;
                cur_path = next_path;
            }
            Err(UnsafeDir::Io {
                source: Errno::ENOENT,
                ..
            }) if create => {
                match mkdirat(
                    cur.as_fd(),
                    name.as_os_str(),
                    Mode::from_bits_truncate(0o700),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => pending.push_front(name),
                    Err(source) => {
                        return Err(UnsafeDir::Io {
                            path: next_path,
                            op: "mkdir",
                            source,
                        })
                    }
                }
            }
            Err(e @ (UnsafeDir::Symlink { .. } | UnsafeDir::NotDir { .. })) => {
                let lst = fstatat(
                    cur.as_fd(),
                    name.as_os_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|source| UnsafeDir::Io {
                    path: next_path.clone(),
                    op: "stat",
                    source,
                })?;
                if SFlag::from_bits_truncate(lst.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFLNK {
                    return Err(e);
                }
                // A link only root could have put there is the admin's.
                let parent_locked =
                    cur_st.st_mode & 0o022 == 0 && cur_st.st_uid == 0 && lst.st_uid == 0;
                if !parent_locked {
                    return Err(UnsafeDir::Symlink { path: next_path });
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(UnsafeDir::Loop { path: path.into() });
                }
                let target =
                    readlinkat(cur.as_fd(), name.as_os_str()).map_err(|source| UnsafeDir::Io {
                        path: next_path.clone(),
                        op: "readlink",
                        source,
                    })?;
                // `cur_path` has no links left in it, so `..` in the target
                // can be resolved by name.
                let mut full = if Path::new(&target).is_absolute() {
                    PathBuf::from("/")
                } else {
                    cur_path.clone()
                };
                for c in Path::new(&target).components() {
                    match c {
                        Component::ParentDir => {
                            full.pop();
                        }
                        Component::Normal(n) => full.push(n),
                        _ => {}
                    }
                }
                let mut again = components(&full).unwrap_or_default();
                again.extend(pending.drain(..));
                pending = again;
                (cur, cur_path) = root()?;
                cur_st = check(&cur, &cur_path, Last::Shared)?;
            }
            Err(e) => return Err(e),
        }
    }
    if pending.is_empty() && cur_path == Path::new("/") {
        // The root itself: fine for nobody to write.
        check(&cur, &cur_path, last)?;
    }
    Ok(TrustedDir {
        path: cur_path,
        fd: cur,
    })
}

/// 16 hex digits from the kernel's random source.
fn random_hex() -> Result<String, UnsafeDir> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| UnsafeDir::Io {
            path: "/dev/urandom".into(),
            op: "read",
            source: Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO)),
        })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Creates `path`, which must not exist yet (no link is followed: one
/// planted there fails the call), with `data` and `mode`.
pub fn create_new_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.write_all(data))
}

/// Writes `data` to `tmp` as [`create_new_file`] does and renames it onto
/// `dest`, so that readers see the old file or the new one whole; `tmp` is
/// removed again when a step fails.
pub fn replace_file_via(tmp: &Path, dest: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let result = create_new_file(tmp, data, mode).and_then(|()| std::fs::rename(tmp, dest));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Opens a regular file in a trusted directory without following a link,
/// and checks it is owned by a trusted user and writable by nobody else.
pub fn open_trusted_file(dir: &TrustedDir, name: &str) -> Result<std::fs::File, UnsafeDir> {
    let path = dir.path().join(name);
    let fd = openat(
        dir.fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|source| match source {
        Errno::ELOOP => UnsafeDir::Symlink { path: path.clone() },
        source => UnsafeDir::Io {
            path: path.clone(),
            op: "open",
            source,
        },
    })?;
    let st = stat(&fd, &path)?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(UnsafeDir::NotFile { path });
    }
    if !trusted_owner(st.st_uid) {
        return Err(UnsafeDir::Owner {
            path,
            uid: st.st_uid,
        });
    }
    if st.st_mode & 0o022 != 0 {
        return Err(UnsafeDir::Writable {
            path,
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(std::fs::File::from(fd))
}

/// Opens a trusted regular file by absolute path (a configuration file):
/// its directory is walked as [`TrustedDir::open`] does, and the file is
/// opened as [`open_trusted_file`] does. A symbolic link as the last
/// component is followed only when it is owned by a trusted user and sits
/// in that verified directory, which nobody else can write to, so only root
/// could have planted it (an admin's `podckptd.toml -> podckptd-v2.toml`).
pub fn open_trusted_path(path: &Path) -> Result<std::fs::File, UnsafeDir> {
    let mut path = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(UnsafeDir::NotFile { path });
        };
        let dir = TrustedDir::open(parent)?;
        let name_str = name.to_str().ok_or_else(|| UnsafeDir::Io {
            path: path.clone(),
            op: "open (name is not UTF-8)",
            source: Errno::EINVAL,
        })?;
        match open_trusted_file(&dir, name_str) {
            Err(UnsafeDir::Symlink { path: link }) => {
                let lst = fstatat(dir.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|source| UnsafeDir::Io {
                        path: link.clone(),
                        op: "stat",
                        source,
                    })?;
                if !trusted_owner(lst.st_uid) {
                    return Err(UnsafeDir::Owner {
                        path: link,
                        uid: lst.st_uid,
                    });
                }
                let target = readlinkat(dir.fd(), name).map_err(|source| UnsafeDir::Io {
                    path: link.clone(),
                    op: "readlink",
                    source,
                })?;
                // A relative target is resolved from the verified directory;
                // `..` in it is refused by the next walk.
                path = dir.path().join(target);
            }
            other => return other,
        }
    }
    Err(UnsafeDir::Loop { path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_private_dirs_and_refuses_links_and_loose_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let d = TrustedDir::ensure(&base.join("a/b")).unwrap();
        let mode = fs::metadata(d.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        d.reverify().unwrap();

        // A link planted in a world-writable (sticky) dir is refused.
        let shared = base.join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::symlink(base.join("a"), shared.join("link")).unwrap();
        let err = TrustedDir::ensure(&shared.join("link")).unwrap_err();
        assert!(matches!(err, UnsafeDir::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("shared/link"), "{err}");
        // The shared dir is fit only to hold random names.
        assert!(matches!(
            TrustedDir::open(&shared).unwrap_err(),
            UnsafeDir::Writable { .. }
        ));
        let parent = TrustedDir::open_shared(&shared).unwrap();
        let p = parent.create_private("x-").unwrap();
        assert!(p.path().file_name().unwrap().len() == 2 + 16);
        let q = parent.create_private("x-").unwrap();
        assert_ne!(p.path(), q.path());

        // A dir others may write to is refused, and so is what is under it.
        let loose = base.join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o777)).unwrap();
        let err = TrustedDir::ensure(&loose.join("x")).unwrap_err();
        assert!(matches!(err, UnsafeDir::Writable { .. }), "{err}");
        assert!(!loose.join("x").exists());
        assert!(matches!(
            TrustedDir::open(Path::new("relative")).unwrap_err(),
            UnsafeDir::NotAbsolute { .. }
        ));
        assert!(matches!(
            TrustedDir::open(&base.join("a/../a")).unwrap_err(),
            UnsafeDir::NotAbsolute { .. }
        ));
        // A file is not a dir.
        fs::write(base.join("f"), "").unwrap();
        assert!(matches!(
            TrustedDir::ensure(&base.join("f")).unwrap_err(),
            UnsafeDir::NotDir { .. }
        ));
    }

    #[test]
    fn trusted_files_by_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("ok.toml"), "x").unwrap();
        fs::set_permissions(dir.join("ok.toml"), fs::Permissions::from_mode(0o644)).unwrap();
        open_trusted_path(&dir.join("ok.toml")).unwrap();
        // A link in a directory nobody else writes to: the admin's.
        std::os::unix::fs::symlink("ok.toml", dir.join("alias.toml")).unwrap();
        open_trusted_path(&dir.join("alias.toml")).unwrap();
        // Others may write to the file: refused.
        fs::write(dir.join("loose.toml"), "x").unwrap();
        fs::set_permissions(dir.join("loose.toml"), fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            open_trusted_path(&dir.join("loose.toml")).unwrap_err(),
            UnsafeDir::Writable { .. }
        ));
        // Not a regular file.
        fs::create_dir(dir.join("sub")).unwrap();
        assert!(matches!(
            open_trusted_path(&dir.join("sub")).unwrap_err(),
            UnsafeDir::NotFile { .. }
        ));
        // A link in a shared (sticky, world-writable) directory: refused.
        let shared = dir.join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::symlink(dir.join("ok.toml"), shared.join("c.toml")).unwrap();
        assert!(matches!(
            open_trusted_path(&shared.join("c.toml")).unwrap_err(),
            UnsafeDir::Writable { .. }
        ));
        // A link loop ends.
        std::os::unix::fs::symlink("loop.toml", dir.join("loop.toml")).unwrap();
        assert!(matches!(
            open_trusted_path(&dir.join("loop.toml")).unwrap_err(),
            UnsafeDir::Loop { .. }
        ));
    }

    #[test]
    fn follows_links_only_root_could_plant() {
        // A link in a dir nobody else can write (like /var/run -> /run) is
        // the admin's and is followed; only meaningful as root.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (links owned by root)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", tmp.path().join("alias")).unwrap();
        let d = TrustedDir::ensure(&tmp.path().join("alias/sub")).unwrap();
        assert_eq!(d.path(), tmp.path().join("real/sub"));
    }
}
