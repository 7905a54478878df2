//! The main job, end to end on the local test node: a pod runs through
//! podckptd, is checkpointed (CheckpointPod), removed, restored as a new pod
//! (RestorePod + StartContainer) and continues counting where it stopped.
//! Run by `scripts/demo.sh` (which brings the node up).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;

fn testbed() -> Result<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string("/run/podckpt-testbed/testbed.env")
        .context("no test bed: run `sudo scripts/testbed.sh up` (scripts/demo.sh does)")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

#[tokio::main]
async fn main() -> Result<()> {
    let tb = testbed()?;
    let endpoint = &tb["PODCKPT_ENDPOINT"];
    let mut cri = CriClient::new(endpoint.clone());
    let v = cri
        .runtime
        .version(VersionRequest::default())
        .await
        .context("podckptd")?
        .into_inner();
    println!(
        "podckptd at {endpoint} fronts {} {}",
        v.runtime_name, v.runtime_version
    );

    let log_dir = tempfile::tempdir()?;
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "demo".into(),
            uid: format!("demo-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "demo".into(),
        log_directory: log_dir.path().display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    let pod = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let result = run(
        &mut cri,
        &pod,
        &pod_config,
        &tb["APP_IMAGE"],
        log_dir.path(),
    )
    .await;
    let _ = cri
        .runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let _ = cri
        .runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    println!("pod {pod} removed");
    result
}

async fn run(
    cri: &mut CriClient,
    pod: &str,
    pod_config: &PodSandboxConfig,
    image: &str,
    log_dir: &std::path::Path,
) -> Result<()> {
    let status = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no status")?;
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    println!("pod {pod} ready, IP {ip}");

    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "counter".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: [
            "/bin/sh",
            "-c",
            "i=0; while true; do echo count $i; i=$((i+1)); sleep 1; done",
        ]
        .map(String::from)
        .to_vec(),
        log_path: "counter.log".into(),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    };
    let id = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await?;
    println!("container counter {id} started");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::read_to_string(log_dir.join("counter.log"))?;
    let last = log.lines().last().unwrap_or_default();
    println!("counter log, last line: {last}");
    if !last.contains("count") {
        bail!("the counter did not log");
    }

    let before: u64 = last
        .split(' ')
        .next_back()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let ckpt_dir = tempfile::tempdir()?;
    let started = std::time::Instant::now();
    cri.runtime
        .checkpoint_pod(CheckpointPodRequest {
            pod_sandbox_id: pod.into(),
            output_path: ckpt_dir.path().display().to_string(),
            container_ids: vec![id.clone()],
            options: Default::default(),
        })
        .await
        .context("CheckpointPod")?;
    let archive = ckpt_dir.path().join("pod.tar.zst");
    let manifest = podckpt::archive::reader::read_manifest(&archive)?;
    println!(
        "pod checkpointed in {:?} (frozen {} ms) into {} ({} bytes)",
        started.elapsed(),
        manifest.timings.frozen_window_ms,
        archive.display(),
        std::fs::metadata(&archive)?.len()
    );

    // The original goes away; the checkpoint brings it back as a new pod.
    cri.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    cri.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    println!("original pod {pod} removed");

    let new_logs = tempfile::tempdir()?;
    let mut new_config = pod_config.clone();
    if let Some(m) = new_config.metadata.as_mut() {
        m.name = "demo-restored".into();
        m.uid = format!("{}-restored", m.uid);
    }
    new_config.log_directory = new_logs.path().display().to_string();
    let started = std::time::Instant::now();
    let restored = cri
        .runtime
        .restore_pod(RestorePodRequest {
            checkpoint_path: ckpt_dir.path().display().to_string(),
            config: Some(new_config),
            runtime_handler: String::new(),
            options: Default::default(),
            container_configs: manifest
                .containers
                .iter()
                .filter_map(|c| c.config.clone())
                .collect(),
        })
        .await
        .context("RestorePod")?
        .into_inner();
    println!(
        "RestorePod: new pod {} in {:?}",
        restored.pod_sandbox_id,
        started.elapsed()
    );
    let result = async {
        for c in &restored.restored_containers {
            cri.runtime
                .start_container(StartContainerRequest { container_id: c.container_id.clone() })
                .await
                .with_context(|| format!("StartContainer {}", c.name))?;
            println!("container {} {} restored and running", c.name, c.container_id);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let log = std::fs::read_to_string(new_logs.path().join("counter.log"))?;
        let first = log.lines().next().unwrap_or_default();
        println!("restored counter log, first line: {first}");
        let after: u64 = first.split(' ').next_back().and_then(|n| n.parse().ok()).unwrap_or(0);
        if after <= before {
            bail!("the restored counter did not continue from the checkpoint ({after} after {before})");
        }
        println!("the counter continued from where it was checkpointed ({before} -> {after})");
        Ok(())
    }
    .await;
    let _ = cri
        .runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: restored.pod_sandbox_id.clone(),
        })
        .await;
    let _ = cri
        .runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: restored.pod_sandbox_id.clone(),
        })
        .await;
    println!("restored pod {} removed", restored.pod_sandbox_id);
    result
}
