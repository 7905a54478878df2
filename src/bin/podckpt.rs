//! podckpt: the operators' command-line client. It talks CRI to podckptd
//! (or to any CRI endpoint) over its unix socket.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use podckpt::cli::human_bytes;
use podckpt::cli::restore::{self, container_state_name, Fresh, Overrides};
use podckpt::cri::api::{
    CheckpointContainerRequest, CheckpointPodRequest, ContainerFilter, ContainerState,
    ContainerStateValue, ListContainersRequest, ListPodSandboxRequest, PodSandboxState,
    RestorePodRequest, VersionRequest,
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
        /// Output directory: empty, or missing (then created, mode 0700).
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Only these containers (by name or ID); repeatable.
        #[arg(long, short = 'c')]
        container: Vec<String>,
        /// Checkpoint option KEY=VALUE (tcp-established, file-locks,
        /// ext-unix-sk, ghost-limit, network-lock, compression); repeatable.
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// Give up after this many seconds (the checkpoint is undone). Sent
        /// as the call's deadline, which CheckpointPod requires.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
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
    /// Restore a pod checkpoint as a new pod (new name, uid and log
    /// directory) beside the old one; its containers are left CREATED
    /// unless --start is given.
    RestorePod {
        /// The directory CheckpointPod wrote, or the pod archive in it.
        path: PathBuf,
        /// Name of the new pod [default: <old name>-restored-<random>].
        #[arg(long)]
        name: Option<String>,
        /// Namespace of the new pod [default: the old pod's].
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Uid of the new pod [default: a random UUID].
        #[arg(long)]
        uid: Option<String>,
        /// Start the restored containers and wait until each is running.
        #[arg(long)]
        start: bool,
        /// Give up on RestorePod after this many seconds (sent as the
        /// call's deadline, which RestorePod requires); with --start, also
        /// the limit for each container to reach RUNNING.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Restore option KEY=VALUE, passed to RestorePod; repeatable.
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
    },
    /// Check podckptd, the runtime behind it and CRIU, in that order. Exit
    /// code 0: all healthy; 3: podckptd does not answer; 4: the runtime
    /// does not; 5: CRIU is unusable. The failing part's reason is printed.
    Health {
        /// Give up after this long (e.g. 500ms, 5s).
        #[arg(long, default_value = "5s", value_parser = podckpt::config::parse_duration)]
        timeout: Duration,
    },
    /// Write each container of a pod archive as a container checkpoint
    /// archive (<DIR>/<container>.tar, the layout CheckpointContainer
    /// writes and checkpointctl reads), without podckptd. Reads the pod
    /// archive once, checking it as restore does; on error nothing is
    /// left in DIR.
    Export {
        /// The pod archive, or the directory CheckpointPod wrote.
        path: PathBuf,
        /// Only these containers (by name); repeatable [default: all].
        #[arg(long, short = 'c')]
        container: Vec<String>,
        /// Output directory: created (mode 0700) when missing; existing
        /// archives in it are not overwritten.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Refuse a pod archive whose files hold more than this many bytes.
        #[arg(long, default_value_t = podckpt::archive::extract::DEFAULT_MAX_RESTORE_BYTES)]
        max_restore_bytes: u64,
        /// Refuse a pod archive of more than this many entries.
        #[arg(long, default_value_t = podckpt::archive::extract::DEFAULT_MAX_ARCHIVE_ENTRIES)]
        max_archive_entries: u64,
    },
    /// Describe a pod archive (pod.tar.zst, or the directory holding it) or
    /// a container checkpoint archive, without podckptd.
    Inspect {
        /// The archive, or the directory CheckpointPod wrote.
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // Offline: no socket needed.
    if let Command::Inspect { path, json } = &cli.command {
        return inspect(path, *json);
    }
    if let Command::Export {
        path,
        container,
        output,
        max_restore_bytes,
        max_archive_entries,
    } = cli.command
    {
        let limits = podckpt::archive::extract::Limits {
            max_bytes: max_restore_bytes,
            max_entries: max_archive_entries,
        };
        return export(path, container, output, limits).await;
    }
    let path = socket_path(&cli.endpoint).map_err(anyhow::Error::msg)?;
    if let Command::Health { timeout } = cli.command {
        match podckpt::health::check(&path, timeout).await {
            Ok(h) => {
                println!("podckptd: ok ({})", h.daemon);
                println!("runtime: ok ({})", h.runtime);
                println!("CRIU: ok ({})", h.criu);
                return Ok(());
            }
            Err(err) => {
                eprintln!("unhealthy: {err}");
                std::process::exit(i32::from(err.exit_code()));
            }
        }
    }
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
            let created = podckpt::cli::ensure_output_dir(&output)
                .with_context(|| format!("output directory {}", output.display()))?;
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
            let result = with_progress(&what, client.runtime.checkpoint_pod(req)).await;
            if result.is_err() && created {
                // Nothing left behind: the directory was ours, and the
                // runtime removes its partial files before it answers.
                let _ = std::fs::remove_dir(&output);
            }
            result.with_context(|| format!("CheckpointPod of {pod_id}"))?;
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
        Command::RestorePod {
            path,
            name,
            namespace,
            uid,
            start,
            timeout,
            options,
        } => {
            let overrides = Overrides {
                name,
                namespace,
                uid,
            };
            restore_pod(&mut client, &path, overrides, start, timeout, &options).await?;
        }
        Command::Inspect { .. } | Command::Health { .. } | Command::Export { .. } => {
            unreachable!("handled before")
        }
    }
    Ok(())
}

/// `podckpt export`: the work is podckpt::archive::export's, off the
/// executor; Ctrl-C cancels it (nothing is left in the output directory).
async fn export(
    path: PathBuf,
    containers: Vec<String>,
    output: PathBuf,
    limits: podckpt::archive::extract::Limits,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let created = podckpt::cli::ensure_output_dir(&output)
        .with_context(|| format!("output directory {}", output.display()))?;
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    let started = Instant::now();
    let out = output.clone();
    let result = tokio::task::spawn_blocking(move || {
        podckpt::archive::export::export(&path, &out, &containers, &limits, &|| {
            cancelled.load(Ordering::Relaxed)
        })
    })
    .await
    .context("export worker")?;
    match result {
        Ok(done) => {
            for d in &done {
                println!(
                    "{}\t{}\t{}",
                    d.container,
                    d.path.display(),
                    human_bytes(d.bytes)
                );
            }
            eprintln!(
                "exported {} container(s) in {:.1}s",
                done.len(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(err) => {
            // A directory made for this export goes with it (only if
            // empty: nothing else is ever removed).
            if created {
                let _ = std::fs::remove_dir(&output);
            }
            Err(err.into())
        }
    }
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let path = std::path::absolute(path).context("archive path")?;
    let found = podckpt::archive::inspect::inspect(&path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        print!(
            "{}",
            podckpt::cli::render::render(&found, std::time::SystemTime::now())
        );
    }
    Ok(())
}

async fn restore_pod(
    client: &mut CriClient,
    path: &Path,
    overrides: Overrides,
    start: bool,
    timeout: u64,
    options: &[String],
) -> Result<()> {
    let path = std::path::absolute(path).context("checkpoint path")?;
    let archive = podckpt::archive::reader::locate_pod_archive(&path)
        .with_context(|| format!("{}: no pod.tar.zst or pod.tar there", path.display()))?;
    let manifest = podckpt::archive::reader::read_manifest(&archive)?;
    let options = parse_options(options)?;
    let fresh = Fresh::random().context("reading /dev/urandom")?;
    let plan = restore::plan(&manifest, &overrides, &fresh)?;
    // The kubelet creates these before it creates the containers; the
    // runtime only opens the log files.
    let log_dirs = restore::LogDirs::create(&plan.log_dirs)?;
    let meta = plan.sandbox.metadata.clone().unwrap_or_default();
    let mut req = tonic::Request::new(RestorePodRequest {
        checkpoint_path: restore::checkpoint_path(&path).display().to_string(),
        config: Some(plan.sandbox.clone()),
        runtime_handler: plan.runtime_handler.clone(),
        options,
        container_configs: plan.containers.clone(),
    });
    req.set_timeout(Duration::from_secs(timeout));
    let started = Instant::now();
    let what = format!(
        "restoring pod {}/{} ({} containers)",
        meta.namespace,
        meta.name,
        plan.containers.len()
    );
    let resp = with_progress(&what, client.runtime.restore_pod(req))
        .await
        .with_context(|| format!("RestorePod of {}", archive.display()))?
        .into_inner();
    let restore_time = started.elapsed();
    log_dirs.keep();

    // Manifest order: the order the operator checkpointed them in, which
    // is also the pod spec's.
    let mut restored = Vec::with_capacity(manifest.containers.len());
    for c in &manifest.containers {
        let id = resp
            .restored_containers
            .iter()
            .find(|r| r.name == c.name)
            .map(|r| r.container_id.clone())
            .with_context(|| {
                format!(
                    "RestorePod created pod {} but returned no container {:?}",
                    resp.pod_sandbox_id, c.name
                )
            })?;
        restored.push((c.name.clone(), id));
    }

    let mut start_time = None;
    if start {
        let limit = Duration::from_secs(timeout);
        let started = Instant::now();
        for (name, id) in &restored {
            with_progress(
                &format!("starting {name} ({})", short(id)),
                restore::start_and_wait(client, id, limit),
            )
            .await
            .with_context(|| {
                format!(
                    "pod {} was restored, but container {name} did not start",
                    resp.pod_sandbox_id
                )
            })?;
        }
        start_time = Some(started.elapsed());
    }

    println!(
        "restored pod {} as {}/{} (uid {}) from {}",
        resp.pod_sandbox_id,
        meta.namespace,
        meta.name,
        meta.uid,
        archive.display()
    );
    for (name, id) in &restored {
        if start {
            println!(
                "  {name:<20} {id}  {}",
                container_state_name(ContainerState::ContainerRunning as i32)
            );
        } else {
            println!("  {name:<20} {id}");
        }
    }
    match start_time {
        Some(s) => println!(
            "RestorePod {:.2} s, starting {:.2} s; logs in {}",
            restore_time.as_secs_f64(),
            s.as_secs_f64(),
            plan.sandbox.log_directory
        ),
        None => println!(
            "RestorePod {:.2} s; containers are CREATED (start them, or use --start); logs in {}",
            restore_time.as_secs_f64(),
            plan.sandbox.log_directory
        ),
    }
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
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
