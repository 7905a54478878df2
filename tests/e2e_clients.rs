//! End to end: real gRPC client patterns through podckptd to the test
//! bed's containerd 2.1, each compared with the same client talking to
//! containerd directly.
//!
//! - The Go client pattern (grpc-go, the kubelet's library): one
//!   connection, a long call in flight (ExecSync) while several
//!   CreateContainer calls go out, and a BDP PING after each answer.
//!   containerd's gRPC server closes a connection that sends PINGs after
//!   which it wrote nothing (`too_many_pings`); podckptd must never pass
//!   the client's PINGs on.
//! - Python's grpcio (gRPC C-core), with its own :authority for unix
//!   sockets: creates, starts and checkpoints a container.
//!
//! Needs root and the test bed; skips without them unless PODCKPT_E2E=1.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes};
use common::cri::{container_config, run_pod, start_container};
use common::testbed::Testbed;
use common::Daemon;
use podckpt::cri::api::*;
use prost::Message;
use tokio::net::UnixStream;

/// One unary gRPC call on a raw h2 connection: (grpc-status, message).
async fn h2_call<M: Message>(
    send: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    msg: &M,
) -> (String, String, Bytes) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://localhost/runtime.v1.RuntimeService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "60S")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.expect("connection usable");
    let (resp, mut stream) = ready.send_request(req, false).expect("request sent");
    let body = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    stream.send_data(Bytes::from(framed), true).unwrap();
    let resp = match resp.await {
        Ok(r) => r,
        Err(err) => return ("transport".into(), err.to_string(), Bytes::new()),
    };
    let (head, mut body) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
                data.extend_from_slice(&c);
            }
            Err(err) => return ("transport".into(), err.to_string(), Bytes::new()),
        }
    }
    let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.headers.get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut msg = Bytes::from(data);
    if msg.len() >= 5 {
        msg.advance(5);
    }
    (field("grpc-status"), field("grpc-message"), msg)
}

/// The Go pattern on one connection to `socket`; returns each call's
/// outcome as "Method: status".
async fn go_pattern(
    socket: &Path,
    pod: &str,
    pod_config: &PodSandboxConfig,
    app: &str,
    sleeper: &str,
) -> Vec<String> {
    let io = UnixStream::connect(socket).await.unwrap();
    let (send, mut conn) = h2::client::handshake(io).await.unwrap();
    let mut pings = conn.ping_pong().expect("ping_pong");
    let driver = tokio::spawn(async move { conn.await.map_err(|e| e.to_string()) });
    let mut outcomes = Vec::new();

    // The long call: ExecSync of a 3 s sleep.
    let mut exec_send = send.clone();
    let exec = ExecSyncRequest {
        container_id: sleeper.into(),
        cmd: vec!["sleep".into(), "3".into()],
        timeout: 30,
    };
    let long = tokio::spawn(async move { h2_call(&mut exec_send, "ExecSync", &exec).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Meanwhile three CreateContainer calls, each answer followed by a BDP
    // ping as grpc-go sends after receiving data.
    let mut send2 = send.clone();
    for i in 0..3 {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(container_config(
                &format!("go-pattern-{i}"),
                app,
                &["sleep", "60"],
            )),
            sandbox_config: Some(pod_config.clone()),
        };
        let (status, message, _) = h2_call(&mut send2, "CreateContainer", &req).await;
        outcomes.push(format!("CreateContainer: {status} {message}"));
        let pong =
            tokio::time::timeout(Duration::from_secs(5), pings.ping(h2::Ping::opaque())).await;
        outcomes.push(format!(
            "PING: {}",
            if matches!(pong, Ok(Ok(_))) {
                "pong"
            } else {
                "none"
            }
        ));
    }
    // containerd closes a connection it finds abusive 1 s after its GOAWAY:
    // give it the time, then the long call and one more call must succeed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, message, _) = long.await.unwrap();
    outcomes.push(format!("ExecSync: {status} {message}"));
    let (status, message, _) = h2_call(&mut send2, "Version", &VersionRequest::default()).await;
    outcomes.push(format!("Version: {status} {message}"));
    drop(send2);
    drop(send);
    drop(pings);
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_pattern_with_bdp_pings_behaves_as_directly() {
    let test = "e2e_clients::go_pattern";
    let Some(tb) = Testbed::get(test) else {
        return;
    };
    let runtime = tb.path("CONTAINERD2_ENDPOINT");
    let d = Daemon::start(&runtime, &["--criu", tb.var("CRIU")]).await;
    let mut direct = podckpt::cri::client::CriClient::new(runtime.clone());
    let logs = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (label, socket) in [("direct", runtime.clone()), ("podckptd", d.socket.clone())] {
        let name = format!("e2e-go-pattern-{label}");
        let (_guard, pod, config) = run_pod(&mut direct, &name, logs.path()).await;
        let sleeper = start_container(
            &mut direct,
            &pod,
            &config,
            container_config("sleeper", tb.var("APP_IMAGE"), &["sleep", "600"]),
        )
        .await;
        let outcomes = go_pattern(&socket, &pod, &config, tb.var("APP_IMAGE"), &sleeper).await;
        eprintln!("{label}: {outcomes:#?}");
        results.push(outcomes);
    }
    let ok = |v: &Vec<String>| v.iter().all(|o| o.ends_with(": 0 ") || o.ends_with("pong"));
    assert!(ok(&results[0]), "directly: {:#?}", results[0]);
    assert_eq!(
        results[0], results[1],
        "podckptd behaves differently from containerd"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_creates_starts_and_checkpoints_as_directly() {
    let test = "e2e_clients::python_grpcio";
    let Some(tb) = Testbed::get(test) else {
        return;
    };
    let python = tb.path("PYTHON_GRPC");
    let runtime = tb.path("CONTAINERD2_ENDPOINT");
    let d = Daemon::start(&runtime, &["--criu", tb.var("CRIU")]).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/cri_grpcio.py");
    let proto = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto/cri");
    let mut runs = Vec::new();
    for (label, socket) in [("direct", runtime.clone()), ("podckptd", d.socket.clone())] {
        let work = tempfile::tempdir().unwrap();
        let out = tokio::process::Command::new(&python)
            .arg(&script)
            .arg(&proto)
            .arg(&socket)
            .arg(work.path())
            .arg(format!("e2e-grpcio-{label}"))
            .arg(tb.var("APP_IMAGE"))
            .arg(tb.var("PAUSE_IMAGE"))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{label}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let steps: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        eprintln!("{label}: {steps:#?}");
        let codes: Vec<String> = steps
            .iter()
            .map(|s| {
                format!(
                    "{}: {}",
                    s["step"].as_str().unwrap(),
                    s["code"].as_str().unwrap()
                )
            })
            .collect();
        runs.push(codes);
    }
    let want = [
        "Version: OK",
        "RunPodSandbox: OK",
        "CreateContainer: OK",
        "StartContainer: OK",
        "CheckpointContainer: OK",
        "archive: OK",
        "state after checkpoint: CONTAINER_RUNNING",
        "StopPodSandbox: OK",
        "RemovePodSandbox: OK",
    ];
    assert_eq!(runs[0], want, "directly");
    assert_eq!(runs[1], want, "through podckptd");
    d.stop().await;
}
