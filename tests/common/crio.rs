//! Pod and container configs for the test bed's CRI-O.

use std::path::Path;

use podckpt::cri::api::*;

use super::cri::{container_config, pod_config};
use super::testbed::Testbed;

/// CRI-O on this machine kind runs pods without an infra container only
/// when they ask for a per-container pid namespace (the kubelet's default):
/// its infra container cannot set its oom_score_adj here.
pub fn crio_namespaces() -> Option<NamespaceOption> {
    Some(NamespaceOption {
        pid: NamespaceMode::Container as i32,
        ..Default::default()
    })
}

pub fn crio_pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    let mut c = pod_config(name, log_dir);
    c.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: crio_namespaces(),
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

pub fn crio_container_config(tb: &Testbed, name: &str, script: &str) -> ContainerConfig {
    let mut c = container_config(name, tb.var("APP_IMAGE"), &["/bin/sh", "-c", script]);
    // CRI-O verifies signatures (its signature_policy is set on the test
    // bed) against the reference the user gave.
    if let Some(i) = c.image.as_mut() {
        i.user_specified_image = i.image.clone();
    }
    c.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            namespace_options: crio_namespaces(),
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// Runs a sandbox on CRI-O with [`crio_pod_config`]; the guard removes it
/// on every path.
pub async fn run_crio_pod(
    client: &mut podckpt::cri::client::CriClient,
    name: &str,
    log_dir: &Path,
) -> (super::cri::PodGuard, String, PodSandboxConfig) {
    super::cri::remove_leftover_pods(client, name).await;
    let config = crio_pod_config(name, log_dir);
    let id = client
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox on CRI-O")
        .into_inner()
        .pod_sandbox_id;
    let guard = super::cri::PodGuard {
        client: client.clone(),
        id: id.clone(),
    };
    (guard, id, config)
}
