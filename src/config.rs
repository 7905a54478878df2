//! podckptd's configuration: flags, each with an environment variable and a
//! key of the TOML configuration file, and validation at start so a bad
//! setting stops the daemon with a clear message instead of failing on the
//! first call.
//!
//! The settings are defined once, as clap arguments. The file is applied
//! through clap too: each of its keys that neither the command line nor the
//! environment set becomes one more `--key=value` argument, so a value from
//! the file is parsed and checked exactly as the same flag would be.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::cri::client::socket_path;
use crate::node::safe_dir::{TrustedDir, UnsafeDir};

/// containerd's default CRI socket, tried first when no endpoint is given.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// CRI-O's default socket, tried second.
pub const CRIO_SOCKET: &str = "/var/run/crio/crio.sock";
/// Default listening socket of podckptd.
pub const DEFAULT_LISTEN: &str = "/run/podckpt/podckpt.sock";
/// The configuration file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/podckpt/podckptd.toml";
/// The largest configuration file podckptd reads: settings take a few
/// kilobytes; anything far larger is not a configuration file.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// What `podckptd --help` says after the flags.
const CONFIG_HELP: &str = "\
Configuration file:
  Every setting above can also be set in a TOML file (--config, default
  /etc/podckpt/podckptd.toml when it exists) whose keys are the flags' long
  names. Precedence: flags > environment (PODCKPT_*) > file > defaults.
  Unknown keys, wrong types and syntax errors stop podckptd (exit 2) with
  the file's line. The file must be a regular file owned by root that
  group and others cannot write, in a directory likewise. Example:

    runtime-endpoint = \"unix:///run/containerd/containerd.sock\"
    log-format = \"json\"
    max-parallel-dumps = 2
    max-concurrent-streams = 100
    connect-timeout = \"5s\"
    warm-staging = true
    metrics-listen = \"127.0.0.1:9464\"";

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
#[command(name = "podckptd", version, about, long_about = None, after_help = CONFIG_HELP)]
pub struct DaemonConfig {
    /// TOML file of settings (keys: the long flag names). Default:
    /// /etc/podckpt/podckptd.toml if it exists.
    #[arg(long, env = "PODCKPT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

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

    /// The most each runtime call of an undo may take (a failed or
    /// abandoned RestorePod removing the sandbox and containers it
    /// created): a runtime that stops answering cannot hold the undo for
    /// ever. What is left is logged with its id.
    #[arg(long, env = "PODCKPT_UNDO_CALL_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub undo_call_timeout: Duration,

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

    /// The metrics endpoint's limits (connections, request size, timeouts).
    #[command(flatten)]
    pub scrape_limits: crate::metrics::http::ScrapeLimits,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`,
    /// `podckpt=debug`).
    #[arg(
        long,
        env = "PODCKPT_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,

    /// Check the configuration (flags, environment, file) and the
    /// directories podckptd would write into, print what it would use, and
    /// exit: 0 if podckptd would start with it, 2 if not. Nothing is
    /// created and nothing is started (run it before a restart).
    #[arg(long)]
    pub check_config: bool,
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

/// Why the configuration could not be read: from the command line and the
/// environment (clap's error, which also carries `--help` and `--version`),
/// or from the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// clap's: a bad flag or environment value, or help/version output.
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The configuration file's.
    #[error(transparent)]
    File(#[from] FileError),
}

/// A problem with the configuration file. Messages name the file and, for
/// what is in it, the line and the key; they never repeat a value, so a
/// file that is not podckptd's (a `--config` pointed at a secret) is not
/// echoed to the log.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file or a directory above it is not safe to trust.
    #[error("configuration file: {0}")]
    Unsafe(#[from] UnsafeDir),
    /// Reading it failed.
    #[error("{path}: read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Larger than [`MAX_CONFIG_FILE_BYTES`].
    #[error("{path}: larger than {MAX_CONFIG_FILE_BYTES} bytes; not a configuration file")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not UTF-8, or not TOML.
    #[error("{path}:{line}:{column}: TOML syntax error: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A key that is not a setting of podckptd.
    #[error(
        "{path}:{line}: unknown setting `{key}` (keys are the long flag names of podckptd --help)"
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The key.
        key: String,
    },
    /// A value of a TOML type no setting takes (array, table, date).
    #[error("{path}:{line}: `{key}`: wrong type: {found}, expected {expected}")]
    WrongType {
        /// The file.
        path: PathBuf,
        /// 1-based line of the value.
        line: usize,
        /// The key.
        key: String,
        /// The TOML type found.
        found: &'static str,
        /// What the setting takes.
        expected: String,
    },
    /// A value the setting's parser rejects.
    #[error("{path}:{line}: `{key}`: invalid value: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the value.
        line: usize,
        /// The key.
        key: String,
        /// What the setting takes.
        reason: String,
    },
}

impl DaemonConfig {
    /// Reads the configuration of the process: its arguments, the
    /// environment, and the configuration file.
    pub fn load() -> Result<Self, LoadError> {
        Self::load_from(std::env::args_os(), Path::new(DEFAULT_CONFIG_FILE))
    }

    /// The configuration file [`DaemonConfig::load`] read: `--config` (or
    /// `PODCKPT_CONFIG`), else the default file when it exists.
    pub fn config_file_in_use(&self) -> Option<PathBuf> {
        chosen_file(self.config.as_ref(), Path::new(DEFAULT_CONFIG_FILE))
    }

    /// Reads the configuration from `args` (the first is the program's
    /// name), the environment, and the file `--config` (or
    /// `PODCKPT_CONFIG`) names, else `default_file` if it exists.
    /// Precedence: flags > environment > file > built-in defaults.
    pub fn load_from<I, T>(args: I, default_file: &Path) -> Result<Self, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Self::command();
        let matches = cmd.clone().try_get_matches_from(&args)?;
        let path = chosen_file(matches.get_one::<PathBuf>("config"), default_file);
        let Some(path) = path else {
            return Ok(Self::from_arg_matches(&matches)?);
        };
        let text = read_config_file(&path)?;
        let extra = file_args(&cmd, &matches, &path, &text)?;
        if extra.is_empty() {
            return Ok(Self::from_arg_matches(&matches)?);
        }
        args.extend(extra);
        let matches = cmd.try_get_matches_from(&args)?;
        Ok(Self::from_arg_matches(&matches)?)
    }
}

/// The configuration file to read: the one named, else `default_file`.
/// Only a default that is not there at all is skipped: one that cannot be
/// looked at is an error when read, not a silent default.
fn chosen_file(named: Option<&PathBuf>, default_file: &Path) -> Option<PathBuf> {
    match named {
        Some(p) => Some(p.clone()),
        None => match default_file.symlink_metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            _ => Some(default_file.to_path_buf()),
        },
    }
}

/// Reads the configuration file: a trusted regular file (see
/// [`crate::node::safe_dir::open_trusted_path`]), at most
/// [`MAX_CONFIG_FILE_BYTES`], UTF-8.
fn read_config_file(path: &Path) -> Result<String, FileError> {
    let file = crate::node::safe_dir::open_trusted_path(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Read {
            path: path.into(),
            source,
        })?;
    if bytes.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(FileError::TooLarge { path: path.into() });
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.into_bytes()[..at]).into_owned();
        let (line, column) = line_col(&text, at);
        FileError::Syntax {
            path: path.into(),
            line,
            column,
            message: "not UTF-8".into(),
        }
    })
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// The arguments the file adds: `--key=value` for each of its keys that the
/// command line and the environment did not set. Each is checked on its
/// own through clap first, so that an error names its line.
fn file_args(
    cmd: &clap::Command,
    matches: &clap::ArgMatches,
    path: &Path,
    text: &str,
) -> Result<Vec<OsString>, FileError> {
    let table = toml::de::DeTable::parse(text).map_err(|e| {
        let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
        FileError::Syntax {
            path: path.into(),
            line,
            column,
            message: e.message().to_string(),
        }
    })?;
    let mut out = Vec::new();
    for (key, value) in table.get_ref() {
        let key_line = line_col(text, key.span().start).0;
        let value_line = line_col(text, value.span().start).0;
        let name: &str = key.get_ref();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(name))
            .filter(|a| {
                !matches!(
                    a.get_id().as_str(),
                    "config" | "help" | "version" | "check_config"
                )
            })
            .ok_or_else(|| FileError::UnknownKey {
                path: path.into(),
                line: key_line,
                key: name.to_string(),
            })?;
        let expected = || {
            arg.get_value_names()
                .and_then(|n| n.first())
                .map_or_else(|| "a value".to_string(), |n| n.to_string())
        };
        let wrong_type = |found| FileError::WrongType {
            path: path.into(),
            line: value_line,
            key: name.to_string(),
            found,
            expected: expected(),
        };
        use toml::de::DeValue;
        let text_value = match value.get_ref() {
            DeValue::String(s) => s.to_string(),
            DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| wrong_type("an integer out of range"))?
                .to_string(),
            DeValue::Float(f) => f.as_str().to_string(),
            DeValue::Boolean(b) => b.to_string(),
            DeValue::Datetime(_) => return Err(wrong_type("a date-time")),
            DeValue::Array(_) => return Err(wrong_type("an array")),
            DeValue::Table(_) => return Err(wrong_type("a table")),
        };
        let flag = OsString::from(format!("--{name}={text_value}"));
        // The value alone through clap: the same parser and checks as the
        // flag, and an error that can be put on this line. (The process's
        // environment is parsed too, but it passed already.)
        if let Err(e) = cmd
            .clone()
            .try_get_matches_from([OsString::from("podckptd"), flag.clone()])
        {
            return Err(FileError::Invalid {
                path: path.into(),
                line: value_line,
                key: name.to_string(),
                reason: describe_rejection(arg, &e),
            });
        }
        // A bad value is reported even where a flag or the environment
        // overrides it: the file is wrong either way.
        if !matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            out.push(flag);
        }
    }
    Ok(out)
}

/// Why clap rejected a value, without the value: what the setting takes.
fn describe_rejection(arg: &clap::Arg, err: &clap::Error) -> String {
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| p.get_name().to_string())
        .collect();
    let takes = if !possible.is_empty() {
        format!("one of {}", possible.join(", "))
    } else {
        arg.get_value_names()
            .and_then(|n| n.first())
            .map_or_else(|| "a value".to_string(), |n| format!("a {n}"))
    };
    let default = arg
        .get_default_values()
        .first()
        .map(|d| format!(" (default: {})", d.to_string_lossy()))
        .unwrap_or_default();
    let kind = match err.kind() {
        clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation => {
            "not accepted"
        }
        _ => "refused",
    };
    format!("{kind}; expected {takes}{default}")
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
        if self.undo_call_timeout.is_zero() {
            return Err(invalid(
                "undo-call-timeout",
                "must be greater than zero".into(),
            ));
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
        self.scrape_limits
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

impl Validated {
    /// What `--check-config` reports: the directories checked as
    /// [`Validated::prepare_dirs`] would, without creating any (a missing
    /// one is judged by its nearest existing parent), and the runtime
    /// socket. One line per item; an unsafe directory is the error.
    pub fn check(&self, file: Option<&Path>) -> Result<Vec<String>, ConfigError> {
        let c = &self.config;
        let mut lines = vec![match file {
            Some(f) => format!("config file: {}", f.display()),
            None => "config file: none (flags, environment and defaults)".into(),
        }];
        let mut dirs = vec![("state-dir", &c.state_dir), ("restore-dir", &c.restore_dir)];
        if let Some(d) = &c.staging_dir {
            dirs.push(("staging-dir", d));
        }
        for (flag, dir) in dirs {
            let bad = |source| ConfigError::UnsafeDir { flag, source };
            let existing = dir.ancestors().find(|p| p.symlink_metadata().is_ok());
            match existing {
                Some(p) if p == dir.as_path() => {
                    TrustedDir::open(dir).map_err(bad)?;
                    lines.push(format!("{flag}: {} (trusted)", dir.display()));
                }
                Some(p) => {
                    TrustedDir::open(p).map_err(bad)?;
                    lines.push(format!(
                        "{flag}: {} (missing; would be created 0700 under {}, which is trusted)",
                        dir.display(),
                        p.display()
                    ));
                }
                None => lines.push(format!("{flag}: {} (missing)", dir.display())),
            }
        }
        lines.push(format!("listen: {}", c.listen.display()));
        let up = if self.runtime_socket.exists() {
            "present"
        } else {
            "not there now; podckptd would connect once it is"
        };
        lines.push(format!("runtime: {} ({up})", self.runtime_socket.display()));
        if let Some(addr) = c.metrics_listen {
            lines.push(format!("metrics: http://{addr}/metrics"));
        }
        Ok(lines)
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
        assert!(err(&[
            "--runtime-endpoint",
            "/x.sock",
            "--metrics-max-request-bytes",
            "4096"
        ])
        .contains("--metrics-max-request-bytes"));
        assert!(
            err(&["--runtime-endpoint", "/x.sock", "--state-dir", "state"]).contains("--state-dir")
        );
    }

    /// A configuration file in a private temp dir (trusted: ours, 0700).
    fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podckptd.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        (dir, path)
    }

    fn load(args: &[&str], default_file: &Path) -> Result<DaemonConfig, LoadError> {
        let mut argv = vec!["podckptd"];
        argv.extend_from_slice(args);
        DaemonConfig::load_from(argv, default_file)
    }

    fn file_err(text: &str) -> FileError {
        let (_dir, path) = config_file(text);
        let p = path.to_str().unwrap();
        match load(&["--config", p], Path::new("/nonexistent")) {
            Err(LoadError::File(e)) => e,
            other => panic!("expected a file error, got {other:?}"),
        }
    }

    #[test]
    fn file_env_flag_precedence() {
        let (_dir, path) = config_file(
            "# podckptd's settings\n\
             zstd-workers = 3\n\
             max-parallel-dumps = 5\n\
             log-format = \"json\"\n\
             max-archive-entries = 9\n\
             connect-timeout = \"7s\"\n\
             warm-staging = false\n\
             max-restore-bytes = \"1G\"\n\
             max-concurrent-streams = 0x20\n",
        );
        let none = Path::new("/nonexistent/podckptd.toml");
        let p = path.to_str().unwrap();
        // File over defaults.
        let c = load(&["--config", p], none).unwrap();
        assert_eq!(c.zstd_workers, 3);
        assert_eq!(c.max_parallel_dumps, 5);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.max_archive_entries, 9);
        assert_eq!(c.connect_timeout, Duration::from_secs(7));
        assert!(!c.warm_staging);
        assert_eq!(c.max_restore_bytes, 1 << 30);
        assert_eq!(c.limits.max_concurrent_streams, 32);
        // Untouched settings keep their defaults.
        assert_eq!(c.limits.max_connections, parse(&[]).limits.max_connections);
        assert_eq!(c.listen, PathBuf::from(DEFAULT_LISTEN));

        // The default file is read when it exists and no --config is given;
        // a missing default file is no error.
        assert_eq!(load(&[], &path).unwrap().zstd_workers, 3);
        assert_eq!(load(&[], none).unwrap().zstd_workers, 0);

        // Environment over the file, flags over both. The only test that
        // sets these variables (tests run in threads of one process).
        std::env::set_var("PODCKPT_ZSTD_WORKERS", "4");
        std::env::set_var("PODCKPT_MAX_ARCHIVE_ENTRIES", "11");
        let c = load(
            &[
                "--config",
                p,
                "--max-parallel-dumps",
                "6",
                "--max-archive-entries=12",
            ],
            none,
        );
        std::env::remove_var("PODCKPT_ZSTD_WORKERS");
        std::env::remove_var("PODCKPT_MAX_ARCHIVE_ENTRIES");
        let c = c.unwrap();
        assert_eq!(c.zstd_workers, 4, "environment over file");
        assert_eq!(c.max_parallel_dumps, 6, "flag over file");
        assert_eq!(c.max_archive_entries, 12, "flag over environment");
        assert_eq!(c.log_format, LogFormat::Json, "file over default");
    }

    #[test]
    fn file_errors_name_the_line_and_key() {
        let e = file_err("zstd-workers = 1\n\nmax-paralel-dumps = 2\n");
        assert!(
            matches!(&e, FileError::UnknownKey { line: 3, key, .. } if key == "max-paralel-dumps"),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains(":3: unknown setting `max-paralel-dumps`"),
            "{e}"
        );

        let e = file_err("log = \"info\"\nmax-parallel-dumps = [1, 2]\n");
        assert!(
            matches!(&e, FileError::WrongType { line: 2, key, found: "an array", .. } if key == "max-parallel-dumps"),
            "{e:?}"
        );

        let e = file_err("\n\nmax-parallel-dumps = \"many-secret\"\n");
        assert!(
            matches!(&e, FileError::Invalid { line: 3, key, .. } if key == "max-parallel-dumps"),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(":3: `max-parallel-dumps`: invalid value"),
            "{msg}"
        );
        assert!(
            !msg.contains("many-secret"),
            "the value is not echoed: {msg}"
        );

        // An enum value: the message lists what is accepted.
        let e = file_err("log-format = \"xml\"\n");
        assert!(e.to_string().contains("one of text, json"), "{e}");

        // A bool where a setting takes a duration.
        let e = file_err("connect-timeout = true\n");
        assert!(matches!(e, FileError::Invalid { line: 1, .. }), "{e:?}");

        // TOML syntax: a missing quote on line 2, a duplicate key on line 3.
        let e = file_err("log = \"info\"\nlog-format = \"json\n");
        assert!(matches!(e, FileError::Syntax { line: 2, .. }), "{e:?}");
        assert!(e.to_string().contains(":2:"), "{e}");
        let e = file_err("zstd-workers = 1\nlog = \"info\"\nzstd-workers = 2\n");
        assert!(matches!(e, FileError::Syntax { line: 3, .. }), "{e:?}");

        // Tables are not settings; neither are --config, --help, --version.
        let e = file_err("zstd-workers = 1\n[limits]\nmax-connections = 2\n");
        assert!(
            matches!(&e, FileError::UnknownKey { line: 2, key, .. } if key == "limits"),
            "{e:?}"
        );
        let e = file_err("config = \"/etc/other.toml\"\n");
        assert!(matches!(e, FileError::UnknownKey { line: 1, .. }), "{e:?}");

        // Not UTF-8, on line 2.
        let (_dir, path) = config_file("");
        std::fs::write(&path, b"log = \"info\"\nlog-format = \"\xff\"\n").unwrap();
        let e = load(
            &["--config", path.to_str().unwrap()],
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(
            matches!(e, LoadError::File(FileError::Syntax { line: 2, .. })),
            "{e:?}"
        );
    }

    #[test]
    fn unsafe_or_missing_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, path) = config_file("zstd-workers = 1\n");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let p = path.to_str().unwrap();
        let e = load(&["--config", p], Path::new("/nonexistent")).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                LoadError::File(FileError::Unsafe(UnsafeDir::Writable { .. }))
            ),
            "{e:?}"
        );
        assert!(msg.contains(p), "names the path: {msg}");
        assert!(!msg.contains("zstd-workers"), "no content: {msg}");
        // A --config that is not there is an error (only the default file
        // is optional).
        let gone = path.with_file_name("gone.toml");
        let e = load(
            &["--config", gone.to_str().unwrap()],
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(matches!(e, LoadError::File(FileError::Unsafe(_))), "{e:?}");
        // Too large.
        let (_dir2, big) = config_file(&"#".repeat(MAX_CONFIG_FILE_BYTES as usize + 1));
        let e = load(
            &["--config", big.to_str().unwrap()],
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(
            matches!(e, LoadError::File(FileError::TooLarge { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn line_columns() {
        assert_eq!(line_col("", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab\n", 3), (2, 1));
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
