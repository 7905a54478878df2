//! Issue 14: nothing a local user or a crafted archive can do turns podckpt
//! against the node. Untrusted directories stop podckptd at start and make
//! podckpt-runc refuse a registration; archives that are links, or files
//! that are no archive, are refused without their bytes in the message;
//! a symlinked output_path is refused. Each case checks the code and
//! message, and that nothing was created or left behind.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cri::{container_config, container_count, run_pod, start_container};
use common::setup;
use podckpt::cri::api::*;
use podckpt::restore::wrapper::DEFAULT_RESTORE_DIR;
use tonic::Code;

const PODCKPTD: &str = env!("CARGO_BIN_EXE_podckptd");
const RUNC_WRAPPER: &str = env!("CARGO_BIN_EXE_podckpt-runc");
/// The async tests compare the node-wide restore dir and container count
/// before and after: one at a time, or another's work looks left behind.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// The unprivileged user the tests act as.
const USER: &str = "podckpt-e2e-user";

/// Root is needed to hand files to another user; under CI
/// (PODCKPT_E2E=1) its absence is a failure, not a skip.
fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("PODCKPT_E2E").is_ok_and(|v| v == "1") {
        panic!("{test}: PODCKPT_E2E=1 but not running as root");
    }
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// The unprivileged user (created once, idempotently): its uid and gid.
fn user() -> (u32, u32) {
    if nix::unistd::User::from_name(USER).unwrap().is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()
            .unwrap();
        // A concurrent test may have created it in between.
        assert!(
            out.status.success() || nix::unistd::User::from_name(USER).unwrap().is_some(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let u = nix::unistd::User::from_name(USER).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

fn give_to_user(p: &Path) {
    let (uid, gid) = user();
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// Every path under `dir` (the dir's whole tree).
fn tree(dir: &Path) -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(p.clone());
                }
                out.insert(p);
            }
        }
    }
    out
}

fn podckptd_refuses(args: &[&str], flag: &str, why: &str) {
    let out = Command::new(PODCKPTD)
        .args(["--runtime-endpoint", "/nonexistent/rt.sock"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(&format!("--{flag}")), "{stderr}");
    assert!(stderr.contains("untrusted directory"), "{stderr}");
    assert!(stderr.contains(why), "{stderr}");
}

#[test]
fn podckptd_refuses_untrusted_dirs_at_start() {
    if !root_or_skip("podckptd_refuses_untrusted_dirs_at_start") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let listen = base.join("podckpt.sock");
    let listen = listen.to_str().unwrap();
    let state = base.join("state");
    let state = state.to_str().unwrap();

    // A staging dir a user created first (as a dir of theirs).
    let theirs = base.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    give_to_user(&theirs);
    podckptd_refuses(
        &[
            "--listen",
            listen,
            "--state-dir",
            state,
            "--staging-dir",
            theirs.to_str().unwrap(),
        ],
        "staging-dir",
        &format!("owned by uid {}", user().0),
    );

    // A restore dir under a directory everybody may write to (no sticky bit).
    let loose = base.join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
    let restore = loose.join("restore");
    podckptd_refuses(
        &[
            "--listen",
            listen,
            "--state-dir",
            state,
            "--restore-dir",
            restore.to_str().unwrap(),
        ],
        "restore-dir",
        "lets group or others write",
    );
    assert!(!restore.exists(), "nothing created under the untrusted dir");

    // A state dir that is a link a user planted in a sticky shared dir
    // (like /tmp or /dev/shm) pointing at a root-owned dir.
    let shared = base.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let target = base.join("target");
    std::fs::create_dir(&target).unwrap();
    let link = shared.join("state");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    give_to_user(&link);
    podckptd_refuses(
        &["--listen", listen, "--state-dir", link.to_str().unwrap()],
        "state-dir",
        "symbolic link",
    );
    assert_eq!(
        tree(&target),
        HashSet::new(),
        "nothing written through the link"
    );
    assert!(!Path::new(listen).exists(), "no socket bound");
}

/// Runs podckpt-runc `create` for container `id` with `restore_dir`;
/// returns its exit code and its log. The "real runc" is a stand-in that
/// leaves a mark: it must never run for an untrusted registration.
fn wrapper_create(base: &Path, restore_dir: &Path, id: &str) -> (Option<i32>, String, bool) {
    let mark = base.join("runc-ran");
    let runc = base.join("runc");
    std::fs::write(&runc, format!("#!/bin/sh\ntouch {}\n", mark.display())).unwrap();
    std::fs::set_permissions(&runc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = base.join("wrapper.log");
    let _ = std::fs::remove_file(&log);
    let status = Command::new(RUNC_WRAPPER)
        .args(["create", "--bundle", base.to_str().unwrap(), id])
        .env("PODCKPT_RUNC", &runc)
        .env("PODCKPT_RESTORE_DIR", restore_dir)
        .env("PODCKPT_RUNC_LOG", &log)
        .env("PODCKPT_CRIU", "/nonexistent/criu")
        .status()
        .unwrap();
    let ran = mark.exists();
    let _ = std::fs::remove_file(&mark);
    (
        status.code(),
        std::fs::read_to_string(&log).unwrap_or_default(),
        ran,
    )
}

fn registration(restore: &Path, id: &str) -> String {
    // A registration as a user would write it, naming their own CRIU.
    serde_json::json!({
        "container_id": id,
        "name": "c",
        "work_dir": restore.join("work/w"),
        "container_dir": restore.join("work/w/c"),
        "criu": "/tmp/evil-criu",
    })
    .to_string()
}

#[test]
fn podckpt_runc_refuses_untrusted_registrations() {
    if !root_or_skip("podckpt_runc_refuses_untrusted_registrations") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let id = "0123abcd";

    // 1. A restore dir a user created first, with their registration.
    let restore = base.join("restore-theirs");
    std::fs::create_dir_all(restore.join("registrations")).unwrap();
    std::fs::write(
        restore.join("registrations").join(format!("{id}.json")),
        registration(&restore, id),
    )
    .unwrap();
    for p in [
        restore.clone(),
        restore.join("registrations"),
        restore.join("registrations").join(format!("{id}.json")),
    ] {
        give_to_user(&p);
    }
    let (code, log, ran) = wrapper_create(base, &restore, id);
    assert_eq!(code, Some(1), "{log}");
    assert!(!ran, "runc ran with an untrusted registration");
    assert!(log.contains("untrusted restore directory"), "{log}");
    assert!(log.contains(&restore.display().to_string()), "{log}");
    assert!(log.contains(&format!("owned by uid {}", user().0)), "{log}");

    // 2. A root-owned restore dir, but the registration is the user's file.
    let restore = base.join("restore-root");
    std::fs::create_dir(&restore).unwrap();
    std::fs::set_permissions(&restore, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir(restore.join("registrations")).unwrap();
    std::fs::set_permissions(
        restore.join("registrations"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let reg = restore.join("registrations").join(format!("{id}.json"));
    std::fs::write(&reg, registration(&restore, id)).unwrap();
    give_to_user(&reg);
    let (code, log, ran) = wrapper_create(base, &restore, id);
    assert_eq!(code, Some(1), "{log}");
    assert!(!ran);
    assert!(log.contains(&reg.display().to_string()), "{log}");
    assert!(log.contains("owned by uid"), "{log}");

    // 3. The registration is a link to a file elsewhere.
    std::fs::remove_file(&reg).unwrap();
    let elsewhere = base.join("elsewhere.json");
    std::fs::write(&elsewhere, registration(&restore, id)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &reg).unwrap();
    let (code, log, ran) = wrapper_create(base, &restore, id);
    assert_eq!(code, Some(1), "{log}");
    assert!(!ran);
    assert!(log.contains("symbolic link"), "{log}");

    // 4. A root-owned registration naming directories outside the work root.
    std::fs::remove_file(&reg).unwrap();
    let outside = serde_json::json!({
        "container_id": id,
        "name": "c",
        "work_dir": "/etc",
        "container_dir": "/etc/c",
    })
    .to_string();
    std::fs::write(&reg, outside).unwrap();
    std::fs::set_permissions(&reg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, log, ran) = wrapper_create(base, &restore, id);
    assert_eq!(code, Some(1), "{log}");
    assert!(!ran);
    assert!(log.contains("outside"), "{log}");
}

fn restore_dir_entries() -> HashSet<PathBuf> {
    tree(Path::new(DEFAULT_RESTORE_DIR))
}

/// The first bytes of /etc/shadow (as a tar header's name field would
/// carry them) must never appear in a message.
fn shadow_head() -> String {
    let data = std::fs::read("/etc/shadow").unwrap();
    String::from_utf8_lossy(&data[..data.len().min(12)]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn archives_that_are_links_or_no_archive_are_refused_without_their_bytes() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) =
        setup("archives_that_are_links_or_no_archive_are_refused_without_their_bytes").await
    else {
        return;
    };
    let _ = &tb;
    let tmp = tempfile::tempdir().unwrap();
    let head = shadow_head();
    // 1. checkpoint_path is a link to /etc/shadow.
    let link = tmp.path().join("pod.tar.zst");
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
    // 2. a directory whose pod.tar.zst is that link.
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.join("pod.tar.zst")).unwrap();
    // 3. a regular file that is no archive (a copy of /etc/shadow).
    let copy = tmp.path().join("copy.tar");
    std::fs::copy("/etc/shadow", &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();

    let before_restore = restore_dir_entries();
    let before_containers = container_count(&mut client).await;
    let log_dir = tempfile::tempdir().unwrap();
    for (path, code, says) in [
        (link.clone(), Code::InvalidArgument, "symbolic link"),
        (dir.clone(), Code::InvalidArgument, "symbolic link"),
        (copy.clone(), Code::DataLoss, "malformed tar"),
    ] {
        let err = client
            .runtime
            .restore_pod(common::with_deadline(RestorePodRequest {
                checkpoint_path: path.display().to_string(),
                config: Some(common::cri::pod_config("sec-archive", log_dir.path())),
                ..Default::default()
            }))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{}: {}", path.display(), err.message());
        assert!(err.message().contains(says), "{}", err.message());
        assert!(
            err.message().contains(&path.display().to_string())
                || err.message().contains(&dir.display().to_string()),
            "names the path: {}",
            err.message()
        );
        assert!(
            !err.message().contains(&head),
            "message echoes the file's bytes: {}",
            err.message()
        );
    }
    // `podckpt inspect` says the same, without the bytes either.
    for path in [&link, &dir, &copy] {
        let out = Command::new(env!("CARGO_BIN_EXE_podckpt"))
            .arg("inspect")
            .arg(path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !all.contains(&head),
            "inspect echoes the file's bytes: {all}"
        );
    }
    assert_eq!(restore_dir_entries(), before_restore, "nothing extracted");
    assert_eq!(container_count(&mut client).await, before_containers);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_into_a_symlinked_output_path_is_refused() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) =
        setup("checkpoint_into_a_symlinked_output_path_is_refused").await
    else {
        return;
    };
    let log_dir = tempfile::tempdir().unwrap();
    let (_guard, pod_id, config) = run_pod(&mut client, "sec-outlink", log_dir.path()).await;
    let cid = start_container(
        &mut client,
        &pod_id,
        &config,
        container_config(
            "c",
            tb.var("APP_IMAGE"),
            &["/bin/sh", "-c", "exec sleep 600"],
        ),
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let link = tmp.path().join("out");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = client
        .runtime
        .checkpoint_pod(common::with_deadline(CheckpointPodRequest {
            pod_sandbox_id: pod_id.clone(),
            container_ids: vec![cid.clone()],
            output_path: link.display().to_string(),
            ..Default::default()
        }))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("symbolic link"), "{}", err.message());
    assert!(
        err.message().contains(&link.display().to_string()),
        "{}",
        err.message()
    );
    assert_eq!(
        tree(&target),
        HashSet::new(),
        "nothing written through the link"
    );
    // The container was never frozen.
    assert_eq!(
        common::cri::container_state(&mut client, &cid).await,
        ContainerState::ContainerRunning as i32
    );
    d.stop().await;
}

/// A small archive whose manifest declares `sizes` for files of one
/// container "c" (the bytes are never there: it is refused before).
fn bomb(dir: &Path, sizes: &[u64]) -> PathBuf {
    use podckpt::archive::manifest::*;
    let manifest = PodManifest {
        format: POD_FORMAT.into(),
        version: POD_FORMAT_VERSION,
        containers: vec![ContainerEntry {
            name: "c".into(),
            dir: "c".into(),
            image: "localhost/podckpt/app:test".into(),
            ..Default::default()
        }],
        files: sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| FileEntry {
                path: if i == 0 {
                    "c/checkpoint/inventory.img".into()
                } else {
                    format!("c/checkpoint/pages-{i}.img")
                },
                size,
            })
            .collect(),
        ..Default::default()
    };
    let path = dir.join("bomb.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let data = serde_json::to_vec(&manifest).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, MANIFEST, &data[..]).unwrap();
    b.into_inner().unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn decompression_bombs_are_refused_before_anything_is_created() {
    let _serial = SERIAL.lock().await;
    let Some(tb) = common::testbed::Testbed::get("decompression_bombs") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], Vec<u64>, &str); 3] = [
        // Within the limit, beyond the free space of the restore dir.
        (&["--max-restore-bytes", "4096T"], vec![1 << 50], "free"),
        // Beyond the default limit (64 GiB).
        (&[], vec![100 << 30], "--max-restore-bytes"),
        (
            &["--max-archive-entries", "1"],
            vec![10, 10],
            "--max-archive-entries",
        ),
    ];
    for (args, sizes, says) in cases {
        let mut extra = vec!["--criu", tb.var("CRIU")];
        extra.extend_from_slice(args);
        let d = common::Daemon::start(&tb.path("CONTAINERD2_ENDPOINT"), &extra).await;
        let mut client = d.client();
        let archive = bomb(tmp.path(), &sizes);
        let before_restore = restore_dir_entries();
        let before_pods = client
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items
            .len();
        let err = client
            .runtime
            .restore_pod(common::with_deadline(RestorePodRequest {
                checkpoint_path: archive.display().to_string(),
                config: Some(common::cri::pod_config("sec-bomb", log_dir.path())),
                container_configs: vec![container_config("c", tb.var("APP_IMAGE"), &["/bin/sh"])],
                ..Default::default()
            }))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains(says), "{}", err.message());
        // Nothing created: no work dir, no sandbox.
        assert_eq!(restore_dir_entries(), before_restore);
        assert_eq!(
            client
                .runtime
                .list_pod_sandbox(ListPodSandboxRequest::default())
                .await
                .unwrap()
                .into_inner()
                .items
                .len(),
            before_pods
        );
        d.stop().await;
    }
}
