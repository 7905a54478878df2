//! The DaemonSet's pod on the test node, run through containerd 2.1's CRI
//! as the kubelet would run it (scripts/e2e_deploy.sh says each step): the
//! image from scripts/build_podckpt_image.sh imported with `ctr images
//! import`, the pod installing podckpt onto a host directory with the
//! runtime's real drop-in and a real containerd restart, podckptd serving
//! in front of containerd, a second install changing nothing, and the
//! uninstall mode leaving the host as it was. And the installer's drop-ins
//! for the runtimes the pod does not run on here, containerd 1.6 and CRI-O,
//! checked against each runtime's own merged config
//! (scripts/e2e_installer_configs.sh).
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use common::testbed::Testbed;

/// Both tests build the same image archive: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binaries the suite built (the release profile, beside this test).
fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf()
}

#[test]
fn installer_drop_ins_on_containerd1_and_crio() {
    let Some(tb) = Testbed::get("installer_drop_ins_on_containerd1_and_crio") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let status = Command::new(repo().join("scripts/e2e_installer_configs.sh"))
        .env("CRIO_BIN", tb.var("CRIO_BIN"))
        .env("PODCKPT_BIN_DIR", bin_dir())
        .env("PODCKPT_IMAGE", bin_dir().join("podckpt-image.tar"))
        .status()
        .expect("run scripts/e2e_installer_configs.sh");
    assert!(
        status.success(),
        "scripts/e2e_installer_configs.sh failed: {status}"
    );
}

#[test]
fn daemonset_pod_installs_serves_and_uninstalls() {
    let Some(tb) = Testbed::get("daemonset_pod_installs_serves_and_uninstalls") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (repo, bin_dir) = (repo(), bin_dir());
    let mut cmd = Command::new(repo.join("scripts/e2e_deploy.sh"));
    for key in [
        "CRICTL",
        "CTR2",
        "CONTAINERD2_BIN",
        "KUBECTL",
        "VALIDATE_PYTHON",
        "IMAGES_DIR",
    ] {
        cmd.env(key, tb.var(key));
    }
    let status = cmd
        .env("PODCKPT_BIN_DIR", &bin_dir)
        .env("PODCKPT_IMAGE", bin_dir.join("podckpt-image.tar"))
        .status()
        .expect("run scripts/e2e_deploy.sh");
    assert!(status.success(), "scripts/e2e_deploy.sh failed: {status}");
}
