//! `podckpt restore-pod` against a fake podckptd (a CRI server answering
//! RestorePod, StartContainer and ContainerStatus): what the CLI sends and
//! what it prints. No root, no runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use podckpt::archive::manifest::{
    ContainerEntry, PodManifest, SandboxEntry, MANIFEST, POD_ARCHIVE_ZSTD, POD_FORMAT,
    POD_FORMAT_VERSION,
};
use podckpt::archive::{ArchiveWriter, Compression};
use podckpt::cri::api::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use podckpt::cri::api::*;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Fake {
    restore: Arc<Mutex<Option<RestorePodRequest>>>,
    started: Arc<Mutex<Vec<String>>>,
    /// ContainerStatus calls per container, to answer CREATED once first.
    polls: Arc<Mutex<HashMap<String, u32>>>,
}

#[tonic::async_trait]
impl RuntimeService for Fake {
    async fn restore_pod(
        &self,
        req: Request<RestorePodRequest>,
    ) -> Result<Response<RestorePodResponse>, Status> {
        let req = req.into_inner();
        // Answer in reverse order: the CLI must still start in manifest order.
        let restored_containers = req
            .container_configs
            .iter()
            .rev()
            .map(|c| {
                let name = c.metadata.clone().unwrap_or_default().name;
                RestoredContainer {
                    container_id: format!("new-{name}"),
                    name,
                }
            })
            .collect();
        *self.restore.lock().unwrap() = Some(req);
        Ok(Response::new(RestorePodResponse {
            pod_sandbox_id: "new-sandbox-42".into(),
            restored_containers,
        }))
    }

    async fn start_container(
        &self,
        req: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        self.started
            .lock()
            .unwrap()
            .push(req.into_inner().container_id);
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn container_status(
        &self,
        req: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        let id = req.into_inner().container_id;
        let n = {
            let mut polls = self.polls.lock().unwrap();
            let n = polls.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        let started = self.started.lock().unwrap().contains(&id);
        let state = if started && n > 1 {
            ContainerState::ContainerRunning
        } else {
            ContainerState::ContainerCreated
        };
        Ok(Response::new(ContainerStatusResponse {
            status: Some(ContainerStatus {
                id,
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

fn write_archive(dir: &Path, old_log_dir: &Path) {
    let labels = HashMap::from([
        ("io.kubernetes.pod.name".to_string(), "web".to_string()),
        (
            "io.kubernetes.pod.namespace".to_string(),
            "shop".to_string(),
        ),
        ("io.kubernetes.pod.uid".to_string(), "1111-2222".to_string()),
    ]);
    let container = |name: &str| ContainerEntry {
        name: name.into(),
        id: format!("old-{name}"),
        dir: format!("containers/{name}"),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 1,
            }),
            log_path: format!("{name}/1.log"),
            labels: labels.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let manifest = PodManifest {
        format: POD_FORMAT.into(),
        version: POD_FORMAT_VERSION,
        podckpt_version: "0.1.0".into(),
        created_unix_ms: 1_700_000_000_000,
        host: Default::default(),
        sandbox: SandboxEntry {
            id: "old-sandbox".into(),
            config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "web".into(),
                    namespace: "shop".into(),
                    uid: "1111-2222".into(),
                    attempt: 2,
                }),
                log_directory: old_log_dir.display().to_string(),
                labels: labels.clone(),
                ..Default::default()
            }),
            status: None,
        },
        options: Default::default(),
        containers: vec![container("app"), container("side")],
        devshm: false,
        timings: Default::default(),
        files: vec![],
    };
    let mut w = ArchiveWriter::create(
        &dir.join(POD_ARCHIVE_ZSTD),
        Compression::Zstd {
            level: 1,
            workers: 0,
        },
    )
    .unwrap();
    w.append_bytes(MANIFEST, &serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    w.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pod_derives_config_and_starts_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let pods = tmp.path().join("pods");
    write_archive(&ckpt, &pods.join("shop_web_1111-2222"));

    let socket = tmp.path().join("podckptd.sock");
    let fake = Fake::default();
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_podckpt"))
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("restore-pod")
        // The archive file itself: the daemon is still given the directory.
        .arg(ckpt.join(POD_ARCHIVE_ZSTD))
        .args(["--name", "web-2", "--uid", "abcd-1234", "--start"])
        .args(["--option", "tcp-established=true", "--timeout", "30"])
        .output()
        .await
        .unwrap();
    server.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );

    let req = fake.restore.lock().unwrap().clone().unwrap();
    assert_eq!(req.checkpoint_path, ckpt.display().to_string());
    assert_eq!(req.options["tcp-established"], "true");
    let cfg = req.config.unwrap();
    let meta = cfg.metadata.unwrap();
    assert_eq!(
        (
            meta.name.as_str(),
            meta.namespace.as_str(),
            meta.uid.as_str()
        ),
        ("web-2", "shop", "abcd-1234")
    );
    assert_eq!(meta.attempt, 0);
    let log_dir = pods.join("shop_web-2_abcd-1234");
    assert_eq!(cfg.log_directory, log_dir.display().to_string());
    assert_eq!(cfg.labels["io.kubernetes.pod.uid"], "abcd-1234");
    assert!(log_dir.join("app").is_dir() && log_dir.join("side").is_dir());
    let logs: Vec<_> = req
        .container_configs
        .iter()
        .map(|c| (c.log_path.as_str(), c.metadata.as_ref().unwrap().attempt))
        .collect();
    assert_eq!(logs, [("app/1.log", 0), ("side/1.log", 0)]);

    assert_eq!(*fake.started.lock().unwrap(), ["new-app", "new-side"]);
    for want in [
        "restored pod new-sandbox-42 as shop/web-2 (uid abcd-1234)",
        "  app                  new-app  RUNNING",
        "  side                 new-side  RUNNING",
        "RestorePod ",
        "starting ",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

/// Every method Unimplemented, as podckptd answers RestorePod today.
#[derive(Clone, Default)]
struct Unimplemented;

#[tonic::async_trait]
impl RuntimeService for Unimplemented {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restore_reports_and_leaves_no_log_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let pods = tmp.path().join("pods");
    write_archive(&ckpt, &pods.join("shop_web_1111-2222"));

    let socket = tmp.path().join("podckptd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(Unimplemented))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_podckpt"))
        .arg("--endpoint")
        .arg(&socket)
        .arg("restore-pod")
        .arg(&ckpt)
        .output()
        .await
        .unwrap();
    server.abort();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("RestorePod of"), "{stderr}");
    assert!(
        stderr.contains("Unimplemented") || stderr.contains("not implemented"),
        "{stderr}"
    );
    assert!(!pods.exists(), "log directories left behind");
}
