//! The proxy's cost, measured side by side in one run against the same
//! containerd: latency (p50/p99) of Version, ContainerStatus and
//! ListContainers with 50 containers present, directly and through
//! podckptd, and throughput with 16 concurrent clients. Prints the ratios.
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
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(4);

fn testbed() -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string("/run/podckpt-testbed/testbed.env").ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The daemon process and the directory holding its socket (kept alive with it).
struct Podckptd(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Podckptd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start_podckptd(runtime: &str) -> (Podckptd, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("podckpt.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_podckptd"))
        .args([
            "--listen",
            sock.to_str().unwrap(),
            "--runtime-endpoint",
            runtime,
            "--log",
            "warn",
        ])
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .expect("start podckptd");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "podckptd did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (Podckptd(child, dir), sock)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Times `LATENCY_CALLS` sequential calls on each path, interleaved so both
/// see the same machine state.
async fn latency<F, Fut>(name: &str, direct: &CriClient, via: &CriClient, call: F, calls: usize)
where
    F: Fn(CriClient) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Warm both connections up.
    for _ in 0..50 {
        call(direct.clone()).await;
        call(via.clone()).await;
    }
    let (mut d, mut v) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for _ in 0..calls {
        let t = Instant::now();
        call(direct.clone()).await;
        d.push(t.elapsed());
        let t = Instant::now();
        call(via.clone()).await;
        v.push(t.elapsed());
    }
    d.sort();
    v.sort();
    let (d50, d99, v50, v99) = (
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
    );
    println!(
        "{name:<28} direct p50 {:>8.1} µs  p99 {:>8.1} µs | podckptd p50 {:>8.1} µs  p99 {:>8.1} µs | added p50 {:>+7.1} µs (target ≤ 100)  p99 {:>+8.1} µs (target ≤ 1000) | ratio p50 {:.2}×",
        us(d50), us(d99), us(v50), us(v99), us(v50) - us(d50), us(v99) - us(d99), us(v50) / us(d50)
    );
}

/// Calls per second with `CLIENTS` clients, each on its own connection,
/// for a fixed window (bounded in time and stopping by itself).
async fn throughput(endpoint: &std::path::Path, container_id: &str) -> f64 {
    let stop = Instant::now() + THROUGHPUT_WINDOW;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let mut c = CriClient::new(endpoint.to_path_buf());
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
    total as f64 / THROUGHPUT_WINDOW.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
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
    let (_daemon, sock) = start_podckptd(endpoint.to_str().unwrap());
    let direct = CriClient::new(endpoint.clone());
    let via = CriClient::new(sock.clone());
    let mut setup = direct.clone();

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
        &direct,
        &via,
        |mut c| async move {
            c.runtime.version(VersionRequest::default()).await.unwrap();
        },
        LATENCY_CALLS,
    )
    .await;
    let id = ids[0].clone();
    latency(
        "ContainerStatus",
        &direct,
        &via,
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
        &direct,
        &via,
        |mut c| async move {
            let n = c
                .runtime
                .list_containers(ListContainersRequest::default())
                .await
                .unwrap()
                .into_inner()
                .containers
                .len();
            assert!(n >= CONTAINERS);
        },
        LATENCY_CALLS / 2,
    )
    .await;

    let d = throughput(&endpoint, &ids[0]).await;
    let v = throughput(&sock, &ids[0]).await;
    println!(
        "throughput, {CLIENTS} clients, ContainerStatus: direct {d:.0}/s | podckptd {v:.0}/s | ratio {:.2}× (target ≥ 0.90×)",
        v / d
    );
    drop(guards);
}
