//! Issue 14: the attack classes of containerd's 2026 advisories on
//! restoring from checkpoint archives, tried against podckpt's restore
//! paths (RestorePod, and CreateContainer with an archive as the image)
//! with crafted archives on a real containerd 2.1:
//! - CVE-2026-53489: a `container.log` that is a symlink to a host file;
//! - CVE-2026-53492: CDI device annotations, devices and mounts smuggled in
//!   the checkpoint's metadata (`config.dump`, `spec.dump`);
//! - CVE-2026-50195: image-tag poisoning: an archive naming an image by a
//!   tag makes the restore pull, tag or import nothing, and restore only on
//!   an image the node already has, by content.
//!
//! Each case checks the code and message, and that nothing was created or
//! left behind. Needs root and the test bed; skips without them unless
//! PODCKPT_E2E=1, where it fails instead.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use common::cri::{container_config, exec, pods_named, run_pod, start_container};
use common::testbed::Testbed;
use common::Daemon;
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;
use podckpt::restore::wrapper::DEFAULT_RESTORE_DIR;
use tonic::Code;

const CDI_KEY: &str = "cdi.k8s.io/podckpt-smuggled";
const POISON_TAG: &str = "localhost/podckpt/poisoned:latest";

/// Every entry of an archive, with its header and bytes.
fn entries(path: &Path) -> Vec<(tar::Header, Vec<u8>)> {
    let mut ar = podckpt::archive::reader::open_tar(path).unwrap();
    let mut out = vec![];
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut data = vec![];
        e.read_to_end(&mut data).unwrap();
        out.push((h, data));
    }
    out
}

fn name_of(h: &tar::Header) -> String {
    h.path()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("./")
        .to_string()
}

/// A plain tar of `src`'s entries, each passed through `edit` (which may
/// change the bytes of a JSON file or drop the entry), plus symlinks.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&str, &mut serde_json::Value) -> bool,
    links: &[(&str, &str)],
) -> PathBuf {
    let mut b = tar::Builder::new(std::fs::File::create(dst).unwrap());
    for (h, data) in entries(src) {
        let name = name_of(&h);
        if links.iter().any(|(l, _)| *l == name) {
            continue;
        }
        let mut data = data;
        if name.ends_with(".dump") || name.ends_with(".json") {
            let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
            if !edit(&name, &mut v) {
                continue;
            }
            data = serde_json::to_vec(&v).unwrap();
        }
        let mut h = h.clone();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, &name, &data[..]).unwrap();
    }
    for (name, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, name, target).unwrap();
    }
    b.into_inner().unwrap();
    dst.to_path_buf()
}

fn restore_dir_entries() -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    if let Ok(rd) = std::fs::read_dir(DEFAULT_RESTORE_DIR) {
        for e in rd.flatten() {
            out.insert(e.path());
        }
    }
    out
}

/// The node's images: (id, tags).
async fn images(client: &mut CriClient) -> BTreeSet<(String, Vec<String>)> {
    client
        .image
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images
        .into_iter()
        .map(|i| {
            let mut tags = i.repo_tags;
            tags.sort();
            (i.id, tags)
        })
        .collect()
}

/// Containers in one pod (other tests run beside this one).
async fn containers_in(client: &mut CriClient, pod: &str) -> usize {
    client
        .runtime
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers
        .len()
}

fn shadow_head() -> String {
    let data = std::fs::read("/etc/shadow").unwrap();
    String::from_utf8_lossy(&data[..data.len().min(12)]).into_owned()
}

struct Env {
    tb: Testbed,
    d: Daemon,
    client: CriClient,
    tmp: tempfile::TempDir,
    /// A real CheckpointContainer archive of a sleeping container.
    archive: PathBuf,
    _src: common::cri::PodGuard,
    /// Held for the whole test: see SERIAL.
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// The tests of this file run one at a time: each compares the node-wide
/// restore dir before and after, and another test's restore in between would
/// look like something left behind.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn env(test: &str) -> Option<Env> {
    let tb = Testbed::get(test)?;
    let serial = SERIAL.lock().await;
    let d = Daemon::start(
        &tb.path("CONTAINERD2_ENDPOINT"),
        &[
            "--criu",
            tb.var("CRIU"),
            "--allow-create-from-archive",
            "true",
        ],
    )
    .await;
    let mut client = d.client();
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("src-logs");
    std::fs::create_dir(&logs).unwrap();
    let (guard, pod, cfg) = run_pod(&mut client, &format!("{test}-src"), &logs).await;
    let id = start_container(
        &mut client,
        &pod,
        &cfg,
        container_config(
            "c",
            tb.var("APP_IMAGE"),
            &["/bin/sh", "-c", "while true; do sleep 1; done"],
        ),
    )
    .await;
    let archive = tmp.path().join("c.tar");
    client
        .runtime
        .checkpoint_container(CheckpointContainerRequest {
            container_id: id,
            location: archive.display().to_string(),
            timeout: 60,
        })
        .await
        .unwrap();
    Some(Env {
        tb,
        d,
        client,
        tmp,
        archive,
        _src: guard,
        _serial: serial,
    })
}

impl Env {
    /// CreateContainer in a new pod `name` with `archive` as the image.
    async fn create_from(
        &mut self,
        name: &str,
        archive: &Path,
        annotations: &[(&str, &str)],
    ) -> (common::cri::PodGuard, Result<String, tonic::Status>) {
        let (guard, _, res) = self.create_in_pod(name, archive, annotations).await;
        (guard, res)
    }

    /// The same, with the new pod's id.
    async fn create_in_pod(
        &mut self,
        name: &str,
        archive: &Path,
        annotations: &[(&str, &str)],
    ) -> (common::cri::PodGuard, String, Result<String, tonic::Status>) {
        let logs = self.tmp.path().join(format!("{name}-logs"));
        std::fs::create_dir_all(&logs).unwrap();
        let (guard, pod, cfg) = run_pod(&mut self.client, name, &logs).await;
        let mut config = container_config("c", &archive.display().to_string(), &[]);
        config.log_path = "restored.log".into();
        config.annotations = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let res = self
            .client
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(cfg),
            })
            .await
            .map(|r| r.into_inner().container_id);
        (guard, pod, res)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cve_2026_53489_a_log_symlink_in_an_archive_is_refused() {
    let Some(mut e) = env("adv-loglink").await else {
        return;
    };
    let head = shadow_head();
    // Container archive: container.log -> /etc/shadow.
    let crafted = rewrite(
        &e.archive,
        &e.tmp.path().join("loglink.tar"),
        |_, _| true,
        &[("container.log", "/etc/shadow")],
    );
    let before = restore_dir_entries();
    let (guard, pod, res) = e.create_in_pod("adv-loglink-dst", &crafted, &[]).await;
    let err = res.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("container.log"), "{}", err.message());
    assert!(
        err.message().contains("out of the archive"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains(&head), "{}", err.message());
    assert_eq!(containers_in(&mut e.client, &pod).await, 0);
    drop(guard);
    assert_eq!(restore_dir_entries(), before, "something was left");

    // Pod archive: the same link in a container's directory.
    use podckpt::archive::manifest::*;
    let manifest = PodManifest {
        format: POD_FORMAT.into(),
        version: POD_FORMAT_VERSION,
        containers: vec![ContainerEntry {
            name: "c".into(),
            dir: "c".into(),
            image: e.tb.var("APP_IMAGE").into(),
            ..Default::default()
        }],
        files: vec![FileEntry {
            path: "c/checkpoint/inventory.img".into(),
            size: 1,
        }],
        ..Default::default()
    };
    let pod_archive = e.tmp.path().join("pod-loglink.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&pod_archive).unwrap());
    let data = serde_json::to_vec(&manifest).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, MANIFEST, &data[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, "c/checkpoint/inventory.img", &b"x"[..])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "c/container.log", "/etc/shadow")
        .unwrap();
    b.into_inner().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let err = e
        .client
        .runtime
        .restore_pod(common::with_deadline(RestorePodRequest {
            checkpoint_path: pod_archive.display().to_string(),
            config: Some(common::cri::pod_config("adv-loglink-pod", logs.path())),
            container_configs: vec![container_config("c", e.tb.var("APP_IMAGE"), &["/bin/sh"])],
            ..Default::default()
        }))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("container.log"), "{}", err.message());
    assert!(!err.message().contains(&head), "{}", err.message());
    // By name: the other tests of this file create pods beside this one.
    assert_eq!(
        pods_named(&mut e.client, "adv-loglink-pod").await.len(),
        0,
        "a sandbox was left"
    );
    assert_eq!(restore_dir_entries(), before, "something was left");
    assert!(
        std::fs::read_dir(logs.path()).unwrap().next().is_none(),
        "nothing in the caller's log directory"
    );
    e.d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cve_2026_53492_cdi_annotations_devices_and_mounts_in_an_archive_are_ignored() {
    let Some(mut e) = env("adv-cdi").await else {
        return;
    };
    let smuggle = |name: &str, v: &mut serde_json::Value| {
        match name {
            "config.dump" => {
                v["annotations"][CDI_KEY] = "vendor.example/gpu=all".into();
                v["rootfsImageName"] = POISON_TAG.into();
            }
            "spec.dump" => {
                v["annotations"][CDI_KEY] = "vendor.example/gpu=all".into();
                v["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                    "destination": "/host-etc",
                    "type": "bind",
                    "source": "/etc",
                    "options": ["rbind", "rw"]
                }));
                if let Some(devs) = v["linux"]["devices"].as_array_mut() {
                    devs.push(serde_json::json!({
                        "path": "/dev/podckpt-smuggled", "type": "c",
                        "major": 1, "minor": 1
                    }));
                } else {
                    v["linux"]["devices"] = serde_json::json!([{
                        "path": "/dev/podckpt-smuggled", "type": "c",
                        "major": 1, "minor": 1
                    }]);
                }
            }
            _ => {}
        }
        true
    };
    let crafted = rewrite(&e.archive, &e.tmp.path().join("cdi.tar"), smuggle, &[]);
    let images_before = images(&mut e.client).await;
    let (_guard, res) = e.create_from("adv-cdi-dst", &crafted, &[]).await;
    let id = res.expect("created from the node's image, with the caller's config");
    let status = e
        .client
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let s = status.status.unwrap();
    assert!(!s.annotations.contains_key(CDI_KEY), "{:?}", s.annotations);
    assert!(s.log_path.ends_with("restored.log"), "{}", s.log_path);
    let info = &status.info["info"];
    assert!(!info.contains(CDI_KEY), "the runtime's spec has it");
    assert!(!info.contains("/host-etc"), "the runtime's spec mounts it");
    assert!(
        !info.contains("podckpt-smuggled"),
        "the runtime's spec has the device"
    );
    // The tag in config.dump was neither pulled nor made.
    let after = images(&mut e.client).await;
    assert_eq!(after, images_before, "the node's images changed");
    assert!(!format!("{after:?}").contains(POISON_TAG));

    // Started, the restored process sees none of it.
    e.client
        .runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("start restores");
    let out = exec(
        &mut e.client,
        &id,
        &[
            "/bin/sh",
            "-c",
            "ls /host-etc /dev/podckpt-smuggled 2>&1; true",
        ],
    )
    .await;
    assert!(
        out.contains("No such file") || out.contains("can't access"),
        "{out}"
    );
    e.d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cve_2026_50195_archives_cannot_name_pull_or_tag_images() {
    let Some(mut e) = env("adv-tag").await else {
        return;
    };
    let images_before = images(&mut e.client).await;
    let cases: [(&str, serde_json::Value, &str); 3] = [
        // Only a tag, of an image the node lacks: nothing is pulled.
        (
            "tag-only",
            serde_json::json!({"rootfsImageName": "docker.io/library/busybox:1.0-podckpt", "rootfsImageRef": ""}),
            "not trusted",
        ),
        // A tag in the ref field is no content address either.
        (
            "tag-as-ref",
            serde_json::json!({"rootfsImageName": POISON_TAG, "rootfsImageRef": POISON_TAG}),
            "not trusted",
        ),
        // A content address the node does not have: no pull.
        (
            "unknown-digest",
            serde_json::json!({"rootfsImageName": POISON_TAG, "rootfsImageRef": format!("sha256:{}", "0".repeat(64))}),
            "never pulls",
        ),
    ];
    let before = restore_dir_entries();
    for (name, set, says) in cases {
        let crafted = rewrite(
            &e.archive,
            &e.tmp.path().join(format!("{name}.tar")),
            |n, v| {
                if n == "config.dump" {
                    for (k, x) in set.as_object().unwrap() {
                        v[k] = x.clone();
                    }
                }
                true
            },
            &[],
        );
        let (guard, pod, res) = e
            .create_in_pod(&format!("adv-tag-{name}"), &crafted, &[])
            .await;
        let err = res.expect_err(name);
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{name}: {}",
            err.message()
        );
        assert!(err.message().contains(says), "{name}: {}", err.message());
        assert_eq!(containers_in(&mut e.client, &pod).await, 0, "{name}");
        drop(guard);
        assert_eq!(
            images(&mut e.client).await,
            images_before,
            "{name}: images changed"
        );
    }
    assert_eq!(restore_dir_entries(), before, "something was left");

    // The caller may name the image; it must be the one checkpointed.
    let archive = e.archive.clone();
    let pause = e.tb.var("PAUSE_IMAGE").to_string();
    let (_g, res) = e
        .create_from(
            "adv-tag-caller",
            &archive,
            &[(podckpt::pod::restore::BASE_IMAGE_ANNOTATION, pause.as_str())],
        )
        .await;
    let err = res.expect_err("another image than the checkpoint's");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("checkpoint was taken on"),
        "{}",
        err.message()
    );
    let app = e.tb.var("APP_IMAGE").to_string();
    let (_g, res) = e
        .create_from(
            "adv-tag-caller-ok",
            &archive,
            &[(podckpt::pod::restore::BASE_IMAGE_ANNOTATION, app.as_str())],
        )
        .await;
    res.expect("the caller's image, which is the checkpoint's");
    assert_eq!(images(&mut e.client).await, images_before);
    e.d.stop().await;
}
