//! CheckpointPod's cost against containerd 2.1's own CheckpointContainer,
//! measured side by side in one run on the same pod: three memhog
//! containers holding 512 MiB each, half of it incompressible.
//!
//! - peer: containerd's CheckpointContainer, called directly on containerd
//!   for each container in turn (a container is frozen during its own call
//!   only, so the peer's frozen window is at most its longest call);
//! - podckpt: one CheckpointPod through a spawned `podckptd` (the real
//!   release binary) in front of the same containerd.
//!
//! Prints total time, frozen window and bytes written for both, the ratios
//! podckpt/peer, podckptd's own peak extra memory (VmHWM after the call
//! minus VmRSS before, from /proc/<pid>/status, the high-water mark reset
//! just before the call) and each target, met or not. A sampler also
//! watches, every few ms, each container's freezer and process state (the
//! frozen window as observed from outside) and the CRIU processes podckptd
//! spawns. Nothing is asserted: a bench prints.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without it.
//! Run with `cargo bench --bench checkpoint`. By default it runs on the test
//! bed's containerd 2.1 (CONTAINERD2_ENDPOINT). When that containerd cannot
//! checkpoint by itself (its runc finds a CRIU unusable on this kernel
//! first on its PATH), `PODCKPT_BENCH_CONTAINERD=private` runs both sides on
//! a private containerd 2.1 started from the test bed's install and config,
//! with the test bed's CRIU first on PATH, removed afterwards.
//!
//! The figures are only as quiet as the node: the load average is printed
//! before and after.

#[allow(dead_code)]
mod common;
#[path = "../tests/common/cri.rs"]
#[allow(dead_code)]
mod cri;
#[path = "../tests/common/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podckpt::archive::manifest::PodManifest;
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;
use podckpt::node::cgroup::{Freezer, FreezerState};

use common::*;

/// Pod names start with this (then the bench's pid), so concurrent tests
/// on the same containerd never meet them.
const POD_PREFIX: &str = "bench-ckpt-";
/// Bound on every checkpoint call.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the sampler looks at /proc and the freezers.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

// The targets.
const TOTAL_RATIO_TARGET: f64 = 0.35;
const FROZEN_TARGET: Duration = Duration::from_millis(1500);
const BYTES_RATIO_TARGET: f64 = 0.6;
const MEMORY_TARGET_MIB: f64 = 256.0;

// ---------------------------------------------------------------- sampler

/// The pod's containers, for the sampler.
fn watched(pod: &Pod) -> Result<Vec<Watched>, String> {
    pod.hogs
        .iter()
        .map(|h| {
            Ok(Watched {
                freezer: Freezer::for_pid(h.pid)
                    .map_err(|e| format!("freezer of {}: {e}", h.name))?,
                pid: h.pid,
            })
        })
        .collect()
}

/// A container the sampler watches.
#[derive(Clone)]
struct Watched {
    freezer: Freezer,
    pid: i32,
}

/// What the sampler saw.
#[derive(Default)]
struct Samples {
    rounds: usize,
    /// Per container: first and last sample that found it stopped (frozen,
    /// freezing, or ptrace-stopped).
    stopped: Vec<Option<(Instant, Instant)>>,
    /// podckptd's largest sampled VmRSS (KiB).
    daemon_rss_max: u64,
    /// Largest sum of VmRSS over podckptd's children in one sample (KiB).
    children_rss_sum_max: u64,
    /// Largest VmHWM any single child reported (KiB).
    child_hwm_max: u64,
    /// Most children alive at once, and how many distinct ones were seen.
    children_at_once: usize,
    children_seen: usize,
    /// Staging roots where podckptd's staging dir was seen.
    staging_seen: Vec<PathBuf>,
}

impl Samples {
    /// The longest any watched container was seen stopped, plus one
    /// sampling period (the edges fall between samples).
    fn longest_stop(&self) -> Option<Duration> {
        self.stopped
            .iter()
            .flatten()
            .map(|(a, b)| b.duration_since(*a) + SAMPLE_EVERY)
            .max()
    }
}

struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Samples>,
}

impl Sampler {
    /// Samples until stopped, or until `limit` has passed (it stops by itself).
    /// `staging`: directories where podckptd may stage (`ckpt-<pid>-*`).
    fn start(
        watched: Vec<Watched>,
        daemon: Option<i32>,
        staging: Vec<PathBuf>,
        limit: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut s = Samples {
                stopped: vec![None; watched.len()],
                ..Default::default()
            };
            let mut seen = HashSet::new();
            let started = Instant::now();
            let max_rounds = (limit.as_millis() / SAMPLE_EVERY.as_millis()).max(1) as usize;
            while !flag.load(Ordering::Relaxed)
                && started.elapsed() < limit
                && s.rounds < max_rounds
            {
                let now = Instant::now();
                for (w, slot) in watched.iter().zip(s.stopped.iter_mut()) {
                    let frozen = matches!(
                        w.freezer.state(),
                        Ok(FreezerState::Frozen | FreezerState::Freezing)
                    );
                    let traced = matches!(proc_state(w.pid), Some('t' | 'T'));
                    if frozen || traced {
                        let first = slot.map_or(now, |(a, _)| a);
                        *slot = Some((first, now));
                    }
                }
                if let Some(pid) = daemon {
                    s.daemon_rss_max = s.daemon_rss_max.max(status_kib(pid, "VmRSS").unwrap_or(0));
                    let kids = descendants(pid);
                    let mut sum = 0;
                    for &k in &kids {
                        sum += status_kib(k, "VmRSS").unwrap_or(0);
                        s.child_hwm_max = s.child_hwm_max.max(status_kib(k, "VmHWM").unwrap_or(0));
                        seen.insert(k);
                    }
                    s.children_rss_sum_max = s.children_rss_sum_max.max(sum);
                    s.children_at_once = s.children_at_once.max(kids.len());
                    let prefix = format!("ckpt-{pid}-");
                    for root in &staging {
                        if s.staging_seen.contains(root) {
                            continue;
                        }
                        let found = std::fs::read_dir(root).is_ok_and(|rd| {
                            rd.flatten()
                                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                        });
                        if found {
                            s.staging_seen.push(root.clone());
                        }
                    }
                }
                s.rounds += 1;
                std::thread::sleep(SAMPLE_EVERY);
            }
            s.children_seen = seen.len();
            s
        });
        Self { stop, handle }
    }

    fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

// ---------------------------------------------------------------- private containerd

/// A private containerd 2.1, from the test bed's own install and config
/// (same binaries, snapshotter, CNI), with its own root, state and socket,
/// plain runc (the test bed's RUNC) as its runtime binary, and the test
/// bed's CRIU first on its PATH. Only with
/// `PODCKPT_BENCH_CONTAINERD=private`: for when the shared test bed's
/// containerd 2.1 cannot checkpoint (its runc finding a CRIU that does not
/// work on this kernel first on PATH) and restarting it would disturb
/// others. Stopped, unmounted and removed on drop.
struct PrivateContainerd {
    child: Child,
    sock: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl PrivateContainerd {
    async fn start(tb: &testbed::Testbed) -> Result<Self, String> {
        let ctr = tb.path("CTR2");
        let bin_dir = ctr.parent().ok_or("CTR2 has no directory")?.to_path_buf();
        // <prefix>/containerd2/usr/bin/ctr
        let prefix = bin_dir
            .ancestors()
            .nth(3)
            .ok_or("cannot find the test bed prefix from CTR2")?
            .to_path_buf();
        let base = std::fs::read_to_string(prefix.join("etc/containerd2.toml"))
            .map_err(|e| format!("test bed containerd2.toml: {e}"))?;
        let dir = tempfile::Builder::new()
            .prefix("podckpt-bench-containerd-")
            .tempdir_in("/var/lib")
            .map_err(|e| format!("tempdir: {e}"))?;
        let sock = dir.path().join("containerd.sock");
        let mut section = String::new();
        let mut config = String::new();
        for line in base.lines() {
            let t = line.trim_start();
            if t.starts_with('[') {
                section = t.to_string();
            }
            let line = if section.is_empty() && t.starts_with("root ") {
                format!("root = \"{}\"", dir.path().join("root").display())
            } else if section.is_empty() && t.starts_with("state ") {
                format!("state = \"{}\"", dir.path().join("state").display())
            } else if section == "[grpc]" && t.starts_with("address ") {
                format!("  address = \"{}\"", sock.display())
            } else if section == "[ttrpc]" && t.starts_with("address ") {
                format!("  address = \"{}.ttrpc\"", sock.display())
            } else if t.starts_with("BinaryName ") {
                // The peer is containerd with plain runc, whatever wrapper
                // the shared test bed is configured with at the moment.
                format!("        BinaryName = \"{}\"", tb.var("RUNC"))
            } else {
                line.to_string()
            };
            config.push_str(&line);
            config.push('\n');
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).map_err(|e| format!("config: {e}"))?;
        let criu_dir = tb
            .path("CRIU")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = format!(
            "{}:{}:/usr/sbin:/usr/bin:/sbin:/bin",
            bin_dir.display(),
            criu_dir.display()
        );
        let log = std::fs::File::create(dir.path().join("containerd.log"))
            .map_err(|e| format!("log: {e}"))?;
        let mut cmd = Command::new(bin_dir.join("containerd"));
        cmd.args(["--config", config_path.to_str().unwrap()])
            .env("PATH", &path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // If the bench dies, so does this containerd.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|e| format!("spawn containerd: {e}"))?;
        let mut me = Self {
            child,
            sock,
            dir: Some(dir),
        };
        let started = Instant::now();
        while !me.sock.exists() {
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(format!("private containerd exited ({status})"));
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err("private containerd did not create its socket".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for image in ["pause", "memhog"] {
            let tar = prefix.join("images").join(format!("{image}.tar"));
            let out = Command::new(&ctr)
                .args(["--timeout", "120s", "-a", me.sock.to_str().unwrap()])
                .args(["-n", "k8s.io", "images", "import"])
                .arg(&tar)
                .output()
                .map_err(|e| format!("ctr: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "import {}: {}",
                    tar.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(me)
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let Some(dir) = self.dir.take() else {
            return;
        };
        // Whatever is still mounted under it goes first (deepest first);
        // a directory with a mount left is kept rather than emptied.
        let mounts = |root: &Path| -> Vec<PathBuf> {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mut v: Vec<PathBuf> = text
                .lines()
                .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
                .filter(|m| m.starts_with(root))
                .collect();
            v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            v
        };
        for m in mounts(dir.path()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        if mounts(dir.path()).is_empty() {
            drop(dir);
        } else {
            println!(
                "note: mounts left under {}; not removing it",
                dir.keep().display()
            );
        }
    }
}

// ---------------------------------------------------------------- the runs

struct PeerRun {
    calls: Vec<Duration>,
    total: Duration,
    files: Vec<u64>,
    samples: Samples,
}

impl PeerRun {
    fn bytes(&self) -> u64 {
        self.files.iter().sum()
    }

    fn longest_call(&self) -> Duration {
        self.calls.iter().copied().max().unwrap_or_default()
    }
}

/// containerd's own CheckpointContainer, one container after the other.
async fn run_peer(containerd: &mut CriClient, pod: &Pod, out: &Path) -> Result<PeerRun, String> {
    let sampler = Sampler::start(
        watched(pod)?,
        None,
        vec![],
        CALL_TIMEOUT * CONTAINERS as u32 + Duration::from_secs(60),
    );
    let mut calls = Vec::new();
    let mut files = Vec::new();
    let started = Instant::now();
    let mut failure = None;
    for (n, h) in pod.hogs.iter().enumerate() {
        let location = out.join(format!("c{n}.tar"));
        let mut req = tonic::Request::new(CheckpointContainerRequest {
            container_id: h.id.clone(),
            location: location.display().to_string(),
            timeout: CALL_TIMEOUT.as_secs() as i64,
        });
        req.set_timeout(CALL_TIMEOUT);
        let t = Instant::now();
        let result = containerd.runtime.checkpoint_container(req).await;
        calls.push(t.elapsed());
        if let Err(status) = result {
            failure = Some(format!(
                "containerd CheckpointContainer of {}: {}{}",
                h.name,
                status.message(),
                criu_log_errors(status.message())
            ));
            break;
        }
        files.push(std::fs::metadata(&location).map(|m| m.len()).unwrap_or(0));
    }
    let total = started.elapsed();
    let samples = sampler.finish();
    if let Some(f) = failure {
        return Err(f);
    }
    Ok(PeerRun {
        calls,
        total,
        files,
        samples,
    })
}

/// The error lines of the CRIU log a runc failure message names
/// (`... path= /run/.../criu-dump.log`), read before the container and the
/// log go away.
fn criu_log_errors(message: &str) -> String {
    let Some(path) = message
        .rsplit_once("path=")
        .map(|(_, p)| p.split_whitespace().next().unwrap_or_default())
    else {
        return String::new();
    };
    let Ok(log) = std::fs::read_to_string(path) else {
        return format!(" (CRIU log {path} unreadable)");
    };
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("rror ("))
        .collect();
    format!(
        "\n  CRIU log {path}:\n    {}",
        errors[errors.len().saturating_sub(12)..].join("\n    ")
    )
}

struct PodckptRun {
    total: Duration,
    manifest: PodManifest,
    bytes: u64,
    /// podckptd's VmRSS before the call, VmHWM and VmRSS after (KiB).
    rss_before: u64,
    hwm_after: u64,
    rss_after: u64,
    hwm_reset: bool,
    /// CPU seconds during the call: podckptd itself, and its reaped
    /// children (the CRIU processes).
    cpu: (f64, f64),
    samples: Samples,
}

impl PodckptRun {
    fn peak_extra_mib(&self) -> f64 {
        self.hwm_after.saturating_sub(self.rss_before) as f64 / 1024.0
    }
}

/// One CheckpointPod through podckptd.
async fn run_podckpt(daemon: &Podckptd, pod: &Pod, out: &Path) -> Result<PodckptRun, String> {
    let pid = daemon.pid();
    let hwm_reset = reset_hwm(pid);
    let rss_before = status_kib(pid, "VmRSS").ok_or("no VmRSS for podckptd")?;
    let cpu_before = cpu_secs(pid).unwrap_or_default();
    let sampler = Sampler::start(
        watched(pod)?,
        Some(pid),
        vec![
            PathBuf::from("/dev/shm/podckpt-staging"),
            daemon.state.join("staging"),
        ],
        CALL_TIMEOUT + Duration::from_secs(60),
    );
    let mut req = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: out.display().to_string(),
        container_ids: pod.ids(),
        options: HashMap::new(),
    });
    req.set_timeout(CALL_TIMEOUT);
    let t = Instant::now();
    let result = daemon.client().runtime.checkpoint_pod(req).await;
    let total = t.elapsed();
    let hwm_after = status_kib(pid, "VmHWM").unwrap_or(0);
    let rss_after = status_kib(pid, "VmRSS").unwrap_or(0);
    let cpu_after = cpu_secs(pid).unwrap_or_default();
    let samples = sampler.finish();
    result.map_err(|s| format!("CheckpointPod: {s:?}; podckptd: {}", daemon.log_tail(3)))?;
    let archive = out.join(podckpt::archive::manifest::POD_ARCHIVE_ZSTD);
    let bytes = std::fs::metadata(&archive)
        .map_err(|e| format!("{}: {e}", archive.display()))?
        .len();
    let manifest = podckpt::archive::reader::read_manifest(&archive)
        .map_err(|e| format!("manifest of {}: {e}", archive.display()))?;
    Ok(PodckptRun {
        total,
        manifest,
        bytes,
        rss_before,
        hwm_after,
        rss_after,
        hwm_reset,
        cpu: (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1),
        samples,
    })
}

fn print_table(peer: &PeerRun, ours: &PodckptRun) {
    let frozen = Duration::from_millis(ours.manifest.timings.frozen_window_ms);
    let total_ratio = ours.total.as_secs_f64() / peer.total.as_secs_f64();
    let frozen_ratio = frozen.as_secs_f64() / peer.longest_call().as_secs_f64();
    let bytes_ratio = ours.bytes as f64 / peer.bytes() as f64;
    let mem = ours.peak_extra_mib();
    println!();
    println!(
        "{:<22} {:>20} {:>16} {:>13}   {:<18} verdict",
        "", "peer (containerd)", "podckpt", "podckpt/peer", "target"
    );
    println!(
        "{:<22} {:>20} {:>16} {:>12.3}×   {:<18} {}",
        "total time",
        secs(peer.total),
        secs(ours.total),
        total_ratio,
        format!("≤ {TOTAL_RATIO_TARGET:.2}× peer"),
        verdict(total_ratio <= TOTAL_RATIO_TARGET)
    );
    println!(
        "{:<22} {:>20} {:>16} {:>12.3}×   {:<18} {}",
        "frozen window",
        format!("≤ {}", secs(peer.longest_call())),
        secs(frozen),
        frozen_ratio,
        format!("≤ {:.1} s", FROZEN_TARGET.as_secs_f64()),
        verdict(frozen <= FROZEN_TARGET)
    );
    println!(
        "{:<22} {:>20} {:>16} {:>12.3}×   {:<18} {}",
        "bytes written",
        mib(peer.bytes()),
        mib(ours.bytes),
        bytes_ratio,
        format!("≤ {BYTES_RATIO_TARGET:.2}× peer"),
        verdict(bytes_ratio <= BYTES_RATIO_TARGET)
    );
    println!(
        "{:<22} {:>20} {:>16} {:>13}   {:<18} {}",
        "podckptd peak extra",
        "-",
        format!("{mem:.1} MiB"),
        "-",
        format!("≤ {MEMORY_TARGET_MIB:.0} MiB"),
        verdict(mem <= MEMORY_TARGET_MIB)
    );
    println!();
    let observed = match peer.samples.longest_stop() {
        Some(d) => format!(
            "the sampler saw a container stopped for at most {} ms (podckpt/that: {:.2}×)",
            d.as_millis(),
            frozen.as_secs_f64() / d.as_secs_f64()
        ),
        None => "the sampler saw no container stopped".into(),
    };
    println!(
        "peer frozen window: containerd freezes a container for part of its own call; the \
         longest call ({}) bounds it; {observed}",
        secs(peer.longest_call()),
    );
    println!(
        "bytes written: the archives only (containerd also writes each container's CRIU \
         images to its own state dir first; podckpt stages them in {})",
        if ours.samples.staging_seen.is_empty() {
            "?".to_string()
        } else {
            ours.samples
                .staging_seen
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
}

fn print_details(peer: &PeerRun, ours: &PodckptRun, daemon: &Podckptd) {
    println!();
    println!("peer details:");
    for (n, (call, bytes)) in peer.calls.iter().zip(&peer.files).enumerate() {
        println!(
            "  c{n}.tar: call {} ({:.0} MiB/s of archive), {}",
            secs(*call),
            *bytes as f64 / MIB / call.as_secs_f64(),
            mib(*bytes)
        );
    }
    let t = &ours.manifest.timings;
    println!("podckpt details:");
    println!(
        "  manifest timings: prepare {} ms, warm staging memory {} ms, freeze {} ms, frozen window {} ms, capture {} ms; \
         after the thaw (pack + fsync + reply) ≈ {} ms",
        t.prepare_ms,
        t.warm_ms,
        t.freeze_ms,
        t.frozen_window_ms,
        t.capture_ms,
        (ours.total.as_millis() as u64).saturating_sub(t.prepare_ms + t.warm_ms + t.frozen_window_ms)
    );
    for c in &ours.manifest.containers {
        println!(
            "  {}: dump {} ms (started {} ms after its freeze), CRIU images {}, rootfs diff {}",
            c.name,
            c.dump_finished_ns.saturating_sub(c.dump_started_ns) / 1_000_000,
            c.dump_started_ns.saturating_sub(c.frozen_at_ns) / 1_000_000,
            mib(c.images_bytes),
            mib(c.rootfs_diff_bytes)
        );
    }
    let content = ours.manifest.content_bytes();
    println!(
        "  archive: {} of content compressed to {} ({:.2}×, zstd level {:?})",
        mib(content),
        mib(ours.bytes),
        ours.bytes as f64 / content.max(1) as f64,
        ours.manifest.options.compression
    );
    println!(
        "  observed frozen (sampler, every {} ms): longest {}",
        SAMPLE_EVERY.as_millis(),
        ours.samples
            .longest_stop()
            .map_or("nothing".into(), |d| format!("{} ms", d.as_millis()))
    );
    println!(
        "  podckptd memory: VmRSS before {:.1} MiB, VmHWM after {:.1} MiB{}, VmRSS after {:.1} MiB, \
         largest sampled VmRSS {:.1} MiB",
        ours.rss_before as f64 / 1024.0,
        ours.hwm_after as f64 / 1024.0,
        if ours.hwm_reset {
            " (reset just before the call)"
        } else {
            " (since start: clear_refs failed)"
        },
        ours.rss_after as f64 / 1024.0,
        ours.samples.daemon_rss_max as f64 / 1024.0
    );
    println!(
        "  CPU during the call: podckptd {:.2} s, its CRIU children {:.2} s (of {:.2} s wall × {} cores); \
         staged in {}",
        ours.cpu.0,
        ours.cpu.1,
        ours.total.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if ours.samples.staging_seen.is_empty() {
            "? (not seen)".to_string()
        } else {
            ours.samples
                .staging_seen
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!(
        "  CRIU children (sampled, not podckptd's own figure): {} seen, up to {} at once, \
         largest RSS sum {:.1} MiB, largest single VmHWM {:.1} MiB",
        ours.samples.children_seen,
        ours.samples.children_at_once,
        ours.samples.children_rss_sum_max as f64 / 1024.0,
        ours.samples.child_hwm_max as f64 / 1024.0
    );
    let wanted = ["pod frozen", "dumped", "pod thawed", "archive written"];
    let lines: Vec<_> = daemon
        .log_lines()
        .into_iter()
        .filter(|l| wanted.iter().any(|w| l.contains(w)))
        .collect();
    if !lines.is_empty() {
        println!("  podckptd log:");
        for l in lines.iter().take(20) {
            println!("    {l}");
        }
    }
}

// ---------------------------------------------------------------- main

/// One round: podckpt's CheckpointPod, then the peer's calls, each into
/// its own fresh directory on disk.
async fn bench_round(
    daemon: &Podckptd,
    containerd: &mut CriClient,
    pod: &Pod,
    private: &Option<PrivateContainerd>,
    tb: &testbed::Testbed,
) -> Option<(PeerRun, PodckptRun)> {
    println!("load average before: {}", loadavg());
    // podckpt first, then the peer, each into its own fresh directory on disk.
    let out_root = tempfile::Builder::new()
        .prefix("podckpt-bench-out-")
        .tempdir_in("/var/tmp")
        .expect("output tempdir");
    let ours_dir = out_root.path().join("podckpt");
    let peer_dir = out_root.path().join("peer");
    for d in [&ours_dir, &peer_dir] {
        std::fs::create_dir(d).expect("output dir");
    }
    println!(
        "outputs under {} (podckpt first, then the peer)",
        out_root.path().display()
    );

    let ours = run_podckpt(daemon, pod, &ours_dir).await;
    match &ours {
        Ok(r) => println!(
            "podckpt CheckpointPod: {} total, frozen {} ms, {}",
            secs(r.total),
            r.manifest.timings.frozen_window_ms,
            mib(r.bytes)
        ),
        Err(e) => println!("podckpt CheckpointPod FAILED: {e}"),
    }
    // Both outputs exist at once otherwise; the archive has been measured.
    let _ = std::fs::remove_dir_all(&ours_dir);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let peer = run_peer(containerd, pod, &peer_dir).await;
    match &peer {
        Ok(r) => println!(
            "containerd CheckpointContainer ×{CONTAINERS}: {} total, longest call {}, {}",
            secs(r.total),
            secs(r.longest_call()),
            mib(r.bytes())
        ),
        Err(e) => {
            println!("peer FAILED: {e}");
            if private.is_none() && e.contains("vdso") {
                println!(
                    "  (the test bed's containerd 2.1 runs runc with a PATH that finds a CRIU \
                     unusable on this kernel before {}; PODCKPT_BENCH_CONTAINERD=private runs \
                     the bench on a private containerd 2.1 from the same install instead)",
                    tb.var("CRIU")
                );
            }
        }
    }
    let peer_left = tree_bytes(&peer_dir);
    if peer_left > 0 {
        println!("(removing {} of peer output)", mib(peer_left));
    }
    drop(out_root);
    match (peer, ours) {
        (Ok(p), Ok(o)) => Some((p, o)),
        _ => None,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs us in test
    // mode, where there is nothing to measure.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(tb) = testbed::Testbed::get("checkpoint bench") else {
        println!("checkpoint bench SKIPPED: no usable test bed (see above)");
        return;
    };
    let private = match std::env::var("PODCKPT_BENCH_CONTAINERD").as_deref() {
        Ok("private") => match PrivateContainerd::start(&tb).await {
            Ok(p) => Some(p),
            Err(e) => {
                println!("checkpoint bench FAILED to start a private containerd: {e}");
                return;
            }
        },
        Ok("testbed") | Err(_) => None,
        Ok(other) => {
            println!(
                "checkpoint bench: PODCKPT_BENCH_CONTAINERD={other:?}: use testbed or private"
            );
            return;
        }
    };
    let endpoint = match &private {
        Some(p) => p.sock.display().to_string(),
        None => tb.var("CONTAINERD2_ENDPOINT").to_string(),
    };
    let image = tb
        .vars
        .get("MEMHOG_IMAGE")
        .cloned()
        .unwrap_or_else(|| "localhost/podckpt/memhog:test".into());
    let mut containerd = CriClient::new(PathBuf::from(&endpoint));
    let version = match tokio::time::timeout(
        Duration::from_secs(10),
        containerd.runtime.version(VersionRequest::default()),
    )
    .await
    {
        Ok(Ok(v)) => v.into_inner(),
        other => {
            println!(
                "checkpoint bench SKIPPED: containerd at {endpoint} does not answer: {other:?}"
            );
            return;
        }
    };
    let daemon = match Podckptd::start(&endpoint, tb.var("CRIU")).await {
        Ok(d) => d,
        Err(e) => {
            println!("checkpoint bench FAILED to start podckptd: {e}");
            return;
        }
    };
    remove_stale_pods(&mut containerd, POD_PREFIX).await;

    let t = Instant::now();
    let pod_name = format!("{POD_PREFIX}{}", std::process::id());
    let pod = match memhog_pod(&mut containerd, &image, &pod_name, MEMHOG_MB).await {
        Ok(p) => p,
        Err(e) => {
            println!("checkpoint bench FAILED to set up the pod: {e}");
            return;
        }
    };
    let hog_rss: Vec<String> = pod
        .hogs
        .iter()
        .map(|h| {
            format!(
                "{:.0}",
                status_kib(h.pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
            )
        })
        .collect();
    println!(
        "checkpoint bench: {} {} ({}), CRIU {}, {} cores; pod of {CONTAINERS} memhogs \
         ({MEMHOG_MB} MiB each, {MEMHOG_RANDOM_PCT}% random; VmRSS {} MiB), ready in {:.1} s",
        version.runtime_name,
        version.runtime_version,
        if private.is_some() {
            format!("private instance at {endpoint}, runtime {}", tb.var("RUNC"))
        } else {
            format!("test bed, {endpoint}")
        },
        tb.vars.get("CRIU_VERSION").map_or("?", String::as_str),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        hog_rss.join("/"),
        t.elapsed().as_secs_f64()
    );

    // The VM this runs on backs memory lazily, so one run can be a second
    // faster or slower than the next for both parties: several rounds,
    // and the table shows the round with the median total-time ratio.
    let rounds: usize = std::env::var("PODCKPT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    let mut done: Vec<(PeerRun, PodckptRun)> = Vec::new();
    for round in 0..rounds {
        println!("== round {} of {rounds}", round + 1);
        if let Some(pair) = bench_round(&daemon, &mut containerd, &pod, &private, &tb).await {
            done.push(pair);
        }
    }
    if done.len() > 1 {
        let ratios: Vec<String> = done
            .iter()
            .map(|(p, o)| {
                format!(
                    "{:.3}× ({} vs {}, frozen {} ms)",
                    o.total.as_secs_f64() / p.total.as_secs_f64(),
                    secs(o.total),
                    secs(p.total),
                    o.manifest.timings.frozen_window_ms
                )
            })
            .collect();
        println!("total-time ratio per round: {}", ratios.join(", "));
    }
    done.sort_by(|a, b| {
        let r = |(p, o): &(PeerRun, PodckptRun)| o.total.as_secs_f64() / p.total.as_secs_f64();
        r(a).total_cmp(&r(b))
    });

    // Everything still running after all rounds?
    for h in &pod.hogs {
        let state = cri::container_state(&mut containerd, &h.id).await;
        if state != ContainerState::ContainerRunning as i32 {
            println!("note: {} is no longer running (state {state})", h.name);
        }
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "load average after: {} ({cores} cores: a load above {cores} means other work competed)",
        loadavg()
    );
    if let Some((peer, ours)) = done.get(done.len() / 2) {
        if done.len() > 1 {
            println!("median round:");
        }
        print_table(peer, ours);
        print_details(peer, ours, &daemon);
    }
    drop(pod);
    drop(daemon);
    drop(private);
}
