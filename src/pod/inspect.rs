//! What podckptd learns about a sandbox and its containers before a
//! checkpoint: from the runtime (CRI status, verbose info with pid and OCI
//! spec) and from the node (/proc, cgroups, mount tables).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cri::api::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    ImageSpec, KeyValue, Mount as CriMount, PodSandboxConfig, PodSandboxState, PodSandboxStatus,
    PodSandboxStatusRequest,
};
use crate::cri::client::CriClient;
use crate::node::cgroup::Freezer;
use crate::node::{mountinfo, proc};

use super::criu_opts::DumpPlan;
use super::error::PodError;
use super::seen::SeenConfigs;
use super::spec::Spec;
use crate::archive::manifest::ConfigSource;

/// A sandbox as the runtime reports it.
#[derive(Clone, Debug)]
pub struct SandboxFacts {
    /// Its id.
    pub id: String,
    /// CRI status.
    pub status: PodSandboxStatus,
    /// The config the runtime recorded (containerd's verbose info has it).
    pub config: Option<PodSandboxConfig>,
}

/// A container as the runtime reports it.
#[derive(Clone, Debug)]
pub struct ContainerFacts {
    /// Its id.
    pub id: String,
    /// metadata.name.
    pub name: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// Init pid on the host.
    pub pid: i32,
    /// CRI status.
    pub status: ContainerStatus,
    /// The OCI spec, typed where needed.
    pub spec: Spec,
    /// The OCI spec as the runtime gave it (written as spec.dump).
    pub spec_json: Value,
    /// The runtime's CRI config of the container, or one reconstructed
    /// from its status and spec.
    pub config: ContainerConfig,
    /// Where `config` came from.
    pub config_source: ConfigSource,
    /// The runtime type the runtime reported (e.g. io.containerd.runc.v2).
    pub runtime_type: String,
}

fn runtime_err(op: &'static str) -> impl FnOnce(tonic::Status) -> PodError {
    move |status| match status.code() {
        tonic::Code::NotFound => PodError::NotFound(format!("{op}: {}", status.message())),
        _ => PodError::runtime(op, status),
    }
}

/// The `info` JSON of a verbose status.
fn verbose_info(info: &HashMap<String, String>) -> Value {
    info.get("info")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null)
}

/// Fetches and checks the sandbox. Its config comes from the runtime's
/// verbose status (containerd), else from the RunPodSandbox request seen on
/// its way (CRI-O keeps none).
pub async fn sandbox(
    cri: &mut CriClient,
    id: &str,
    seen: &SeenConfigs,
) -> Result<SandboxFacts, PodError> {
    if id.is_empty() {
        return Err(PodError::InvalidArgument("pod_sandbox_id is empty".into()));
    }
    let resp = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .map_err(runtime_err("PodSandboxStatus"))?
        .into_inner();
    let status = resp.status.ok_or_else(|| {
        PodError::Internal(format!("runtime returned no status for sandbox {id}"))
    })?;
    if status.state != PodSandboxState::SandboxReady as i32 {
        return Err(PodError::FailedPrecondition(format!(
            "pod sandbox {id} is not ready"
        )));
    }
    let info = verbose_info(&resp.info);
    let mut config: Option<PodSandboxConfig> = info
        .get("config")
        .and_then(|c| serde_json::from_value(c.clone()).ok());
    if config.is_none() {
        if let Some(meta) = status.metadata.clone() {
            let seen = seen.clone();
            config = tokio::task::spawn_blocking(move || seen.sandbox(&meta))
                .await
                .ok()
                .flatten();
        }
    }
    Ok(SandboxFacts {
        id: status.id.clone(),
        status,
        config,
    })
}

/// Fetches a container's facts and checks it can be checkpointed as part
/// of `sandbox_id`. Its config comes from the runtime's verbose status
/// (containerd), else from the CreateContainer request seen on its way,
/// else it is pieced together from its status and OCI spec.
pub async fn container(
    cri: &mut CriClient,
    id: &str,
    sandbox_id: Option<&str>,
    seen: &SeenConfigs,
) -> Result<ContainerFacts, PodError> {
    let resp = cri
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .map_err(runtime_err("ContainerStatus"))?
        .into_inner();
    let status = resp.status.ok_or_else(|| {
        PodError::Internal(format!("runtime returned no status for container {id}"))
    })?;
    let info = verbose_info(&resp.info);
    let owner = info
        .get("sandboxID")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(want) = sandbox_id {
        if owner != want {
            return Err(PodError::InvalidArgument(format!(
                "container {id} belongs to pod sandbox {owner:?}, not to {want}"
            )));
        }
    }
    if status.state != ContainerState::ContainerRunning as i32 {
        let state = ContainerState::try_from(status.state)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        return Err(PodError::FailedPrecondition(format!(
            "container {id} is not running (state {state})"
        )));
    }
    let pid = info.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32;
    if pid <= 0 {
        return Err(PodError::FailedPrecondition(format!(
            "the runtime reports no process for container {id} (verbose status lacks its pid)"
        )));
    }
    let spec_json = info.get("runtimeSpec").cloned().unwrap_or(Value::Null);
    if spec_json.is_null() {
        return Err(PodError::FailedPrecondition(format!(
            "the runtime's verbose status of container {id} lacks its OCI spec (runtimeSpec)"
        )));
    }
    let spec: Spec = serde_json::from_value(spec_json.clone())
        .map_err(|e| PodError::Internal(format!("container {id}: unreadable OCI spec: {e}")))?;
    let name = status
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let from_runtime = info
        .get("config")
        .and_then(|c| serde_json::from_value::<ContainerConfig>(c.clone()).ok());
    let (config, config_source) = match from_runtime {
        Some(c) => (c, ConfigSource::Runtime),
        None => {
            let noted = match status.metadata.clone() {
                Some(meta) => {
                    let (seen, owner) = (seen.clone(), owner.clone());
                    tokio::task::spawn_blocking(move || seen.container(&owner, &meta))
                        .await
                        .ok()
                        .flatten()
                }
                None => None,
            };
            match noted {
                Some(c) => (c, ConfigSource::Seen),
                None => (
                    reconstruct_config(&status, &spec),
                    ConfigSource::Reconstructed,
                ),
            }
        }
    };
    let runtime_type = info
        .get("runtimeType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(ContainerFacts {
        id: status.id.clone(),
        name,
        sandbox_id: owner,
        pid,
        status,
        spec,
        spec_json,
        config,
        config_source,
        runtime_type,
    })
}

/// A ContainerConfig from what every runtime reports (for runtimes whose
/// verbose info does not carry the original).
fn reconstruct_config(status: &ContainerStatus, spec: &Spec) -> ContainerConfig {
    let process = spec.process.clone().unwrap_or_default();
    ContainerConfig {
        metadata: status
            .metadata
            .clone()
            .or(Some(ContainerMetadata::default())),
        image: status.image.clone().or(Some(ImageSpec::default())),
        command: process.args,
        envs: spec_envs(&process.env),
        working_dir: process.cwd,
        labels: status.labels.clone(),
        annotations: status.annotations.clone(),
        log_path: kubelet_log_path(&status.log_path),
        mounts: status
            .mounts
            .iter()
            .map(|m| CriMount { ..m.clone() })
            .collect(),
        tty: process.terminal,
        ..Default::default()
    }
}

/// The env a CreateContainer would have been sent with, from the OCI
/// spec's: without what the runtime adds (HOSTNAME is the old pod's name),
/// and each name once (the runtime appends the image's PATH to the
/// caller's; the last value is the one the process saw).
fn spec_envs(env: &[String]) -> Vec<KeyValue> {
    let mut out: Vec<KeyValue> = Vec::new();
    for (k, v) in env.iter().filter_map(|e| e.split_once('=')) {
        if k == "HOSTNAME" {
            continue;
        }
        out.retain(|e| e.key != k);
        out.push(KeyValue {
            key: k.into(),
            value: v.into(),
        });
    }
    out
}

/// A container log path relative to its pod's log directory, as the
/// kubelet sends it: `<container>/<restart count>.log`. The status has it
/// absolute; the pod's directory is its parent's parent in the kubelet's
/// scheme, else only the file name is kept.
fn kubelet_log_path(path: &str) -> String {
    let p = Path::new(path);
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
    let dir = p
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned());
    match (dir, name) {
        (Some(dir), Some(name)) if name.ends_with(".log") && !dir.is_empty() => {
            // `<pod dir>/<container>/<n>.log`: the pod dir is named
            // `<namespace>_<name>_<uid>`; a bare file in the pod dir (the
            // old scheme, crictl's) has no such subdirectory.
            let pod_dir = p.parent().and_then(Path::parent).and_then(Path::file_name);
            if pod_dir.is_some_and(|d| d.to_string_lossy().matches('_').count() >= 2) {
                format!("{dir}/{name}")
            } else {
                name
            }
        }
        (_, Some(name)) => name,
        _ => String::new(),
    }
}

/// The node-side facts of a running container: everything its dump needs.
/// Blocking (reads /proc).
pub fn dump_plan(c: &ContainerFacts) -> Result<(DumpPlan, Option<PathBuf>), PodError> {
    let pid = c.pid;
    if !proc::alive(pid) {
        return Err(PodError::FailedPrecondition(format!(
            "container {} (pid {pid}) is not running on this node",
            c.name
        )));
    }
    let freezer = Freezer::for_pid(pid).map_err(|source| PodError::Freezer {
        container: c.name.clone(),
        source,
    })?;
    let mounts = mountinfo::for_pid(pid).map_err(PodError::io(
        "read mountinfo of",
        format!("/proc/{pid}/mountinfo"),
    ))?;
    let upperdir = mountinfo::overlay_upperdir(&mounts);
    let root = host_rootfs(c, upperdir.as_deref())?;
    let ns = |kind: &str| -> Result<Option<u64>, PodError> {
        match c.spec.joined_namespace(kind) {
            Some(path) => proc::ns_inode(Path::new(path))
                .map(Some)
                .map_err(PodError::io("stat namespace", path)),
            None => Ok(None),
        }
    };
    let masked_files = c
        .spec
        .linux
        .iter()
        .flat_map(|l| l.masked_paths.iter())
        .filter(|p| {
            std::fs::metadata(proc::root_of(pid).join(p.trim_start_matches('/')))
                .is_ok_and(|m| !m.is_dir())
        })
        .cloned()
        .collect();
    let plan = DumpPlan {
        pid,
        root,
        freezer,
        spec: c.spec.clone(),
        mounts,
        netns_inode: ns("network")?,
        pidns_inode: ns("pid")?,
        masked_files,
    };
    Ok((plan, upperdir))
}

/// The container's rootfs as a host path. containerd's spec names it
/// relative to the bundle ("rootfs"); rather than guess the bundle, find
/// the host mount of the same overlay (same upperdir).
fn host_rootfs(c: &ContainerFacts, upperdir: Option<&Path>) -> Result<PathBuf, PodError> {
    let spec_root = c
        .spec
        .root
        .as_ref()
        .map(|r| r.path.as_str())
        .unwrap_or_default();
    if Path::new(spec_root).is_absolute() {
        return Ok(PathBuf::from(spec_root));
    }
    let host = mountinfo::for_pid(std::process::id() as i32)
        .map_err(PodError::io("read", "/proc/self/mountinfo"))?;
    if let Some(upper) = upperdir {
        if let Some(m) = host.iter().rev().find(|m| {
            m.fstype == "overlay"
                && m.super_option("upperdir")
                    .map(|u| u.replace("\\,", ","))
                    .as_deref()
                    == Some(&upper.to_string_lossy())
        }) {
            return Ok(PathBuf::from(&m.mount_point));
        }
    }
    // Not an overlay (e.g. a native snapshotter): the mount ending in the
    // container's id and the spec's relative root.
    let suffix = format!("/{}/{}", c.id, spec_root);
    host.iter()
        .rev()
        .find(|m| m.mount_point.ends_with(&suffix))
        .map(|m| PathBuf::from(&m.mount_point))
        .ok_or_else(|| {
            PodError::FailedPrecondition(format!(
                "cannot find the host path of container {}'s rootfs",
                c.name
            ))
        })
}

/// The sandbox's /dev/shm as mounted into the container, if it is a bind
/// mount from the host (the pod-shared shm).
pub fn devshm_source(c: &ContainerFacts) -> Option<PathBuf> {
    c.spec
        .mounts
        .iter()
        .find(|m| m.destination == "/dev/shm" && m.is_bind() && Path::new(&m.source).is_absolute())
        .map(|m| PathBuf::from(&m.source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_env_drops_the_runtimes_additions() {
        let env: Vec<String> = [
            "PATH=/usr/bin",
            "HOSTNAME=old-pod",
            "MODE=fast",
            "PATH=/usr/local/bin:/usr/bin",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got: Vec<(String, String)> = spec_envs(&env)
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("MODE".to_string(), "fast".to_string()),
                ("PATH".to_string(), "/usr/local/bin:/usr/bin".to_string()),
            ]
        );
    }

    #[test]
    fn log_paths_keep_the_kubelets_container_directory() {
        assert_eq!(
            kubelet_log_path("/var/log/pods/default_web_0a-1b/counter/0.log"),
            "counter/0.log"
        );
        assert_eq!(kubelet_log_path("/tmp/logs/counter.log"), "counter.log");
        assert_eq!(kubelet_log_path(""), "");
    }
}
