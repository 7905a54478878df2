//! The DaemonSet's pod on the test node, run through containerd 2.1's CRI
//! as the kubelet would run it (scripts/e2e_deploy.sh says each step): the
//! image from scripts/build_podckpt_image.sh imported with `ctr images
//! import`, the pod installing podckpt onto a host directory with the
//! runtime's real drop-in and a real containerd restart, podckptd serving
//! in front of containerd, a second install changing nothing, and the
//! uninstall mode leaving the host as it was.
//!
//! Needs root and the test bed (`scripts/testbed.sh up`); skips without
//! them unless PODCKPT_E2E=1, where it fails instead.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::testbed::Testbed;

#[test]
fn daemonset_pod_installs_serves_and_uninstalls() {
    let Some(tb) = Testbed::get("daemonset_pod_installs_serves_and_uninstalls") else {
        return;
    };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // The binaries the suite built (the release profile, beside this test).
    let bin_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
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
