//! `podckpt health` against the real podckptd binary, each failing part in
//! turn: podckptd down (exit 3), CRIU unusable (a --criu that does not
//! work: exit 5), the runtime behind a running podckptd down (exit 4).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_runtime::{Fake, FakeRuntime};

const DAEMON: &str = env!("CARGO_BIN_EXE_podckptd");
const CLI: &str = env!("CARGO_BIN_EXE_podckpt");

fn health(sock: &Path) -> (i32, String) {
    let out = Command::new(CLI)
        .args([
            "--endpoint",
            &sock.display().to_string(),
            "health",
            "--timeout",
            "3s",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn each_failing_part_has_its_exit_code_and_reason() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: podckptd's trusted directories need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/podckpt.sock");
    let (code, text) = health(&sock);
    assert_eq!(code, 3, "podckptd down: {text}");
    assert!(text.contains("podckptd:"), "{text}");

    let rt = FakeRuntime::start(&dir.path().join("rt.sock"), Fake::default()).await;
    let mut daemon = Command::new(DAEMON)
        .args(["--listen", &sock.display().to_string()])
        .args(["--runtime-endpoint", &rt.path.display().to_string()])
        .args([
            "--state-dir",
            &dir.path().join("state").display().to_string(),
        ])
        .args([
            "--restore-dir",
            &dir.path().join("restore").display().to_string(),
        ])
        .args(["--criu", "/bin/false"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, text) = tokio::task::spawn_blocking({
        let sock = sock.clone();
        move || health(&sock)
    })
    .await
    .unwrap();
    assert_eq!(code, 5, "CRIU unusable: {text}");
    assert!(text.contains("CRIU:"), "{text}");

    rt.kill().await;
    let (code, text) = tokio::task::spawn_blocking({
        let sock = sock.clone();
        move || health(&sock)
    })
    .await
    .unwrap();
    assert_eq!(code, 4, "runtime down: {text}");
    assert!(
        text.contains("runtime:") && text.contains("rt.sock"),
        "{text}"
    );

    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
