//! End to end: CheckpointPod and CheckpointContainer served by podckptd on
//! a real containerd with real CRIU, and every failure path leaving no
//! frozen container and no file behind.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::cri::{container_config, container_pid, container_state, run_pod, start_container};
use common::pod3::{three_container_pod, three_container_pod_on, Pod, COUNTER};
use common::runtime::Runtime;
use common::setup;
use common::testbed::Testbed;
use common::{criu_stand_in, Daemon};
use podckpt::archive::manifest::PodManifest;
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;
use podckpt::node::cgroup::{Freezer, FreezerState};
use tonic::Code;

/// Tests that count the node's checkpoint guardians, and the long
/// checkpoints that would add one beside theirs, run one at a time.
static GUARDIANS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every container of the pod runs and is thawed.
async fn assert_running_and_thawed(client: &mut CriClient, pod: &Pod) {
    for (name, id) in &pod.containers {
        assert_eq!(
            container_state(client, id).await,
            ContainerState::ContainerRunning as i32,
            "{name} not running"
        );
        let pid = container_pid(client, id).await;
        let state = Freezer::for_pid(pid).unwrap().state().unwrap();
        assert_eq!(state, FreezerState::Thawed, "{name} left {state:?}");
    }
}

fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{} not empty: {left:?}", dir.display());
}

/// Entries of a (possibly zstd) tar, with their contents when small.
fn archive_entries(path: &Path) -> HashMap<String, (tar::EntryType, Vec<u8>)> {
    let mut ar = podckpt::archive::reader::open_tar(path).unwrap();
    let mut out = HashMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let kind = e.header().entry_type();
        let mut data = vec![];
        if e.size() < 4 << 20 {
            e.read_to_end(&mut data).unwrap();
        }
        out.insert(name, (kind, data));
    }
    out
}

/// A file from a tar held in memory.
fn file_in_tar(tar_bytes: &[u8], wanted: &str) -> Option<String> {
    let mut ar = tar::Archive::new(tar_bytes);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().display().to_string() == wanted {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            return Some(s);
        }
    }
    None
}

fn rfc3339_ns(ts: &str) -> u64 {
    humantime::parse_rfc3339(ts)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// CheckpointPod of the three-container pod on `rt` is one consistent cut,
/// in checkpointctl's layout, and leaves the pod running.
async fn checkpoint_pod_is_one_consistent_cut_on(rt: Runtime) {
    let Some((tb, d, mut client)) = rt.setup("e2e_checkpoint::consistent_cut").await else {
        return;
    };
    let took = std::time::Instant::now();
    let pod = three_container_pod_on(rt, &mut client, &tb, &format!("ckpt-cut-{}", rt.key())).await;
    let out = tempfile::tempdir().unwrap();
    let mut req = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: out.path().display().to_string(),
        container_ids: pod.ids(),
        options: HashMap::new(),
    });
    req.set_timeout(Duration::from_secs(120));
    client.runtime.checkpoint_pod(req).await.unwrap();

    // Everything keeps running, nothing frozen.
    assert_running_and_thawed(&mut client, &pod).await;

    // One archive, mode 0600, nothing else in output_path.
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["pod.tar.zst"]);
    let archive = out.path().join("pod.tar.zst");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&archive).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // The manifest, first entry, names the pod and every container.
    let manifest: PodManifest = podckpt::archive::reader::read_manifest(&archive).unwrap();
    assert_eq!(manifest.sandbox.id, pod.id);
    assert!(
        manifest.host.criu_version.starts_with('4'),
        "{:?}",
        manifest.host
    );
    assert_eq!(manifest.host.runtime_name, rt.runtime_name());
    let names: Vec<_> = manifest
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["counter", "web", "shm"]);
    for (c, (_, id)) in manifest.containers.iter().zip(&pod.containers) {
        assert_eq!(&c.id, id);
        assert_eq!(c.image, tb.var("APP_IMAGE"));
        assert!(c.images_bytes > 0);
        assert!(c
            .config
            .as_ref()
            .is_some_and(|cfg| cfg.metadata.as_ref().unwrap().name == c.name));
    }

    // Pod-wide consistency: every container frozen before any dump began,
    // none thawed before every dump ended.
    let last_frozen = manifest
        .containers
        .iter()
        .map(|c| c.frozen_at_ns)
        .max()
        .unwrap();
    let first_dump = manifest
        .containers
        .iter()
        .map(|c| c.dump_started_ns)
        .min()
        .unwrap();
    let last_dump = manifest
        .containers
        .iter()
        .map(|c| c.dump_finished_ns)
        .max()
        .unwrap();
    let first_thaw = manifest
        .containers
        .iter()
        .map(|c| c.thawed_at_ns)
        .min()
        .unwrap();
    assert!(
        last_frozen <= first_dump,
        "a dump began before every container was frozen"
    );
    assert!(
        last_dump <= first_thaw,
        "a container was thawed before every dump ended"
    );
    assert!(manifest.timings.frozen_window_ms > 0);
    eprintln!("frozen window {} ms", manifest.timings.frozen_window_ms);

    // Every expected entry, in the container layout checkpointctl reads.
    let entries = archive_entries(&archive);
    for name in ["counter", "web", "shm"] {
        let dir = format!("containers/{name}");
        assert_eq!(
            entries[&format!("{dir}/checkpoint")].0,
            tar::EntryType::Directory,
            "{dir}/checkpoint must be a real directory entry"
        );
        for f in [
            "checkpoint/pstree.img",
            "checkpoint/inventory.img",
            "checkpoint/descriptors.json",
            "config.dump",
            "spec.dump",
            "status.dump",
            "bind.mounts",
            "deleted.files",
            "rootfs-diff.tar",
            "dump.log",
            "container.log",
        ] {
            assert!(
                entries.contains_key(&format!("{dir}/{f}")),
                "missing {dir}/{f}"
            );
        }
        let spec: serde_json::Value =
            serde_json::from_slice(&entries[&format!("{dir}/spec.dump")].1).unwrap();
        assert_eq!(
            spec["annotations"]["io.kubernetes.cri.container-name"],
            name
        );
    }
    for f in manifest.files.iter() {
        assert!(
            entries.contains_key(&f.path),
            "manifest lists {} but the archive lacks it",
            f.path
        );
    }

    // The counter's file in the rootfs diff is from the moment of the cut:
    // it matches the last line the counter logged before the freeze.
    let diff = &entries["containers/counter/rootfs-diff.tar"].1;
    let file_count: u64 = file_in_tar(diff, "data/counter")
        .expect("data/counter in rootfs diff")
        .trim()
        .parse()
        .unwrap();
    let frozen_at = manifest.containers[0].frozen_at_ns;
    let log = std::fs::read_to_string(pod.log_dir.join("counter.log")).unwrap();
    let last_before: u64 = log
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let ts = parts.next()?;
            let text = parts.nth(2)?;
            (rfc3339_ns(ts) < frozen_at)
                .then(|| text.strip_prefix("count ")?.parse().ok())
                .flatten()
        })
        .next_back()
        .unwrap();
    assert!(
        file_count.abs_diff(last_before) <= 1,
        "file says {file_count}, log before the cut says {last_before}"
    );
    // And the counter went on after the checkpoint.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let log = std::fs::read_to_string(pod.log_dir.join("counter.log")).unwrap();
    assert!(
        log.contains(&format!("count {}", file_count + 3)),
        "counter did not continue after thaw"
    );

    // The sandbox's /dev/shm is in the archive.
    let shm: u64 = String::from_utf8_lossy(&entries["pod/devshm/shmcount"].1)
        .trim()
        .parse()
        .unwrap();
    assert!(shm > 0);
    d.stop().await;
    eprintln!("consistent cut on {}: {:?}", rt.key(), took.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_pod_is_one_consistent_cut_containerd2() {
    checkpoint_pod_is_one_consistent_cut_on(Runtime::Containerd2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_pod_is_one_consistent_cut_containerd1() {
    checkpoint_pod_is_one_consistent_cut_on(Runtime::Containerd1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_pod_is_one_consistent_cut_crio() {
    checkpoint_pod_is_one_consistent_cut_on(Runtime::Crio).await;
}

async fn checkpoint_container_on(runtime: &str) {
    let test = format!("e2e_checkpoint::container_{runtime}");
    let Some(tb) = Testbed::get(&test) else {
        return;
    };
    let d = Daemon::start(
        &tb.path(&format!("{}_ENDPOINT", runtime.to_uppercase())),
        &["--criu", tb.var("CRIU")],
    )
    .await;
    let mut client = d.client();
    let log_dir = tempfile::tempdir().unwrap();
    let (_guard, pod_id, config) =
        run_pod(&mut client, &format!("ckpt-one-{runtime}"), log_dir.path()).await;
    let id = start_container(
        &mut client,
        &pod_id,
        &config,
        container_config("counter", tb.var("APP_IMAGE"), &["/bin/sh", "-c", COUNTER]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The kubelet's naming: checkpoint-<pod>_<namespace>-<container>-<time>.tar
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join(format!(
        "checkpoint-ckpt-one_podckpt-e2e-counter-{}.tar",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    ));
    client
        .runtime
        .checkpoint_container(CheckpointContainerRequest {
            container_id: id.clone(),
            location: location.display().to_string(),
            timeout: 60,
        })
        .await
        .unwrap();
    assert_eq!(
        container_state(&mut client, &id).await,
        ContainerState::ContainerRunning as i32
    );
    let pid = container_pid(&mut client, &id).await;
    assert_eq!(
        Freezer::for_pid(pid).unwrap().state().unwrap(),
        FreezerState::Thawed
    );

    // An uncompressed tar in checkpointctl's layout.
    let raw = std::fs::read(&location).unwrap();
    assert_eq!(&raw[257..262], b"ustar", "plain tar for a .tar location");
    let entries = archive_entries(&location);
    assert_eq!(entries["checkpoint"].0, tar::EntryType::Directory);
    for f in [
        "checkpoint/pstree.img",
        "config.dump",
        "spec.dump",
        "status.dump",
        "rootfs-diff.tar",
        "deleted.files",
        "bind.mounts",
        "dump.log",
        "container.log",
    ] {
        assert!(entries.contains_key(f), "missing {f}");
    }
    let spec: serde_json::Value = serde_json::from_slice(&entries["spec.dump"].1).unwrap();
    assert_eq!(
        spec["annotations"]["io.kubernetes.cri.container-name"],
        "counter"
    );
    assert_eq!(
        spec["annotations"]["io.kubernetes.cri.sandbox-id"],
        pod_id.as_str()
    );
    let cfg: serde_json::Value = serde_json::from_slice(&entries["config.dump"].1).unwrap();
    assert_eq!(cfg["id"], id.as_str());
    assert_eq!(cfg["rootfsImageName"], tb.var("APP_IMAGE"));
    assert_empty_except(dir.path(), &location);
    d.stop().await;
}

fn assert_empty_except(dir: &Path, keep: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != keep)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_container_containerd2() {
    checkpoint_container_on("containerd2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_container_containerd1() {
    // containerd 1.6 answers Unimplemented; through podckptd it works.
    checkpoint_container_on("containerd1").await;
}

/// Asserts a CheckpointPod fails with `code`, and leaves the pod running
/// and thawed and `out` empty.
async fn expect_failure(
    client: &mut CriClient,
    pod: &Pod,
    req: CheckpointPodRequest,
    timeout: Duration,
    code: Code,
    out: &Path,
) -> tonic::Status {
    let mut r = tonic::Request::new(req);
    r.set_timeout(timeout);
    let err = client.runtime.checkpoint_pod(r).await.unwrap_err();
    assert_eq!(err.code(), code, "{err:?}");
    assert_running_and_thawed(client, pod).await;
    assert_empty(out);
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_change_nothing() {
    let Some((tb, d, mut client)) = setup("e2e_checkpoint::bad_requests").await else {
        return;
    };
    let pod = three_container_pod(&mut client, &tb, "ckpt-bad").await;
    let other_logs = tempfile::tempdir().unwrap();
    let (_other_guard, other_id, other_cfg) =
        run_pod(&mut client, "ckpt-bad-other", other_logs.path()).await;
    let foreign = start_container(
        &mut client,
        &other_id,
        &other_cfg,
        container_config("x", tb.var("APP_IMAGE"), &["/bin/sleep", "600"]),
    )
    .await;
    let out = tempfile::tempdir().unwrap();
    let base = CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: out.path().display().to_string(),
        container_ids: pod.ids(),
        options: HashMap::new(),
    };
    let t = Duration::from_secs(60);
    let with = |f: &dyn Fn(&mut CheckpointPodRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };

    expect_failure(
        &mut client,
        &pod,
        with(&|r| r.output_path = "relative/dir".into()),
        t,
        Code::InvalidArgument,
        out.path(),
    )
    .await;
    expect_failure(
        &mut client,
        &pod,
        with(&|r| r.pod_sandbox_id = "f".repeat(64)),
        t,
        Code::NotFound,
        out.path(),
    )
    .await;
    expect_failure(
        &mut client,
        &pod,
        with(&|r| r.container_ids.push(foreign.clone())),
        t,
        Code::InvalidArgument,
        out.path(),
    )
    .await;
    expect_failure(
        &mut client,
        &pod,
        with(&|r| r.container_ids.push(r.container_ids[0].clone())),
        t,
        Code::InvalidArgument,
        out.path(),
    )
    .await;
    expect_failure(
        &mut client,
        &pod,
        with(&|r| r.container_ids.clear()),
        t,
        Code::InvalidArgument,
        out.path(),
    )
    .await;
    let e = expect_failure(
        &mut client,
        &pod,
        with(&|r| {
            r.options.insert("tcp-close".into(), "true".into());
        }),
        t,
        Code::InvalidArgument,
        out.path(),
    )
    .await;
    assert!(e.message().contains("tcp-close"), "{}", e.message());
    expect_failure(
        &mut client,
        &pod,
        with(&|r| {
            r.options.insert("compression".into(), "lzma".into());
        }),
        t,
        Code::InvalidArgument,
        out.path(),
    )
    .await;

    // Not empty.
    let full = tempfile::tempdir().unwrap();
    std::fs::write(full.path().join("precious"), "x").unwrap();
    let mut r = base.clone();
    r.output_path = full.path().display().to_string();
    let mut req = tonic::Request::new(r);
    req.set_timeout(t);
    assert_eq!(
        client.runtime.checkpoint_pod(req).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        std::fs::read_to_string(full.path().join("precious")).unwrap(),
        "x"
    );

    // A stopped container.
    client
        .runtime
        .stop_container(StopContainerRequest {
            container_id: foreign.clone(),
            timeout: 1,
        })
        .await
        .unwrap();
    let mut r = base.clone();
    r.pod_sandbox_id = other_id.clone();
    r.container_ids = vec![foreign.clone()];
    let mut req = tonic::Request::new(r);
    req.set_timeout(t);
    assert_eq!(
        client.runtime.checkpoint_pod(req).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_empty(out.path());

    // A deadline of a few ms: DeadlineExceeded (from podckptd or the
    // client's own timer), and nothing frozen or written.
    let mut req = tonic::Request::new(base.clone());
    req.set_timeout(Duration::from_millis(5));
    let err = client.runtime.checkpoint_pod(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_running_and_thawed(&mut client, &pod).await;
    assert_empty(out.path());

    // Disk full: a one-page tmpfs as output (the compressed archive of
    // three small shells is some tens of KiB).
    let tiny = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        tiny.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4k"),
    )
    .unwrap();
    let mut r = base.clone();
    r.output_path = tiny.path().display().to_string();
    let err = expect_failure(
        &mut client,
        &pod,
        r,
        t,
        Code::ResourceExhausted,
        tiny.path(),
    )
    .await;
    nix::mount::umount(tiny.path()).unwrap();
    assert!(err.message().contains("No space left"), "{}", err.message());

    // After all of that, a good request still works.
    let mut req = tonic::Request::new(base.clone());
    req.set_timeout(t);
    client.runtime.checkpoint_pod(req).await.unwrap();
    assert_running_and_thawed(&mut client, &pod).await;
    d.stop().await;
}

/// A criu stand-in: the real CRIU (so the daemon's start-up probe passes),
/// until a flag file appears; then it fails or hangs as told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn criu_failing_or_hanging_leaves_nothing() {
    let Some(tb) = Testbed::get("e2e_checkpoint::criu_failures") else {
        return;
    };
    let stand = tempfile::tempdir().unwrap();
    let (criu, flag) = criu_stand_in(stand.path(), tb.var("CRIU"), 3600);
    let staging = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &tb.path("CONTAINERD2_ENDPOINT"),
        &[
            "--criu",
            criu.to_str().unwrap(),
            "--staging-dir",
            staging.path().to_str().unwrap(),
        ],
    )
    .await;
    let mut client = d.client();
    let pod = three_container_pod(&mut client, &tb, "ckpt-criu").await;
    let out = tempfile::tempdir().unwrap();
    let req = CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: out.path().display().to_string(),
        container_ids: pod.ids(),
        options: HashMap::new(),
    };

    std::fs::write(&flag, "fail").unwrap();
    let err = expect_failure(
        &mut client,
        &pod,
        req.clone(),
        Duration::from_secs(60),
        Code::Aborted,
        out.path(),
    )
    .await;
    assert!(err.message().contains("CRIU"), "{}", err.message());
    assert_empty(staging.path());

    std::fs::write(&flag, "hang").unwrap();
    let err = expect_failure(
        &mut client,
        &pod,
        req.clone(),
        Duration::from_secs(3),
        Code::DeadlineExceeded,
        out.path(),
    )
    .await;
    assert!(err.message().contains("deadline"), "{}", err.message());
    // No stand-in left running.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "sleep 3600"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "a hung CRIU was left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
    assert_empty(staging.path());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_dump_is_undone_on_restart() {
    let _serial = GUARDIANS.lock().await;
    let Some(tb) = Testbed::get("e2e_checkpoint::killed_mid_dump") else {
        return;
    };
    let stand = tempfile::tempdir().unwrap();
    let (criu, flag) = criu_stand_in(stand.path(), tb.var("CRIU"), 3599);
    let state = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("podckpt.sock");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_podckptd"))
            .args([
                "--listen",
                sock.to_str().unwrap(),
                "--runtime-endpoint",
                tb.var("CONTAINERD2_ENDPOINT"),
            ])
            .args([
                "--criu",
                criu.to_str().unwrap(),
                "--state-dir",
                state.path().to_str().unwrap(),
            ])
            .args(["--staging-dir", staging.path().to_str().unwrap()])
            .spawn()
            .unwrap()
    };
    // Ready means answering: a SIGKILLed daemon leaves its socket file
    // behind, and podckptd serves only after it has undone what it found.
    let wait_sock = || async {
        for _ in 0..500 {
            let mut c = CriClient::new(sock.clone());
            if c.runtime.version(VersionRequest::default()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("podckptd did not start");
    };
    let mut daemon = spawn();
    wait_sock().await;
    let mut client = CriClient::new(sock.clone());
    let mut direct = CriClient::new(tb.path("CONTAINERD2_ENDPOINT"));
    let pod = three_container_pod(&mut direct, &tb, "ckpt-kill").await;
    let out = tempfile::tempdir().unwrap();
    std::fs::write(&flag, "hang").unwrap();
    let req = CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: out.path().display().to_string(),
        container_ids: pod.ids(),
        options: HashMap::new(),
    };
    let call = tokio::spawn(async move {
        client
            .runtime
            .checkpoint_pod(common::with_deadline(req))
            .await
    });
    // Wait until the pod is frozen (the stand-in hangs in the dump).
    let pid = container_pid(&mut direct, &pod.containers[0].1).await;
    let freezer = Freezer::for_pid(pid).unwrap();
    let mut frozen = false;
    for _ in 0..200 {
        if freezer.state().unwrap() == FreezerState::Frozen {
            frozen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(frozen, "the pod never froze");
    // The guardian, which would thaw the pod at podckptd's death, is
    // killed first (as the OOM killer might): the marker is what is left.
    let g = common::guardians_of(state.path());
    assert_eq!(g.len(), 1, "one guardian: {g:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(g[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let _ = call.await;
    // Still frozen: nobody undid it yet.
    assert_eq!(freezer.state().unwrap(), FreezerState::Frozen);

    std::fs::remove_file(&flag).unwrap();
    let mut daemon = spawn();
    wait_sock().await;
    assert_running_and_thawed(&mut direct, &pod).await;
    assert_empty(out.path());
    assert_empty(staging.path());
    assert_empty(&state.path().join("inflight"));
    let _ = std::process::Command::new("pkill")
        .args(["-f", "sleep 3599"])
        .status();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    daemon.wait().unwrap();
}

/// Starts a pod `name` with one memhog holding `mb` MiB (after its memory
/// is touched): a checkpoint of it takes seconds.
async fn memhog_pod(client: &mut CriClient, tb: &Testbed, name: &str, mb: u32) -> Pod {
    common::cri::remove_leftover_pods(client, name).await;
    let logs = tempfile::tempdir().unwrap();
    let log_dir = logs.path().to_path_buf();
    let (guard, id, config) = run_pod(client, name, &log_dir).await;
    let hog = start_container(
        client,
        &id,
        &config,
        ContainerConfig {
            envs: vec![KeyValue {
                key: "MEMHOG_MB".into(),
                value: mb.to_string().into(),
            }],
            ..container_config("hog", tb.var("MEMHOG_IMAGE"), &["/memhog"])
        },
    )
    .await;
    // memhog logs "count N" once its memory is allocated and touched.
    let log = log_dir.join("hog.log");
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("count ")
    {
        assert!(std::time::Instant::now() < until, "memhog never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Pod {
        _guard: guard,
        id,
        containers: vec![("hog".into(), hog)],
        _log_dir: logs,
        log_dir,
    }
}

/// The status message podckptd gives its own DeadlineExceeded (a client's
/// own timer, or a server layer enforcing grpc-timeout, says otherwise).
const OWN_DEADLINE: &str = "podckptd: deadline exceeded";

/// CheckpointPod with deadlines of 50, 500 and 1500 ms on a pod whose
/// checkpoint takes longer: podckptd answers DeadlineExceeded itself,
/// before the caller's deadline, and what the cancelled checkpoint did is
/// undone even where the undo outlives the answer: no archive and no
/// temporary file in output_path (also not from a checkpoint that
/// completes after the answer), nothing frozen, no staging dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_is_answered_before_it_passes_and_everything_is_undone() {
    let _serial = GUARDIANS.lock().await;
    let Some(tb) = Testbed::get("e2e_checkpoint::deadline") else {
        return;
    };
    let staging = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &tb.path("CONTAINERD2_ENDPOINT"),
        &[
            "--criu",
            tb.var("CRIU"),
            "--staging-dir",
            staging.path().to_str().unwrap(),
        ],
    )
    .await;
    let mut client = d.client();
    let pod = memhog_pod(&mut client, &tb, "ckpt-deadline", 1024).await;
    let mut answers = vec![];
    for ms in [50u64, 500, 1500] {
        let out = tempfile::tempdir().unwrap();
        let limit = Duration::from_millis(ms);
        let mut req = tonic::Request::new(CheckpointPodRequest {
            pod_sandbox_id: pod.id.clone(),
            output_path: out.path().display().to_string(),
            container_ids: pod.ids(),
            options: HashMap::new(),
        });
        req.set_timeout(limit);
        let started = std::time::Instant::now();
        // The client sets no timer of its own (tonic only sends the
        // header); the outer bound only keeps a broken daemon from
        // hanging the test.
        let result = tokio::time::timeout(
            limit + Duration::from_secs(30),
            client.runtime.checkpoint_pod(req),
        )
        .await
        .expect("no answer at all");
        let took = started.elapsed();
        eprintln!("CheckpointPod with a {ms} ms deadline answered after {took:?}");
        let err = result.expect_err("a 1 GiB checkpoint within the deadline");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{ms} ms: {err:?}");
        assert!(err.message().starts_with(OWN_DEADLINE), "{ms} ms: {err:?}");
        assert!(took < limit, "{ms} ms: answered after {took:?}");
        answers.push((ms, took));
        // The undo may outlive the answer; it must finish.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_empty(out.path());
        assert_empty(staging.path());
        assert_running_and_thawed(&mut client, &pod).await;
    }
    eprintln!("deadline answers: {answers:?}");
    d.stop().await;
}

/// CheckpointPod and RestorePod without a deadline are refused with
/// InvalidArgument before anything is done (both runtime implementations
/// refuse them; the kubelet always sets one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_deadline_are_refused() {
    let Some((tb, d, mut client)) = setup("e2e_checkpoint::no_deadline").await else {
        return;
    };
    let pod = three_container_pod(&mut client, &tb, "ckpt-nodeadline").await;
    let out = tempfile::tempdir().unwrap();
    let err = client
        .runtime
        .checkpoint_pod(CheckpointPodRequest {
            pod_sandbox_id: pod.id.clone(),
            output_path: out.path().display().to_string(),
            container_ids: pod.ids(),
            options: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("deadline"), "{err:?}");
    assert_running_and_thawed(&mut client, &pod).await;
    assert_empty(out.path());

    // RestorePod: a request that would otherwise get as far as the
    // archive (which is not there: NotFound with a deadline).
    let logs = tempfile::tempdir().unwrap();
    let req = RestorePodRequest {
        checkpoint_path: out.path().join("absent").display().to_string(),
        config: Some(common::cri::pod_config("ckpt-nodeadline-r", logs.path())),
        container_configs: vec![container_config("c", tb.var("APP_IMAGE"), &["/bin/sh"])],
        ..Default::default()
    };
    let err = client.runtime.restore_pod(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("deadline"), "{err:?}");
    let err = client
        .runtime
        .restore_pod(common::with_deadline(req))
        .await
        .unwrap_err();
    assert_ne!(
        err.code(),
        Code::InvalidArgument,
        "with a deadline: {err:?}"
    );
    d.stop().await;
}
