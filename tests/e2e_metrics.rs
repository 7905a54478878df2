//! End to end: what Prometheus scrapes from `--metrics-listen` moves with a
//! real CheckpointPod and RestorePod (real containerd 2.1, CRIU, runc
//! behind podckpt-runc). Two scrapes over HTTP, before and after; the text
//! is parsed line by line and every counter the two calls touch is checked
//! to have moved by exactly what they did.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::cri::{container_config, run_pod, start_container, PodGuard};
use common::testbed::Testbed;
use common::Daemon;
use podckpt::cri::api::*;

/// One sample of the exposition: metric name and its labels, sorted.
type Key = (String, BTreeMap<String, String>);

/// Parses the text format (Prometheus 0.0.4 / OpenMetrics 1.0): comment
/// lines (`# HELP`, `# TYPE`, `# EOF`) skipped, every other line
/// `name{label="value",...} value [timestamp]`. Panics on a line it cannot
/// read: a malformed exposition is a failure of the test.
fn parse_exposition(text: &str) -> HashMap<Key, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let end = loop {
                // label name
                let (start, c) = chars.next().unwrap_or_else(|| panic!("unclosed: {line:?}"));
                if c == '}' {
                    break start;
                }
                let c = if c == ',' {
                    let (_, c) = chars.next().unwrap();
                    if c == '}' {
                        break body.find('}').unwrap();
                    }
                    c
                } else {
                    c
                };
                let mut lname = String::from(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    lname.push(c);
                }
                assert_eq!(chars.next().map(|x| x.1), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    match chars.next().map(|x| x.1) {
                        Some('\\') => match chars.next().map(|x| x.1) {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => panic!("bad escape: {line:?}"),
                        },
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => panic!("unclosed value: {line:?}"),
                    }
                }
                labels.insert(lname, value);
            };
            rest = &body[end + 1..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line:?}")),
        };
        assert!(
            out.insert((name, labels), value).is_none(),
            "duplicate sample: {line:?}"
        );
    }
    out
}

/// `GET /metrics` over HTTP/1.1; the body.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: podckptd\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    // Connection: close, no chunking for a full body: the body is as sent.
    body.to_string()
}

/// A free port on 127.0.0.1 for --metrics-listen (in-process, podckptd's
/// log of the bound address is not at hand).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Samples(HashMap<Key, f64>);

impl Samples {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (
            name.to_string(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        // A labelled series not yet recorded is absent: zero.
        self.0.get(&key).copied().unwrap_or(0.0)
    }
    /// Sum over every series of `name` (whatever its labels).
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }
}

#[test]
fn parser_reads_the_exposition() {
    let m = parse_exposition(
        "# HELP a_total A.\n# TYPE a counter\na_total{code=\"OK\",operation=\"pod\"} 3\n\
         b_bucket{le=\"+Inf\"} 2\nb_count 2\nc{x=\"q\\\"uote\"} 1.5e3\n# EOF\n",
    );
    let s = Samples(m);
    assert_eq!(
        s.get("a_total", &[("operation", "pod"), ("code", "OK")]),
        3.0
    );
    assert_eq!(s.get("b_bucket", &[("le", "+Inf")]), 2.0);
    assert_eq!(s.get("b_count", &[]), 2.0);
    assert_eq!(s.get("c", &[("x", "q\"uote")]), 1500.0);
    assert_eq!(s.sum("a_total"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_moves_with_checkpoint_and_restore() {
    let Some(tb) = Testbed::get("e2e_metrics::scrape") else {
        return;
    };
    let addr = free_addr();
    let d = Daemon::start(
        &tb.path("CONTAINERD2_ENDPOINT"),
        &[
            "--criu",
            tb.var("CRIU"),
            "--metrics-listen",
            &addr.to_string(),
        ],
    )
    .await;
    let mut client = d.client();

    // A one-container pod running the counter.
    let log_dir = tempfile::tempdir().unwrap();
    let (guard, pod_id, pod_cfg) = run_pod(&mut client, "metrics-orig", log_dir.path()).await;
    let cid = start_container(
        &mut client,
        &pod_id,
        &pod_cfg,
        container_config(
            "counter",
            tb.var("APP_IMAGE"),
            &["/bin/sh", "-c", common::pod3::COUNTER],
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = Samples(parse_exposition(&scrape(addr)));

    let out = tempfile::tempdir().unwrap();
    let mut req = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: pod_id.clone(),
        output_path: out.path().display().to_string(),
        container_ids: vec![cid],
        options: HashMap::new(),
    });
    req.set_timeout(Duration::from_secs(120));
    client.runtime.checkpoint_pod(req).await.unwrap();
    let archive = out.path().join("pod.tar.zst");
    let archive_len = std::fs::metadata(&archive).unwrap().len();
    let manifest = podckpt::archive::reader::read_manifest(&archive).unwrap();
    drop(guard);

    let restore_logs = tempfile::tempdir().unwrap();
    common::cri::remove_leftover_pods(&mut client, "metrics-new").await;
    // A new pod, with the checkpointed pod's hostname (RestorePod checks it).
    let mut new_cfg = common::cri::pod_config("metrics-new", restore_logs.path());
    new_cfg.hostname = pod_cfg.hostname.clone();
    let mut req = tonic::Request::new(RestorePodRequest {
        checkpoint_path: out.path().display().to_string(),
        config: Some(new_cfg),
        runtime_handler: String::new(),
        options: HashMap::new(),
        container_configs: manifest
            .containers
            .iter()
            .map(|c| c.config.clone().unwrap())
            .collect(),
    });
    req.set_timeout(Duration::from_secs(120));
    let resp = client.runtime.restore_pod(req).await.unwrap().into_inner();
    let _restored = PodGuard {
        client: client.clone(),
        id: resp.pod_sandbox_id.clone(),
    };

    let after = Samples(parse_exposition(&scrape(addr)));
    let moved =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let pod_ok = [("operation", "pod"), ("code", "OK")];
    let pod = [("operation", "pod")];

    // One call each, answered OK; no other code moved.
    assert_eq!(moved("podckpt_checkpoint_requests_total", &pod_ok), 1.0);
    assert_eq!(moved("podckpt_restore_requests_total", &pod_ok), 1.0);
    assert_eq!(
        after.sum("podckpt_checkpoint_requests_total")
            - before.sum("podckpt_checkpoint_requests_total"),
        1.0
    );
    assert_eq!(
        after.sum("podckpt_restore_requests_total") - before.sum("podckpt_restore_requests_total"),
        1.0
    );
    // Each histogram observed exactly that call.
    for h in [
        "podckpt_checkpoint_duration_seconds",
        "podckpt_checkpoint_frozen_duration_seconds",
        "podckpt_checkpoint_archive_size_bytes",
        "podckpt_restore_duration_seconds",
    ] {
        assert_eq!(moved(&format!("{h}_count"), &pod), 1.0, "{h}_count");
        assert!(moved(&format!("{h}_sum"), &pod) > 0.0, "{h}_sum");
    }
    // The archive's size is what was written.
    assert_eq!(
        moved("podckpt_checkpoint_archive_size_bytes_sum", &pod),
        archive_len as f64
    );
    // The frozen window is part of the whole call.
    assert!(
        moved("podckpt_checkpoint_frozen_duration_seconds_sum", &pod)
            <= moved("podckpt_checkpoint_duration_seconds_sum", &pod)
    );
    // The restore extracted files (the container's rootfs diff and CRIU
    // images at least).
    assert!(moved("podckpt_restore_extracted_bytes_total", &[]) > 0.0);
    // Calls podckptd relayed to containerd between the scrapes: the
    // original pod's StopPodSandbox and RemovePodSandbox, the ListPodSandbox
    // of the leftover check (sandbox class) at least.
    assert!(moved("podckpt_relayed_calls_total", &[("class", "sandbox")]) >= 3.0);
    // The node's state.
    assert_eq!(after.get("podckpt_runtime_up", &[]), 1.0);
    assert_eq!(after.get("podckpt_criu_ready", &[]), 1.0);
    assert_eq!(
        after.get(
            "podckpt_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    drop(_restored);
    d.stop().await;
}
