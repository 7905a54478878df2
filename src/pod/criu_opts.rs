//! CRIU dump options for one container, equivalent to what runc sets in
//! `runc checkpoint`, so that `runc restore` (and so podckpt-runc) can
//! restore the images: the same external-mount keys, the same external
//! namespace keys, the same cgroup handling.

use std::path::PathBuf;

use crate::criu::rpc::{CriuCgMode, CriuNetworkLockMethod, CriuOpts, ExtMountMap};
use crate::node::cgroup::Freezer;
use crate::node::mountinfo;

use super::options::{CheckpointOptions, NetworkLock};
use super::spec::Spec;

/// Where CRIU writes its log, relative to the work dir; the container
/// archive keeps it under the same name.
pub const DUMP_LOG: &str = "dump.log";
/// CRIU's dump statistics, which it writes into its work dir.
pub const STATS_DUMP: &str = "stats-dump";

/// The key runc restore looks for to hand CRIU the new network namespace.
pub const EXT_NET_NS_KEY: &str = "extRootNetNS";
/// Same for a joined pid namespace.
pub const EXT_PID_NS_KEY: &str = "extRootPidNS";

/// Device nodes runc always creates in a container (its default device
/// list); runc marks them external on dump and on restore, so do we.
pub const DEFAULT_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/random",
    "/dev/full",
    "/dev/tty",
    "/dev/zero",
    "/dev/urandom",
];

/// Everything about one container that its dump options depend on.
#[derive(Clone, Debug)]
pub struct DumpPlan {
    /// The container's init process, as the host sees it.
    pub pid: i32,
    /// The rootfs path on the host (the spec's root, made absolute).
    pub root: PathBuf,
    /// The container's freezer cgroup.
    pub freezer: Freezer,
    /// The container's OCI spec.
    pub spec: Spec,
    /// The mounts inside the container (`/proc/<pid>/mountinfo`).
    pub mounts: Vec<mountinfo::Mount>,
    /// Inode of the network namespace the container joined, if any.
    pub netns_inode: Option<u64>,
    /// Inode of the pid namespace the container joined, if any.
    pub pidns_inode: Option<u64>,
    /// Masked paths that are files in this container (directories are
    /// masked with a tmpfs CRIU dumps itself).
    pub masked_files: Vec<String>,
}

/// Builds the DUMP options. `images_dir_fd` and `work_dir_fd` are the
/// caller's open directory fds.
pub fn dump_opts(
    plan: &DumpPlan,
    options: &CheckpointOptions,
    images_dir_fd: i32,
    work_dir_fd: i32,
) -> CriuOpts {
    let mut opts = CriuOpts {
        images_dir_fd,
        work_dir_fd: Some(work_dir_fd),
        log_file: Some(DUMP_LOG.into()),
        log_level: Some(4),
        pid: Some(plan.pid),
        root: Some(plan.root.display().to_string()),
        manage_cgroups: Some(true),
        manage_cgroups_mode: Some(CriuCgMode::Soft as i32),
        notify_scripts: Some(true),
        orphan_pts_master: Some(true),
        // The pod keeps running: podckptd thaws it after all dumps.
        leave_running: Some(true),
        shell_job: Some(false),
        tcp_established: Some(options.tcp_established),
        file_locks: Some(options.file_locks),
        ext_unix_sk: Some(options.ext_unix_sk),
        ghost_limit: options.ghost_limit,
        network_lock: options.network_lock.map(|l| {
            (match l {
                NetworkLock::Iptables => CriuNetworkLockMethod::Iptables,
                NetworkLock::Nftables => CriuNetworkLockMethod::Nftables,
                NetworkLock::Skip => CriuNetworkLockMethod::Skip,
            }) as i32
        }),
        // CRIU seizes the tasks through the freezer. podckptd has frozen the
        // cgroup already (the pod-wide cut); CRIU finds it frozen and leaves
        // it so, and podckptd thaws every container together afterwards.
        freeze_cgroup: Some(plan.freezer.dir.display().to_string()),
        ..Default::default()
    };
    if let Some(ino) = plan.netns_inode {
        opts.external.push(format!("net[{ino}]:{EXT_NET_NS_KEY}"));
    }
    if let Some(ino) = plan.pidns_inode {
        opts.external.push(format!("pid[{ino}]:{EXT_PID_NS_KEY}"));
    }
    opts.ext_mnt = external_mounts(plan);
    opts
}

/// External mounts, keyed (and valued) by the container-side path as runc
/// does: bind mounts, cgroup v1 controller mounts, masked files (valued
/// `/dev/null`), device nodes.
pub fn external_mounts(plan: &DumpPlan) -> Vec<ExtMountMap> {
    let mut out: Vec<ExtMountMap> = Vec::new();
    let mut add = |key: &str, val: &str| {
        if !out.iter().any(|m| m.key == key) {
            out.push(ExtMountMap {
                key: key.into(),
                val: val.into(),
            });
        }
    };
    for m in &plan.spec.mounts {
        if m.is_bind() {
            add(&m.destination, &m.destination);
        } else if m.kind == "cgroup" && !plan.spec.has_namespace("cgroup") {
            // cgroup v1 without a cgroup namespace: runc bind-mounts each
            // controller's directory; every one is external. They are read
            // from the container's own mount table, so nothing is guessed.
            let prefix = format!("{}/", m.destination.trim_end_matches('/'));
            for cm in plan
                .mounts
                .iter()
                .filter(|cm| cm.fstype == "cgroup" && cm.mount_point.starts_with(&prefix))
            {
                add(&cm.mount_point, &cm.mount_point);
            }
        }
    }
    for path in &plan.masked_files {
        add(path, "/dev/null");
    }
    let spec_devices = plan
        .spec
        .linux
        .iter()
        .flat_map(|l| l.devices.iter().map(|d| d.path.as_str()));
    for dev in DEFAULT_DEVICES.iter().copied().chain(spec_devices) {
        add(dev, dev);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::cgroup::FreezerKind;
    use crate::pod::spec::{Linux, Mount, Namespace};

    fn plan() -> DumpPlan {
        let spec = Spec {
            mounts: vec![
                Mount {
                    destination: "/proc".into(),
                    kind: "proc".into(),
                    ..Default::default()
                },
                Mount {
                    destination: "/etc/hosts".into(),
                    kind: "bind".into(),
                    source: "/x/hosts".into(),
                    options: vec!["rbind".into()],
                },
                Mount {
                    destination: "/dev/shm".into(),
                    source: "/run/shm".into(),
                    options: vec!["rbind".into()],
                    ..Default::default()
                },
                Mount {
                    destination: "/sys/fs/cgroup".into(),
                    kind: "cgroup".into(),
                    ..Default::default()
                },
            ],
            linux: Some(Linux {
                namespaces: vec![Namespace {
                    kind: "network".into(),
                    path: "/proc/1/ns/net".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mounts = mountinfo::parse(
            "10 1 0:1 / / rw - overlay overlay rw,upperdir=/u\n\
             11 10 0:2 /k8s/c /sys/fs/cgroup/freezer ro - cgroup cgroup rw,freezer\n\
             12 10 0:3 /k8s/c /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n",
        );
        DumpPlan {
            pid: 42,
            root: "/run/c/rootfs".into(),
            freezer: Freezer {
                kind: FreezerKind::V1,
                dir: "/sys/fs/cgroup/freezer/k8s/c".into(),
            },
            spec,
            mounts,
            netns_inode: Some(4026532000),
            pidns_inode: None,
            masked_files: vec!["/proc/kcore".into()],
        }
    }

    #[test]
    fn like_runc() {
        let o = dump_opts(
            &plan(),
            &CheckpointOptions {
                tcp_established: true,
                ..Default::default()
            },
            7,
            8,
        );
        assert_eq!(
            (o.images_dir_fd, o.work_dir_fd, o.pid),
            (7, Some(8), Some(42))
        );
        assert_eq!(o.root.as_deref(), Some("/run/c/rootfs"));
        assert_eq!(
            o.freeze_cgroup.as_deref(),
            Some("/sys/fs/cgroup/freezer/k8s/c")
        );
        assert_eq!(o.external, ["net[4026532000]:extRootNetNS"]);
        assert_eq!(
            (o.leave_running, o.tcp_established, o.orphan_pts_master),
            (Some(true), Some(true), Some(true))
        );
        assert_eq!(o.manage_cgroups_mode, Some(CriuCgMode::Soft as i32));
        let m: Vec<_> = o
            .ext_mnt
            .iter()
            .map(|m| (m.key.as_str(), m.val.as_str()))
            .collect();
        assert_eq!(
            &m[..5],
            [
                ("/etc/hosts", "/etc/hosts"),
                ("/dev/shm", "/dev/shm"),
                ("/sys/fs/cgroup/freezer", "/sys/fs/cgroup/freezer"),
                ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
                ("/proc/kcore", "/dev/null"),
            ]
        );
        assert!(m.contains(&("/dev/null", "/dev/null")));
        // No duplicate keys even though /dev/null appears twice in spirit.
        let mut keys: Vec<_> = m.iter().map(|(k, _)| *k).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), m.len());
    }
}
