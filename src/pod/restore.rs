//! RestorePod, and single-container restore through CreateContainer.
//!
//! Order of work, and why:
//! 1. validate the request and the archive's manifest without touching the
//!    runtime (bad input changes nothing): names, options, handler, each
//!    container's directory and CRIU images listed;
//! 2. make sure every base image is present (one pull at most, else
//!    FailedPrecondition naming the image: never hang on a registry);
//! 3. create the sandbox and one container per checkpointed container
//!    through the runtime (each registered for restore), while the archive
//!    is extracted into a private work dir, every entry checked against
//!    the manifest. An archive whose footer says it is whole (see
//!    [`crate::archive::footer`]) goes on being extracted in the
//!    background after the call answers, group after group (/dev/shm,
//!    then each container in start order, each group's frames verified
//!    before it is called ready), so restoring the first container
//!    overlaps extracting the next; `podckpt-runc` waits for its
//!    container's group ([`crate::restore::progress`]). Other archives
//!    (older, foreign, cut short) are extracted whole before the call
//!    answers. A damaged archive fails the call if the damage is reached
//!    before it answers, else the start of the container it belongs to.
//!    The restore itself happens in `podckpt-runc` when the caller starts
//!    each container.
//!
//! On any error, everything this call created is removed before it
//! answers: containers, sandbox, registrations, extracted files. CRI calls
//! already sent are let finish (their results are needed to undo them), so
//! a deadline is honoured between steps.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::archive::extract::{self, ExtractError, Limits, Listing};
use crate::archive::footer;
use crate::archive::manifest::{PodManifest, DEVSHM_DIR};
use crate::archive::reader::{self, ReadError};
use crate::cri::api::{
    ContainerConfig, CreateContainerRequest, CreateContainerResponse, ImageSpec,
    ImageStatusRequest, ListContainersRequest, PodSandboxConfig, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RestorePodRequest, RestorePodResponse,
    RestoredContainer, RunPodSandboxResponse, StatusRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use crate::cri::client::CriClient;
use crate::cri::raw;
use crate::cri::wire::{self, Preserved};
use crate::restore::progress::{Progress, RunningLock, STATE_DIR};
use crate::restore::registration::RESTORE_KEY_ANNOTATION;
use crate::restore::{Registration, Registry, Stage};

use super::checkpoint::{
    check, criu_ready, now_ns, require_deadline, supervise, CriuReadiness, Deadline,
};
use super::error::PodError;

/// Options RestorePod accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull a missing base image once (default).
    IfMissing,
    /// Never pull: a missing base image fails the restore.
    Never,
}

/// RestorePod's options, from its `options` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreOptions {
    /// `pull-image` = `if-missing` (default) | `never`.
    pub pull: PullPolicy,
    /// `lazy-pages` = `true` | `false` (default): the containers start
    /// before their memory is back, which a `criu lazy-pages` daemon per
    /// container fills on demand and in the background
    /// ([`crate::restore::lazy`]).
    pub lazy_pages: bool,
}

/// Parses and checks RestorePod's options; unknown keys and values are
/// InvalidArgument.
pub fn parse_restore_options(
    options: &HashMap<String, String>,
) -> Result<RestoreOptions, PodError> {
    let mut opts = RestoreOptions {
        pull: PullPolicy::IfMissing,
        lazy_pages: false,
    };
    for (k, v) in options {
        match (k.as_str(), v.as_str()) {
            ("pull-image", "if-missing") => opts.pull = PullPolicy::IfMissing,
            ("pull-image", "never") => opts.pull = PullPolicy::Never,
            ("pull-image", other) => {
                return Err(PodError::InvalidArgument(format!(
                    "option pull-image={other:?}: expected if-missing or never"
                )))
            }
            ("lazy-pages", "true") => opts.lazy_pages = true,
            ("lazy-pages", "false") => opts.lazy_pages = false,
            ("lazy-pages", other) => {
                return Err(PodError::InvalidArgument(format!(
                    "option lazy-pages={other:?}: expected true or false"
                )))
            }
            (other, _) => {
                return Err(PodError::InvalidArgument(format!(
                    "unknown restore option {other:?} (supported: pull-image, lazy-pages)"
                )))
            }
        }
    }
    Ok(opts)
}

/// The restore engine; cheap to clone.
#[derive(Clone)]
pub struct Restorer {
    inner: Arc<Inner>,
}

struct Inner {
    cri: CriClient,
    registry: Registry,
    criu: CriuReadiness,
    /// Bounds on one restore's extraction.
    limits: Limits,
    /// Work dirs of restores in progress: garbage collection keeps off
    /// them, and off those of `extractions`.
    in_progress: Mutex<HashSet<PathBuf>>,
    /// Extractions running in the background, by work dir.
    extractions: Arc<Mutex<HashMap<PathBuf, Running>>>,
    metrics: crate::metrics::Metrics,
    /// Where the requests restores send are noted (see [`Restorer::with_seen`]).
    seen: Option<crate::pod::seen::SeenConfigs>,
    /// The most each runtime call of an undo may take.
    undo_call_timeout: Duration,
}

/// Default of `--undo-call-timeout`.
pub const DEFAULT_UNDO_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A background extraction: stopped when every container it fills is gone.
struct Running {
    token: CancellationToken,
    containers: Vec<String>,
}

/// A work dir being filled; removed on drop unless handed to registrations.
struct WorkDir<'a> {
    path: PathBuf,
    inner: &'a Inner,
    keep: bool,
}

impl Drop for WorkDir<'_> {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = self.inner.registry.remove_work_dir(&self.path) {
                tracing::warn!(dir = %self.path.display(), error = %e, "removing restore work dir");
            }
        }
        if let Ok(mut set) = self.inner.in_progress.lock() {
            set.remove(&self.path);
        }
    }
}

/// Extracts a pod archive in the background, group after group (the
/// pod's /dev/shm, then each container in order), marking each ready for
/// `podckpt-runc`; see [`crate::restore::progress`].
struct Background {
    archive: PathBuf,
    work: PathBuf,
    listing: Listing,
    limits: Limits,
    groups: Vec<String>,
    progress: Progress,
    lock: RunningLock,
    token: CancellationToken,
    registry: Registry,
    extractions: Arc<Mutex<HashMap<PathBuf, Running>>>,
    metrics: crate::metrics::Metrics,
    done: tokio::sync::oneshot::Sender<Result<(), PodError>>,
}

impl Background {
    fn run(self) {
        let started = std::time::Instant::now();
        let progress = &self.progress;
        let work = &self.work;
        let result = extract::extract_in_groups(
            &self.archive,
            work,
            Some(&self.listing),
            &self.limits,
            &|_| false,
            &self.groups,
            &mut |g| {
                progress
                    .mark_ready(g)
                    .map_err(|source| ExtractError::Write {
                        path: work.join(STATE_DIR),
                        source,
                    })?;
                tracing::debug!(group = %self.groups[g], took = ?started.elapsed(), "restore: files ready");
                Ok(())
            },
            &|| self.token.is_cancelled(),
        );
        let cancelled = self.token.is_cancelled();
        match &result {
            Ok(done) => {
                self.metrics.extracted(done.bytes);
                tracing::info!(files = done.files, bytes = done.bytes, took = ?started.elapsed(), "checkpoint extracted");
            }
            Err(e) if !cancelled => {
                tracing::warn!(dir = %work.display(), error = %e, "background extraction failed");
                if let Err(err) = self.progress.mark_failed(&e.to_string()) {
                    tracing::warn!(dir = %work.display(), error = %err, "recording the failure");
                }
            }
            Err(_) => tracing::info!(dir = %work.display(), "background extraction stopped"),
        }
        drop(self.lock);
        if cancelled {
            // Its containers are gone (or the restore failed): nothing
            // will read these files.
            if let Err(e) = self.registry.remove_work_dir(work) {
                tracing::warn!(dir = %work.display(), error = %e, "removing restore work dir");
            }
        }
        if let Ok(mut m) = self.extractions.lock() {
            m.remove(work);
        }
        let _ = self.done.send(result.map(|_| ()).map_err(extract_error));
    }
}

/// A validated RestorePod: the request, the archive and where each
/// container's files go.
struct Plan<'a> {
    req: &'a RestorePodRequest,
    sandbox_config: &'a Preserved<PodSandboxConfig>,
    manifest: &'a PodManifest,
    dirs: &'a [PathBuf],
    archive: PathBuf,
    listing: Listing,
    /// The `lazy-pages` option, recorded in each registration.
    lazy_pages: bool,
}

/// What this call created in the runtime, undone on error.
#[derive(Default)]
struct Created {
    sandbox: Option<String>,
    containers: Vec<String>,
    /// Registrations stored under their key before CreateContainer.
    keys: Vec<String>,
}

/// A runtime call of an undo, given at most `within`; the error says what
/// happened without the runtime's details beyond its message.
async fn bounded<T>(
    within: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(within, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(s)) => Err(s.message().to_owned()),
        Err(_) => Err(format!(
            "no answer within {within:?} (--undo-call-timeout); left in the runtime"
        )),
    }
}

/// Why a restore that completed after its caller was answered is undone
/// (logged by the undo).
fn late_result() -> PodError {
    PodError::DeadlineExceeded {
        during: "restoring: completed after the caller was answered",
    }
}

fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 12];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => b.iter().map(|x| format!("{x:02x}")).collect(),
        // Unique enough for a directory name.
        Err(_) => format!("{:x}-{}", now_ms(), std::process::id()),
    }
}

fn extract_error(e: ExtractError) -> PodError {
    match e {
        ExtractError::Invalid { .. } => {
            PodError::InvalidArgument(format!("refusing the checkpoint: {e}"))
        }
        ExtractError::Read { ref source, .. } => match source.raw_os_error() {
            // The archive itself could not be read (EIO, ...): the node's
            // problem, not the data's.
            Some(_) => PodError::Io {
                op: "read",
                path: PathBuf::from(e.to_string()),
                source: std::io::Error::new(source.kind(), e.to_string()),
            },
            None => PodError::DataLoss(format!("the checkpoint is damaged: {e}")),
        },
        ExtractError::Write { path, source } => PodError::Io {
            op: "write",
            path,
            source,
        },
        ExtractError::Limit { .. } => {
            PodError::ResourceExhausted(format!("refusing the checkpoint: {e}"))
        }
        ExtractError::Cancelled => PodError::Cancelled {
            during: "extracting the checkpoint",
        },
    }
}

fn read_error(e: ReadError) -> PodError {
    match e {
        ReadError::Invalid { .. } => PodError::InvalidArgument(e.to_string()),
        ReadError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PodError::NotFound(e.to_string())
        }
        ReadError::Io { ref source, .. } if source.raw_os_error().is_none() => {
            PodError::DataLoss(format!("the checkpoint is damaged: {e}"))
        }
        ReadError::Io { path, source } => PodError::Io {
            op: "read",
            path,
            source,
        },
    }
}

impl Restorer {
    /// A restore engine talking to the runtime through `cri`.
    pub fn new(
        cri: CriClient,
        restore_dir: PathBuf,
        criu: CriuReadiness,
        limits: Limits,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cri,
                registry: Registry::new(restore_dir),
                criu,
                limits,
                in_progress: Mutex::new(HashSet::new()),
                extractions: Arc::new(Mutex::new(HashMap::new())),
                metrics,
                seen: None,
                undo_call_timeout: DEFAULT_UNDO_CALL_TIMEOUT,
            }),
        }
    }

    /// Notes the RunPodSandbox and CreateContainer requests of restores in
    /// `seen`, as the proxy does for the kubelet's: a restored pod can be
    /// checkpointed again with its configs on a runtime that keeps none.
    /// Called once, before the restorer is shared.
    pub fn with_seen(mut self, seen: crate::pod::seen::SeenConfigs) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.seen = Some(seen);
        }
        self
    }

    /// Bounds each runtime call of an undo (`--undo-call-timeout`). Called
    /// once, before the restorer is shared.
    pub fn with_undo_call_timeout(mut self, within: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.undo_call_timeout = within;
        }
        self
    }

    /// The registration store.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Serves RestorePod.
    /// `raw` is the request message as the caller encoded it: the configs
    /// go on to the runtime from those bytes, so fields podckptd does not
    /// know are kept.
    pub async fn restore_pod(
        &self,
        req: RestorePodRequest,
        raw: Option<Bytes>,
        deadline: Option<Deadline>,
    ) -> Result<RestorePodResponse, PodError> {
        let deadline = require_deadline(deadline, "RestorePod")?;
        let inner = self.inner.clone();
        let undo = self.inner.clone();
        supervise(
            Some(deadline),
            move |token| async move { inner.pod(req, raw, token).await },
            Box::new(move |resp: RestorePodResponse| {
                Box::pin(async move {
                    let created = Created {
                        sandbox: Some(resp.pod_sandbox_id),
                        containers: resp
                            .restored_containers
                            .into_iter()
                            .map(|c| c.container_id)
                            .collect(),
                        keys: Vec::new(),
                    };
                    let _ = undo.undo(late_result(), created).await;
                })
            }),
        )
        .await
    }

    /// Serves a CreateContainer whose image is a container checkpoint
    /// archive (`raw`: the request as the caller encoded it).
    pub async fn create_from_archive(
        &self,
        req: CreateContainerRequest,
        raw: Option<Bytes>,
        deadline: Option<Deadline>,
    ) -> Result<CreateContainerResponse, PodError> {
        let inner = self.inner.clone();
        let undo = self.inner.clone();
        supervise(
            deadline,
            move |token| async move { inner.container(req, raw, token).await },
            Box::new(move |resp: CreateContainerResponse| {
                Box::pin(async move {
                    let created = Created {
                        containers: vec![resp.container_id],
                        ..Default::default()
                    };
                    let _ = undo.undo(late_result(), created).await;
                })
            }),
        )
        .await
    }

    /// Waits at most `grace` for background extractions to finish; whether
    /// none is left.
    pub async fn finish_extractions(&self, grace: Duration) -> bool {
        let running = || self.inner.extractions.lock().map_or(0, |m| m.len());
        if running() > 0 {
            tracing::info!(
                running = running(),
                "waiting for background extractions before exiting"
            );
        }
        let until = tokio::time::Instant::now() + grace;
        while running() > 0 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Drops registrations of containers the runtime no longer has and
    /// work dirs nobody uses. Runs at start and before each restore.
    pub async fn collect_garbage(&self) -> Result<usize, PodError> {
        self.inner.collect_garbage().await
    }
}

impl Inner {
    fn criu_ready(&self) -> Result<(), PodError> {
        criu_ready(&self.criu, "restoring")
    }

    async fn collect_garbage(&self) -> Result<usize, PodError> {
        let mut cri = self.cri.clone();
        let live: HashSet<String> = cri
            .runtime
            .list_containers(ListContainersRequest::default())
            .await
            .map_err(|s| PodError::runtime("ListContainers", s))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
        // Background extractions whose containers are all gone stop (and
        // remove their work dir themselves).
        if let Ok(m) = self.extractions.lock() {
            for (dir, r) in m.iter() {
                if !r.containers.is_empty() && !r.containers.iter().any(|c| live.contains(c)) {
                    tracing::info!(dir = %dir.display(), "stopping the extraction of a removed pod");
                    r.token.cancel();
                }
            }
        }
        let mut keep = self
            .in_progress
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if let Ok(m) = self.extractions.lock() {
            keep.extend(m.keys().cloned());
        }
        let registry = self.registry.clone();
        let gone = tokio::task::spawn_blocking(move || {
            registry.collect_garbage(&live, &keep, ORPHAN_WORK_DIR_AGE)
        })
        .await
        .map_err(|e| PodError::Internal(format!("garbage collection: {e}")))?;
        if gone > 0 {
            tracing::info!(gone, "dropped restore registrations of removed containers");
        }
        Ok(gone)
    }

    /// Refuses, before anything is created, a restore whose manifest
    /// declares more than the limits allow or than the restore dir's
    /// filesystem has free.
    fn check_room(&self, bytes: u64, entries: u64) -> Result<(), PodError> {
        let l = &self.limits;
        if entries > l.max_entries {
            return Err(PodError::ResourceExhausted(format!(
                "the checkpoint lists {entries} files, more than --max-archive-entries ({})",
                l.max_entries
            )));
        }
        if bytes > l.max_bytes {
            return Err(PodError::ResourceExhausted(format!(
                "the checkpoint holds {bytes} bytes, more than --max-restore-bytes ({})",
                l.max_bytes
            )));
        }
        let free = self.free_bytes()?;
        if bytes > free {
            return Err(PodError::ResourceExhausted(format!(
                "the checkpoint holds {bytes} bytes; the filesystem of {} has {free} free",
                self.registry.root().display()
            )));
        }
        Ok(())
    }

    /// Free bytes (for unprivileged users too: what root may use beyond
    /// is kept for the node) on the restore dir's filesystem.
    fn free_bytes(&self) -> Result<u64, PodError> {
        let dir = self
            .registry
            .verify(true)
            .map_err(PodError::unsafe_dir("--restore-dir"))?;
        let st = nix::sys::statvfs::fstatvfs(dir.fd()).map_err(|e| PodError::Io {
            op: "statvfs",
            path: dir.path().to_path_buf(),
            source: e.into(),
        })?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// The limits of an extraction whose size is not declared: lowered to
    /// the free space, so that it stops before filling the filesystem.
    fn unlisted_limits(&self) -> Result<Limits, PodError> {
        Ok(Limits {
            max_bytes: self.limits.max_bytes.min(self.free_bytes()?),
            ..self.limits
        })
    }

    fn new_work_dir(&self) -> Result<WorkDir<'_>, PodError> {
        self.registry
            .verify(true)
            .map_err(PodError::unsafe_dir("--restore-dir"))?;
        let path = self.registry.work_root().join(random_id());
        if let Ok(mut set) = self.in_progress.lock() {
            set.insert(path.clone());
        }
        Ok(WorkDir {
            path,
            inner: self,
            keep: false,
        })
    }

    /// Extracts `archive` into `dest` off the executor, cancellable.
    async fn extract(
        &self,
        archive: PathBuf,
        dest: PathBuf,
        listing: Option<Listing>,
        limits: Limits,
        token: &CancellationToken,
    ) -> Result<extract::Extracted, PodError> {
        let t = token.clone();
        tokio::task::spawn_blocking(move || {
            extract::extract(
                &archive,
                &dest,
                listing.as_ref(),
                &limits,
                &|_| false,
                &|| t.is_cancelled(),
            )
        })
        .await
        .map_err(|e| PodError::Internal(format!("extraction task: {e}")))?
        .map_err(extract_error)
        .inspect(|done| self.metrics.extracted(done.bytes))
    }

    /// Makes sure `image` is on the node: one pull at most.
    async fn ensure_image(
        &self,
        image: &str,
        container: &str,
        pull: PullPolicy,
        sandbox_config: Option<&PodSandboxConfig>,
    ) -> Result<(), PodError> {
        let mut cri = self.cri.clone();
        let spec = ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        };
        let present = cri
            .image
            .image_status(ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            })
            .await
            .map_err(|s| PodError::runtime("ImageStatus", s))?
            .into_inner()
            .image
            .is_some();
        if present {
            return Ok(());
        }
        if pull == PullPolicy::Never {
            return Err(PodError::FailedPrecondition(format!(
                "base image {image} of container {container} is not present on this node (pull-image=never)"
            )));
        }
        tracing::info!(image, container, "base image missing: pulling it once");
        // Bounded: a registry that does not answer must not hold the restore.
        let mut pull_req = tonic::Request::new(PullImageRequest {
            image: Some(spec),
            auth: None,
            sandbox_config: sandbox_config.cloned(),
        });
        pull_req.set_timeout(PULL_TIMEOUT);
        match tokio::time::timeout(PULL_TIMEOUT, cri.image.pull_image(pull_req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(PodError::FailedPrecondition(format!(
                "base image {image} of container {container} is not present on this node and pulling it failed: {}",
                status.message()
            ))),
            Err(_) => Err(PodError::FailedPrecondition(format!(
                "base image {image} of container {container} is not present on this node and pulling it did not finish within {PULL_TIMEOUT:?}"
            ))),
        }
    }

    async fn pod(
        &self,
        req: RestorePodRequest,
        raw: Option<Bytes>,
        token: CancellationToken,
    ) -> Result<RestorePodResponse, PodError> {
        // 1. Validate, runtime untouched.
        self.criu_ready()?;
        let options = parse_restore_options(&req.options)?;
        let path = Path::new(&req.checkpoint_path);
        if !path.is_absolute() {
            return Err(PodError::InvalidArgument(format!(
                "checkpoint_path {:?} must be absolute",
                req.checkpoint_path
            )));
        }
        if !path.exists() {
            return Err(PodError::NotFound(format!(
                "checkpoint_path {} does not exist",
                path.display()
            )));
        }
        let archive = reader::locate_pod_archive(path).ok_or_else(|| {
            PodError::InvalidArgument(format!(
                "{} holds no podckpt pod archive (pod.tar.zst)",
                path.display()
            ))
        })?;
        let a = archive.clone();
        let manifest = tokio::task::spawn_blocking(move || reader::read_manifest(&a))
            .await
            .map_err(|e| PodError::Internal(format!("manifest task: {e}")))?
            .map_err(read_error)?;
        let (sandbox_config, configs) = preserved_configs(&req, raw.as_ref())?;
        let configs = match_configs(&manifest, configs)?;
        if !req.runtime_handler.is_empty() {
            self.check_handler(&req.runtime_handler).await?;
        }
        // The request must describe the checkpointed pod (FailedPrecondition
        // naming what differs), checked before anything is created.
        let typed: Vec<&ContainerConfig> = configs.iter().map(|c| &c.msg).collect();
        super::restore_check::check_request(
            &manifest,
            &sandbox_config.msg,
            &req.runtime_handler,
            &typed,
        )?;
        let _ = self.collect_garbage().await;
        check(&token, "validating")?;

        // 2. The manifest must describe a restorable pod: each container's
        // directory safe, and its CRIU images listed.
        let listing: Listing = manifest
            .files
            .iter()
            .map(|f| (f.path.clone(), f.size))
            .collect();
        let total: u64 = listing.values().sum();
        self.check_room(total, manifest.files.len() as u64)?;
        let mut dirs = Vec::new();
        let mut work = self.new_work_dir()?;
        for c in &manifest.containers {
            let rel = extract::checked_relative(&c.dir).map_err(|why| {
                PodError::InvalidArgument(format!(
                    "container {} has directory {:?}: {why}",
                    c.name, c.dir
                ))
            })?;
            let inventory = format!("{}/checkpoint/inventory.img", rel.display());
            if !listing.contains_key(&inventory) {
                return Err(PodError::InvalidArgument(format!(
                    "the checkpoint holds no CRIU images for container {}",
                    c.name
                )));
            }
            dirs.push(work.path.join(rel));
        }

        // 3. Base images.
        let mut configs = configs;
        for (entry, cfg) in manifest.containers.iter().zip(configs.iter_mut()) {
            let image = cfg.msg.image.get_or_insert_with(Default::default);
            if image.image.is_empty() {
                // The caller named no image: the one the checkpoint records
                // by content, if the node has it. A name from the archive is
                // never pulled or trusted (see base_image_on_node).
                let recorded = RecordedImage {
                    reference: Some(entry.image_ref.clone()).filter(|r| r.contains("sha256:")),
                    name: Some(entry.image.clone()),
                };
                let (id, shown) = self
                    .base_image_on_node(None, &recorded, &entry.name)
                    .await?;
                image.image = id;
                if image.user_specified_image.is_empty() {
                    image.user_specified_image = shown;
                }
            } else {
                // The caller's image: pulled once if missing, per options.
                let name = image.image.clone();
                self.ensure_image(&name, &entry.name, options.pull, Some(&sandbox_config.msg))
                    .await?;
            }
            // CRI-O verifies signatures against the reference the user
            // asked for, and refuses a create without one.
            if image.user_specified_image.is_empty() {
                image.user_specified_image = image.image.clone();
            }
            check(&token, "checking base images")?;
        }

        // 4. An archive whose footer says it is whole is extracted in the
        // background, container after container in the order they will be
        // started, and the call answers once the sandbox and containers
        // exist: each container's restore waits only for its own files
        // (see crate::restore::progress). Others (no footer: older or
        // foreign archives, or cut short) are extracted whole first.
        let a = archive.clone();
        let whole = tokio::task::spawn_blocking(move || footer::read(&a))
            .await
            .map_err(|e| PodError::Internal(format!("footer task: {e}")))?
            .map_err(|e| PodError::Io {
                op: "read",
                path: archive.clone(),
                source: e,
            })?;
        let plan = Plan {
            req: &req,
            sandbox_config: &sandbox_config,
            manifest: &manifest,
            dirs: &dirs,
            archive,
            listing,
            lazy_pages: options.lazy_pages,
        };
        match whole {
            Some(_) => self.pod_pipelined(plan, configs, &mut work, &token).await,
            None => {
                self.pod_extract_first(plan, configs, &mut work, &token)
                    .await
            }
        }
    }

    /// Extraction (every entry checked against the manifest) beside the
    /// creation of the sandbox and containers; answers when both are done.
    async fn pod_extract_first(
        &self,
        plan: Plan<'_>,
        configs: Vec<Preserved<ContainerConfig>>,
        work: &mut WorkDir<'_>,
        token: &CancellationToken,
    ) -> Result<RestorePodResponse, PodError> {
        let Plan {
            req,
            sandbox_config,
            manifest,
            dirs,
            archive,
            listing,
            lazy_pages,
        } = plan;
        let mut created = Created::default();
        let extract_token = token.child_token();
        let started = std::time::Instant::now();
        let extraction = async {
            let r = self
                .extract(
                    archive.clone(),
                    work.path.clone(),
                    Some(listing),
                    self.limits,
                    &extract_token,
                )
                .await;
            if let Ok(done) = &r {
                tracing::info!(files = done.files, bytes = done.bytes, took = ?started.elapsed(), "checkpoint extracted");
            }
            r
        };
        let creation = async {
            let r = self
                .create_pod(
                    req,
                    sandbox_config,
                    manifest,
                    configs,
                    dirs,
                    &[],
                    &work.path,
                    lazy_pages,
                    &mut created,
                    token,
                )
                .await;
            if r.is_err() {
                // No point finishing the extraction.
                extract_token.cancel();
            }
            r
        };
        let (extracted, result) = tokio::join!(extraction, creation);
        let result = match (extracted, result) {
            // A damaged archive is the cause of a creation that failed
            // beside it (CRI-O restores inside CreateContainer, from files
            // the extraction never wrote): the caller hears of the archive.
            // An extraction cancelled because the creation failed is not.
            (Err(err), Err(_)) if !matches!(err, PodError::Cancelled { .. }) => Err(err),
            (_, Err(err)) => Err(err),
            (Err(err), Ok(_)) => Err(err),
            (Ok(_), Ok(resp)) => check(token, "restoring").map(|_| resp),
        };
        match result {
            Ok(resp) => {
                work.keep = true;
                Ok(resp)
            }
            Err(err) => Err(self.undo(err, created).await),
        }
    }

    /// The sandbox and containers are created while the archive is
    /// extracted in the background; answers when they exist.
    async fn pod_pipelined(
        &self,
        plan: Plan<'_>,
        configs: Vec<Preserved<ContainerConfig>>,
        work: &mut WorkDir<'_>,
        token: &CancellationToken,
    ) -> Result<RestorePodResponse, PodError> {
        let Plan {
            req,
            sandbox_config,
            manifest,
            dirs,
            archive,
            listing,
            lazy_pages,
        } = plan;
        // Groups in archive order: /dev/shm, then the containers.
        let mut groups = Vec::new();
        if manifest.devshm {
            groups.push(DEVSHM_DIR.to_string());
        }
        let first = groups.len();
        for dir in dirs {
            let rel = dir.strip_prefix(&work.path).unwrap_or(dir);
            groups.push(rel.to_string_lossy().into_owned());
        }
        let wait: Vec<Vec<usize>> = (0..manifest.containers.len())
            .map(|i| {
                let mut w = vec![first + i];
                if manifest.devshm {
                    w.push(0);
                }
                w
            })
            .collect();
        let (progress, lock) =
            Progress::start(&work.path).map_err(PodError::io("create", work.path.clone()))?;
        let bg_token = CancellationToken::new();
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        if let Ok(mut m) = self.extractions.lock() {
            m.insert(
                work.path.clone(),
                Running {
                    token: bg_token.clone(),
                    containers: vec![],
                },
            );
        }
        let job = Background {
            archive,
            work: work.path.clone(),
            listing,
            limits: self.limits,
            groups,
            progress,
            lock,
            token: bg_token.clone(),
            registry: self.registry.clone(),
            extractions: self.extractions.clone(),
            metrics: self.metrics.clone(),
            done: done_tx,
        };
        if let Err(e) = std::thread::Builder::new()
            .name("restore-extract".into())
            .spawn(move || job.run())
        {
            if let Ok(mut m) = self.extractions.lock() {
                m.remove(&work.path);
            }
            return Err(PodError::Internal(format!("no extraction thread: {e}")));
        }
        let mut created = Created::default();
        let result = self
            .create_pod(
                req,
                sandbox_config,
                manifest,
                configs,
                dirs,
                &wait,
                &work.path,
                lazy_pages,
                &mut created,
                token,
            )
            .await;
        // An extraction that already failed fails the call.
        let mut extraction_over = false;
        let result = match result {
            Err(err) => Err(err),
            Ok(resp) => match done_rx.try_recv() {
                Ok(Err(err)) => {
                    extraction_over = true;
                    Err(err)
                }
                Ok(Ok(())) | Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    extraction_over = true;
                    check(token, "restoring").map(|_| resp)
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                    check(token, "restoring").map(|_| resp)
                }
            },
        };
        match result {
            Ok(resp) => {
                if let Ok(mut m) = self.extractions.lock() {
                    if let Some(r) = m.get_mut(&work.path) {
                        r.containers = created.containers.clone();
                    }
                }
                work.keep = true;
                Ok(resp)
            }
            Err(err) => {
                // Stop the extraction and let it finish before the work
                // dir goes, so nothing is written after the answer.
                bg_token.cancel();
                if !extraction_over {
                    let _ = done_rx.await;
                }
                Err(self.undo(err, created).await)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_pod(
        &self,
        req: &RestorePodRequest,
        sandbox_config: &Preserved<PodSandboxConfig>,
        manifest: &PodManifest,
        configs: Vec<Preserved<ContainerConfig>>,
        dirs: &[PathBuf],
        wait: &[Vec<usize>],
        work: &Path,
        lazy_pages: bool,
        created: &mut Created,
        token: &CancellationToken,
    ) -> Result<RestorePodResponse, PodError> {
        let cri = self.cri.clone();
        let sandbox_bytes = sandbox_config.encode();
        let run = run_pod_sandbox_request(&sandbox_bytes, &req.runtime_handler);
        if let Some(seen) = &self.seen {
            seen.note_run_pod_sandbox(&run);
        }
        let sandbox =
            raw::unary::<RunPodSandboxResponse>(cri.channel.clone(), RUN_POD_SANDBOX, run)
                .await
                .map_err(|s| PodError::runtime("RunPodSandbox", s))?
                .pod_sandbox_id;
        created.sandbox = Some(sandbox.clone());
        tracing::info!(sandbox = %sandbox, "restore: sandbox running");
        check(token, "creating the sandbox")?;
        let devshm = manifest.devshm.then(|| work.join(DEVSHM_DIR));
        // Each container is registered under a key in its config's
        // annotations before it is created: CRI-O runs the OCI runtime's
        // create inside CreateContainer, before its id is known here, and
        // podckpt-runc finds the registration by the key in the bundle.
        let mut configs = configs;
        let mut keys = Vec::with_capacity(configs.len());
        for (i, ((entry, cfg), dir)) in manifest
            .containers
            .iter()
            .zip(configs.iter_mut())
            .zip(dirs)
            .enumerate()
        {
            let key = random_id();
            cfg.msg
                .annotations
                .insert(RESTORE_KEY_ANNOTATION.to_owned(), key.clone());
            let reg = Registration {
                container_id: String::new(),
                name: entry.name.clone(),
                pod_sandbox_id: sandbox.clone(),
                work_dir: work.to_path_buf(),
                container_dir: dir.clone(),
                devshm_dir: devshm.clone(),
                tcp_established: manifest.options.tcp_established,
                file_locks: manifest.options.file_locks,
                ext_unix_sk: manifest.options.ext_unix_sk,
                stage: Stage::Pending,
                created_unix_ms: now_ms(),
                wait_groups: wait.get(i).cloned().unwrap_or_default(),
                lazy_pages,
                key: key.clone(),
            };
            self.registry.store_keyed(&reg).map_err(PodError::io(
                "write registration",
                self.registry.key_path(&key),
            ))?;
            created.keys.push(key.clone());
            keys.push(key);
        }
        // The containers are created side by side: each create is a round
        // trip through the runtime and its snapshotter, and none depends on
        // another. Every one that was created is recorded for the undo,
        // even when a sibling failed.
        let creates = configs.into_iter().map(|cfg| {
            let channel = cri.channel.clone();
            let req = create_container_request(&sandbox, &cfg.encode(), &sandbox_bytes);
            if let Some(seen) = &self.seen {
                seen.note_create_container(&req);
            }
            async move {
                raw::unary::<CreateContainerResponse>(channel, CREATE_CONTAINER, req)
                    .await
                    .map(|r| r.container_id)
                    .map_err(|s| PodError::runtime("CreateContainer", s))
            }
        });
        let results = futures_util::future::join_all(creates).await;
        let mut ids = Vec::with_capacity(results.len());
        let mut first_err = None;
        for r in results {
            match r {
                Ok(id) => {
                    created.containers.push(id.clone());
                    ids.push(id);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        check(token, "creating containers")?;
        // The contract: one entry per config, names and ids non-empty and
        // unique. Names are (match_configs); ids are the runtime's.
        let unique: HashSet<&String> = ids.iter().collect();
        if unique.len() != ids.len() || ids.iter().any(String::is_empty) {
            return Err(PodError::Internal(format!(
                "the runtime gave the restored containers ids that are empty or not unique: {ids:?}"
            )));
        }
        let mut restored = Vec::new();
        for ((entry, id), key) in manifest.containers.iter().zip(ids).zip(&keys) {
            self.bind(key, &id)?;
            tracing::info!(container = %entry.name, id = %id, "restore: container created and registered");
            restored.push(RestoredContainer {
                name: entry.name.clone(),
                container_id: id,
            });
        }
        Ok(RestorePodResponse {
            pod_sandbox_id: sandbox,
            restored_containers: restored,
        })
    }

    /// Moves a registration from its key to the container's id (unless
    /// podckpt-runc did at create).
    fn bind(&self, key: &str, id: &str) -> Result<(), PodError> {
        match self.registry.bind_key(key, id) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(PodError::Internal(format!(
                "the restore registration of container {id} (key {key}) vanished"
            ))),
            Err(e) => Err(PodError::io("write registration", self.registry.path(id))(
                e,
            )),
        }
    }

    /// Removes what this call created; the original error is returned,
    /// with what could not be undone attached.
    async fn undo(&self, err: PodError, created: Created) -> PodError {
        let mut cri = self.cri.clone();
        let within = self.undo_call_timeout;
        let mut failed = Vec::new();
        for key in &created.keys {
            if let Err(e) = self.registry.remove_key(key) {
                failed.push(format!("registration under key {key}: {e}"));
            }
        }
        // A restored container is running (CRIU restored it at create).
        // RemoveContainer on CRI-O stops it first with a 10 s grace, one
        // container after another, and the shell of a typical workload
        // ignores SIGTERM as PID 1: a 3-container undo took 30 s. Nothing
        // here was ever handed to the caller, so there is nothing to let
        // finish: each is killed outright (StopContainer with timeout 0)
        // and removed, all of them side by side.
        for id in &created.containers {
            if let Err(e) = self.registry.remove(id) {
                failed.push(format!("registration of {id}: {e}"));
            }
        }
        let removals = created.containers.iter().map(|id| {
            let mut cri = self.cri.clone();
            async move {
                // A stop that fails (the container never ran) is not an
                // error; the removal that follows says what is left.
                let _ = bounded(
                    within,
                    cri.runtime.stop_container(StopContainerRequest {
                        container_id: id.clone(),
                        timeout: 0,
                    }),
                )
                .await;
                bounded(
                    within,
                    cri.runtime.remove_container(RemoveContainerRequest {
                        container_id: id.clone(),
                    }),
                )
                .await
                .map_err(|e| format!("RemoveContainer {id}: {e}"))
            }
        });
        for r in futures_util::future::join_all(removals).await {
            if let Err(e) = r {
                failed.push(e);
            }
        }
        if let Some(id) = &created.sandbox {
            let _ = bounded(
                within,
                cri.runtime.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }),
            )
            .await;
            if let Err(e) = bounded(
                within,
                cri.runtime.remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }),
            )
            .await
            {
                failed.push(format!("RemovePodSandbox {id}: {e}"));
            }
        }
        if failed.is_empty() {
            tracing::warn!(error = %err, sandbox = ?created.sandbox, containers = created.containers.len(), "restore failed: undone");
            err
        } else {
            // What is named here is left in the runtime (or on disk, for
            // registrations, until the next garbage collection).
            tracing::error!(error = %err, sandbox = ?created.sandbox, left = %failed.join("; "), "restore failed: the undo is incomplete");
            PodError::WithCleanup {
                error: Box::new(err),
                cleanup: failed.join("; "),
            }
        }
    }

    async fn check_handler(&self, handler: &str) -> Result<(), PodError> {
        let mut cri = self.cri.clone();
        let status = cri
            .runtime
            .status(StatusRequest { verbose: false })
            .await
            .map_err(|s| PodError::runtime("Status", s))?
            .into_inner();
        // Runtimes that do not report their handlers (containerd 1.6) judge
        // it themselves in RunPodSandbox.
        if !status.runtime_handlers.is_empty()
            && !status.runtime_handlers.iter().any(|h| h.name == handler)
        {
            let known: Vec<_> = status
                .runtime_handlers
                .iter()
                .map(|h| h.name.as_str())
                .collect();
            return Err(PodError::InvalidArgument(format!(
                "unknown runtime_handler {handler:?} (the runtime has {known:?})"
            )));
        }
        Ok(())
    }

    async fn container(
        &self,
        req: CreateContainerRequest,
        raw: Option<Bytes>,
        token: CancellationToken,
    ) -> Result<CreateContainerResponse, PodError> {
        self.criu_ready()?;
        let mut req = match raw {
            Some(bytes) => Preserved::decode(bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "request bytes do not decode: re-encoding it");
                Preserved::from_message(req)
            }),
            None => Preserved::from_message(req),
        };
        let config = req
            .msg
            .config
            .as_mut()
            .ok_or_else(|| PodError::InvalidArgument("config is required".into()))?;
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let image = config.image.get_or_insert_with(Default::default);
        let archive = PathBuf::from(&image.image);
        // Not followed if a link: the extraction refuses it by name.
        if std::fs::symlink_metadata(&archive).is_err() {
            return Err(PodError::NotFound(format!(
                "checkpoint archive {} does not exist",
                archive.display()
            )));
        }
        // No manifest declares the size: the extraction stops at the first
        // entry past the limits or the free space, not after writing it all.
        let limits = self.unlisted_limits()?;
        let mut work = self.new_work_dir()?;
        self.extract(archive.clone(), work.path.clone(), None, limits, &token)
            .await?;
        let recorded = recorded_image_of(&work.path)?;
        check(&token, "extracting the checkpoint")?;
        let caller = req
            .msg
            .config
            .as_ref()
            .and_then(|c| c.annotations.get(BASE_IMAGE_ANNOTATION).cloned());
        let (base, shown) = self
            .base_image_on_node(caller.as_deref(), &recorded, &name)
            .await?;
        let key = random_id();
        if let Some(c) = req.msg.config.as_mut() {
            if let Some(image) = c.image.as_mut() {
                image.image = base.clone();
                // The archive's path is not an image anyone can verify.
                image.user_specified_image = shown;
            }
            c.annotations
                .insert(RESTORE_KEY_ANNOTATION.to_owned(), key.clone());
        }
        let reg = Registration {
            container_id: String::new(),
            name,
            pod_sandbox_id: req.msg.pod_sandbox_id.clone(),
            work_dir: work.path.clone(),
            container_dir: work.path.clone(),
            devshm_dir: None,
            tcp_established: false,
            file_locks: false,
            ext_unix_sk: false,
            stage: Stage::Pending,
            created_unix_ms: now_ms(),
            wait_groups: vec![],
            lazy_pages: false,
            key: key.clone(),
        };
        // Registered before the create: see create_pod.
        self.registry.store_keyed(&reg).map_err(PodError::io(
            "write registration",
            self.registry.key_path(&key),
        ))?;
        let created = raw::unary::<CreateContainerResponse>(
            self.cri.channel.clone(),
            CREATE_CONTAINER,
            req.encode(),
        )
        .await
        .map_err(|s| PodError::runtime("CreateContainer", s));
        let id = match created {
            Ok(r) => r.container_id,
            Err(err) => {
                let _ = self.registry.remove_key(&key);
                return Err(err);
            }
        };
        if let Err(err) = self.bind(&key, &id) {
            return Err(self
                .undo(
                    err,
                    Created {
                        sandbox: None,
                        containers: vec![id],
                        keys: vec![key],
                    },
                )
                .await);
        }
        work.keep = true;
        tracing::info!(id = %id, image = %base, archive = %archive.display(), "container created from checkpoint and registered for restore");
        Ok(CreateContainerResponse { container_id: id })
    }
}

impl Inner {
    /// The base image of a container restored from a container archive:
    /// an image already on this node, never a name taken from the archive
    /// (a tag in `config.dump` is whatever its author wrote; pulling or
    /// tagging by it is the image-poisoning class of CVE-2026-50195). It is
    /// the caller's `io.podckpt.base-image` annotation if set, else the
    /// image the archive records by content (`rootfsImageRef`, an image id
    /// or digest), looked up in the node's store. Nothing is pulled,
    /// imported or tagged. Returns the image id to create from and the
    /// reference to show as the user's.
    async fn base_image_on_node(
        &self,
        caller: Option<&str>,
        recorded: &RecordedImage,
        container: &str,
    ) -> Result<(String, String), PodError> {
        let lookup = match (caller, recorded.reference.as_deref()) {
            (Some(c), _) => c.to_owned(),
            (None, Some(r)) => r.to_owned(),
            (None, None) => {
                return Err(PodError::FailedPrecondition(format!(
                    "the checkpoint of container {container} names its base image only by the tag {:?}, which is not trusted; set the annotation {BASE_IMAGE_ANNOTATION} to the image to restore on",
                    recorded.name.as_deref().unwrap_or_default()
                )))
            }
        };
        let mut cri = self.cri.clone();
        let image = cri
            .image
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: lookup.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(|s| PodError::runtime("ImageStatus", s))?
            .into_inner()
            .image
            .ok_or_else(|| {
                PodError::FailedPrecondition(format!(
                    "base image {lookup} of container {container} is not on this node; a restore from an archive never pulls or imports an image: pull it first"
                ))
            })?;
        if let (Some(_), Some(r)) = (caller, recorded.reference.as_deref()) {
            if image.id != r && !image.repo_digests.iter().any(|d| d == r) {
                return Err(PodError::FailedPrecondition(format!(
                    "base image {lookup} of container {container} is {}, but the checkpoint was taken on {r}",
                    image.id
                )));
            }
        }
        let shown = caller
            .map(str::to_owned)
            .or_else(|| image.repo_tags.first().cloned())
            .unwrap_or_else(|| image.id.clone());
        Ok((image.id, shown))
    }
}

/// An unregistered work dir younger than this may belong to a restore in
/// progress in another podckptd (tests, a second instance): left alone.
const ORPHAN_WORK_DIR_AGE: Duration = Duration::from_secs(30 * 60);

/// How long one pull of a missing base image may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// The caller's annotation naming the base image of a container created
/// from a checkpoint archive (see `Restorer::base_image_on_node`).
pub const BASE_IMAGE_ANNOTATION: &str = "io.podckpt.base-image";

/// What a container archive's `config.dump` says of its base image.
#[derive(Debug, Default, PartialEq)]
pub struct RecordedImage {
    /// `rootfsImageRef`: an image id or digest (content-addressed).
    pub reference: Option<String>,
    /// `rootfsImageName` or `rootfsImage`: a tag, for messages only.
    pub name: Option<String>,
}

/// Reads [`RecordedImage`] from an extracted container archive.
pub fn recorded_image_of(dir: &Path) -> Result<RecordedImage, PodError> {
    let path = dir.join("config.dump");
    let data = std::fs::read(&path).map_err(|e| {
        PodError::InvalidArgument(format!(
            "not a container checkpoint archive: {}: {e}",
            path.display()
        ))
    })?;
    let v: serde_json::Value = serde_json::from_slice(&data)
        .map_err(|_| PodError::InvalidArgument(format!("{} is not valid JSON", path.display())))?;
    let field = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    // Only content addresses count as references: anything else is a tag.
    let reference = field("rootfsImageRef").filter(|r| r.contains("sha256:"));
    Ok(RecordedImage {
        reference,
        name: field("rootfsImageName").or_else(|| field("rootfsImage")),
    })
}

const RUN_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/RunPodSandbox";
const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";

/// RestorePodRequest's field numbers (upstream's).
const RESTORE_CONFIG: u32 = 2;
const RESTORE_CONTAINER_CONFIGS: u32 = 5;

/// The request's sandbox and container configs, each with the bytes the
/// caller sent for it when `raw` has them, so that the runtime gets every
/// field the caller set, known to podckptd or not.
fn preserved_configs(
    req: &RestorePodRequest,
    raw: Option<&Bytes>,
) -> Result<(Preserved<PodSandboxConfig>, Vec<Preserved<ContainerConfig>>), PodError> {
    let sandbox = req.config.clone().ok_or_else(|| {
        PodError::InvalidArgument("config (the new sandbox's) is required".into())
    })?;
    let typed = || {
        (
            Preserved::from_message(sandbox.clone()),
            req.container_configs
                .iter()
                .cloned()
                .map(Preserved::from_message)
                .collect::<Vec<_>>(),
        )
    };
    let Some(raw) = raw else {
        return Ok(typed());
    };
    let fields = wire::fields(raw)
        .map_err(|e| PodError::InvalidArgument(format!("RestorePodRequest: {e}")))?;
    let of = |n: u32| -> Vec<Bytes> {
        fields
            .iter()
            .filter(|f| f.number == n && f.wire_type == 2)
            .map(|f| raw.slice_ref(f.value))
            .collect()
    };
    let (sandboxes, containers) = (of(RESTORE_CONFIG), of(RESTORE_CONTAINER_CONFIGS));
    // A message split over several occurrences (merged on decoding) is
    // rare enough to be passed on as decoded.
    if sandboxes.len() != 1 || containers.len() != req.container_configs.len() {
        return Ok(typed());
    }
    let decode_err =
        |e: prost::DecodeError| PodError::InvalidArgument(format!("RestorePodRequest: {e}"));
    let sandbox = Preserved::decode(sandboxes[0].clone()).map_err(decode_err)?;
    let containers = containers
        .into_iter()
        .map(|b| Preserved::decode(b).map_err(decode_err))
        .collect::<Result<_, _>>()?;
    Ok((sandbox, containers))
}

/// A RunPodSandboxRequest around an encoded sandbox config.
fn run_pod_sandbox_request(config: &[u8], handler: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(config.len() + handler.len() + 16);
    prost::encoding::bytes::encode(1, &config.to_vec(), &mut out);
    if !handler.is_empty() {
        prost::encoding::string::encode(2, &handler.to_owned(), &mut out);
    }
    out
}

/// A CreateContainerRequest around an encoded container config and
/// sandbox config.
fn create_container_request(sandbox_id: &str, config: &[u8], sandbox_config: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(config.len() + sandbox_config.len() + 96);
    prost::encoding::string::encode(1, &sandbox_id.to_owned(), &mut out);
    prost::encoding::bytes::encode(2, &config.to_vec(), &mut out);
    prost::encoding::bytes::encode(3, &sandbox_config.to_vec(), &mut out);
    out
}

/// The caller's configs in the manifest's container order; names must be
/// exactly the checkpoint's.
fn match_configs(
    manifest: &PodManifest,
    configs: Vec<Preserved<ContainerConfig>>,
) -> Result<Vec<Preserved<ContainerConfig>>, PodError> {
    let mut by_name: HashMap<String, Preserved<ContainerConfig>> = HashMap::new();
    for c in configs {
        let name = c
            .msg
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        if name.is_empty() {
            return Err(PodError::InvalidArgument(
                "every container_config needs metadata.name".into(),
            ));
        }
        if by_name.contains_key(&name) {
            return Err(PodError::InvalidArgument(format!(
                "container_configs names {name:?} twice"
            )));
        }
        by_name.insert(name, c);
    }
    let wanted: Vec<&str> = manifest
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|n| !by_name.contains_key(*n))
        .collect();
    let extra: Vec<&str> = by_name
        .keys()
        .map(String::as_str)
        .filter(|n| !wanted.contains(n))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(PodError::InvalidArgument(format!(
            "container_configs must name exactly the checkpoint's containers {wanted:?}: missing {missing:?}, not in the checkpoint {extra:?}"
        )));
    }
    Ok(wanted.iter().filter_map(|n| by_name.remove(*n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::manifest::ContainerEntry;
    use crate::cri::api::ContainerMetadata;

    fn cfg(name: &str) -> Preserved<ContainerConfig> {
        Preserved::from_message(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            ..Default::default()
        })
    }

    fn manifest(names: &[&str]) -> PodManifest {
        PodManifest {
            containers: names
                .iter()
                .map(|n| ContainerEntry {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn configs_must_match_names_exactly() {
        let m = manifest(&["a", "b"]);
        let got = match_configs(&m, vec![cfg("b"), cfg("a")]).unwrap();
        assert_eq!(got[0].msg.metadata.as_ref().unwrap().name, "a");
        for bad in [
            vec![cfg("a")],
            vec![cfg("a"), cfg("b"), cfg("c")],
            vec![cfg("a"), cfg("a"), cfg("b")],
            vec![cfg("")],
        ] {
            let e = match_configs(&m, bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
    }

    /// What RestorePod sends to CreateContainer keeps what the caller sent
    /// it: binary env values, mount options, the newer CRI fields and a
    /// field number podckptd does not know, beside the image it fills in.
    #[test]
    fn container_configs_reach_create_container_whole() {
        use crate::cri::api::{KeyValue, Mount, Signal};
        use prost::Message;
        let typed = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: String::new(),
                image_ref: "sha256:abc".into(),
                ..Default::default()
            }),
            envs: vec![KeyValue {
                key: "BIN".into(),
                value: vec![0xff, 0xfe, 0x00, b'x'],
            }],
            mounts: vec![Mount {
                container_path: "/data".into(),
                host_path: "/srv/data".into(),
                image_sub_path: "sub/dir".into(),
                mount_options: vec!["noexec".into(), "nodev".into(), "nosuid".into()],
                ..Default::default()
            }],
            stop_signal: Signal::Sigusr1 as i32,
            ..Default::default()
        };
        // A field from the future, at the top and inside the mount.
        let mut mount = typed.mounts[0].encode_to_vec();
        prost::encoding::string::encode(900, &"mount-future".to_string(), &mut mount);
        let mut config = Vec::new();
        for f in wire::fields(&typed.encode_to_vec()).unwrap() {
            if f.number == 7 {
                prost::encoding::bytes::encode(7, &mount, &mut config);
            } else {
                config.extend_from_slice(f.raw);
            }
        }
        prost::encoding::string::encode(4242, &"future".to_string(), &mut config);
        let sandbox = PodSandboxConfig {
            hostname: "h".into(),
            ..Default::default()
        };
        let mut sandbox_raw = sandbox.encode_to_vec();
        prost::encoding::uint64::encode(777, &7, &mut sandbox_raw);
        let mut raw = Vec::new();
        prost::encoding::string::encode(1, &"/ckpt".to_string(), &mut raw);
        prost::encoding::bytes::encode(RESTORE_CONFIG, &sandbox_raw, &mut raw);
        prost::encoding::bytes::encode(RESTORE_CONTAINER_CONFIGS, &config, &mut raw);
        let raw = Bytes::from(raw);
        let req = RestorePodRequest::decode(raw.clone()).expect("binary env decodes");
        assert_eq!(
            req.container_configs[0].envs[0].value,
            [0xff, 0xfe, 0, b'x']
        );

        let (sb, configs) = preserved_configs(&req, Some(&raw)).unwrap();
        let mut configs = match_configs(&manifest(&["app"]), configs).unwrap();
        configs[0].msg.image.as_mut().unwrap().image = "localhost/app:1".into();
        let out = create_container_request("sb1", &configs[0].encode(), &sb.encode());
        let back = CreateContainerRequest::decode(&out[..]).unwrap();
        let c = back.config.as_ref().unwrap();
        assert_eq!(back.pod_sandbox_id, "sb1");
        assert_eq!(c.image.as_ref().unwrap().image, "localhost/app:1");
        assert_eq!(c.image.as_ref().unwrap().image_ref, "sha256:abc");
        assert_eq!(c.envs, typed.envs);
        assert_eq!(c.mounts, typed.mounts);
        assert_eq!(c.stop_signal, Signal::Sigusr1 as i32);
        let top = wire::fields(&out).unwrap();
        let cfg_bytes = top.iter().find(|f| f.number == 2).unwrap().value;
        let cfg_fields = wire::fields(cfg_bytes).unwrap();
        assert!(cfg_fields
            .iter()
            .any(|f| f.number == 4242 && f.value == b"future"));
        let m = cfg_fields.iter().find(|f| f.number == 7).unwrap();
        assert!(wire::fields(m.value)
            .unwrap()
            .iter()
            .any(|f| f.number == 900 && f.value == b"mount-future"));
        let sb_bytes = top.iter().find(|f| f.number == 3).unwrap().value;
        assert_eq!(sb_bytes, &sandbox_raw[..]);
        let run = run_pod_sandbox_request(&sb.encode(), "");
        assert_eq!(wire::fields(&run).unwrap()[0].value, &sandbox_raw[..]);
    }

    #[test]
    fn options() {
        let defaults = parse_restore_options(&HashMap::new()).unwrap();
        assert_eq!(defaults.pull, PullPolicy::IfMissing);
        assert!(!defaults.lazy_pages);
        let o = [
            ("pull-image".to_string(), "never".to_string()),
            ("lazy-pages".to_string(), "true".to_string()),
        ]
        .into();
        let parsed = parse_restore_options(&o).unwrap();
        assert_eq!(parsed.pull, PullPolicy::Never);
        assert!(parsed.lazy_pages);
        let o = [("lazy-pages".to_string(), "yes".to_string())].into();
        let err = parse_restore_options(&o).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("lazy-pages"), "{err}");
        let o = [("tcp-close".to_string(), "true".to_string())].into();
        assert!(parse_restore_options(&o)
            .unwrap_err()
            .to_string()
            .contains("tcp-close"));
    }

    #[test]
    fn recorded_image_counts_only_content_addresses() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.dump"),
            r#"{"rootfsImageName":"localhost/app:1","rootfsImageRef":"sha256:abc"}"#,
        )
        .unwrap();
        assert_eq!(
            recorded_image_of(d.path()).unwrap(),
            RecordedImage {
                reference: Some("sha256:abc".into()),
                name: Some("localhost/app:1".into())
            }
        );
        std::fs::write(
            d.path().join("config.dump"),
            r#"{"rootfsImageName":"docker.io/library/busybox:latest","rootfsImageRef":"docker.io/library/busybox:latest"}"#,
        )
        .unwrap();
        assert_eq!(recorded_image_of(d.path()).unwrap().reference, None);
        std::fs::write(d.path().join("config.dump"), "secret-bytes").unwrap();
        let err = recorded_image_of(d.path()).unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    /// A runtime that accepts connections and never answers (a hung
    /// containerd): each undo call gives up after `--undo-call-timeout`,
    /// and the error names what was left.
    #[tokio::test]
    async fn an_undo_against_a_runtime_that_never_answers_ends_and_says_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("hung.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let r = Restorer::new(
            CriClient::new(&sock),
            dir.path().join("restore"),
            Ok("4.2".into()),
            Limits::default(),
            crate::metrics::Metrics::new(),
        )
        .with_undo_call_timeout(Duration::from_millis(200));
        let created = Created {
            sandbox: Some("sb-1".into()),
            containers: vec!["ctr-1".into(), "ctr-2".into()],
            keys: vec![],
        };
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            r.inner.undo(PodError::Internal("boom".into()), created),
        )
        .await
        .expect("the undo waited on the runtime for ever");
        let PodError::WithCleanup { error, cleanup } = err else {
            panic!("the undo reported nothing left: {err}");
        };
        assert!(matches!(*error, PodError::Internal(_)), "{error}");
        for left in [
            "RemoveContainer ctr-1",
            "RemoveContainer ctr-2",
            "RemovePodSandbox sb-1",
        ] {
            assert!(cleanup.contains(left), "{left} not in {cleanup}");
        }
        assert!(cleanup.contains("--undo-call-timeout"), "{cleanup}");
    }

    #[tokio::test]
    async fn exit_waits_for_background_extractions_within_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let r = Restorer::new(
            CriClient::new(dir.path().join("no-runtime.sock")),
            dir.path().join("restore"),
            Ok("4.2".into()),
            Limits::default(),
            crate::metrics::Metrics::new(),
        );
        assert!(r.finish_extractions(Duration::ZERO).await, "none running");
        let running = || Running {
            token: CancellationToken::new(),
            containers: vec![],
        };
        let work = dir.path().join("restore/work/a");
        r.inner
            .extractions
            .lock()
            .unwrap()
            .insert(work.clone(), running());
        let map = r.inner.extractions.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            map.lock().unwrap().remove(&work);
        });
        assert!(r.finish_extractions(Duration::from_secs(5)).await);
        r.inner
            .extractions
            .lock()
            .unwrap()
            .insert(dir.path().join("restore/work/b"), running());
        let t = std::time::Instant::now();
        assert!(!r.finish_extractions(Duration::from_millis(100)).await);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
