//! A container's rootfs changes, read from its overlay writable layer
//! (`upperdir`): a tar of what was added or changed (`rootfs-diff.tar`) and
//! the list of what was deleted (`deleted.files`), the layout CRI-O and
//! checkpointctl use. Reading the upper dir directly needs no help from the
//! runtime's snapshotter and never sees content mounted over the rootfs.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Overlay marks a directory that hides the lower layers' content with
/// this xattr.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Why the diff could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// Reading the upper dir or writing the tar failed.
    #[error("rootfs diff of {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What a diff held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffSummary {
    /// Paths (absolute in the container, e.g. `/etc/motd`) deleted from the
    /// image, plus opaque directories whose image content was replaced.
    pub deleted: Vec<String>,
    /// Entries written to the tar.
    pub entries: u64,
    /// Bytes of regular file content in the tar.
    pub bytes: u64,
}

/// Writes the diff of `upper` as a tar into `out`; returns `out` and the
/// summary. Entries are in sorted order so a diff is reproducible.
pub fn write_diff<W: Write>(upper: &Path, out: W) -> Result<(W, DiffSummary), DiffError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut summary = DiffSummary::default();
    visit(upper, Path::new(""), &mut builder, &mut summary)?;
    let out = builder.into_inner().map_err(|source| DiffError::Io {
        path: upper.to_path_buf(),
        source,
    })?;
    Ok((out, summary))
}

fn visit<W: Write>(
    dir: &Path,
    rel: &Path,
    builder: &mut tar::Builder<W>,
    summary: &mut DiffSummary,
) -> Result<(), DiffError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiffError::Io { path, source }
    };
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(err(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(err(dir))?;
    names.sort();
    for name in names {
        let full = dir.join(&name);
        let rel = rel.join(&name);
        let meta = fs::symlink_metadata(&full).map_err(err(&full))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            // A whiteout: the path was deleted from the image.
            summary.deleted.push(format!("/{}", rel.display()));
            continue;
        }
        builder
            .append_path_with_name(&full, &rel)
            .map_err(err(&full))?;
        summary.entries += 1;
        if ft.is_dir() {
            if xattr::get(&full, OPAQUE_XATTR).ok().flatten().as_deref() == Some(b"y") {
                // The directory replaced the image's: restore must empty it
                // before extracting the new content.
                summary.deleted.push(format!("/{}", rel.display()));
            }
            visit(&full, &rel, builder, summary)?;
        } else if ft.is_file() {
            summary.bytes += meta.len();
        }
    }
    Ok(())
}

/// Applies a checkpoint's rootfs changes to a new container's rootfs:
/// removes what `deleted` lists, then unpacks `diff` (a tar from
/// [`write_diff`]) over it. The rootfs belongs to the container and may
/// hold symlinks pointing anywhere on the host, so no path is followed
/// through a symlink: deletions whose parents are not real directories are
/// skipped, and the tar crate's `unpack` refuses entries that would land
/// outside `rootfs` after resolving links.
pub fn apply_diff(rootfs: &Path, deleted: &[String], diff: Option<&Path>) -> Result<(), DiffError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiffError::Io { path, source }
    };
    for d in deleted {
        let Ok(rel) = crate::archive::extract::checked_relative(d.trim_start_matches('/')) else {
            return Err(DiffError::Io {
                path: PathBuf::from(d),
                source: io::Error::new(io::ErrorKind::InvalidData, "unsafe path in deleted.files"),
            });
        };
        if rel.as_os_str().is_empty() || !parents_are_dirs(rootfs, &rel) {
            continue;
        }
        let target = rootfs.join(&rel);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&target).map_err(err(&target))?,
            Ok(_) => fs::remove_file(&target).map_err(err(&target))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&target)(e)),
        }
    }
    if let Some(diff) = diff {
        let mut ar = tar::Archive::new(open_maybe_compressed(diff).map_err(err(diff))?);
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(true);
        ar.set_preserve_mtime(true);
        ar.set_overwrite(true);
        ar.set_unpack_xattrs(false);
        ar.unpack(rootfs).map_err(err(diff))?;
    }
    Ok(())
}

/// Opens a rootfs diff, which is a plain tar from podckpt and CRI-O but
/// gzip-compressed (under the same name) from containerd 2.x.
pub fn open_maybe_compressed(path: &Path) -> io::Result<Box<dyn io::Read>> {
    use io::BufRead;
    let mut file = io::BufReader::with_capacity(1 << 20, fs::File::open(path)?);
    let head = file.fill_buf()?;
    Ok(match head.get(..4) {
        Some([0x1f, 0x8b, ..]) => Box::new(flate2::bufread::GzDecoder::new(file)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
        _ => Box::new(file),
    })
}

/// Whether every parent of `rel` under `root` is a real directory.
fn parents_are_dirs(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return true;
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn additions_changes_symlinks_and_whiteouts() {
        let upper = tempfile::tempdir().unwrap();
        let u = upper.path();
        fs::create_dir_all(u.join("etc")).unwrap();
        fs::write(u.join("etc/motd"), "changed").unwrap();
        fs::create_dir_all(u.join("data/sub")).unwrap();
        fs::write(u.join("data/sub/counter"), "42").unwrap();
        symlink("/data/sub/counter", u.join("link")).unwrap();
        let root = nix::unistd::Uid::effective().is_root();
        if root {
            // Whiteouts are 0/0 character devices; only root can make them.
            nix::sys::stat::mknod(
                &u.join("etc/deleted"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                0,
            )
            .unwrap();
        }
        let (bytes, summary) = write_diff(u, Vec::new()).unwrap();
        let mut names = vec![];
        let mut ar = tar::Archive::new(&bytes[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().display().to_string(),
                e.header().entry_type(),
            ));
        }
        let just_names: Vec<_> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            just_names,
            [
                "data",
                "data/sub",
                "data/sub/counter",
                "etc",
                "etc/motd",
                "link"
            ]
        );
        assert!(names
            .iter()
            .any(|(n, t)| n == "link" && *t == tar::EntryType::Symlink));
        assert_eq!(summary.bytes, 9);
        if root {
            assert_eq!(summary.deleted, ["/etc/deleted"]);
        }
    }

    #[test]
    fn apply_deletes_then_unpacks_and_never_follows_links_out() {
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir_all(upper.path().join("data")).unwrap();
        fs::write(upper.path().join("data/counter"), "42").unwrap();
        let (tar_bytes, _) = write_diff(upper.path(), Vec::new()).unwrap();
        let work = tempfile::tempdir().unwrap();
        let diff = work.path().join("rootfs-diff.tar");
        fs::write(&diff, tar_bytes).unwrap();

        let rootfs = tempfile::tempdir().unwrap();
        let r = rootfs.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/gone"), "x").unwrap();
        // A container-controlled link to a host directory.
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("precious"), "keep").unwrap();
        symlink(outside.path(), r.join("evil")).unwrap();
        apply_diff(
            r,
            &[
                "/etc/gone".into(),
                "/evil/precious".into(),
                "/missing/x".into(),
            ],
            Some(&diff),
        )
        .unwrap();
        assert!(!r.join("etc/gone").exists());
        assert_eq!(
            fs::read_to_string(outside.path().join("precious")).unwrap(),
            "keep"
        );
        assert_eq!(fs::read_to_string(r.join("data/counter")).unwrap(), "42");
        assert!(apply_diff(r, &["/../etc/passwd".into()], None).is_err());
    }
}
