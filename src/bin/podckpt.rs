//! podckpt: the operators' command-line client. It talks CRI to podckptd
//! (or to any CRI endpoint) over its unix socket.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use podckpt::cri::api::{
    CheckpointContainerRequest, CheckpointPodRequest, ContainerFilter, ContainerState,
    ContainerStateValue, ListContainersRequest, ListPodSandboxRequest, PodSandboxState,
    VersionRequest,
};
use podckpt::cri::client::{socket_path, CriClient};

/// podckpt: checkpoint and restore Kubernetes pods through podckptd.
#[derive(Debug, Parser)]
#[command(name = "podckpt", version, about)]
struct Cli {
    /// podckptd's socket (unix:///path or /path).
    #[arg(long, global = true, env = "PODCKPT_ENDPOINT", default_value = podckpt::config::DEFAULT_LISTEN)]
    endpoint: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the runtime name and version as seen through podckptd.
    Version,
    /// List pod sandboxes: ID, state, namespace/name.
    Pods,
    /// List containers: ID, state, pod ID, name, image.
    Containers,
    /// Checkpoint a pod (every running container, or those named with
    /// --container) into one archive in an empty directory.
    CheckpointPod {
        /// Pod sandbox ID (or a unique prefix of it), or the pod's name.
        pod: String,
        /// Namespace of the pod, when it is given by name.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Output directory: must exist and be empty.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Only these containers (by name or ID); repeatable.
        #[arg(long, short = 'c')]
        container: Vec<String>,
        /// Checkpoint option KEY=VALUE (tcp-established, file-locks,
        /// ext-unix-sk, ghost-limit, network-lock, compression); repeatable.
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// Give up after this many seconds (the checkpoint is undone).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Checkpoint one container into a container checkpoint archive
    /// (`.tar`, or zstd-compressed `.tar.zst`), as `crictl checkpoint` does.
    Checkpoint {
        /// Container ID (or a unique prefix of it).
        container: String,
        /// The archive to write.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let path = socket_path(&cli.endpoint).map_err(anyhow::Error::msg)?;
    let mut client = CriClient::new(path.clone());
    let ctx = || format!("calling podckptd at {}", path.display());
    match cli.command {
        Command::Version => {
            let v = client
                .runtime
                .version(VersionRequest::default())
                .await
                .with_context(ctx)?
                .into_inner();
            println!(
                "runtime: {} {} (CRI {})",
                v.runtime_name, v.runtime_version, v.runtime_api_version
            );
            println!("podckpt: {}", env!("CARGO_PKG_VERSION"));
        }
        Command::Pods => {
            let pods = client
                .runtime
                .list_pod_sandbox(ListPodSandboxRequest::default())
                .await
                .with_context(ctx)?
                .into_inner();
            for p in pods.items {
                let meta = p.metadata.unwrap_or_default();
                println!(
                    "{}\t{}\t{}/{}",
                    p.id,
                    state_name(p.state),
                    meta.namespace,
                    meta.name
                );
            }
        }
        Command::Containers => {
            let list = client
                .runtime
                .list_containers(ListContainersRequest::default())
                .await
                .with_context(ctx)?
                .into_inner();
            for c in list.containers {
                let name = c.metadata.map(|m| m.name).unwrap_or_default();
                let image = c.image.map(|i| i.image).unwrap_or_default();
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    c.id,
                    container_state_name(c.state),
                    c.pod_sandbox_id,
                    name,
                    image
                );
            }
        }
        Command::CheckpointPod {
            pod,
            namespace,
            output,
            container,
            options,
            timeout,
        } => {
            let pod_id = resolve_pod(&mut client, &pod, &namespace).await?;
            let ids = select_containers(&mut client, &pod_id, &container).await?;
            let options = parse_options(&options)?;
            let output = std::path::absolute(&output).context("output path")?;
            let mut req = tonic::Request::new(CheckpointPodRequest {
                pod_sandbox_id: pod_id.clone(),
                output_path: output.display().to_string(),
                container_ids: ids.clone(),
                options,
            });
            req.set_timeout(Duration::from_secs(timeout));
            let started = Instant::now();
            let what = format!(
                "checkpointing pod {} ({} containers)",
                short(&pod_id),
                ids.len()
            );
            with_progress(&what, client.runtime.checkpoint_pod(req))
                .await
                .with_context(|| format!("CheckpointPod of {pod_id}"))?;
            let archive = podckpt::archive::reader::locate_pod_archive(&output)
                .context("no archive was written")?;
            let manifest = podckpt::archive::reader::read_manifest(&archive)?;
            let size = std::fs::metadata(&archive)?.len();
            println!("checkpointed pod {pod_id} into {}", archive.display());
            for c in &manifest.containers {
                println!(
                    "  {:<20} {:>10} images, dump {} ms",
                    c.name,
                    human_bytes(c.images_bytes),
                    (c.dump_finished_ns.saturating_sub(c.dump_started_ns)) / 1_000_000
                );
            }
            println!(
                "frozen window {} ms, total {:.2} s, archive {} (CRIU {}, {} {})",
                manifest.timings.frozen_window_ms,
                started.elapsed().as_secs_f64(),
                human_bytes(size),
                manifest.host.criu_version,
                manifest.host.runtime_name,
                manifest.host.runtime_version
            );
        }
        Command::Checkpoint {
            container,
            output,
            timeout,
        } => {
            let id = resolve_container(&mut client, &container).await?;
            let output = std::path::absolute(&output).context("output path")?;
            let started = Instant::now();
            let req = CheckpointContainerRequest {
                container_id: id.clone(),
                location: output.display().to_string(),
                timeout: timeout as i64,
            };
            let mut req = tonic::Request::new(req);
            req.set_timeout(Duration::from_secs(timeout));
            with_progress(
                &format!("checkpointing container {}", short(&id)),
                client.runtime.checkpoint_container(req),
            )
            .await
            .with_context(|| format!("CheckpointContainer of {id}"))?;
            let size = std::fs::metadata(&output)?.len();
            println!(
                "checkpointed container {id} into {} ({}, {:.2} s)",
                output.display(),
                human_bytes(size),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Awaits `fut`, showing elapsed time on a terminal.
async fn with_progress<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            out = &mut fut => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return out;
            }
            _ = tick.tick() => {
                if tty {
                    eprint!("\r{what} … {:.1} s", started.elapsed().as_secs_f64());
                    let _ = std::io::stderr().flush();
                }
            }
        }
    }
}

fn parse_options(pairs: &[String]) -> Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--option {p:?}: expected KEY=VALUE"))
        })
        .collect()
}

async fn resolve_pod(client: &mut CriClient, pod: &str, namespace: &str) -> Result<String> {
    let pods = client
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    let ready: Vec<_> = pods
        .into_iter()
        .filter(|p| p.state == PodSandboxState::SandboxReady as i32)
        .collect();
    let by_id: Vec<_> = ready.iter().filter(|p| p.id.starts_with(pod)).collect();
    if by_id.len() == 1 {
        return Ok(by_id[0].id.clone());
    }
    let by_name: Vec<_> = ready
        .iter()
        .filter(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.name == pod && m.namespace == namespace)
        })
        .collect();
    match (by_id.len(), by_name.len()) {
        (_, 1) => Ok(by_name[0].id.clone()),
        (0, 0) => bail!("no ready pod has ID {pod} or name {namespace}/{pod}"),
        _ => bail!("{pod:?} matches several pods; give more of the ID"),
    }
}

async fn resolve_container(client: &mut CriClient, container: &str) -> Result<String> {
    let all = client
        .runtime
        .list_containers(ListContainersRequest::default())
        .await?
        .into_inner()
        .containers;
    let matches: Vec<_> = all.iter().filter(|c| c.id.starts_with(container)).collect();
    match matches.len() {
        1 => Ok(matches[0].id.clone()),
        0 => bail!("no container has ID {container}"),
        _ => bail!("{container:?} matches several containers; give more of the ID"),
    }
}

async fn select_containers(
    client: &mut CriClient,
    pod_id: &str,
    wanted: &[String],
) -> Result<Vec<String>> {
    let filter = ContainerFilter {
        pod_sandbox_id: pod_id.into(),
        state: Some(ContainerStateValue {
            state: ContainerState::ContainerRunning as i32,
        }),
        ..Default::default()
    };
    let running = client
        .runtime
        .list_containers(ListContainersRequest {
            filter: Some(filter),
        })
        .await?
        .into_inner()
        .containers;
    if wanted.is_empty() {
        if running.is_empty() {
            bail!("pod {pod_id} has no running container");
        }
        return Ok(running.into_iter().map(|c| c.id).collect());
    }
    wanted
        .iter()
        .map(|w| {
            running
                .iter()
                .find(|c| {
                    c.id.starts_with(w.as_str())
                        || c.metadata.as_ref().is_some_and(|m| &m.name == w)
                })
                .map(|c| c.id.clone())
                .with_context(|| format!("pod {pod_id} has no running container {w:?}"))
        })
        .collect()
}

fn state_name(state: i32) -> &'static str {
    use podckpt::cri::api::PodSandboxState;
    match PodSandboxState::try_from(state) {
        Ok(PodSandboxState::SandboxReady) => "READY",
        Ok(PodSandboxState::SandboxNotready) => "NOTREADY",
        Err(_) => "UNKNOWN",
    }
}

fn container_state_name(state: i32) -> &'static str {
    use podckpt::cri::api::ContainerState;
    match ContainerState::try_from(state) {
        Ok(ContainerState::ContainerCreated) => "CREATED",
        Ok(ContainerState::ContainerRunning) => "RUNNING",
        Ok(ContainerState::ContainerExited) => "EXITED",
        Ok(ContainerState::ContainerUnknown) | Err(_) => "UNKNOWN",
    }
}
