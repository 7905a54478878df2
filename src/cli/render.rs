//! `podckpt inspect`'s text output.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::time::SystemTime;

use super::{age, human_bytes, human_time};
use crate::archive::inspect::{
    ContainerArchive, ContainerInfo, Inspection, PodArchive, PodIdentity, Process,
};
use crate::pod::options::CheckpointOptions;

/// The inspection as text, `now` giving the archive's age.
pub fn render(inspection: &Inspection, now: SystemTime) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = match inspection {
        Inspection::Pod(p) => pod(&mut out, p, now),
        Inspection::Container(c) => container_archive(&mut out, c),
    };
    out
}

fn pod(out: &mut String, p: &PodArchive, now: SystemTime) -> std::fmt::Result {
    writeln!(
        out,
        "pod checkpoint   {} ({})",
        p.archive.display(),
        human_bytes(p.archive_bytes)
    )?;
    writeln!(
        out,
        "format           {} v{}, written by podckpt {}",
        p.format, p.version, p.podckpt_version
    )?;
    let when = human_time(p.created_unix_ms);
    match age(p.created_unix_ms, now) {
        Some(a) => writeln!(out, "created          {when} ({a})")?,
        None => writeln!(out, "created          {when}")?,
    }
    let h = &p.host;
    writeln!(
        out,
        "host             {}, kernel {}, CRIU {}, {} {}, cgroup {}",
        h.hostname, h.kernel, h.criu_version, h.runtime_name, h.runtime_version, h.cgroup
    )?;
    writeln!(out, "pod              {}", pod_line(&p.pod))?;
    if !p.pod.runtime_handler.is_empty() {
        writeln!(out, "runtime handler  {}", p.pod.runtime_handler)?;
    }
    writeln!(out, "options          {}", options_line(&p.options))?;
    let t = &p.timings;
    writeln!(
        out,
        "timings          prepare {} ms, freeze {} ms, frozen window {} ms, capture {} ms",
        t.prepare_ms, t.freeze_ms, t.frozen_window_ms, t.capture_ms
    )?;
    writeln!(
        out,
        "/dev/shm         {}",
        if p.devshm { "captured" } else { "not captured" }
    )?;
    writeln!(out, "containers       {}", p.containers.len())?;
    for c in &p.containers {
        writeln!(out)?;
        container(out, c)?;
    }
    Ok(())
}

fn container_archive(out: &mut String, c: &ContainerArchive) -> std::fmt::Result {
    writeln!(
        out,
        "container checkpoint  {} ({})",
        c.archive.display(),
        human_bytes(c.archive_bytes)
    )?;
    if let Some(t) = &c.checkpointed {
        writeln!(out, "checkpointed     {t}")?;
    }
    if let Some(r) = &c.runtime {
        writeln!(out, "runtime          {r}")?;
    }
    if let Some(v) = &c.criu_version {
        writeln!(out, "CRIU             {v}")?;
    }
    if !c.pod.name.is_empty() || !c.pod.sandbox_id.is_empty() {
        writeln!(out, "pod              {}", pod_line(&c.pod))?;
    }
    writeln!(out)?;
    container(out, &c.container)
}

fn pod_line(p: &PodIdentity) -> String {
    let mut s = if p.namespace.is_empty() {
        p.name.clone()
    } else {
        format!("{}/{}", p.namespace, p.name)
    };
    if !p.uid.is_empty() {
        let _ = write!(s, ", uid {}", p.uid);
    }
    if !p.sandbox_id.is_empty() {
        let _ = write!(s, ", sandbox {}", p.sandbox_id);
    }
    s
}

/// The options as the `--option` keys that produce them.
fn options_line(o: &CheckpointOptions) -> String {
    let mut parts = vec![
        format!("tcp-established={}", o.tcp_established),
        format!("file-locks={}", o.file_locks),
        format!("ext-unix-sk={}", o.ext_unix_sk),
    ];
    if let Some(g) = o.ghost_limit {
        parts.push(format!("ghost-limit={g}"));
    }
    if let Some(n) = o.network_lock {
        let n = serde_json::to_value(n)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        parts.push(format!("network-lock={n}"));
    }
    parts.push(match o.compression {
        Some(level) => format!("compression=zstd:{level}"),
        None => "compression=off".into(),
    });
    parts.join(" ")
}

fn container(out: &mut String, c: &ContainerInfo) -> std::fmt::Result {
    writeln!(out, "container {}  id {}", c.name, c.id)?;
    if c.image.is_empty() {
        // A foreign archive whose config.dump names no image.
    } else if c.image_ref.is_empty() || c.image_ref == c.image {
        writeln!(out, "  image          {}", c.image)?;
    } else {
        writeln!(out, "  image          {} ({})", c.image, c.image_ref)?;
    }
    if !c.command.is_empty() {
        writeln!(out, "  command        {}", c.command.join(" "))?;
    }
    writeln!(
        out,
        "  memory         {} of CRIU images",
        human_bytes(c.images_bytes)
    )?;
    writeln!(
        out,
        "  rootfs diff    {}, {} deleted file{}",
        human_bytes(c.rootfs_diff_bytes),
        c.deleted_files,
        if c.deleted_files == 1 { "" } else { "s" }
    )?;
    match &c.processes_error {
        Some(e) if c.processes.is_empty() => writeln!(out, "  processes      unknown: {e}")?,
        _ => {
            writeln!(out, "  processes      {}", c.processes.len())?;
            for line in tree_lines(&c.processes) {
                writeln!(out, "    {line}")?;
            }
        }
    }
    Ok(())
}

/// The tree, one process a line, children indented under their parent.
pub fn tree_lines(procs: &[Process]) -> Vec<String> {
    let pids: HashSet<u32> = procs.iter().map(|p| p.pid).collect();
    let mut children: BTreeMap<u32, Vec<&Process>> = BTreeMap::new();
    let mut roots = Vec::new();
    for p in procs {
        if p.ppid != p.pid && pids.contains(&p.ppid) {
            children.entry(p.ppid).or_default().push(p);
        } else {
            roots.push(p);
        }
    }
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    // Depth-first with an explicit stack; `seen` guards against a damaged
    // image whose parent links form a cycle.
    let mut stack: Vec<(&Process, usize)> = roots.into_iter().rev().map(|p| (p, 0)).collect();
    while let Some((p, depth)) = stack.pop() {
        if !seen.insert(p.pid) {
            continue;
        }
        let mut line = format!("{}{}", "  ".repeat(depth), p.pid);
        if let Some(comm) = &p.comm {
            let _ = write!(line, " {comm}");
        }
        if p.threads > 1 {
            let _ = write!(line, " ({} threads)", p.threads);
        }
        lines.push(line);
        if let Some(kids) = children.get(&p.pid) {
            stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
        }
    }
    // Processes only reachable through a cycle: still list them.
    for p in procs {
        if !seen.contains(&p.pid) {
            lines.push(format!("{} (parent {} unresolved)", p.pid, p.ppid));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32, comm: Option<&str>, threads: usize) -> Process {
        Process {
            pid,
            ppid,
            pgid: 1,
            sid: 1,
            threads,
            comm: comm.map(str::to_string),
        }
    }

    #[test]
    fn tree_is_indented_by_parent() {
        let procs = [
            p(1, 0, Some("sh"), 1),
            p(9, 7, None, 1),
            p(7, 1, Some("app"), 3),
            p(8, 1, Some("sleep"), 1),
        ];
        assert_eq!(
            tree_lines(&procs),
            ["1 sh", "  7 app (3 threads)", "    9", "  8 sleep"]
        );
    }

    #[test]
    fn cycles_do_not_loop() {
        let procs = [p(2, 3, None, 1), p(3, 2, None, 1)];
        assert_eq!(
            tree_lines(&procs),
            ["2 (parent 3 unresolved)", "3 (parent 2 unresolved)"]
        );
    }
}
