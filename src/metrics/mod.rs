//! podckptd's Prometheus metrics: what it records and how they are named.
//! Names follow the kubelet's (and KEP-5823's) style: `podckpt_` prefix,
//! base units in the name (`_seconds`, `_bytes`), counters ending in
//! `_total`. Served only when `--metrics-listen` is set ([`http`]); recording
//! costs a few atomic operations either way, so the engine and the proxy
//! record unconditionally.
//!
//! The proxy's hot path touches only pre-resolved counters: the label
//! lookup of a [`Family`] (a lock and a hash) happens once per class at
//! start, and a relayed call costs one atomic add (two if it fails).

pub mod http;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// `[(label, value); N]`: the label sets used here are all static strings.
type Labels<const N: usize> = [(&'static str, &'static str); N];
type Histograms<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;

/// What a checkpoint or restore call was: `operation` label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// CheckpointPod, or RestorePod.
    Pod,
    /// CheckpointContainer, or CreateContainer from a checkpoint archive.
    Container,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Operation::Pod => "pod",
            Operation::Container => "container",
        }
    }
}

/// The method classes of relayed calls (`class` label), by CRI method:
/// few enough for a fixed array of counters, fine enough to tell image
/// pulls from container lifecycle from stats polling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MethodClass {
    /// Version, Status, RuntimeConfig, UpdateRuntimeConfig.
    Runtime,
    /// Pod sandbox lifecycle and status.
    Sandbox,
    /// Container lifecycle and status.
    Container,
    /// ExecSync, Exec, Attach, PortForward.
    Exec,
    /// Container and pod stats and metrics.
    Stats,
    /// GetContainerEvents.
    Events,
    /// Every ImageService method.
    Image,
    /// Anything else (methods newer than podckptd, other services).
    Other,
}

const CLASSES: [MethodClass; 8] = [
    MethodClass::Runtime,
    MethodClass::Sandbox,
    MethodClass::Container,
    MethodClass::Exec,
    MethodClass::Stats,
    MethodClass::Events,
    MethodClass::Image,
    MethodClass::Other,
];

impl MethodClass {
    /// The class of a request path (`/runtime.v1.RuntimeService/Method`):
    /// a few comparisons of short strings, no allocation.
    pub fn of(path: &str) -> Self {
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return MethodClass::Other;
        };
        match service {
            "runtime.v1.ImageService" => return MethodClass::Image,
            "runtime.v1.RuntimeService" => {}
            _ => return MethodClass::Other,
        }
        match method {
            "Version" | "Status" | "RuntimeConfig" | "UpdateRuntimeConfig" => MethodClass::Runtime,
            "GetContainerEvents" => MethodClass::Events,
            "ExecSync" | "Exec" | "Attach" | "PortForward" => MethodClass::Exec,
            m if m.contains("Stats") || m.contains("Metric") => MethodClass::Stats,
            m if m.contains("PodSandbox") => MethodClass::Sandbox,
            m if m.contains("Container") => MethodClass::Container,
            _ => MethodClass::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            MethodClass::Runtime => "runtime",
            MethodClass::Sandbox => "sandbox",
            MethodClass::Container => "container",
            MethodClass::Exec => "exec",
            MethodClass::Stats => "stats",
            MethodClass::Events => "events",
            MethodClass::Image => "image",
            MethodClass::Other => "other",
        }
    }
}

/// Who ended a relayed call with an error (`source` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    /// The runtime answered with a non-OK gRPC status.
    Runtime,
    /// podckptd ended it: runtime unreachable or lost, deadline exceeded.
    Podckptd,
}

/// podckptd's metrics; cheap to clone (one registry per daemon, no global
/// state: tests run several daemons in one process).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    checkpoints: Family<Labels<2>, Counter>,
    checkpoint_duration: Histograms<1>,
    frozen: Histograms<1>,
    archive_size: Histograms<1>,
    restores: Family<Labels<2>, Counter>,
    restore_duration: Histograms<1>,
    extracted: Counter,
    relayed: [Counter; CLASSES.len()],
    relay_errors_runtime: [Counter; CLASSES.len()],
    relay_errors_podckptd: [Counter; CLASSES.len()],
    runtime_up: Gauge,
    runtime_connections: Gauge,
    criu_ready: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    // 50 ms to ~28 min: a small pod's checkpoint to a large one's.
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

fn frozen_histogram() -> Histogram {
    // 5 ms to ~82 s: the window a pod stands still.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn size_histogram() -> Histogram {
    // 1 MiB to 256 GiB, by fours.
    Histogram::new(exponential_buckets(1024.0 * 1024.0, 4.0, 10))
}

impl Metrics {
    /// A fresh registry with every metric podckptd records.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let checkpoints = Family::<Labels<2>, Counter>::default();
        registry.register(
            "podckpt_checkpoint_requests",
            "CheckpointPod (operation=pod) and CheckpointContainer (operation=container) calls served, by gRPC result code",
            checkpoints.clone(),
        );
        let checkpoint_duration: Histograms<1> =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "podckpt_checkpoint_duration_seconds",
            "Time from a checkpoint call's arrival to its answer, every result",
            checkpoint_duration.clone(),
        );
        let frozen: Histograms<1> =
            Family::new_with_constructor(frozen_histogram as fn() -> Histogram);
        registry.register(
            "podckpt_checkpoint_frozen_duration_seconds",
            "How long a successful checkpoint kept the pod's (or container's) processes frozen",
            frozen.clone(),
        );
        let archive_size: Histograms<1> =
            Family::new_with_constructor(size_histogram as fn() -> Histogram);
        registry.register(
            "podckpt_checkpoint_archive_size_bytes",
            "Size of the archive a successful checkpoint wrote",
            archive_size.clone(),
        );
        let restores = Family::<Labels<2>, Counter>::default();
        registry.register(
            "podckpt_restore_requests",
            "RestorePod (operation=pod) and CreateContainer from a checkpoint archive (operation=container) calls served, by gRPC result code",
            restores.clone(),
        );
        let restore_duration: Histograms<1> =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "podckpt_restore_duration_seconds",
            "Time from a restore call's arrival to its answer (containers created), every result",
            restore_duration.clone(),
        );
        let extracted = Counter::default();
        registry.register(
            "podckpt_restore_extracted_bytes",
            "Bytes of regular files extracted from checkpoint archives for restores",
            extracted.clone(),
        );
        let relayed_family = Family::<Labels<1>, Counter>::default();
        registry.register(
            "podckpt_relayed_calls",
            "CRI calls passed through to the runtime, by method class",
            relayed_family.clone(),
        );
        let errors_family = Family::<Labels<2>, Counter>::default();
        registry.register(
            "podckpt_relayed_errors",
            "Relayed calls that ended with a non-OK gRPC status, by method class and by who set it (runtime, or podckptd: runtime unreachable or lost, deadline)",
            errors_family.clone(),
        );
        // Resolved once: the hot path indexes arrays of counter handles.
        let relayed = CLASSES.map(|c| relayed_family.get_or_create_owned(&[("class", c.label())]));
        let errors = |source: &'static str| {
            CLASSES.map(|c| {
                errors_family.get_or_create_owned(&[("class", c.label()), ("source", source)])
            })
        };
        let relay_errors_runtime = errors("runtime");
        let relay_errors_podckptd = errors("podckptd");
        let runtime_up = Gauge::default();
        registry.register(
            "podckpt_runtime_up",
            "1 when podckptd's last connection attempt to the runtime (or health check of it) succeeded, else 0",
            runtime_up.clone(),
        );
        let runtime_connections = Gauge::default();
        registry.register(
            "podckpt_runtime_connections",
            "HTTP/2 connections podckptd holds open to the runtime (one per client connection that relayed a call)",
            runtime_connections.clone(),
        );
        let criu_ready = Gauge::default();
        registry.register(
            "podckpt_criu_ready",
            "1 when CRIU passed podckptd's check at start (version and `criu check`), else 0 (checkpoint and restore calls fail with FailedPrecondition)",
            criu_ready.clone(),
        );
        registry.register(
            "podckpt_build",
            "podckptd's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                checkpoints,
                checkpoint_duration,
                frozen,
                archive_size,
                restores,
                restore_duration,
                extracted,
                relayed,
                relay_errors_runtime,
                relay_errors_podckptd,
                runtime_up,
                runtime_connections,
                criu_ready,
            }),
        }
    }

    /// Records a served checkpoint call: its result, how long it took and,
    /// when it succeeded, its frozen window and archive size.
    pub fn checkpoint(
        &self,
        op: Operation,
        code: tonic::Code,
        took: Duration,
        done: Option<(Duration, u64)>,
    ) {
        let m = &self.inner;
        let op = op.label();
        m.checkpoints
            .get_or_create(&[("operation", op), ("code", code_name(code))])
            .inc();
        m.checkpoint_duration
            .get_or_create(&[("operation", op)])
            .observe(took.as_secs_f64());
        if let Some((frozen, bytes)) = done {
            m.frozen
                .get_or_create(&[("operation", op)])
                .observe(frozen.as_secs_f64());
            m.archive_size
                .get_or_create(&[("operation", op)])
                .observe(bytes as f64);
        }
    }

    /// Records a served restore call.
    pub fn restore(&self, op: Operation, code: tonic::Code, took: Duration) {
        let m = &self.inner;
        let op = op.label();
        m.restores
            .get_or_create(&[("operation", op), ("code", code_name(code))])
            .inc();
        m.restore_duration
            .get_or_create(&[("operation", op)])
            .observe(took.as_secs_f64());
    }

    /// Adds bytes extracted from a checkpoint archive.
    pub fn extracted(&self, bytes: u64) {
        self.inner.extracted.inc_by(bytes);
    }

    /// Counts a call passed through to the runtime.
    #[inline]
    pub fn relayed(&self, class: MethodClass) {
        self.inner.relayed[class as usize].inc();
    }

    /// Counts a relayed call that failed.
    #[inline]
    pub fn relay_error(&self, class: MethodClass, source: ErrorSource) {
        let counters = match source {
            ErrorSource::Runtime => &self.inner.relay_errors_runtime,
            ErrorSource::Podckptd => &self.inner.relay_errors_podckptd,
        };
        counters[class as usize].inc();
    }

    /// Whether podckptd's last attempt to reach the runtime worked.
    pub fn runtime_up(&self, up: bool) {
        self.inner.runtime_up.set(i64::from(up));
    }

    /// A runtime connection was made (`+1`) or ended (`-1`).
    pub fn runtime_connection(&self, opened: bool) {
        if opened {
            self.inner.runtime_connections.inc();
        } else {
            self.inner.runtime_connections.dec();
        }
    }

    /// Whether CRIU is usable.
    pub fn criu_ready(&self, ready: bool) {
        self.inner.criu_ready.set(i64::from(ready));
    }

    /// The metrics in the OpenMetrics text format (which Prometheus
    /// scrapes as its own text format), `# EOF` included.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

/// gRPC's name of a status code, as a label value (the kubelet's metrics
/// label results the same way).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let c = MethodClass::of;
        assert_eq!(
            c("/runtime.v1.RuntimeService/Version"),
            MethodClass::Runtime
        );
        assert_eq!(
            c("/runtime.v1.RuntimeService/RunPodSandbox"),
            MethodClass::Sandbox
        );
        assert_eq!(
            c("/runtime.v1.RuntimeService/ListPodSandboxStats"),
            MethodClass::Stats
        );
        assert_eq!(
            c("/runtime.v1.RuntimeService/ListPodSandboxMetrics"),
            MethodClass::Stats
        );
        assert_eq!(
            c("/runtime.v1.RuntimeService/CreateContainer"),
            MethodClass::Container
        );
        assert_eq!(c("/runtime.v1.RuntimeService/ExecSync"), MethodClass::Exec);
        assert_eq!(
            c("/runtime.v1.RuntimeService/GetContainerEvents"),
            MethodClass::Events
        );
        assert_eq!(c("/runtime.v1.ImageService/PullImage"), MethodClass::Image);
        assert_eq!(
            c("/runtime.v1.RuntimeService/SomethingNew"),
            MethodClass::Other
        );
        assert_eq!(c("/grpc.health.v1.Health/Check"), MethodClass::Other);
        assert_eq!(c("garbage"), MethodClass::Other);
    }

    #[test]
    fn encodes_what_was_recorded() {
        let m = Metrics::new();
        m.relayed(MethodClass::Image);
        m.relayed(MethodClass::Image);
        m.relay_error(MethodClass::Image, ErrorSource::Podckptd);
        m.checkpoint(
            Operation::Pod,
            tonic::Code::Ok,
            Duration::from_secs(2),
            Some((Duration::from_millis(300), 5 << 20)),
        );
        m.restore(
            Operation::Pod,
            tonic::Code::NotFound,
            Duration::from_millis(20),
        );
        m.extracted(1234);
        let text = m.encode();
        for line in [
            "podckpt_relayed_calls_total{class=\"image\"} 2",
            "podckpt_relayed_errors_total{class=\"image\",source=\"podckptd\"} 1",
            "podckpt_relayed_errors_total{class=\"image\",source=\"runtime\"} 0",
            "podckpt_checkpoint_requests_total{operation=\"pod\",code=\"OK\"} 1",
            "podckpt_checkpoint_duration_seconds_count{operation=\"pod\"} 1",
            "podckpt_checkpoint_frozen_duration_seconds_sum{operation=\"pod\"} 0.3",
            "podckpt_checkpoint_archive_size_bytes_sum{operation=\"pod\"} 5242880.0",
            "podckpt_restore_requests_total{operation=\"pod\",code=\"NotFound\"} 1",
            "podckpt_restore_extracted_bytes_total 1234",
            "podckpt_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
