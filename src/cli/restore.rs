//! `podckpt restore-pod`: the new pod's CRI configuration, derived from a
//! pod archive's manifest, and waiting for restored containers to run.
//!
//! The restored pod is a new pod beside the old one (which may still be
//! running): it gets a new name, a new uid and its own log directory, so
//! nothing the kubelet or the runtime keys by those collides.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::archive::manifest::PodManifest;
use crate::cri::api::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest, PodSandboxConfig,
    PodSandboxMetadata, StartContainerRequest,
};
use crate::cri::client::CriClient;

/// Where the kubelet keeps pod logs, used when the manifest recorded no
/// log directory to take the parent from.
pub const DEFAULT_POD_LOG_ROOT: &str = "/var/log/pods";

/// Pod labels the kubelet sets (on the sandbox and on every container)
/// and reads back to map runtime objects to pods.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
/// See [`LABEL_POD_NAME`].
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// See [`LABEL_POD_NAME`].
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";

/// Why no restore configuration could be derived.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The manifest has neither the sandbox's config nor its status.
    #[error("the archive records no configuration of the checkpointed sandbox")]
    NoSandboxConfig,
    /// A container without a config cannot be created again.
    #[error("the archive records no configuration for container {0:?}")]
    NoContainerConfig(String),
    /// A name, namespace or uid Kubernetes (or the log directory scheme)
    /// would not accept.
    #[error("{what} {value:?}: {reason}")]
    Invalid {
        /// Which value.
        what: &'static str,
        /// The value.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A container log path that would leave the pod's log directory.
    #[error("container {container:?}: log path {path:?} leaves the pod log directory")]
    LogPath {
        /// The container.
        container: String,
        /// Its log path.
        path: String,
    },
}

/// What the operator asked for; None keeps the default.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// New pod name (default `<old>-restored-<suffix>`).
    pub name: Option<String>,
    /// Namespace (default: the old one).
    pub namespace: Option<String>,
    /// Uid (default: a fresh random one).
    pub uid: Option<String>,
}

/// The random parts of a new identity, passed in so derivation is pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fresh {
    /// Name suffix (5 hex digits).
    pub suffix: String,
    /// A UUID v4.
    pub uid: String,
}

impl Fresh {
    /// New random values from the kernel's generator.
    pub fn random() -> std::io::Result<Self> {
        let mut b = [0u8; 19];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(Self::from_bytes(b))
    }

    /// The values made from these bytes: 16 for the uid, 3 for the suffix.
    pub fn from_bytes(mut b: [u8; 19]) -> Self {
        // RFC 4122 version 4, variant 1: the uid looks like the kubelet's.
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let uid = format!(
            "{}-{}-{}-{}-{}",
            hex(&b[0..4]),
            hex(&b[4..6]),
            hex(&b[6..8]),
            hex(&b[8..10]),
            hex(&b[10..16])
        );
        let mut suffix = hex(&b[16..19]);
        suffix.truncate(5);
        Self { suffix, uid }
    }
}

/// Everything RestorePod needs, plus the directories to create first.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The new sandbox's config.
    pub sandbox: PodSandboxConfig,
    /// One config per container, in the manifest's order.
    pub containers: Vec<ContainerConfig>,
    /// Runtime handler of the checkpointed sandbox ("" = default).
    pub runtime_handler: String,
    /// The pod log directory and each container's log subdirectory, which
    /// the kubelet creates before CreateContainer and so must we.
    pub log_dirs: Vec<PathBuf>,
}

/// Longest pod name (a DNS-1123 subdomain).
const MAX_NAME: usize = 253;

fn check_name(what: &'static str, v: &str, max: usize, dots: bool) -> Result<(), PlanError> {
    let bad = |reason| {
        Err(PlanError::Invalid {
            what,
            value: v.to_string(),
            reason,
        })
    };
    if v.is_empty() || v.len() > max {
        return bad(if dots {
            "must be 1 to 253 characters"
        } else {
            "must be 1 to 63 characters"
        });
    }
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    // '_' in particular is refused: it separates the parts of the log
    // directory name `<namespace>_<name>_<uid>`.
    if !v.chars().all(ok_char) || !edge(v.chars().next()) || !edge(v.chars().last()) {
        return bad(if dots {
            "must be lowercase letters, digits, '-' and '.', starting and ending alphanumeric"
        } else {
            "must be lowercase letters, digits and '-', starting and ending alphanumeric"
        });
    }
    Ok(())
}

fn check_uid(v: &str) -> Result<(), PlanError> {
    if v.is_empty() || v.len() > 128 || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(PlanError::Invalid {
            what: "uid",
            value: v.to_string(),
            reason: "must be 1 to 128 letters, digits or '-'",
        });
    }
    Ok(())
}

/// The default new name: `<old>-restored-<suffix>`, the old part shortened
/// if the whole would be too long.
fn default_name(old: &str, suffix: &str) -> String {
    let tail = format!("-restored-{suffix}");
    let keep = MAX_NAME.saturating_sub(tail.len()).min(old.len());
    let mut head = old[..old.floor_char_boundary_compat(keep)].to_string();
    while head.ends_with(['-', '.']) {
        head.pop();
    }
    format!("{head}{tail}")
}

/// `str::floor_char_boundary` is unstable; names are ASCII once checked,
/// but the old name is not checked before shortening.
trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Rewrites the kubelet's pod labels, where present, to the new identity.
fn relabel(labels: &mut HashMap<String, String>, name: &str, namespace: &str, uid: &str) {
    for (key, value) in [
        (LABEL_POD_NAME, name),
        (LABEL_POD_NAMESPACE, namespace),
        (LABEL_POD_UID, uid),
    ] {
        if let Some(v) = labels.get_mut(key) {
            *v = value.to_string();
        }
    }
}

/// A container log path relative to the pod log directory: relative ones
/// are kept; an absolute one under the old directory is made relative to
/// it; any other becomes the kubelet's `<name>/0.log`.
fn relative_log_path(container: &str, path: &str, old_dir: &str) -> Result<String, PlanError> {
    if path.is_empty() {
        return Ok(String::new());
    }
    let p = Path::new(path);
    let rel = if p.is_absolute() {
        match (!old_dir.is_empty())
            .then(|| p.strip_prefix(old_dir).ok())
            .flatten()
        {
            Some(r) if !r.as_os_str().is_empty() => r.to_path_buf(),
            _ => PathBuf::from(format!("{container}/0.log")),
        }
    } else {
        p.to_path_buf()
    };
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(PlanError::LogPath {
            container: container.into(),
            path: path.into(),
        });
    }
    Ok(rel.display().to_string())
}

/// Derives the restored pod's configuration from the checkpointed one.
pub fn plan(manifest: &PodManifest, ov: &Overrides, fresh: &Fresh) -> Result<Plan, PlanError> {
    let status = manifest.sandbox.status.as_ref();
    // Prefer the recorded config; a runtime that keeps none still reports
    // metadata, labels and annotations in the status.
    let mut sandbox = match (&manifest.sandbox.config, status) {
        (Some(c), _) => c.clone(),
        (None, Some(s)) if s.metadata.is_some() => PodSandboxConfig {
            metadata: s.metadata.clone(),
            labels: s.labels.clone(),
            annotations: s.annotations.clone(),
            ..Default::default()
        },
        _ => return Err(PlanError::NoSandboxConfig),
    };
    let old = sandbox
        .metadata
        .clone()
        .or_else(|| status.and_then(|s| s.metadata.clone()))
        .ok_or(PlanError::NoSandboxConfig)?;

    let name = match &ov.name {
        Some(n) => n.clone(),
        None => default_name(&old.name, &fresh.suffix),
    };
    let namespace = ov
        .namespace
        .clone()
        .unwrap_or_else(|| old.namespace.clone());
    let uid = ov.uid.clone().unwrap_or_else(|| fresh.uid.clone());
    check_name("pod name", &name, MAX_NAME, true)?;
    check_name("namespace", &namespace, 63, false)?;
    check_uid(&uid)?;

    sandbox.metadata = Some(PodSandboxMetadata {
        name: name.clone(),
        namespace: namespace.clone(),
        uid: uid.clone(),
        attempt: 0,
    });
    relabel(&mut sandbox.labels, &name, &namespace, &uid);

    // The kubelet names the pod's cgroup after its uid
    // (`kubepods-besteffort-pod<uid with _>.slice` or `.../pod<uid>`);
    // keeping the old uid there would put the new pod in the old pod's
    // cgroup.
    if let Some(linux) = sandbox.linux.as_mut() {
        if !old.uid.is_empty() {
            linux.cgroup_parent = linux
                .cgroup_parent
                .replace(&old.uid, &uid)
                .replace(&old.uid.replace('-', "_"), &uid.replace('-', "_"));
        }
    }

    // Same scheme as the kubelet: `<root>/<namespace>_<name>_<uid>`, the
    // root being wherever the old pod's directory was.
    let old_log_dir = sandbox.log_directory.clone();
    let root = Path::new(&old_log_dir)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new(DEFAULT_POD_LOG_ROOT));
    let log_dir = root.join(format!("{namespace}_{name}_{uid}"));
    sandbox.log_directory = log_dir.display().to_string();
    let mut log_dirs = vec![log_dir.clone()];

    let mut containers = Vec::with_capacity(manifest.containers.len());
    for c in &manifest.containers {
        let mut cfg = c
            .config
            .clone()
            .ok_or_else(|| PlanError::NoContainerConfig(c.name.clone()))?;
        // RestorePod matches configs to checkpointed containers by name.
        cfg.metadata = Some(ContainerMetadata {
            name: c.name.clone(),
            attempt: 0,
        });
        cfg.log_path = relative_log_path(&c.name, &cfg.log_path, &old_log_dir)?;
        if let Some(parent) = Path::new(&cfg.log_path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            let dir = log_dir.join(parent);
            if !log_dirs.contains(&dir) {
                log_dirs.push(dir);
            }
        }
        relabel(&mut cfg.labels, &name, &namespace, &uid);
        containers.push(cfg);
    }
    Ok(Plan {
        sandbox,
        containers,
        runtime_handler: status
            .map(|s| s.runtime_handler.clone())
            .unwrap_or_default(),
        log_dirs,
    })
}

/// The log directories [`plan`] asked for, created: those that did not
/// exist before are removed again when this is dropped unless [`keep`]
/// was called, so a failed restore leaves no empty pod log directory for
/// the kubelet's log garbage collection to puzzle over.
///
/// [`keep`]: LogDirs::keep
#[derive(Debug)]
pub struct LogDirs {
    created: Vec<PathBuf>,
}

impl LogDirs {
    /// Creates `dirs` (and missing parents), in order.
    pub fn create(dirs: &[PathBuf]) -> Result<Self, LogDirError> {
        let mut guard = Self {
            created: Vec::new(),
        };
        for dir in dirs {
            // Walk up to the first existing ancestor, so exactly what we
            // create is what we remove.
            let mut missing = Vec::new();
            let mut at = dir.as_path();
            while !at.exists() {
                missing.push(at.to_path_buf());
                match at.parent() {
                    Some(p) => at = p,
                    None => break,
                }
            }
            for d in missing.into_iter().rev() {
                match std::fs::create_dir(&d) {
                    Ok(()) => guard.created.push(d),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(LogDirError { path: d, source }),
                }
            }
        }
        Ok(guard)
    }

    /// Keeps the directories: the pod exists now and logs into them.
    pub fn keep(mut self) {
        self.created.clear();
    }
}

impl Drop for LogDirs {
    fn drop(&mut self) {
        // Deepest first; remove_dir leaves a directory something wrote to.
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A log directory could not be created.
#[derive(Debug, thiserror::Error)]
#[error("creating log directory {path}: {source}")]
pub struct LogDirError {
    /// The directory.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// The `checkpoint_path` RestorePod takes: the directory CheckpointPod
/// wrote, even when the operator named the archive inside it.
pub fn checkpoint_path(path: &Path) -> PathBuf {
    if path.is_file() {
        if let Some(dir) = path.parent() {
            if crate::archive::reader::locate_pod_archive(dir).as_deref() == Some(path) {
                return dir.to_path_buf();
            }
        }
    }
    path.to_path_buf()
}

/// Why a started container did not reach RUNNING.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The runtime answered with an error.
    #[error("ContainerStatus of {id}: {status}")]
    Status {
        /// The container.
        id: String,
        /// The error.
        status: Box<tonic::Status>,
    },
    /// It exited (or its state is unknown) instead.
    #[error("container {id} is {state} instead of RUNNING{reason}")]
    NotRunning {
        /// The container.
        id: String,
        /// Its state.
        state: &'static str,
        /// The runtime's reason and message, if any.
        reason: String,
    },
    /// Still not RUNNING when the time was up.
    #[error("container {id} not RUNNING after {waited:?} (still {state})")]
    Timeout {
        /// The container.
        id: String,
        /// How long we waited.
        waited: Duration,
        /// Its last state.
        state: &'static str,
    },
}

/// A container state's name as crictl prints it.
pub fn container_state_name(state: i32) -> &'static str {
    match ContainerState::try_from(state) {
        Ok(ContainerState::ContainerCreated) => "CREATED",
        Ok(ContainerState::ContainerRunning) => "RUNNING",
        Ok(ContainerState::ContainerExited) => "EXITED",
        Ok(ContainerState::ContainerUnknown) | Err(_) => "UNKNOWN",
    }
}

/// Starts container `id` and polls ContainerStatus until it is RUNNING,
/// for at most `limit`. Fails early if it exits: a restore that crashes
/// right away should not look like a slow one.
pub async fn start_and_wait(
    client: &mut CriClient,
    id: &str,
    limit: Duration,
) -> Result<(), StartError> {
    let mut req = tonic::Request::new(StartContainerRequest {
        container_id: id.to_string(),
    });
    req.set_timeout(limit);
    client
        .runtime
        .start_container(req)
        .await
        .map_err(|s| StartError::Start {
            id: id.to_string(),
            status: Box::new(s),
        })?;
    wait_running(client, id, limit)
        .await
        .map_err(StartError::Wait)
}

/// Why a container could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// StartContainer failed.
    #[error("StartContainer of {id}: {status}")]
    Start {
        /// The container.
        id: String,
        /// The error.
        status: Box<tonic::Status>,
    },
    /// It was started but did not reach RUNNING.
    #[error(transparent)]
    Wait(WaitError),
}

/// Polls ContainerStatus until `id` is RUNNING, for at most `limit`.
pub async fn wait_running(
    client: &mut CriClient,
    id: &str,
    limit: Duration,
) -> Result<(), WaitError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let remaining = limit.saturating_sub(started.elapsed());
        let mut req = tonic::Request::new(ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        });
        req.set_timeout(remaining.max(Duration::from_millis(100)));
        let status = client
            .runtime
            .container_status(req)
            .await
            .map_err(|s| WaitError::Status {
                id: id.to_string(),
                status: Box::new(s),
            })?
            .into_inner()
            .status
            .unwrap_or_default();
        match ContainerState::try_from(status.state) {
            Ok(ContainerState::ContainerRunning) => return Ok(()),
            Ok(ContainerState::ContainerCreated) => {}
            _ => {
                let reason = [status.reason, status.message]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(": ");
                return Err(WaitError::NotRunning {
                    id: id.to_string(),
                    state: container_state_name(status.state),
                    reason: if reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({reason})")
                    },
                });
            }
        }
        if started.elapsed() >= limit {
            return Err(WaitError::Timeout {
                id: id.to_string(),
                waited: started.elapsed(),
                state: container_state_name(status.state),
            });
        }
        tokio::time::sleep(pause.min(remaining)).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::manifest::{ContainerEntry, SandboxEntry};
    use crate::cri::api::{LinuxPodSandboxConfig, PodSandboxStatus};

    fn manifest() -> PodManifest {
        let labels = HashMap::from([
            (LABEL_POD_NAME.to_string(), "web".to_string()),
            (LABEL_POD_NAMESPACE.to_string(), "shop".to_string()),
            (LABEL_POD_UID.to_string(), "1111-2222".to_string()),
            ("app".to_string(), "web".to_string()),
        ]);
        let sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web".into(),
                namespace: "shop".into(),
                uid: "1111-2222".into(),
                attempt: 3,
            }),
            hostname: "web".into(),
            log_directory: "/var/log/pods/shop_web_1111-2222".into(),
            labels: labels.clone(),
            annotations: HashMap::from([("note".to_string(), "kept".to_string())]),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: "kubepods-besteffort-pod1111_2222.slice".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let container = |name: &str, log_path: &str| ContainerEntry {
            name: name.into(),
            id: format!("{name}-id"),
            dir: format!("containers/{name}"),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 2,
                }),
                log_path: log_path.into(),
                labels: labels.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        PodManifest {
            format: crate::archive::manifest::POD_FORMAT.into(),
            version: 1,
            podckpt_version: "0.1.0".into(),
            created_unix_ms: 0,
            host: Default::default(),
            sandbox: SandboxEntry {
                id: "old-sandbox".into(),
                config: Some(sandbox),
                status: Some(PodSandboxStatus {
                    runtime_handler: "runc".into(),
                    ..Default::default()
                }),
            },
            options: Default::default(),
            containers: vec![
                container("app", "app/2.log"),
                container("side", "/var/log/pods/shop_web_1111-2222/side/0.log"),
                container("other", "/elsewhere/x.log"),
            ],
            devshm: false,
            timings: Default::default(),
            files: vec![],
        }
    }

    fn fresh() -> Fresh {
        Fresh {
            suffix: "a1b2c".into(),
            uid: "9999-8888".into(),
        }
    }

    #[test]
    fn defaults_give_a_new_identity_beside_the_old_pod() {
        let p = plan(&manifest(), &Overrides::default(), &fresh()).unwrap();
        let meta = p.sandbox.metadata.as_ref().unwrap();
        assert_eq!(meta.name, "web-restored-a1b2c");
        assert_eq!(meta.namespace, "shop");
        assert_eq!(meta.uid, "9999-8888");
        assert_eq!(meta.attempt, 0);
        assert_eq!(
            p.sandbox.log_directory,
            "/var/log/pods/shop_web-restored-a1b2c_9999-8888"
        );
        assert_eq!(p.sandbox.labels[LABEL_POD_NAME], "web-restored-a1b2c");
        assert_eq!(p.sandbox.labels[LABEL_POD_UID], "9999-8888");
        assert_eq!(p.sandbox.labels["app"], "web");
        assert_eq!(p.sandbox.annotations["note"], "kept");
        assert_eq!(p.sandbox.hostname, "web");
        assert_eq!(
            p.sandbox.linux.as_ref().unwrap().cgroup_parent,
            "kubepods-besteffort-pod9999_8888.slice"
        );
        assert_eq!(p.runtime_handler, "runc");
    }

    #[test]
    fn containers_keep_order_and_relative_log_paths() {
        let p = plan(&manifest(), &Overrides::default(), &fresh()).unwrap();
        let names: Vec<_> = p
            .containers
            .iter()
            .map(|c| c.metadata.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["app", "side", "other"]);
        assert!(p
            .containers
            .iter()
            .all(|c| c.metadata.as_ref().unwrap().attempt == 0));
        let logs: Vec<_> = p.containers.iter().map(|c| c.log_path.as_str()).collect();
        assert_eq!(logs, ["app/2.log", "side/0.log", "other/0.log"]);
        assert_eq!(p.containers[0].labels[LABEL_POD_NAMESPACE], "shop");
        assert_eq!(p.containers[0].labels[LABEL_POD_UID], "9999-8888");
        let dir = PathBuf::from("/var/log/pods/shop_web-restored-a1b2c_9999-8888");
        assert_eq!(
            p.log_dirs,
            [
                dir.clone(),
                dir.join("app"),
                dir.join("side"),
                dir.join("other")
            ]
        );
    }

    #[test]
    fn overrides_are_used_and_checked() {
        let ov = Overrides {
            name: Some("web-2".into()),
            namespace: Some("staging".into()),
            uid: Some("abc-123".into()),
        };
        let p = plan(&manifest(), &ov, &fresh()).unwrap();
        assert_eq!(
            p.sandbox.log_directory,
            "/var/log/pods/staging_web-2_abc-123"
        );
        assert_eq!(p.sandbox.labels[LABEL_POD_NAMESPACE], "staging");

        for (ov, what) in [
            (
                Overrides {
                    name: Some("Web_2".into()),
                    ..Default::default()
                },
                "pod name",
            ),
            (
                Overrides {
                    namespace: Some("a.b".into()),
                    ..Default::default()
                },
                "namespace",
            ),
            (
                Overrides {
                    uid: Some("x/../y".into()),
                    ..Default::default()
                },
                "uid",
            ),
        ] {
            match plan(&manifest(), &ov, &fresh()) {
                Err(PlanError::Invalid { what: w, .. }) => assert_eq!(w, what),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_configs_and_escaping_log_paths_are_refused() {
        let mut m = manifest();
        m.containers[1].config = None;
        assert_eq!(
            plan(&m, &Overrides::default(), &fresh()),
            Err(PlanError::NoContainerConfig("side".into()))
        );
        let mut m = manifest();
        m.containers[0].config.as_mut().unwrap().log_path = "../../etc/x.log".into();
        assert!(matches!(
            plan(&m, &Overrides::default(), &fresh()),
            Err(PlanError::LogPath { .. })
        ));
        let mut m = manifest();
        m.sandbox.config = None;
        m.sandbox.status = None;
        assert_eq!(
            plan(&m, &Overrides::default(), &fresh()),
            Err(PlanError::NoSandboxConfig)
        );
    }

    #[test]
    fn status_stands_in_for_a_missing_config() {
        let mut m = manifest();
        let cfg = m.sandbox.config.take().unwrap();
        m.sandbox.status = Some(PodSandboxStatus {
            metadata: cfg.metadata,
            labels: cfg.labels,
            ..Default::default()
        });
        let p = plan(&m, &Overrides::default(), &fresh()).unwrap();
        // No recorded log directory: the kubelet's root.
        assert_eq!(
            p.sandbox.log_directory,
            "/var/log/pods/shop_web-restored-a1b2c_9999-8888"
        );
        assert_eq!(p.sandbox.labels[LABEL_POD_NAME], "web-restored-a1b2c");
    }

    #[test]
    fn log_dirs_are_undone_unless_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let pod = tmp.path().join("pods/ns_web_1");
        let dirs = [pod.clone(), pod.join("app"), pod.join("side")];
        drop(LogDirs::create(&dirs).unwrap());
        // Only what was created goes; the tempdir itself stays.
        assert!(!tmp.path().join("pods").exists());
        assert!(tmp.path().exists());

        LogDirs::create(&dirs).unwrap().keep();
        assert!(dirs.iter().all(|d| d.is_dir()));
        // Existing directories are fine, and not removed on drop.
        drop(LogDirs::create(&dirs).unwrap());
        assert!(dirs.iter().all(|d| d.is_dir()));
    }

    #[test]
    fn long_names_are_shortened_and_fresh_values_look_right() {
        let mut m = manifest();
        m.sandbox
            .config
            .as_mut()
            .unwrap()
            .metadata
            .as_mut()
            .unwrap()
            .name = "a".repeat(253);
        let p = plan(&m, &Overrides::default(), &fresh()).unwrap();
        let name = &p.sandbox.metadata.as_ref().unwrap().name;
        assert_eq!(name.len(), 253);
        assert!(name.ends_with("-restored-a1b2c"));

        let f = Fresh::from_bytes([0xff; 19]);
        assert_eq!(f.uid, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(f.suffix, "fffff");
        let r = Fresh::random().unwrap();
        assert_eq!(r.uid.len(), 36);
        assert_ne!(r, Fresh::random().unwrap());
    }
}
