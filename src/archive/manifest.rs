//! `manifest.json`, the first entry of a podckpt pod archive: what the
//! archive holds, how it was made, and every file with its size (restore
//! refuses entries the manifest does not declare or that are larger).

use serde::{Deserialize, Serialize};

use crate::cri::api::{ContainerConfig, PodSandboxConfig, PodSandboxStatus};
use crate::pod::options::CheckpointOptions;

/// The `format` value of a pod archive manifest.
pub const POD_FORMAT: &str = "podckpt.dev/pod-checkpoint";
/// The manifest version this podckpt writes and reads.
pub const POD_FORMAT_VERSION: u32 = 1;
/// The manifest's name inside the archive.
pub const MANIFEST: &str = "manifest.json";
/// The pod archive's file name under CheckpointPod's output_path.
pub const POD_ARCHIVE_ZSTD: &str = "pod.tar.zst";
/// The same, uncompressed (option `compression=off`).
pub const POD_ARCHIVE_PLAIN: &str = "pod.tar";
/// Where the sandbox's /dev/shm content sits in a pod archive.
pub const DEVSHM_DIR: &str = "pod/devshm";

/// The whole manifest.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PodManifest {
    /// Always [`POD_FORMAT`].
    pub format: String,
    /// [`POD_FORMAT_VERSION`].
    pub version: u32,
    /// podckpt's version.
    pub podckpt_version: String,
    /// When the cut was taken, ms since the epoch.
    pub created_unix_ms: u64,
    /// The node.
    pub host: HostInfo,
    /// The checkpointed sandbox.
    pub sandbox: SandboxEntry,
    /// Options used.
    pub options: CheckpointOptions,
    /// The containers, in the order they were selected.
    pub containers: Vec<ContainerEntry>,
    /// Whether `pod/devshm/` holds the sandbox's /dev/shm.
    pub devshm: bool,
    /// Durations of the checkpoint's steps.
    pub timings: Timings,
    /// Every file in the archive after the manifest, with its size.
    pub files: Vec<FileEntry>,
}

/// The node the checkpoint was taken on.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    /// Hostname.
    pub hostname: String,
    /// `uname -r`.
    pub kernel: String,
    /// CRIU's version.
    pub criu_version: String,
    /// Runtime name (from CRI Version).
    pub runtime_name: String,
    /// Runtime version.
    pub runtime_version: String,
    /// cgroup v1 or v2.
    pub cgroup: String,
}

/// The sandbox.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SandboxEntry {
    /// Its id at checkpoint time.
    pub id: String,
    /// Its configuration, as the runtime recorded it (if it did).
    pub config: Option<PodSandboxConfig>,
    /// Its CRI status.
    pub status: Option<PodSandboxStatus>,
}

/// One container.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ContainerEntry {
    /// metadata.name: unique in the pod, the key RestorePod matches.
    pub name: String,
    /// Its id at checkpoint time.
    pub id: String,
    /// Its directory in the archive (`containers/<name>`), in the container
    /// checkpoint layout checkpointctl reads.
    pub dir: String,
    /// Image as the pod spec named it.
    pub image: String,
    /// Image reference (digest) the runtime resolved.
    pub image_ref: String,
    /// The container's CRI config, as the runtime recorded it or as
    /// reconstructed from its status and spec: a template for restore.
    pub config: Option<ContainerConfig>,
    /// Where `config` came from: only a config the runtime or the caller
    /// gave is compared with a restore request field by field.
    #[serde(default)]
    pub config_source: ConfigSource,
    /// Init pid at checkpoint time.
    pub pid: i32,
    /// When its cgroup reached frozen, ns since the epoch.
    pub frozen_at_ns: u64,
    /// When CRIU started dumping it.
    pub dump_started_ns: u64,
    /// When CRIU finished.
    pub dump_finished_ns: u64,
    /// When it was thawed.
    pub thawed_at_ns: u64,
    /// Bytes of CRIU images.
    pub images_bytes: u64,
    /// Bytes of rootfs diff tar.
    pub rootfs_diff_bytes: u64,
    /// Paths deleted from the image's rootfs.
    pub deleted_files: usize,
}

/// The origin of a container's recorded config.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConfigSource {
    /// The runtime's verbose status (containerd). Also what archives
    /// written before this field are taken to hold.
    #[default]
    Runtime,
    /// The CreateContainer request seen on its way (`crate::pod::seen`).
    Seen,
    /// Pieced together from the container's status and OCI spec: its
    /// command, env and working dir include what the image and the runtime
    /// added, so they cannot be compared with a request.
    Reconstructed,
}

/// Durations, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// Validation and inspection before the freeze.
    pub prepare_ms: u64,
    /// Freezing every container.
    pub freeze_ms: u64,
    /// From the first freeze to the last thaw: the longest any container
    /// of the pod was frozen.
    pub frozen_window_ms: u64,
    /// CRIU dumps (in parallel) plus the rootfs and /dev/shm capture.
    pub capture_ms: u64,
    /// Warming the staging memory, just before the freeze (0 when off).
    #[serde(default)]
    pub warm_ms: u64,
}

/// A file in the archive.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Path inside the archive.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

impl PodManifest {
    /// Total bytes of file content the archive declares.
    pub fn content_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}
