//! CRI building blocks for end-to-end tests: pod and container configs for
//! the test bed's images, and a guard that removes a pod on every path.

use std::collections::HashMap;
use std::path::Path;

use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;

/// Label put on every sandbox a test creates, so leftovers can be found.
pub const TEST_LABEL: &str = "podckpt.test/e2e";

pub fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    let uid = format!("{name}-{}", std::process::id());
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid,
            namespace: "podckpt-e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        // The pod name is the label value: a test cleans up only its own
        // leftovers, never those of a test running beside it.
        labels: HashMap::from([(TEST_LABEL.to_string(), name.to_string())]),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: HashMap::from([(TEST_LABEL.to_string(), "1".to_string())]),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// Removes the sandbox (and so its containers) when dropped, even when the
/// test panics. Needs a multi-threaded runtime.
pub struct PodGuard {
    pub client: CriClient,
    pub id: String,
}

impl Drop for PodGuard {
    fn drop(&mut self) {
        let mut client = self.client.clone();
        let id = self.id.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| handle.block_on(remove_pod(&mut client, id)));
    }
}

/// How many containers ListContainers (unfiltered) returns.
pub async fn container_count(client: &mut CriClient) -> usize {
    client
        .runtime
        .list_containers(ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers
        .len()
}

/// The sandboxes on the node whose metadata name is `name` (found by name:
/// other tests create pods beside the caller's).
pub async fn pods_named(client: &mut CriClient, name: &str) -> Vec<PodSandbox> {
    client
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .filter(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
        .collect()
}

/// CheckpointPod of `containers` into the directory `out`, with the
/// deadline the contract requires; panics on failure. Returns the archive.
pub async fn checkpoint_pod(
    client: &mut CriClient,
    pod: &str,
    containers: Vec<String>,
    out: &Path,
) -> std::path::PathBuf {
    let mut req = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: pod.into(),
        output_path: out.display().to_string(),
        container_ids: containers,
        options: HashMap::new(),
    });
    req.set_timeout(std::time::Duration::from_secs(120));
    client
        .runtime
        .checkpoint_pod(req)
        .await
        .expect("CheckpointPod");
    out.join(podckpt::archive::manifest::POD_ARCHIVE_ZSTD)
}

/// Removes sandboxes named `pod_name` left by earlier, interrupted runs.
pub async fn remove_leftover_pods(client: &mut CriClient, pod_name: &str) {
    let filter = PodSandboxFilter {
        label_selector: HashMap::from([(TEST_LABEL.to_string(), pod_name.to_string())]),
        ..Default::default()
    };
    let Ok(list) = client
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await
    else {
        return;
    };
    for p in list.into_inner().items {
        remove_pod(client, p.id).await;
    }
}

/// Stops and removes a sandbox (and so its containers), ignoring errors:
/// for cleanup paths.
pub async fn remove_pod(client: &mut CriClient, id: String) {
    let _ = client
        .runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await;
    let _ = client
        .runtime
        .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
        .await;
}

/// Creates and starts a container; returns its id.
pub async fn start_container(
    client: &mut CriClient,
    pod_id: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let id = client
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    client
        .runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    id
}

/// Runs a sandbox; the guard removes it on every path.
pub async fn run_pod(
    client: &mut CriClient,
    name: &str,
    log_dir: &Path,
) -> (PodGuard, String, PodSandboxConfig) {
    remove_leftover_pods(client, name).await;
    let config = pod_config(name, log_dir);
    let id = client
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    (
        PodGuard {
            client: client.clone(),
            id: id.clone(),
        },
        id,
        config,
    )
}

/// The host pid of a running container (from the verbose status).
pub async fn container_pid(client: &mut CriClient, id: &str) -> i32 {
    let resp = client
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&resp.info["info"]).unwrap();
    info["pid"].as_i64().unwrap() as i32
}

pub async fn container_state(client: &mut CriClient, id: &str) -> i32 {
    client
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .state
}

/// Runs `cmd` in a container; its stdout, trimmed (a failure panics).
pub async fn exec(client: &mut CriClient, id: &str, cmd: &[&str]) -> String {
    let r = client
        .runtime
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).trim().to_owned()
}
