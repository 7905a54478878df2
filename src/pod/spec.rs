//! The parts of an OCI runtime spec (config.json) that checkpoint and
//! restore need, read leniently: unknown fields are ignored, the full spec
//! is kept as JSON alongside.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// An OCI runtime spec, partially typed.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Spec {
    /// The root filesystem.
    pub root: Option<Root>,
    /// Mounts, in order.
    pub mounts: Vec<Mount>,
    /// The container process.
    pub process: Option<Process>,
    /// Linux specifics.
    pub linux: Option<Linux>,
    /// Annotations (container name, sandbox name and namespace, ...).
    pub annotations: HashMap<String, String>,
}

/// `root`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Root {
    /// Path of the rootfs; absolute, or relative to the bundle.
    pub path: String,
    /// Read-only rootfs.
    pub readonly: bool,
}

/// One entry of `mounts`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Mount {
    /// Where in the container.
    pub destination: String,
    /// Filesystem type (`bind`, `tmpfs`, `proc`, `cgroup`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Source on the host (for binds).
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

impl Mount {
    /// Whether runc treats it as a bind mount (type bind, or a bind option).
    pub fn is_bind(&self) -> bool {
        self.kind == "bind" || self.options.iter().any(|o| o == "bind" || o == "rbind")
    }
}

/// `process`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Process {
    /// Whether the container has a terminal.
    pub terminal: bool,
    /// argv.
    pub args: Vec<String>,
    /// Environment, `KEY=value`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
}

/// `linux`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Linux {
    /// Namespaces, created or joined by path.
    pub namespaces: Vec<Namespace>,
    /// Paths masked with /dev/null (files) or an empty tmpfs (dirs).
    #[serde(rename = "maskedPaths")]
    pub masked_paths: Vec<String>,
    /// Device nodes.
    pub devices: Vec<Device>,
    /// The cgroup path.
    #[serde(rename = "cgroupsPath")]
    pub cgroups_path: String,
}

/// One namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Namespace {
    /// `network`, `pid`, `ipc`, `uts`, `mount`, `cgroup`, `user`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A path to join instead of creating one.
    pub path: String,
}

/// One device node.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Device {
    /// Path in the container.
    pub path: String,
}

impl Spec {
    /// The path of the namespace of `kind` the container joins, if any.
    pub fn joined_namespace(&self, kind: &str) -> Option<&str> {
        self.linux
            .as_ref()?
            .namespaces
            .iter()
            .find(|n| n.kind == kind && !n.path.is_empty())
            .map(|n| n.path.as_str())
    }

    /// Whether the container has a namespace of `kind` at all (own or joined).
    pub fn has_namespace(&self, kind: &str) -> bool {
        self.linux
            .as_ref()
            .is_some_and(|l| l.namespaces.iter().any(|n| n.kind == kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_containerd_spec() {
        let json = r#"{
            "ociVersion": "1.1.0",
            "process": {"terminal": false, "args": ["/bin/sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/shm", "source": "/run/sandboxes/abc/shm", "options": ["rbind", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/123/ns/net"}],
                "maskedPaths": ["/proc/kcore"],
                "cgroupsPath": "/k8s/abc",
                "unknownField": 1
            },
            "annotations": {"io.kubernetes.cri.container-name": "app"}
        }"#;
        let s: Spec = serde_json::from_str(json).unwrap();
        assert_eq!(s.root.as_ref().unwrap().path, "rootfs");
        assert!(s.mounts[1].is_bind() && s.mounts[2].is_bind() && !s.mounts[0].is_bind());
        assert_eq!(s.joined_namespace("network"), Some("/proc/123/ns/net"));
        assert_eq!(s.joined_namespace("pid"), None);
        assert!(s.has_namespace("pid"));
        assert_eq!(s.annotations["io.kubernetes.cri.container-name"], "app");
    }
}
