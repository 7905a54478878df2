//! The CRI configs the kubelet sent through podckptd: every RunPodSandbox
//! and CreateContainer request is noted on its way to the runtime, so that
//! a checkpoint records the pod's configs whole on runtimes whose status
//! does not keep them.
//!
//! containerd's verbose status carries the original configs; CRI-O's does
//! not (its sandbox status has no config at all, and a container's can only
//! be pieced together from its OCI spec, which loses `linux`, DNS, ports,
//! the hostname and `user_specified_image`). A restore from such a piecing
//! creates a different pod, so the request itself is the better source.
//!
//! Records live in `<state-dir>/seen/`, one small file each (0600, in a
//! trusted 0700 dir), holding the request's message bytes as the caller
//! sent them. File names are derived from the identity the runtime later
//! reports (sandbox metadata; sandbox id plus container metadata), and a
//! record is used only if the decoded request has exactly that identity.
//! Noting never delays or fails the relayed call: it is written off the
//! call's path, and a failure is logged. Records of sandboxes the runtime
//! no longer lists are dropped when a sandbox is removed, and their number
//! is bounded by `--max-seen-configs`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;

use crate::cri::api::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, PodSandbox, PodSandboxConfig,
    PodSandboxMetadata, RunPodSandboxRequest,
};
use crate::node::safe_dir::{open_trusted_file, replace_file_via, TrustedDir};

/// The records' directory under the state dir.
pub const SEEN_DIR: &str = "seen";
/// Default of `--max-seen-configs`.
pub const DEFAULT_MAX_SEEN: usize = 8192;
/// The largest request kept (a pod's config is a few KiB; this bounds what
/// one call can make podckptd write).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

const SANDBOX_PREFIX: &str = "s-";
const CONTAINER_PREFIX: &str = "c-";
const TMP_PREFIX: &str = ".tmp-";

/// The store; cheap to clone.
#[derive(Clone, Debug)]
pub struct SeenConfigs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    max: usize,
}

/// Hex of arbitrary bytes: names from caller-chosen strings can hold no
/// `/`, `.` or NUL this way.
fn hex(s: &[u8]) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

/// The longest file name most filesystems take.
const NAME_MAX: usize = 255;

/// The record name of a sandbox: its uid and attempt (the kubelet's uid is
/// unique per pod; a reused one is caught by the identity check on read).
fn sandbox_name(m: &PodSandboxMetadata) -> Option<String> {
    let name = format!("{SANDBOX_PREFIX}{}-{}", hex(m.uid.as_bytes()), m.attempt);
    (!m.uid.is_empty() && name.len() <= NAME_MAX).then_some(name)
}

/// The record name of a container: its sandbox, name and attempt.
fn container_name(sandbox_id: &str, m: &ContainerMetadata) -> Option<String> {
    let ok_id = !sandbox_id.is_empty() && sandbox_id.bytes().all(|b| b.is_ascii_alphanumeric());
    let name = format!(
        "{CONTAINER_PREFIX}{sandbox_id}-{}-{}",
        hex(m.name.as_bytes()),
        m.attempt
    );
    (ok_id && !m.name.is_empty() && name.len() <= NAME_MAX).then_some(name)
}

impl SeenConfigs {
    /// A store under `state_dir` keeping at most `max` records (0: noting
    /// is off and lookups find nothing).
    pub fn new(state_dir: &Path, max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: state_dir.join(SEEN_DIR),
                max,
            }),
        }
    }

    /// Notes a RunPodSandbox request (its gRPC message bytes), in the
    /// background. Never fails the call.
    pub fn note_run_pod_sandbox(&self, message: &[u8]) {
        let Some(name) = RunPodSandboxRequest::decode(message)
            .ok()
            .and_then(|r| r.config)
            .and_then(|c| c.metadata)
            .and_then(|m| sandbox_name(&m))
        else {
            return;
        };
        self.spawn_write(name, message);
    }

    /// Notes a CreateContainer request, in the background.
    pub fn note_create_container(&self, message: &[u8]) {
        let Some(name) = CreateContainerRequest::decode(message).ok().and_then(|r| {
            let m = r.config.and_then(|c| c.metadata)?;
            container_name(&r.pod_sandbox_id, &m)
        }) else {
            return;
        };
        self.spawn_write(name, message);
    }

    fn spawn_write(&self, name: String, message: &[u8]) {
        if self.inner.max == 0 || message.len() > MAX_RECORD_BYTES {
            return;
        }
        let this = self.clone();
        let bytes = message.to_vec();
        // Off the relayed call's path: the call goes on while this writes.
        let write = move || {
            if let Err(err) = this.write(&name, &bytes) {
                tracing::warn!(record = %name, error = %err, "cannot note a CRI config");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    fn dir(&self) -> std::io::Result<TrustedDir> {
        TrustedDir::ensure(&self.inner.dir).map_err(std::io::Error::other)
    }

    /// Writes one record: a fresh temporary file (0600, never following a
    /// link), then renamed over the name, so a reader sees all or nothing.
    fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.dir()?;
        let count = std::fs::read_dir(dir.path())?.count();
        if count >= self.inner.max && !dir.path().join(name).exists() {
            return Err(std::io::Error::other(format!(
                "{count} records: --max-seen-configs reached"
            )));
        }
        let tmp_name = TrustedDir::random_name(TMP_PREFIX).map_err(std::io::Error::other)?;
        replace_file_via(
            &dir.path().join(&tmp_name),
            &dir.path().join(name),
            bytes,
            0o600,
        )
    }

    fn read(&self, name: &str) -> Option<Vec<u8>> {
        let dir = TrustedDir::open(&self.inner.dir).ok()?;
        let f = open_trusted_file(&dir, name).ok()?;
        let mut out = Vec::new();
        Read::take(f, MAX_RECORD_BYTES as u64 + 1)
            .read_to_end(&mut out)
            .ok()?;
        (out.len() <= MAX_RECORD_BYTES).then_some(out)
    }

    /// The config a RunPodSandbox with exactly this metadata was sent
    /// with. Blocking.
    pub fn sandbox(&self, m: &PodSandboxMetadata) -> Option<PodSandboxConfig> {
        let bytes = self.read(&sandbox_name(m)?)?;
        let config = RunPodSandboxRequest::decode(bytes.as_slice())
            .ok()?
            .config?;
        (config.metadata.as_ref() == Some(m)).then_some(config)
    }

    /// The config CreateContainer was sent with in `sandbox_id` for exactly
    /// this metadata. Blocking.
    pub fn container(&self, sandbox_id: &str, m: &ContainerMetadata) -> Option<ContainerConfig> {
        let bytes = self.read(&container_name(sandbox_id, m)?)?;
        let req = CreateContainerRequest::decode(bytes.as_slice()).ok()?;
        let config = req.config?;
        (req.pod_sandbox_id == sandbox_id && config.metadata.as_ref() == Some(m)).then_some(config)
    }

    /// Drops the records of sandboxes not in `live` (the runtime's list),
    /// and of their containers, and leftover temporary files. Returns how
    /// many were dropped. Blocking.
    pub fn sweep(&self, live: &[PodSandbox]) -> std::io::Result<usize> {
        let dir = match TrustedDir::open(&self.inner.dir) {
            Ok(d) => d,
            Err(_) if !self.inner.dir.exists() => return Ok(0),
            Err(e) => return Err(std::io::Error::other(e)),
        };
        let live_sandboxes: std::collections::HashSet<String> = live
            .iter()
            .filter_map(|p| p.metadata.as_ref().and_then(sandbox_name))
            .collect();
        let live_ids: Vec<String> = live.iter().map(|p| format!("{}-", p.id)).collect();
        let mut dropped = 0;
        for entry in std::fs::read_dir(dir.path())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = if let Some(rest) = name.strip_prefix(CONTAINER_PREFIX) {
                live_ids.iter().any(|id| rest.starts_with(id.as_str()))
            } else if name.starts_with(SANDBOX_PREFIX) {
                live_sandboxes.contains(&name)
            } else {
                false
            };
            if !keep && std::fs::remove_file(entry.path()).is_ok() {
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn store(max: usize) -> (tempfile::TempDir, SeenConfigs) {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let s = SeenConfigs::new(t.path(), max);
        (t, s)
    }

    fn pod_meta(uid: &str) -> PodSandboxMetadata {
        PodSandboxMetadata {
            name: "web".into(),
            namespace: "default".into(),
            uid: uid.into(),
            attempt: 0,
        }
    }

    fn run_req(uid: &str, hostname: &str) -> Vec<u8> {
        RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: Some(pod_meta(uid)),
                hostname: hostname.into(),
                ..Default::default()
            }),
            runtime_handler: "runc".into(),
        }
        .encode_to_vec()
    }

    fn create_req(sandbox: &str, name: &str) -> Vec<u8> {
        CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                working_dir: "/srv".into(),
                ..Default::default()
            }),
            sandbox_config: None,
        }
        .encode_to_vec()
    }

    fn live(id: &str, uid: &str) -> PodSandbox {
        PodSandbox {
            id: id.into(),
            metadata: Some(pod_meta(uid)),
            ..Default::default()
        }
    }

    #[test]
    fn a_noted_config_is_found_by_the_identity_the_runtime_reports() {
        let (_t, s) = store(16);
        s.note_run_pod_sandbox(&run_req("u-1", "web-0"));
        s.note_create_container(&create_req("abc123", "app"));
        let cfg = s.sandbox(&pod_meta("u-1")).expect("sandbox record");
        assert_eq!(cfg.hostname, "web-0");
        let c = s
            .container(
                "abc123",
                &ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                },
            )
            .expect("container record");
        assert_eq!(c.working_dir, "/srv");
        // Another attempt, another pod with the uid, another sandbox: none.
        let mut other = pod_meta("u-1");
        other.attempt = 1;
        assert!(s.sandbox(&other).is_none());
        other.attempt = 0;
        other.name = "db".into();
        assert!(s.sandbox(&other).is_none(), "the identity is checked whole");
        assert!(s
            .container(
                "abc124",
                &ContainerMetadata {
                    name: "app".into(),
                    attempt: 0
                }
            )
            .is_none());
    }

    #[test]
    fn records_are_private_and_bounded() {
        let (t, s) = store(2);
        s.note_run_pod_sandbox(&run_req("a", "x"));
        s.note_run_pod_sandbox(&run_req("b", "x"));
        s.note_run_pod_sandbox(&run_req("c", "x"));
        assert!(s.sandbox(&pod_meta("a")).is_some());
        assert!(s.sandbox(&pod_meta("b")).is_some());
        assert!(s.sandbox(&pod_meta("c")).is_none(), "over the limit");
        // Rewriting an existing record is not a new one.
        s.note_run_pod_sandbox(&run_req("a", "y"));
        assert_eq!(s.sandbox(&pod_meta("a")).unwrap().hostname, "y");
        let dir = t.path().join(SEEN_DIR);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for e in std::fs::read_dir(&dir).unwrap() {
            let m = e.unwrap().metadata().unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
        // Off: nothing written, nothing found.
        let (t0, off) = store(0);
        off.note_run_pod_sandbox(&run_req("a", "x"));
        assert!(!t0.path().join(SEEN_DIR).exists());
    }

    #[test]
    fn garbage_input_and_planted_links_are_ignored() {
        let (t, s) = store(16);
        s.note_run_pod_sandbox(b"\xff\xff not protobuf");
        s.note_create_container(&create_req("../../etc", "app"));
        s.note_create_container(&create_req("abc", ""));
        assert!(
            !t.path().join(SEEN_DIR).exists() || {
                std::fs::read_dir(t.path().join(SEEN_DIR)).unwrap().count() == 0
            }
        );
        // A link where a record would be is not followed.
        s.note_run_pod_sandbox(&run_req("z", "x"));
        let dir = t.path().join(SEEN_DIR);
        let name = sandbox_name(&pod_meta("l")).unwrap();
        std::os::unix::fs::symlink(
            dir.join(sandbox_name(&pod_meta("z")).unwrap()),
            dir.join(&name),
        )
        .unwrap();
        assert!(s.sandbox(&pod_meta("l")).is_none());
    }

    #[test]
    fn sweep_drops_what_the_runtime_no_longer_lists() {
        let (_t, s) = store(16);
        s.note_run_pod_sandbox(&run_req("keep", "x"));
        s.note_run_pod_sandbox(&run_req("gone", "x"));
        s.note_create_container(&create_req("aaa", "app"));
        s.note_create_container(&create_req("bbb", "app"));
        let dropped = s.sweep(&[live("aaa", "keep")]).unwrap();
        assert_eq!(dropped, 2);
        assert!(s.sandbox(&pod_meta("keep")).is_some());
        assert!(s.sandbox(&pod_meta("gone")).is_none());
        let app = ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        };
        assert!(s.container("aaa", &app).is_some());
        assert!(s.container("bbb", &app).is_none());
    }
}
