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
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
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
            })
        });
    }
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
        let _ = client
            .runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            })
            .await;
        let _ = client
            .runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: p.id,
            })
            .await;
    }
}
