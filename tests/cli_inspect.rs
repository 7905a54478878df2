//! `podckpt inspect` on archives built here with the library's writer and
//! hand-encoded CRIU images: no daemon, no root, no CRIU.

use std::path::Path;
use std::process::{Command, Output};

use podckpt::archive::manifest::{
    ContainerEntry, HostInfo, PodManifest, SandboxEntry, Timings, MANIFEST, POD_ARCHIVE_ZSTD,
    POD_FORMAT, POD_FORMAT_VERSION,
};
use podckpt::archive::{ArchiveWriter, Compression};
use podckpt::cri::api::{PodSandboxConfig, PodSandboxMetadata};
use podckpt::criu::image::{
    encode_entries, CoreEntry, PstreeEntry, TaskCoreEntry, CORE_MAGIC, PSTREE_MAGIC,
};

fn podckpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_podckpt"))
        .args(args)
        // Inspect must not need the daemon: point the endpoint nowhere.
        .env("PODCKPT_ENDPOINT", "/nonexistent/podckpt.sock")
        .output()
        .expect("run podckpt")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "podckpt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn core(comm: Option<&str>) -> Vec<u8> {
    encode_entries(
        CORE_MAGIC,
        &[CoreEntry {
            mtype: 1,
            tc: comm.map(|c| TaskCoreEntry {
                comm: Some(c.as_bytes().to_vec()),
            }),
        }],
    )
}

fn pstree() -> Vec<u8> {
    let e = |pid, ppid, threads: &[u32]| PstreeEntry {
        pid,
        ppid,
        pgid: 1,
        sid: 1,
        threads: threads.to_vec(),
    };
    encode_entries(PSTREE_MAGIC, &[e(1, 0, &[1]), e(7, 1, &[7, 8])])
}

/// One container's entries in the shared container-checkpoint layout.
fn container_entries(w: &mut ArchiveWriter, prefix: &str, name: &str) {
    w.append_dir_entry(&format!("{prefix}checkpoint")).unwrap();
    w.append_bytes(&format!("{prefix}checkpoint/core-1.img"), &core(Some("sh")))
        .unwrap();
    w.append_bytes(
        &format!("{prefix}checkpoint/core-7.img"),
        &core(Some("sleep")),
    )
    .unwrap();
    // A second thread's core has no task part.
    w.append_bytes(&format!("{prefix}checkpoint/core-8.img"), &core(None))
        .unwrap();
    w.append_bytes(&format!("{prefix}checkpoint/pages-1.img"), &[0u8; 8192])
        .unwrap();
    w.append_bytes(&format!("{prefix}checkpoint/pstree.img"), &pstree())
        .unwrap();
    let config = serde_json::json!({
        "id": format!("{name}-0123456789abcdef"),
        "name": name,
        "rootfsImage": "localhost/podckpt/app:test",
        "rootfsImageRef": "sha256:feedface",
        "rootfsImageName": "localhost/podckpt/app:test",
        "runtime": "io.containerd.runc.v2",
        "checkpointedTime": "2023-11-14T22:13:20.123Z",
    });
    let spec = serde_json::json!({
        "process": { "args": ["sh", "-c", "sleep 1000"] },
        "annotations": {
            "io.kubernetes.cri.container-name": name,
            "io.kubernetes.cri.sandbox-name": "web",
            "io.kubernetes.cri.sandbox-namespace": "shop",
            "io.kubernetes.cri.sandbox-id": "sandbox-0123",
        }
    });
    w.append_bytes(
        &format!("{prefix}config.dump"),
        &serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    w.append_bytes(
        &format!("{prefix}spec.dump"),
        &serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    w.append_bytes(
        &format!("{prefix}deleted.files"),
        br#"["/etc/motd", "/tmp/x"]"#,
    )
    .unwrap();
    w.append_bytes(&format!("{prefix}rootfs-diff.tar"), &[0u8; 3072])
        .unwrap();
}

fn write_pod_archive(dir: &Path) {
    let manifest = PodManifest {
        format: POD_FORMAT.into(),
        version: POD_FORMAT_VERSION,
        podckpt_version: "0.1.0".into(),
        created_unix_ms: 1_700_000_000_123,
        host: HostInfo {
            hostname: "node-1".into(),
            kernel: "6.1.0-test".into(),
            criu_version: "4.2".into(),
            runtime_name: "containerd".into(),
            runtime_version: "v2.1.9".into(),
            cgroup: "v2".into(),
        },
        sandbox: SandboxEntry {
            id: "sandbox-0123".into(),
            config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "web".into(),
                    namespace: "shop".into(),
                    uid: "1111-2222".into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            status: None,
        },
        options: Default::default(),
        containers: vec![ContainerEntry {
            name: "app".into(),
            id: "app-0123456789abcdef".into(),
            dir: "containers/app".into(),
            image: "localhost/podckpt/app:test".into(),
            image_ref: "sha256:feedface".into(),
            images_bytes: 5 * 1024 * 1024,
            rootfs_diff_bytes: 3072,
            deleted_files: 2,
            ..Default::default()
        }],
        devshm: false,
        timings: Timings {
            prepare_ms: 5,
            freeze_ms: 2,
            frozen_window_ms: 321,
            capture_ms: 400,
            warm_ms: 0,
        },
        files: vec![],
    };
    let dest = dir.join(POD_ARCHIVE_ZSTD);
    let mut w = ArchiveWriter::create(
        &dest,
        Compression::Zstd {
            level: 1,
            workers: 0,
        },
    )
    .unwrap();
    w.append_bytes(MANIFEST, &serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    container_entries(&mut w, "containers/app/", "app");
    w.finish().unwrap();
}

#[test]
fn inspect_pod_archive_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    write_pod_archive(dir.path());
    let dir_arg = dir.path().to_str().unwrap();

    let text = stdout(&podckpt(&["inspect", dir_arg]));
    for want in [
        "pod checkpoint   ",
        "pod.tar.zst",
        "format           podckpt.dev/pod-checkpoint v1, written by podckpt 0.1.0",
        "created          2023-11-14 22:13:20 UTC (",
        "host             node-1, kernel 6.1.0-test, CRIU 4.2, containerd v2.1.9, cgroup v2",
        "pod              shop/web, uid 1111-2222, sandbox sandbox-0123",
        "options          tcp-established=false file-locks=false ext-unix-sk=false compression=zstd:3",
        "frozen window 321 ms",
        "container app  id app-0123456789abcdef",
        "  image          localhost/podckpt/app:test (sha256:feedface)",
        "  command        sh -c sleep 1000",
        "  memory         5.0 MiB of CRIU images",
        "  rootfs diff    3.0 KiB, 2 deleted files",
        "  processes      2\n    1 sh\n      7 sleep (2 threads)\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // The archive file itself works too, and --json is machine-readable.
    let archive = dir.path().join(POD_ARCHIVE_ZSTD);
    let json = stdout(&podckpt(&["inspect", "--json", archive.to_str().unwrap()]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kind"], "pod");
    assert_eq!(v["pod"]["name"], "web");
    assert_eq!(v["timings"]["frozen_window_ms"], 321);
    let c = &v["containers"][0];
    assert_eq!(c["name"], "app");
    assert_eq!(c["images_bytes"], 5 * 1024 * 1024);
    assert_eq!(c["processes"][1]["pid"], 7);
    assert_eq!(c["processes"][1]["ppid"], 1);
    assert_eq!(c["processes"][1]["comm"], "sleep");
    assert_eq!(c["processes"][1]["threads"], 2);
}

#[test]
fn inspect_container_archive() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("ckpt.tar");
    let mut w = ArchiveWriter::create(&dest, Compression::None).unwrap();
    container_entries(&mut w, "", "app");
    w.finish().unwrap();

    let text = stdout(&podckpt(&["inspect", dest.to_str().unwrap()]));
    for want in [
        "container checkpoint  ",
        "checkpointed     2023-11-14T22:13:20.123Z",
        "runtime          io.containerd.runc.v2",
        "pod              shop/web, sandbox sandbox-0123",
        "container app  id app-0123456789abcdef",
        "  image          localhost/podckpt/app:test (sha256:feedface)",
        "  rootfs diff    3.0 KiB, 2 deleted files",
        "    1 sh\n      7 sleep (2 threads)\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let json = stdout(&podckpt(&["inspect", "--json", dest.to_str().unwrap()]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kind"], "container");
    // Sum of everything under checkpoint/.
    let images = v["container"]["images_bytes"].as_u64().unwrap();
    assert!(images > 8192, "{images}");
    assert_eq!(v["container"]["deleted_files"], 2);
}

#[test]
fn inspect_refuses_what_is_not_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = podckpt(&["inspect", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint archive there"));

    let dest = dir.path().join("other.tar");
    let mut w = ArchiveWriter::create(&dest, Compression::None).unwrap();
    w.append_bytes("hello.txt", b"hi").unwrap();
    w.finish().unwrap();
    let out = podckpt(&["inspect", dest.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a checkpoint archive"));
}
