//! End to end on CRI-O (the test bed's third runtime): CheckpointPod and
//! RestorePod through podckptd in front of CRI-O 1.36, podckpt-runc as its
//! runc. CRI-O runs the OCI runtime's `create` inside CreateContainer, so
//! these tests are where a registration written too late would show: the
//! restored counter must continue from the checkpointed value.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::cri::{
    checkpoint_pod, exec, pods_named, remove_leftover_pods, start_container, PodGuard,
};
use common::crio::{crio_container_config, crio_namespaces, crio_pod_config, run_crio_pod};
use common::testbed::Testbed;
use common::Daemon;
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;
use podckpt::restore::wrapper::DEFAULT_RESTORE_DIR;
use podckpt::restore::{Registration, Registry, Stage};

/// The tests share the node's restore dir: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const COUNTER: &str = common::pod3::COUNTER;

/// podckptd in front of the test bed's CRI-O.
async fn setup(test: &str) -> Option<(Testbed, Daemon, CriClient)> {
    let tb = Testbed::get(test)?;
    let d = Daemon::start(&tb.path("CRIO_ENDPOINT"), &["--criu", tb.var("CRIU")]).await;
    let client = d.client();
    Some((tb, d, client))
}

/// The counter's value in its rootfs diff inside a pod archive.
fn counter_at_cut(archive: &Path) -> u64 {
    common::archive_file(
        archive,
        "containers/counter/rootfs-diff.tar",
        Some("data/counter"),
    )
    .expect("data/counter in the counter's rootfs diff")
    .trim()
    .parse()
    .unwrap()
}

fn registrations() -> usize {
    ["registrations", "keys"]
        .iter()
        .filter_map(|d| std::fs::read_dir(Path::new(DEFAULT_RESTORE_DIR).join(d)).ok())
        .flat_map(|rd| rd.filter_map(Result::ok))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crio_pod_checkpointed_and_restored_continues_from_the_cut() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_crio::restore").await else {
        return;
    };
    let before = registrations();
    let log_dir = tempfile::tempdir().unwrap();
    let (guard, pod, config) = run_crio_pod(&mut client, "crio-orig", log_dir.path()).await;
    let counter = start_container(
        &mut client,
        &pod,
        &config,
        crio_container_config(&tb, "counter", COUNTER),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let out = tempfile::tempdir().unwrap();
    let archive = checkpoint_pod(&mut client, &pod, vec![counter], out.path()).await;
    let manifest = podckpt::archive::reader::read_manifest(&archive).unwrap();
    assert_eq!(manifest.containers.len(), 1);
    let cut = counter_at_cut(&archive);
    assert!(cut > 1, "the counter ran before the cut ({cut})");
    drop(guard);

    // A new pod from the checkpoint.
    remove_leftover_pods(&mut client, "crio-new").await;
    let new_logs = tempfile::tempdir().unwrap();
    // The kubelet sends the pod's configs, as it would for a new pod.
    assert!(
        manifest.containers[0].config.is_some(),
        "the manifest records the container's config"
    );
    let configs = vec![crio_container_config(&tb, "counter", COUNTER)];
    let mut req = tonic::Request::new(RestorePodRequest {
        checkpoint_path: out.path().display().to_string(),
        config: Some({
            // A new pod, with the checkpointed pod's hostname (RestorePod
            // refuses another).
            let mut c = crio_pod_config("crio-new", new_logs.path());
            c.hostname = "crio-orig".into();
            c
        }),
        runtime_handler: String::new(),
        options: HashMap::new(),
        container_configs: configs,
    });
    req.set_timeout(Duration::from_secs(120));
    let resp = client
        .runtime
        .restore_pod(req)
        .await
        .expect("RestorePod on CRI-O")
        .into_inner();
    let _guard = PodGuard {
        client: client.clone(),
        id: resp.pod_sandbox_id.clone(),
    };
    assert_eq!(resp.restored_containers.len(), 1);
    let id = resp.restored_containers[0].container_id.clone();
    client
        .runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer of the restored counter");
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The counter continues from the cut; a container started from its
    // image would count from 1 again.
    let now: u64 = exec(&mut client, &id, &["cat", "/data/counter"])
        .await
        .parse()
        .unwrap();
    assert!(
        now > cut,
        "restored counter at {now}, checkpointed at {cut}"
    );
    let log = std::fs::read_to_string(new_logs.path().join("counter.log")).unwrap_or_default();
    let first: Option<u64> = log.lines().find_map(|l| {
        l.splitn(4, ' ')
            .nth(3)?
            .strip_prefix("count ")?
            .parse()
            .ok()
    });
    if let Some(first) = first {
        assert!(first > cut, "first logged count {first}, cut at {cut}");
    }
    // The registration was used and is gone.
    assert_eq!(registrations(), before, "registrations left behind");
    d.stop().await;
}

/// The first finding: podckptd wrote the registration after
/// CreateContainer, by when CRI-O had run `create` without the restore;
/// podckpt-runc then passed the `start` on and the container ran from its
/// image, counting from 1, with no error. A registration found at `start`
/// that no `create` used must fail StartContainer, say why in
/// podckpt-runc's log, and go; nothing of the image may run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_too_late_for_create_fails_the_start() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_crio::late").await else {
        return;
    };
    let before = registrations();
    let log_dir = tempfile::tempdir().unwrap();
    remove_leftover_pods(&mut client, "crio-late").await;
    let (guard, pod, config) = run_crio_pod(&mut client, "crio-late", log_dir.path()).await;
    // CRI-O runs `create` in here, with no registration in place.
    let id = client
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(crio_container_config(&tb, "counter", COUNTER)),
            sandbox_config: Some(config),
        })
        .await
        .expect("CreateContainer on CRI-O")
        .into_inner()
        .container_id;
    // What the old podckptd wrote once CreateContainer had answered.
    let registry = Registry::new(DEFAULT_RESTORE_DIR);
    let work = registry
        .work_root()
        .join(format!("late-{}", std::process::id()));
    registry
        .store(&Registration {
            container_id: id.clone(),
            name: "counter".into(),
            pod_sandbox_id: pod.clone(),
            container_dir: work.join("containers/counter"),
            work_dir: work,
            stage: Stage::Pending,
            ..Default::default()
        })
        .unwrap();
    assert!(registry.is_registered(&id));

    let err = client
        .runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect_err("a container registered for restore but created without it started");
    eprintln!("StartContainer: {:?} {}", err.code(), err.message());
    let log = std::fs::read_to_string(tb.path("RUNC_WRAPPER_LOG")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(&id)
                && l.contains("registered for restore but was created without it")),
        "podckpt-runc's log does not say why {id} was refused"
    );
    assert!(!registry.is_registered(&id), "the registration stayed");
    assert_eq!(registrations(), before);
    assert!(
        err.message()
            .contains("registered for restore but was created without it"),
        "StartContainer's error does not say why: {}",
        err.message()
    );
    // CRI-O removes a container whose start failed; else it must not run.
    match client
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
    {
        Ok(s) => assert_ne!(
            s.into_inner().status.unwrap().state,
            ContainerState::ContainerRunning as i32
        ),
        Err(e) => assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}"),
    }
    // The image's counter never ran.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logged = std::fs::read_to_string(log_dir.path().join("counter.log")).unwrap_or_default();
    assert!(
        !logged.contains("count "),
        "the container ran from its image: {logged}"
    );
    drop(guard);
    d.stop().await;
}

/// CRI-O's status keeps no sandbox config and only part of a container's:
/// the configs the kubelet sent through podckptd are what the checkpoint
/// records, and `podckpt restore-pod` rebuilds the pod from them whole
/// (namespace options, DNS, ports, hostname, log directory,
/// user_specified_image), with no stale env.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crio_checkpoint_records_the_sent_configs_and_the_cli_restores_them() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_crio::configs").await else {
        return;
    };
    remove_leftover_pods(&mut client, "crio-cfg").await;
    // The kubelet's layout: <root>/<namespace>_<name>_<uid>/<container>/0.log
    let logs = tempfile::tempdir().unwrap();
    let mut config = crio_pod_config("crio-cfg", logs.path());
    let meta = config.metadata.clone().unwrap();
    let pod_logs = logs
        .path()
        .join(format!("{}_{}_{}", meta.namespace, meta.name, meta.uid));
    std::fs::create_dir_all(pod_logs.join("counter")).unwrap();
    config.log_directory = pod_logs.display().to_string();
    config.hostname = "crio-cfg-host".into();
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["podckpt-e2e.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    config.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 0,
        host_ip: String::new(),
    }];
    let pod = client
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox on CRI-O")
        .into_inner()
        .pod_sandbox_id;
    let guard = PodGuard {
        client: client.clone(),
        id: pod.clone(),
    };
    let mut cc = crio_container_config(&tb, "counter", COUNTER);
    cc.log_path = "counter/0.log".into();
    cc.envs = vec![KeyValue {
        key: "MODE".into(),
        value: b"warm".to_vec(),
    }];
    let counter = start_container(&mut client, &pod, &config, cc.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let out = tempfile::tempdir().unwrap();
    let archive = checkpoint_pod(&mut client, &pod, vec![counter], out.path()).await;
    let manifest = podckpt::archive::reader::read_manifest(&archive).unwrap();
    // The configs as sent, whole.
    assert_eq!(
        manifest.sandbox.config.as_ref(),
        Some(&config),
        "the sandbox config recorded is the one sent"
    );
    assert_eq!(
        manifest.containers[0].config.as_ref(),
        Some(&cc),
        "the container config recorded is the one sent"
    );
    let cut = counter_at_cut(&archive);
    drop(guard);

    // The operator's restore, through the CLI and podckptd.
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_podckpt"))
        .arg("--endpoint")
        .arg(format!("unix://{}", d.socket.display()))
        .arg("restore-pod")
        .arg(out.path())
        .args(["--name", "crio-cfg-new", "--start", "--timeout", "120"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout).into_owned();
    let new_pod = pods_named(&mut client, "crio-cfg-new").await.pop();
    let _guard = new_pod.as_ref().map(|p| PodGuard {
        client: client.clone(),
        id: p.id.clone(),
    });
    assert!(
        cli.status.success(),
        "podckpt restore-pod: {}\n{stdout}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let new_pod = new_pod.expect("the restored pod");
    let status = client
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: new_pod.id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        status
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options),
        crio_namespaces(),
        "namespace options kept"
    );
    let containers = client
        .runtime
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: new_pod.id.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(containers.len(), 1);
    let id = containers[0].id.clone();
    let cstatus = client
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
    assert!(
        cstatus.log_path.ends_with("/counter/0.log"),
        "log directory kept: {}",
        cstatus.log_path
    );
    // user_specified_image: CRI-O does not report it in the status; the
    // recorded config above holds it, and CRI-O (signature_policy set on
    // the test bed) refuses a create without it.
    assert_eq!(exec(&mut client, &id, &["hostname"]).await, "crio-cfg-host");
    let resolv = exec(&mut client, &id, &["cat", "/etc/resolv.conf"]).await;
    assert!(
        resolv.contains("10.96.0.10") && resolv.contains("ndots:5"),
        "DNS kept: {resolv}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let now: u64 = exec(&mut client, &id, &["cat", "/data/counter"])
        .await
        .parse()
        .unwrap();
    assert!(
        now > cut,
        "restored counter at {now}, checkpointed at {cut}"
    );
    d.stop().await;
}
