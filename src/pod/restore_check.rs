//! RestorePod's comparison of the request with the checkpoint, before
//! anything is created.
//!
//! The contract: the container configs "describe the expected checkpointed
//! process; they must not start or mutate it, and any mismatch the runtime
//! can validate must fail the restore" (image, command, args, working
//! directory, environment, process credentials), and both runtime
//! implementations also compare the sandbox's hostname, sysctls, port
//! mappings and security context. A mismatch is FailedPrecondition naming
//! the field, the container and both values; the values come from the
//! request and the recorded configs only, never from files in the archive.
//!
//! Restore-time settings (labels, annotations, mounts, devices, resources,
//! log paths, the new pod's metadata, cgroup parent and log directory) are
//! the request's and are not compared. An empty image is allowed: podckptd
//! fills it with the image the checkpoint records (see `restore`). What the
//! checkpoint did not record (a runtime that keeps no config) cannot be
//! compared and is not.

use std::collections::BTreeMap;

use crate::archive::manifest::{ConfigSource, ContainerEntry, PodManifest};
use crate::cri::api::{ContainerConfig, KeyValue, PodSandboxConfig, PortMapping};

use super::error::PodError;

/// Checks the request's sandbox config, runtime handler and container
/// configs (in the manifest's container order) against the checkpoint.
pub fn check_request(
    manifest: &PodManifest,
    sandbox: &PodSandboxConfig,
    runtime_handler: &str,
    configs: &[&ContainerConfig],
) -> Result<(), PodError> {
    check_handler(manifest, runtime_handler)?;
    if let Some(recorded) = &manifest.sandbox.config {
        check_sandbox(sandbox, recorded)?;
    }
    for (entry, cfg) in manifest.containers.iter().zip(configs) {
        check_container(entry, cfg)?;
    }
    Ok(())
}

fn mismatch(what: &str, field: &str, request: &str, checkpoint: &str) -> PodError {
    PodError::FailedPrecondition(format!(
        "{what}: {field} differs from the checkpoint: the request has {request}, the checkpoint {checkpoint}"
    ))
}

/// The handler the sandbox ran under must be the one asked for ("" is the
/// default handler on both sides: a checkpoint of a pod run with the
/// default handler restores with the default handler).
fn check_handler(manifest: &PodManifest, handler: &str) -> Result<(), PodError> {
    let Some(status) = &manifest.sandbox.status else {
        return Ok(());
    };
    if status.runtime_handler != handler {
        return Err(mismatch(
            "sandbox",
            "runtime_handler",
            &format!("{handler:?}"),
            &format!("{:?}", status.runtime_handler),
        ));
    }
    Ok(())
}

fn check_sandbox(request: &PodSandboxConfig, recorded: &PodSandboxConfig) -> Result<(), PodError> {
    let what = "sandbox";
    if request.hostname != recorded.hostname {
        return Err(mismatch(
            what,
            "hostname",
            &format!("{:?}", request.hostname),
            &format!("{:?}", recorded.hostname),
        ));
    }
    let sysctls = |c: &PodSandboxConfig| -> BTreeMap<String, String> {
        c.linux
            .as_ref()
            .map(|l| l.sysctls.clone().into_iter().collect())
            .unwrap_or_default()
    };
    let (a, b) = (sysctls(request), sysctls(recorded));
    if let Some(key) = a.keys().chain(b.keys()).find(|k| a.get(*k) != b.get(*k)) {
        return Err(mismatch(
            what,
            &format!("linux.sysctls[{key:?}]"),
            &shown(a.get(key)),
            &shown(b.get(key)),
        ));
    }
    let ports = |c: &PodSandboxConfig| -> Vec<String> {
        let mut v: Vec<String> = c.port_mappings.iter().map(port).collect();
        v.sort();
        v
    };
    let (a, b) = (ports(request), ports(recorded));
    if a != b {
        return Err(mismatch(
            what,
            "port_mappings",
            &format!("{a:?}"),
            &format!("{b:?}"),
        ));
    }
    let sc = |c: &PodSandboxConfig| {
        c.linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default()
    };
    compare_json(
        what,
        "linux.security_context",
        &json(&sc(request))?,
        &json(&sc(recorded))?,
    )
}

fn port(p: &PortMapping) -> String {
    let proto = match p.protocol {
        1 => "UDP",
        2 => "SCTP",
        _ => "TCP",
    };
    format!(
        "{}:{}->{}/{proto}",
        p.host_ip, p.host_port, p.container_port
    )
}

fn shown(v: Option<&String>) -> String {
    v.map_or_else(|| "none".into(), |v| format!("{v:?}"))
}

fn check_container(entry: &ContainerEntry, request: &ContainerConfig) -> Result<(), PodError> {
    let what = format!("container {}", entry.name);
    let image = request
        .image
        .as_ref()
        .map(|i| i.image.as_str())
        .unwrap_or_default();
    let recorded_image = entry
        .config
        .as_ref()
        .and_then(|c| c.image.as_ref())
        .map(|i| i.image.as_str())
        .unwrap_or_default();
    if !image.is_empty()
        && !same_image(
            image,
            &[
                recorded_image,
                entry.image.as_str(),
                entry.image_ref.as_str(),
            ],
        )
    {
        let checkpoint = if recorded_image.is_empty() {
            &entry.image
        } else {
            recorded_image
        };
        return Err(mismatch(
            &what,
            "image",
            &format!("{image:?}"),
            &format!("{checkpoint:?} ({:?})", entry.image_ref),
        ));
    }
    let Some(recorded) = &entry.config else {
        return Ok(());
    };
    if entry.config_source == ConfigSource::Reconstructed {
        // Pieced together from the OCI spec: the command is entrypoint and
        // args in one, the env holds the image's and the runtime's, the
        // working dir the image's. Only the image can be compared.
        return Ok(());
    }
    // Each shown in Debug form: lists as ["a", "b"], strings quoted.
    for (field, a, b) in [
        (
            "command",
            format!("{:?}", request.command),
            format!("{:?}", recorded.command),
        ),
        (
            "args",
            format!("{:?}", request.args),
            format!("{:?}", recorded.args),
        ),
        (
            "working_dir",
            format!("{:?}", request.working_dir),
            format!("{:?}", recorded.working_dir),
        ),
    ] {
        if a != b {
            return Err(mismatch(&what, field, &a, &b));
        }
    }
    let (a, b) = (env_map(&request.envs), env_map(&recorded.envs));
    if let Some(key) = a.keys().chain(b.keys()).find(|k| a.get(*k) != b.get(*k)) {
        // Env values are often secrets (from a Secret or a token), and
        // this message reaches the kubelet's events: sizes, not values.
        let size = |v: Option<&String>| {
            v.map_or_else(
                || "unset".into(),
                |v| format!("a value of {} bytes", v.len()),
            )
        };
        return Err(mismatch(
            &what,
            &format!("envs[{key:?}]"),
            &size(a.get(key)),
            &size(b.get(key)),
        ));
    }
    for (field, a, b) in [
        ("tty", request.tty, recorded.tty),
        ("stdin", request.stdin, recorded.stdin),
        ("stdin_once", request.stdin_once, recorded.stdin_once),
    ] {
        if a != b {
            return Err(mismatch(&what, field, &a.to_string(), &b.to_string()));
        }
    }
    let sc = |c: &ContainerConfig| {
        let mut sc = c
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        // The container a shared namespace points at is named by its
        // runtime id, which a restore necessarily changes.
        if let Some(ns) = sc.namespace_options.as_mut() {
            ns.target_id.clear();
        }
        sc
    };
    compare_json(
        &what,
        "linux.security_context",
        &json(&sc(request))?,
        &json(&sc(recorded))?,
    )
}

/// Environment as the process sees it: the last value of a key wins.
fn env_map(envs: &[KeyValue]) -> BTreeMap<String, String> {
    envs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            )
        })
        .collect()
}

fn json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, PodError> {
    serde_json::to_value(v).map_err(|e| PodError::Internal(format!("comparing configs: {e}")))
}

/// Compares two messages field by field and names the first field (a path
/// like `linux.security_context.run_as_user.value`) that differs. Unset
/// and default compare equal: `null`, `false`, `0`, `""`, `[]` and `{}` are
/// all "not set" in proto3.
fn compare_json(
    what: &str,
    field: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Result<(), PodError> {
    use serde_json::Value;
    fn unset(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_f64() == Some(0.0),
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.values().all(unset),
        }
    }
    if unset(a) && unset(b) {
        return Ok(());
    }
    // A message set on one side only compares with an empty one.
    let empty = Value::Object(Default::default());
    let (a, b) = match (a, b) {
        (Value::Object(_), Value::Null) => (a, &empty),
        (Value::Null, Value::Object(_)) => (&empty, b),
        _ => (a, b),
    };
    if let (Value::Object(x), Value::Object(y)) = (a, b) {
        let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
        keys.sort();
        keys.dedup();
        let null = Value::Null;
        for k in keys {
            let (va, vb) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
            compare_json(what, &format!("{field}.{k}"), va, vb)?;
        }
        return Ok(());
    }
    if a != b {
        return Err(mismatch(what, field, &a.to_string(), &b.to_string()));
    }
    Ok(())
}

/// An image reference split into comparable parts, with Docker's defaults
/// filled in: `busybox` is `docker.io/library/busybox:latest`.
#[derive(Debug, PartialEq, Eq)]
struct ImageRef {
    /// `registry/path`, empty for a bare image id.
    name: String,
    /// The tag; `latest` when neither a tag nor a digest is given.
    tag: Option<String>,
    /// `sha256:<hex>`.
    digest: Option<String>,
}

/// The registry Docker's short names refer to.
const DEFAULT_DOMAIN: &str = "docker.io";

impl ImageRef {
    fn parse(r: &str) -> ImageRef {
        let r = r.trim();
        if is_digest(r) {
            return ImageRef {
                name: String::new(),
                tag: None,
                digest: Some(r.to_owned()),
            };
        }
        let (rest, digest) = match r.split_once('@') {
            Some((n, d)) => (n, Some(d.to_owned())),
            None => (r, None),
        };
        // A tag is a `:` after the last `/` (a `:` before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        let (domain, remainder) = match path.split_once('/') {
            Some((d, rem)) if d.contains('.') || d.contains(':') || d == "localhost" => (d, rem),
            _ => (DEFAULT_DOMAIN, path),
        };
        let domain = if domain == "index.docker.io" {
            DEFAULT_DOMAIN
        } else {
            domain
        };
        let name = if domain == DEFAULT_DOMAIN && !remainder.contains('/') {
            format!("{domain}/library/{remainder}")
        } else {
            format!("{domain}/{remainder}")
        };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            (t, _) => t,
        };
        ImageRef { name, tag, digest }
    }
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether the requested image is one of the checkpoint's: the same
/// digest, or (no digest asked for) the same name and tag.
fn same_image(request: &str, checkpoint: &[&str]) -> bool {
    let r = ImageRef::parse(request);
    checkpoint
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| ImageRef::parse(c))
        .any(|c| match (&r.digest, &c.digest) {
            (Some(a), Some(b)) if a == b => true,
            // A digest asked for is only confirmed by the same digest.
            (Some(_), _) => false,
            (None, _) => !r.name.is_empty() && r.name == c.name && r.tag == c.tag,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::api::{
        Capability, ContainerMetadata, ImageSpec, Int64Value, LinuxContainerConfig,
        LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
        NamespaceOption, PodSandboxStatus,
    };

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn message(err: PodError) -> String {
        match err {
            PodError::FailedPrecondition(m) => m,
            other => panic!("not FailedPrecondition: {other:?}"),
        }
    }

    #[test]
    fn image_references_are_normalised() {
        let p = ImageRef::parse;
        assert_eq!(p("busybox"), p("docker.io/library/busybox:latest"));
        assert_eq!(p("busybox:1.36"), p("index.docker.io/library/busybox:1.36"));
        assert_eq!(p("user/app"), p("docker.io/user/app:latest"));
        assert_eq!(p("localhost:5000/app").name, "localhost:5000/app");
        assert_eq!(p("localhost:5000/app").tag.as_deref(), Some("latest"));
        assert_eq!(
            p("localhost/podckpt/app:test").name,
            "localhost/podckpt/app"
        );
        assert_eq!(p("quay.io/a/b:v1").tag.as_deref(), Some("v1"));
        let d = p(&format!("busybox@{DIGEST}"));
        assert_eq!(d.name, "docker.io/library/busybox");
        assert_eq!(d.tag, None);
        assert_eq!(d.digest.as_deref(), Some(DIGEST));
        assert_eq!(p(DIGEST).name, "");
        assert_ne!(p("busybox:1.36"), p("busybox"));
        assert_ne!(p("quay.io/busybox"), p("busybox"));
    }

    #[test]
    fn same_image_by_name_tag_or_digest() {
        let ckpt = [
            "docker.io/library/busybox:1.36",
            "busybox:1.36",
            &format!("docker.io/library/busybox@{DIGEST}"),
        ];
        let ckpt: Vec<&str> = ckpt.iter().map(|s| s.as_ref()).collect();
        assert!(same_image("busybox:1.36", &ckpt));
        assert!(same_image("docker.io/library/busybox:1.36", &ckpt));
        assert!(same_image(&format!("busybox@{DIGEST}"), &ckpt));
        assert!(same_image(DIGEST, &ckpt));
        assert!(!same_image("busybox", &ckpt), "latest is not 1.36");
        assert!(!same_image("busybox:1.37", &ckpt));
        assert!(!same_image("quay.io/library/busybox:1.36", &ckpt));
        let other = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        assert!(!same_image(&format!("busybox@{other}"), &ckpt));
        assert!(!same_image("busybox:1.36", &[""]));
    }

    fn container(name: &str) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: "localhost/podckpt/app:test".into(),
                ..Default::default()
            }),
            command: vec!["/bin/sh".into()],
            args: vec!["-c".into(), "sleep 1".into()],
            working_dir: "/work".into(),
            envs: vec![KeyValue {
                key: "MODE".into(),
                value: "a".into(),
            }],
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    run_as_user: Some(Int64Value { value: 1000 }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sandbox() -> PodSandboxConfig {
        PodSandboxConfig {
            hostname: "web".into(),
            port_mappings: vec![PortMapping {
                protocol: 0,
                container_port: 8080,
                host_port: 0,
                host_ip: String::new(),
            }],
            linux: Some(LinuxPodSandboxConfig {
                sysctls: [(
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "0".to_string(),
                )]
                .into(),
                security_context: Some(LinuxSandboxSecurityContext {
                    run_as_user: Some(Int64Value { value: 1000 }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn manifest() -> PodManifest {
        PodManifest {
            sandbox: crate::archive::manifest::SandboxEntry {
                config: Some(sandbox()),
                status: Some(PodSandboxStatus {
                    runtime_handler: String::new(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            containers: vec![ContainerEntry {
                name: "app".into(),
                image: "localhost/podckpt/app:test".into(),
                image_ref: DIGEST.into(),
                config: Some(container("app")),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn check(sb: &PodSandboxConfig, handler: &str, c: &ContainerConfig) -> Result<(), PodError> {
        check_request(&manifest(), sb, handler, &[c])
    }

    /// One change to the container's config must fail naming `field` and
    /// both values.
    fn refused(edit: impl FnOnce(&mut ContainerConfig), field: &str, values: [&str; 2]) {
        let mut c = container("app");
        edit(&mut c);
        let m = message(check(&sandbox(), "", &c).unwrap_err());
        assert!(m.contains("container app"), "{m}");
        assert!(m.contains(field), "{field}: {m}");
        for v in values {
            assert!(m.contains(v), "{field} value {v}: {m}");
        }
    }

    #[test]
    fn the_checkpoints_own_request_passes() {
        check(&sandbox(), "", &container("app")).unwrap();
    }

    #[test]
    fn restore_time_settings_are_not_compared() {
        let mut c = container("app");
        c.labels.insert("new".into(), "label".into());
        c.annotations.insert("new".into(), "annotation".into());
        c.log_path = "elsewhere.log".into();
        c.mounts.push(Default::default());
        c.devices.push(Default::default());
        c.linux.as_mut().unwrap().resources = Some(Default::default());
        let mut sb = sandbox();
        sb.log_directory = "/var/log/pods/new".into();
        sb.metadata = Some(Default::default());
        sb.linux.as_mut().unwrap().cgroup_parent = "/kubepods/new".into();
        check(&sb, "", &c).unwrap();
    }

    #[test]
    fn an_empty_image_is_filled_from_the_checkpoint() {
        let mut c = container("app");
        c.image = None;
        check(&sandbox(), "", &c).unwrap();
        c.image = Some(ImageSpec {
            image: DIGEST.into(),
            ..Default::default()
        });
        check(&sandbox(), "", &c).unwrap();
    }

    #[test]
    fn container_mismatches_are_named() {
        refused(
            |c| c.image.as_mut().unwrap().image = "localhost/podckpt/other:test".into(),
            "image",
            ["localhost/podckpt/other:test", "localhost/podckpt/app:test"],
        );
        refused(
            |c| c.command = vec!["/bin/bash".into()],
            "command",
            ["/bin/bash", "/bin/sh"],
        );
        refused(|c| c.args.clear(), "args", ["[]", "sleep 1"]);
        refused(
            |c| c.working_dir = "/".into(),
            "working_dir",
            ["\"/\"", "/work"],
        );
        refused(
            |c| c.envs[0].value = "b".into(),
            "envs[\"MODE\"]",
            ["a value of 1 bytes", "a value of 1 bytes"],
        );
        refused(
            |c| {
                c.envs.push(KeyValue {
                    key: "EXTRA".into(),
                    value: "x".into(),
                })
            },
            "envs[\"EXTRA\"]",
            ["a value of 1 bytes", "unset"],
        );
        refused(|c| c.tty = true, "tty", ["true", "false"]);
        refused(|c| c.stdin = true, "stdin", ["true", "false"]);
        refused(|c| c.stdin_once = true, "stdin_once", ["true", "false"]);
        refused(
            |c| {
                c.linux
                    .as_mut()
                    .unwrap()
                    .security_context
                    .as_mut()
                    .unwrap()
                    .run_as_user = Some(Int64Value { value: 0 })
            },
            "linux.security_context.run_as_user",
            ["0", "1000"],
        );
        refused(
            |c| {
                c.linux
                    .as_mut()
                    .unwrap()
                    .security_context
                    .as_mut()
                    .unwrap()
                    .capabilities = Some(Capability {
                    add_capabilities: vec!["SYS_ADMIN".into()],
                    ..Default::default()
                })
            },
            "linux.security_context.capabilities.add_capabilities",
            ["SYS_ADMIN", "null"],
        );
    }

    #[test]
    fn env_order_and_unset_defaults_do_not_matter() {
        let mut c = container("app");
        c.envs.insert(
            0,
            KeyValue {
                key: "A".into(),
                value: "1".into(),
            },
        );
        let mut m = manifest();
        let rec = m.containers[0].config.as_mut().unwrap();
        rec.envs.push(KeyValue {
            key: "A".into(),
            value: "1".into(),
        });
        // An empty security context equals an absent one.
        rec.linux.as_mut().unwrap().security_context = None;
        c.linux.as_mut().unwrap().security_context = Some(Default::default());
        check_request(&m, &sandbox(), "", &[&c]).unwrap();
    }

    #[test]
    fn a_shared_namespace_target_may_change() {
        let mut c = container("app");
        let mut m = manifest();
        let ns = |id: &str| {
            Some(NamespaceOption {
                pid: 3,
                target_id: id.into(),
                ..Default::default()
            })
        };
        c.linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .namespace_options = ns("new");
        m.containers[0]
            .config
            .as_mut()
            .unwrap()
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .namespace_options = ns("old");
        check_request(&m, &sandbox(), "", &[&c]).unwrap();
    }

    #[test]
    fn sandbox_mismatches_are_named() {
        let c = container("app");
        type Edit = Box<dyn Fn(&mut PodSandboxConfig)>;
        let cases: Vec<(Edit, &str, [&str; 2])> = vec![
            (
                Box::new(|s| s.hostname = "db".into()),
                "hostname",
                ["\"db\"", "\"web\""],
            ),
            (
                Box::new(|s| {
                    s.linux
                        .as_mut()
                        .unwrap()
                        .sysctls
                        .insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
                }),
                "linux.sysctls[\"net.ipv4.ip_unprivileged_port_start\"]",
                ["\"80\"", "\"0\""],
            ),
            (
                Box::new(|s| s.port_mappings[0].container_port = 9090),
                "port_mappings",
                [":0->9090/TCP", ":0->8080/TCP"],
            ),
            (
                Box::new(|s| {
                    s.linux
                        .as_mut()
                        .unwrap()
                        .security_context
                        .as_mut()
                        .unwrap()
                        .privileged = true
                }),
                "linux.security_context.privileged",
                ["true", "false"],
            ),
        ];
        for (edit, field, values) in cases {
            let mut sb = sandbox();
            edit(&mut sb);
            let m = message(check(&sb, "", &c).unwrap_err());
            assert!(m.starts_with("sandbox: "), "{m}");
            assert!(m.contains(field), "{field}: {m}");
            for v in values {
                assert!(m.contains(v), "{field} value {v}: {m}");
            }
        }
    }

    #[test]
    fn the_handler_must_be_the_checkpoints() {
        let c = container("app");
        let m = message(check(&sandbox(), "kata", &c).unwrap_err());
        assert!(
            m.contains("runtime_handler") && m.contains("\"kata\""),
            "{m}"
        );
        let mut man = manifest();
        man.sandbox.status.as_mut().unwrap().runtime_handler = "runc".into();
        check_request(&man, &sandbox(), "runc", &[&c]).unwrap();
        let m = message(check_request(&man, &sandbox(), "", &[&c]).unwrap_err());
        assert!(m.contains("\"runc\""), "{m}");
    }

    #[test]
    fn what_the_checkpoint_did_not_record_is_not_compared() {
        let mut man = manifest();
        man.sandbox.config = None;
        man.containers[0].config = None;
        let mut sb = sandbox();
        // The image is still compared with what the entry names.
        let mut other = container("app");
        other.image.as_mut().unwrap().image = "localhost/podckpt/other:test".into();
        assert!(check_request(&man, &sandbox(), "", &[&other]).is_err());
        sb.hostname = "other".into();
        let mut c = container("app");
        c.command = vec!["other".into()];
        check_request(&man, &sb, "", &[&c]).unwrap();
    }

    #[test]
    fn a_reconstructed_config_is_compared_by_image_only() {
        let mut m = manifest();
        m.containers[0].config_source = ConfigSource::Reconstructed;
        let rec = m.containers[0].config.as_mut().unwrap();
        rec.command = vec!["/entrypoint.sh".into(), "serve".into()];
        rec.envs.push(KeyValue {
            key: "PATH".into(),
            value: "/usr/bin".into(),
        });
        let c = container("app");
        check_request(&m, &sandbox(), "", &[&c]).unwrap();
        let mut other = container("app");
        other.image.as_mut().unwrap().image = "docker.io/library/nginx:1".into();
        let err = check_request(&m, &sandbox(), "", &[&other]).unwrap_err();
        assert!(err.to_string().contains("image"), "{err}");
    }

    #[test]
    fn env_mismatches_name_the_key_but_not_the_values() {
        let mut c = container("app");
        c.envs.push(KeyValue {
            key: "DB_PASSWORD".into(),
            value: "hunter2".into(),
        });
        let mut m = manifest();
        m.containers[0]
            .config
            .as_mut()
            .unwrap()
            .envs
            .push(KeyValue {
                key: "DB_PASSWORD".into(),
                value: "correct-horse".into(),
            });
        let err = check_request(&m, &sandbox(), "", &[&c])
            .unwrap_err()
            .to_string();
        assert!(err.contains("DB_PASSWORD"), "{err}");
        assert!(
            !err.contains("hunter2") && !err.contains("correct-horse"),
            "{err}"
        );
        assert!(err.contains("7 bytes") && err.contains("13 bytes"), "{err}");
    }
}
