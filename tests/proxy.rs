//! Proxy semantics against a fake upstream CRI server: what goes in comes
//! out, byte for byte, status for status.

mod common;

use std::time::{Duration, Instant};

use common::fake_runtime::{Fake, FakeRuntime, FUTURE_METHOD};
use common::Daemon;
use futures_util::StreamExt;
use podckpt::cri::api::*;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::{Code, Request};

/// A fake runtime serving `fake` on a temporary socket, and podckptd in
/// front of it; the directory (holding the socket) is returned first so
/// that, bound as `_dir`, it goes last.
async fn fronted(fake: Fake) -> (tempfile::TempDir, FakeRuntime, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::start(&dir.path().join("rt.sock"), fake).await;
    let d = Daemon::start(&rt.path, &[]).await;
    (dir, rt, d)
}

fn with_meta<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("x-podckpt-test", MetadataValue::from_static("hello"));
    req.metadata_mut().insert_bin(
        "x-podckpt-bin",
        BinaryMetadataValue::from_bytes(&[0, 1, 2, 255]),
    );
    req
}

#[tokio::test]
async fn unary_call_and_metadata_pass_both_ways() {
    let (_dir, rt, d) = fronted(Fake::default()).await;
    let mut c = d.client();

    let resp = c
        .runtime
        .version(with_meta(VersionRequest {
            version: "v1".into(),
        }))
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("x-podckpt-echo").unwrap(), "hello");
    let v = resp.into_inner();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_version.as_str()),
        ("fake", "1.2.3")
    );
    let seen = rt.fake.seen.lock().unwrap().clone();
    assert_eq!(seen.test_header.as_deref(), Some("hello"));
    assert_eq!(seen.bin_header.as_deref(), Some(&[0u8, 1, 2, 255][..]));
    d.stop().await;
}

#[tokio::test]
async fn error_status_details_and_trailers_pass_through() {
    let (_dir, _rt, d) = fronted(Fake::default()).await;
    let err = d
        .client()
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: "missing".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "container \"missing\" not found");
    assert_eq!(err.details(), b"\x08\x05\x12\x07details");
    assert_eq!(err.metadata().get("x-podckpt-trailer").unwrap(), "t1");
    d.stop().await;
}

#[tokio::test]
async fn server_streaming_passes_every_message_and_the_end() {
    let (_dir, _rt, d) = fronted(Fake::default()).await;
    let mut stream = d
        .client()
        .runtime
        .get_container_events(GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut ids = vec![];
    while let Some(ev) = stream.next().await {
        ids.push(ev.unwrap().container_id);
    }
    assert_eq!(ids, ["c0", "c1", "c2"]);
    d.stop().await;
}

#[tokio::test]
async fn unknown_method_is_forwarded_by_path() {
    let (_dir, _rt, d) = fronted(Fake::default()).await;
    let channel = podckpt::cri::client::channel(&d.socket, Duration::from_secs(2));
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<VersionRequest, VersionResponse, _>(
            Request::new(VersionRequest::default()),
            http::uri::PathAndQuery::from_static(FUTURE_METHOD),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(err.message(), "future method reached the runtime");
    assert_eq!(err.metadata().get("x-podckpt-future").unwrap(), "1");
    d.stop().await;
}

#[tokio::test]
async fn deadline_propagates_and_expires() {
    let (_dir, rt, d) = fronted(Fake::default()).await;
    let mut c = d.client();

    let mut req = Request::new(VersionRequest::default());
    req.set_timeout(Duration::from_secs(3));
    c.runtime.version(req).await.unwrap();
    let timeout = rt
        .fake
        .seen
        .lock()
        .unwrap()
        .grpc_timeout
        .clone()
        .expect("grpc-timeout reached the runtime");
    // tonic encodes 3 s as microseconds or milliseconds; either way <= 3 s.
    let (num, unit) = timeout.split_at(timeout.len() - 1);
    let micros: u64 = num.parse::<u64>().unwrap()
        * match unit {
            "u" => 1,
            "m" => 1000,
            "S" => 1_000_000,
            other => panic!("unexpected unit {other}"),
        };
    assert!(micros > 0 && micros <= 3_000_000, "grpc-timeout {timeout}");

    // The fake never enforces deadlines (it sleeps 5 s for "slow"), so the
    // DeadlineExceeded here is podckptd's own.
    let start = Instant::now();
    let (status, message) = common::raw_grpc_call(
        &d.socket,
        "/runtime.v1.RuntimeService/ContainerStatus",
        &[("grpc-timeout", "200m")],
        &ContainerStatusRequest {
            container_id: "slow".into(),
            verbose: false,
        },
    )
    .await;
    assert_eq!(
        status,
        (Code::DeadlineExceeded as i32).to_string(),
        "{message}"
    );
    assert!(message.contains("deadline"), "{message}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    d.stop().await;
}

#[tokio::test]
async fn large_response_of_20_mib_passes() {
    // ~800 bytes per container: 27,000 containers is just over 20 MiB.
    let (_dir, _rt, d) = fronted(Fake {
        containers: 27_000,
        ..Default::default()
    })
    .await;
    let resp = d
        .client()
        .runtime
        .list_containers(ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.containers.len(), 27_000);
    let size = prost::Message::encoded_len(&resp);
    assert!(size > 20 * 1024 * 1024, "response was only {size} bytes");
    d.stop().await;
}

#[tokio::test]
async fn runtime_down_fails_fast_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let rt_path = dir.path().join("rt.sock");
    let d = Daemon::start(&rt_path, &[]).await;
    let mut c = d.client();

    // Nothing listens yet: Unavailable, quickly, naming the runtime socket.
    let start = Instant::now();
    let err = c
        .runtime
        .version(VersionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&rt_path.display().to_string()),
        "{}",
        err.message()
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );

    // The runtime comes up: the same client works through the same daemon.
    let rt = FakeRuntime::start(&rt_path, Fake::default()).await;
    c.runtime.version(VersionRequest::default()).await.unwrap();

    // It dies: Unavailable again, the daemon stays up.
    rt.kill().await;
    let err = c
        .runtime
        .version(VersionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // And comes back.
    let _rt = FakeRuntime::start(&rt_path, Fake::default()).await;
    let mut ok = false;
    for _ in 0..50 {
        if c.runtime.version(VersionRequest::default()).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "podckptd did not reconnect to the restarted runtime");
    d.stop().await;
}

#[tokio::test]
async fn upstream_dying_mid_stream_ends_the_stream_with_unavailable() {
    let (_dir, rt, d) = fronted(Fake {
        stall_after: 2,
        ..Default::default()
    })
    .await;
    let mut stream = d
        .client()
        .runtime
        .get_container_events(GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().container_id, "c0");
    assert_eq!(stream.next().await.unwrap().unwrap().container_id, "c1");
    rt.kill().await;
    let err = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream did not end after the runtime died")
        .expect("stream ended without a status")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    d.stop().await;
}

#[tokio::test]
async fn pod_methods_are_served_by_podckptd_not_the_runtime() {
    let (_dir, _rt, d) = fronted(Fake::default()).await;
    let err = d
        .client()
        .runtime
        .checkpoint_pod(CheckpointPodRequest::default())
        .await
        .unwrap_err();
    // The fake's default stub says "Not yet implemented"; podckptd's own
    // answer names podckptd.
    assert!(err.message().contains("podckptd"), "{err:?}");
    d.stop().await;
}

/// Calls podckptd answers itself and a 20 MiB relayed answer share one
/// connection and its flow-control window: podckptd's own answer bytes
/// must be accounted so the runtime never overruns the client's window
/// (which would kill the connection with FLOW_CONTROL_ERROR).
#[tokio::test]
async fn served_calls_and_a_large_relayed_answer_share_one_connection() {
    let (_dir, _rt, d) = fronted(Fake {
        containers: 27_000,
        ..Default::default()
    })
    .await;
    let c = d.client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..3 {
        let mut c = c.clone();
        set.spawn(async move {
            let n = common::cri::container_count(&mut c).await;
            assert_eq!(n, 27_000, "list {i}");
        });
    }
    for _ in 0..4 {
        let mut c = c.clone();
        set.spawn(async move {
            for _ in 0..25 {
                let err = c
                    .runtime
                    .checkpoint_pod(CheckpointPodRequest::default())
                    .await
                    .unwrap_err();
                assert!(err.message().contains("podckptd"), "{err:?}");
                c.runtime.version(VersionRequest::default()).await.unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    d.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_calls_and_removes_the_socket() {
    let (_dir, _rt, mut d) = fronted(Fake::default()).await;
    let mut c = d.client();
    c.runtime.version(VersionRequest::default()).await.unwrap();
    // A call that takes a while (the fake sleeps 5 s; the grace is 3 s, so
    // the call is cut off when the grace runs out, not before).
    let slow = tokio::spawn(async move {
        let start = Instant::now();
        let r = c
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: "slow".into(),
                verbose: false,
            })
            .await;
        (r, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.begin_stop();
    // New connections are refused promptly.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(tokio::net::UnixStream::connect(&d.socket).await.is_err());
    let (r, elapsed) = slow.await.unwrap();
    assert!(r.is_err(), "the 5 s call cannot finish within a 3 s grace");
    assert!(
        elapsed >= Duration::from_millis(2500),
        "in-flight call was cut before the grace: {elapsed:?}"
    );
    d.join().await;
    assert!(!d.socket.exists());
}

#[tokio::test]
async fn many_concurrent_calls() {
    let (_dir, _rt, d) = fronted(Fake::default()).await;
    let c = d.client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..64 {
        let mut c = c.clone();
        set.spawn(async move {
            for _ in 0..20 {
                let r = c
                    .runtime
                    .container_status(ContainerStatusRequest {
                        container_id: format!("c{i}"),
                        verbose: false,
                    })
                    .await
                    .unwrap();
                assert_eq!(r.into_inner().status.unwrap().id, format!("c{i}"));
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    d.stop().await;
}

#[tokio::test]
async fn shutdown_with_idle_clients_is_prompt() {
    let (_dir, _rt, d) = fronted(Fake::default()).await;
    // A client that stays connected but has no call in flight (the kubelet
    // between calls) must not hold the daemon for the whole grace period.
    let mut c = d.client();
    c.runtime.version(VersionRequest::default()).await.unwrap();
    let start = Instant::now();
    d.stop().await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        start.elapsed()
    );
    drop(c);
}
