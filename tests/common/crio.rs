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
    crio_container(tb, name, &["/bin/sh", "-c", script])
}

/// A container of the test bed's app image running `command`, as CRI-O
/// here accepts it.
pub fn crio_container(tb: &Testbed, name: &str, command: &[&str]) -> ContainerConfig {
    let mut c = container_config(name, tb.var("APP_IMAGE"), command);
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
    super::runtime::Runtime::Crio
        .run_pod(client, name, log_dir)
        .await
}
