//! What a checkpoint archive holds, read offline in one pass over the tar
//! stream (nothing is extracted): a podckpt pod archive (`pod.tar.zst`,
//! manifest first) or a single-container checkpoint archive in the layout
//! checkpointctl, CRI-O and containerd share (`checkpoint/`, `config.dump`,
//! `spec.dump`, ...).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::manifest::{HostInfo, PodManifest, Timings, MANIFEST};
use super::reader::{locate_pod_archive, open_tar, parse_manifest, ReadError, MAX_MANIFEST_BYTES};
use crate::criu::image::{self, CoreEntry, PstreeEntry};
use crate::pod::options::CheckpointOptions;

/// Metadata files (config.dump, spec.dump, deleted.files, pstree.img) larger
/// than this are not parsed: real ones are kilobytes, and inspect must not
/// load a hostile archive into memory.
pub const MAX_METADATA_BYTES: u64 = 16 * 1024 * 1024;
/// `core-*.img` larger than this are skipped (real ones are a few KB); the
/// tree is then shown without that process's command.
pub const MAX_CORE_BYTES: u64 = 1024 * 1024;

/// Why an archive could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A directory without `pod.tar.zst`/`pod.tar`, or no such path.
    #[error(
        "{0}: no checkpoint archive there (expected a file, or a directory holding pod.tar.zst)"
    )]
    NotFound(PathBuf),
    /// Reading the archive failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A readable tar that is neither layout.
    #[error("{path}: not a checkpoint archive: {reason}")]
    NotACheckpoint {
        /// The archive.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
}

/// An inspected archive.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Inspection {
    /// A podckpt pod archive.
    Pod(PodArchive),
    /// A single-container checkpoint archive.
    Container(ContainerArchive),
}

/// A pod archive: its manifest's facts plus what only the CRIU images say.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PodArchive {
    /// The archive file.
    pub archive: PathBuf,
    /// Its size on disk.
    pub archive_bytes: u64,
    /// Manifest format.
    pub format: String,
    /// Manifest version.
    pub version: u32,
    /// podckpt version that wrote it.
    pub podckpt_version: String,
    /// When the cut was taken, ms since the epoch.
    pub created_unix_ms: u64,
    /// The node it was taken on.
    pub host: HostInfo,
    /// The pod.
    pub pod: PodIdentity,
    /// Checkpoint options used.
    pub options: CheckpointOptions,
    /// Step durations.
    pub timings: Timings,
    /// Whether /dev/shm was captured.
    pub devshm: bool,
    /// The containers, in manifest order.
    pub containers: Vec<ContainerInfo>,
}

/// Who the checkpointed pod was.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PodIdentity {
    /// metadata.name.
    pub name: String,
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.uid.
    pub uid: String,
    /// Sandbox id at checkpoint time.
    pub sandbox_id: String,
    /// Runtime handler ("" = default).
    pub runtime_handler: String,
}

/// A container archive.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ContainerArchive {
    /// The archive file.
    pub archive: PathBuf,
    /// Its size on disk.
    pub archive_bytes: u64,
    /// config.dump's `checkpointedTime`.
    pub checkpointed: Option<String>,
    /// config.dump's `runtime` (the OCI runtime).
    pub runtime: Option<String>,
    /// CRIU version, when the writer recorded it.
    pub criu_version: Option<String>,
    /// Pod name, namespace and sandbox id from spec.dump's annotations.
    pub pod: PodIdentity,
    /// The container.
    pub container: ContainerInfo,
}

/// One container of an archive.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ContainerInfo {
    /// Name.
    pub name: String,
    /// Id at checkpoint time.
    pub id: String,
    /// Image as named.
    pub image: String,
    /// Image reference (digest).
    pub image_ref: String,
    /// Bytes of CRIU images (memory and process state).
    pub images_bytes: u64,
    /// Bytes of the rootfs diff tar (0 if none).
    pub rootfs_diff_bytes: u64,
    /// Paths deleted from the image's rootfs.
    pub deleted_files: usize,
    /// The process's argv from spec.dump.
    pub command: Vec<String>,
    /// The dumped process tree, from `checkpoint/pstree.img`.
    pub processes: Vec<Process>,
    /// Why the tree is missing or incomplete, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes_error: Option<String>,
}

/// One dumped process.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Process {
    /// Pid (in the container's pid namespace).
    pub pid: u32,
    /// Parent pid (0 for the root).
    pub ppid: u32,
    /// Process group.
    pub pgid: u32,
    /// Session.
    pub sid: u32,
    /// Threads (the main one included).
    pub threads: usize,
    /// Command name from `core-<pid>.img`, if it could be read.
    pub comm: Option<String>,
}

/// What the stream says about one container directory.
#[derive(Default)]
struct Acc {
    config_dump: Option<serde_json::Value>,
    spec: Option<serde_json::Value>,
    deleted: Option<usize>,
    rootfs_diff: Option<u64>,
    images_bytes: u64,
    checkpoint_dir: bool,
    pstree: Option<Result<Vec<PstreeEntry>, String>>,
    comms: HashMap<u32, String>,
}

impl Acc {
    /// Takes in one entry at `rel` (relative to the container directory).
    fn feed(&mut self, rel: &str, entry: &mut impl Read, size: u64, is_dir: bool) {
        let read = |entry: &mut dyn Read, limit: u64| -> Option<Vec<u8>> {
            if size > limit {
                return None;
            }
            let mut buf = Vec::with_capacity(size as usize);
            entry.take(limit).read_to_end(&mut buf).ok()?;
            Some(buf)
        };
        if rel == "checkpoint" {
            self.checkpoint_dir |= is_dir;
            return;
        }
        if let Some(img) = rel.strip_prefix("checkpoint/") {
            self.checkpoint_dir = true;
            if is_dir {
                return;
            }
            self.images_bytes += size;
            if img == "pstree.img" {
                self.pstree = Some(match read(entry, MAX_METADATA_BYTES) {
                    Some(data) => image::decode_entries(&data, image::PSTREE_MAGIC)
                        .map_err(|e| format!("pstree.img: {e}")),
                    None => Err(format!("pstree.img of {size} bytes not read")),
                });
            } else if let Some(pid) = img
                .strip_prefix("core-")
                .and_then(|s| s.strip_suffix(".img"))
                .and_then(|s| s.parse::<u32>().ok())
            {
                // Best effort: a missing command only leaves a bare pid.
                let comm = read(entry, MAX_CORE_BYTES)
                    .and_then(|d| image::decode_entries::<CoreEntry>(&d, image::CORE_MAGIC).ok())
                    .and_then(|v| v.first().and_then(CoreEntry::comm));
                if let Some(comm) = comm {
                    self.comms.insert(pid, comm);
                }
            }
            return;
        }
        let json = |entry: &mut dyn Read| {
            read(entry, MAX_METADATA_BYTES).and_then(|d| serde_json::from_slice(&d).ok())
        };
        match rel {
            "config.dump" => self.config_dump = json(entry),
            "spec.dump" => self.spec = json(entry),
            "deleted.files" => {
                self.deleted = json(entry)
                    .map(|v: serde_json::Value| v.as_array().map(Vec::len).unwrap_or_default())
            }
            "rootfs-diff.tar" => self.rootfs_diff = Some(size),
            _ => {}
        }
    }

    fn str_at(v: &Option<serde_json::Value>, pointer: &str) -> Option<String> {
        v.as_ref()?
            .pointer(pointer)?
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }

    fn annotation(&self, key: &str) -> Option<String> {
        Self::str_at(
            &self.spec,
            &format!("/annotations/{}", key.replace('/', "~1")),
        )
    }

    /// The container as this directory describes it.
    fn container(&self) -> ContainerInfo {
        let cfg = |k: &str| Self::str_at(&self.config_dump, &format!("/{k}")).unwrap_or_default();
        let command = self
            .spec
            .as_ref()
            .and_then(|s| s.pointer("/process/args"))
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let (processes, processes_error) = match &self.pstree {
            Some(Ok(tree)) => (
                tree.iter()
                    .map(|e| Process {
                        pid: e.pid,
                        ppid: e.ppid,
                        pgid: e.pgid,
                        sid: e.sid,
                        threads: e.threads.len().max(1),
                        comm: self.comms.get(&e.pid).cloned(),
                    })
                    .collect(),
                None,
            ),
            Some(Err(e)) => (Vec::new(), Some(e.clone())),
            None => (Vec::new(), Some("no checkpoint/pstree.img".into())),
        };
        let name = [
            cfg("name"),
            self.annotation("io.kubernetes.cri.container-name")
                .unwrap_or_default(),
        ]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_default();
        ContainerInfo {
            name,
            id: cfg("id"),
            image: [cfg("rootfsImageName"), cfg("rootfsImage")]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or_default(),
            image_ref: cfg("rootfsImageRef"),
            images_bytes: self.images_bytes,
            rootfs_diff_bytes: self.rootfs_diff.unwrap_or(0),
            deleted_files: self.deleted.unwrap_or(0),
            command,
            processes,
            processes_error,
        }
    }
}

/// Inspects the archive at `path`: a file, or a directory CheckpointPod
/// wrote into.
pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let archive = locate_pod_archive(path).ok_or_else(|| InspectError::NotFound(path.into()))?;
    let io_err = |source| ReadError::Io {
        path: archive.clone(),
        source: super::reader::sanitize(source, None),
    };
    let archive_bytes = std::fs::symlink_metadata(&archive).map_err(io_err)?.len();
    let mut tar = open_tar(&archive)?;
    let mut manifest: Option<PodManifest> = None;
    // Keyed by the container directory ("" for a container archive).
    let mut dirs: BTreeMap<String, Acc> = BTreeMap::new();
    for (index, entry) in tar.entries().map_err(io_err)?.enumerate() {
        let mut entry = entry.map_err(io_err)?;
        let raw = entry.path().map_err(io_err)?.to_string_lossy().into_owned();
        // Archives made with `tar -C dir .` name entries "./x".
        let name = raw
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let size = entry.size();
        let is_dir = entry.header().entry_type().is_dir();
        if index == 0 && name == MANIFEST {
            if size > MAX_MANIFEST_BYTES {
                return Err(ReadError::Invalid {
                    path: archive.clone(),
                    reason: format!("manifest of {size} bytes is implausibly large"),
                }
                .into());
            }
            let mut data = Vec::with_capacity(size as usize);
            (&mut entry)
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut data)
                .map_err(io_err)?;
            manifest = Some(parse_manifest(&archive, &data)?);
            continue;
        }
        let (dir, rel) = match &manifest {
            Some(m) => match m.containers.iter().find_map(|c| {
                let r = name.strip_prefix(c.dir.as_str())?;
                (r.is_empty() || r.starts_with('/'))
                    .then(|| (c.dir.clone(), r.trim_start_matches('/').to_string()))
            }) {
                Some(found) => found,
                // pod/devshm and anything undeclared: not per container.
                None => continue,
            },
            None => (String::new(), name),
        };
        dirs.entry(dir)
            .or_default()
            .feed(&rel, &mut entry, size, is_dir);
    }
    match manifest {
        Some(m) => Ok(Inspection::Pod(pod_archive(
            archive,
            archive_bytes,
            m,
            &dirs,
        ))),
        None => {
            let acc = dirs.remove("").unwrap_or_default();
            if !acc.checkpoint_dir && acc.config_dump.is_none() {
                return Err(InspectError::NotACheckpoint {
                    path: archive,
                    reason: format!("neither {MANIFEST} first nor checkpoint/ and config.dump"),
                });
            }
            let container = acc.container();
            Ok(Inspection::Container(ContainerArchive {
                archive,
                archive_bytes,
                checkpointed: Acc::str_at(&acc.config_dump, "/checkpointedTime"),
                runtime: Acc::str_at(&acc.config_dump, "/runtime"),
                criu_version: Acc::str_at(&acc.config_dump, "/podckpt/criuVersion")
                    .or_else(|| acc.annotation("org.criu.checkpoint.criu.version")),
                pod: PodIdentity {
                    name: acc
                        .annotation("io.kubernetes.cri.sandbox-name")
                        .unwrap_or_default(),
                    namespace: acc
                        .annotation("io.kubernetes.cri.sandbox-namespace")
                        .unwrap_or_default(),
                    uid: acc
                        .annotation("io.kubernetes.cri.sandbox-uid")
                        .unwrap_or_default(),
                    sandbox_id: acc
                        .annotation("io.kubernetes.cri.sandbox-id")
                        .unwrap_or_default(),
                    runtime_handler: String::new(),
                },
                container,
            }))
        }
    }
}

fn pod_archive(
    archive: PathBuf,
    archive_bytes: u64,
    m: PodManifest,
    dirs: &BTreeMap<String, Acc>,
) -> PodArchive {
    let meta = m
        .sandbox
        .config
        .as_ref()
        .and_then(|c| c.metadata.clone())
        .or_else(|| m.sandbox.status.as_ref().and_then(|s| s.metadata.clone()))
        .unwrap_or_default();
    let empty = Acc::default();
    let containers = m
        .containers
        .iter()
        .map(|c| {
            let acc = dirs.get(&c.dir).unwrap_or(&empty);
            // The manifest is authoritative for what it records; the
            // stream adds the command and the process tree.
            let from_stream = acc.container();
            ContainerInfo {
                name: c.name.clone(),
                id: c.id.clone(),
                image: c.image.clone(),
                image_ref: c.image_ref.clone(),
                images_bytes: c.images_bytes,
                rootfs_diff_bytes: c.rootfs_diff_bytes,
                deleted_files: c.deleted_files,
                ..from_stream
            }
        })
        .collect();
    PodArchive {
        archive,
        archive_bytes,
        format: m.format,
        version: m.version,
        podckpt_version: m.podckpt_version,
        created_unix_ms: m.created_unix_ms,
        host: m.host,
        pod: PodIdentity {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            sandbox_id: m.sandbox.id,
            runtime_handler: m
                .sandbox
                .status
                .map(|s| s.runtime_handler)
                .unwrap_or_default(),
        },
        options: m.options,
        timings: m.timings,
        devshm: m.devshm,
        containers,
    }
}
