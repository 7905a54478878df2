//! CheckpointPod and CheckpointContainer: one consistent cut of the
//! selected containers, packed into one archive.
//!
//! Order of work, and why:
//! 1. validate everything and inspect every container before touching any
//!    (bad input changes nothing);
//! 2. persist a marker listing what is about to be frozen and written, so
//!    a podckptd that dies mid-checkpoint thaws and cleans on restart;
//! 3. freeze EVERY container, then dump them in parallel (bounded) with
//!    CRIU, capture each rootfs diff and the pod's /dev/shm while still
//!    frozen (so files and memory are from the same instant), thaw all;
//! 4. pack from the staging dir into one archive (temp name + rename).
//!
//! Everything acquired has an owner that undoes it on every path: the
//! freeze guard thaws on drop (errors, cancellation, panics), the staging
//! dir and the temporary archive are removed on drop, the marker last.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::archive::manifest::{
    ContainerEntry, FileEntry, HostInfo, PodManifest, SandboxEntry, Timings, DEVSHM_DIR, MANIFEST,
    POD_ARCHIVE_PLAIN, POD_ARCHIVE_ZSTD, POD_FORMAT, POD_FORMAT_VERSION,
};
use crate::archive::writer::temp_path_for;
use crate::archive::{ArchiveWriter, Compression};
use crate::cri::api::{CheckpointContainerRequest, CheckpointPodRequest, VersionRequest};
use crate::cri::client::CriClient;
use crate::criu::rpc::{CriuReq, CriuReqType};
use crate::criu::{CriuConfig, CriuError, Session};
use crate::node::cgroup::{self, Freezer};
use crate::node::rootfs_diff;
use crate::node::safe_dir::TrustedDir;
use crate::node::tree::copy_tree_into;
use crate::pod::seen::SeenConfigs;

use super::criu_opts::{dump_opts, DumpPlan, DUMP_LOG, STATS_DUMP};
use super::error::PodError;
use super::guardian::Guardian;
use super::inspect::{self, ContainerFacts, SandboxFacts};
use super::options::CheckpointOptions;

/// How long freezing one cgroup may take before the checkpoint is given up.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the per-checkpoint staging dirs (followed by random digits).
const STAGING_PREFIX: &str = "podckpt-staging-";
/// Directory of in-flight markers under the state dir.
const MARKER_DIR: &str = "inflight";

/// Settings of the checkpoint engine.
#[derive(Clone, Debug)]
pub struct Settings {
    /// CRIU binary or service.
    pub criu: CriuConfig,
    /// Where CRIU images are staged; None picks /dev/shm when memory allows,
    /// else `<state_dir>/staging`.
    pub staging_dir: Option<PathBuf>,
    /// podckptd's state dir (markers).
    pub state_dir: PathBuf,
    /// CRIU dumps running at once, node-wide.
    pub max_parallel_dumps: usize,
    /// zstd worker threads.
    pub zstd_workers: u32,
    /// Touch (and free) as much memory as the images will take before the
    /// freeze, when staging in memory (see [`crate::node::memory`]).
    pub warm_staging: bool,
    /// The binary run as each checkpoint's guardian (podckptd itself; see
    /// [`super::guardian`]).
    pub guardian_exe: PathBuf,
    /// The configs the kubelet sent through podckptd, for runtimes whose
    /// status lacks them.
    pub seen: SeenConfigs,
}

/// Why CRIU cannot be used, found at start; checkpoint calls then fail with
/// FailedPrecondition while the proxy keeps working.
pub type CriuReadiness = Result<String, String>;

/// The checkpoint engine; cheap to clone.
#[derive(Clone)]
pub struct Checkpointer {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    cri: CriClient,
    criu: CriuReadiness,
    dump_slots: Arc<Semaphore>,
    busy: Mutex<HashSet<String>>,
}

/// What a successful pod checkpoint produced.
#[derive(Clone, Debug)]
pub struct PodSummary {
    /// The archive.
    pub archive: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// First freeze to last thaw.
    pub frozen_window: Duration,
    /// The whole call.
    pub total: Duration,
}

/// Claim on a sandbox: one checkpoint per pod at a time.
struct Busy<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Checkpointer {
    /// An engine talking to the runtime through `cri`.
    pub fn new(settings: Settings, cri: CriClient, criu: CriuReadiness) -> Self {
        let slots = settings.max_parallel_dumps.max(1);
        Self {
            inner: Arc::new(Inner {
                settings,
                cri,
                criu,
                dump_slots: Arc::new(Semaphore::new(slots)),
                busy: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The runtime's CRI client.
    pub fn cri(&self) -> &CriClient {
        &self.inner.cri
    }

    /// The configs seen on their way to the runtime.
    pub fn seen(&self) -> &SeenConfigs {
        &self.inner.settings.seen
    }

    /// The CRIU version in use, or why CRIU is unusable.
    pub fn criu_readiness(&self) -> &CriuReadiness {
        &self.inner.criu
    }

    /// Serves CheckpointPod. `deadline` is the caller's gRPC deadline,
    /// required: the contract has the caller set one, and a checkpoint
    /// that may run for ever holds the pod's claim (and memory) for ever.
    pub async fn checkpoint_pod(
        &self,
        req: CheckpointPodRequest,
        deadline: Option<Deadline>,
    ) -> Result<PodSummary, PodError> {
        let deadline = require_deadline(deadline, "CheckpointPod")?;
        let inner = self.inner.clone();
        supervise(
            Some(deadline),
            move |token| async move { inner.pod(req, token).await },
            discard_archive(),
        )
        .await
    }

    /// Serves CheckpointContainer. `timeout` (seconds, 0 = none) and the
    /// gRPC deadline both bound it; the shorter wins.
    pub async fn checkpoint_container(
        &self,
        req: CheckpointContainerRequest,
        deadline: Option<Deadline>,
    ) -> Result<PodSummary, PodError> {
        let timeout =
            (req.timeout > 0).then(|| Deadline::from_now(Duration::from_secs(req.timeout as u64)));
        let deadline = match (deadline, timeout) {
            (Some(a), Some(b)) => Some(if a.arrived + a.remaining <= b.arrived + b.remaining {
                a
            } else {
                b
            }),
            (a, b) => a.or(b),
        };
        let inner = self.inner.clone();
        supervise(
            deadline,
            move |token| async move { inner.container(req, token).await },
            discard_archive(),
        )
        .await
    }
}

/// InvalidArgument for a call without the deadline its contract requires.
pub(crate) fn require_deadline(
    deadline: Option<Deadline>,
    rpc: &str,
) -> Result<Deadline, PodError> {
    deadline.ok_or_else(|| {
        PodError::InvalidArgument(format!(
            "{rpc} needs a deadline (grpc-timeout): the caller sets one, and the call is refused without"
        ))
    })
}

/// Removes an archive whose caller was answered with an error before it
/// was complete.
fn discard_archive() -> Discard<PodSummary> {
    Box::new(|summary: PodSummary| {
        Box::pin(async move {
            let path = summary.archive;
            let removed = tokio::task::spawn_blocking({
                let path = path.clone();
                move || fs::remove_file(&path)
            })
            .await;
            match removed {
                Ok(Ok(())) => {
                    tracing::warn!(archive = %path.display(), "removed an archive completed after its caller was answered")
                }
                Ok(Err(err)) => {
                    tracing::error!(archive = %path.display(), %err, "could not remove an archive completed after its caller was answered")
                }
                Err(err) => tracing::error!(%err, "archive removal task failed"),
            }
        })
    })
}

/// The caller's deadline as podckptd saw it: the time left (its
/// `grpc-timeout`) when the request arrived. Measured from the arrival, not
/// from when the handler runs, so that time spent reading the request counts.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    /// When the request arrived.
    pub arrived: Instant,
    /// The caller's time left at that instant.
    pub remaining: Duration,
}

/// Share of the caller's deadline kept free at its end for the answer to
/// travel back before the caller's own timer fires (bounded below by
/// [`ANSWER_MARGIN_MIN`], above by [`ANSWER_MARGIN_MAX`]).
pub const ANSWER_MARGIN_DIVISOR: u32 = 5;
/// Least time kept for the answer's way back. 10 ms was not enough on a
/// busy 2-core node: a 50 ms RestorePod's answer, sent on time, reached
/// the caller 57 ms after it asked (the request's way in counts too).
pub const ANSWER_MARGIN_MIN: Duration = Duration::from_millis(25);
/// Most time kept for the answer's way back.
pub const ANSWER_MARGIN_MAX: Duration = Duration::from_secs(1);
/// Share of the caller's deadline given to the undo of cancelled work
/// before the answer (bounded by [`UNDO_BUDGET_MIN`], [`UNDO_BUDGET_MAX`]).
/// An undo that takes longer goes on after the answer.
pub const UNDO_BUDGET_DIVISOR: u32 = 5;
/// Least time given to the undo before answering.
pub const UNDO_BUDGET_MIN: Duration = Duration::from_millis(5);
/// Most time given to the undo before answering.
pub const UNDO_BUDGET_MAX: Duration = Duration::from_secs(5);

impl Deadline {
    /// A deadline of `remaining` from now.
    pub fn from_now(remaining: Duration) -> Self {
        Self {
            arrived: Instant::now(),
            remaining,
        }
    }

    /// When the work is cancelled, and when the caller is answered at the
    /// latest: the answer leaves a margin before the caller's deadline,
    /// and the cancellation an undo budget before the answer.
    fn schedule(&self) -> (Instant, Instant) {
        let limit = self.remaining;
        let margin = (limit / ANSWER_MARGIN_DIVISOR).clamp(ANSWER_MARGIN_MIN, ANSWER_MARGIN_MAX);
        let undo = (limit / UNDO_BUDGET_DIVISOR).clamp(UNDO_BUDGET_MIN, UNDO_BUDGET_MAX);
        let answer_at = self.arrived + limit.saturating_sub(margin);
        let cancel_at = self.arrived + limit.saturating_sub(margin + undo);
        (cancel_at, answer_at)
    }
}

/// What to do with a result that completed after the caller was answered
/// with an error (or went away): the caller will never see it, so it must
/// not stay (an archive nobody asked for any more, a sandbox nobody runs).
pub(crate) type Discard<T> = Box<dyn FnOnce(T) -> BoxFuture<'static, ()> + Send>;

/// The work's task while nobody has its result yet. Dropped unanswered
/// (the caller went away, or the deadline answer went out first), it
/// cancels the work and lets a background task wait for it and discard a
/// result that completes anyway.
struct Pending<T: Send + 'static> {
    task: Option<JoinHandle<Result<T, PodError>>>,
    discard: Option<Discard<T>>,
    token: CancellationToken,
}

impl<T: Send + 'static> Pending<T> {
    /// The work's result; nothing is left to discard.
    fn take(&mut self, joined: Result<Result<T, PodError>, JoinError>) -> Result<T, PodError> {
        self.task = None;
        self.discard = None;
        joined.map_err(|join| PodError::Internal(format!("task failed: {join}")))?
    }
}

impl<T: Send + 'static> Drop for Pending<T> {
    fn drop(&mut self) {
        let (Some(task), Some(discard)) = (self.task.take(), self.discard.take()) else {
            return;
        };
        self.token.cancel();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            match task.await {
                Ok(Ok(done)) => {
                    tracing::warn!(
                        "work finished after its caller was answered; discarding its result"
                    );
                    discard(done).await;
                }
                Ok(Err(err)) => {
                    tracing::info!(error = %err, "abandoned work is undone");
                }
                Err(join) => tracing::error!(error = %join, "abandoned work's task failed"),
            }
        });
    }
}

/// Runs `work` as its own task so that it always finishes its cleanup:
/// when the caller goes away (the handler future is dropped) or the
/// deadline nears, the token is cancelled and the task undoes what it did.
///
/// With a deadline the caller gets DeadlineExceeded from podckptd before its
/// own timer fires: the work is cancelled an undo budget before the answer,
/// the answer leaves a margin before the caller's deadline, and an undo
/// still running then goes on in the background. Once the caller has been
/// answered with an error, a result that still completes is handed to
/// `discard`, never kept.
pub(crate) async fn supervise<T, F, Fut>(
    deadline: Option<Deadline>,
    work: F,
    discard: Discard<T>,
) -> Result<T, PodError>
where
    T: Send + 'static,
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<T, PodError>> + Send + 'static,
{
    let token = CancellationToken::new();
    let mut pending = Pending {
        task: Some(tokio::spawn(work(token.clone()))),
        discard: Some(discard),
        token: token.clone(),
    };
    let Some(deadline) = deadline else {
        let joined = match pending.task.as_mut() {
            Some(task) => task.await,
            None => return Err(PodError::Internal("no task".into())),
        };
        return pending.take(joined);
    };
    let (cancel_at, answer_at) = deadline.schedule();
    let task = pending
        .task
        .as_mut()
        .ok_or_else(|| PodError::Internal("no task".into()))?;
    if let Ok(joined) = tokio::time::timeout_at(cancel_at.into(), &mut *task).await {
        return pending.take(joined);
    }
    token.cancel();
    tracing::info!(remaining = ?deadline.remaining, "deadline near: cancelling");
    match tokio::time::timeout_at(answer_at.into(), &mut *task).await {
        // Finished before the answer: the work is whole (or undone).
        Ok(joined) => pending.take(joined).map_err(deadline_error),
        // The undo goes on in the task; `pending` is dropped unanswered and
        // discards whatever the task still produces.
        Err(_) => {
            tracing::info!(
                late_by = ?Instant::now().saturating_duration_since(answer_at),
                "answering DeadlineExceeded; the undo goes on in the background"
            );
            drop(pending);
            Err(PodError::DeadlineExceeded { during: "the call" })
        }
    }
}

/// FailedPrecondition saying why `what` cannot run when CRIU is unusable.
pub(crate) fn criu_ready(criu: &CriuReadiness, what: &str) -> Result<(), PodError> {
    criu.as_ref().map(|_| ()).map_err(|why| {
        PodError::FailedPrecondition(format!("{what} is unavailable on this node: {why}"))
    })
}

/// The error of work cancelled at the deadline, reported as the deadline.
/// Cancelling kills CRIU, which can surface as CRIU's own error before the
/// work sees the token: the cause is still the deadline. What could not be
/// undone is kept.
fn deadline_error(err: PodError) -> PodError {
    match err {
        PodError::Cancelled { during } => PodError::DeadlineExceeded { during },
        PodError::WithCleanup { error, cleanup } => PodError::WithCleanup {
            error: Box::new(deadline_error(*error)),
            cleanup,
        },
        other => {
            tracing::debug!(error = %other, "failed while cancelled at the deadline");
            PodError::DeadlineExceeded { during: "the call" }
        }
    }
}

/// Fails with Cancelled if the token fired.
pub(crate) fn check(token: &CancellationToken, during: &'static str) -> Result<(), PodError> {
    if token.is_cancelled() {
        Err(PodError::Cancelled { during })
    } else {
        Ok(())
    }
}

/// Paths with `..` are refused outright: what they name depends on links.
fn refuse_parent_dirs(what: &str, p: &Path) -> Result<(), PodError> {
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(PodError::InvalidArgument(format!(
            "{what} {:?} must not contain '..'",
            p.display().to_string()
        )));
    }
    Ok(())
}

/// Validates CheckpointPod's output_path: absolute, an existing empty
/// directory.
fn validate_output_dir(path: &str) -> Result<PathBuf, PodError> {
    let p = Path::new(path);
    if path.is_empty() || !p.is_absolute() {
        return Err(PodError::InvalidArgument(format!(
            "output_path {path:?} must be an absolute path"
        )));
    }
    refuse_parent_dirs("output_path", p)?;
    // Like CRI-O: a link would let whoever planted it choose where the
    // archive (process memory) is written.
    let meta = fs::symlink_metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            PodError::NotFound(format!("output_path {path} does not exist"))
        }
        _ => PodError::Io {
            op: "stat",
            path: p.into(),
            source: e,
        },
    })?;
    if meta.file_type().is_symlink() {
        return Err(PodError::InvalidArgument(format!(
            "output_path {path} is a symbolic link; name the directory itself"
        )));
    }
    if !meta.is_dir() {
        return Err(PodError::InvalidArgument(format!(
            "output_path {path} is not a directory"
        )));
    }
    if fs::read_dir(p)
        .map_err(PodError::io("read", p))?
        .next()
        .is_some()
    {
        return Err(PodError::FailedPrecondition(format!(
            "output_path {path} is not empty"
        )));
    }
    Ok(p.to_path_buf())
}

/// Validates CheckpointContainer's location: an absolute file path in an
/// existing directory; `.tar.zst`/`.tar.zstd` compress, anything else is a
/// plain tar (what crictl and the kubelet read).
fn validate_location(location: &str) -> Result<(PathBuf, Compression), PodError> {
    let p = Path::new(location);
    if location.is_empty() || !p.is_absolute() || p.file_name().is_none() {
        return Err(PodError::InvalidArgument(format!(
            "location {location:?} must be an absolute file path"
        )));
    }
    refuse_parent_dirs("location", p)?;
    let parent = p.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        return Err(PodError::NotFound(format!(
            "directory {} of location does not exist",
            parent.display()
        )));
    }
    if p.is_dir() {
        return Err(PodError::InvalidArgument(format!(
            "location {location} is a directory; name the archive file"
        )));
    }
    if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(PodError::InvalidArgument(format!(
            "location {location} is a symbolic link; refused"
        )));
    }
    let compression = if location.ends_with(".zst") || location.ends_with(".zstd") {
        Compression::Zstd {
            level: super::options::DEFAULT_ZSTD_LEVEL,
            workers: 0,
        }
    } else {
        Compression::None
    };
    Ok((p.to_path_buf(), compression))
}

/// A container selected for the cut, with its node facts.
struct Target {
    facts: ContainerFacts,
    plan: DumpPlan,
    upperdir: Option<PathBuf>,
}

/// What the capture of one container produced in staging.
#[derive(Debug, Default)]
struct Staged {
    dir: PathBuf,
    frozen_at_ns: u64,
    dump_started_ns: u64,
    dump_finished_ns: u64,
    thawed_at_ns: u64,
    images_bytes: u64,
    rootfs_diff_bytes: u64,
    deleted: Vec<String>,
}

impl Inner {
    fn criu_ready(&self) -> Result<(), PodError> {
        criu_ready(&self.criu, "checkpointing")
    }

    fn claim(&self, key: &str) -> Result<Busy<'_>, PodError> {
        let mut set = self
            .busy
            .lock()
            .map_err(|_| PodError::Internal("busy set poisoned".into()))?;
        if !set.insert(key.to_string()) {
            return Err(PodError::FailedPrecondition(format!(
                "a checkpoint of {key} is already running"
            )));
        }
        Ok(Busy {
            set: &self.busy,
            key: key.to_string(),
        })
    }

    async fn pod(
        self: Arc<Self>,
        req: CheckpointPodRequest,
        token: CancellationToken,
    ) -> Result<PodSummary, PodError> {
        let started = Instant::now();
        let options = CheckpointOptions::parse(&req.options)
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        if req.container_ids.is_empty() {
            return Err(PodError::InvalidArgument("container_ids is empty".into()));
        }
        let mut seen = HashSet::new();
        if let Some(dup) = req
            .container_ids
            .iter()
            .find(|id| !seen.insert(id.as_str()))
        {
            return Err(PodError::InvalidArgument(format!(
                "container_ids lists {dup} twice"
            )));
        }
        let out_dir = validate_output_dir(&req.output_path)?;
        self.criu_ready()?;
        let mut cri = self.cri.clone();
        let sandbox = inspect::sandbox(&mut cri, &req.pod_sandbox_id, &self.settings.seen).await?;
        let _busy = self.claim(&sandbox.id)?;
        let mut facts = Vec::with_capacity(req.container_ids.len());
        for id in &req.container_ids {
            check(&token, "inspecting containers")?;
            facts.push(
                inspect::container(&mut cri, id, Some(&sandbox.id), &self.settings.seen).await?,
            );
        }
        let host = self.host_info(&mut cri).await?;
        let dest = out_dir.join(if options.compression.is_some() {
            POD_ARCHIVE_ZSTD
        } else {
            POD_ARCHIVE_PLAIN
        });
        let compression = match options.compression {
            Some(level) => Compression::Zstd {
                level,
                workers: self.settings.zstd_workers,
            },
            None => Compression::None,
        };
        let job = Job {
            sandbox: Some(sandbox),
            facts,
            options,
            host,
            dest,
            compression,
            token,
            prepare: started.elapsed(),
            layout: Layout::Pod,
            permits: self.dump_slots.clone(),
            handle: tokio::runtime::Handle::current(),
        };
        self.clone().run_job(job, started).await
    }

    async fn container(
        self: Arc<Self>,
        req: CheckpointContainerRequest,
        token: CancellationToken,
    ) -> Result<PodSummary, PodError> {
        let started = Instant::now();
        if req.container_id.is_empty() {
            return Err(PodError::InvalidArgument("container_id is empty".into()));
        }
        let (dest, compression) = validate_location(&req.location)?;
        self.criu_ready()?;
        let mut cri = self.cri.clone();
        let facts =
            inspect::container(&mut cri, &req.container_id, None, &self.settings.seen).await?;
        let _busy = self.claim(&facts.sandbox_id)?;
        let host = self.host_info(&mut cri).await?;
        let job = Job {
            sandbox: None,
            facts: vec![facts],
            options: CheckpointOptions::default(),
            host,
            dest,
            compression,
            token,
            prepare: started.elapsed(),
            layout: Layout::Container,
            permits: self.dump_slots.clone(),
            handle: tokio::runtime::Handle::current(),
        };
        self.clone().run_job(job, started).await
    }

    /// What the manifest says about this node and its runtime.
    async fn host_info(&self, cri: &mut CriClient) -> Result<HostInfo, PodError> {
        let version = cri
            .runtime
            .version(VersionRequest::default())
            .await
            .map_err(|status| PodError::runtime("Version", status))?
            .into_inner();
        Ok(HostInfo {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            criu_version: self.criu.clone().unwrap_or_default(),
            runtime_name: version.runtime_name,
            runtime_version: version.runtime_version,
            cgroup: if cgroup::is_unified(Path::new(cgroup::CGROUP_ROOT)) {
                "v2".into()
            } else {
                "v1".into()
            },
        })
    }

    /// Runs the capture and packing off the executor (CRIU calls, freezer
    /// writes and compression all block).
    async fn run_job(self: Arc<Self>, job: Job, started: Instant) -> Result<PodSummary, PodError> {
        let (bytes, frozen_window, archive) =
            tokio::task::spawn_blocking(move || self.capture_and_pack(job))
                .await
                .map_err(|e| PodError::Internal(format!("checkpoint worker: {e}")))??;
        Ok(PodSummary {
            archive,
            bytes,
            frozen_window,
            total: started.elapsed(),
        })
    }

    /// The blocking part: freeze, dump, thaw, pack. Runs on a blocking thread.
    fn capture_and_pack(&self, job: Job) -> Result<(u64, Duration, PathBuf), PodError> {
        let Job {
            sandbox,
            facts,
            options,
            host,
            dest,
            compression,
            token,
            prepare,
            layout,
            permits,
            handle,
        } = job;
        let mut targets = Vec::with_capacity(facts.len());
        for f in facts {
            let (plan, upperdir) = inspect::dump_plan(&f)?;
            targets.push(Target {
                facts: f,
                plan,
                upperdir,
            });
        }
        check(&token, "preparing")?;

        // Staging: tmpfs when the images fit comfortably in free memory.
        let estimate: u64 = targets
            .iter()
            .filter_map(|t| cgroup::memory_usage(t.plan.pid))
            .sum();
        // A fresh directory under an unpredictable name in a verified root;
        // named before it exists so that the marker can list it.
        let (staging_root, setting) = self.staging_root(estimate)?;
        let staging_name =
            TrustedDir::random_name(STAGING_PREFIX).map_err(PodError::unsafe_dir(setting))?;
        let staging_path = staging_root.path().join(&staging_name);

        // The marker: if podckptd dies from here on, the next start thaws
        // these cgroups and removes these files. Created first, so that it
        // is dropped (removed) last, after everything it names is undone.
        let marker = Marker {
            pid: std::process::id(),
            freezers: targets.iter().map(|t| t.plan.freezer.clone()).collect(),
            archive_tmp: temp_path_for(&dest),
            staging: staging_path.clone(),
        };
        // The guardian undoes the same as the marker, but at podckptd's
        // death rather than at its next start. Declared first so that it is
        // dropped last, told "done" only once podckptd has undone it all.
        let marker_path = MarkerFile::path_for(&self.settings.state_dir, &marker)?;
        let mut guardian = Guardian::spawn(&self.settings.guardian_exe, &marker_path, &marker)
            .map_err(|e| PodError::Internal(format!("starting the checkpoint guardian: {e}")))?;
        let marker = MarkerFile::write(&marker_path, &marker)?;
        let staging = StagingDir::create(&staging_root, &staging_name, setting)?;
        let mut warm_time = Duration::ZERO;
        if self.settings.warm_staging && is_tmpfs(&staging.path) {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            match crate::node::memory::warm(&staging.path, estimate, threads) {
                Ok(took) => {
                    warm_time = took;
                    tracing::info!(bytes = estimate, ?took, "staging memory warmed");
                }
                // Only an optimisation: the dump finds out for itself
                // whether the memory is there.
                Err(err) => {
                    tracing::warn!(bytes = estimate, %err, "warming the staging memory failed")
                }
            }
            check(&token, "preparing")?;
        }

        // The cut.
        let freeze_started = Instant::now();
        let mut frozen = FrozenSet::default();
        let mut staged: Vec<Staged> = Vec::with_capacity(targets.len());
        for (i, t) in targets.iter().enumerate() {
            check(&token, "freezing")?;
            // Told before the freeze: a podckptd killed right after it
            // still has this cgroup thawed. No guardian, no freeze.
            guardian
                .freezing(i)
                .map_err(|e| PodError::Internal(format!("the checkpoint guardian is gone: {e}")))?;
            t.plan
                .freezer
                .freeze(FREEZE_TIMEOUT)
                .map_err(|source| PodError::Freezer {
                    container: t.facts.name.clone(),
                    source,
                })?;
            frozen
                .0
                .push((t.facts.name.clone(), t.plan.freezer.clone()));
            staged.push(Staged {
                dir: staging.path.join(&t.facts.name),
                frozen_at_ns: now_ns(),
                ..Default::default()
            });
        }
        let freeze_time = freeze_started.elapsed();
        tracing::info!(containers = targets.len(), freeze = ?freeze_time, "pod frozen");

        let capture_started = Instant::now();
        let results = self.dump_all(&targets, &mut staged, &options, &token, &permits, &handle);
        let devshm = match (
            &layout,
            targets
                .first()
                .and_then(|t| inspect::devshm_source(&t.facts)),
        ) {
            (Layout::Pod, Some(src)) if results.is_ok() => {
                Some(copy_tree_into(&src, &staging.path.join("devshm"))).transpose()?
            }
            _ => None,
        };
        let thaw_result = frozen.thaw_all();
        let thawed = now_ns();
        if thaw_result.is_ok() {
            if let Err(err) = guardian.thawed() {
                tracing::warn!(%err, "checkpoint guardian gone; the marker remains the fallback");
            }
        }
        let frozen_window = freeze_started.elapsed();
        for s in &mut staged {
            s.thawed_at_ns = thawed;
        }
        tracing::info!(frozen_window = ?frozen_window, "pod thawed");
        match (results, thaw_result) {
            (Ok(()), Ok(())) => {}
            (Err(e), Ok(())) => return Err(e),
            (Ok(()), Err(t)) => return Err(t),
            (Err(e), Err(t)) => {
                return Err(PodError::WithCleanup {
                    error: Box::new(e),
                    cleanup: t.to_string(),
                })
            }
        }
        check(&token, "packing")?;

        let timings = Timings {
            prepare_ms: prepare.as_millis() as u64,
            warm_ms: warm_time.as_millis() as u64,
            freeze_ms: freeze_time.as_millis() as u64,
            frozen_window_ms: frozen_window.as_millis() as u64,
            capture_ms: capture_started.elapsed().as_millis() as u64,
        };
        let items = match layout {
            Layout::Pod => {
                let mut items = Vec::new();
                if devshm.is_some() {
                    items.push(Item::Group);
                    items.push(Item::Tree(DEVSHM_DIR.into(), staging.path.join("devshm")));
                }
                for (t, s) in targets.iter().zip(&staged) {
                    items.push(Item::Group);
                    items.extend(container_items(
                        &format!("containers/{}/", t.facts.name),
                        t,
                        s,
                        &host,
                    )?);
                }
                let manifest = PodManifest {
                    format: POD_FORMAT.into(),
                    version: POD_FORMAT_VERSION,
                    podckpt_version: env!("CARGO_PKG_VERSION").into(),
                    created_unix_ms: staged
                        .first()
                        .map(|s| s.frozen_at_ns / 1_000_000)
                        .unwrap_or_default(),
                    host: host.clone(),
                    sandbox: sandbox
                        .map(|s: SandboxFacts| SandboxEntry {
                            id: s.id,
                            config: s.config,
                            status: Some(s.status),
                        })
                        .unwrap_or_default(),
                    options: options.clone(),
                    containers: targets
                        .iter()
                        .zip(&staged)
                        .map(|(t, s)| ContainerEntry {
                            name: t.facts.name.clone(),
                            id: t.facts.id.clone(),
                            dir: format!("containers/{}", t.facts.name),
                            image: t
                                .facts
                                .status
                                .image
                                .as_ref()
                                .map(|i| i.image.clone())
                                .unwrap_or_default(),
                            image_ref: t.facts.status.image_ref.clone(),
                            config: Some(t.facts.config.clone()),
                            config_source: t.facts.config_source,
                            pid: t.plan.pid,
                            frozen_at_ns: s.frozen_at_ns,
                            dump_started_ns: s.dump_started_ns,
                            dump_finished_ns: s.dump_finished_ns,
                            thawed_at_ns: s.thawed_at_ns,
                            images_bytes: s.images_bytes,
                            rootfs_diff_bytes: s.rootfs_diff_bytes,
                            deleted_files: s.deleted.len(),
                        })
                        .collect(),
                    devshm: devshm.is_some(),
                    timings,
                    files: files_of(&items)?,
                };
                let json = serde_json::to_vec_pretty(&manifest)
                    .map_err(|e| PodError::Internal(format!("manifest: {e}")))?;
                let mut all = vec![Item::Bytes(MANIFEST.into(), json)];
                all.extend(items);
                all
            }
            Layout::Container => {
                let (t, s) = (&targets[0], &staged[0]);
                container_items("", t, s, &host)?
            }
        };
        let pack_started = Instant::now();
        let bytes = pack(&dest, compression, &items, &token)?;
        tracing::info!(archive = %dest.display(), bytes, pack = ?pack_started.elapsed(), "archive written");
        // Success: the staging dir and the marker go (in that order), after
        // the reply: freeing a gigabyte of tmpfs takes a tenth of a second
        // the caller need not wait for. Should podckptd die first, the
        // marker makes the next start remove the staging dir.
        let cleanup = move || {
            drop(staging);
            marker.remove();
            drop(guardian);
        };
        if let Err(err) = std::thread::Builder::new()
            .name("staging-cleanup".into())
            .spawn(cleanup)
        {
            tracing::warn!(%err, "no thread for the staging cleanup; cleaning up before replying");
        }
        Ok((bytes, frozen_window, dest))
    }

    /// The verified directory the staging dir goes in, and the setting
    /// that chose it (named in errors). /dev/shm is shared with every
    /// user: only fresh, randomly named directories are made in it, never
    /// one at a fixed name a user could create first.
    fn staging_root(&self, estimate: u64) -> Result<(TrustedDir, &'static str), PodError> {
        if let Some(dir) = &self.settings.staging_dir {
            let root = TrustedDir::ensure(dir).map_err(PodError::unsafe_dir("--staging-dir"))?;
            return Ok((root, "--staging-dir"));
        }
        let shm = Path::new("/dev/shm");
        // Leave at least half of the available memory to the node, and to
        // podckptd's own cgroup: the staged pages are charged to it (see
        // cgroup::memory_headroom), and a service MemoryMax= must bound
        // podckptd, not make its checkpoints fail.
        let fits = |room: u64| estimate.saturating_mul(2) < room;
        if shm.is_dir()
            && estimate > 0
            && available_memory().is_some_and(fits)
            && cgroup::memory_headroom(std::process::id()).is_none_or(fits)
        {
            let root = TrustedDir::open_shared(shm)
                .map_err(PodError::unsafe_dir("staging in /dev/shm"))?;
            return Ok((root, "staging in /dev/shm"));
        }
        let root = TrustedDir::ensure(&self.settings.state_dir.join("staging"))
            .map_err(PodError::unsafe_dir("--state-dir"))?;
        Ok((root, "--state-dir"))
    }

    /// Dumps every target in parallel, at most `dump_slots` at once
    /// node-wide; rootfs diffs are taken right after each dump, still frozen.
    fn dump_all(
        &self,
        targets: &[Target],
        staged: &mut [Staged],
        options: &CheckpointOptions,
        token: &CancellationToken,
        permits: &Arc<Semaphore>,
        handle: &tokio::runtime::Handle,
    ) -> Result<(), PodError> {
        let results: Vec<Result<(), PodError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = targets
                .iter()
                .zip(staged.iter_mut())
                .map(|(t, s)| {
                    scope.spawn(move || {
                        // A node-wide bound on concurrent CRIU dumps.
                        let _permit = handle
                            .block_on(async { permits.clone().acquire_owned().await })
                            .map_err(|_| PodError::Internal("dump semaphore closed".into()))?;
                        check(token, "dumping")?;
                        self.dump_one(t, s, options, token, handle)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(PodError::Internal("dump worker panicked".into())))
                })
                .collect()
        });
        // Report the first real failure; cancellations of the others are a
        // consequence of it.
        let mut first_err = None;
        for r in results {
            if let Err(e) = r {
                if first_err.is_none() || matches!(first_err, Some(PodError::Cancelled { .. })) {
                    first_err = Some(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn dump_one(
        &self,
        t: &Target,
        s: &mut Staged,
        options: &CheckpointOptions,
        token: &CancellationToken,
        handle: &tokio::runtime::Handle,
    ) -> Result<(), PodError> {
        let name = &t.facts.name;
        let images = s.dir.join("checkpoint");
        let work = s.dir.join("work");
        for d in [&s.dir, &images, &work] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(d)
                .map_err(PodError::io("create", d.clone()))?;
        }
        let descriptors = crate::node::proc::std_descriptors(t.plan.pid).map_err(PodError::io(
            "read descriptors of",
            format!("/proc/{}/fd", t.plan.pid),
        ))?;
        let json =
            serde_json::to_vec(&descriptors).map_err(|e| PodError::Internal(e.to_string()))?;
        fs::write(images.join("descriptors.json"), json)
            .map_err(PodError::io("write", images.join("descriptors.json")))?;
        let images_fd = fs::File::open(&images).map_err(PodError::io("open", images.clone()))?;
        let work_fd = fs::File::open(&work).map_err(PodError::io("open", work.clone()))?;
        let opts = dump_opts(&t.plan, options, images_fd.as_raw_fd(), work_fd.as_raw_fd());
        let req = CriuReq {
            r#type: CriuReqType::Dump as i32,
            opts: Some(opts),
            ..Default::default()
        };

        let criu_err = |source: CriuError| match source {
            CriuError::Cancelled => PodError::Cancelled { during: "dumping" },
            source => PodError::Criu {
                op: "dump",
                container: name.clone(),
                source: Box::new(source),
            },
        };
        let mut session = Session::open(&self.settings.criu).map_err(criu_err)?;
        session.set_log_path(work.join(DUMP_LOG));
        // Cancellation (deadline, client gone) interrupts CRIU at once.
        let canceller = session.canceller();
        let watch_token = token.clone();
        let watcher = handle.spawn(async move {
            watch_token.cancelled().await;
            canceller.cancel();
        });
        s.dump_started_ns = now_ns();
        let result = session.call(req, &mut |_notify| Ok(()));
        s.dump_finished_ns = now_ns();
        watcher.abort();
        drop(session);
        result.map_err(criu_err)?;
        s.images_bytes = dir_size(&images);
        tracing::info!(container = %name, images_bytes = s.images_bytes, dump_ms = (s.dump_finished_ns - s.dump_started_ns) / 1_000_000, "dumped");

        // The writable layer, at the same instant as the memory.
        if let Some(upper) = &t.upperdir {
            let diff_path = s.dir.join("rootfs-diff.tar");
            let file =
                fs::File::create(&diff_path).map_err(PodError::io("create", diff_path.clone()))?;
            let (file, summary) = rootfs_diff::write_diff(upper, std::io::BufWriter::new(file))
                .map_err(|e| match e {
                    rootfs_diff::DiffError::Io { path, source } => PodError::Io {
                        op: "capture rootfs diff",
                        path,
                        source,
                    },
                })?;
            file.into_inner()
                .map_err(|e| PodError::io("write", diff_path.clone())(e.into_error()))?;
            s.rootfs_diff_bytes = fs::metadata(&diff_path).map(|m| m.len()).unwrap_or(0);
            s.deleted = summary.deleted;
        }
        Ok(())
    }
}

/// Which archive layout to write.
enum Layout {
    /// manifest.json + containers/<name>/... + pod/devshm/.
    Pod,
    /// One container in the checkpointctl layout at the archive's root.
    Container,
}

struct Job {
    sandbox: Option<SandboxFacts>,
    facts: Vec<ContainerFacts>,
    options: CheckpointOptions,
    host: HostInfo,
    dest: PathBuf,
    compression: Compression,
    token: CancellationToken,
    prepare: Duration,
    layout: Layout,
    permits: Arc<Semaphore>,
    handle: tokio::runtime::Handle,
}

/// An entry to pack.
enum Item {
    /// A file with this content.
    Bytes(String, Vec<u8>),
    /// A file copied from disk.
    File(String, PathBuf),
    /// A directory tree (a real directory entry, then its content).
    Tree(String, PathBuf),
    /// The start of a group (the pod's /dev/shm, a container): it begins a
    /// new zstd frame, so that a restore extracting in the background has
    /// verified a group's last frame checksum before it calls it ready.
    Group,
}

/// The entries of one container in the container-checkpoint layout that
/// checkpointctl, CRI-O and containerd share, under `prefix`.
fn container_items(
    prefix: &str,
    t: &Target,
    s: &Staged,
    host: &HostInfo,
) -> Result<Vec<Item>, PodError> {
    let f = &t.facts;
    let json = |v: &serde_json::Value| {
        serde_json::to_vec_pretty(v).map_err(|e| PodError::Internal(e.to_string()))
    };
    let image = f
        .status
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    let created = UNIX_EPOCH + Duration::from_nanos(f.status.created_at.max(0) as u64);
    let config_dump = serde_json::json!({
        "id": f.id,
        "name": f.name,
        "rootfsImage": image,
        "rootfsImageRef": f.status.image_ref,
        "rootfsImageName": image,
        "runtime": f.runtime_type,
        "createdTime": humantime::format_rfc3339_nanos(created).to_string(),
        "checkpointedTime": humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(s.frozen_at_ns)).to_string(),
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": false,
        "podckpt": { "criuVersion": host.criu_version, "runtime": format!("{} {}", host.runtime_name, host.runtime_version) },
    });
    // checkpointctl identifies the container from these annotations; add
    // them when the runtime (e.g. CRI-O) names them differently.
    let mut spec = f.spec_json.clone();
    if let Some(ann) = spec.as_object_mut().map(|o| {
        o.entry("annotations")
            .or_insert_with(|| serde_json::json!({}))
    }) {
        if let Some(ann) = ann.as_object_mut() {
            let meta = f.config.metadata.as_ref();
            ann.entry("io.kubernetes.cri.container-name")
                .or_insert_with(|| f.name.clone().into());
            let labels = &f.status.labels;
            if let Some(pod) = labels.get("io.kubernetes.pod.name") {
                ann.entry("io.kubernetes.cri.sandbox-name")
                    .or_insert_with(|| pod.clone().into());
            }
            if let Some(ns) = labels.get("io.kubernetes.pod.namespace") {
                ann.entry("io.kubernetes.cri.sandbox-namespace")
                    .or_insert_with(|| ns.clone().into());
            }
            ann.entry("io.kubernetes.cri.sandbox-id")
                .or_insert_with(|| f.sandbox_id.clone().into());
            let _ = meta;
        }
    }
    let bind_mounts: Vec<serde_json::Value> = f
        .spec
        .mounts
        .iter()
        .filter(|m| m.is_bind())
        .map(|m| {
            let meta = fs::metadata(&m.source).ok();
            serde_json::json!({
                "source": m.source,
                "destination": m.destination,
                "file_type": if meta.as_ref().is_some_and(|m| m.is_dir()) { "directory" } else { "file" },
                "permissions": meta.map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644),
            })
        })
        .collect();
    let status = serde_json::to_value(&f.status).map_err(|e| PodError::Internal(e.to_string()))?;
    let mut items = vec![
        Item::Tree(format!("{prefix}checkpoint"), s.dir.join("checkpoint")),
        Item::Bytes(format!("{prefix}config.dump"), json(&config_dump)?),
        Item::Bytes(format!("{prefix}spec.dump"), json(&spec)?),
        Item::Bytes(format!("{prefix}status.dump"), json(&status)?),
        Item::Bytes(
            format!("{prefix}bind.mounts"),
            json(&serde_json::Value::Array(bind_mounts))?,
        ),
        Item::Bytes(
            format!("{prefix}deleted.files"),
            json(&serde_json::json!(s.deleted))?,
        ),
    ];
    let diff = s.dir.join("rootfs-diff.tar");
    if diff.exists() {
        items.push(Item::File(format!("{prefix}rootfs-diff.tar"), diff));
    }
    let log = s.dir.join("work").join(DUMP_LOG);
    if log.exists() {
        items.push(Item::File(format!("{prefix}{DUMP_LOG}"), log));
    }
    // CRIU writes its statistics into its work dir, next to dump.log;
    // checkpointctl (`inspect --stats`, `--all`) opens them at the top of
    // the archive, where containerd and CRI-O put them.
    if let Some(stats) = [s.dir.join("work"), s.dir.join("checkpoint")]
        .into_iter()
        .map(|d| d.join(STATS_DUMP))
        .find(|p| p.is_file())
    {
        items.push(Item::File(format!("{prefix}{STATS_DUMP}"), stats));
    }
    // The container's log as of now, snapshotted into staging so its size
    // cannot change between the manifest and the archive.
    if !f.status.log_path.is_empty() && Path::new(&f.status.log_path).is_file() {
        let copy = s.dir.join("container.log");
        fs::copy(&f.status.log_path, &copy).map_err(PodError::io(
            "copy container log",
            f.status.log_path.clone(),
        ))?;
        items.push(Item::File(format!("{prefix}container.log"), copy));
    }
    Ok(items)
}

/// Every file the items will produce, with sizes, for the manifest.
fn files_of(items: &[Item]) -> Result<Vec<FileEntry>, PodError> {
    fn walk(prefix: &str, dir: &Path, out: &mut Vec<FileEntry>) -> Result<(), PodError> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(PodError::io("read", dir))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let meta = fs::symlink_metadata(e.path()).map_err(PodError::io("stat", e.path()))?;
            if meta.is_dir() {
                walk(&path, &e.path(), out)?;
            } else if meta.is_file() {
                out.push(FileEntry {
                    path,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Bytes(path, data) => out.push(FileEntry {
                path: path.clone(),
                size: data.len() as u64,
            }),
            Item::File(path, src) => out.push(FileEntry {
                path: path.clone(),
                size: fs::metadata(src)
                    .map_err(PodError::io("stat", src.clone()))?
                    .len(),
            }),
            Item::Tree(path, src) => walk(path, src, &mut out)?,
            Item::Group => {}
        }
    }
    Ok(out)
}

/// Writes the archive; a cancellation between entries abandons it (the
/// writer removes its temporary file).
fn pack(
    dest: &Path,
    compression: Compression,
    items: &[Item],
    token: &CancellationToken,
) -> Result<u64, PodError> {
    let mut w = ArchiveWriter::create(dest, compression)?;
    for item in items {
        check(token, "writing the archive")?;
        match item {
            Item::Bytes(path, data) => w.append_bytes(path, data)?,
            Item::File(path, src) => w.append_file(path, src)?,
            Item::Tree(path, src) => w.append_tree(path, src)?,
            Item::Group => w.end_frame()?,
        }
    }
    check(token, "writing the archive")?;
    // Asked once more right before the rename: a caller answered with
    // DeadlineExceeded while the last frame was written gets no archive.
    w.finish_unless(|| token.is_cancelled())?
        .ok_or(PodError::Cancelled {
            during: "writing the archive",
        })
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| if m.is_dir() { 0 } else { m.len() })
                .sum()
        })
        .unwrap_or(0)
}

/// Whether `dir` is on tmpfs.
fn is_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

fn available_memory() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Every cgroup frozen so far; thaws them all when dropped (error,
/// cancellation, panic) unless already thawed.
#[derive(Default)]
struct FrozenSet(Vec<(String, Freezer)>);

impl FrozenSet {
    /// Thaws every cgroup, trying all even if one fails.
    fn thaw_all(&mut self) -> Result<(), PodError> {
        let mut failed = Vec::new();
        for (name, f) in self.0.drain(..) {
            if let Err(source) = f.thaw(FREEZE_TIMEOUT) {
                tracing::error!(container = %name, error = %source, "THAW FAILED");
                failed.push(PodError::Freezer {
                    container: name,
                    source,
                });
            }
        }
        match failed.into_iter().next() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

impl Drop for FrozenSet {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = self.thaw_all();
        }
    }
}

/// A private staging directory (0700), removed with its content on drop.
struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    /// Creates `root/name` (0700); never reuses an existing entry.
    fn create(root: &TrustedDir, name: &str, setting: &'static str) -> Result<Self, PodError> {
        root.reverify().map_err(PodError::unsafe_dir(setting))?;
        let dir = root
            .create_new(name)
            .map_err(PodError::unsafe_dir(setting))?;
        Ok(Self {
            path: dir.path().to_path_buf(),
        })
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %err, "could not remove staging dir");
        }
    }
}

/// What a crashed checkpoint leaves to undo.
#[derive(Debug, Serialize, Deserialize)]
pub struct Marker {
    /// The podckptd that wrote it.
    pub pid: u32,
    /// Cgroups it was about to freeze.
    pub freezers: Vec<Freezer>,
    /// Its temporary archive.
    pub archive_tmp: PathBuf,
    /// Its staging dir.
    pub staging: PathBuf,
}

/// A marker on disk; `remove` when the checkpoint is over.
struct MarkerFile {
    path: PathBuf,
}

impl MarkerFile {
    /// Where the marker of this checkpoint goes (in a verified dir).
    fn path_for(state_dir: &Path, marker: &Marker) -> Result<PathBuf, PodError> {
        let dir = TrustedDir::ensure(state_dir)
            .and_then(|d| d.ensure_child(MARKER_DIR))
            .map_err(PodError::unsafe_dir("--state-dir"))?
            .path()
            .to_path_buf();
        Ok(dir.join(format!(
            "{}.json",
            marker
                .staging
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        )))
    }

    fn write(path: &Path, marker: &Marker) -> Result<Self, PodError> {
        let path = path.to_path_buf();
        let tmp = path.with_extension("tmp");
        let data = serde_json::to_vec(marker).map_err(|e| PodError::Internal(e.to_string()))?;
        fs::write(&tmp, data).map_err(PodError::io("write", tmp.clone()))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(PodError::io("sync", tmp.clone()))?;
        fs::rename(&tmp, &path).map_err(PodError::io("rename", path.clone()))?;
        Ok(Self { path })
    }

    fn remove(self) {}
}

impl Drop for MarkerFile {
    fn drop(&mut self) {
        // Dropped after the freeze guard, staging dir and temp archive (in
        // reverse order of creation), so by now everything it names is undone.
        let _ = fs::remove_file(&self.path);
    }
}

/// Undoes what checkpoints of a previous podckptd left behind: thaws their
/// cgroups and removes their partial archives and staging dirs. Run once at
/// start, before serving.
pub fn recover(state_dir: &Path) -> usize {
    // Markers name cgroups to thaw and trees to remove: read them only
    // from a directory nobody but root could have written them into.
    if let Err(err) = TrustedDir::open(state_dir).and_then(|d| d.child(MARKER_DIR.as_ref())) {
        if !matches!(
            err,
            crate::node::safe_dir::UnsafeDir::Io {
                source: nix::errno::Errno::ENOENT,
                ..
            }
        ) {
            tracing::warn!(%err, "not reading checkpoint markers from an untrusted directory");
        }
        return 0;
    }
    let dir = state_dir.join(MARKER_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return 0;
    };
    let mut undone = 0;
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "tmp") {
            let _ = fs::remove_file(&path);
            continue;
        }
        let marker: Marker = match fs::read(&path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
        {
            Some(m) => m,
            None => {
                tracing::warn!(path = %path.display(), "unreadable checkpoint marker; removing");
                let _ = fs::remove_file(&path);
                continue;
            }
        };
        for f in &marker.freezers {
            match f.thaw(FREEZE_TIMEOUT) {
                Ok(()) => {
                    tracing::warn!(cgroup = %f.dir.display(), "thawed a container left frozen by an interrupted checkpoint")
                }
                Err(err) => {
                    tracing::warn!(cgroup = %f.dir.display(), %err, "could not thaw (container gone?)")
                }
            }
        }
        let _ = fs::remove_file(&marker.archive_tmp);
        let _ = fs::remove_dir_all(&marker.staging);
        let _ = fs::remove_file(&path);
        tracing::warn!(marker = %path.display(), "cleaned up an interrupted checkpoint");
        undone += 1;
    }
    undone
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A discard that reports what it was given.
    fn reporting() -> (Discard<u32>, tokio::sync::mpsc::UnboundedReceiver<u32>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let discard: Discard<u32> = Box::new(move |v| {
            Box::pin(async move {
                let _ = tx.send(v);
            })
        });
        (discard, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_answer_comes_before_the_deadline_and_a_late_result_is_discarded() {
        let (discard, mut discarded) = reporting();
        let limit = Duration::from_millis(200);
        let started = Instant::now();
        // Work that notices the cancellation but whose undo (or commit)
        // takes longer than the deadline leaves, and then completes.
        let result = supervise(
            Some(Deadline::from_now(limit)),
            |token| async move {
                token.cancelled().await;
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok(7u32)
            },
            discard,
        )
        .await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(PodError::DeadlineExceeded { .. })),
            "{result:?}"
        );
        assert!(took < limit, "answered after {took:?}");
        // The result that completed after the answer is handed to discard.
        let late = tokio::time::timeout(Duration::from_secs(5), discarded.recv()).await;
        assert_eq!(late.ok().flatten(), Some(7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_done_in_time_is_kept_and_cancelled_work_is_a_deadline() {
        let (discard, mut discarded) = reporting();
        let done = supervise(
            Some(Deadline::from_now(Duration::from_secs(5))),
            |_| async { Ok(1u32) },
            discard,
        )
        .await;
        assert_eq!(done.unwrap(), 1);
        assert!(discarded.try_recv().is_err());
        // Cancelled, and undone within the budget: DeadlineExceeded.
        let (discard, _) = reporting();
        let undone = supervise(
            Some(Deadline::from_now(Duration::from_millis(100))),
            |token| async move {
                token.cancelled().await;
                Err::<u32, _>(PodError::Cancelled { during: "dumping" })
            },
            discard,
        )
        .await;
        assert!(
            matches!(
                undone,
                Err(PodError::DeadlineExceeded { during: "dumping" })
            ),
            "{undone:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_nobody_waits_for_any_more_is_discarded() {
        let (discard, mut discarded) = reporting();
        let call = tokio::spawn(supervise(
            None,
            |token| async move {
                token.cancelled().await;
                Ok(3u32)
            },
            discard,
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The caller goes away: the work is cancelled, its result discarded.
        call.abort();
        let late = tokio::time::timeout(Duration::from_secs(5), discarded.recv()).await;
        assert_eq!(late.ok().flatten(), Some(3));
    }

    #[test]
    fn the_schedule_leaves_a_margin_and_an_undo_budget() {
        for ms in [50u64, 500, 1500, 15_000] {
            let d = Deadline::from_now(Duration::from_millis(ms));
            let (cancel_at, answer_at) = d.schedule();
            let end = d.arrived + d.remaining;
            assert!(cancel_at < answer_at && answer_at < end, "{ms} ms");
            assert!(end - answer_at >= ANSWER_MARGIN_MIN, "{ms} ms");
        }
        // No deadline at all left: cancel and answer at once.
        let d = Deadline::from_now(Duration::ZERO);
        assert_eq!(d.schedule(), (d.arrived, d.arrived));
    }

    #[test]
    fn output_dir_rules() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            validate_output_dir("relative/dir"),
            Err(PodError::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_output_dir(""),
            Err(PodError::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_output_dir("/nonexistent/podckpt/x"),
            Err(PodError::NotFound(_))
        ));
        let p = dir.path().display().to_string();
        assert_eq!(validate_output_dir(&p).unwrap(), dir.path());
        fs::write(dir.path().join("f"), "x").unwrap();
        assert!(matches!(
            validate_output_dir(&p),
            Err(PodError::FailedPrecondition(_))
        ));
        assert!(matches!(
            validate_output_dir(&format!("{p}/f")),
            Err(PodError::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_output_dir(&format!("{p}/../x")),
            Err(PodError::InvalidArgument(_))
        ));
    }

    #[test]
    fn location_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display().to_string();
        assert_eq!(
            validate_location(&format!("{p}/c.tar")).unwrap().1,
            Compression::None
        );
        assert!(matches!(
            validate_location(&format!("{p}/c.tar.zst")).unwrap().1,
            Compression::Zstd { .. }
        ));
        assert!(matches!(
            validate_location("c.tar"),
            Err(PodError::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_location(&p),
            Err(PodError::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_location("/nonexistent/dir/c.tar"),
            Err(PodError::NotFound(_))
        ));
    }

    #[test]
    fn recover_thaws_and_removes_leftovers() {
        let state = tempfile::tempdir().unwrap();
        let cg = tempfile::tempdir().unwrap();
        fs::write(cg.path().join("freezer.state"), "FROZEN").unwrap();
        let out = tempfile::tempdir().unwrap();
        let tmp_archive = out.path().join(".pod.tar.zst.podckpt-tmp-1");
        fs::write(&tmp_archive, "partial").unwrap();
        let staging = tempfile::tempdir().unwrap();
        let staging_path = staging.keep();
        fs::write(staging_path.join("pages-1.img"), "x").unwrap();
        let marker = Marker {
            pid: 1,
            freezers: vec![Freezer {
                kind: cgroup::FreezerKind::V1,
                dir: cg.path().to_path_buf(),
            }],
            archive_tmp: tmp_archive.clone(),
            staging: staging_path.clone(),
        };
        let path = MarkerFile::path_for(state.path(), &marker).unwrap();
        std::mem::forget(MarkerFile::write(&path, &marker).unwrap());
        assert_eq!(recover(state.path()), 1);
        assert_eq!(
            fs::read_to_string(cg.path().join("freezer.state")).unwrap(),
            "THAWED"
        );
        assert!(!tmp_archive.exists());
        assert!(!staging_path.exists());
        assert_eq!(
            fs::read_dir(state.path().join(MARKER_DIR)).unwrap().count(),
            0
        );
        assert_eq!(recover(state.path()), 0);
    }
}
