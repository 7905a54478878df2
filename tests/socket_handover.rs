//! Socket activation: the test plays systemd's part (a listening socket it
//! keeps, handed to podckptd as descriptor 3 with LISTEN_PID and
//! LISTEN_FDS), restarts podckptd while a client calls Version in a loop,
//! each call on a new connection as crictl makes them, and checks that no
//! call fails: connections made while no podckptd runs wait in the
//! socket's backlog for the next one. Prints the longest wait.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_runtime::{Fake, FakeRuntime};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use podckpt::cri::api::VersionRequest;
use podckpt::cri::client::CriClient;

const BIN: &str = env!("CARGO_BIN_EXE_podckptd");

/// Starts podckptd as systemd would: `fd` as descriptor 3, LISTEN_PID set
/// to podckptd's own pid (the shell's, which `exec` keeps).
fn activated(fd: RawFd, dir: &Path, runtime: &Path) -> Child {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(BIN)
        .arg("--listen")
        .arg(dir.join("podckpt.sock"))
        .arg("--runtime-endpoint")
        .arg(runtime)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--restore-dir")
        .arg(dir.join("restore"))
        .arg("--criu")
        .arg("/nonexistent/criu")
        .arg("--shutdown-grace")
        .arg("5s")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("podckptd.log")).unwrap(),
        ));
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && nix::libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::fcntl::fcntl(
                std::os::fd::BorrowedFd::borrow_raw(3),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_socket_activation_lose_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::start(&dir.path().join("rt.sock"), Fake::default()).await;
    let socket = dir.path().join("podckpt.sock");
    // systemd's socket: it outlives every podckptd.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let mut daemon = activated(fd, dir.path(), &rt.path);

    let caller = {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut waits = Vec::new();
            let mut failed = Vec::new();
            let end = Instant::now() + Duration::from_secs(8);
            while Instant::now() < end {
                let t = Instant::now();
                let mut c = CriClient::new(socket.clone());
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.runtime.version(VersionRequest::default()),
                )
                .await;
                waits.push(t.elapsed());
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => failed.push(format!("{}: {}", e.code(), e.message())),
                    Err(_) => failed.push("no answer within its 5 s deadline".into()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (waits, failed)
        })
    };

    for restart in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // systemctl restart: SIGTERM, wait for the exit, start again.
        kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
        let status = tokio::task::spawn_blocking(move || daemon.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(
            status.success(),
            "restart {restart}: podckptd exited with {status}"
        );
        assert!(socket.exists(), "podckptd removed systemd's socket");
        daemon = activated(fd, dir.path(), &rt.path);
    }
    let (mut waits, failed) = caller.await.unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    waits.sort();
    let longest = waits.last().copied().unwrap_or_default();
    println!(
        "socket handover: {} calls over 3 restarts, {} failed, longest wait {:?} (target: 0 failed, ≤ 1 s)",
        waits.len(),
        failed.len(),
        longest
    );
    assert!(
        failed.is_empty(),
        "calls failed across restarts: {failed:?}"
    );
    assert!(waits.len() > 100, "only {} calls made", waits.len());
    drop(listener);
}

#[tokio::test]
async fn a_passed_descriptor_that_is_not_a_listening_socket_stops_podckptd() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("not-a-socket")).unwrap();
    let mut daemon = activated(file.as_raw_fd(), dir.path(), &dir.path().join("rt.sock"));
    let status = daemon.wait().unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("podckptd.log")).unwrap();
    assert!(log.contains("socket activation"), "{log}");
    assert!(
        !dir.path().join("podckpt.sock").exists(),
        "podckptd bound a socket of its own"
    );
}
