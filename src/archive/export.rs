//! `podckpt export`: the containers of a pod archive as standard container
//! checkpoint archives, one uncompressed tar per container in the layout
//! CheckpointContainer writes (and checkpointctl, CRI-O and containerd
//! read), so that the tools of the ecosystem can open a pod checkpoint.
//!
//! A pod archive already holds each container in that layout under
//! `containers/<name>/` (see [`super::manifest::ContainerEntry::dir`]), so
//! export is a copy with the prefix taken off. It is streamed: the pod
//! archive is read once, from its manifest to its end, and each entry goes
//! straight from the decompressor into the tar being written; nothing is
//! extracted and no container is held in memory. Only one output archive
//! is open at a time: a container's entries are contiguous in a pod
//! archive (podckpt writes them so, and restore requires it too).
//!
//! The pod archive is untrusted input, checked entry by entry by the same
//! [`EntryCheck`] restore's extraction uses: the manifest's listing (every
//! file declared, with its size), the entry-count and byte [`Limits`],
//! paths, entry types. Links are refused outright: a container checkpoint
//! archive holds none.
//!
//! Output: `<dir>/<container>.tar`, mode 0600, written under a temporary
//! name and renamed into place only once every selected container's archive
//! is complete, so that on any error (or cancellation) nothing is left in
//! the directory. Existing files are not overwritten; a link as the output
//! directory is refused.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::extract::{checked_relative, group_of, EntryCheck, ExtractError, Kind, Limits, Listing};
use super::manifest::ContainerEntry;
use super::reader::{locate_pod_archive, open_tar, read_manifest_entry, sanitize};
use super::writer::{ArchiveError, ArchiveWriter, Completed, Compression, CopyError};

/// The file name of a container's archive in the output directory.
pub fn archive_name(container: &str) -> String {
    format!("{container}.tar")
}

/// Why an export failed. Nothing was left in the output directory.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The pod archive is unreadable, damaged, crafted or past the limits.
    #[error(transparent)]
    Archive(#[from] ExtractError),
    /// A container asked for is not in the archive.
    #[error("{archive}: no container named {name:?} (the archive holds: {known})")]
    UnknownContainer {
        /// The pod archive.
        archive: PathBuf,
        /// The name asked for.
        name: String,
        /// The names it holds, comma-separated.
        known: String,
    },
    /// The output directory or an output file is not usable.
    #[error("{path}: {reason}")]
    Output {
        /// The path concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing an output archive failed (ENOSPC...).
    #[error(transparent)]
    Write(#[from] ArchiveError),
    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl From<super::reader::ReadError> for ExportError {
    fn from(e: super::reader::ReadError) -> Self {
        ExportError::Archive(e.into())
    }
}

/// One container archive written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The container's name.
    pub container: String,
    /// Its archive.
    pub path: PathBuf,
    /// The archive's size in bytes.
    pub bytes: u64,
}

/// A container selected for export.
struct Selected {
    name: String,
    /// Its directory in the pod archive, normalized (`containers/<name>`).
    dir: String,
    dest: PathBuf,
}

/// Writes `<out_dir>/<name>.tar` for each container of the pod archive at
/// `archive` (the file, or the directory CheckpointPod wrote it into)
/// named in `containers` (all when empty). `out_dir` must exist.
/// `cancelled` is polled between entries and chunks. Returns the archives
/// written, in the order of the manifest.
pub fn export(
    archive: &Path,
    out_dir: &Path,
    containers: &[String],
    limits: &Limits,
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Exported>, ExportError> {
    let archive = locate_pod_archive(archive).ok_or_else(|| {
        ExportError::Archive(ExtractError::Read {
            archive: archive.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    })?;
    check_out_dir(out_dir)?;
    let mut ar = open_tar(&archive)?;
    let mut entries = ar.entries().map_err(|source| ExtractError::Read {
        archive: archive.clone(),
        source: sanitize(source, Some(0)),
    })?;
    let manifest = read_manifest_entry(&archive, &mut entries)?;
    let selected = select(&archive, &manifest.containers, containers, out_dir)?;
    let listing: Listing = manifest
        .files
        .iter()
        .map(|f| (f.path.clone(), f.size))
        .collect();
    check_room(out_dir, &listing, &selected)?;
    let dirs: Vec<String> = selected.iter().map(|s| s.dir.clone()).collect();

    let no_skip = |_: &str| false;
    let mut check = EntryCheck::new(&archive, Some(&listing), limits, &no_skip);
    let mut completed: Vec<Completed> = Vec::with_capacity(selected.len());
    let mut started = vec![false; selected.len()];
    let mut current: Option<(usize, ArchiveWriter)> = None;
    // A container's archive is complete once its entries are over and none
    // the manifest lists for it is missing.
    let close = |g: usize,
                 w: ArchiveWriter,
                 check: &EntryCheck<'_>|
     -> Result<Completed, ExportError> {
        if let Some((first, n)) = check.missing(|k| group_of(&dirs, k) == Some(g)) {
            return Err(check
                .invalid(
                    &first,
                    format!(
                        "listed in the manifest but missing from the archive ({n} missing under {}): truncated?",
                        dirs[g]
                    ),
                )
                .into());
        }
        Ok(w.complete()?)
    };
    for entry in entries {
        if cancelled() {
            return Err(ExportError::Cancelled);
        }
        let mut entry = entry.map_err(|e| check.read_err(e))?;
        let c = check.check(&mut entry)?;
        if matches!(c.kind, Kind::Skip) {
            continue;
        }
        let group = group_of(&dirs, &c.key);
        if group != current.as_ref().map(|(g, _)| *g) {
            if let Some((g, w)) = current.take() {
                completed.push(close(g, w, &check)?);
            }
            if let Some(g) = group {
                if started[g] {
                    return Err(check
                        .invalid(
                            &c.name,
                            format!("the entries under {} are not contiguous", dirs[g]),
                        )
                        .into());
                }
                started[g] = true;
                let w = ArchiveWriter::create(&selected[g].dest, Compression::None)?;
                current = Some((g, w));
            }
        }
        // Entries of containers not selected and of the pod (/dev/shm)
        // are checked, and skipped.
        let Some((g, w)) = current.as_mut() else {
            continue;
        };
        let inner = c.key[dirs[*g].len()..].trim_start_matches('/');
        if inner.is_empty() {
            // The container's own directory: the archive's root.
            continue;
        }
        match c.kind {
            Kind::Skip => {}
            Kind::Dir => w.append_dir_entry(inner)?,
            Kind::File { size } => {
                let mtime = entry.header().mtime().unwrap_or(0);
                let mut src = Cancellable {
                    inner: &mut entry,
                    cancelled,
                };
                w.append_stream(inner, size, mtime, &mut src)
                    .map_err(|e| match e {
                        CopyError::Read(_) if cancelled() => ExportError::Cancelled,
                        CopyError::Read(e) => check.read_err(e).into(),
                        CopyError::Write(source) => ExportError::Write(ArchiveError::Io {
                            op: "write",
                            path: selected[*g].dest.clone(),
                            source,
                        }),
                    })?;
            }
            Kind::Symlink { .. } => return Err(check
                .invalid(
                    &c.name,
                    "is a link; a container checkpoint archive holds none, so it is not exported"
                        .into(),
                )
                .into()),
        }
    }
    if let Some((g, w)) = current.take() {
        completed.push(close(g, w, &check)?);
    }
    check.read_to_end(ar)?;
    check.finish()?;
    if let Some(g) = started.iter().position(|s| !s) {
        return Err(check
            .invalid(
                &selected[g].dir,
                "the manifest names this container, but the archive holds nothing of it".into(),
            )
            .into());
    }

    // All complete: put them in place, or none.
    let mut done: Vec<Exported> = Vec::with_capacity(completed.len());
    for c in completed {
        let path = c.dest().to_path_buf();
        match c.commit() {
            Ok(bytes) => {
                let container = selected
                    .iter()
                    .find(|s| s.dest == path)
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                done.push(Exported {
                    container,
                    path,
                    bytes,
                });
            }
            Err(e) => {
                for d in &done {
                    let _ = fs::remove_file(&d.path);
                }
                return Err(e.into());
            }
        }
    }
    // In the manifest's order.
    done.sort_by_key(|d| selected.iter().position(|s| s.name == d.container));
    Ok(done)
}

/// `dir` must be a real directory: a link to one is refused.
fn check_out_dir(dir: &Path) -> Result<(), ExportError> {
    let out = |reason: &str| ExportError::Output {
        path: dir.to_path_buf(),
        reason: reason.into(),
    };
    let link = "is a symbolic link; refused (name the directory itself)";
    if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(out(link));
    }
    // The open is what decides (the name may change after the look above):
    // with O_NOFOLLOW, a link fails here too, as ELOOP or ENOTDIR.
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => {
                out("is a symbolic link; refused (name the directory itself)")
            }
            Some(nix::libc::ENOTDIR) => out("is not a directory"),
            _ => out(&e.to_string()),
        })?;
    Ok(())
}

/// Whether `name` can be a file name in the output directory as it is: a
/// container name from the (untrusted) manifest.
fn safe_file_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 240 && !name.starts_with('.') && !name.contains(['/', '\0'])
}

/// The containers to export, checked; an unknown name is an error.
fn select(
    archive: &Path,
    all: &[ContainerEntry],
    wanted: &[String],
    out_dir: &Path,
) -> Result<Vec<Selected>, ExportError> {
    for name in wanted {
        if !all.iter().any(|c| &c.name == name) {
            return Err(ExportError::UnknownContainer {
                archive: archive.to_path_buf(),
                name: name.clone(),
                known: all
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let invalid = |c: &ContainerEntry, reason: String| {
        ExportError::Archive(ExtractError::Invalid {
            archive: archive.to_path_buf(),
            entry: super::manifest::MANIFEST.into(),
            reason: format!("container {:?}: {reason}", c.name),
        })
    };
    let mut out: Vec<Selected> = Vec::new();
    for c in all
        .iter()
        .filter(|c| wanted.is_empty() || wanted.contains(&c.name))
    {
        if !safe_file_name(&c.name) {
            return Err(invalid(c, "its name cannot be a file name".into()));
        }
        if out.iter().any(|s| s.name == c.name) {
            return Err(invalid(c, "named twice".into()));
        }
        let dir = checked_relative(&c.dir)
            .map_err(|why| invalid(c, format!("directory {:?}: {why}", c.dir)))?
            .to_string_lossy()
            .into_owned();
        if dir.is_empty()
            || out.iter().any(|s| {
                // One inside the other (or the same).
                group_of(std::slice::from_ref(&s.dir), &dir).is_some()
                    || group_of(std::slice::from_ref(&dir), &s.dir).is_some()
            })
        {
            return Err(invalid(c, format!("directory {:?} is not its own", c.dir)));
        }
        let dest = out_dir.join(archive_name(&c.name));
        if fs::symlink_metadata(&dest).is_ok() {
            return Err(ExportError::Output {
                path: dest,
                reason: "exists; refused (export does not overwrite)".into(),
            });
        }
        out.push(Selected {
            name: c.name.clone(),
            dir,
            dest,
        });
    }
    if out.is_empty() {
        return Err(ExportError::Archive(ExtractError::Invalid {
            archive: archive.to_path_buf(),
            entry: super::manifest::MANIFEST.into(),
            reason: "the archive holds no container".into(),
        }));
    }
    Ok(out)
}

/// Fails early when the output directory's filesystem cannot hold the
/// archives (their size is known from the manifest, within tar's framing).
fn check_room(out_dir: &Path, listing: &Listing, selected: &[Selected]) -> Result<(), ExportError> {
    let dirs: Vec<String> = selected.iter().map(|s| s.dir.clone()).collect();
    let need: u64 = listing
        .iter()
        .filter(|(k, _)| group_of(&dirs, k).is_some())
        // A header, long names, and the content padded to 512 bytes.
        .map(|(_, size)| 1536 + size.div_ceil(512) * 512)
        .sum();
    let Ok(st) = nix::sys::statvfs::statvfs(out_dir) else {
        return Ok(());
    };
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    if need > free {
        return Err(ExportError::Output {
            path: out_dir.to_path_buf(),
            reason: format!("the archives need about {need} bytes; its filesystem has {free} free"),
        });
    }
    Ok(())
}

/// A reader that fails once the caller cancelled, so that a long copy
/// stops between chunks.
struct Cancellable<'a, R> {
    inner: &'a mut R,
    cancelled: &'a dyn Fn() -> bool,
}

impl<R: io::Read> io::Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.cancelled)() {
            return Err(io::Error::other("cancelled"));
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::manifest::{FileEntry, PodManifest, POD_FORMAT, POD_FORMAT_VERSION};
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use tar::EntryType as T;

    type Entry<'a> = (&'a str, T, &'a [u8], Option<&'a str>);

    /// A pod archive with `entries` after its manifest, which names the
    /// containers `names` and lists `listed` (path, size).
    fn pod_archive(
        dir: &Path,
        names: &[&str],
        listed: &[(&str, u64)],
        entries: &[Entry<'_>],
    ) -> PathBuf {
        let manifest = PodManifest {
            format: POD_FORMAT.into(),
            version: POD_FORMAT_VERSION,
            containers: names
                .iter()
                .map(|n| ContainerEntry {
                    name: n.to_string(),
                    dir: format!("containers/{n}"),
                    ..Default::default()
                })
                .collect(),
            files: listed
                .iter()
                .map(|(p, s)| FileEntry {
                    path: p.to_string(),
                    size: *s,
                })
                .collect(),
            ..Default::default()
        };
        let path = dir.join("pod.tar");
        let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
        let json = serde_json::to_vec(&manifest).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_mode(0o600);
        b.append_data(&mut h, "manifest.json", &json[..]).unwrap();
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(1_700_000_000);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
        path
    }

    /// The usual two-container pod: `a` and `b`, each a checkpoint dir
    /// with one image and a config.dump.
    fn two() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = pod_archive(
            d.path(),
            &["a", "b"],
            &[
                ("containers/a/checkpoint/pages-1.img", 5),
                ("containers/a/config.dump", 2),
                ("containers/b/checkpoint/pages-1.img", 3),
                ("containers/b/config.dump", 2),
                ("pod/devshm/x", 1),
            ],
            &[
                ("pod/devshm/x", T::Regular, b"s", None),
                ("containers/a/checkpoint", T::Directory, b"", None),
                (
                    "containers/a/checkpoint/pages-1.img",
                    T::Regular,
                    b"AAAAA",
                    None,
                ),
                ("containers/a/config.dump", T::Regular, b"{}", None),
                ("containers/b/checkpoint", T::Directory, b"", None),
                (
                    "containers/b/checkpoint/pages-1.img",
                    T::Regular,
                    b"BBB",
                    None,
                ),
                ("containers/b/config.dump", T::Regular, b"[]", None),
            ],
        );
        (d, p)
    }

    fn run(archive: &Path, out: &Path, names: &[&str]) -> Result<Vec<Exported>, ExportError> {
        fs::create_dir_all(out).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        export(archive, out, &names, &Limits::default(), &|| false)
    }

    fn listing_of(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn tar_entries(path: &Path) -> Vec<(String, T, Vec<u8>)> {
        let mut ar = tar::Archive::new(fs::File::open(path).unwrap());
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = vec![];
                e.read_to_end(&mut data).unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().entry_type(),
                    data,
                )
            })
            .collect()
    }

    #[test]
    fn each_container_becomes_a_container_archive() {
        let (d, p) = two();
        let out = d.path().join("out");
        let done = run(&p, &out, &[]).unwrap();
        assert_eq!(
            done.iter()
                .map(|e| e.container.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(listing_of(&out), ["a.tar", "b.tar"]);
        let a = tar_entries(&out.join("a.tar"));
        assert_eq!(
            a,
            [
                ("checkpoint".to_string(), T::Directory, vec![]),
                (
                    "checkpoint/pages-1.img".into(),
                    T::Regular,
                    b"AAAAA".to_vec()
                ),
                ("config.dump".into(), T::Regular, b"{}".to_vec()),
            ]
        );
        let meta = fs::metadata(out.join("b.tar")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(done[1].bytes, meta.len());
        assert_eq!(tar_entries(&out.join("b.tar"))[1].2, b"BBB");

        // One, by name.
        let one = d.path().join("one");
        run(&p, &one, &["b"]).unwrap();
        assert_eq!(listing_of(&one), ["b.tar"]);
        // An existing archive is not overwritten.
        let err = run(&p, &one, &["b"]).unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        assert_eq!(tar_entries(&one.join("b.tar"))[1].2, b"BBB");
    }

    #[test]
    fn an_unknown_container_is_an_error_and_writes_nothing() {
        let (d, p) = two();
        let out = d.path().join("out");
        let err = run(&p, &out, &["a", "nosuch"]).unwrap_err();
        assert!(matches!(err, ExportError::UnknownContainer { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("\"nosuch\"") && msg.contains("a, b"), "{msg}");
        assert!(listing_of(&out).is_empty());
    }

    #[test]
    fn crafted_archives_are_refused_and_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        let listed = [
            ("containers/a/config.dump", 2),
            ("containers/b/config.dump", 2),
        ];
        let a_ok: Entry<'_> = ("containers/a/config.dump", T::Regular, b"{}", None);
        let b_ok: Entry<'_> = ("containers/b/config.dump", T::Regular, b"{}", None);
        for (entries, what) in [
            // A symlink, even one that stays inside (after a's archive is
            // complete: it must go too).
            (
                vec![
                    a_ok,
                    b_ok,
                    ("containers/b/l", T::Symlink, &b""[..], Some("config.dump")),
                ],
                "is a link",
            ),
            // A hard link to a host file.
            (
                vec![
                    a_ok,
                    ("containers/b/h", T::Link, &b""[..], Some("/etc/shadow")),
                    b_ok,
                ],
                "not accepted",
            ),
            // Bigger than the manifest says.
            (
                vec![
                    a_ok,
                    (
                        "containers/b/config.dump",
                        T::Regular,
                        &b"{}xxxxxxxx"[..],
                        None,
                    ),
                ],
                "the manifest says 2",
            ),
            // Not listed at all.
            (
                vec![
                    a_ok,
                    b_ok,
                    ("containers/b/extra", T::Regular, &b"x"[..], None),
                ],
                "not listed",
            ),
            // Listed but missing: truncated.
            (vec![a_ok], "missing"),
            // Not contiguous.
            (
                vec![
                    a_ok,
                    b_ok,
                    ("containers/a/sub", T::Directory, &b""[..], None),
                ],
                "not contiguous",
            ),
        ] {
            let sub = tempfile::tempdir_in(d.path()).unwrap();
            let p = pod_archive(sub.path(), &["a", "b"], &listed, &entries);
            let out = sub.path().join("out");
            let err = run(&p, &out, &[]).unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
            assert!(
                listing_of(&out).is_empty(),
                "{what}: {:?}",
                listing_of(&out)
            );
        }
    }

    #[test]
    fn limits_apply_and_leave_nothing() {
        let (d, p) = two();
        for (limits, what) in [
            (
                Limits {
                    max_bytes: 6,
                    ..Limits::default()
                },
                "more than 6 bytes",
            ),
            (
                Limits {
                    max_entries: 4,
                    ..Limits::default()
                },
                "more than 4 entries",
            ),
        ] {
            let out = tempfile::tempdir_in(d.path()).unwrap();
            let err = export(&p, out.path(), &[], &limits, &|| false).unwrap_err();
            assert!(
                matches!(err, ExportError::Archive(ExtractError::Limit { .. })),
                "{err}"
            );
            assert!(err.to_string().contains(what), "{err}");
            assert!(listing_of(out.path()).is_empty());
        }
        // Cancelled: nothing either.
        let out = tempfile::tempdir_in(d.path()).unwrap();
        let err = export(&p, out.path(), &[], &Limits::default(), &|| true).unwrap_err();
        assert!(matches!(err, ExportError::Cancelled), "{err}");
        assert!(listing_of(out.path()).is_empty());
    }

    #[test]
    fn output_dir_must_be_a_real_directory() {
        let (d, p) = two();
        let real = d.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = export(&p, &link, &[], &Limits::default(), &|| false).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(listing_of(&real).is_empty());
        // A manifest naming a container with a path for a name.
        let bad = pod_archive(d.path(), &["../x"], &[], &[]);
        let err = run(&bad, &real, &[]).unwrap_err();
        assert!(err.to_string().contains("cannot be a file name"), "{err}");
    }
}
