//! checkpointctl reads what podckpt writes: container checkpoint archives
//! made by CheckpointContainer through podckptd in front of each of the
//! test bed's runtimes (containerd 2.1, containerd 1.6, CRI-O), and the
//! per-container archives `podckpt export` takes out of a pod archive, are
//! opened with the real checkpointctl (the test bed's, v1.5): `show`,
//! `inspect --all` (which needs `stats-dump` at the archive's top level
//! and CRIU's process, file and memory images) and `memparse`.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cri::{container_config, run_pod, start_container};
use common::crio::{crio_container_config, run_crio_pod};
use common::testbed::Testbed;
use common::Daemon;
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;

/// One checkpoint at a time: the node has two cores, and CRIU dumps of
/// tests running side by side would only slow each other down.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const COUNTER: &str = common::pod3::COUNTER;

/// Runs the test bed's checkpointctl; its stdout. A non-zero exit fails
/// the test with what checkpointctl said.
fn checkpointctl(tb: &Testbed, args: &[&str], archive: &Path) -> String {
    let bin = tb.path("CHECKPOINTCTL");
    let out = Command::new(&bin)
        .args(args)
        .arg(archive)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "checkpointctl {args:?} {} exited with {}:\n{stdout}\n{}",
        archive.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `show`, `inspect --all` and `memparse` on `archive`, which must hold the
/// checkpoint of the container `name` (id `id`) running [`COUNTER`].
fn read_with_checkpointctl(tb: &Testbed, archive: &Path, name: &str, id: &str) {
    let show = checkpointctl(tb, &["show"], archive);
    let row = show
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("show names no container {name}:\n{show}"));
    assert!(row.contains(&id[..12]), "show: id {id} not in {row:?}");

    let inspect = checkpointctl(tb, &["inspect", "--all"], archive);
    assert!(
        inspect.lines().any(|l| l.trim() == name),
        "inspect --all: no tree for {name}:\n{inspect}"
    );
    for want in [
        "CRIU dump statistics",
        "Freezing time:",
        "Pages written:",
        "Process tree",
        "Overview of mounts",
    ] {
        assert!(
            inspect.contains(want),
            "inspect --all lacks {want:?}:\n{inspect}"
        );
    }
    // The counter's shell is in the process tree, with its command line
    // (read from its memory pages) and its open files.
    let tree = inspect
        .split_once("Process tree")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("inspect --all: no process tree:\n{inspect}"));
    assert!(
        tree.contains("/bin/sh -c mkdir -p /data") && tree.contains("Open files"),
        "inspect --all: the counter's shell is not in the process tree:\n{inspect}"
    );

    // A process table: the shell (pid 1 in its own pid namespace, another
    // when it shares the pod's) with its memory size.
    let mem = checkpointctl(tb, &["memparse"], archive);
    assert!(mem.contains("PROCESS NAME"), "memparse: no table:\n{mem}");
    assert!(
        mem.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() >= 4 && cols[0].parse::<u32>().is_ok() && cols[1] == "sh" && cols[2] != "0"
        }),
        "memparse: no row for the shell:\n{mem}"
    );
    eprintln!(
        "checkpointctl read {} ({} bytes)",
        archive.display(),
        std::fs::metadata(archive).unwrap().len()
    );
}

/// CheckpointContainer of a counter through `d` (in front of a runtime);
/// the archive is then read with checkpointctl.
async fn checkpoint_container_and_read(tb: &Testbed, client: &mut CriClient, id: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join(format!("{name}.tar"));
    let mut req = tonic::Request::new(CheckpointContainerRequest {
        container_id: id.to_string(),
        location: location.display().to_string(),
        timeout: 60,
    });
    req.set_timeout(Duration::from_secs(120));
    client
        .runtime
        .checkpoint_container(req)
        .await
        .expect("CheckpointContainer through podckptd");
    read_with_checkpointctl(tb, &location, name, id);
}

/// CheckpointContainer through podckptd in front of containerd (`key` is
/// its endpoint in the test bed's env), read by checkpointctl.
async fn containerd_container(test: &str, key: &str, pod_name: &str) {
    let _serial = SERIAL.lock().await;
    let Some(tb) = Testbed::get(test) else {
        return;
    };
    let d = Daemon::start(&tb.path(key), &["--criu", tb.var("CRIU")]).await;
    let mut client = d.client();
    let logs = tempfile::tempdir().unwrap();
    let (guard, pod, config) = run_pod(&mut client, pod_name, logs.path()).await;
    let id = start_container(
        &mut client,
        &pod,
        &config,
        container_config("counter", tb.var("APP_IMAGE"), &["/bin/sh", "-c", COUNTER]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    checkpoint_container_and_read(&tb, &mut client, &id, "counter").await;
    drop(guard);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd2_container_archive_reads_in_checkpointctl() {
    containerd_container(
        "e2e_checkpointctl::containerd2",
        "CONTAINERD2_ENDPOINT",
        "cctl-ctrd2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd1_container_archive_reads_in_checkpointctl() {
    containerd_container(
        "e2e_checkpointctl::containerd1",
        "CONTAINERD1_ENDPOINT",
        "cctl-ctrd1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crio_container_archive_reads_in_checkpointctl() {
    let _serial = SERIAL.lock().await;
    let Some(tb) = Testbed::get("e2e_checkpointctl::crio") else {
        return;
    };
    let d = Daemon::start(&tb.path("CRIO_ENDPOINT"), &["--criu", tb.var("CRIU")]).await;
    let mut client = d.client();
    let logs = tempfile::tempdir().unwrap();
    let (guard, pod, config) = run_crio_pod(&mut client, "cctl-crio", logs.path()).await;
    let id = start_container(
        &mut client,
        &pod,
        &config,
        crio_container_config(&tb, "counter", COUNTER),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    checkpoint_container_and_read(&tb, &mut client, &id, "counter").await;
    drop(guard);
    d.stop().await;
}

/// Runs `podckpt export`; its exit status, stdout and stderr.
fn podckpt_export(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_podckpt"))
        .arg("export")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_pod_containers_read_in_checkpointctl() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = common::setup("e2e_checkpointctl::export").await else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let (guard, pod, config) = run_pod(&mut client, "cctl-export", logs.path()).await;
    let app = tb.var("APP_IMAGE");
    let mut ids = HashMap::new();
    for (name, script) in [("counter", COUNTER), ("web", common::pod3::WEB)] {
        let id = start_container(
            &mut client,
            &pod,
            &config,
            container_config(name, app, &["/bin/sh", "-c", script]),
        )
        .await;
        ids.insert(name, id);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let out = tempfile::tempdir().unwrap();
    let mut req = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: pod.clone(),
        output_path: out.path().display().to_string(),
        container_ids: vec![ids["counter"].clone(), ids["web"].clone()],
        options: HashMap::new(),
    });
    req.set_timeout(Duration::from_secs(120));
    client
        .runtime
        .checkpoint_pod(req)
        .await
        .expect("CheckpointPod");
    drop(guard);
    d.stop().await;
    let archive = out.path().join("pod.tar.zst");

    // All containers, into a directory export creates.
    let exported: PathBuf = out.path().join("exported");
    let started = Instant::now();
    let (ok, stdout, stderr) =
        podckpt_export(&[archive.to_str().unwrap(), "-o", exported.to_str().unwrap()]);
    let took = started.elapsed();
    assert!(ok, "podckpt export failed:\n{stdout}\n{stderr}");
    eprintln!(
        "exported {} ({} bytes) in {took:?}",
        archive.display(),
        std::fs::metadata(&archive).unwrap().len()
    );
    assert_eq!(names_in(&exported), ["counter.tar", "web.tar"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&exported), 0o700);
    for (name, id) in &ids {
        let tar = exported.join(format!("{name}.tar"));
        assert_eq!(mode(&tar), 0o600, "{}", tar.display());
        // web runs httpd under `exec`: pid 1 is httpd, not a shell.
        if *name == "counter" {
            read_with_checkpointctl(&tb, &tar, name, id);
        } else {
            let show = checkpointctl(&tb, &["show"], &tar);
            assert!(show.lines().any(|l| l.starts_with("web ")), "{show}");
            let inspect = checkpointctl(&tb, &["inspect", "--all"], &tar);
            assert!(inspect.contains("Freezing time:"), "{inspect}");
            assert!(inspect.contains("httpd"), "{inspect}");
            let mem = checkpointctl(&tb, &["memparse"], &tar);
            assert!(mem.contains("httpd"), "{mem}");
        }
    }

    // One container, by name; an unknown name fails and writes nothing.
    let one = out.path().join("one");
    let (ok, _, stderr) = podckpt_export(&[
        out.path().to_str().unwrap(),
        "--container",
        "web",
        "-o",
        one.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(names_in(&one), ["web.tar"]);
    let none = out.path().join("none");
    let (ok, _, stderr) = podckpt_export(&[
        archive.to_str().unwrap(),
        "--container",
        "nosuch",
        "-o",
        none.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("nosuch"), "{stderr}");
    assert!(names_in(&none).is_empty(), "{:?}", names_in(&none));
}
