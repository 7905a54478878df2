//! `podckpt-runc`: the OCI runtime the container runtime is configured to
//! use in place of runc (containerd: the runc runtime's `BinaryName`; CRI-O:
//! `runtime_path`).
//!
//! Every invocation is handed to the real runc with its arguments and stdio
//! untouched (by `exec`, so it costs one stat at most), except for
//! containers podckptd registered for restore:
//! - `create` applies the checkpoint's rootfs diff and deletions to the
//!   bundle's rootfs, recreates missing bind-mount sources, restores the
//!   pod's /dev/shm (once per pod), and runs `runc restore --detach` with
//!   the container's CRIU images, in the same bundle and with the same
//!   pid-file and console-socket as the create it replaces. The runtime
//!   then owns the restored process exactly as if it had created it. CRIU
//!   leaves the restored processes stopped: none runs before `start`.
//! - the `start` that follows continues them (`runc kill --all ID CONT`)
//!   and drops the registration; a `start` of a container
//!   still registered but never restored (its `create` ran without the
//!   restore) fails and says so, rather than run it from its image;
//! - `delete` passes through and drops any registration left;
//! - `state` between the two says `created` (runc would say `running`):
//!   CRI-O runs `create` inside CreateContainer and refuses to start a
//!   container that is not `created`.
//!
//! A container is registered by its id, or, when its runtime runs `create`
//! before podckptd learns the id (CRI-O runs it inside CreateContainer), by
//! the key in its bundle's [`RESTORE_KEY_ANNOTATION`]: `create` reads the
//! bundle's `config.json` for it only while such keyed registrations exist.
//!
//! It never writes to the stdio it passes on: its own messages go to a log
//! file, and errors also to runc's `--log` file in runc's JSON format, where
//! containerd's shim looks for the reason of a failure.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::lazy::{self, LazyServer};
use super::progress::Progress;
use super::registration::{Registration, Registry, Stage, RESTORE_KEY_ANNOTATION};
use crate::node::rootfs_diff;
use crate::node::safe_dir::{create_new_file, replace_file_via};
use crate::node::tree::copy_contents;

/// How long a lazy-pages daemon may take to listen before the restore goes
/// on without it.
const LAZY_READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a container waiting for its files looks again.
const EXTRACT_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Default restore dir, shared with podckptd's `--restore-dir`.
pub const DEFAULT_RESTORE_DIR: &str = "/run/podckpt/restore";
/// Default log file.
pub const DEFAULT_LOG: &str = "/var/log/podckpt/podckpt-runc.log";
/// Where the real runc is looked for when `PODCKPT_RUNC` is not set.
const RUNC_CANDIDATES: &[&str] = &[
    "/usr/sbin/runc",
    "/usr/bin/runc",
    "/usr/local/sbin/runc",
    "/usr/local/bin/runc",
];

/// The wrapper's settings, from the environment the runtime gives it.
#[derive(Clone, Debug)]
pub struct WrapperConfig {
    /// The real runc.
    pub runc: PathBuf,
    /// podckptd's restore dir.
    pub restore_dir: PathBuf,
    /// The wrapper's log file.
    pub log: PathBuf,
    /// The CRIU runc restore uses, when not the one on PATH.
    pub criu: Option<PathBuf>,
}

impl WrapperConfig {
    /// `PODCKPT_RUNC`, `PODCKPT_RESTORE_DIR`, `PODCKPT_RUNC_LOG`,
    /// `PODCKPT_CRIU`, with defaults that fit a standard install.
    pub fn from_env() -> Result<Self, String> {
        let runc = match std::env::var_os("PODCKPT_RUNC") {
            Some(p) => PathBuf::from(p),
            None => {
                let me = std::env::current_exe()
                    .ok()
                    .and_then(|p| p.canonicalize().ok());
                RUNC_CANDIDATES
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.exists() && p.canonicalize().ok() != me)
                    .ok_or("podckpt-runc: no runc found; set PODCKPT_RUNC to the real runc")?
            }
        };
        Ok(Self {
            runc,
            restore_dir: std::env::var_os("PODCKPT_RESTORE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_RESTORE_DIR.into()),
            log: log_path_from_env(),
            criu: std::env::var_os("PODCKPT_CRIU").map(PathBuf::from),
        })
    }
}

/// `PODCKPT_RUNC_LOG`, else the default log file.
fn log_path_from_env() -> PathBuf {
    std::env::var_os("PODCKPT_RUNC_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_LOG.into())
}

/// runc's global options that take a value (`--root X`).
const GLOBAL_WITH_VALUE: &[&str] = &["root", "log", "log-format", "criu", "rootless"];
/// `runc create` options that take a value.
const CREATE_WITH_VALUE: &[&str] = &["bundle", "b", "pid-file", "console-socket", "preserve-fds"];

/// A runc command line taken apart as far as the wrapper needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Invocation {
    /// Everything before the command (runc's global options), verbatim.
    pub globals: Vec<OsString>,
    /// `create`, `start`, ...
    pub command: String,
    /// The command's options, verbatim.
    pub options: Vec<OsString>,
    /// The container id (the first operand).
    pub id: Option<String>,
    /// `--log` file, if given.
    pub log: Option<PathBuf>,
}

fn flag_name(arg: &str) -> Option<(&str, bool)> {
    let name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    match name.split_once('=') {
        Some((n, _)) => Some((n, true)),
        None => Some((name, false)),
    }
}

fn has_flag(args: &[OsString], name: &str) -> bool {
    args.iter()
        .any(|a| flag_name(&a.to_string_lossy()).is_some_and(|(n, _)| n == name))
}

impl Invocation {
    /// Parses `args` (without argv[0]).
    pub fn parse(args: &[OsString]) -> Self {
        let mut inv = Invocation::default();
        let mut i = 0;
        while i < args.len() {
            let a = args[i].to_string_lossy();
            match flag_name(&a) {
                Some((name, inline)) => {
                    inv.globals.push(args[i].clone());
                    let value = if inline {
                        a.split_once('=').map(|(_, v)| OsString::from(v))
                    } else if GLOBAL_WITH_VALUE.contains(&name) && i + 1 < args.len() {
                        i += 1;
                        inv.globals.push(args[i].clone());
                        Some(args[i].clone())
                    } else {
                        None
                    };
                    if name == "log" {
                        inv.log = value.map(PathBuf::from);
                    }
                }
                None => {
                    inv.command = a.into_owned();
                    i += 1;
                    break;
                }
            }
            i += 1;
        }
        while i < args.len() {
            let a = args[i].to_string_lossy();
            match flag_name(&a) {
                Some((name, inline)) if a != "-" => {
                    inv.options.push(args[i].clone());
                    if !inline && inv.command == "create" && CREATE_WITH_VALUE.contains(&name) {
                        if let Some(v) = args.get(i + 1) {
                            inv.options.push(v.clone());
                            i += 1;
                        }
                    }
                }
                _ => {
                    inv.id = Some(a.into_owned());
                    break;
                }
            }
            i += 1;
        }
        inv
    }

    /// The value of a command option (`--bundle B`, `--bundle=B`, `-b B`).
    pub fn option(&self, names: &[&str]) -> Option<OsString> {
        let mut it = self.options.iter();
        while let Some(a) = it.next() {
            let s = a.to_string_lossy();
            if let Some((name, inline)) = flag_name(&s) {
                if names.contains(&name) {
                    return if inline {
                        s.split_once('=').map(|(_, v)| OsString::from(v))
                    } else {
                        it.next().cloned()
                    };
                }
            }
        }
        None
    }

    /// Whether a boolean command option is present.
    pub fn has(&self, name: &str) -> bool {
        has_flag(&self.options, name)
    }

    /// Whether a global option (before the command) is present.
    pub fn has_global(&self, name: &str) -> bool {
        has_flag(&self.globals, name)
    }
}

/// Runs the wrapper; returns the exit code (when it did not exec runc).
pub fn run(args: Vec<OsString>) -> i32 {
    if std::env::var_os(lazy::SERVE_ENV).is_some() {
        let log_path = log_path_from_env();
        return lazy::serve(&args, &|m| log(&log_path, m));
    }
    let cfg = match WrapperConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            // Nothing to hand over to: say so where the shim looks.
            let _ = writeln!(std::io::stderr(), "{e}");
            return 1;
        }
    };
    let inv = Invocation::parse(&args);
    let registry = Registry::new(&cfg.restore_dir);
    let mut registered = matches!(
        inv.command.as_str(),
        "create" | "start" | "delete" | "state"
    ) && inv
        .id
        .as_deref()
        .is_some_and(|id| registry.is_registered(id));
    if !registered && inv.command == "create" && registry.has_keys() {
        if let Some(id) = inv.id.as_deref() {
            match bind_by_key(&registry, &inv, id) {
                Ok(Some(key)) => {
                    log(
                        &cfg.log,
                        &format!("{id}: registered for restore by key {key}"),
                    );
                    registered = true;
                }
                Ok(None) => {}
                Err(msg) => {
                    log(&cfg.log, &format!("{id}: {msg}"));
                    let _ = writeln!(std::io::stderr(), "podckpt-runc: {msg}");
                    return 1;
                }
            }
        }
    }
    if !registered {
        // The common case: become runc, stdio and all.
        let err = Command::new(&cfg.runc).args(&args).exec();
        log(&cfg.log, &format!("exec {}: {err}", cfg.runc.display()));
        return 127;
    }
    let id = inv.id.clone().unwrap_or_default();
    let w = Wrapper {
        cfg,
        registry,
        inv,
        args,
        id,
    };
    match w.inv.command.as_str() {
        "create" => w.create(),
        "start" => w.start(),
        "state" => w.state(),
        _ => w.delete(),
    }
}

struct Wrapper {
    cfg: WrapperConfig,
    registry: Registry,
    inv: Invocation,
    args: Vec<OsString>,
    id: String,
}

impl Wrapper {
    fn log(&self, msg: &str) {
        log(&self.cfg.log, &format!("{}: {msg}", self.id));
    }

    /// Reports a failure where the shim reads runc's errors, and in our log.
    fn fail(&self, msg: &str) -> i32 {
        self.log(msg);
        if let Some(path) = &self.inv.log {
            let line = serde_json::json!({
                "level": "error",
                "msg": format!("podckpt-runc: {msg}"),
                "time": humantime::format_rfc3339(SystemTime::now()).to_string(),
            });
            if let Ok(mut f) = fs::OpenOptions::new().append(true).create(true).open(path) {
                let _ = writeln!(f, "{line}");
            }
        }
        1
    }

    /// A failed `start`, also on stderr: `start` has no container stdio,
    /// and its stderr is what the runtime reports (CRI-O puts it in
    /// StartContainer's error, which reaches the kubelet's events).
    fn fail_start(&self, msg: &str) -> i32 {
        eprintln!("podckpt-runc: {msg}");
        self.fail(msg)
    }

    fn exec_runc(&self) -> i32 {
        let err = Command::new(&self.cfg.runc).args(&self.args).exec();
        self.fail(&format!("exec {}: {err}", self.cfg.runc.display()))
    }

    fn create(&self) -> i32 {
        let reg = match self.registry.load(&self.id) {
            Ok(Some(r)) if r.stage == Stage::Pending => r,
            // Already restored once (a retried create): let runc say what
            // it thinks of a second create.
            Ok(_) => return self.exec_runc(),
            Err(e) => return self.fail(&format!("unreadable restore registration: {e}")),
        };
        self.log(&format!(
            "restoring {} from {}",
            reg.name,
            reg.container_dir.display()
        ));
        let started = std::time::Instant::now();
        match self.restore(&reg) {
            Ok(lazy) => {
                let mut done = reg.clone();
                done.stage = Stage::Restored;
                if let Err(e) = self.registry.store(&done) {
                    self.log(&format!("marking restored: {e}"));
                }
                // The images are in memory (tmpfs) and no longer needed,
                // unless pages are still being served from them.
                if !lazy {
                    let _ = fs::remove_dir_all(reg.images_dir());
                }
                self.log(&format!(
                    "restored in {:?}{}",
                    started.elapsed(),
                    if lazy { " (memory filling lazily)" } else { "" }
                ));
                0
            }
            Err(msg) => {
                let code = self.fail(&msg);
                self.keep_restore_log(&reg);
                if let Err(e) = self.registry.remove(&self.id) {
                    self.log(&format!("removing registration: {e}"));
                }
                code
            }
        }
    }

    /// Restores the container; true if its memory is still being filled
    /// by a lazy-pages daemon, which then owns (and removes) the images.
    fn restore(&self, reg: &Registration) -> Result<bool, String> {
        if !reg.wait_groups.is_empty() {
            // RestorePod answered before the archive was fully extracted:
            // wait for this container's part (and the pod's /dev/shm).
            let t = std::time::Instant::now();
            Progress::of(&reg.work_dir).wait(&reg.wait_groups, EXTRACT_POLL)?;
            self.log(&format!("files ready after waiting {:?}", t.elapsed()));
        }
        let bundle = PathBuf::from(
            self.inv
                .option(&["bundle", "b"])
                .unwrap_or_else(|| OsString::from(".")),
        );
        let spec_path = bundle.join("config.json");
        let spec_bytes =
            fs::read(&spec_path).map_err(|e| format!("read {}: {e}", spec_path.display()))?;
        let spec: serde_json::Value = serde_json::from_slice(&spec_bytes)
            .map_err(|e| format!("parse {}: {e}", spec_path.display()))?;
        let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
        let rootfs = if Path::new(root).is_absolute() {
            PathBuf::from(root)
        } else {
            bundle.join(root)
        };

        // The rootfs as it was at the cut.
        let deleted: Vec<String> = match fs::read(reg.container_dir.join("deleted.files")) {
            Ok(d) => serde_json::from_slice(&d).map_err(|e| format!("deleted.files: {e}"))?,
            Err(_) => vec![],
        };
        let diff = reg.container_dir.join("rootfs-diff.tar");
        let diff = diff.exists().then_some(diff);
        rootfs_diff::apply_diff(&rootfs, &deleted, diff.as_deref()).map_err(|e| e.to_string())?;

        // Bind-mount sources CRIU will look for (a volume dir removed since).
        let mounts = spec["mounts"].as_array().cloned().unwrap_or_default();
        for m in &mounts {
            let is_bind = m["type"] == "bind"
                || m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"));
            if let (true, Some(src)) = (is_bind, m["source"].as_str()) {
                let src = Path::new(src);
                if src.is_absolute() && fs::symlink_metadata(src).is_err() {
                    fs::create_dir_all(src)
                        .map_err(|e| format!("recreate bind source {}: {e}", src.display()))?;
                    self.log(&format!("recreated missing bind source {}", src.display()));
                }
            }
        }

        // The pod's /dev/shm, once per pod: the first container's create
        // claims it, before any restored process runs.
        if let Some(shm) = &reg.devshm_dir {
            let target = mounts
                .iter()
                .find(|m| m["destination"] == "/dev/shm")
                .and_then(|m| m["source"].as_str())
                .map(PathBuf::from);
            if let (Some(target), true) = (target, shm.is_dir()) {
                let claim = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(reg.work_dir.join("devshm.applied"));
                if claim.is_ok() && target.is_dir() {
                    copy_contents(shm, &target)
                        .map_err(|e| format!("restore /dev/shm into {}: {e}", target.display()))?;
                    self.log(&format!("restored /dev/shm into {}", target.display()));
                }
            }
        }

        // A pid namespace shared by the pod (the CRI default): keep new
        // processes off the checkpointed pids of containers not restored yet.
        if let Some(ns) = spec["linux"]["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["type"] == "pid"))
            .and_then(|n| n["path"].as_str())
        {
            let top = max_checkpointed_pid(&reg.work_dir);
            if top > 0 {
                raise_last_pid(Path::new(ns), top)
                    .map_err(|e| format!("reserving pids up to {top} in {ns}: {e}"))?;
                self.log(&format!("pids up to {top} reserved in {ns}"));
            }
        }

        // runc restore, in place of the create.
        let work = reg.container_dir.join("restore-work");
        fs::create_dir_all(&work).map_err(|e| format!("create {}: {e}", work.display()))?;
        let mut cmd = Command::new(&self.cfg.runc);
        cmd.args(&self.inv.globals);
        // The CRIU comes from the wrapper's own configuration (the
        // runtime's environment: PODCKPT_CRIU), never from the
        // registration: what runs as root is chosen by root's config.
        let criu = self.cfg.criu.as_ref();
        if let (Some(criu), false) = (criu, self.inv.has_global("criu")) {
            cmd.arg("--criu").arg(criu);
        }
        cmd.arg("restore")
            .arg("--detach")
            .arg("--bundle")
            .arg(&bundle)
            .arg("--image-path")
            .arg(reg.images_dir())
            .arg("--work-path")
            .arg(&work);
        for (names, flag) in [
            (&["pid-file"][..], "--pid-file"),
            (&["console-socket"][..], "--console-socket"),
        ] {
            if let Some(v) = self.inv.option(names) {
                cmd.arg(flag).arg(v);
            }
        }
        for flag in ["no-pivot", "no-new-keyring"] {
            if self.inv.has(flag) {
                cmd.arg(format!("--{flag}"));
            }
        }
        if reg.tcp_established {
            cmd.arg("--tcp-established");
        }
        if reg.file_locks {
            cmd.arg("--file-locks");
        }
        if reg.ext_unix_sk {
            cmd.arg("--ext-unix-sk");
        }
        // The processes stay stopped until the runtime's `start`; the
        // bundle's config.json is as the runtime wrote it again, and our
        // CRIU configuration gone, once runc is done (the guard, on every
        // path).
        let _criu_conf = self.leave_stopped(reg, &spec_path, &spec_bytes, &spec)?;
        let mut server = None;
        if reg.lazy_pages {
            let criu = criu.cloned().unwrap_or_else(|| PathBuf::from("criu"));
            let t = std::time::Instant::now();
            let pid_file = self.inv.option(&["pid-file"]).map(PathBuf::from);
            match LazyServer::start(
                &self.id,
                &criu,
                &reg.images_dir(),
                &work,
                pid_file.as_deref(),
                LAZY_READY_WITHIN,
            ) {
                Ok(s) => {
                    self.log(&format!("lazy-pages daemon ready after {:?}", t.elapsed()));
                    cmd.arg("--lazy-pages");
                    server = Some(s);
                }
                // Slower, but the container comes back all the same.
                Err(e) => self.log(&format!("restoring eagerly: {e}")),
            }
        }
        cmd.arg(&self.id);
        // runc restore inherits our stdio: those are the container's
        // pipes, which it hands to the restored process (descriptors.json).
        let failure = match cmd.status() {
            Ok(status) if status.success() => return Ok(server.is_some()),
            Ok(status) => format!(
                "runc restore failed ({status}); CRIU's restore log: {}",
                self.failed_log_path().display()
            ),
            Err(e) => format!("run {}: {e}", self.cfg.runc.display()),
        };
        if let Some(server) = server {
            server.kill();
        }
        Err(failure)
    }

    /// Has CRIU leave the restored processes stopped, so that none runs
    /// before the runtime's `start`: the contract has a restored container
    /// created and not yet executing until StartContainer, and CRI-O runs
    /// `create` inside CreateContainer, long before it. runc has no flag
    /// for CRIU's `leave-stopped`; it hands CRIU the configuration file an
    /// `org.criu.config` annotation names (else `/etc/criu/runc.conf`), so
    /// the bundle's spec names ours for the restore. Ours carries root's
    /// `/etc/criu/runc.conf` first, so an operator's settings still apply.
    fn leave_stopped(
        &self,
        reg: &Registration,
        spec_path: &Path,
        original: &[u8],
        spec: &serde_json::Value,
    ) -> Result<RestoreCriuConf, String> {
        let conf = reg.container_dir.join(CRIU_RESTORE_CONF);
        let mut text = match runc_criu_conf() {
            Ok(t) => t,
            Err(e) => {
                self.log(&format!("not carrying {RUNC_CRIU_CONF} over: {e}"));
                String::new()
            }
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(
            "# podckpt-runc: the processes run from the runtime's `start`\nleave-stopped\n",
        );
        let _ = fs::remove_file(&conf);
        write_new(&conf, text.as_bytes(), 0o600)?;
        if let Some(theirs) = spec["annotations"][CRIU_CONFIG_ANNOTATION].as_str() {
            self.log(&format!(
                "the container's {CRIU_CONFIG_ANNOTATION} ({theirs}) is replaced by {} for the restore",
                conf.display()
            ));
        }
        let mut patched = spec.clone();
        if !patched["annotations"].is_object() {
            patched["annotations"] = serde_json::json!({});
        }
        patched["annotations"][CRIU_CONFIG_ANNOTATION] = conf.display().to_string().into();
        let bytes = serde_json::to_vec(&patched).map_err(|e| format!("encode spec: {e}"))?;
        let guard = RestoreCriuConf {
            spec: spec_path.to_path_buf(),
            original: original.to_vec(),
            conf,
            log: self.cfg.log.clone(),
        };
        replace_file(spec_path, &bytes)?;
        Ok(guard)
    }

    fn failed_log_path(&self) -> PathBuf {
        self.cfg
            .log
            .parent()
            .unwrap_or(Path::new("/tmp"))
            .join(format!("restore-{}.log", self.id))
    }

    /// Keeps CRIU's restore.log next to our log before the work dir goes.
    fn keep_restore_log(&self, reg: &Registration) {
        let src = reg.container_dir.join("restore-work").join("restore.log");
        let _ = fs::copy(&src, self.failed_log_path());
    }

    fn start(&self) -> i32 {
        match self.registry.load(&self.id) {
            Ok(Some(r)) if r.stage == Stage::Restored => {
                // CRIU left every restored process stopped (see
                // `leave_stopped`): they run from here. runc signals each
                // process in the container's cgroup.
                let status = Command::new(&self.cfg.runc)
                    .args(&self.inv.globals)
                    .args(["kill", "--all"])
                    .arg(&self.id)
                    .arg("CONT")
                    .status();
                if let Err(e) = self.registry.remove(&self.id) {
                    self.log(&format!("removing registration: {e}"));
                }
                match status {
                    Ok(s) if s.success() => {
                        self.log("start after restore: processes continued");
                        0
                    }
                    Ok(s) => self.fail_start(&format!(
                        "could not continue the restored processes of {}: runc kill --all CONT: {s}",
                        r.name
                    )),
                    Err(e) => self.fail_start(&format!("run {}: {e}", self.cfg.runc.display())),
                }
            }
            Ok(Some(r)) => {
                // Registered, but its create ran without the restore (the
                // registration came after it): starting it would run the
                // image from scratch while the caller expects its state back.
                if let Err(e) = self.registry.remove(&self.id) {
                    self.log(&format!("removing registration: {e}"));
                }
                let msg = format!(
                    "container {} is registered for restore but was created without it (the registration was not in place when the runtime ran create): refusing to start it from its image",
                    r.name
                );
                self.fail_start(&msg)
            }
            _ => self.exec_runc(),
        }
    }

    /// `state` of a container restored at `create` but not started yet:
    /// runc says `running`, the runtime expects `created` until its
    /// StartContainer (CRI-O checks it, and refuses to start a container
    /// that is not `created`).
    fn state(&self) -> i32 {
        match self.registry.load(&self.id) {
            Ok(Some(r)) if r.stage == Stage::Restored => {}
            _ => return self.exec_runc(),
        }
        let out = match Command::new(&self.cfg.runc).args(&self.args).output() {
            Ok(o) => o,
            Err(e) => return self.fail(&format!("run {}: {e}", self.cfg.runc.display())),
        };
        let mut stdout = out.stdout;
        if out.status.success() {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&stdout) {
                if v["status"] == "running" {
                    v["status"] = "created".into();
                    if let Ok(b) = serde_json::to_vec_pretty(&v) {
                        stdout = b;
                    }
                }
            }
        }
        let _ = std::io::stdout().write_all(&stdout);
        let _ = std::io::stderr().write_all(&out.stderr);
        out.status.code().unwrap_or(1)
    }

    fn delete(&self) -> i32 {
        let status = Command::new(&self.cfg.runc).args(&self.args).status();
        if let Err(e) = self.registry.remove(&self.id) {
            self.log(&format!("removing registration: {e}"));
        }
        match status {
            Ok(s) => s.code().unwrap_or(1),
            Err(e) => self.fail(&format!("run {}: {e}", self.cfg.runc.display())),
        }
    }
}

/// The annotation through which runc hands CRIU a configuration file.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// runc's CRIU configuration file when no annotation names one.
const RUNC_CRIU_CONF: &str = "/etc/criu/runc.conf";
/// Our CRIU configuration for one restore, in the container's dir.
const CRIU_RESTORE_CONF: &str = "criu-restore.conf";
/// The most of `/etc/criu/runc.conf` carried over.
const MAX_CRIU_CONF_BYTES: u64 = 64 * 1024;

/// The text of root's `/etc/criu/runc.conf`, empty when there is none. It
/// is opened as a trusted file (root's, no link, writable by nobody else):
/// its options reach CRIU, which runs as root.
fn runc_criu_conf() -> Result<String, String> {
    use std::io::Read;
    match fs::symlink_metadata(RUNC_CRIU_CONF) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        _ => {}
    }
    let f = crate::node::safe_dir::open_trusted_path(Path::new(RUNC_CRIU_CONF))
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(MAX_CRIU_CONF_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    if text.len() as u64 > MAX_CRIU_CONF_BYTES {
        return Err(format!("larger than {MAX_CRIU_CONF_BYTES} bytes"));
    }
    Ok(text)
}

/// Creates `path` (which must not exist) with `data` and `mode`.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    create_new_file(path, data, mode).map_err(|e| format!("write {}: {e}", path.display()))
}

/// Replaces `path` with `data` in one rename, keeping its mode.
fn replace_file(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::symlink_metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .map_err(|e| format!("stat {}: {e}", path.display()))?;
    let tmp = path.with_extension("json.podckpt-tmp");
    let _ = fs::remove_file(&tmp);
    replace_file_via(&tmp, path, data, mode).map_err(|e| format!("replace {}: {e}", path.display()))
}

/// Undoes [`Wrapper::leave_stopped`] once runc restore is done: the
/// bundle's spec as the runtime wrote it, and our CRIU configuration gone.
/// runc keeps the annotation among the container's labels and would hand
/// the file to CRIU again at a later `runc checkpoint`, where
/// `leave-stopped` (which overrides runc's own options) would leave the
/// container stopped after the dump; CRIU skips a file that is not there.
struct RestoreCriuConf {
    spec: PathBuf,
    original: Vec<u8>,
    conf: PathBuf,
    log: PathBuf,
}

impl Drop for RestoreCriuConf {
    fn drop(&mut self) {
        if let Err(e) = replace_file(&self.spec, &self.original) {
            log(&self.log, &format!("putting the bundle's spec back: {e}"));
        }
        if let Err(e) = fs::remove_file(&self.conf) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log(&self.log, &format!("removing {}: {e}", self.conf.display()));
            }
        }
    }
}

/// Binds a registration stored under the key in the bundle's
/// `config.json` annotations to `id`; the key if there was one for it.
fn bind_by_key(registry: &Registry, inv: &Invocation, id: &str) -> Result<Option<String>, String> {
    let bundle = PathBuf::from(
        inv.option(&["bundle", "b"])
            .unwrap_or_else(|| OsString::from(".")),
    );
    let spec_path = bundle.join("config.json");
    let Ok(data) = fs::read(&spec_path) else {
        // runc will say what is wrong with the bundle.
        return Ok(None);
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&data) else {
        return Ok(None);
    };
    let Some(key) = spec["annotations"][RESTORE_KEY_ANNOTATION].as_str() else {
        return Ok(None);
    };
    match registry.bind_key(key, id) {
        Ok(Some(_)) => Ok(Some(key.to_owned())),
        // A key copied from another container's config (nothing waits
        // under it): an ordinary create.
        Ok(None) => Ok(None),
        Err(e) => Err(format!("restore registration under key {key}: {e}")),
    }
}

/// The highest pid (as seen in the container's pid namespace) among the
/// CRIU images under `dir`: CRIU names `core-<pid>.img` by the pid it must
/// restore.
fn max_checkpointed_pid(dir: &Path) -> i32 {
    fn walk(dir: &Path, depth: usize, top: &mut i32) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(pid) = name
                .strip_prefix("core-")
                .and_then(|n| n.strip_suffix(".img"))
                .and_then(|n| n.parse::<i32>().ok())
            {
                *top = (*top).max(pid);
            } else if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), depth - 1, top);
            }
        }
    }
    let mut top = 0;
    walk(dir, 4, &mut top);
    top
}

/// Moves the pid allocator of the pid namespace at `ns` past `pid`: CRIU
/// restores each process under its old pid, and in a namespace shared by
/// the pod, processes restored earlier keep forking. Writing
/// `ns_last_pid` needs a process inside the namespace: a child joins it
/// and forks one that writes, then both exit.
fn raise_last_pid(ns: &Path, pid: i32) -> Result<(), String> {
    use nix::sched::{setns, CloneFlags};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    let nsfile = fs::File::open(ns).map_err(|e| e.to_string())?;
    // SAFETY: podckpt-runc is single-threaded here; the children only make
    // raw syscalls and _exit.
    match unsafe { fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => {
            let code = (|| {
                setns(&nsfile, CloneFlags::CLONE_NEWPID).ok()?;
                match unsafe { fork() }.ok()? {
                    ForkResult::Child => {
                        let path = "/proc/sys/kernel/ns_last_pid";
                        let cur: i32 = fs::read_to_string(path).ok()?.trim().parse().ok()?;
                        if cur < pid {
                            fs::write(path, pid.to_string()).ok()?;
                        }
                        Some(0)
                    }
                    ForkResult::Parent { child } => match waitpid(child, None).ok()? {
                        WaitStatus::Exited(_, 0) => Some(0),
                        _ => None,
                    },
                }
            })()
            .unwrap_or(1);
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            other => Err(format!("helper ended {other:?}")),
        },
    }
}

/// Appends a line to the log file (0600); errors are ignored: the wrapper
/// must never fail a container operation because logging failed.
fn log(path: &Path, msg: &str) {
    if let Some(dir) = path.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    if let Ok(mut f) = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
    {
        let _ = writeln!(f, "{now:.3} [{}] {msg}", std::process::id());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bundle_spec_is_put_back_byte_for_byte_and_the_criu_conf_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("config.json");
        let original = br#"{"ociVersion":"1.0.2",  "annotations":{"a":"b"}}"#;
        fs::write(&spec, original).unwrap();
        fs::set_permissions(&spec, fs::Permissions::from_mode(0o640)).unwrap();
        {
            let conf = dir.path().join("criu-restore.conf");
            fs::write(&conf, b"leave-stopped\n").unwrap();
            let _guard = RestoreCriuConf {
                spec: spec.clone(),
                original: original.to_vec(),
                conf,
                log: dir.path().join("log"),
            };
            replace_file(&spec, b"{\"patched\":true}").unwrap();
            assert_eq!(fs::read(&spec).unwrap(), b"{\"patched\":true}");
            assert_eq!(
                fs::metadata(&spec).unwrap().permissions().mode() & 0o7777,
                0o640
            );
        }
        assert_eq!(fs::read(&spec).unwrap(), original);
        assert_eq!(
            fs::metadata(&spec).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        // No temporary file, and no CRIU configuration, is left beside it.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("config.json")]);
    }

    #[test]
    fn write_new_does_not_follow_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("criu-restore.conf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_new(&link, b"leave-stopped\n", 0o600).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"keep");
    }

    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn parses_the_shims_create() {
        let inv = Invocation::parse(&args(
            "--root /run/containerd/runc/k8s.io --log /b/log.json --log-format json --systemd-cgroup \
             create --bundle /b --pid-file /b/init.pid --console-socket /tmp/s --no-pivot abc123",
        ));
        assert_eq!(inv.command, "create");
        assert_eq!(inv.id.as_deref(), Some("abc123"));
        assert_eq!(inv.log.as_deref(), Some(Path::new("/b/log.json")));
        assert_eq!(inv.globals.len(), 7);
        assert_eq!(inv.option(&["bundle", "b"]), Some("/b".into()));
        assert_eq!(inv.option(&["pid-file"]), Some("/b/init.pid".into()));
        assert_eq!(inv.option(&["console-socket"]), Some("/tmp/s".into()));
        assert!(inv.has("no-pivot"));
        assert!(!inv.has("no-new-keyring"));
    }

    #[test]
    fn parses_inline_values_and_other_commands() {
        let inv = Invocation::parse(&args("--root=/r --debug create -b=/x id1"));
        assert_eq!(inv.option(&["bundle", "b"]), Some("/x".into()));
        assert_eq!(inv.id.as_deref(), Some("id1"));
        let inv = Invocation::parse(&args("--root /r start id2"));
        assert_eq!(
            (inv.command.as_str(), inv.id.as_deref()),
            ("start", Some("id2"))
        );
        let inv = Invocation::parse(&args("--root /r delete --force id3"));
        assert_eq!(
            (inv.command.as_str(), inv.id.as_deref()),
            ("delete", Some("id3"))
        );
        let inv = Invocation::parse(&args("--version"));
        assert_eq!(inv.command, "");
    }
}
