//! The proxy's cost, measured side by side in one run against the same
//! containerd: latency (p50/p99) of Version, ContainerStatus and
//! ListContainers with 50 containers present, directly and through
//! podckptd, and throughput with 16 concurrent clients. Prints the ratios.
//!
//! A third path is measured in the same run as the peer: a bare byte pipe
//! (this bench re-executed, one upstream connection per client connection,
//! `tokio::io::copy_bidirectional` on one thread, no HTTP/2 at all). It is
//! the least any userspace hop can do, so its figures are what a proxy can
//! reach on this machine at best, and podckptd's are also given against it.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`). Run with
//! `cargo bench --bench proxy`; `PODCKPT_BENCH_RUNTIME=containerd1` selects
//! the other runtime.

#[path = "../tests/common/cri.rs"]
#[allow(dead_code)]
mod cri;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;

const CONTAINERS: usize = 50;
const LATENCY_CALLS: usize = 2000;
const CLIENTS: usize = 16;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(2);
const THROUGHPUT_ROUNDS: usize = 5;

fn testbed() -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string("/run/podckpt-testbed/testbed.env").ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// A hop's process (podckptd or the bare pipe) and the directory holding
/// its socket (kept alive with it).
struct Hop(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Hop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start_podckptd(runtime: &str) -> (Hop, std::path::PathBuf) {
    start_hop("podckptd", |sock, dir| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_podckptd"));
        cmd.args([
            "--listen",
            sock.to_str().unwrap(),
            "--runtime-endpoint",
            runtime,
            "--log",
            "warn",
        ])
        .args(["--state-dir", dir.join("state").to_str().unwrap()]);
        cmd
    })
}

/// Set in the environment of this bench re-executed as the bare pipe:
/// `<listen socket>\t<runtime socket>`.
const PIPE_ENV: &str = "_PODCKPT_BENCH_PIPE";

fn start_pipe(runtime: &str) -> (Hop, std::path::PathBuf) {
    start_hop("the bare pipe", |sock, _| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(PIPE_ENV, format!("{}\t{runtime}", sock.display()));
        cmd
    })
}

/// Starts the process `command` builds (given its socket path and a
/// private dir) and waits for its socket.
fn start_hop(
    what: &str,
    command: impl FnOnce(&std::path::Path, &std::path::Path) -> Command,
) -> (Hop, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("hop.sock");
    let child = command(&sock, dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (Hop(child, dir), sock)
}

/// The bare pipe: every connection accepted on `listen` gets its own
/// connection to `upstream`, and bytes are copied both ways until either
/// side closes. One thread, as podckptd's relay has.
fn run_pipe(spec: &str) {
    let (listen, upstream) = spec.split_once('\t').expect("pipe spec");
    let (listen, upstream) = (listen.to_string(), upstream.to_string());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let listener = tokio::net::UnixListener::bind(&listen).unwrap();
            loop {
                let (mut down, _) = listener.accept().await.unwrap();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::UnixStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Times `calls` sequential calls on each path (direct, the bare pipe,
/// podckptd), interleaved so all see the same machine state.
async fn latency<F, Fut>(name: &str, paths: &Paths, call: F, calls: usize)
where
    F: Fn(CriClient) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let clients = [&paths.direct, &paths.pipe, &paths.via];
    // Warm the connections up.
    for _ in 0..50 {
        for c in clients {
            call(c.clone()).await;
        }
    }
    let mut times: [Vec<Duration>; 3] = Default::default();
    for _ in 0..calls {
        for (c, t) in clients.iter().zip(times.iter_mut()) {
            let started = Instant::now();
            call((*c).clone()).await;
            t.push(started.elapsed());
        }
    }
    let [(d50, d99), (p50, p99), (v50, v99)] = times.map(|mut t| {
        t.sort();
        (us(percentile(&t, 0.5)), us(percentile(&t, 0.99)))
    });
    println!(
        "{name:<28} direct p50 {d50:>7.1} µs p99 {d99:>7.1} µs | pipe p50 {p50:>7.1} µs p99 {p99:>7.1} µs (added {:+.1} / {:+.1}) | podckptd p50 {v50:>7.1} µs p99 {v99:>7.1} µs | added p50 {:>+7.1} µs = {:.2}× the pipe's (target ≤ 1.5×), p99 {:>+8.1} µs",
        p50 - d50,
        p99 - d99,
        v50 - d50,
        (v50 - d50) / (p50 - d50),
        v99 - d99
    );
}

/// The three ways to the runtime, each with its own client.
struct Paths {
    direct: CriClient,
    pipe: CriClient,
    via: CriClient,
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time (ns) that a process has spent on all its threads so far
/// (`/proc/<pid>/task/*/schedstat`, exact, unlike the tick-based stat).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One throughput window: calls per second with `CLIENTS` clients, each on
/// its own connection (bounded in time, stopping by itself), and the CPU
/// each party spent per call.
struct Window {
    rate: f64,
    /// µs of CPU per call: bench client, podckptd, containerd.
    client_us: f64,
    proxy_us: f64,
    runtime_us: f64,
}

async fn throughput(endpoint: &std::path::Path, container_id: &str, pids: [u32; 3]) -> Window {
    // Connect first, so the window measures calls, not connection set-up.
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut c = CriClient::new(endpoint.to_path_buf());
        c.runtime.version(VersionRequest::default()).await.unwrap();
        clients.push(c);
    }
    let before = pids.map(cpu_ns);
    let start = Instant::now();
    let stop = start + THROUGHPUT_WINDOW;
    let mut set = tokio::task::JoinSet::new();
    for mut c in clients {
        let id = container_id.to_string();
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                c.runtime
                    .container_status(ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    })
                    .await
                    .unwrap();
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = set.join_next().await {
        total += n.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = pids.map(cpu_ns);
    let per_call = |i: usize| (after[i] - before[i]) as f64 / 1e3 / total as f64;
    Window {
        rate: total as f64 / elapsed,
        client_us: per_call(0),
        proxy_us: per_call(1),
        runtime_us: per_call(2),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // The bare pipe is this bench re-executed; it runs its own runtime.
    if let Some(spec) = std::env::var_os(PIPE_ENV) {
        return run_pipe(spec.to_str().expect("pipe spec"));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

async fn bench() {
    // `cargo bench` passes --bench; `cargo test --benches` runs us in test
    // mode, where there is nothing to measure.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(tb) = testbed() else {
        println!("proxy bench SKIPPED: no test bed (run `sudo scripts/testbed.sh up`)");
        return;
    };
    let runtime = std::env::var("PODCKPT_BENCH_RUNTIME").unwrap_or_else(|_| "containerd2".into());
    let endpoint = std::path::PathBuf::from(&tb[&format!("{}_ENDPOINT", runtime.to_uppercase())]);
    let app = tb["APP_IMAGE"].clone();
    let (daemon, sock) = start_podckptd(endpoint.to_str().unwrap());
    let (pipe, pipe_sock) = start_pipe(endpoint.to_str().unwrap());
    let paths = Paths {
        direct: CriClient::new(endpoint.clone()),
        pipe: CriClient::new(pipe_sock.clone()),
        via: CriClient::new(sock.clone()),
    };
    // podckptd's memory once its first connection is up: the baseline for
    // the peak printed at the end.
    for _ in 0..20 {
        let mut c = paths.via.clone();
        c.runtime.version(VersionRequest::default()).await.unwrap();
    }
    let idle_kib = status_kib(daemon.0.id(), "VmRSS:");
    let mut setup = paths.direct.clone();

    // 50 running containers in 5 pods.
    let log_dir = tempfile::tempdir().unwrap();
    let mut guards = vec![];
    let mut ids = vec![];
    let t = Instant::now();
    for p in 0..5 {
        let (guard, pod, config) =
            cri::run_pod(&mut setup, &format!("bench-proxy-{p}"), log_dir.path()).await;
        guards.push(guard);
        for c in 0..CONTAINERS / 5 {
            let cfg = cri::container_config(&format!("sleeper-{c}"), &app, &["/bin/sleep", "3600"]);
            ids.push(cri::start_container(&mut setup, &pod, &config, cfg).await);
        }
    }
    let version = setup
        .runtime
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    println!(
        "proxy bench: {} {} via {}, {} containers running (set up in {:.1} s), {} calls per path",
        version.runtime_name,
        version.runtime_version,
        runtime,
        ids.len(),
        t.elapsed().as_secs_f64(),
        LATENCY_CALLS
    );

    latency(
        "Version",
        &paths,
        |mut c| async move {
            c.runtime.version(VersionRequest::default()).await.unwrap();
        },
        LATENCY_CALLS,
    )
    .await;
    let id = ids[0].clone();
    latency(
        "ContainerStatus",
        &paths,
        |mut c| {
            let id = id.clone();
            async move {
                c.runtime
                    .container_status(ContainerStatusRequest {
                        container_id: id,
                        verbose: false,
                    })
                    .await
                    .unwrap();
            }
        },
        LATENCY_CALLS,
    )
    .await;
    latency(
        "ListContainers (50)",
        &paths,
        |mut c| async move {
            assert!(cri::container_count(&mut c).await >= CONTAINERS);
        },
        LATENCY_CALLS / 2,
    )
    .await;

    // Direct and proxied windows alternate, so that both see the same
    // machine state; the medians are compared.
    let runtime_pid: u32 = std::fs::read_to_string(format!("/run/podckpt-testbed/{runtime}.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let pids = |hop: &Hop| [std::process::id(), hop.0.id(), runtime_pid];
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut hop_cpu: [Vec<f64>; 2] = Default::default();
    for round in 0..THROUGHPUT_ROUNDS {
        let dw = throughput(&endpoint, &ids[0], pids(&daemon)).await;
        let pw = throughput(&pipe_sock, &ids[0], pids(&pipe)).await;
        let vw = throughput(&sock, &ids[0], pids(&daemon)).await;
        println!(
            "throughput round {round}: direct {:.0}/s (CPU/call: client {:.1} µs, runtime {:.1} µs) | pipe {:.0}/s ({:.2}×; CPU/call: client {:.1} µs, pipe {:.1} µs, runtime {:.1} µs) | podckptd {:.0}/s ({:.2}×; CPU/call: client {:.1} µs, podckptd {:.1} µs, runtime {:.1} µs)",
            dw.rate, dw.client_us, dw.runtime_us,
            pw.rate, pw.rate / dw.rate, pw.client_us, pw.proxy_us, pw.runtime_us,
            vw.rate, vw.rate / dw.rate, vw.client_us, vw.proxy_us, vw.runtime_us,
        );
        hop_cpu[0].push(pw.proxy_us);
        hop_cpu[1].push(vw.proxy_us);
        for (r, w) in rates.iter_mut().zip([dw, pw, vw]) {
            r.push(w.rate);
        }
    }
    let [d, p, v] = rates.map(median);
    let [pipe_cpu, hop_cpu] = hop_cpu.map(median);
    println!(
        "throughput, {CLIENTS} clients, ContainerStatus, median of {THROUGHPUT_ROUNDS}: direct {d:.0}/s | pipe {p:.0}/s ({:.2}×) | podckptd {v:.0}/s ({:.2}× of direct) = {:.2}× the pipe's (target ≥ 0.75×) | CPU per call: pipe {pipe_cpu:.1} µs, podckptd {hop_cpu:.1} µs",
        p / d,
        v / d,
        v / p
    );
    let kib = |key: &str| status_kib(daemon.0.id(), key);
    println!(
        "podckptd resident memory: idle {:.1} MiB, peak over the whole run {:.1} MiB",
        idle_kib as f64 / 1024.0,
        kib("VmHWM:") as f64 / 1024.0
    );
    drop(guards);
}
