//! End to end: RestorePod and StartContainer bring a checkpointed pod back
//! with its memory, on a real containerd with real CRIU, runc behind
//! podckpt-runc; and every bad restore leaves nothing behind.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::archive_file;
use common::cri::{container_config, exec, remove_leftover_pods, run_pod, PodGuard};
use common::pod3::{three_container_pod, three_container_pod_on};
use common::runtime::Runtime;
use common::setup;
use common::testbed::Testbed;
use common::Daemon;
use podckpt::archive::manifest::PodManifest;
use podckpt::cri::api::*;
use podckpt::cri::client::CriClient;
use podckpt::restore::wrapper::DEFAULT_RESTORE_DIR;
use tonic::Code;

/// The tests share the node's restore dir (podckpt-runc reads it from
/// containerd's environment) and check it is left clean: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Checkpoints `pod_id` into a new temp dir; returns it and the manifest.
async fn checkpoint(
    client: &mut CriClient,
    pod_id: &str,
    ids: Vec<String>,
) -> (tempfile::TempDir, PodManifest) {
    let out = tempfile::tempdir().unwrap();
    let mut req = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: pod_id.into(),
        output_path: out.path().display().to_string(),
        container_ids: ids,
        options: HashMap::new(),
    });
    req.set_timeout(Duration::from_secs(120));
    client.runtime.checkpoint_pod(req).await.unwrap();
    let manifest =
        podckpt::archive::reader::read_manifest(&out.path().join("pod.tar.zst")).unwrap();
    (out, manifest)
}

/// The counter (rootfs file) and /dev/shm counter values in a pod archive
/// of the three-container pod: where a restore must continue from.
fn counts_at_cut(archive: &Path) -> (u64, u64) {
    let read = |name: &str, inner: Option<&str>| -> u64 {
        archive_file(archive, name, inner)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (
        read("containers/counter/rootfs-diff.tar", Some("data/counter")),
        read("pod/devshm/shmcount", None),
    )
}

/// A RestorePod request for a new pod `name` on containerd 2.1 from the
/// manifest's configs.
fn restore_request(
    checkpoint: &Path,
    manifest: &PodManifest,
    name: &str,
    log_dir: &Path,
) -> RestorePodRequest {
    restore_request_on(Runtime::Containerd2, checkpoint, manifest, name, log_dir)
}

/// A RestorePod request for a new pod `name` on `rt` from the manifest's
/// configs. The hostname stays the checkpoint's: RestorePod refuses another.
fn restore_request_on(
    rt: Runtime,
    checkpoint: &Path,
    manifest: &PodManifest,
    name: &str,
    log_dir: &Path,
) -> RestorePodRequest {
    let mut config = rt.pod_config(name, log_dir);
    if let Some(recorded) = &manifest.sandbox.config {
        config.hostname = recorded.hostname.clone();
    }
    RestorePodRequest {
        checkpoint_path: checkpoint.display().to_string(),
        config: Some(config),
        runtime_handler: String::new(),
        options: HashMap::new(),
        container_configs: manifest
            .containers
            .iter()
            .map(|c| c.config.clone().unwrap())
            .collect(),
    }
}

async fn restore(
    client: &mut CriClient,
    req: RestorePodRequest,
) -> Result<RestorePodResponse, tonic::Status> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(120));
    client.runtime.restore_pod(r).await.map(|r| r.into_inner())
}

async fn state(client: &mut CriClient, id: &str) -> i32 {
    common::cri::container_state(client, id).await
}

async fn pod_ip(client: &mut CriClient, id: &str) -> String {
    client
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .network
        .unwrap()
        .ip
}

/// GET / from the pod's web server (only to the test bed's own pod IP).
fn http_get(ip: &str) -> String {
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse().unwrap();
    let mut last = None;
    for _ in 0..50 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                return body;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr} does not answer: {last:?}");
}

/// The counts a container logged, in order (CRI log lines: `ts stream tag text`).
fn logged_counts(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.splitn(4, ' ')
                .nth(3)?
                .strip_prefix("count ")?
                .parse()
                .ok()
        })
        .collect()
}

/// What this node's restore dir holds (registrations and work dirs).
fn restore_dir_entries() -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    for sub in ["registrations", "work"] {
        if let Ok(rd) = std::fs::read_dir(Path::new(DEFAULT_RESTORE_DIR).join(sub)) {
            out.extend(
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| !p.ends_with(".lock")),
            );
        }
    }
    out
}

async fn sandboxes_named(client: &mut CriClient, name: &str) -> usize {
    let filter = PodSandboxFilter {
        label_selector: HashMap::from([(common::cri::TEST_LABEL.to_string(), name.to_string())]),
        ..Default::default()
    };
    client
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .len()
}

/// Starts every restored container and checks it comes back where the
/// checkpoint left it.
async fn start_and_check(
    client: &mut CriClient,
    resp: &RestorePodResponse,
    log_dir: &Path,
    cut: u64,
    shm_cut: u64,
) {
    let id = |name: &str| {
        resp.restored_containers
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .container_id
            .clone()
    };
    for c in &resp.restored_containers {
        assert_eq!(
            state(client, &c.container_id).await,
            ContainerState::ContainerCreated as i32,
            "{} must be CREATED",
            c.name
        );
    }
    // The contract: a restored container has not executed the restored
    // process before StartContainer. CRI-O runs the OCI create, and with it
    // CRIU's restore, inside CreateContainer: the counter ran from there
    // until podckpt-runc had CRIU leave the processes stopped.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let early = logged_counts(&log_dir.join("counter.log"));
    assert!(
        early.is_empty(),
        "the restored counter ran before StartContainer: {early:?}"
    );
    for c in &resp.restored_containers {
        client
            .runtime
            .start_container(StartContainerRequest {
                container_id: c.container_id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("start {}: {e:?}", c.name));
    }
    for c in &resp.restored_containers {
        assert_eq!(
            state(client, &c.container_id).await,
            ContainerState::ContainerRunning as i32,
            "{} not running",
            c.name
        );
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Counters continue from the cut, not from 1: in the log...
    let counts = logged_counts(&log_dir.join("counter.log"));
    assert!(!counts.is_empty(), "the restored counter logs nothing");
    assert!(
        counts[0] > cut && counts[0] <= cut + 3,
        "first count after restore {} (cut at {cut})",
        counts[0]
    );
    // ...and in its rootfs file, read through exec.
    let in_file: u64 = exec(client, &id("counter"), &["cat", "/data/counter"])
        .await
        .parse()
        .unwrap();
    assert!(in_file > cut, "rootfs counter {in_file} (cut at {cut})");
    // /dev/shm came back and its writer continued.
    let shm: u64 = exec(client, &id("shm"), &["cat", "/dev/shm/shmcount"])
        .await
        .parse()
        .unwrap();
    assert!(shm > shm_cut, "shm counter {shm} (cut at {shm_cut})");
    exec(client, &id("web"), &["true"]).await;
}

/// A pod checkpointed on `rt`, removed, and restored as a new pod on the
/// same runtime continues from the cut.
async fn restored_pod_continues_from_the_cut_on(rt: Runtime) {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = rt.setup("e2e_restore::continues").await else {
        return;
    };
    let took = std::time::Instant::now();
    let before = restore_dir_entries();
    let orig = format!("rst-orig-{}", rt.key());
    let new = format!("rst-new-{}", rt.key());
    let pod = three_container_pod_on(rt, &mut client, &tb, &orig).await;
    let (out, manifest) = checkpoint(&mut client, &pod.id, pod.ids()).await;
    let archive = out.path().join("pod.tar.zst");
    let (cut, shm_cut) = counts_at_cut(&archive);
    let old_ip = pod_ip(&mut client, &pod.id).await;
    // The original goes away (a migration, or a preemption).
    drop(pod);

    let log_dir = tempfile::tempdir().unwrap();
    remove_leftover_pods(&mut client, &new).await;
    let started = std::time::Instant::now();
    let resp = restore(
        &mut client,
        restore_request_on(rt, out.path(), &manifest, &new, log_dir.path()),
    )
    .await
    .unwrap_or_else(|e| panic!("RestorePod on {}: {e:?}", rt.key()));
    eprintln!("RestorePod took {:?}", started.elapsed());
    let _guard = PodGuard {
        client: client.clone(),
        id: resp.pod_sandbox_id.clone(),
    };
    let names: Vec<_> = resp
        .restored_containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["counter", "web", "shm"]);
    start_and_check(&mut client, &resp, log_dir.path(), cut, shm_cut).await;

    // The TCP server answers at the NEW pod IP.
    let ip = pod_ip(&mut client, &resp.pod_sandbox_id).await;
    eprintln!("old ip {old_ip}, new ip {ip}");
    assert!(http_get(&ip).contains("podckpt"));
    // The checkpoint is untouched.
    assert_eq!(
        podckpt::archive::reader::read_manifest(&archive).unwrap(),
        manifest
    );

    // Stop and remove work on restored containers; registrations and
    // extracted files are gone.
    for c in &resp.restored_containers {
        client
            .runtime
            .stop_container(StopContainerRequest {
                container_id: c.container_id.clone(),
                timeout: 2,
            })
            .await
            .unwrap();
        client
            .runtime
            .remove_container(RemoveContainerRequest {
                container_id: c.container_id.clone(),
            })
            .await
            .unwrap();
    }
    drop(_guard);
    let left: HashSet<_> = restore_dir_entries().difference(&before).cloned().collect();
    assert!(left.is_empty(), "restore dir not clean: {left:?}");
    d.stop().await;
    eprintln!("continues on {}: {:?}", rt.key(), took.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_pod_continues_from_the_cut_containerd2() {
    restored_pod_continues_from_the_cut_on(Runtime::Containerd2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_pod_continues_from_the_cut_containerd1() {
    restored_pod_continues_from_the_cut_on(Runtime::Containerd1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_pod_continues_from_the_cut_crio() {
    restored_pod_continues_from_the_cut_on(Runtime::Crio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clones_beside_the_running_original() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_restore::clones").await else {
        return;
    };
    let pod = three_container_pod(&mut client, &tb, "rst-clone-orig").await;
    let (out, manifest) = checkpoint(&mut client, &pod.id, pod.ids()).await;
    let archive = out.path().join("pod.tar.zst");
    let (cut, shm_cut) = counts_at_cut(&archive);
    // Restore twice from the archive file itself, while the original runs.
    let mut guards = vec![];
    let mut log_dirs = vec![];
    for name in ["rst-clone-a", "rst-clone-b"] {
        let log_dir = tempfile::tempdir().unwrap();
        remove_leftover_pods(&mut client, name).await;
        let resp = restore(
            &mut client,
            restore_request(&archive, &manifest, name, log_dir.path()),
        )
        .await
        .unwrap();
        guards.push(PodGuard {
            client: client.clone(),
            id: resp.pod_sandbox_id.clone(),
        });
        start_and_check(&mut client, &resp, log_dir.path(), cut, shm_cut).await;
        let ip = pod_ip(&mut client, &resp.pod_sandbox_id).await;
        assert!(http_get(&ip).contains("podckpt"));
        log_dirs.push(log_dir);
    }
    // The original still runs.
    for (name, id) in &pod.containers {
        assert_eq!(
            state(&mut client, id).await,
            ContainerState::ContainerRunning as i32,
            "original {name}"
        );
    }
    drop(guards);
    drop(pod);
    d.stop().await;
}

/// podckpt-runc's log from byte `offset` on.
fn runc_log_since(log: &Path, offset: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_restore_continues_and_frees_its_images() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_restore::lazy").await else {
        return;
    };
    let before = restore_dir_entries();
    let runc_log = tb.path("RUNC_WRAPPER_LOG");
    let log_offset = std::fs::metadata(&runc_log).map(|m| m.len()).unwrap_or(0);
    let pod = three_container_pod(&mut client, &tb, "rst-lazy-orig").await;
    let (out, manifest) = checkpoint(&mut client, &pod.id, pod.ids()).await;
    let (cut, shm_cut) = counts_at_cut(&out.path().join("pod.tar.zst"));
    drop(pod);

    let log_dir = tempfile::tempdir().unwrap();
    remove_leftover_pods(&mut client, "rst-lazy").await;
    let req = restore_request(out.path(), &manifest, "rst-lazy", log_dir.path());
    let resp = restore(&mut client, lazily(req)).await.unwrap();
    let _guard = PodGuard {
        client: client.clone(),
        id: resp.pod_sandbox_id.clone(),
    };
    // Counters in memory go on from the cut: the pages were served.
    start_and_check(&mut client, &resp, log_dir.path(), cut, shm_cut).await;
    let ip = pod_ip(&mut client, &resp.pod_sandbox_id).await;
    assert!(http_get(&ip).contains("podckpt"));

    // Each container was restored lazily (not by the eager fallback), and
    // each daemon finished and its supervisor removed the images.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = runc_log_since(&runc_log, log_offset);
        let lazily = log.matches("(memory filling lazily)").count();
        let served = log.matches("lazy pages all served").count();
        assert!(
            !log.contains("restoring eagerly") && !log.contains("criu lazy-pages ended with"),
            "a lazy restore failed over or its daemon failed:\n{log}"
        );
        if lazily == 3 && served == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lazily restored {lazily}/3, served {served}/3 after 60 s:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let images_left: Vec<_> = restore_dir_entries()
        .difference(&before)
        .filter_map(|work| std::fs::read_dir(work.join("containers")).ok())
        .flat_map(|rd| rd.filter_map(Result::ok))
        .map(|c| c.path().join("checkpoint"))
        .filter(|images| images.exists())
        .collect();
    assert!(images_left.is_empty(), "images not freed: {images_left:?}");
    // No daemon outlives its fill.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "criu lazy-pages"])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "lazy-pages daemons left: {:?}", ps);
    // Memory is still right after the fill: the counters go on.
    let later = logged_counts(&log_dir.path().join("counter.log"));
    assert!(later.windows(2).all(|w| w[1] == w[0] + 1), "{later:?}");

    drop(_guard);
    let left: HashSet<_> = restore_dir_entries().difference(&before).cloned().collect();
    assert!(left.is_empty(), "restore dir not clean: {left:?}");
    d.stop().await;
}

/// The messages a container logged that start with `prefix`.
fn logged(log: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .filter(|m| m.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// A request asking for lazy-pages.
fn lazily(mut req: RestorePodRequest) -> RestorePodRequest {
    req.options
        .insert("lazy-pages".to_string(), "true".to_string());
    req
}

/// Runs a pod `name` of one memhog holding `mb` MiB until it has logged
/// `counts` counts, checkpoints it and removes it.
async fn checkpointed_memhog(
    client: &mut CriClient,
    tb: &Testbed,
    name: &str,
    mb: u32,
    counts: usize,
) -> (tempfile::TempDir, PodManifest) {
    let log_dir = tempfile::tempdir().unwrap();
    let (guard, id, config) = run_pod(client, name, log_dir.path()).await;
    let hog = common::cri::start_container(
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
    let log = log_dir.path().join("hog.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while logged(&log, "count ").len() < counts {
        assert!(std::time::Instant::now() < deadline, "memhog never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checkpointed = checkpoint(client, &id, vec![hog]).await;
    drop(guard);
    checkpointed
}

/// RestorePod of a one-container checkpoint (after removing pods left
/// with the request's name), then StartContainer: the pod's guard and the
/// container's id.
async fn restore_and_start_one(
    client: &mut CriClient,
    req: RestorePodRequest,
) -> (PodGuard, String) {
    let name = req
        .config
        .as_ref()
        .unwrap()
        .metadata
        .as_ref()
        .unwrap()
        .name
        .clone();
    remove_leftover_pods(client, &name).await;
    let resp = restore(client, req).await.unwrap();
    let guard = PodGuard {
        client: client.clone(),
        id: resp.pod_sandbox_id.clone(),
    };
    let id = resp.restored_containers[0].container_id.clone();
    client
        .runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    (guard, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_comes_back_word_for_word_eagerly_and_lazily() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_restore::memory").await else {
        return;
    };
    // memhog checks all of its 64 MiB on SIGUSR1: the generated words and
    // the flip of one word per count.
    let (out, manifest) = checkpointed_memhog(&mut client, &tb, "rst-mem-orig", 64, 2).await;

    for lazy in [false, true] {
        let name = if lazy {
            "rst-mem-lazy"
        } else {
            "rst-mem-eager"
        };
        let log_dir = tempfile::tempdir().unwrap();
        let req = restore_request(out.path(), &manifest, name, log_dir.path());
        let req = if lazy { lazily(req) } else { req };
        let (_guard, hog) = restore_and_start_one(&mut client, req).await;
        // At once, while a lazy fill may still run, and again after.
        let log = log_dir.path().join("hog.log");
        for round in 1..=2 {
            exec(&mut client, &hog, &["killall", "-USR1", "memhog"]).await;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let verdicts = loop {
                let v = logged(&log, "verify ");
                if v.len() >= round {
                    break v;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name}: no verdict from memhog; it logged {:?}",
                    logged(&log, "")
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let verdict = &verdicts[round - 1];
            assert!(verdict.starts_with("verify ok "), "{name}: {verdict}");
            eprintln!("{name}: {verdict}");
        }
        assert!(
            logged(&log, "ready ").is_empty(),
            "{name}: memhog started afresh instead of being restored"
        );
    }
    d.stop().await;
}

/// Wraps the real `criu lazy-pages` and kills it as soon as podckpt-runc
/// says the restore is done (memhog's 512 MiB take far longer to fill), as
/// a daemon that dies mid-fill. argv[1] is the real CRIU.
const DYING_LAZY_DAEMON: &str = r#"
import os, subprocess, sys, time
real, args = sys.argv[1], sys.argv[2:]
status = int(args[args.index("--status-fd") + 1])
log = os.environ["PODCKPT_RUNC_LOG"]
start = os.path.getsize(log) if os.path.exists(log) else 0
p = subprocess.Popen([real] + args, pass_fds=(status,))
os.close(status)
while p.poll() is None:
    with open(log, "rb") as f:
        f.seek(start)
        if b"(memory filling lazily)" in f.read():
            p.kill()
            break
    time.sleep(0.005)
code = p.wait()
sys.exit(code if code >= 0 else 1)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_fill_that_fails_stops_the_container() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, _)) = setup("e2e_restore::lazy_fails").await else {
        return;
    };
    // podckpt-runc's CRIU (the runtime's PODCKPT_CRIU on the test node) is
    // the real one, except for lazy-pages: the test bed's root-only
    // override directory (the guard removes the stand-in again).
    let stand = tempfile::tempdir().unwrap();
    let fake = stand.path().join("dying-lazy.py");
    std::fs::write(&fake, DYING_LAZY_DAEMON).unwrap();
    let over = tb.path("RUNC_CRIU_OVERRIDE").join("lazy-pages");
    std::fs::write(
        &over,
        format!(
            "#!/bin/sh\nexec python3 {} {real} \"$@\"\n",
            fake.display(),
            real = tb.var("CRIU")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&over, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _over = Remove(over);
    let mut client = d.client();
    let before = restore_dir_entries();
    let runc_log = tb.path("RUNC_WRAPPER_LOG");
    let log_offset = std::fs::metadata(&runc_log).map(|m| m.len()).unwrap_or(0);

    let (out, manifest) = checkpointed_memhog(&mut client, &tb, "rst-lazyfail-orig", 512, 1).await;
    let logs = tempfile::tempdir().unwrap();
    let req = restore_request(out.path(), &manifest, "rst-lazyfail", logs.path());
    let (guard, hog) = restore_and_start_one(&mut client, lazily(req)).await;
    // The daemon dies mid-fill: the container must not go on with zeros
    // where its memory was not back yet; it is killed and exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while state(&mut client, &hog).await != ContainerState::ContainerExited as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "the container still runs after its fill failed:\n{}",
            runc_log_since(&runc_log, log_offset)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = runc_log_since(&runc_log, log_offset);
    assert!(log.contains("(memory filling lazily)"), "{log}");
    assert!(log.contains("criu lazy-pages ended with"), "{log}");
    assert!(log.contains("killed the container's process"), "{log}");
    drop(guard);
    let left: HashSet<_> = restore_dir_entries().difference(&before).cloned().collect();
    assert!(left.is_empty(), "restore dir not clean: {left:?}");
    d.stop().await;
}

/// Re-packs a pod archive, letting `edit` change the entry list.
fn repack(src: &Path, dest: &Path, edit: impl Fn(&mut Vec<(tar::Header, Vec<u8>)>)) {
    let mut entries = vec![];
    let mut ar = podckpt::archive::reader::open_tar(src).unwrap();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut data = vec![];
        e.read_to_end(&mut data).unwrap();
        entries.push((h, data));
    }
    edit(&mut entries);
    let f = std::fs::File::create(dest).unwrap();
    let mut b = tar::Builder::new(zstd::Encoder::new(f, 1).unwrap().auto_finish());
    for (mut h, data) in entries {
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
}

fn raw_header(name: &str, kind: tar::EntryType, size: usize, link: Option<&str>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size as u64);
    h.set_mode(0o600);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        h.set_link_name(l).unwrap();
    }
    h.set_cksum();
    h
}

/// Restores that must fail, on `rt`: each leaves no sandbox and nothing in
/// the restore dir. With `deadlines`, also restores cut short by their
/// deadline.
async fn bad_restores_leave_nothing_on(rt: Runtime) {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = rt.setup("e2e_restore::bad").await else {
        return;
    };
    let took = std::time::Instant::now();
    let pod =
        three_container_pod_on(rt, &mut client, &tb, &format!("rst-bad-orig-{}", rt.key())).await;
    let (out, manifest) = checkpoint(&mut client, &pod.id, pod.ids()).await;
    drop(pod);
    let archive = out.path().join("pod.tar.zst");
    let before = restore_dir_entries();
    let log_dir = tempfile::tempdir().unwrap();
    let name = &format!("rst-bad-new-{}", rt.key());
    remove_leftover_pods(&mut client, name).await;
    let base = restore_request_on(rt, out.path(), &manifest, name, log_dir.path());
    let bad = tempfile::tempdir().unwrap();

    let mut cases: Vec<(&str, RestorePodRequest, Code)> = vec![];
    let mut r = base.clone();
    r.checkpoint_path = "relative/dir".into();
    cases.push(("relative path", r, Code::InvalidArgument));
    let mut r = base.clone();
    r.checkpoint_path = bad.path().join("nothing-here").display().to_string();
    cases.push(("missing path", r, Code::NotFound));
    let mut r = base.clone();
    r.container_configs.pop();
    cases.push(("missing name", r, Code::InvalidArgument));
    let mut r = base.clone();
    let mut extra = r.container_configs[0].clone();
    extra.metadata.as_mut().unwrap().name = "extra".into();
    r.container_configs.push(extra);
    cases.push(("extra name", r, Code::InvalidArgument));
    let mut r = base.clone();
    r.options.insert("tcp-close".into(), "true".into());
    cases.push(("unknown option", r, Code::InvalidArgument));
    let mut r = base.clone();
    r.runtime_handler = "no-such-handler".into();
    // containerd 1.6 does not list its handlers in Status, so podckptd
    // cannot call one unknown; the request is refused all the same, as
    // unlike the checkpoint's handler ("").
    let code = match rt {
        Runtime::Containerd1 => Code::FailedPrecondition,
        _ => Code::InvalidArgument,
    };
    cases.push(("unknown handler", r, code));
    let mut r = base.clone();
    r.container_configs[1].image.as_mut().unwrap().image = "localhost/podckpt/absent:test".into();
    cases.push(("not the checkpoint's image", r, Code::FailedPrecondition));
    // The runtime refuses one container (a device that is not there: a
    // restore-time setting, not compared with the checkpoint) while its
    // siblings are created beside it: they go too.
    let mut r = base.clone();
    match rt {
        // CRI-O 1.36 creates a container whose device is absent on the
        // host; it refuses a memory limit below its minimum instead.
        Runtime::Crio => {
            r.container_configs[1]
                .linux
                .get_or_insert_with(Default::default)
                .resources
                .get_or_insert_with(Default::default)
                .memory_limit_in_bytes = 1;
        }
        _ => r.container_configs[1].devices.push(Device {
            container_path: "/dev/podckpt-absent".into(),
            host_path: "/dev/podckpt-absent".into(),
            permissions: "rw".into(),
        }),
    }
    cases.push(("CreateContainer refused", r, Code::Unknown));

    // Truncated archive.
    let truncated = bad.path().join("truncated.tar.zst");
    let data = std::fs::read(&archive).unwrap();
    std::fs::write(&truncated, &data[..data.len() / 2]).unwrap();
    let mut r = base.clone();
    r.checkpoint_path = truncated.display().to_string();
    cases.push(("truncated archive", r, Code::DataLoss));
    // An entry climbing out with `..`.
    let dotdot = bad.path().join("dotdot.tar.zst");
    repack(&archive, &dotdot, |e| {
        e.push((
            raw_header("containers/../../evil", tar::EntryType::Regular, 1, None),
            vec![b'x'],
        ))
    });
    let mut r = base.clone();
    r.checkpoint_path = dotdot.display().to_string();
    cases.push(("`..` entry", r, Code::InvalidArgument));
    // A symlink escaping.
    let link = bad.path().join("link.tar.zst");
    repack(&archive, &link, |e| {
        e.insert(
            1,
            (
                raw_header(
                    "containers/counter/checkpoint/escape",
                    tar::EntryType::Symlink,
                    0,
                    Some("/etc"),
                ),
                vec![],
            ),
        )
    });
    let mut r = base.clone();
    r.checkpoint_path = link.display().to_string();
    cases.push(("escaping symlink", r, Code::InvalidArgument));
    // A CRIU image whose content differs from what the manifest recorded.
    let corrupt = bad.path().join("corrupt.tar.zst");
    repack(&archive, &corrupt, |e| {
        let (_, data) = e
            .iter_mut()
            .find(|(h, _)| {
                h.path()
                    .unwrap()
                    .to_string_lossy()
                    .ends_with("/checkpoint/inventory.img")
            })
            .unwrap();
        data.push(0);
    });
    let mut r = base.clone();
    r.checkpoint_path = corrupt.display().to_string();
    cases.push(("corrupted CRIU image", r, Code::InvalidArgument));

    for (what, req, code) in cases {
        let err = match restore(&mut client, req).await {
            Ok(resp) => {
                let _g = PodGuard {
                    client: client.clone(),
                    id: resp.pod_sandbox_id,
                };
                panic!("{what}: restored");
            }
            Err(e) => e,
        };
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert_eq!(
            sandboxes_named(&mut client, name).await,
            0,
            "{what}: a sandbox was left"
        );
        assert_eq!(
            restore_dir_entries(),
            before,
            "{what}: restore dir not clean"
        );
        if what == "not the checkpoint's image" {
            assert!(
                err.message().contains("localhost/podckpt/absent:test"),
                "{}",
                err.message()
            );
        }
        eprintln!("{what}: {:?} {}", err.code(), err.message());
    }
    // The archive and its directory are untouched.
    assert_eq!(std::fs::read(&archive).unwrap(), data);

    // A deadline expiring mid-restore: nothing left either.
    for ms in [20u64, 300, 1500] {
        let mut r = tonic::Request::new(base.clone());
        r.set_timeout(Duration::from_millis(ms));
        match client.runtime.restore_pod(r).await {
            Ok(resp) => {
                // Fast enough: then it must be whole. Remove it.
                let _g = PodGuard {
                    client: client.clone(),
                    id: resp.into_inner().pod_sandbox_id,
                };
            }
            Err(e) => assert!(
                matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{ms} ms: {e:?}"
            ),
        }
        // The answer may come before the undo has finished (a sandbox
        // being created when the deadline neared is removed once it
        // exists): it must finish.
        let until = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let sandboxes = sandboxes_named(&mut client, name).await;
            let left: HashSet<_> = restore_dir_entries().difference(&before).cloned().collect();
            if sandboxes == 0 && left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "{ms} ms deadline left {sandboxes} sandboxes and {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    d.stop().await;
    eprintln!("bad restores on {}: {:?}", rt.key(), took.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_restores_leave_nothing_containerd2() {
    bad_restores_leave_nothing_on(Runtime::Containerd2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_restores_leave_nothing_containerd1() {
    bad_restores_leave_nothing_on(Runtime::Containerd1).await;
}

/// On CRI-O the undo once took 30 s (its RemoveContainer waits 10 s for
/// each restored process to stop) and the deadline cases left the
/// sandbox behind that long: they are run here too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_restores_leave_nothing_crio() {
    bad_restores_leave_nothing_on(Runtime::Crio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd21_container_archive_restored_on_containerd16_through_create_container() {
    let _serial = SERIAL.lock().await;
    let Some(tb) = Testbed::get("e2e_restore::create_from_archive") else {
        return;
    };
    // containerd 2.1 checkpoints a counter with its own CheckpointContainer.
    let mut direct2 = CriClient::new(tb.path("CONTAINERD2_ENDPOINT"));
    let src_logs = tempfile::tempdir().unwrap();
    let (src_guard, src_pod, src_cfg) =
        common::cri::run_pod(&mut direct2, "rst-cc-src", src_logs.path()).await;
    let counter = common::cri::container_config(
        "counter",
        tb.var("APP_IMAGE"),
        &["/bin/sh", "-c", common::pod3::COUNTER],
    );
    let cid = common::cri::start_container(&mut direct2, &src_pod, &src_cfg, counter.clone()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("checkpoint-counter.tar");
    direct2
        .runtime
        .checkpoint_container(CheckpointContainerRequest {
            container_id: cid,
            location: location.display().to_string(),
            timeout: 60,
        })
        .await
        .expect("containerd 2.1 CheckpointContainer");
    let cut: u64 = archive_file(&location, "rootfs-diff.tar", Some("data/counter"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop(src_guard);

    let mut from_archive = counter.clone();
    from_archive.image.as_mut().unwrap().image = location.display().to_string();
    let before = restore_dir_entries();

    // Off by default: the call reaches the runtime as it is (containerd 1.6
    // has no such image) and podckptd restores nothing.
    let off = Daemon::start(
        &tb.path("CONTAINERD1_ENDPOINT"),
        &["--criu", tb.var("CRIU")],
    )
    .await;
    let mut client = off.client();
    let logs = tempfile::tempdir().unwrap();
    let (guard, pod, cfg) = common::cri::run_pod(&mut client, "rst-cc-off", logs.path()).await;
    let err = client
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(from_archive.clone()),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .expect_err("CreateContainer from an archive served without --allow-create-from-archive");
    assert!(!err.message().contains("podckptd"), "{err:?}");
    assert_eq!(restore_dir_entries(), before, "something was extracted");
    drop(guard);
    off.stop().await;

    // With the setting, podckptd in front of containerd 1.6 creates it
    // from the archive.
    let d = Daemon::start(
        &tb.path("CONTAINERD1_ENDPOINT"),
        &[
            "--criu",
            tb.var("CRIU"),
            "--allow-create-from-archive",
            "true",
        ],
    )
    .await;
    let mut client = d.client();
    let logs = tempfile::tempdir().unwrap();
    let (guard, pod, cfg) = common::cri::run_pod(&mut client, "rst-cc-dst", logs.path()).await;
    let id = client
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(from_archive),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .expect("CreateContainer from a checkpoint archive")
        .into_inner()
        .container_id;
    assert_eq!(
        state(&mut client, &id).await,
        ContainerState::ContainerCreated as i32
    );
    client
        .runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("start restores");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        state(&mut client, &id).await,
        ContainerState::ContainerRunning as i32
    );
    let counts = logged_counts(&logs.path().join("counter.log"));
    assert!(
        !counts.is_empty() && counts[0] > cut,
        "counts after restore {counts:?}, cut at {cut}"
    );
    let in_file: u64 = exec(&mut client, &id, &["cat", "/data/counter"])
        .await
        .parse()
        .unwrap();
    assert!(in_file > cut);
    // An ordinary CreateContainer through the same podckptd is untouched.
    let plain = common::cri::start_container(
        &mut client,
        &pod,
        &cfg,
        common::cri::container_config("plain", tb.var("APP_IMAGE"), &["/bin/sleep", "600"]),
    )
    .await;
    assert_eq!(
        state(&mut client, &plain).await,
        ContainerState::ContainerRunning as i32
    );
    drop(guard);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left: HashSet<_> = restore_dir_entries().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left {left:?}");
    d.stop().await;
}

/// Overwrites a registered container's CRIU inventory with zeros, once its
/// extraction wrote all of it.
async fn corrupt_inventory(container_id: &str, manifest: &PodManifest) {
    let reg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(DEFAULT_RESTORE_DIR)
                .join("registrations")
                .join(format!("{container_id}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = PathBuf::from(reg["container_dir"].as_str().unwrap());
    let work = PathBuf::from(reg["work_dir"].as_str().unwrap());
    let rel = dir.strip_prefix(&work).unwrap().display().to_string();
    let size = manifest
        .files
        .iter()
        .find(|f| f.path == format!("{rel}/checkpoint/inventory.img"))
        .unwrap()
        .size;
    let inventory = dir.join("checkpoint/inventory.img");
    for _ in 0..600 {
        if std::fs::metadata(&inventory).is_ok_and(|m| m.len() == size) {
            std::fs::write(&inventory, vec![0u8; size as usize]).unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never extracted", inventory.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn criu_restore_failing_fails_the_start_and_leaves_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(tb) = Testbed::get("e2e_restore::criu_fails") else {
        return;
    };
    let d = Daemon::start(
        &tb.path("CONTAINERD2_ENDPOINT"),
        &["--criu", tb.var("CRIU")],
    )
    .await;
    let mut client = d.client();
    let pod = three_container_pod(&mut client, &tb, "rst-criufail-orig").await;
    let (out, manifest) = checkpoint(&mut client, &pod.id, pod.ids()).await;
    drop(pod);
    let before = restore_dir_entries();
    let logs = tempfile::tempdir().unwrap();
    remove_leftover_pods(&mut client, "rst-criufail").await;
    let resp = restore(
        &mut client,
        restore_request(out.path(), &manifest, "rst-criufail", logs.path()),
    )
    .await
    .unwrap();
    let guard = PodGuard {
        client: client.clone(),
        id: resp.pod_sandbox_id.clone(),
    };
    let first = &resp.restored_containers[0];
    // podckpt-runc's CRIU comes from the runtime's configuration, not from
    // podckptd: make CRIU's restore fail by damaging the first container's
    // inventory once it is extracted (before its start).
    corrupt_inventory(&first.container_id, &manifest).await;
    let err = client
        .runtime
        .start_container(StartContainerRequest {
            container_id: first.container_id.clone(),
        })
        .await
        .expect_err("a failing CRIU must fail the start");
    assert!(err.message().contains("restore"), "{}", err.message());
    assert_ne!(
        state(&mut client, &first.container_id).await,
        ContainerState::ContainerRunning as i32
    );
    // The caller removes the pod; nothing of the restore is left.
    drop(guard);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let left: HashSet<_> = restore_dir_entries().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left {left:?}");
    d.stop().await;
}

/// An archive damaged inside its compressed data (its length and footer
/// intact, as after a bad disk block) is caught by the frames' checksums
/// while it is extracted: either RestorePod itself fails (the damage was
/// reached before it answered) or the start of the container whose files
/// are damaged fails, saying so. Either way nothing is left once the pod
/// is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_frames_fail_the_restore_and_leave_nothing() {
    let _serial = SERIAL.lock().await;
    let Some((_tb, d, mut client)) = setup("e2e_restore::damaged").await else {
        return;
    };
    let pod = three_container_pod(&mut client, &_tb, "rst-dmg-orig").await;
    let (out, manifest) = checkpoint(&mut client, &pod.id, pod.ids()).await;
    drop(pod);
    let archive = out.path().join("pod.tar.zst");
    let damaged_dir = tempfile::tempdir().unwrap();
    let mut data = std::fs::read(&archive).unwrap();
    let at = data.len() * 2 / 3;
    data[at] ^= 0xff;
    std::fs::write(damaged_dir.path().join("pod.tar.zst"), &data).unwrap();
    let before = restore_dir_entries();
    let logs = tempfile::tempdir().unwrap();
    remove_leftover_pods(&mut client, "rst-dmg").await;
    let req = restore_request(damaged_dir.path(), &manifest, "rst-dmg", logs.path());
    match restore(&mut client, req).await {
        Err(e) => {
            eprintln!("RestorePod refused the damaged archive: {e:?}");
            assert_eq!(e.code(), Code::DataLoss, "{e:?}");
            assert_eq!(sandboxes_named(&mut client, "rst-dmg").await, 0);
        }
        Ok(resp) => {
            let guard = PodGuard {
                client: client.clone(),
                id: resp.pod_sandbox_id.clone(),
            };
            let mut failed = None;
            for c in &resp.restored_containers {
                if let Err(e) = client
                    .runtime
                    .start_container(StartContainerRequest {
                        container_id: c.container_id.clone(),
                    })
                    .await
                {
                    failed = Some((c.name.clone(), e));
                    break;
                }
            }
            let (name, err) = failed.expect("a container restored from damaged files");
            eprintln!("{name} did not start: {}", err.message());
            assert!(
                err.message().contains("extracting the checkpoint failed")
                    && err.message().contains("damaged"),
                "{name}: {}",
                err.message()
            );
            drop(guard);
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    let left: HashSet<_> = restore_dir_entries().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left {left:?}");
    d.stop().await;
}

/// RestorePod refuses, with FailedPrecondition naming the field, the
/// container and both values, a request that does not describe the
/// checkpointed pod (another image, another environment, another
/// hostname), and InvalidArgument for two configs of one name; nothing is
/// created before the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_unlike_the_checkpoint_are_refused_before_anything_is_created() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_restore::mismatch").await else {
        return;
    };
    let pod = three_container_pod(&mut client, &tb, "rst-mismatch-orig").await;
    let (out, manifest) = checkpoint(&mut client, &pod.id, pod.ids()).await;
    drop(pod);
    let before = restore_dir_entries();
    let containers_before = common::cri::container_count(&mut client).await;
    let log_dir = tempfile::tempdir().unwrap();
    let name = "rst-mismatch-new";
    remove_leftover_pods(&mut client, name).await;
    let base = restore_request(out.path(), &manifest, name, log_dir.path());
    let other_image = tb.var("MEMHOG_IMAGE");

    let mut cases: Vec<(&str, RestorePodRequest, Code, Vec<&str>)> = vec![];
    let mut r = base.clone();
    r.container_configs[0].image.as_mut().unwrap().image = other_image.into();
    cases.push((
        "image",
        r,
        Code::FailedPrecondition,
        vec!["container counter", "image", other_image],
    ));
    let mut r = base.clone();
    r.container_configs[1].envs.push(KeyValue {
        key: "PODCKPT_EXTRA".into(),
        value: "added".into(),
    });
    cases.push((
        "env",
        r,
        Code::FailedPrecondition,
        vec![
            "container web",
            "envs[\"PODCKPT_EXTRA\"]",
            "a value of 5 bytes",
            "unset",
        ],
    ));
    let mut r = base.clone();
    r.config.as_mut().unwrap().hostname = "rst-other-host".into();
    cases.push((
        "hostname",
        r,
        Code::FailedPrecondition,
        vec![
            "sandbox",
            "hostname",
            "\"rst-other-host\"",
            "\"rst-mismatch-orig\"",
        ],
    ));
    let mut r = base.clone();
    let twice = r.container_configs[0].clone();
    r.container_configs.push(twice);
    cases.push((
        "a name twice",
        r,
        Code::InvalidArgument,
        vec!["\"counter\" twice"],
    ));

    for (what, req, code, says) in cases {
        let err = match restore(&mut client, req).await {
            Ok(resp) => {
                let _g = PodGuard {
                    client: client.clone(),
                    id: resp.pod_sandbox_id,
                };
                panic!("{what}: restored");
            }
            Err(e) => e,
        };
        eprintln!("{what}: {:?} {}", err.code(), err.message());
        assert_eq!(err.code(), code, "{what}: {err:?}");
        for s in says {
            assert!(
                err.message().contains(s),
                "{what}: {s:?} not in {}",
                err.message()
            );
        }
        assert_eq!(
            sandboxes_named(&mut client, name).await,
            0,
            "{what}: a sandbox"
        );
        assert_eq!(
            common::cri::container_count(&mut client).await,
            containers_before,
            "{what}: a container"
        );
        assert_eq!(
            restore_dir_entries(),
            before,
            "{what}: restore dir not clean"
        );
    }
    d.stop().await;
}

/// RestorePod with deadlines of 50, 500 and 1500 ms: podckptd answers
/// DeadlineExceeded itself before the caller's deadline (500 ms and more
/// may be enough to restore: then the pod must be whole), and no sandbox,
/// container or restore file is left, even where the undo outlives the
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_deadline_is_answered_before_it_passes_and_leaves_nothing() {
    let _serial = SERIAL.lock().await;
    let Some((tb, d, mut client)) = setup("e2e_restore::deadline").await else {
        return;
    };
    let (out, manifest) = checkpointed_memhog(&mut client, &tb, "rst-deadline-orig", 256, 1).await;
    let before = restore_dir_entries();
    let containers_before = common::cri::container_count(&mut client).await;
    let log_dir = tempfile::tempdir().unwrap();
    let name = "rst-deadline-new";
    remove_leftover_pods(&mut client, name).await;
    let base = restore_request(out.path(), &manifest, name, log_dir.path());
    let mut answers = vec![];
    for ms in [50u64, 500, 1500] {
        let limit = Duration::from_millis(ms);
        let mut r = tonic::Request::new(base.clone());
        r.set_timeout(limit);
        let started = std::time::Instant::now();
        // tonic sets no timer of its own: the answer is the server's.
        let result = tokio::time::timeout(
            limit + Duration::from_secs(30),
            client.runtime.restore_pod(r),
        )
        .await
        .expect("no answer at all");
        let took = started.elapsed();
        eprintln!(
            "RestorePod with a {ms} ms deadline answered after {took:?}: {:?}",
            result.as_ref().map(|_| ()).map_err(|e| e.code())
        );
        answers.push((ms, took));
        match result {
            // A restore fast enough (the extraction goes on after the
            // answer) may succeed: then it is whole. 50 ms is never enough.
            Ok(resp) if ms > 50 => {
                let resp = resp.into_inner();
                assert_eq!(resp.restored_containers.len(), 1);
                let _g = PodGuard {
                    client: client.clone(),
                    id: resp.pod_sandbox_id,
                };
            }
            Ok(_) => panic!("{ms} ms: restored within the deadline"),
            Err(err) => {
                assert_eq!(err.code(), Code::DeadlineExceeded, "{ms} ms: {err:?}");
                assert!(
                    err.message().starts_with("podckptd: deadline exceeded"),
                    "{ms} ms: {err:?}"
                );
            }
        }
        assert!(took < limit, "{ms} ms: answered after {took:?}");
        // The undo may outlive the answer; it must finish.
        let until = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let sandboxes = sandboxes_named(&mut client, name).await;
            let containers = common::cri::container_count(&mut client).await;
            let files: HashSet<_> = restore_dir_entries()
                .symmetric_difference(&before)
                .cloned()
                .collect();
            if sandboxes == 0 && containers == containers_before && files.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "{ms} ms: left {sandboxes} sandboxes, {containers} containers (before: {containers_before}), restore files changed: {files:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!("restore deadline answers: {answers:?}");
    d.stop().await;
}
