//! deploy/ validated offline: both kustomizations (install and uninstall)
//! render with Debian 12's kubectl and every object passes the Kubernetes
//! API's schema strictly (scripts/validate_manifests.sh); a copy of deploy/
//! with one wrong field, or a kustomization naming a missing file, fails.
//!
//! The tools come from `scripts/testbed.sh up` (or `manifest-tools`): skips
//! without root and the test bed unless PODCKPT_E2E=1, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::testbed::Testbed;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn validate(tb: &Testbed, deploy: &Path) -> Output {
    Command::new(repo().join("scripts/validate_manifests.sh"))
        .arg(deploy)
        .env("KUBECTL", tb.var("KUBECTL"))
        .env("KUBERNETES_VALIDATE", tb.var("KUBERNETES_VALIDATE"))
        .output()
        .expect("run scripts/validate_manifests.sh")
}

/// A copy of deploy/ with `edit` applied to one of its files.
fn broken_copy(file: &str, edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(repo().join("deploy/."))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let path = dir.path().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let changed = edit(&text);
    assert_ne!(text, changed, "the edit must change {file}");
    std::fs::write(&path, changed).unwrap();
    dir
}

#[test]
fn deploy_manifests_validate() {
    let Some(tb) = Testbed::get("deploy_manifests_validate") else {
        return;
    };
    let out = validate(&tb, &repo().join("deploy"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy/ does not validate:\n{stderr}");
    // Both kustomizations, every object.
    assert!(stderr.contains("deploy: 5 objects valid"), "{stderr}");
    assert!(stderr.contains("uninstall: 5 objects valid"), "{stderr}");
}

#[test]
fn a_wrong_field_fails_validation() {
    let Some(tb) = Testbed::get("a_wrong_field_fails_validation") else {
        return;
    };
    // A misspelt field (the API has hostPID).
    let dir = broken_copy("base/daemonset.yaml", |t| {
        t.replace("hostPID: true", "hostPid: true")
    });
    let out = validate(&tb, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a misspelt field passed:\n{stderr}");
    assert!(
        stderr.contains("hostPid"),
        "the error names the field: {stderr}"
    );

    // A wrong type (an object where the API wants a number or a percentage).
    let dir = broken_copy("base/daemonset.yaml", |t| {
        t.replace("      maxUnavailable: 1", "      maxUnavailable: {}")
    });
    let out = validate(&tb, dir.path());
    assert!(
        !out.status.success(),
        "a wrongly typed field passed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A misspelt field in the uninstall mode's patch: only the uninstall
    // rendering has it.
    let dir = broken_copy("uninstall/uninstall-mode.yaml", |t| {
        t.replace("value: uninstall", "valeu: uninstall")
    });
    let out = validate(&tb, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stray patch passed:\n{stderr}");
    assert!(stderr.contains("uninstall does not validate"), "{stderr}");

    // A kustomization naming a file that is not there.
    let dir = broken_copy("base/kustomization.yaml", |t| {
        t.replace("- daemonset.yaml", "- daemonsets.yaml")
    });
    let out = validate(&tb, dir.path());
    assert!(!out.status.success(), "a missing resource passed");
}
