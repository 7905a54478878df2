//! The test bed's three runtimes (containerd 2.1, containerd 1.6, CRI-O),
//! so one end-to-end test body runs on each: the endpoint podckptd fronts,
//! and the pod and container configs that runtime accepts.

use std::path::{Path, PathBuf};

use podckpt::cri::api::{ContainerConfig, PodSandboxConfig, RunPodSandboxRequest};
use podckpt::cri::client::CriClient;

use super::cri::{container_config, pod_config, remove_leftover_pods, PodGuard};
use super::crio::{crio_container, crio_pod_config};
use super::testbed::Testbed;
use super::Daemon;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd2,
    Containerd1,
    Crio,
}

impl Runtime {
    /// Short name, for test and pod names (`ckpt-cut-crio`).
    pub fn key(self) -> &'static str {
        match self {
            Runtime::Containerd2 => "containerd2",
            Runtime::Containerd1 => "containerd1",
            Runtime::Crio => "crio",
        }
    }

    /// The runtime's socket, from the test bed's environment file.
    pub fn endpoint(self, tb: &Testbed) -> PathBuf {
        tb.path(match self {
            Runtime::Containerd2 => "CONTAINERD2_ENDPOINT",
            Runtime::Containerd1 => "CONTAINERD1_ENDPOINT",
            Runtime::Crio => "CRIO_ENDPOINT",
        })
    }

    /// What the runtime calls itself in CRI `Version` (and so in a
    /// checkpoint's manifest).
    pub fn runtime_name(self) -> &'static str {
        match self {
            Runtime::Containerd2 | Runtime::Containerd1 => "containerd",
            Runtime::Crio => "cri-o",
        }
    }

    /// A sandbox config this runtime runs on the test bed.
    pub fn pod_config(self, name: &str, log_dir: &Path) -> PodSandboxConfig {
        match self {
            Runtime::Crio => crio_pod_config(name, log_dir),
            _ => pod_config(name, log_dir),
        }
    }

    /// A container config of the test bed's app image running `command`.
    pub fn container_config(self, tb: &Testbed, name: &str, command: &[&str]) -> ContainerConfig {
        match self {
            Runtime::Crio => crio_container(tb, name, command),
            _ => container_config(name, tb.var("APP_IMAGE"), command),
        }
    }

    /// Runs a sandbox with [`Runtime::pod_config`]; the guard removes it on
    /// every path.
    pub async fn run_pod(
        self,
        client: &mut CriClient,
        name: &str,
        log_dir: &Path,
    ) -> (PodGuard, String, PodSandboxConfig) {
        remove_leftover_pods(client, name).await;
        let config = self.pod_config(name, log_dir);
        let id = client
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox on {}: {e:?}", self.key()))
            .into_inner()
            .pod_sandbox_id;
        let guard = PodGuard {
            client: client.clone(),
            id: id.clone(),
        };
        (guard, id, config)
    }

    /// The test bed and a podckptd (with the test bed's CRIU) in front of
    /// this runtime, or None when the test skips.
    pub async fn setup(self, test: &str) -> Option<(Testbed, Daemon, CriClient)> {
        let tb = Testbed::get(&format!("{test}_{}", self.key()))?;
        let d = Daemon::start(&self.endpoint(&tb), &["--criu", tb.var("CRIU")]).await;
        let client = d.client();
        Some((tb, d, client))
    }
}
