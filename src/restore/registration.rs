//! Containers registered for restore: the hand-off between podckptd (which
//! creates them through the runtime) and `podckpt-runc` (which restores
//! them when the runtime creates their task at StartContainer).
//!
//! Layout under the restore dir (0700, root):
//! - `registrations/<container-id>.json`: one [`Registration`] per
//!   container, written atomically (temp + rename), 0600;
//! - `keys/<key>.json`: a registration written before its container
//!   exists, keyed by the [`RESTORE_KEY_ANNOTATION`] podckptd puts on the
//!   container's config. The runtime copies it into the OCI bundle's
//!   `config.json`, where `podckpt-runc` reads it at `create`: CRI-O runs
//!   `create` inside CreateContainer, before podckptd learns the id.
//!   Whoever sees the id first (podckpt-runc at `create`, or podckptd when
//!   CreateContainer answers) moves it to `registrations/<id>.json`;
//! - `work/<id>/`: the extracted checkpoint a restore call made, shared by
//!   the containers of one pod and removed with the last registration that
//!   refers to it;
//! - `registrations/.lock`: serialises removals, so that two containers of
//!   one pod removed at once cannot both think the other still needs the
//!   work dir.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::node::safe_dir::{open_trusted_file, TrustedDir, UnsafeDir};

/// The largest registration file read (they are well under a KiB).
const MAX_REGISTRATION_BYTES: u64 = 1 << 20;

/// An untrusted directory or file as an I/O error that names it.
fn untrusted(e: UnsafeDir) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("untrusted restore directory: {e}"),
    )
}

/// Where a registration is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Created through the runtime; restored at its first task create.
    #[default]
    Pending,
    /// `runc restore` succeeded, the processes left stopped; the runtime's
    /// `start` that follows continues them, and then the registration goes.
    Restored,
}

/// One container to be restored from CRIU images.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The runtime's id of the new container.
    pub container_id: String,
    /// Its name (from the checkpoint).
    pub name: String,
    /// The new sandbox, empty for a single-container restore.
    #[serde(default)]
    pub pod_sandbox_id: String,
    /// The extracted checkpoint this container's files live in; removed
    /// with the last registration naming it.
    pub work_dir: PathBuf,
    /// The container's directory in it (`checkpoint/`, `rootfs-diff.tar`,
    /// `deleted.files`, ...).
    pub container_dir: PathBuf,
    /// The pod's /dev/shm contents, applied once per work dir.
    #[serde(default)]
    pub devshm_dir: Option<PathBuf>,
    /// The dump had established TCP connections.
    #[serde(default)]
    pub tcp_established: bool,
    /// The dump had file locks.
    #[serde(default)]
    pub file_locks: bool,
    /// The dump had unix sockets connected outside the container.
    #[serde(default)]
    pub ext_unix_sk: bool,
    /// Stage.
    #[serde(default)]
    pub stage: Stage,
    /// When it was registered.
    #[serde(default)]
    pub created_unix_ms: u64,
    /// When the work dir is still being extracted in the background: the
    /// groups (see [`super::progress`]) this container needs complete,
    /// its own and the pod's /dev/shm.
    #[serde(default)]
    pub wait_groups: Vec<usize>,
    /// Restore memory lazily (see [`super::lazy`]).
    #[serde(default)]
    pub lazy_pages: bool,
    /// The key it was registered under before the container existed
    /// ([`RESTORE_KEY_ANNOTATION`]).
    #[serde(default)]
    pub key: String,
}

impl Registration {
    /// CRIU images.
    pub fn images_dir(&self) -> PathBuf {
        self.container_dir.join("checkpoint")
    }
}

/// The registration store.
#[derive(Clone, Debug)]
pub struct Registry {
    root: PathBuf,
}

const REGISTRATIONS: &str = "registrations";
const KEYS: &str = "keys";

/// The container annotation carrying a registration's key, set by
/// podckptd on the configs it creates for restore and read back by
/// `podckpt-runc` from the bundle's `config.json`.
pub const RESTORE_KEY_ANNOTATION: &str = "io.podckpt.restore-key";
const WORK: &str = "work";

impl Registry {
    /// The store under `restore_dir`.
    pub fn new(restore_dir: impl Into<PathBuf>) -> Self {
        Self {
            root: restore_dir.into(),
        }
    }

    /// The restore dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn reg_dir(&self) -> PathBuf {
        self.root.join(REGISTRATIONS)
    }

    /// Where work dirs go.
    pub fn work_root(&self) -> PathBuf {
        self.root.join(WORK)
    }

    /// The registration file of a container.
    pub fn path(&self, container_id: &str) -> PathBuf {
        self.reg_dir().join(format!("{container_id}.json"))
    }

    fn key_dir(&self) -> PathBuf {
        self.root.join(KEYS)
    }

    /// The file of a registration stored under its key.
    pub fn key_path(&self, key: &str) -> PathBuf {
        self.key_dir().join(format!("{key}.json"))
    }

    /// Creates the directories (0700) and verifies them (see
    /// [`crate::node::safe_dir`]): the restore dir and every dir above it
    /// owned by root, writable by nobody else, no planted link.
    pub fn ensure(&self) -> io::Result<()> {
        self.verify(true).map(drop).map_err(untrusted)
    }

    /// The verified registrations dir (created first when `create`).
    pub fn verify(&self, create: bool) -> Result<TrustedDir, UnsafeDir> {
        self.trusted(REGISTRATIONS, create)
    }

    /// A verified dir of the store (all of them created first when `create`).
    fn trusted(&self, name: &str, create: bool) -> Result<TrustedDir, UnsafeDir> {
        let root = if create {
            let root = TrustedDir::ensure(&self.root)?;
            for dir in [WORK, KEYS, REGISTRATIONS] {
                root.ensure_child(dir)?;
            }
            root
        } else {
            TrustedDir::open(&self.root)?
        };
        root.child(name.as_ref())
    }

    /// Whether a container is registered: one stat, the only cost
    /// `podckpt-runc` adds for containers that are not.
    pub fn is_registered(&self, container_id: &str) -> bool {
        valid_id(container_id) && self.path(container_id).exists()
    }

    /// Loads a registration, `None` if there is none. It is trusted only
    /// when it and every directory above it pass [`TrustedDir`]'s check,
    /// it is a regular file (not a link) owned by root that nobody else
    /// may write, and the directories it names are under the work root.
    pub fn load(&self, container_id: &str) -> io::Result<Option<Registration>> {
        if !valid_id(container_id) {
            return Ok(None);
        }
        self.load_from(REGISTRATIONS, container_id, &self.path(container_id))
    }

    /// Loads `<dir>/<name>.json` of the store with every check of
    /// [`Registry::load`]; `None` if it (or the dir) does not exist.
    fn load_from(&self, dir: &str, name: &str, path: &Path) -> io::Result<Option<Registration>> {
        let dir = match self.trusted(dir, false) {
            Ok(d) => d,
            Err(UnsafeDir::Io {
                source: nix::errno::Errno::ENOENT,
                ..
            }) => return Ok(None),
            Err(e) => return Err(untrusted(e)),
        };
        let mut file = match open_trusted_file(&dir, &format!("{name}.json")) {
            Ok(f) => f,
            Err(UnsafeDir::Io {
                source: nix::errno::Errno::ENOENT,
                ..
            }) => return Ok(None),
            Err(e) => return Err(untrusted(e)),
        };
        let mut data = Vec::new();
        (&mut file)
            .take(MAX_REGISTRATION_BYTES)
            .read_to_end(&mut data)?;
        let reg: Registration = serde_json::from_slice(&data).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a registration: {e}", path.display()),
            )
        })?;
        let work_root = self.work_root();
        let inside = |p: &Path, base: &Path| {
            p.starts_with(base)
                && p.components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir))
        };
        let dirs_ok = reg.work_dir.parent() == Some(work_root.as_path())
            && inside(&reg.container_dir, &reg.work_dir)
            && reg
                .devshm_dir
                .as_deref()
                .is_none_or(|d| inside(d, &reg.work_dir));
        if !dirs_ok {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: names directories outside {}; refused",
                    path.display(),
                    work_root.display()
                ),
            ));
        }
        Ok(Some(reg))
    }

    /// Writes a registration atomically.
    pub fn store(&self, reg: &Registration) -> io::Result<()> {
        if !valid_id(&reg.container_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid container id {:?}", reg.container_id),
            ));
        }
        self.ensure()?;
        write_atomically(&self.path(&reg.container_id), reg)
    }

    /// Writes a registration under its `key`, before the container exists.
    pub fn store_keyed(&self, reg: &Registration) -> io::Result<()> {
        if !valid_id(&reg.key) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid restore key {:?}", reg.key),
            ));
        }
        self.ensure()?;
        write_atomically(&self.key_path(&reg.key), reg)
    }

    /// Whether any registration waits under a key (one directory read).
    pub fn has_keys(&self) -> bool {
        fs::read_dir(self.key_dir()).is_ok_and(|mut rd| {
            rd.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json")))
        })
    }

    /// Moves the registration stored under `key` to `container_id`, if it
    /// is still under its key; returns the container's registration, which
    /// may have been moved (and used) already. `None`: neither exists.
    pub fn bind_key(&self, key: &str, container_id: &str) -> io::Result<Option<Registration>> {
        if !valid_id(key) || !valid_id(container_id) {
            return Ok(None);
        }
        let _lock = self.lock()?;
        let path = self.key_path(key);
        match self.load_from(KEYS, key, &path)? {
            Some(mut reg) => {
                reg.container_id = container_id.to_owned();
                self.store(&reg)?;
                remove_if_exists(&path)?;
                Ok(Some(reg))
            }
            None => Ok(self.load(container_id)?.filter(|r| r.key == key)),
        }
    }

    /// Removes a registration stored under `key` (not bound to a container
    /// yet). Missing is fine; its work dir stays with the caller.
    pub fn remove_key(&self, key: &str) -> io::Result<()> {
        if !valid_id(key) {
            return Ok(());
        }
        let _lock = self.lock()?;
        remove_if_exists(&self.key_path(key))
    }

    fn keyed(&self) -> Vec<(PathBuf, Registration)> {
        let Ok(rd) = fs::read_dir(self.key_dir()) else {
            return vec![];
        };
        rd.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| {
                let name = e
                    .file_name()
                    .to_string_lossy()
                    .strip_suffix(".json")?
                    .to_owned();
                let reg = self.load_from(KEYS, &name, &e.path()).ok().flatten()?;
                Some((e.path(), reg))
            })
            .collect()
    }
}

fn write_atomically(path: &Path, reg: &Registration) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(reg).map_err(io::Error::other)?;
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

impl Registry {
    /// Whether any container is registered (one directory read).
    pub fn has_registrations(&self) -> bool {
        fs::read_dir(self.reg_dir()).is_ok_and(|mut rd| {
            rd.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json")))
        })
    }

    /// Every registration (unreadable or untrusted ones are skipped).
    pub fn list(&self) -> Vec<Registration> {
        let Ok(rd) = fs::read_dir(self.reg_dir()) else {
            return vec![];
        };
        rd.filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_suffix(".json")
                    .map(str::to_owned)
            })
            .filter_map(|id| self.load(&id).ok().flatten())
            .collect()
    }

    fn lock(&self) -> io::Result<Flock<fs::File>> {
        self.ensure()?;
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.reg_dir().join(".lock"))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))
    }

    /// Removes a container's registration, and its work dir when no other
    /// registration refers to it. Missing is fine.
    pub fn remove(&self, container_id: &str) -> io::Result<()> {
        let Some(reg) = self.load(container_id)? else {
            return Ok(());
        };
        let _lock = self.lock()?;
        remove_if_exists(&self.path(container_id))?;
        let still_used = self.list().iter().any(|r| r.work_dir == reg.work_dir);
        if !still_used {
            self.remove_work_dir(&reg.work_dir)?;
        }
        Ok(())
    }

    /// Removes a work dir, but only one under this store's work root.
    pub fn remove_work_dir(&self, dir: &Path) -> io::Result<()> {
        if dir.parent() != Some(self.work_root().as_path()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a podckpt work dir", dir.display()),
            ));
        }
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Drops registrations of containers the runtime no longer has, and
    /// work dirs nobody refers to, except those in `keep` (this process's
    /// restores in progress) and those younger than `min_age` (another
    /// podckptd on the node may be extracting into one before it
    /// registers anything). Returns how many registrations went.
    pub fn collect_garbage(
        &self,
        live: &HashSet<String>,
        keep: &HashSet<PathBuf>,
        min_age: std::time::Duration,
    ) -> usize {
        let mut gone = 0;
        for reg in self.list() {
            if !live.contains(&reg.container_id) && self.remove(&reg.container_id).is_ok() {
                gone += 1;
            }
        }
        let Ok(_lock) = self.lock() else { return gone };
        // Keyed registrations whose CreateContainer never answered (a
        // podckptd that died in between): as old as an orphaned work dir.
        let old = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age)
        };
        for (path, _) in self.keyed() {
            if old(&path) && !keep.iter().any(|k| path.starts_with(k)) {
                let _ = remove_if_exists(&path);
            }
        }
        let used: HashSet<PathBuf> = self
            .list()
            .into_iter()
            .chain(self.keyed().into_iter().map(|(_, r)| r))
            .map(|r| r.work_dir)
            .collect();
        if let Ok(rd) = fs::read_dir(self.work_root()) {
            for e in rd.filter_map(Result::ok) {
                let p = e.path();
                let old_enough = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= min_age);
                if !used.contains(&p) && !keep.contains(&p) && old_enough {
                    let _ = self.remove_work_dir(&p);
                }
            }
        }
        gone
    }
}

/// Container ids are hex from the runtime; anything with a path separator
/// must never become part of a path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.')
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(reg: &Registry, id: &str, work: &str) -> Registration {
        let work_dir = reg.work_root().join(work);
        fs::create_dir_all(work_dir.join("c")).unwrap();
        Registration {
            container_id: id.into(),
            name: id.into(),
            container_dir: work_dir.join("c"),
            work_dir,
            ..Default::default()
        }
    }

    #[test]
    fn store_load_remove_keeps_shared_work_dir_until_last() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::new(d.path().join("restore"));
        let a = reg(&r, "aaa", "w1");
        let b = reg(&r, "bbb", "w1");
        r.store(&a).unwrap();
        r.store(&b).unwrap();
        assert!(r.is_registered("aaa"));
        assert_eq!(r.load("aaa").unwrap().unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(r.path("aaa")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        r.remove("aaa").unwrap();
        assert!(!r.is_registered("aaa"));
        assert!(a.work_dir.exists(), "still used by bbb");
        r.remove("bbb").unwrap();
        assert!(!a.work_dir.exists());
        r.remove("bbb").unwrap();
    }

    #[test]
    fn keyed_registration_is_bound_once_by_whoever_comes_first() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::new(d.path().join("restore"));
        let mut a = reg(&r, "", "w1");
        a.key = "k1".into();
        r.store_keyed(&a).unwrap();
        assert!(r.has_keys());
        assert!(!r.is_registered("c1"));
        // podckpt-runc's create (CRI-O) comes first ...
        let got = r.bind_key("k1", "c1").unwrap().unwrap();
        assert_eq!(got.container_id, "c1");
        assert!(r.is_registered("c1"));
        assert!(!r.has_keys());
        let mut restored = got.clone();
        restored.stage = Stage::Restored;
        r.store(&restored).unwrap();
        // ... then podckptd's answer finds it bound and leaves it as it is.
        let again = r.bind_key("k1", "c1").unwrap().unwrap();
        assert_eq!(again.stage, Stage::Restored);
        assert!(r.bind_key("k1", "other").unwrap().is_none());
        assert!(r.bind_key("nokey", "c2").unwrap().is_none());
        let mut b = reg(&r, "", "w2");
        b.key = "k2".into();
        r.store_keyed(&b).unwrap();
        r.remove_key("k2").unwrap();
        assert!(!r.has_keys());
        b.key = "../x".into();
        assert!(r.store_keyed(&b).is_err());
    }

    #[test]
    fn ids_with_paths_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::new(d.path());
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(!r.is_registered(bad));
            assert!(r.load(bad).unwrap().is_none());
            let g = Registration {
                container_id: bad.into(),
                ..Default::default()
            };
            assert!(r.store(&g).is_err());
        }
    }

    #[test]
    fn garbage_collection() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::new(d.path());
        r.store(&reg(&r, "live", "w1")).unwrap();
        r.store(&reg(&r, "dead", "w2")).unwrap();
        fs::create_dir_all(r.work_root().join("orphan")).unwrap();
        fs::create_dir_all(r.work_root().join("busy")).unwrap();
        let live = ["live".to_string()].into();
        let keep = [r.work_root().join("busy")].into();
        // Too young: a restore elsewhere may be filling it.
        assert_eq!(
            r.collect_garbage(&live, &keep, std::time::Duration::from_secs(600)),
            1
        );
        assert!(r.work_root().join("orphan").exists());
        assert_eq!(
            r.collect_garbage(&live, &keep, std::time::Duration::ZERO),
            0
        );
        assert!(r.is_registered("live"));
        assert!(!r.is_registered("dead"));
        assert!(r.work_root().join("w1").exists());
        assert!(!r.work_root().join("w2").exists());
        assert!(!r.work_root().join("orphan").exists());
        assert!(r.work_root().join("busy").exists());
    }
}
