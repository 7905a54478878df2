//! RestorePod's cost against its floor and against a cold start, measured
//! in one run through a spawned `podckptd` (the real release binary) in
//! front of the test bed's containerd 2.1, whose runc is podckpt-runc:
//!
//! 1. CheckpointPod of a pod of three memhogs holding 512 MiB each, half of
//!    it incompressible, into a fresh directory on disk (its figures are
//!    printed, it is not the subject); the original pod is then removed.
//! 2. read+decompress, the floor: reading `<dir>/pod.tar.zst` and
//!    decompressing every tar entry to /dev/null, with the page cache
//!    dropped first (also the raw read alone, cold, and read+decompress
//!    warm, to split disk from CPU).
//! 3. restore, page cache dropped again: RestorePod (a new sandbox name and
//!    uid, a new log directory, the manifest's container configs), then
//!    StartContainer of each restored container in order, then until every
//!    memhog runs and answers: an ExecSync `cat /proc/<its pid>/status`
//!    succeeds and shows memhog holding its 512 MiB again (a restored memhog
//!    does not print its start-up lines again; one that does was started
//!    fresh, not restored, and the bench says so).
//!
//!    Then (3b) the same restore with the RestorePod option
//!    `lazy-pages=true`: each StartContainer returns once the process tree
//!    is back, and a `criu lazy-pages` daemon per container fills its
//!    memory in the background; "answering" still waits for VmRSS to be
//!    back at 512 MiB.
//! 4. cold start, page cache dropped again: a new pod of the same three
//!    memhogs from the image, until each has filled its 512 MiB and printed
//!    its "ready" line.
//!
//! Prints a table of the figures and the targets, met or not: total
//! restore ≤ 2× read+decompress (cold), for both restores, RestorePod
//! ≤ 1 s; and restore against cold start, and the share of the restore spent reading and
//! decompressing. Then podckptd's and podckpt-runc's log lines for the
//! restore, with their offsets from the RestorePod call. Nothing is
//! asserted: a bench prints.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without it.
//! Run with `cargo bench --bench restore`. Pods are named
//! `bench-rst-<pid>[-...]`; everything the bench creates (pods, output and
//! log directories, podckptd) is removed on every path. Dropping the page
//! cache is node-wide: other work on the node will notice.

#[allow(dead_code)]
mod common;
#[path = "../tests/common/cri.rs"]
#[allow(dead_code)]
mod cri;
#[path = "../tests/common/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podckpt::archive::manifest::{PodManifest, POD_ARCHIVE_ZSTD};
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;
use podckpt::restore::wrapper::DEFAULT_RESTORE_DIR;

use common::*;

/// Pod names start with this (then the bench's pid), so concurrent tests
/// on the same containerd never meet them.
const POD_PREFIX: &str = "bench-rst-";
/// Bound on CheckpointPod and RestorePod.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on every other CRI call.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long restored memhogs may take to answer after their starts.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// ExecSync's own timeout (seconds).
const EXEC_TIMEOUT_SECS: i64 = 10;
/// Read buffer of the read+decompress floor (podckptd's extraction uses 1 MiB too).
const READ_BUF: usize = 1 << 20;
/// Bound on the entries of an archive.
const MAX_ENTRIES: usize = 1_000_000;

/// Memory of each memhog in the fixed-cost pod: next to nothing, so that
/// its restore is what every restore of this pod pays before any page.
const FIXED_COST_MB: u64 = 4;

// The targets.
const TOTAL_TO_READ_TARGET: f64 = 2.0;
const RESTORE_POD_TARGET: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- page cache, floor

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; how long it took.
fn drop_caches() -> Result<Duration, String> {
    let t = Instant::now();
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("/proc/sys/vm/drop_caches: {e}"))?;
    Ok(t.elapsed())
}

/// Drops the page cache, saying so; false (and why, printed) if it could not.
fn drop_caches_noisy(before: &str) -> bool {
    match drop_caches() {
        Ok(d) => {
            println!(
                "   (page cache dropped before {before}: sync + drop took {} ms)",
                d.as_millis()
            );
            true
        }
        Err(e) => {
            println!("   (page cache NOT dropped before {before}: {e}; its figure is warm)");
            false
        }
    }
}

/// The archive read, without decompressing.
struct RawRead {
    took: Duration,
    bytes: u64,
}

fn raw_read(archive: &Path) -> Result<RawRead, String> {
    let t = Instant::now();
    let mut f = std::fs::File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut buf = vec![0u8; READ_BUF];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", archive.display()))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    Ok(RawRead {
        took: t.elapsed(),
        bytes,
    })
}

/// The archive read, decompressed, and every tar entry read to its end
/// into /dev/null: what extraction cannot go below.
struct Floor {
    took: Duration,
    entries: usize,
    content: u64,
}

fn read_decompress(archive: &Path) -> Result<Floor, String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", archive.display());
    let t = Instant::now();
    let mut null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let mut ar = podckpt::archive::reader::open_tar(archive).map_err(|e| err(&e))?;
    let mut buf = vec![0u8; READ_BUF];
    let mut entries = 0;
    let mut content = 0u64;
    for entry in ar.entries().map_err(|e| err(&e))? {
        let mut entry = entry.map_err(|e| err(&e))?;
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(err(&format!("more than {MAX_ENTRIES} entries")));
        }
        loop {
            let n = entry.read(&mut buf).map_err(|e| err(&e))?;
            if n == 0 {
                break;
            }
            null.write_all(&buf[..n])
                .map_err(|e| format!("/dev/null: {e}"))?;
            content += n as u64;
        }
    }
    Ok(Floor {
        took: t.elapsed(),
        entries,
        content,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("task: {e}"))?
}

// ---------------------------------------------------------------- CRI helpers

async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{what}: {:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("{what}: no answer within {RPC_TIMEOUT:?}")),
    }
}

/// The container's state and, when it runs, its host pid.
async fn state_and_pid(client: &mut CriClient, id: &str) -> Result<(i32, Option<i32>), String> {
    let resp = bounded(
        "ContainerStatus",
        client.runtime.container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        }),
    )
    .await?;
    let state = resp.status.map_or(-1, |s| s.state);
    let pid = resp
        .info
        .get("info")
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
        .and_then(|v| v["pid"].as_i64())
        .filter(|p| *p > 0)
        .map(|p| p as i32);
    Ok((state, pid))
}

/// The process's pid in its own (innermost) pid namespace.
fn ns_pid(host_pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// A field of a /proc/<pid>/status text.
fn status_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// The message lines of a CRI log (`<time> <stream> <tag> <text>`).
fn log_messages(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------- checkpoint

struct Checkpoint {
    took: Duration,
    archive: PathBuf,
    bytes: u64,
    manifest: PodManifest,
}

async fn checkpoint(daemon: &Podckptd, pod: &Pod, out: &Path) -> Result<Checkpoint, String> {
    let mut req = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: out.display().to_string(),
        container_ids: pod.ids(),
        options: HashMap::new(),
    });
    req.set_timeout(CALL_TIMEOUT);
    let t = Instant::now();
    let result = daemon.client().runtime.checkpoint_pod(req).await;
    let took = t.elapsed();
    result.map_err(|s| format!("CheckpointPod: {s:?}; podckptd: {}", daemon.log_tail(3)))?;
    let archive = out.join(POD_ARCHIVE_ZSTD);
    let bytes = std::fs::metadata(&archive)
        .map_err(|e| format!("{}: {e}", archive.display()))?
        .len();
    let manifest = podckpt::archive::reader::read_manifest(&archive)
        .map_err(|e| format!("manifest of {}: {e}", archive.display()))?;
    Ok(Checkpoint {
        took,
        archive,
        bytes,
        manifest,
    })
}

// ---------------------------------------------------------------- restore

/// A restored memhog, as the bench follows it.
struct Restored {
    name: String,
    id: String,
    host_pid: Option<i32>,
    start: Duration,
    /// Since the RestorePod call.
    answered_at: Option<Duration>,
    /// VmRSS (KiB) the ExecSync read when it answered.
    rss_kib: u64,
    /// The first "count <n>" the restored memhog logged.
    first_count: Option<u64>,
}

struct RestoreRun {
    // Dropped first: the sandbox goes before its log directory.
    guard: Option<cri::PodGuard>,
    log_dir: tempfile::TempDir,
    /// The RestorePod call began (wall clock, for the logs' timestamps).
    began: SystemTime,
    restore_pod: Duration,
    starts: Duration,
    total: Duration,
    containers: Vec<Restored>,
    /// podckptd's CPU seconds during RestorePod (itself).
    daemon_cpu: f64,
}

/// One ExecSync answer check: Ok(Some(VmRSS KiB)) once memhog answers with
/// its `mb` MiB back, Ok(None) not yet, Err when it never will.
async fn answers(client: &mut CriClient, c: &mut Restored, mb: u64) -> Result<Option<u64>, String> {
    if c.host_pid.is_none() {
        let (state, pid) = state_and_pid(client, &c.id).await?;
        if state != ContainerState::ContainerRunning as i32 {
            return Err(format!("{} is not running (state {state})", c.name));
        }
        c.host_pid = pid;
    }
    let Some(pid) = c.host_pid.and_then(ns_pid) else {
        return Ok(None);
    };
    let resp = bounded(
        "ExecSync",
        client.runtime.exec_sync(ExecSyncRequest {
            container_id: c.id.clone(),
            cmd: vec!["cat".into(), format!("/proc/{pid}/status")],
            timeout: EXEC_TIMEOUT_SECS,
        }),
    )
    .await?;
    if resp.exit_code != 0 {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&resp.stdout);
    let name = status_field(&text, "Name").unwrap_or_default();
    let rss: u64 = status_field(&text, "VmRSS")
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    if name != "memhog" {
        return Err(format!(
            "{}: /proc/{pid}/status in the container is {name:?}, not memhog",
            c.name
        ));
    }
    Ok((rss >= mb * 1024).then_some(rss))
}

async fn restore(
    daemon: &Podckptd,
    ckpt_dir: &Path,
    manifest: &PodManifest,
    name: &str,
    lazy: bool,
    mb: u64,
) -> Result<RestoreRun, String> {
    let log_dir = tempfile::Builder::new()
        .prefix("podckpt-bench-logs-")
        .tempdir()
        .map_err(|e| format!("tempdir: {e}"))?;
    let container_configs = manifest
        .containers
        .iter()
        .map(|c| {
            c.config
                .clone()
                .ok_or_else(|| format!("the manifest has no config for {}", c.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut req = tonic::Request::new(RestorePodRequest {
        checkpoint_path: ckpt_dir.display().to_string(),
        config: Some(cri::pod_config(name, log_dir.path())),
        runtime_handler: String::new(),
        options: if lazy {
            [("lazy-pages".to_string(), "true".to_string())].into()
        } else {
            HashMap::new()
        },
        container_configs,
    });
    req.set_timeout(CALL_TIMEOUT);
    let mut client = daemon.client();
    let pid = daemon.pid();
    let cpu_before = cpu_secs(pid).unwrap_or_default();
    let began = SystemTime::now();
    let t0 = Instant::now();
    let result = client.runtime.restore_pod(req).await;
    let restore_pod = t0.elapsed();
    let daemon_cpu = cpu_secs(pid).unwrap_or_default().0 - cpu_before.0;
    let resp = result
        .map_err(|s| format!("RestorePod: {s:?}; podckptd: {}", daemon.log_tail(3)))?
        .into_inner();
    let mut run = RestoreRun {
        guard: Some(cri::PodGuard {
            client: client.clone(),
            id: resp.pod_sandbox_id.clone(),
        }),
        log_dir,
        began,
        restore_pod,
        starts: Duration::ZERO,
        total: Duration::ZERO,
        containers: resp
            .restored_containers
            .iter()
            .map(|c| Restored {
                name: c.name.clone(),
                id: c.container_id.clone(),
                host_pid: None,
                start: Duration::ZERO,
                answered_at: None,
                rss_kib: 0,
                first_count: None,
            })
            .collect(),
        daemon_cpu,
    };
    let t1 = Instant::now();
    for c in &mut run.containers {
        let t = Instant::now();
        bounded(
            "StartContainer",
            client.runtime.start_container(StartContainerRequest {
                container_id: c.id.clone(),
            }),
        )
        .await
        .map_err(|e| format!("{}: {e}", c.name))?;
        c.start = t.elapsed();
    }
    run.starts = t1.elapsed();
    // Until every memhog answers with its memory back.
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        for c in run
            .containers
            .iter_mut()
            .filter(|c| c.answered_at.is_none())
        {
            if let Some(rss) = answers(&mut client, c, mb).await? {
                c.answered_at = Some(t0.elapsed());
                c.rss_kib = rss;
            }
        }
        if run.containers.iter().all(|c| c.answered_at.is_some()) {
            break;
        }
        if Instant::now() > deadline {
            let waiting: Vec<_> = run
                .containers
                .iter()
                .filter(|c| c.answered_at.is_none())
                .map(|c| c.name.as_str())
                .collect();
            return Err(format!(
                "restored memhogs not answering after {ANSWER_TIMEOUT:?}: {waiting:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.total = t0.elapsed();
    // Restored, not started afresh: a fresh memhog prints "ready" and
    // counts from 1; a restored one goes on counting (one line a second).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        for c in &mut run.containers {
            let lines = log_messages(&run.log_dir.path().join(format!("{}.log", c.name)));
            if lines.iter().any(|l| l.starts_with("ready ")) {
                return Err(format!(
                    "{} logged \"ready\": it was started afresh, not restored (is the test \
                     bed's containerd 2.1 running podckpt-runc?)",
                    c.name
                ));
            }
            c.first_count = lines
                .iter()
                .find_map(|l| l.strip_prefix("count ")?.trim().parse().ok());
        }
        if run.containers.iter().all(|c| c.first_count.is_some()) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(run)
}

// ---------------------------------------------------------------- logs

/// A Debug-printed Duration ("1.23s", "850.1ms", "12µs") back.
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim().trim_end_matches(',');
    let (num, scale) = if let Some(n) = s.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = s.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    Some(Duration::from_secs_f64(num.parse::<f64>().ok()? * scale))
}

/// Signed milliseconds from `base` to `t`.
fn offset_ms(base: SystemTime, t: SystemTime) -> i64 {
    match t.duration_since(base) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// podckptd's log lines from `from` on, each with its offset from `base`,
/// and the extraction's `took` if logged.
fn daemon_lines(
    daemon: &Podckptd,
    from: usize,
    base: SystemTime,
) -> (Vec<String>, Option<Duration>) {
    let mut took = None;
    let lines = daemon
        .log_lines()
        .into_iter()
        .skip(from)
        .map(|l| {
            if l.contains("checkpoint extracted") {
                took = l
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("took="))
                    .and_then(parse_debug_duration);
            }
            let (ts, rest) = l.split_once(' ').unwrap_or(("", &l));
            match humantime::parse_rfc3339_weak(ts) {
                Ok(t) => format!("{:>+7} ms {}", offset_ms(base, t), rest.trim_start()),
                Err(_) => l.clone(),
            }
        })
        .collect();
    (lines, took)
}

/// podckpt-runc's log lines about `ids` from byte `from` on, with offsets
/// from `base`, and each container's "restored in".
fn runc_lines(
    log: &Path,
    from: u64,
    ids: &[(String, String)],
    base: SystemTime,
) -> (Vec<String>, HashMap<String, Duration>) {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    let mut restored_in = HashMap::new();
    let mut out = Vec::new();
    for l in text.lines() {
        // `<epoch secs> [<pid>] <id>: <message>`
        let mut parts = l.splitn(3, ' ');
        let (Some(ts), Some(pid), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some((name, msg)) = ids.iter().find_map(|(name, id)| {
            rest.strip_prefix(id.as_str())
                .and_then(|r| r.strip_prefix(": "))
                .map(|m| (name, m))
        }) else {
            continue;
        };
        if let Some(d) = msg
            .strip_prefix("restored in ")
            .and_then(parse_debug_duration)
        {
            restored_in.insert(name.clone(), d);
        }
        let at = ts
            .parse::<f64>()
            .ok()
            .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s));
        out.push(match at {
            Some(t) => format!("{:>+7} ms {pid} {name}: {msg}", offset_ms(base, t)),
            None => l.to_string(),
        });
    }
    (out, restored_in)
}

/// What the node's restore dir holds (registrations and work dirs).
fn restore_dir_entries() -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    for sub in ["registrations", "work"] {
        if let Ok(rd) = std::fs::read_dir(Path::new(DEFAULT_RESTORE_DIR).join(sub)) {
            out.extend(
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| !p.to_string_lossy().ends_with(".lock")),
            );
        }
    }
    out
}

// ---------------------------------------------------------------- output

fn rate(bytes: u64, d: Duration) -> String {
    format!(
        "{:.0} MiB/s",
        bytes as f64 / MIB / d.as_secs_f64().max(1e-9)
    )
}

struct Figures<'a> {
    floor_cold: &'a Floor,
    floor_cold_dropped: bool,
    raw_cold: Option<&'a RawRead>,
    floor_warm: Option<&'a Floor>,
    run: &'a RestoreRun,
    restore_dropped: bool,
    extraction: Option<Duration>,
    restored_in: &'a HashMap<String, Duration>,
    /// The same restore with lazy-pages=true.
    lazy: Option<&'a RestoreRun>,
    /// The restore of the same pod shape with FIXED_COST_MB MiB memhogs.
    fixed: Option<&'a RestoreRun>,
    cold: Option<(Duration, bool)>,
}

fn print_table(f: &Figures) {
    let run = f.run;
    let read = f.floor_cold.took;
    let total_ratio = run.total.as_secs_f64() / read.as_secs_f64();
    let warm = |cold: bool| if cold { "" } else { " (cache NOT dropped)" };
    println!();
    println!("{:<44} {:>10}   {:<26} verdict", "", "time", "target");
    println!(
        "{:<44} {:>10}",
        format!("read+decompress (cold cache){}", warm(f.floor_cold_dropped)),
        secs(read)
    );
    if let Some(r) = f.raw_cold {
        println!(
            "{:<44} {:>10}",
            "  disk read alone, cold (measured apart)",
            secs(r.took)
        );
    }
    if let Some(w) = f.floor_warm {
        println!(
            "{:<44} {:>10}",
            "  read+decompress again, warm cache",
            secs(w.took)
        );
    }
    println!(
        "{:<44} {:>10}   {:<26} {}",
        format!("RestorePod{}", warm(f.restore_dropped)),
        secs(run.restore_pod),
        format!("≤ {:.1} s", RESTORE_POD_TARGET.as_secs_f64()),
        verdict(run.restore_pod <= RESTORE_POD_TARGET)
    );
    println!(
        "{:<44} {:>10}",
        format!("StartContainer ×{}", run.containers.len()),
        secs(run.starts)
    );
    println!(
        "{:<44} {:>10}",
        "total restore (RestorePod → all answering)",
        secs(run.total)
    );
    if let Some(lazy) = f.lazy {
        println!(
            "{:<44} {:>10}",
            "with lazy-pages: RestorePod",
            secs(lazy.restore_pod)
        );
        println!(
            "{:<44} {:>10}",
            format!("with lazy-pages: StartContainer ×{}", lazy.containers.len()),
            secs(lazy.starts)
        );
        println!(
            "{:<44} {:>10}",
            "with lazy-pages: total (memory all back)",
            secs(lazy.total)
        );
    }
    if let Some(fixed) = f.fixed {
        println!(
            "{:<44} {:>10}",
            format!("fixed cost: same pod, {FIXED_COST_MB} MiB memhogs"),
            secs(fixed.total)
        );
        println!(
            "{:<44} {:>10}",
            "  of it RestorePod / StartContainer ×3",
            format!(
                "{:.2} / {:.2} s",
                fixed.restore_pod.as_secs_f64(),
                fixed.starts.as_secs_f64()
            )
        );
    }
    match f.cold {
        Some((d, dropped)) => println!(
            "{:<44} {:>10}",
            format!("cold start (RunPodSandbox → all ready){}", warm(dropped)),
            secs(d)
        ),
        None => println!("{:<44} {:>10}", "cold start", "FAILED"),
    }
    println!();
    println!("{:<44} {:>10}   {:<26} verdict", "ratio", "value", "target");
    println!(
        "{:<44} {:>9.2}×   {:<26} {}",
        "total restore / read+decompress",
        total_ratio,
        format!("≤ {TOTAL_TO_READ_TARGET:.0}×"),
        verdict(total_ratio <= TOTAL_TO_READ_TARGET)
    );
    if let Some(lazy) = f.lazy {
        let r = lazy.total.as_secs_f64() / read.as_secs_f64();
        println!(
            "{:<44} {:>9.2}×   {:<26} {}",
            "with lazy-pages: total / read+decompress",
            r,
            format!("≤ {TOTAL_TO_READ_TARGET:.0}×"),
            verdict(r <= TOTAL_TO_READ_TARGET)
        );
    }
    if let Some(fixed) = f.fixed {
        let r = fixed.total.as_secs_f64() / read.as_secs_f64();
        let budget = TOTAL_TO_READ_TARGET * read.as_secs_f64() - fixed.total.as_secs_f64();
        println!(
            "{:<44} {:>9.2}×   {:<26} {}",
            "fixed cost / read+decompress",
            r,
            "(the target's share)",
            if budget > 0.0 {
                format!(
                    "leaves {budget:.2} s within {TOTAL_TO_READ_TARGET:.0}× for {}",
                    mib(f.floor_cold.content)
                )
            } else {
                format!("{TOTAL_TO_READ_TARGET:.0}× is spent before any page")
            }
        );
    }
    if let Some((cold, _)) = f.cold {
        let r = run.total.as_secs_f64() / cold.as_secs_f64();
        println!(
            "{:<44} {:>9.2}×   {:<26} {}",
            "total restore / cold start",
            r,
            "(none set)",
            if r < 1.0 {
                format!("restore {:.1}× faster", 1.0 / r)
            } else {
                format!("restore {r:.1}× SLOWER")
            }
        );
    }
    println!(
        "{:<44} {:>9.0}%   {:<26} -",
        "share of the restore reading+decompressing",
        100.0 * read.as_secs_f64() / run.total.as_secs_f64(),
        "(read+decompress / total)"
    );

    // Where the time goes.
    println!();
    println!("where the restore's {} go:", secs(run.total));
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / run.total.as_secs_f64();
    match f.extraction {
        // The extraction outlived the call: it went on in the background
        // while the containers were started.
        Some(e) if e > run.restore_pod => println!(
            "  RestorePod {} ({:.0}%): manifest, GC, image checks, RunPodSandbox, CreateContainer \
             ×{}, registrations; the extraction into the restore dir ran beside it and on in the \
             background for {} in all ({} of content, {}; read+decompress alone took {}), \
             overlapping the starts; podckptd's own CPU {:.2} s",
            secs(run.restore_pod),
            pct(run.restore_pod),
            run.containers.len(),
            secs(e),
            mib(f.floor_cold.content),
            rate(f.floor_cold.content, e),
            secs(read),
            run.daemon_cpu
        ),
        Some(e) => {
            let rest = run.restore_pod.saturating_sub(e);
            println!(
                "  RestorePod {} ({:.0}%): extraction into the restore dir {} ({:.0}%, {} of \
                 content, {}; read+decompress alone took {}, so writing it out costs ≈ {}), \
                 everything else (manifest, GC, image checks, RunPodSandbox, CreateContainer \
                 ×{}, registrations) {} ({:.0}%); podckptd's own CPU {:.2} s",
                secs(run.restore_pod),
                pct(run.restore_pod),
                secs(e),
                pct(e),
                mib(f.floor_cold.content),
                rate(f.floor_cold.content, e),
                secs(read),
                secs(e.saturating_sub(read)),
                run.containers.len(),
                secs(rest),
                pct(rest),
                run.daemon_cpu
            );
        }
        None => println!(
            "  RestorePod {} ({:.0}%) (no \"checkpoint extracted\" line in podckptd's log to split it)",
            secs(run.restore_pod),
            pct(run.restore_pod)
        ),
    }
    let criu: Duration = f.restored_in.values().sum();
    println!(
        "  StartContainer ×{} {} ({:.0}%): podckpt-runc's restores (rootfs diff + runc restore \
         / CRIU) {} of it ({}), containerd and shim the rest",
        run.containers.len(),
        secs(run.starts),
        pct(run.starts),
        secs(criu),
        run.containers
            .iter()
            .map(|c| format!(
                "{} start {} / restored in {}",
                c.name,
                secs(c.start),
                f.restored_in
                    .get(&c.name)
                    .map_or("?".to_string(), |d| secs(*d))
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let wait = run.total.saturating_sub(run.restore_pod + run.starts);
    println!(
        "  after the last start, until all answered (ExecSync cat /proc/<pid>/status, VmRSS ≥ \
         {MEMHOG_MB} MiB): {} ({:.0}%)",
        secs(wait),
        pct(wait)
    );
}

/// One restore of the checkpoint as pod `name`, page cache dropped first,
/// with its figures and log lines printed and the pod removed after; None
/// (said why) if it failed.
async fn restore_and_report(
    daemon: &Podckptd,
    ckpt_dir: &Path,
    manifest: &PodManifest,
    name: &str,
    runc_log: &Path,
    lazy: bool,
    mb: u64,
) -> Option<(
    RestoreRun,
    bool,
    HashMap<String, Duration>,
    Option<Duration>,
)> {
    let dropped = drop_caches_noisy("RestorePod");
    let runc_log_from = std::fs::metadata(runc_log).map_or(0, |m| m.len());
    let daemon_log_from = daemon.log_lines().len();
    let mut run = match restore(daemon, ckpt_dir, manifest, name, lazy, mb).await {
        Ok(r) => r,
        Err(e) => {
            println!("   restore FAILED: {e}");
            let (lines, _) = daemon_lines(daemon, daemon_log_from, SystemTime::now());
            for l in lines.iter().rev().take(10).rev() {
                println!("     podckptd: {l}");
            }
            return None;
        }
    };
    println!(
        "   RestorePod {}, StartContainer ×{} {}, all answering {} after the RestorePod call",
        secs(run.restore_pod),
        run.containers.len(),
        secs(run.starts),
        secs(run.total)
    );
    for c in &run.containers {
        println!(
            "   {}: start {}, answered at {} with VmRSS {:.0} MiB, went on counting at {}",
            c.name,
            secs(c.start),
            c.answered_at.map_or("?".into(), secs),
            c.rss_kib as f64 / 1024.0,
            c.first_count
                .map_or("? (no count line yet)".into(), |n| format!("count {n}"))
        );
    }
    let ids: Vec<(String, String)> = run
        .containers
        .iter()
        .map(|c| (c.name.clone(), c.id.clone()))
        .collect();
    let (runc, restored_in) = runc_lines(runc_log, runc_log_from, &ids, run.began);
    let (dlines, extraction) = daemon_lines(daemon, daemon_log_from, run.began);
    println!("   podckptd log during the restore (ms from the RestorePod call):");
    for l in dlines.iter().take(40) {
        println!("     {l}");
    }
    println!("   podckpt-runc log ({}):", runc_log.display());
    if runc.is_empty() {
        println!("     (nothing about these containers)");
    }
    for l in runc.iter().take(40) {
        println!("     {l}");
    }
    let t = Instant::now();
    drop(run.guard.take());
    println!("   restored pod removed in {}", secs(t.elapsed()));
    Some((run, dropped, restored_in, extraction))
}

/// Step 3c: a pod of the same shape (CONTAINERS memhogs, same image and
/// configs) holding FIXED_COST_MB MiB each, checkpointed, removed and
/// restored eagerly as in step 3. Its total is what the runtime, CRIU and
/// runc cost for this pod with (almost) no memory to bring back: the part
/// of every restore of it that no archive format or page transfer can
/// shorten. None (said why) if it failed.
async fn fixed_cost(
    daemon: &Podckptd,
    client: &mut CriClient,
    image: &str,
    runc_log: &Path,
    out_root: &Path,
) -> Option<RestoreRun> {
    let me = std::process::id();
    let pod = match memhog_pod(
        client,
        image,
        &format!("{POD_PREFIX}{me}-small"),
        FIXED_COST_MB,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            println!("   the small pod FAILED: {e}");
            return None;
        }
    };
    let dir = out_root.join("ckpt-small");
    if let Err(e) = std::fs::create_dir(&dir) {
        println!("   FAILED: {}: {e}", dir.display());
        return None;
    }
    let ckpt = match checkpoint(daemon, &pod, &dir).await {
        Ok(c) => c,
        Err(e) => {
            println!("   CheckpointPod of the small pod FAILED: {e}");
            return None;
        }
    };
    println!(
        "   checkpointed in {} ({} of content in {})",
        secs(ckpt.took),
        mib(ckpt.manifest.content_bytes()),
        mib(ckpt.bytes)
    );
    drop(pod);
    let (run, ..) = restore_and_report(
        daemon,
        &dir,
        &ckpt.manifest,
        &format!("{POD_PREFIX}{me}-small-restored"),
        runc_log,
        false,
        FIXED_COST_MB,
    )
    .await?;
    Some(run)
}

// ---------------------------------------------------------------- main

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs us in test
    // mode, where there is nothing to measure.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(tb) = testbed::Testbed::get("restore bench") else {
        println!("restore bench SKIPPED: no usable test bed (see above)");
        return;
    };
    let endpoint = tb.var("CONTAINERD2_ENDPOINT").to_string();
    let image = tb
        .vars
        .get("MEMHOG_IMAGE")
        .cloned()
        .unwrap_or_else(|| "localhost/podckpt/memhog:test".into());
    let runc_log = tb
        .vars
        .get("RUNC_WRAPPER_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(podckpt::restore::wrapper::DEFAULT_LOG));
    let mut containerd = CriClient::new(PathBuf::from(&endpoint));
    let version = match tokio::time::timeout(
        Duration::from_secs(10),
        containerd.runtime.version(VersionRequest::default()),
    )
    .await
    {
        Ok(Ok(v)) => v.into_inner(),
        other => {
            println!("restore bench SKIPPED: containerd at {endpoint} does not answer: {other:?}");
            return;
        }
    };
    let daemon = match Podckptd::start(&endpoint, tb.var("CRIU")).await {
        Ok(d) => d,
        Err(e) => {
            println!("restore bench FAILED to start podckptd: {e}");
            return;
        }
    };
    let mut client = daemon.client();
    remove_stale_pods(&mut client, POD_PREFIX).await;
    let restore_dir_before = restore_dir_entries();
    let me = std::process::id();

    // 1. The pod, its checkpoint; the original goes.
    let t = Instant::now();
    let pod = match memhog_pod(&mut client, &image, &format!("{POD_PREFIX}{me}"), MEMHOG_MB).await {
        Ok(p) => p,
        Err(e) => {
            println!("restore bench FAILED to set up the pod: {e}");
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
        "restore bench: {} {} (test bed, {endpoint}) through podckptd, CRIU {}, {} cores; pod of \
         {CONTAINERS} memhogs ({MEMHOG_MB} MiB each, {MEMHOG_RANDOM_PCT}% random; VmRSS {} MiB), \
         ready in {:.1} s",
        version.runtime_name,
        version.runtime_version,
        tb.vars.get("CRIU_VERSION").map_or("?", String::as_str),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        hog_rss.join("/"),
        t.elapsed().as_secs_f64()
    );
    println!("load average before: {}", loadavg());
    let out_root = match tempfile::Builder::new()
        .prefix("podckpt-bench-rst-")
        .tempdir_in("/var/tmp")
    {
        Ok(d) => d,
        Err(e) => {
            println!("restore bench FAILED: output dir: {e}");
            return;
        }
    };
    let ckpt_dir = out_root.path().join("ckpt");
    if let Err(e) = std::fs::create_dir(&ckpt_dir) {
        println!("restore bench FAILED: {}: {e}", ckpt_dir.display());
        return;
    }
    let ckpt = match checkpoint(&daemon, &pod, &ckpt_dir).await {
        Ok(c) => c,
        Err(e) => {
            println!("CheckpointPod FAILED: {e}");
            return;
        }
    };
    let content = ckpt.manifest.content_bytes();
    let tm = &ckpt.manifest.timings;
    println!(
        "1. CheckpointPod into {}: {} total, frozen {} ms (prepare {} ms, freeze {} ms, capture \
         {} ms); {} of content in {} ({:.2}×, zstd level {:?})",
        ckpt_dir.display(),
        secs(ckpt.took),
        tm.frozen_window_ms,
        tm.prepare_ms,
        tm.freeze_ms,
        tm.capture_ms,
        mib(content),
        mib(ckpt.bytes),
        ckpt.bytes as f64 / content.max(1) as f64,
        ckpt.manifest.options.compression
    );
    for c in &ckpt.manifest.containers {
        println!(
            "   {}: CRIU images {}, rootfs diff {}",
            c.name,
            mib(c.images_bytes),
            mib(c.rootfs_diff_bytes)
        );
    }
    let t = Instant::now();
    drop(pod);
    println!("   original pod removed in {}", secs(t.elapsed()));

    // 2. The floor.
    println!(
        "2. read+decompress of {} ({}):",
        ckpt.archive.display(),
        mib(ckpt.bytes)
    );
    let archive = ckpt.archive.clone();
    let raw = if drop_caches_noisy("the raw read") {
        let a = archive.clone();
        match blocking(move || raw_read(&a)).await {
            Ok(r) => {
                println!(
                    "   raw read, cold: {} for {} ({})",
                    secs(r.took),
                    mib(r.bytes),
                    rate(r.bytes, r.took)
                );
                Some(r)
            }
            Err(e) => {
                println!("   raw read FAILED: {e}");
                None
            }
        }
    } else {
        None
    };
    let floor_dropped = drop_caches_noisy("read+decompress");
    let a = archive.clone();
    let floor = match blocking(move || read_decompress(&a)).await {
        Ok(f) => f,
        Err(e) => {
            println!("   read+decompress FAILED: {e}");
            return;
        }
    };
    println!(
        "   read+decompress, cold: {} ({} entries, {} of content: {} of content, {} of archive)",
        secs(floor.took),
        floor.entries,
        mib(floor.content),
        rate(floor.content, floor.took),
        rate(ckpt.bytes, floor.took)
    );
    let a = archive.clone();
    let warm = match blocking(move || read_decompress(&a)).await {
        Ok(f) => {
            println!(
                "   read+decompress, warm: {} ({} of content)",
                secs(f.took),
                rate(f.content, f.took)
            );
            Some(f)
        }
        Err(e) => {
            println!("   read+decompress warm FAILED: {e}");
            None
        }
    };

    // 3. Restore, eagerly (the default) and with lazy-pages.
    println!("3. restore:");
    let Some((run, restore_dropped, restored_in, extraction)) = restore_and_report(
        &daemon,
        &ckpt_dir,
        &ckpt.manifest,
        &format!("{POD_PREFIX}{me}-restored"),
        &runc_log,
        false,
        MEMHOG_MB,
    )
    .await
    else {
        return;
    };
    println!("3b. restore with the option lazy-pages=true:");
    let lazy = restore_and_report(
        &daemon,
        &ckpt_dir,
        &ckpt.manifest,
        &format!("{POD_PREFIX}{me}-lazy"),
        &runc_log,
        true,
        MEMHOG_MB,
    )
    .await;

    // 3c. The fixed cost: the same pod shape with almost no memory.
    println!(
        "3c. the restore's fixed cost: the same pod with {FIXED_COST_MB} MiB memhogs, \
         checkpointed and restored the same way"
    );
    let fixed = fixed_cost(&daemon, &mut client, &image, &runc_log, out_root.path()).await;

    // 4. Cold start.
    println!("4. cold start:");
    let cold_dropped = drop_caches_noisy("the cold start");
    let t = Instant::now();
    let cold = match memhog_pod(
        &mut client,
        &image,
        &format!("{POD_PREFIX}{me}-cold"),
        MEMHOG_MB,
    )
    .await
    {
        Ok(p) => {
            let took = t.elapsed();
            println!(
                "   {CONTAINERS} memhogs ready ({MEMHOG_MB} MiB each) {} after RunPodSandbox",
                secs(took)
            );
            let t = Instant::now();
            drop(p);
            println!("   cold pod removed in {}", secs(t.elapsed()));
            Some((took, cold_dropped))
        }
        Err(e) => {
            println!("   cold start FAILED: {e}");
            None
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "load average after: {} ({cores} cores: a load above {cores} means other work competed)",
        loadavg()
    );

    // 5. The table.
    print_table(&Figures {
        floor_cold: &floor,
        floor_cold_dropped: floor_dropped,
        raw_cold: raw.as_ref(),
        floor_warm: warm.as_ref(),
        run: &run,
        restore_dropped,
        extraction,
        restored_in: &restored_in,
        lazy: lazy.as_ref().map(|(run, ..)| run),
        fixed: fixed.as_ref(),
        cold,
    });

    drop(run);
    drop(lazy);
    drop(fixed);
    drop(out_root);
    // podckptd drops registrations and work dirs of removed containers.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left: Vec<PathBuf> = Vec::new();
    while Instant::now() < deadline {
        left = restore_dir_entries()
            .difference(&restore_dir_before)
            .cloned()
            .collect();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !left.is_empty() {
        println!(
            "note: new in {DEFAULT_RESTORE_DIR} since the start (this run's, or a test's beside \
             it): {left:?}"
        );
    }
    drop(daemon);
}
