//! The podckptd binary as an operator runs it: start, refuse a second
//! instance on the same socket, reject bad configuration, stop on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_runtime::{Fake, FakeRuntime};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_podckptd");

fn wait_for(path: &std::path::Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn runs_refuses_a_second_instance_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::start(&dir.path().join("rt.sock"), Fake::default()).await;
    let sock = dir.path().join("run/podckpt.sock");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "--listen".to_string(),
            sock.display().to_string(),
            "--runtime-endpoint".into(),
            format!("unix://{}", rt.path.display()),
            "--log-format".into(),
            "json".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut first = Command::new(BIN)
        .args(args(&[]))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);

    let mut client = podckpt::cri::client::CriClient::new(sock.clone());
    let v = client
        .runtime
        .version(podckpt::cri::api::VersionRequest::default())
        .await
        .unwrap();
    assert_eq!(v.into_inner().runtime_name, "fake");

    let second = Command::new(BIN).args(args(&[])).output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another running podckptd"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&first.id().to_string()),
        "names the owner's pid: {stderr}"
    );
    // The refused start left the live socket alone.
    client
        .runtime
        .version(podckpt::cri::api::VersionRequest::default())
        .await
        .unwrap();

    let stopping = Instant::now();
    kill(Pid::from_raw(first.id() as i32), Signal::SIGTERM).unwrap();
    // Wait off the runtime: the still-connected client must keep running to
    // answer the server's GOAWAY, as a real kubelet would.
    let (status, mut first) = tokio::task::spawn_blocking(move || (first.wait().unwrap(), first))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        stopping.elapsed()
    );
    assert!(!sock.exists(), "socket removed on SIGTERM");
    let mut log = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.lines().any(|l| l.contains("SIGTERM received")), "{log}");
    assert!(log.lines().all(|l| l.starts_with('{')), "JSON logs: {log}");
}

#[test]
fn bad_configuration_is_rejected_with_a_clear_message() {
    let out = Command::new(BIN)
        .args(["--listen", "relative.sock", "--runtime-endpoint", "/x.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen") && stderr.contains("absolute"),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .env("PODCKPT_RUNTIME_ENDPOINT", "tcp://10.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only unix sockets"));
}

#[test]
fn help_explains_each_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--runtime-endpoint",
        "--connect-timeout",
        "--shutdown-grace",
        "--state-dir",
        "--log-format",
        "--log",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

/// A configuration file in a private temp dir (0700, ours: trusted).
fn config_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("podckptd.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, path)
}

/// podckptd run with `args` and `--config path` (and no PODCKPT_CONFIG).
fn with_config(path: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(path)
        .env_remove("PODCKPT_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn a_bad_config_file_stops_podckptd_naming_its_line() {
    // An unknown key on line 3.
    let (_dir, path) = config_file("log-format = \"json\"\n\nmax-paralel-dumps = 2\n");
    let out = with_config(&path, &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3:", path.display())) && stderr.contains("max-paralel-dumps"),
        "{stderr}"
    );

    // A TOML syntax error on line 2, the file named through the environment.
    let (_dir, path) = config_file("log-format = \"json\"\nmax-parallel-dumps = = 2\n");
    let out = Command::new(BIN)
        .env("PODCKPT_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2:", path.display())),
        "{stderr}"
    );

    // A value the file sets goes through the same checks as the flag.
    let (_dir, path) = config_file("listen = \"relative.sock\"\nruntime-endpoint = \"/x.sock\"\n");
    let out = with_config(&path, &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen") && stderr.contains("absolute"),
        "{stderr}"
    );
    // ...and a flag overrides it.
    let out = with_config(&path, &["--listen", "other.sock"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("other.sock"), "{stderr}");

    // A file others may write to is refused, by path, without its content.
    let (_dir, path) = config_file("log-format = \"json\"\n");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = with_config(&path, &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&path.display().to_string()) && !stderr.contains("json"),
        "{stderr}"
    );
}

#[test]
fn help_documents_the_config_file() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for text in [
        "--config",
        "/etc/podckpt/podckptd.toml",
        "Precedence: flags > environment",
        "max-parallel-dumps = 2",
        "--metrics-max-connections",
    ] {
        assert!(help.contains(text), "--help lacks {text}:\n{help}");
    }
}

#[test]
fn check_config_reports_what_would_be_used_and_creates_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let restore = work.path().join("restore");
    let listen = work.path().join("podckptd.sock");
    let runtime = work.path().join("runtime.sock");
    let (_dir, path) = config_file(&format!(
        "state-dir = {state:?}\nrestore-dir = {restore:?}\nlisten = {listen:?}\nruntime-endpoint = {runtime:?}\nmetrics-listen = \"127.0.0.1:9464\"\n"
    ));
    let out = with_config(&path, &["--check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for want in [
        format!("config file: {}", path.display()),
        format!("state-dir: {} (missing; would be created", state.display()),
        format!(
            "restore-dir: {} (missing; would be created",
            restore.display()
        ),
        format!("runtime: {} (not there now", runtime.display()),
        "metrics: http://127.0.0.1:9464/metrics".to_string(),
        "podckptd: configuration OK".to_string(),
    ] {
        assert!(stdout.contains(&want), "no {want:?} in:\n{stdout}");
    }
    // A check only: no directory, no socket.
    assert!(!state.exists() && !restore.exists() && !listen.exists());

    // A state dir others may write to stops it, naming the setting.
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = with_config(&path, &["--check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--state-dir") && stderr.contains(&state.display().to_string()),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("configuration OK"));

    // A bad value is reported as at start.
    let out = with_config(&path, &["--check-config", "--listen", "relative.sock"]);
    assert_eq!(out.status.code(), Some(2));

    // It is a command-line flag, not a setting of the file.
    let (_dir, path) = config_file("log-format = \"json\"\ncheck-config = true\n");
    let out = with_config(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:", path.display())) && stderr.contains("check-config"),
        "{stderr}"
    );
}
