//! podckpt: the operators' command-line client. It talks CRI to podckptd
//! (or to any CRI endpoint) over its unix socket.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use podckpt::cri::api::{ListContainersRequest, ListPodSandboxRequest, VersionRequest};
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
    }
    Ok(())
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
