//! Extracting an archive for restore, after validating every entry.
//!
//! The archive is untrusted input: it may have been copied between nodes,
//! truncated, or crafted. So before anything is written:
//! - every path must be relative and made only of normal components (no
//!   `..`, no absolute paths, no empty names);
//! - only directories, regular files and symlinks are accepted; a symlink's
//!   target must be relative without `..`, so it cannot point out of the
//!   tree; hard links, devices and fifos are refused;
//! - nothing is ever written THROUGH a symlink: every parent directory is
//!   checked to be a real directory, and files are opened with O_NOFOLLOW
//!   and O_EXCL;
//! - when the manifest lists the files (pod archives), each regular file
//!   must be listed with exactly its size, and every listed file must be
//!   present (a truncated archive fails even if it ends on an entry
//!   boundary);
//! - the bytes written and the number of entries are bounded by
//!   [`Limits`] (podckptd's `--max-restore-bytes` and
//!   `--max-archive-entries`, the former further lowered by the caller to
//!   the free space of the target filesystem): the extraction stops at the
//!   first entry that would go past them, before writing it.
//!
//! The destination is private (0700, files 0600); on any error the caller
//! removes it (see [`crate::pod::restore`]).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::manifest::MANIFEST;
use super::reader::{open_tar, ReadError};

/// Default of `--max-restore-bytes`: the most one restore extracts.
pub const DEFAULT_MAX_RESTORE_BYTES: u64 = 64 << 30;
/// Default of `--max-archive-entries`: the most entries one archive holds.
pub const DEFAULT_MAX_ARCHIVE_ENTRIES: u64 = 1_000_000;

/// Bounds on what one extraction may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of regular files, in total.
    pub max_bytes: u64,
    /// Entries of any kind.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_RESTORE_BYTES,
            max_entries: DEFAULT_MAX_ARCHIVE_ENTRIES,
        }
    }
}

/// Why an archive was refused or could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The archive is damaged or crafted: it is refused as a whole.
    #[error("{archive}: entry {entry:?}: {reason}")]
    Invalid {
        /// The archive.
        archive: PathBuf,
        /// The offending entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the archive failed (truncated, corrupt compression).
    #[error("{archive}: unreadable: {source}")]
    Read {
        /// The archive.
        archive: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing the extracted files failed (ENOSPC...).
    #[error("writing {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The archive holds more than [`Limits`] allow.
    #[error("{archive}: {reason}")]
    Limit {
        /// The archive.
        archive: PathBuf,
        /// Which bound, and where the extraction stopped.
        reason: String,
    },
    /// The caller cancelled (deadline, client gone).
    #[error("cancelled")]
    Cancelled,
}

impl From<ReadError> for ExtractError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io { path, source } => ExtractError::Read {
                archive: path,
                source,
            },
            ReadError::Invalid { path, reason } => ExtractError::Invalid {
                archive: path,
                entry: String::new(),
                reason,
            },
        }
    }
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extracted {
    /// Regular files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The expected content of an archive: path → size, from its manifest.
pub type Listing = HashMap<String, u64>;

/// Extracts `archive` into `dest` (created 0700; must not exist), skipping
/// the entries `skip` says to. `listing`, when given, is the exact set of
/// regular files the archive must hold. `cancelled` is polled between
/// chunks so that a deadline stops a long extraction promptly.
pub fn extract(
    archive: &Path,
    dest: &Path,
    listing: Option<&Listing>,
    limits: &Limits,
    skip: &dyn Fn(&str) -> bool,
    cancelled: &dyn Fn() -> bool,
) -> Result<Extracted, ExtractError> {
    extract_in_groups(
        archive,
        dest,
        listing,
        limits,
        skip,
        &[],
        &mut |_| Ok(()),
        cancelled,
    )
}

/// The index of the group `key` belongs to: the first group that is `key`
/// or a directory above it.
pub(crate) fn group_of(groups: &[String], key: &str) -> Option<usize> {
    groups.iter().position(|g| {
        key == g
            || (key.len() > g.len()
                && key.starts_with(g.as_str())
                && key.as_bytes()[g.len()] == b'/')
    })
}

/// [`extract`], telling `ready` as soon as each of `groups` (directories of
/// the archive, e.g. one per container) is complete on disk: written,
/// and every file the listing names under it present. The entries of a
/// group must be contiguous in the archive (podckpt writes them so); a
/// group with no entries is complete at the end. `ready` may stop the
/// extraction with an error.
#[allow(clippy::too_many_arguments)]
pub fn extract_in_groups(
    archive: &Path,
    dest: &Path,
    listing: Option<&Listing>,
    limits: &Limits,
    skip: &dyn Fn(&str) -> bool,
    groups: &[String],
    ready: &mut dyn FnMut(usize) -> Result<(), ExtractError>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Extracted, ExtractError> {
    let invalid = |entry: &str, reason: String| ExtractError::Invalid {
        archive: archive.to_path_buf(),
        entry: entry.to_owned(),
        reason,
    };
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExtractError::Write { path, source }
    };
    // `dest` may exist already when a background extraction keeps its
    // state in it (see crate::restore::progress); never anything else.
    match fs::DirBuilder::new().mode(0o700).create(dest) {
        Err(e)
            if e.kind() == io::ErrorKind::AlreadyExists
                && fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) => {}
        other => other.map_err(write_err(dest))?,
    }
    let mut ar = open_tar(archive)?;
    let mut check = EntryCheck::new(archive, listing, limits, skip);
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    let mut done = Extracted::default();
    let mut writer = Writer::spawn();
    let mut current: Option<usize> = None;
    let mut closed = vec![false; groups.len()];
    // A group is complete once its files are written and none it should
    // hold is missing.
    let close_group = |g: usize,
                       writer: &mut Writer,
                       closed: &mut Vec<bool>,
                       check: &EntryCheck<'_>,
                       ready: &mut dyn FnMut(usize) -> Result<(), ExtractError>|
     -> Result<(), ExtractError> {
        closed[g] = true;
        if let Some((first, n)) = check.missing(|k| group_of(groups, k) == Some(g)) {
            return Err(invalid(
                &first,
                format!(
                    "listed in the manifest but missing from the archive ({n} missing under {}): truncated?",
                    groups[g]
                ),
            ));
        }
        writer.barrier()?;
        ready(g)
    };
    for entry in ar.entries().map_err(|e| check.read_err(e))? {
        if cancelled() {
            return Err(ExtractError::Cancelled);
        }
        let mut entry = entry.map_err(|e| check.read_err(e))?;
        let Checked {
            name,
            rel,
            key,
            kind,
        } = check.check(&mut entry)?;
        if matches!(kind, Kind::Skip) {
            continue;
        }
        let group = group_of(groups, &key);
        if group != current {
            if let Some(g) = current.take() {
                close_group(g, &mut writer, &mut closed, &check, ready)?;
            }
            if let Some(g) = group {
                if closed[g] {
                    return Err(invalid(
                        &name,
                        format!("the entries under {} are not contiguous", groups[g]),
                    ));
                }
            }
            current = group;
        }
        let target = dest.join(&rel);
        match kind {
            Kind::Skip => {}
            Kind::Dir => {
                make_dirs(dest, &rel, &mut dirs).map_err(|r| invalid(&name, r))?;
            }
            Kind::File { size } => {
                if let Some(parent) = rel.parent() {
                    make_dirs(dest, parent, &mut dirs).map_err(|r| invalid(&name, r))?;
                }
                let out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(write_err(&target))?;
                writer.open(out, target.clone())?;
                let mut left = size;
                while left > 0 {
                    if cancelled() {
                        return Err(ExtractError::Cancelled);
                    }
                    let mut chunk = writer.buffer();
                    let want = CHUNK.min(left as usize);
                    chunk.resize(want, 0);
                    let mut filled = 0;
                    while filled < want {
                        let n = entry
                            .read(&mut chunk[filled..])
                            .map_err(|e| check.read_err(e))?;
                        if n == 0 {
                            return Err(check.read_err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("truncated in {name}"),
                            )));
                        }
                        filled += n;
                    }
                    writer.write(chunk)?;
                    left -= want as u64;
                }
                done.files += 1;
                done.bytes += size;
            }
            Kind::Symlink { target: link } => {
                if let Some(parent) = rel.parent() {
                    make_dirs(dest, parent, &mut dirs).map_err(|r| invalid(&name, r))?;
                }
                std::os::unix::fs::symlink(&link, &target).map_err(write_err(&target))?;
            }
        }
    }
    check.read_to_end(ar)?;
    if let Some(g) = current.take() {
        close_group(g, &mut writer, &mut closed, &check, ready)?;
    }
    for g in 0..groups.len() {
        if !closed[g] {
            close_group(g, &mut writer, &mut closed, &check, ready)?;
        }
    }
    writer.finish()?;
    check.finish()?;
    Ok(done)
}

/// What an entry is, once [`EntryCheck::check`] accepted it.
#[derive(Debug)]
pub enum Kind {
    /// Nothing to write: the archive's root, the manifest, or an entry the
    /// caller's `skip` names.
    Skip,
    /// A directory.
    Dir,
    /// A regular file of `size` bytes (its listed size, within the limits).
    File {
        /// Its size.
        size: u64,
    },
    /// A symlink whose relative target stays inside the tree.
    Symlink {
        /// The link's target.
        target: PathBuf,
    },
}

/// An entry that passed [`EntryCheck::check`].
#[derive(Debug)]
pub struct Checked {
    /// Its name as stored (for error messages).
    pub name: String,
    /// Its path, relative and made of normal components only.
    pub rel: PathBuf,
    /// `rel` as a string: its key in the manifest's listing.
    pub key: String,
    /// What it is.
    pub kind: Kind,
}

/// The checks every reader of an untrusted archive applies to each entry,
/// in stream order (see the module docs): paths, entry types, symlink
/// targets, duplicates, the manifest's listing and the [`Limits`].
/// Extraction and [`super::export`] both read through it, so an archive
/// refused by one is refused by the other.
pub struct EntryCheck<'a> {
    archive: &'a Path,
    listing: Option<&'a Listing>,
    limits: &'a Limits,
    skip: &'a dyn Fn(&str) -> bool,
    seen: HashSet<String>,
    entries: u64,
    bytes: u64,
    /// Where in the tar stream the entry being read starts: named in
    /// errors instead of the bytes that could not be parsed.
    at: u64,
}

impl<'a> EntryCheck<'a> {
    /// Checks for the entries of `archive`. `listing`, when given, is the
    /// exact set of regular files it must hold; `skip` names entries that
    /// are accepted but not reported (nor required by the listing).
    pub fn new(
        archive: &'a Path,
        listing: Option<&'a Listing>,
        limits: &'a Limits,
        skip: &'a dyn Fn(&str) -> bool,
    ) -> Self {
        Self {
            archive,
            listing,
            limits,
            skip,
            seen: HashSet::new(),
            entries: 0,
            bytes: 0,
            at: 0,
        }
    }

    /// The archive refused because of `entry`.
    pub fn invalid(&self, entry: &str, reason: String) -> ExtractError {
        ExtractError::Invalid {
            archive: self.archive.to_path_buf(),
            entry: entry.to_owned(),
            reason,
        }
    }

    fn limit(&self, reason: String) -> ExtractError {
        ExtractError::Limit {
            archive: self.archive.to_path_buf(),
            reason,
        }
    }

    /// A read error of the archive, sanitized (see
    /// [`super::reader::sanitize`]) and placed in the stream.
    pub fn read_err(&self, source: io::Error) -> ExtractError {
        ExtractError::Read {
            archive: self.archive.to_path_buf(),
            source: super::reader::sanitize(source, Some(self.at)),
        }
    }

    /// Checks the next entry of the stream (counted against the limits
    /// before anything of it is used); its content is left to be read.
    pub fn check<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Checked, ExtractError> {
        self.at = entry.raw_header_position();
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(self.limit(format!(
                "more than {} entries (--max-archive-entries); stopped at byte {} of the tar stream",
                self.limits.max_entries, self.at
            )));
        }
        let raw = entry.path_bytes().into_owned();
        let name =
            String::from_utf8(raw).map_err(|_| self.invalid("?", "path is not UTF-8".into()))?;
        let rel = checked_relative(&name).map_err(|r| self.invalid(&name, r))?;
        let key = rel.to_string_lossy().into_owned();
        if rel
            .components()
            .next()
            .is_some_and(|c| c.as_os_str() == crate::restore::progress::STATE_DIR)
        {
            return Err(self.invalid(&name, "uses a name reserved for podckpt's own state".into()));
        }
        let checked = |kind| Checked {
            name: name.clone(),
            rel: rel.clone(),
            key: key.clone(),
            kind,
        };
        if key.is_empty() || key == MANIFEST || (self.skip)(&key) {
            return Ok(checked(Kind::Skip));
        }
        if !self.seen.insert(key.clone()) {
            return Err(self.invalid(&name, "appears twice".into()));
        }
        let kind = match entry.header().entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                if let Some(l) = self.listing {
                    match l.get(&key) {
                        Some(&want) if want == size => {}
                        Some(&want) => {
                            return Err(self
                                .invalid(&name, format!("{size} bytes, the manifest says {want}")))
                        }
                        None => {
                            return Err(self.invalid(&name, "not listed in the manifest".into()))
                        }
                    }
                }
                if self.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(self.limit(format!(
                        "more than {} bytes to extract (--max-restore-bytes, or the free space of the restore dir); stopped before the entry at byte {} of the tar stream",
                        self.limits.max_bytes, self.at
                    )));
                }
                self.bytes += size;
                Kind::File { size }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| self.read_err(e))?
                    .ok_or_else(|| self.invalid(&name, "symlink without target".into()))?
                    .into_owned();
                if link.is_absolute()
                    || link
                        .components()
                        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
                {
                    return Err(self.invalid(
                        &name,
                        format!("symlink to {} may point out of the archive", link.display()),
                    ));
                }
                Kind::Symlink { target: link }
            }
            other => {
                return Err(self.invalid(&name, format!("entry type {other:?} is not accepted")))
            }
        };
        Ok(checked(kind))
    }

    /// The first (by name) of the listed files `among` selects that were
    /// not seen so far, and how many such files there are.
    pub fn missing(&self, among: impl Fn(&str) -> bool) -> Option<(String, usize)> {
        missing_from(self.listing, &self.seen, self.skip, among)
    }

    /// Reads the stream to its very end: the tar's end marker can sit
    /// before the end of the last zstd frame, whose checksum is verified
    /// only at its end.
    pub fn read_to_end<R: Read>(&self, ar: tar::Archive<R>) -> Result<(), ExtractError> {
        let mut rest = ar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| self.read_err(e))?;
        Ok(())
    }

    /// After the last entry: every file the listing names was there.
    pub fn finish(&self) -> Result<(), ExtractError> {
        if let Some((first, n)) = self.missing(|_| true) {
            return Err(self.invalid(
                &first,
                format!(
                    "listed in the manifest but missing from the archive ({n} missing): truncated?"
                ),
            ));
        }
        Ok(())
    }
}

/// The first (by name) of the listed files `among` selects that were not
/// seen, and how many such files there are.
fn missing_from(
    listing: Option<&Listing>,
    seen: &HashSet<String>,
    skip: &dyn Fn(&str) -> bool,
    among: impl Fn(&str) -> bool,
) -> Option<(String, usize)> {
    let mut missing: Vec<&String> = listing?
        .keys()
        .filter(|k| among(k) && !seen.contains(*k) && !skip(k))
        .collect();
    missing.sort();
    missing.first().map(|f| ((*f).clone(), missing.len()))
}

/// Size of the chunks handed from the decompressing thread to the writer.
const CHUNK: usize = 1 << 20;
/// Chunks in flight: bounds the memory an extraction holds (16 MiB).
const IN_FLIGHT: usize = 16;

enum Chunk {
    Open(fs::File, PathBuf),
    Data(Vec<u8>),
    /// Answered once everything before it is written.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Writes extracted files on its own thread, so that decompression and
/// the copy into the destination (tmpfs or disk) run on two cores at once.
/// Buffers go back to the reader for reuse.
struct Writer {
    tx: Option<std::sync::mpsc::SyncSender<Chunk>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<Result<(), ExtractError>>>,
}

impl Writer {
    fn spawn() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(IN_FLIGHT);
        let (spare_tx, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 2);
        let thread = std::thread::Builder::new()
            .name("extract-writer".into())
            .spawn(move || {
                let mut current: Option<(fs::File, PathBuf)> = None;
                for chunk in rx {
                    match chunk {
                        Chunk::Open(f, p) => current = Some((f, p)),
                        Chunk::Data(data) => {
                            if let Some((f, p)) = current.as_mut() {
                                f.write_all(&data).map_err(|source| ExtractError::Write {
                                    path: p.clone(),
                                    source,
                                })?;
                            }
                            let _ = spare_tx.try_send(data);
                        }
                        Chunk::Barrier(ack) => {
                            // Close the last file so its data is complete.
                            current = None;
                            let _ = ack.send(());
                        }
                    }
                }
                Ok(())
            })
            .expect("spawning a thread");
        Self {
            tx: Some(tx),
            spare,
            thread: Some(thread),
        }
    }

    fn buffer(&self) -> Vec<u8> {
        self.spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK))
    }

    fn send(&mut self, c: Chunk) -> Result<(), ExtractError> {
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(c).is_ok())
            .unwrap_or(false);
        if sent {
            Ok(())
        } else {
            Err(self.stopped())
        }
    }

    /// The writer thread went away early: it failed, and its error says
    /// why.
    fn stopped(&mut self) -> ExtractError {
        match self.finish() {
            Err(e) => e,
            Ok(()) => ExtractError::Write {
                path: PathBuf::new(),
                source: io::Error::other("extract writer stopped"),
            },
        }
    }

    fn open(&mut self, f: fs::File, path: PathBuf) -> Result<(), ExtractError> {
        self.send(Chunk::Open(f, path))
    }

    fn write(&mut self, data: Vec<u8>) -> Result<(), ExtractError> {
        self.send(Chunk::Data(data))
    }

    /// Waits until everything sent so far is written.
    fn barrier(&mut self) -> Result<(), ExtractError> {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        self.send(Chunk::Barrier(ack))?;
        done.recv().map_err(|_| self.stopped())
    }

    /// Waits until everything is written; the first write error if any.
    fn finish(&mut self) -> Result<(), ExtractError> {
        self.tx.take();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ExtractError::Write {
                path: PathBuf::new(),
                source: io::Error::other("extract writer panicked"),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Error paths: stop the writer before the caller removes the files.
        let _ = self.finish();
    }
}

/// The entry's path as a relative path of normal components, or why not.
pub fn checked_relative(name: &str) -> Result<PathBuf, String> {
    if name.starts_with('/') {
        return Err("absolute path".into());
    }
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains `..`".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    Ok(out)
}

/// Creates `rel` (and its parents) under `root` as real directories,
/// refusing to go through anything that is not one (a symlink planted by an
/// earlier entry).
fn make_dirs(root: &Path, rel: &Path, made: &mut HashSet<PathBuf>) -> Result<(), String> {
    let mut cur = PathBuf::new();
    for c in rel.components() {
        cur.push(c);
        if made.contains(&cur) {
            continue;
        }
        let full = root.join(&cur);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", cur.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&full)
                    .map_err(|e| format!("create {}: {e}", cur.display()))?;
            }
            Err(e) => return Err(format!("stat {}: {e}", cur.display())),
        }
        made.insert(cur.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(
        entries: &[(&str, tar::EntryType, &[u8], Option<&str>)],
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Write the raw name so that `..` and absolute paths get in.
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
        (dir, path)
    }

    fn run(
        path: &Path,
        listing: Option<&Listing>,
    ) -> (tempfile::TempDir, Result<Extracted, ExtractError>) {
        let out = tempfile::tempdir().unwrap();
        let r = extract(
            path,
            &out.path().join("x"),
            listing,
            &Limits::default(),
            &|_| false,
            &|| false,
        );
        (out, r)
    }

    use tar::EntryType as T;

    #[test]
    fn extracts_files_dirs_and_inside_symlinks() {
        let (_d, p) = build(&[
            ("a/", T::Directory, b"", None),
            ("a/b.img", T::Regular, b"hello", None),
            ("./a/c/d", T::Regular, b"x", None),
            ("a/link", T::Symlink, b"", Some("c/d")),
        ]);
        let listing: Listing = [("a/b.img".to_string(), 5), ("a/c/d".to_string(), 1)].into();
        let (out, r) = run(&p, Some(&listing));
        let r = r.unwrap();
        assert_eq!((r.files, r.bytes), (2, 6));
        let x = out.path().join("x");
        assert_eq!(fs::read(x.join("a/b.img")).unwrap(), b"hello");
        assert_eq!(fs::read(x.join("a/link")).unwrap(), b"x");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&x).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::metadata(x.join("a/b.img"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[test]
    fn refuses_escapes() {
        for (entries, what) in [
            (vec![("../evil", T::Regular, &b"x"[..], None)], ".."),
            (vec![("a/../../evil", T::Regular, &b"x"[..], None)], ".."),
            (vec![("/etc/evil", T::Regular, &b"x"[..], None)], "absolute"),
            (vec![("l", T::Symlink, &b""[..], Some("/etc"))], "point out"),
            (
                vec![("l", T::Symlink, &b""[..], Some("../../etc"))],
                "point out",
            ),
            (
                vec![("h", T::Link, &b""[..], Some("/etc/shadow"))],
                "not accepted",
            ),
            (vec![("dev", T::Char, &b""[..], None)], "not accepted"),
            // A symlink to a directory, then a file written through it.
            (
                vec![
                    ("l", T::Symlink, &b""[..], Some("d")),
                    ("l/f", T::Regular, &b"x"[..], None),
                ],
                "not a directory",
            ),
        ] {
            let (_d, p) = build(&entries);
            let (out, r) = run(&p, None);
            let err = r.unwrap_err().to_string();
            assert!(err.contains(what), "{entries:?}: {err}");
            assert!(!out.path().join("evil").exists());
        }
    }

    #[test]
    fn listing_is_enforced_both_ways() {
        let (_d, p) = build(&[("a", T::Regular, b"hello", None)]);
        let wrong: Listing = [("a".to_string(), 4)].into();
        assert!(run(&p, Some(&wrong))
            .1
            .unwrap_err()
            .to_string()
            .contains("manifest says 4"));
        let other: Listing = [("b".to_string(), 5)].into();
        assert!(run(&p, Some(&other))
            .1
            .unwrap_err()
            .to_string()
            .contains("not listed"));
        let more: Listing = [("a".to_string(), 5), ("z".to_string(), 1)].into();
        assert!(run(&p, Some(&more))
            .1
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn limits_stop_before_the_first_entry_past_them() {
        let (_d, p) = build(&[
            ("a", T::Regular, b"12345", None),
            ("b", T::Regular, b"67890", None),
            ("c", T::Directory, b"", None),
        ]);
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("x");
        let bytes = Limits {
            max_bytes: 7,
            ..Limits::default()
        };
        let err = extract(&p, &dest, None, &bytes, &|_| false, &|| false).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ExtractError::Limit { .. }), "{msg}");
        assert!(
            msg.contains("more than 7 bytes") && msg.contains("at byte 1024"),
            "{msg}"
        );
        // Nothing of the entry past the bound was written.
        assert!(!dest.join("b").exists());
        let entries = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        let dest = out.path().join("y");
        let err = extract(&p, &dest, None, &entries, &|_| false, &|| false).unwrap_err();
        assert!(err.to_string().contains("more than 2 entries"), "{err}");
        assert!(!dest.join("c").exists());
    }

    #[test]
    fn format_errors_do_not_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        let mut data = b"root:$6$verysecrethash:19000:0:99999:7:::\n".repeat(20);
        data.resize(1024, b'x');
        fs::write(&p, &data).unwrap();
        let (_out, r) = run(&p, None);
        let msg = r.unwrap_err().to_string();
        assert!(
            !msg.contains("root:") && !msg.contains("verysecret"),
            "{msg}"
        );
        let m = super::super::reader::read_manifest(&p)
            .unwrap_err()
            .to_string();
        assert!(!m.contains("verysecret") && !m.contains("root:"), "{m}");
        assert!(m.contains(&p.display().to_string()), "{m}");
        // A link to it is refused outright.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let m = super::super::reader::read_manifest(&link)
            .unwrap_err()
            .to_string();
        assert!(m.contains("symbolic link"), "{m}");
    }

    #[test]
    fn truncated_archive_fails() {
        let (_d, p) = build(&[("a", T::Regular, &[7u8; 100_000], None)]);
        let data = fs::read(&p).unwrap();
        fs::write(&p, &data[..50_000]).unwrap();
        let err = run(&p, None).1.unwrap_err();
        assert!(matches!(err, ExtractError::Read { .. }), "{err}");
    }

    #[test]
    fn cancellation_stops() {
        let (_d, p) = build(&[("a", T::Regular, b"x", None)]);
        let out = tempfile::tempdir().unwrap();
        let r = extract(
            &p,
            &out.path().join("x"),
            None,
            &Limits::default(),
            &|_| false,
            &|| true,
        );
        assert!(matches!(r, Err(ExtractError::Cancelled)));
    }

    #[test]
    fn groups_are_ready_in_order_once_complete() {
        let (_d, path) = build(&[
            ("devshm/f", T::Regular, b"shm", None),
            ("containers/a/x", T::Regular, b"1", None),
            ("containers/a/y", T::Regular, b"22", None),
            ("containers/b/x", T::Regular, b"333", None),
        ]);
        let groups = [
            "devshm".to_string(),
            "containers/a".into(),
            "containers/b".into(),
        ];
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("x");
        let mut seen = vec![];
        let r = extract_in_groups(
            &path,
            &dest,
            None,
            &Limits::default(),
            &|_| false,
            &groups,
            &mut |g| {
                // Everything of the group is on disk when it is announced.
                if g == 1 {
                    assert_eq!(fs::read(dest.join("containers/a/y")).unwrap(), b"22");
                }
                seen.push(g);
                Ok(())
            },
            &|| false,
        );
        r.unwrap();
        assert_eq!(seen, [0, 1, 2]);

        // A group split in two is refused; a missing listed file fails its
        // group, not a later one.
        let (_d, path) = build(&[
            ("containers/a/x", T::Regular, b"1", None),
            ("containers/b/x", T::Regular, b"1", None),
            ("containers/a/z", T::Regular, b"1", None),
        ]);
        let out = tempfile::tempdir().unwrap();
        let err = extract_in_groups(
            &path,
            &out.path().join("x"),
            None,
            &Limits::default(),
            &|_| false,
            &groups[1..],
            &mut |_| Ok(()),
            &|| false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
        let listing: Listing = [
            ("containers/a/x".to_string(), 1),
            ("containers/a/w".to_string(), 1),
            ("containers/b/x".to_string(), 1),
        ]
        .into();
        let (_d, path) = build(&[
            ("containers/a/x", T::Regular, b"1", None),
            ("containers/b/x", T::Regular, b"1", None),
        ]);
        let out = tempfile::tempdir().unwrap();
        let mut seen = vec![];
        let err = extract_in_groups(
            &path,
            &out.path().join("x"),
            Some(&listing),
            &Limits::default(),
            &|_| false,
            &groups[1..],
            &mut |g| {
                seen.push(g);
                Ok(())
            },
            &|| false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("containers/a/w"), "{err}");
        assert!(seen.is_empty());

        // podckpt's own state name is reserved.
        let (_d, path) = build(&[(".podckpt/ready-0", T::Regular, b"", None)]);
        let (_o, r) = run(&path, None);
        assert!(r.unwrap_err().to_string().contains("reserved"));
    }

    /// Extracts `archive` in `groups`; the result and the groups called
    /// ready, in order.
    fn ready_groups(
        archive: &Path,
        groups: &[String],
    ) -> (Result<Extracted, ExtractError>, Vec<usize>) {
        let out = tempfile::tempdir().unwrap();
        let mut ready = vec![];
        let r = extract_in_groups(
            archive,
            &out.path().join("x"),
            None,
            &Limits::default(),
            &|_| false,
            groups,
            &mut |g| {
                ready.push(g);
                Ok(())
            },
            &|| false,
        );
        (r, ready)
    }

    #[test]
    fn a_group_is_never_ready_before_its_frames_are_verified() {
        use crate::archive::{ArchiveWriter, Compression};
        // Three groups of incompressible data, each in its own frames.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar.zst");
        let mut w = ArchiveWriter::create(
            &path,
            Compression::Zstd {
                level: 3,
                workers: 2,
            },
        )
        .unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        for g in ["a", "b", "c"] {
            w.end_frame().unwrap();
            w.append_bytes(&format!("containers/{g}/pages.img"), &noise(300_000))
                .unwrap();
        }
        w.finish().unwrap();
        let groups = [
            "containers/a".to_string(),
            "containers/b".into(),
            "containers/c".into(),
        ];
        let data = fs::read(&path).unwrap();
        for (damage_at, ready_before) in [(0.5, 1usize), (0.9, 2)] {
            let mut bad = data.clone();
            let at = (bad.len() as f64 * damage_at) as usize;
            bad[at] ^= 0x55;
            let p = dir.path().join(format!("bad-{ready_before}.tar.zst"));
            fs::write(&p, &bad).unwrap();
            let (r, ready) = ready_groups(&p, &groups);
            assert!(r.is_err(), "damage at {damage_at} detected");
            assert_eq!(
                ready,
                (0..ready_before).collect::<Vec<_>>(),
                "damage at {damage_at}"
            );
        }
        // Undamaged: all three.
        let (r, ready) = ready_groups(&path, &groups);
        r.unwrap();
        assert_eq!(ready, [0, 1, 2]);
    }
}
