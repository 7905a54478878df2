//! What the benches that run memhog pods on the test bed share: the
//! memhog pod (CONTAINERS × MEMHOG_MB MiB, MEMHOG_RANDOM_PCT % random),
//! a spawned `podckptd`, /proc readings and output helpers. Included by
//! each such bench with `mod common;`; each bench also declares `mod cri;`
//! (tests/common/cri.rs) at its root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;

use crate::cri;

/// Containers in the pod.
pub const CONTAINERS: usize = 3;
/// Memory each memhog holds.
pub const MEMHOG_MB: u64 = 512;
/// Share of it that is random (incompressible).
pub const MEMHOG_RANDOM_PCT: u32 = 50;
/// How long the memhogs may take to fill their memory.
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// podckptd's own shutdown grace, and how long we wait for it to exit.
pub const DAEMON_GRACE: Duration = Duration::from_secs(3);

pub const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------- /proc

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...), in KiB.
pub fn status_kib(pid: i32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resets the process's peak RSS (VmHWM) to its current RSS.
pub fn reset_hwm(pid: i32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The one-letter state of /proc/<pid>/stat ('t' is a ptrace stop).
pub fn proc_state(pid: i32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text.rsplit_once(')')?.1.trim_start().chars().next()
}

/// CPU seconds of a process itself and of its reaped children
/// (utime+stime, cutime+cstime of /proc/<pid>/stat).
pub fn cpu_secs(pid: i32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<u64> = text
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse().ok())
        .collect();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    match fields[..] {
        [ut, st, cut, cst] => Some(((ut + st) as f64 / tick, (cut + cst) as f64 / tick)),
        _ => None,
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every live descendant of `pid` (bounded: a few levels, a few hundred).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    for _ in 0..6 {
        let mut next = Vec::new();
        for p in frontier {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let Ok(kids) = std::fs::read_to_string(t.path().join("children")) else {
                    continue;
                };
                next.extend(
                    kids.split_whitespace()
                        .filter_map(|k| k.parse::<i32>().ok()),
                );
            }
        }
        if next.is_empty() || out.len() > 512 {
            break;
        }
        out.extend(&next);
        frontier = next;
    }
    out
}

/// Size of a directory tree's regular files.
pub fn tree_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| {
            let m = std::fs::symlink_metadata(e.path()).ok()?;
            Some(if m.is_dir() {
                tree_bytes(&e.path())
            } else {
                m.len()
            })
        })
        .sum()
}

// ---------------------------------------------------------------- podckptd

/// The real podckptd binary, spawned; SIGTERMed (then SIGKILLed if it
/// lingers) and reaped on drop.
pub struct Podckptd {
    child: Child,
    pub sock: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Podckptd {
    pub async fn start(runtime: &str, criu: &str) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("podckpt-bench-daemon-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let sock = dir.path().join("podckpt.sock");
        let log = dir.path().join("podckptd.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_podckptd"))
            .args(["--listen", sock.to_str().unwrap()])
            .args(["--runtime-endpoint", runtime, "--criu", criu])
            .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
            .args(["--shutdown-grace", "3s", "--log", "info"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn podckptd: {e}"))?;
        let mut d = Self {
            child,
            sock,
            state: dir.path().join("state"),
            log,
            _dir: dir,
        };
        // Ready means answering (CRIU is probed before it serves).
        let started = Instant::now();
        for _ in 0..3000 {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(format!(
                    "podckptd exited at start ({status}): {}",
                    d.log_tail(5)
                ));
            }
            if d.sock.exists() {
                let mut c = CriClient::new(d.sock.clone());
                let call = c.runtime.version(VersionRequest::default());
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), call).await {
                    return Ok(d);
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("podckptd did not answer: {}", d.log_tail(5)))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn client(&self) -> CriClient {
        CriClient::new(self.sock.clone())
    }

    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(strip_ansi)
            .collect()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let lines = self.log_lines();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }
}

impl Drop for Podckptd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + DAEMON_GRACE + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------- the pod

pub struct Hog {
    pub name: String,
    pub id: String,
    /// Host pid of its process.
    pub pid: i32,
}

pub struct Pod {
    // Dropped first: the sandbox goes before its log directory.
    _guard: cri::PodGuard,
    pub id: String,
    pub hogs: Vec<Hog>,
    log_dir: tempfile::TempDir,
}

impl Pod {
    pub fn ids(&self) -> Vec<String> {
        self.hogs.iter().map(|h| h.id.clone()).collect()
    }

    /// Where the containers' CRI logs are (`<name>.log`).
    pub fn log_dir(&self) -> &Path {
        self.log_dir.path()
    }
}

/// Removes sandboxes labelled `<prefix><pid>[-...]` whose bench process
/// is gone (an earlier run that was killed); never another live run's.
pub async fn remove_stale_pods(client: &mut CriClient, prefix: &str) {
    let Ok(Ok(list)) = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default()),
    )
    .await
    else {
        return;
    };
    for p in list.into_inner().items {
        let Some(owner) = p
            .labels
            .get(cri::TEST_LABEL)
            .and_then(|v| v.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next()?.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        println!("removing stale bench pod {} (run {owner} is gone)", p.id);
        cri::remove_pod(client, p.id).await;
    }
}

/// The pod `name` of CONTAINERS memhogs (`hog-<n>`) of `mb` MiB each
/// (MEMHOG_MB in the benches' own pods), each past its "ready" line.
/// Removed with its log directory when dropped, or on error.
pub async fn memhog_pod(
    client: &mut CriClient,
    image: &str,
    name: &str,
    mb: u64,
) -> Result<Pod, String> {
    let log_dir = tempfile::Builder::new()
        .prefix("podckpt-bench-logs-")
        .tempdir()
        .map_err(|e| format!("tempdir: {e}"))?;
    let (guard, id, config) = cri::run_pod(client, name, log_dir.path()).await;
    let mut hogs = Vec::new();
    for n in 0..CONTAINERS {
        let cname = format!("hog-{n}");
        let mut cfg = cri::container_config(&cname, image, &[]);
        cfg.envs = vec![
            KeyValue {
                key: "MEMHOG_MB".into(),
                value: mb.to_string().into(),
            },
            KeyValue {
                key: "MEMHOG_RANDOM_PCT".into(),
                value: MEMHOG_RANDOM_PCT.to_string().into(),
            },
        ];
        let cid = cri::start_container(client, &id, &config, cfg).await;
        hogs.push(Hog {
            name: cname,
            id: cid,
            pid: 0,
        });
    }
    // memhog prints "ready <MB>" once every page is touched.
    let wanted = format!(" ready {mb}");
    let started = Instant::now();
    let mut ready = vec![false; hogs.len()];
    while !ready.iter().all(|r| *r) {
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "memhogs not ready after {READY_TIMEOUT:?}: {ready:?}"
            ));
        }
        for (h, r) in hogs.iter().zip(ready.iter_mut()) {
            if *r {
                continue;
            }
            let log = std::fs::read_to_string(log_dir.path().join(format!("{}.log", h.name)))
                .unwrap_or_default();
            *r = log.lines().any(|l| l.ends_with(&wanted));
            if !*r
                && cri::container_state(client, &h.id).await
                    != ContainerState::ContainerRunning as i32
            {
                return Err(format!("{} is not running; its log: {log:?}", h.name));
            }
        }
        if !ready.iter().all(|r| *r) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for h in &mut hogs {
        h.pid = cri::container_pid(client, &h.id).await;
    }
    Ok(Pod {
        _guard: guard,
        id,
        hogs,
        log_dir,
    })
}

// ---------------------------------------------------------------- output

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT MET"
    }
}
