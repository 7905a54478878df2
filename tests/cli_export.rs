//! `podckpt export` on pod archives built here with the library's writer:
//! no daemon, no root, no CRIU. (The archives of a real CheckpointPod, read
//! back by the real checkpointctl, are tests/e2e_checkpointctl.rs.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use podckpt::archive::manifest::{
    ContainerEntry, FileEntry, PodManifest, MANIFEST, POD_ARCHIVE_ZSTD, POD_FORMAT,
    POD_FORMAT_VERSION,
};
use podckpt::archive::{ArchiveWriter, Compression};

fn podckpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_podckpt"))
        .args(args)
        // Export must not need the daemon: point the endpoint nowhere.
        .env("PODCKPT_ENDPOINT", "/nonexistent/podckpt.sock")
        .output()
        .expect("run podckpt")
}

/// The files of one container, in the container checkpoint layout.
fn files(name: &str) -> Vec<(String, Vec<u8>)> {
    let config = serde_json::json!({
        "id": format!("{name}-0123456789abcdef"),
        "name": name,
        "rootfsImageName": "localhost/podckpt/app:test",
        "runtime": "io.containerd.runc.v2",
    });
    let spec = serde_json::json!({
        "process": { "args": ["sh", "-c", "sleep 1000"] },
        "annotations": { "io.kubernetes.cri.container-name": name },
    });
    vec![
        ("checkpoint/pages-1.img".into(), vec![7u8; 3 << 20]),
        ("config.dump".into(), serde_json::to_vec(&config).unwrap()),
        ("spec.dump".into(), serde_json::to_vec(&spec).unwrap()),
        ("stats-dump".into(), vec![1, 2, 3]),
    ]
}

/// A zstd pod archive of containers `names` in `dir`, its manifest listing
/// every file.
fn write_pod_archive(dir: &Path, names: &[&str]) {
    let mut listed = vec![];
    for n in names {
        for (p, data) in files(n) {
            listed.push(FileEntry {
                path: format!("containers/{n}/{p}"),
                size: data.len() as u64,
            });
        }
    }
    let manifest = PodManifest {
        format: POD_FORMAT.into(),
        version: POD_FORMAT_VERSION,
        containers: names
            .iter()
            .map(|n| ContainerEntry {
                name: n.to_string(),
                id: format!("{n}-0123456789abcdef"),
                dir: format!("containers/{n}"),
                ..Default::default()
            })
            .collect(),
        files: listed,
        ..Default::default()
    };
    let mut w = ArchiveWriter::create(
        &dir.join(POD_ARCHIVE_ZSTD),
        Compression::Zstd {
            level: 1,
            workers: 0,
        },
    )
    .unwrap();
    w.append_bytes(MANIFEST, &serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    for n in names {
        w.end_frame().unwrap();
        w.append_dir_entry(&format!("containers/{n}/checkpoint"))
            .unwrap();
        for (p, data) in files(n) {
            w.append_bytes(&format!("containers/{n}/{p}"), &data)
                .unwrap();
        }
    }
    w.finish().unwrap();
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn export_writes_container_archives_that_inspect_reads() {
    let dir = tempfile::tempdir().unwrap();
    write_pod_archive(dir.path(), &["app", "side"]);
    let out = dir.path().join("out");
    let r = podckpt(&[
        "export",
        dir.path().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("app\t") && stdout.contains("side\t"),
        "{stdout}"
    );
    assert_eq!(names_in(&out), ["app.tar", "side.tar"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&out.join("app.tar")), 0o600);

    // A plain tar with the container's files at its top level.
    let tar = out.join("side.tar");
    let raw = std::fs::read(&tar).unwrap();
    assert_eq!(&raw[257..262], b"ustar");
    let mut ar = tar::Archive::new(&raw[..]);
    let mut got: Vec<(String, u64)> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path().unwrap().display().to_string(), e.size())
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("checkpoint".to_string(), 0),
            ("checkpoint/pages-1.img".into(), 3 << 20),
            ("config.dump".into(), files("side")[1].1.len() as u64),
            ("spec.dump".into(), files("side")[2].1.len() as u64),
            ("stats-dump".into(), 3),
        ]
    );
    // podckpt's own inspect reads it as a container archive.
    let r = podckpt(&["inspect", tar.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("side"),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
}

#[test]
fn an_unknown_container_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_pod_archive(dir.path(), &["app"]);
    let out = dir.path().join("out");
    let r = podckpt(&[
        "export",
        dir.path().join(POD_ARCHIVE_ZSTD).to_str().unwrap(),
        "-c",
        "app",
        "-c",
        "nosuch",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("no container named \"nosuch\""), "{err}");
    // The directory it made for the export is gone again.
    assert!(!out.exists());

    // A link as the output directory is refused.
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let r = podckpt(&[
        "export",
        dir.path().to_str().unwrap(),
        "-o",
        link.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(names_in(&real).is_empty());
}
