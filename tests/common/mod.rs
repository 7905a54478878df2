//! Shared harness for the black-box tests: podckptd run in-process on a
//! temporary socket, a fake upstream runtime, and the real test bed.
#![allow(dead_code)]

pub mod cri;
pub mod crio;
pub mod fake_runtime;
pub mod h2raw;
pub mod pod3;
pub mod runtime;
pub mod testbed;

use std::path::{Path, PathBuf};

use clap::Parser;
use podckpt::config::DaemonConfig;
use podckpt::cri::client::CriClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// `msg` as a request with a deadline: CheckpointPod and RestorePod refuse
/// calls without one (InvalidArgument), as the contract has the caller set
/// one. Long enough for any test's pod.
pub fn with_deadline<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(std::time::Duration::from_secs(120));
    r
}

/// With `PODCKPT_TEST_LOG` set to a tracing filter (e.g.
/// `podckpt::proxy=debug,h2=trace`), the in-process daemon and the
/// test's own clients log to stderr: what to turn on when a test hangs.
/// Unset, nothing is installed and the tests run as they always do.
pub fn trace_if_asked() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if let Ok(filter) = std::env::var("PODCKPT_TEST_LOG") {
        ONCE.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .with_thread_names(true)
                .try_init();
        });
    }
}

/// One gRPC call made with a raw HTTP/2 client, so the test controls every
/// header (tonic's client would enforce a timeout itself and hide what the
/// server answered). Returns the grpc-status and grpc-message, from the
/// trailers or, for a trailers-only answer, the headers.
pub async fn raw_grpc_call(
    socket: &Path,
    path: &str,
    headers: &[(&str, &str)],
    message: &impl prost::Message,
) -> (String, String) {
    use http_body_util::BodyExt;
    let io = hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let payload = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    let mut req = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |k: &str| {
        trailers
            .get(k)
            .or_else(|| parts.headers.get(k))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

/// podckptd running inside the test process.
pub struct Daemon {
    pub socket: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), podckpt::daemon::DaemonError>>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts podckptd in front of the runtime socket at `runtime`.
    pub async fn start(runtime: &Path, extra: &[&str]) -> Self {
        trace_if_asked();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("podckpt.sock");
        let mut args = vec![
            "podckptd".to_string(),
            "--listen".into(),
            socket.display().to_string(),
            "--runtime-endpoint".into(),
            runtime.display().to_string(),
            "--state-dir".into(),
            dir.path().join("state").display().to_string(),
            "--shutdown-grace".into(),
            "3s".into(),
            // In-process: /proc/self/exe is the test binary, not podckptd.
            "--guardian-exe".into(),
            env!("CARGO_BIN_EXE_podckptd").into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = DaemonConfig::try_parse_from(args)
            .unwrap()
            .validate()
            .unwrap();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(podckpt::daemon::run(config, async {
            let _ = rx.await;
        }));
        // The socket appears once bound.
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(
            socket.exists(),
            "podckptd did not bind {}",
            socket.display()
        );
        Self {
            socket,
            shutdown: Some(tx),
            handle: Some(handle),
            _dir: dir,
        }
    }

    pub fn client(&self) -> CriClient {
        CriClient::new(self.socket.clone())
    }

    /// Triggers shutdown and waits for the daemon to return.
    pub async fn stop(mut self) {
        self.begin_stop();
        self.join().await;
    }

    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A CRIU that fails or hangs on demand. `hang_secs` tells the tests'
/// hanging stand-ins apart: each test kills and looks for only its own
/// (`sleep <hang_secs>`), since the tests run side by side.
pub fn criu_stand_in(dir: &Path, real: &str, hang_secs: u32) -> (PathBuf, PathBuf) {
    let flag = dir.join("mode");
    let script = dir.join("criu");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nmode=$(cat {flag} 2>/dev/null)\ncase \"$mode\" in\n  fail) echo 'stand-in: failing' >&2; exit 1;;\n  hang) exec sleep {hang_secs};;\nesac\nexec {real} \"$@\"\n",
            flag = flag.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, flag)
}

/// The test bed and a podckptd (with the test bed's CRIU) in front of its
/// containerd 2.1, or None when the test skips.
pub async fn setup(
    test: &str,
) -> Option<(testbed::Testbed, Daemon, podckpt::cri::client::CriClient)> {
    let tb = testbed::Testbed::get(test)?;
    let d = Daemon::start(
        &tb.path("CONTAINERD2_ENDPOINT"),
        &["--criu", tb.var("CRIU")],
    )
    .await;
    let client = d.client();
    Some((tb, d, client))
}

/// A small file inside the archive (or inside a tar inside it).
pub fn archive_file(archive: &Path, name: &str, inner: Option<&str>) -> Option<String> {
    use std::io::Read;
    let mut ar = podckpt::archive::reader::open_tar(archive).unwrap();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() != name {
            continue;
        }
        let mut data = vec![];
        e.read_to_end(&mut data).unwrap();
        let Some(inner) = inner else {
            return Some(String::from_utf8_lossy(&data).into_owned());
        };
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &data).unwrap();
        let mut t = tar::Archive::new(
            podckpt::node::rootfs_diff::open_maybe_compressed(tmp.path()).unwrap(),
        );
        for f in t.entries().unwrap() {
            let mut f = f.unwrap();
            if f.path().unwrap().to_string_lossy().trim_start_matches("./") == inner {
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                return Some(s);
            }
        }
        return None;
    }
    None
}

/// Pids of the checkpoint guardians on the node (podckpt::pod::guardian).
#[allow(dead_code)]
/// The guardians of the podckptd whose state dir is `state_dir` (other
/// tests checkpoint beside this one).
pub fn guardians_of(state_dir: &Path) -> Vec<i32> {
    let prefix = state_dir.as_os_str().as_encoded_bytes();
    guardians()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.split(|b| *b == 0).any(|a| a.starts_with(prefix)))
        })
        .collect()
}

pub fn guardians() -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if cmd
                .split(|b| *b == 0)
                .any(|a| a == podckpt::pod::guardian::GUARDIAN_ARG.as_bytes())
            {
                out.push(pid);
            }
        }
    }
    out
}
