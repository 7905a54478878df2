//! podckptd's configuration: flags, each with an environment variable, and
//! validation at start so a bad setting stops the daemon with a clear
//! message instead of failing on the first call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::cri::client::socket_path;
use crate::node::safe_dir::{TrustedDir, UnsafeDir};

/// containerd's default CRI socket, tried first when no endpoint is given.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// CRI-O's default socket, tried second.
pub const CRIO_SOCKET: &str = "/var/run/crio/crio.sock";
/// Default listening socket of podckptd.
pub const DEFAULT_LISTEN: &str = "/run/podckpt/podckpt.sock";

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// podckptd: a CRI proxy that adds pod checkpoint/restore to any runtime.
///
/// Point the kubelet's `containerRuntimeEndpoint` (and crictl's
/// `runtime-endpoint`) at the --listen socket. Every CRI call passes through
/// to the container runtime unchanged, except the ones podckptd serves.
#[derive(Clone, Debug, Parser)]
#[command(name = "podckptd", version, about, long_about = None)]
pub struct DaemonConfig {
    /// Unix socket podckptd listens on (mode 0660; the directory is created).
    #[arg(long, env = "PODCKPT_LISTEN", default_value = DEFAULT_LISTEN, value_name = "PATH")]
    pub listen: PathBuf,

    /// CRI endpoint of the container runtime (unix:///path or /path).
    /// Default: /run/containerd/containerd.sock if present, else
    /// /var/run/crio/crio.sock if present, else containerd's path (podckptd
    /// then connects once the runtime comes up).
    #[arg(long, env = "PODCKPT_RUNTIME_ENDPOINT", value_name = "ENDPOINT")]
    pub runtime_endpoint: Option<String>,

    /// Timeout for connecting to the runtime socket; calls made while the
    /// runtime is down fail with Unavailable after at most this long.
    #[arg(long, env = "PODCKPT_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// The proxy's limits (connections, streams, frames, headers, windows,
    /// buffered bytes, served calls).
    #[command(flatten)]
    pub limits: crate::proxy::Limits,

    /// On SIGTERM/SIGINT, how long in-flight calls may run before their
    /// connections are closed.
    #[arg(long, env = "PODCKPT_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Duration,

    /// Directory for podckptd's persistent state.
    #[arg(
        long,
        env = "PODCKPT_STATE_DIR",
        default_value = "/var/lib/podckpt",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,

    /// CRIU binary (run as `criu swrk`); a bare name is looked up on PATH.
    #[arg(
        long,
        env = "PODCKPT_CRIU",
        default_value = "criu",
        value_name = "PATH"
    )]
    pub criu: PathBuf,

    /// Use a running `criu service --address PATH` instead of spawning
    /// `criu swrk` for each dump.
    #[arg(long, env = "PODCKPT_CRIU_SERVICE_SOCKET", value_name = "PATH")]
    pub criu_service_socket: Option<PathBuf>,

    /// Where CRIU images are staged before packing. Default: /dev/shm
    /// (tmpfs) when the pod's memory fits twice in available memory, else
    /// <state-dir>/staging. Created 0700.
    #[arg(long, env = "PODCKPT_STAGING_DIR", value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,

    /// Before freezing a pod whose images are staged in memory, touch and
    /// free as much memory as they will take, so that the dump inside the
    /// frozen window does not pay for the first touch of pages a
    /// hypervisor has taken back (VMs with free page reporting or
    /// ballooning). Costs one pass over that memory outside the freeze.
    #[arg(
        long,
        env = "PODCKPT_WARM_STAGING",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub warm_staging: bool,

    /// The binary each checkpoint's guardian runs (it thaws the pod if
    /// podckptd dies inside the frozen window): podckptd itself. Only for
    /// running the daemon inside another program, such as a test harness.
    #[arg(
        long,
        env = "PODCKPT_GUARDIAN_EXE",
        default_value = crate::pod::guardian::SELF_EXE,
        hide = true,
        value_name = "PATH"
    )]
    pub guardian_exe: PathBuf,

    /// Where restores extract checkpoints and register containers for
    /// `podckpt-runc` (which reads PODCKPT_RESTORE_DIR, same default). A
    /// tmpfs makes restores fast; the images are removed as soon as each
    /// container is restored. Created 0700.
    #[arg(
        long,
        env = "PODCKPT_RESTORE_DIR",
        value_name = "DIR",
        default_value = crate::restore::wrapper::DEFAULT_RESTORE_DIR
    )]
    pub restore_dir: PathBuf,

    /// The most bytes one restore extracts (RestorePod: checked against the
    /// manifest before anything is created; CreateContainer from an
    /// archive: the extraction stops at the first entry past it). Lowered
    /// further to the free space of the --restore-dir filesystem. Accepts
    /// K, M, G, T suffixes (powers of 1024).
    #[arg(
        long,
        env = "PODCKPT_MAX_RESTORE_BYTES",
        default_value = "64G",
        value_parser = parse_bytes,
        value_name = "BYTES"
    )]
    pub max_restore_bytes: u64,

    /// The most entries (files, directories, links) one checkpoint archive
    /// may hold.
    #[arg(
        long,
        env = "PODCKPT_MAX_ARCHIVE_ENTRIES",
        default_value_t = crate::archive::extract::DEFAULT_MAX_ARCHIVE_ENTRIES,
        value_name = "N"
    )]
    pub max_archive_entries: u64,

    /// The most RunPodSandbox and CreateContainer configs kept under
    /// <state-dir>/seen (see README, "Configs seen on the way"): a
    /// checkpoint records a pod's configs from them on runtimes whose
    /// status lacks them (CRI-O). Records of removed pods are dropped. 0
    /// turns noting off.
    #[arg(
        long,
        env = "PODCKPT_MAX_SEEN_CONFIGS",
        default_value_t = crate::pod::seen::DEFAULT_MAX_SEEN,
        value_name = "N"
    )]
    pub max_seen_configs: usize,

    /// Serve CreateContainer whose image is a checkpoint archive's path
    /// (the container-level restore of CRI-O and containerd 2.x, which both
    /// made it opt-in after the 2026 advisories on checkpoint import and
    /// containerd 2.4 removed). Off: such a call goes to the runtime as it
    /// is. RestorePod is not affected.
    #[arg(
        long,
        env = "PODCKPT_ALLOW_CREATE_FROM_ARCHIVE",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub allow_create_from_archive: bool,

    /// CRIU dumps that may run at once on this node.
    #[arg(
        long,
        env = "PODCKPT_MAX_PARALLEL_DUMPS",
        default_value_t = 4,
        value_name = "N"
    )]
    pub max_parallel_dumps: usize,

    /// Threads compressing an archive (0: one per CPU).
    #[arg(
        long,
        env = "PODCKPT_ZSTD_WORKERS",
        default_value_t = 0,
        value_name = "N"
    )]
    pub zstd_workers: u32,

    /// Log format.
    #[arg(long, env = "PODCKPT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics on this TCP address (`GET /metrics`), e.g.
    /// 127.0.0.1:9464. Off unless set.
    #[arg(long, env = "PODCKPT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`,
    /// `podckpt=debug`).
    #[arg(
        long,
        env = "PODCKPT_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,
}

/// A configuration problem found at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is malformed.
    #[error("--{flag}: {reason}")]
    Invalid {
        /// The flag concerned.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A directory podckptd would write into is not safe to trust.
    #[error("--{flag}: untrusted directory: {source}")]
    UnsafeDir {
        /// The flag concerned.
        flag: &'static str,
        /// What is wrong with it.
        #[source]
        source: UnsafeDir,
    },
}

/// The configuration after validation, with the runtime endpoint resolved.
#[derive(Clone, Debug)]
pub struct Validated {
    /// The parsed flags.
    pub config: DaemonConfig,
    /// The runtime's socket path.
    pub runtime_socket: PathBuf,
}

impl DaemonConfig {
    /// Checks every setting and resolves the runtime endpoint.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        let invalid = |flag, reason: String| ConfigError::Invalid { flag, reason };
        if !self.listen.is_absolute() {
            return Err(invalid(
                "listen",
                format!("{} is not an absolute path", self.listen.display()),
            ));
        }
        if self.listen.file_name().is_none() {
            return Err(invalid(
                "listen",
                format!("{} does not name a socket file", self.listen.display()),
            ));
        }
        let runtime_socket = match &self.runtime_endpoint {
            Some(endpoint) => socket_path(endpoint).map_err(|e| invalid("runtime-endpoint", e))?,
            None => detect_runtime(Path::exists),
        };
        if same_path(&runtime_socket, &self.listen) {
            return Err(invalid(
                "runtime-endpoint",
                format!(
                    "{} is podckptd's own --listen socket; point it at the container runtime",
                    runtime_socket.display()
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid(
                "connect-timeout",
                "must be greater than zero".into(),
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid(
                "state-dir",
                format!("{} is not an absolute path", self.state_dir.display()),
            ));
        }
        if let Some(dir) = &self.staging_dir {
            if !dir.is_absolute() {
                return Err(invalid(
                    "staging-dir",
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        if !self.restore_dir.is_absolute() {
            return Err(invalid(
                "restore-dir",
                format!("{} is not an absolute path", self.restore_dir.display()),
            ));
        }
        if self.max_restore_bytes == 0 {
            return Err(invalid(
                "max-restore-bytes",
                "must be greater than zero".into(),
            ));
        }
        if self.max_archive_entries == 0 {
            return Err(invalid("max-archive-entries", "must be at least 1".into()));
        }
        if self.max_parallel_dumps == 0 {
            return Err(invalid("max-parallel-dumps", "must be at least 1".into()));
        }
        if let Some(sock) = &self.criu_service_socket {
            if !sock.is_absolute() {
                return Err(invalid(
                    "criu-service-socket",
                    format!("{} is not an absolute path", sock.display()),
                ));
            }
        }
        self.limits
            .validate()
            .map_err(|(flag, reason)| invalid(flag, reason))?;
        tracing_subscriber::EnvFilter::try_new(&self.log)
            .map_err(|e| invalid("log", format!("{:?}: {e}", self.log)))?;
        Ok(Validated {
            config: self,
            runtime_socket,
        })
    }
}

impl Validated {
    /// Creates (0700) and verifies the directories podckptd writes into:
    /// owned by root, nobody else may write, no link a user could have
    /// planted (see [`crate::node::safe_dir`]). A failure stops podckptd at
    /// start; the same check runs again before each use.
    pub fn prepare_dirs(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let bad = |flag| move |source| ConfigError::UnsafeDir { flag, source };
        TrustedDir::ensure(&c.state_dir).map_err(bad("state-dir"))?;
        TrustedDir::ensure(&c.restore_dir).map_err(bad("restore-dir"))?;
        if let Some(dir) = &c.staging_dir {
            TrustedDir::ensure(dir).map_err(bad("staging-dir"))?;
        }
        Ok(())
    }
}

/// Picks the runtime socket when none is configured.
fn detect_runtime(exists: impl Fn(&Path) -> bool) -> PathBuf {
    [CONTAINERD_SOCKET, CRIO_SOCKET]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| exists(p))
        .unwrap_or_else(|| PathBuf::from(CONTAINERD_SOCKET))
}

fn same_path(a: &Path, b: &Path) -> bool {
    // /var/run is a symlink to /run on every distribution we target.
    let canon = |p: &Path| {
        let s = p.to_string_lossy();
        s.strip_prefix("/var/run/")
            .map(|rest| PathBuf::from("/run").join(rest))
            .unwrap_or_else(|| p.to_path_buf())
    };
    canon(a) == canon(b)
}

/// Parses byte counts like `1048576`, `512M`, `64G` (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| t.split_at(i))
        .unwrap_or((t, ""));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 512M, 64G)"))?;
    let shift = match unit.trim_end_matches(['i', 'B']) {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses durations like `500ms`, `2s`, `1m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> DaemonConfig {
        let mut argv = vec!["podckptd"];
        argv.extend_from_slice(args);
        DaemonConfig::try_parse_from(argv).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("512M").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("64GiB").unwrap(), 64 << 30);
        assert!(parse_bytes("1X").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999T").is_err());
    }

    #[test]
    fn defaults_validate() {
        let v = parse(&[
            "--runtime-endpoint",
            "unix:///run/containerd/containerd.sock",
        ])
        .validate()
        .unwrap();
        assert_eq!(v.runtime_socket, PathBuf::from(CONTAINERD_SOCKET));
        assert_eq!(v.config.listen, PathBuf::from(DEFAULT_LISTEN));
    }

    #[test]
    fn rejects_bad_settings() {
        let err = |args: &[&str]| parse(args).validate().unwrap_err().to_string();
        assert!(err(&["--listen", "rel.sock"]).contains("--listen"));
        assert!(err(&["--runtime-endpoint", "tcp://1.2.3.4:1"]).contains("--runtime-endpoint"));
        assert!(
            err(&["--runtime-endpoint", "/var/run/podckpt/podckpt.sock"]).contains("own --listen")
        );
        assert!(
            err(&["--runtime-endpoint", "/x.sock", "--connect-timeout", "0s"])
                .contains("--connect-timeout")
        );
        assert!(err(&["--runtime-endpoint", "/x.sock", "--log", "podckpt=loud"]).contains("--log"));
        assert!(
            err(&["--runtime-endpoint", "/x.sock", "--state-dir", "state"]).contains("--state-dir")
        );
    }

    #[test]
    fn detection_order() {
        assert_eq!(detect_runtime(|_| true), PathBuf::from(CONTAINERD_SOCKET));
        assert_eq!(
            detect_runtime(|p| p == Path::new(CRIO_SOCKET)),
            PathBuf::from(CRIO_SOCKET)
        );
        assert_eq!(detect_runtime(|_| false), PathBuf::from(CONTAINERD_SOCKET));
    }
}
