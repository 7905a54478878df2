//! End to end: a real containerd (1.6 and 2.1) through podckptd, with the
//! project's own CRI client. Every call is made through podckptd and, where
//! the answer is deterministic, directly too: the answers must be the same.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::cri::{container_config, run_pod, start_container};
use common::testbed::Testbed;
use common::Daemon;
use futures_util::StreamExt;
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;
use tonic::Code;

/// The same call through podckptd and directly; returns both results.
macro_rules! both {
    ($via:expr, $direct:expr, $svc:ident . $method:ident ( $req:expr )) => {{
        let req = $req;
        let a = $via.$svc.$method(req.clone()).await.map(|r| r.into_inner());
        let b = $direct.$svc.$method(req).await.map(|r| r.into_inner());
        (a, b)
    }};
}

/// Asserts two results are equal, or are errors with the same code and
/// message (e.g. containerd 1.6's Unimplemented).
fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    via: Result<T, tonic::Status>,
    direct: Result<T, tonic::Status>,
) -> Option<T> {
    match (via, direct) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "{what}: podckptd and containerd differ");
            Some(a)
        }
        (Err(a), Err(b)) => {
            assert_eq!(
                (a.code(), a.message()),
                (b.code(), b.message()),
                "{what}: errors differ"
            );
            None
        }
        (a, b) => panic!("{what}: podckptd gave {a:?}, containerd gave {b:?}"),
    }
}

async fn pod_lifecycle(runtime: &str) {
    let test = format!("e2e_proxy::{runtime}");
    let Some(tb) = Testbed::get(&test) else {
        return;
    };
    let endpoint = tb.path(&format!("{}_ENDPOINT", runtime.to_uppercase()));
    let app = tb.var("APP_IMAGE").to_string();
    let d = Daemon::start(&endpoint, &[]).await;
    let mut via = d.client();
    let mut direct = CriClient::new(endpoint.clone());
    let pod_name = format!("proxy-{runtime}");

    // Version, Status, images.
    let (a, b) = both!(
        via,
        direct,
        runtime.version(VersionRequest {
            version: "v1".into()
        })
    );
    let version = same("Version", a, b).unwrap();
    assert_eq!(version.runtime_name, "containerd");
    eprintln!("{test}: containerd {}", version.runtime_version);
    let (a, b) = both!(
        via,
        direct,
        runtime.status(StatusRequest { verbose: false })
    );
    let status = same("Status", a.map(|s| s.status), b.map(|s| s.status))
        .unwrap()
        .unwrap();
    assert!(
        status.conditions.iter().all(|c| c.status),
        "runtime not healthy: {status:?}"
    );
    // containerd lists in map order: compare as sets.
    let sorted_images = |r: Result<ListImagesResponse, tonic::Status>| {
        r.map(|mut l| {
            l.images.sort_by(|x, y| x.id.cmp(&y.id));
            l
        })
    };
    let (a, b) = both!(via, direct, image.list_images(ListImagesRequest::default()));
    let images = same("ListImages", sorted_images(a), sorted_images(b)).unwrap();
    assert!(
        images
            .images
            .iter()
            .any(|i| i.repo_tags.iter().any(|t| t == &app)),
        "{app} missing: {images:?}"
    );
    let (a, b) = both!(
        via,
        direct,
        image.image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: app.clone(),
                ..Default::default()
            }),
            verbose: true
        })
    );
    let st = same("ImageStatus", a, b).unwrap();
    assert!(st.image.is_some());

    // The events stream, opened before anything happens to the pod. A task:
    // containerd 2.x sends the stream's headers only with the first event.
    // The task reads the stream all along, as a kubelet does: containerd
    // 2.x keeps up to 1000 events for the first subscriber, and unread
    // events beyond the client's 64 KiB window would stall every call on
    // this connection by HTTP/2 flow control (after a busy node, e.g. the
    // proxy bench, they do).
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
    let events_call = {
        let mut c = via.clone();
        tokio::spawn(async move {
            let mut stream = c
                .runtime
                .get_container_events(GetEventsRequest {})
                .await?
                .into_inner();
            tokio::spawn(async move {
                while let Some(ev) = stream.next().await {
                    if events_tx.send(ev).is_err() {
                        break;
                    }
                }
            });
            Ok::<_, tonic::Status>(())
        })
    };

    // A pod through podckptd: it gets an IP on the test bed's bridge.
    let log_dir = tempfile::tempdir().unwrap();
    let (_guard, pod_id, config) = run_pod(&mut via, &pod_name, log_dir.path()).await;
    let (a, b) = both!(
        via,
        direct,
        runtime.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false
        })
    );
    let pod = same("PodSandboxStatus", a, b).unwrap().status.unwrap();
    assert_eq!(pod.state, PodSandboxState::SandboxReady as i32);
    let ip = pod
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    let subnet = if runtime == "containerd1" {
        "10.88."
    } else {
        "10.89."
    };
    assert!(
        ip.starts_with(subnet),
        "pod IP {ip:?} not from the test bed's CNI bridge"
    );

    // Two containers: a counter, and an HTTP server.
    let mut ids = vec![];
    for (name, cmd) in [
        ("counter", vec!["/bin/sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]),
        ("web", vec!["/bin/sh", "-c", "mkdir -p /www && echo podckpt-e2e > /www/index.html && exec httpd -f -p 8080 -h /www"]),
    ] {
        let id = start_container(&mut via, &pod_id, &config, container_config(name, &app, &cmd)).await;
        ids.push(id);
    }

    // The events stream saw both containers start (containerd 1.6 has no
    // GetContainerEvents: then the answer is the same Unimplemented).
    let events = tokio::time::timeout(Duration::from_secs(20), events_call)
        .await
        .expect("GetContainerEvents never answered")
        .unwrap();
    let events = match events {
        Ok(()) => Some(&mut events_rx),
        Err(a) => {
            let b = direct
                .runtime
                .get_container_events(GetEventsRequest {})
                .await
                .unwrap_err();
            assert_eq!((a.code(), a.message()), (b.code(), b.message()));
            assert_eq!(a.code(), Code::Unimplemented);
            None
        }
    };
    if let Some(stream) = events {
        let mut started = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while started.len() < ids.len() {
            let ev = tokio::time::timeout_at(deadline, stream.recv())
                .await
                .expect("no start events within 20 s")
                .expect("event stream ended")
                .unwrap();
            if ev.container_event_type == ContainerEventType::ContainerStartedEvent as i32
                && ids.contains(&ev.container_id)
            {
                started.insert(ev.container_id);
            }
        }
    }

    // ContainerStatus and ListContainers: same through podckptd as direct.
    for id in &ids {
        let (a, b) = both!(
            via,
            direct,
            runtime.container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: true
            })
        );
        let st = same("ContainerStatus", a, b).unwrap().status.unwrap();
        assert_eq!(st.state, ContainerState::ContainerRunning as i32);
    }
    let filter = ContainerFilter {
        pod_sandbox_id: pod_id.clone(),
        ..Default::default()
    };
    let (a, b) = both!(
        via,
        direct,
        runtime.list_containers(ListContainersRequest {
            filter: Some(filter.clone())
        })
    );
    let sorted = |r: Result<ListContainersResponse, tonic::Status>| {
        r.map(|mut l| {
            l.containers.sort_by(|x, y| x.id.cmp(&y.id));
            l
        })
    };
    let listed = same("ListContainers", sorted(a), sorted(b)).unwrap();
    assert_eq!(listed.containers.len(), 2);

    // ExecSync: output, stderr and exit code.
    let exec = ExecSyncRequest {
        container_id: ids[0].clone(),
        cmd: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hello; echo oops >&2; exit 3".into(),
        ],
        timeout: 10,
    };
    let (a, b) = both!(via, direct, runtime.exec_sync(exec));
    let out = same("ExecSync", a, b).unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"hello\n"[..], &b"oops\n"[..], 3)
    );

    // The web container answers at the pod IP (the test bed's own bridge).
    let body = http_get(&ip, 8080).await;
    assert!(body.contains("podckpt-e2e"), "{body}");

    // Logs: the counter's CRI log file grows; ReopenContainerLog works.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let log_path: PathBuf = log_dir.path().join("counter.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines().any(|l| l.contains(" stdout F tick 1")),
        "CRI log format: {log}"
    );
    let (a, b) = both!(
        via,
        direct,
        runtime.reopen_container_log(ReopenContainerLogRequest {
            container_id: ids[0].clone()
        })
    );
    same("ReopenContainerLog", a, b);

    // Stats (values move, so compare shape only).
    let stats = via
        .runtime
        .container_stats(ContainerStatsRequest {
            container_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.stats.unwrap().attributes.unwrap().id, ids[0]);
    let list = via
        .runtime
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: pod_id.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.stats.len(), 2);
    let (a, b) = both!(
        via,
        direct,
        runtime.pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod_id.clone()
        })
    );
    if let (Err(a), Err(b)) = (&a, &b) {
        assert_eq!((a.code(), a.message()), (b.code(), b.message()));
    } else {
        assert!(
            a.is_ok() && b.is_ok(),
            "PodSandboxStats: {:?} vs {:?}",
            a.err(),
            b.err()
        );
    }

    // CheckpointContainer is podckptd's own: on containerd 1.6, which
    // answers Unimplemented directly, it works through podckptd. (Its
    // archive is checked by the checkpoint tests.)
    if runtime == "containerd1" {
        let dir = tempfile::tempdir().unwrap();
        let req = CheckpointContainerRequest {
            container_id: ids[0].clone(),
            location: dir.path().join("c.tar").display().to_string(),
            timeout: 60,
        };
        let (a, b) = both!(via, direct, runtime.checkpoint_container(req));
        assert_eq!(b.unwrap_err().code(), Code::Unimplemented);
        a.expect("CheckpointContainer through podckptd");
        assert!(dir.path().join("c.tar").is_file());
    }

    // Stop and remove, through podckptd.
    for id in &ids {
        via.runtime
            .stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 2,
            })
            .await
            .unwrap();
        let st = via
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(st.state, ContainerState::ContainerExited as i32);
        via.runtime
            .remove_container(RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
    }
    let (a, b) = both!(
        via,
        direct,
        runtime.container_status(ContainerStatusRequest {
            container_id: ids[0].clone(),
            verbose: false
        })
    );
    let err = a.as_ref().unwrap_err().clone();
    same("ContainerStatus of removed", a, b);
    assert_eq!(err.code(), Code::NotFound);
    via.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .unwrap();
    via.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .unwrap();
    let (a, b) = both!(
        via,
        direct,
        runtime.list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                id: pod_id.clone(),
                ..Default::default()
            }),
        })
    );
    assert!(same("ListPodSandbox", a, b).unwrap().items.is_empty());
    d.stop().await;
}

/// A minimal HTTP/1.0 GET over TCP to a pod IP on the test bed's bridge.
async fn http_get(ip: &str, port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut last_err = None;
    for _ in 0..50 {
        match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((ip, port)),
        )
        .await
        {
            Ok(Ok(mut s)) => {
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = String::new();
                tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                return buf;
            }
            Ok(Err(e)) => last_err = Some(e.to_string()),
            Err(_) => last_err = Some("connect timed out".into()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot reach {ip}:{port}: {last_err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd2_pod_lifecycle_through_podckptd() {
    pod_lifecycle("containerd2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd1_pod_lifecycle_through_podckptd() {
    pod_lifecycle("containerd1").await;
}

/// The test bed's own podckptd (the release binary, started by
/// `scripts/testbed.sh up`) answers like the runtime it fronts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testbed_daemon_fronts_the_selected_runtime() {
    let Some(tb) = Testbed::get("e2e_proxy::testbed_daemon") else {
        return;
    };
    let mut via = CriClient::new(tb.path("PODCKPT_ENDPOINT"));
    let mut direct = CriClient::new(tb.path("RUNTIME_ENDPOINT"));
    let (a, b) = both!(via, direct, runtime.version(VersionRequest::default()));
    same("Version", a, b).unwrap();
    let meta = std::fs::metadata(tb.path("PODCKPT_ENDPOINT")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o660
    );
}
