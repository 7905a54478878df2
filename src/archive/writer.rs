//! Writes a tar archive, optionally zstd-compressed on several threads,
//! straight to its destination: under a temporary name (mode 0600, created
//! exclusively) that is renamed into place only once everything is on disk.
//! Dropping an unfinished writer removes the temporary file, so an error
//! or a cancellation leaves nothing behind.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::direct::DirectFile;
use super::frames::FrameEncoder;

/// Mode of every archive podckptd writes: it holds process memory.
pub const ARCHIVE_MODE: u32 = 0o600;

/// Files at least this big are copied with [`COPY_BUF`]-sized reads.
const LARGE_FILE: u64 = 256 * 1024;
/// Read size for large files.
const COPY_BUF: usize = 1 << 20;

/// How the tar stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar (what crictl and the kubelet expect for `.tar`).
    None,
    /// zstd at this level (1..=19), on `workers` threads (0 = one thread).
    Zstd {
        /// Compression level.
        level: i32,
        /// Worker threads.
        workers: u32,
    },
}

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A filesystem call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error (ENOSPC for a full disk).
        #[source]
        source: io::Error,
    },
}

impl ArchiveError {
    /// The underlying OS error.
    pub fn io_error(&self) -> &io::Error {
        match self {
            ArchiveError::Io { source, .. } => source,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

enum Sink {
    Plain(DirectFile),
    Zstd(Box<FrameEncoder<DirectFile>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(buf),
            Sink::Zstd(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}

impl Sink {
    /// Ends the stream; the file is on disk (synced) when this returns.
    /// A zstd stream ends with the [`footer`](super::footer) describing it.
    fn finish(self) -> io::Result<File> {
        match self {
            Sink::Plain(w) => w.finish(),
            Sink::Zstd(w) => {
                let (mut file, footer) = w.finish()?;
                file.write_all(&super::footer::encode(&footer))?;
                file.finish()
            }
        }
    }
}

/// Counts bytes going through, for the archive's size.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Removes a temporary file when dropped, unless disarmed: an error or a
/// cancellation leaves nothing behind.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path, armed: true }
    }

    /// The guarded path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the file (it was renamed into place).
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// An archive being written. See the module docs.
pub struct ArchiveWriter {
    builder: tar::Builder<Counting<Sink>>,
    tmp: TempFile,
    dest: PathBuf,
    /// Reused for copying file contents in large pieces.
    copy_buf: Vec<u8>,
}

impl std::fmt::Debug for ArchiveWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("tmp", &self.tmp.path)
            .field("dest", &self.dest)
            .finish()
    }
}

/// The temporary name used while `dest` is written: hidden, in the same
/// directory (so the rename is atomic), marked with our pid.
pub fn temp_path_for(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.podckpt-tmp-{}", std::process::id()))
}

impl ArchiveWriter {
    /// Starts writing the archive that will appear at `dest`.
    pub fn create(dest: &Path, compression: Compression) -> Result<Self, ArchiveError> {
        let tmp = TempFile::new(temp_path_for(dest));
        // Written once, read rarely: straight to disk, not the page cache.
        let buffered = DirectFile::create_new(tmp.path(), ARCHIVE_MODE)
            .map_err(io_err("create", tmp.path()))?;
        let sink = match compression {
            Compression::None => Sink::Plain(buffered),
            Compression::Zstd { level, workers } => Sink::Zstd(Box::new(
                FrameEncoder::new(buffered, level, workers)
                    .map_err(io_err("start zstd for", tmp.path()))?,
            )),
        };
        let mut builder = tar::Builder::new(Counting {
            inner: sink,
            bytes: 0,
        });
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        Ok(Self {
            builder,
            tmp,
            dest: dest.to_path_buf(),
            copy_buf: Vec::new(),
        })
    }

    /// Adds a file with the given content.
    pub fn append_bytes(&mut self, path: &str, data: &[u8]) -> Result<(), ArchiveError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(now_secs());
        self.builder
            .append_data(&mut header, path, data)
            .map_err(io_err("write", &self.tmp.path))
    }

    /// Adds a real directory entry.
    pub fn append_dir_entry(&mut self, path: &str) -> Result<(), ArchiveError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_mode(0o700);
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mtime(now_secs());
        self.builder
            .append_data(&mut header, path, io::empty())
            .map_err(io_err("write", &self.tmp.path))
    }

    /// Adds one file from disk under `name`.
    pub fn append_file(&mut self, name: &str, src: &Path) -> Result<(), ArchiveError> {
        let meta = fs::symlink_metadata(src).map_err(io_err("stat", src))?;
        if !meta.is_file() || meta.len() < LARGE_FILE {
            return self
                .builder
                .append_path_with_name(src, name)
                .map_err(io_err("add", src));
        }
        self.append_large_file(name, src, &meta)
            .map_err(io_err("add", src))
    }

    /// A regular file copied in large pieces: tar's own copy reads 8 KiB
    /// at a time, which for gigabytes of CRIU pages is a quarter of a
    /// million system calls.
    fn append_large_file(&mut self, name: &str, src: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let mut file = File::open(src)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        // tar writes the header (and a GNU long-name entry when `name`
        // needs one) and, given no data, neither data nor padding; the
        // content and its padding follow here.
        self.builder.append_data(&mut header, name, io::empty())?;
        self.copy_content(&mut file, meta.len())
            .map_err(|e| match e {
                CopyError::Read(e) | CopyError::Write(e) => e,
            })
    }

    /// Adds a regular file (mode 0600) of exactly `size` bytes read from
    /// `src`, a stream such as an entry of another archive, copied in large
    /// pieces without holding it in memory. A failure to read `src` is
    /// told apart from one to write the archive.
    pub fn append_stream<R: Read>(
        &mut self,
        name: &str,
        size: u64,
        mtime: u64,
        src: &mut R,
    ) -> Result<(), CopyError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(mtime);
        self.builder
            .append_data(&mut header, name, io::empty())
            .map_err(CopyError::Write)?;
        self.copy_content(src, size)
    }

    /// Writes `size` bytes of `src` and the tar padding after them (the
    /// header is written already).
    fn copy_content<R: Read>(&mut self, src: &mut R, size: u64) -> Result<(), CopyError> {
        let out = self.builder.get_mut();
        let mut left = size;
        while left > 0 {
            let want = left.min(COPY_BUF as u64) as usize;
            let n = match &mut out.inner {
                // Straight into the block a zstd worker will compress. (An
                // error handing a full block to the workers counts as a read
                // here; the stream is refused either way.)
                Sink::Zstd(enc) => enc.read_from(src, want).map_err(CopyError::Read)?,
                Sink::Plain(w) => {
                    if self.copy_buf.is_empty() {
                        self.copy_buf = vec![0; COPY_BUF];
                    }
                    let n = src
                        .read(&mut self.copy_buf[..want])
                        .map_err(CopyError::Read)?;
                    w.write_all(&self.copy_buf[..n]).map_err(CopyError::Write)?;
                    n
                }
            };
            if n == 0 {
                return Err(CopyError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("source ended early: {size} bytes expected"),
                )));
            }
            out.bytes += n as u64;
            left -= n as u64;
        }
        let pad = (512 - size % 512) % 512;
        out.write_all(&[0u8; 512][..pad as usize])
            .map_err(CopyError::Write)
    }

    /// Adds `src` and everything below it under `prefix` (a real directory
    /// entry for `prefix` itself first), in sorted order. Symlinks are
    /// stored as links; sockets are skipped (tar cannot hold them).
    pub fn append_tree(&mut self, prefix: &str, src: &Path) -> Result<(), ArchiveError> {
        self.append_dir_entry(prefix)?;
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(io_err("read directory", src))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("read directory", src))?;
        names.sort();
        for name in names {
            let full = src.join(&name);
            let rel = format!("{prefix}/{}", name.to_string_lossy());
            let meta = fs::symlink_metadata(&full).map_err(io_err("stat", &full))?;
            if meta.is_dir() {
                self.append_tree(&rel, &full)?;
            } else if !meta.file_type().is_socket() {
                self.append_file(&rel, &full)?;
            }
        }
        Ok(())
    }

    /// Finishes the archive: ends the tar and the compression, writes it to
    /// disk, renames it into place and syncs the directory. Returns the
    /// archive's size in bytes.
    pub fn finish(self) -> Result<u64, ArchiveError> {
        self.finish_unless(|| false)
            .map(|size| size.unwrap_or_default())
    }

    /// [`Self::finish`], except that `abandon` is asked right before the
    /// rename that makes the archive visible: when it says so, the
    /// temporary file is removed and `None` returned. A caller that gave
    /// up while the last bytes were written gets no archive.
    pub fn finish_unless(
        self,
        abandon: impl FnOnce() -> bool,
    ) -> Result<Option<u64>, ArchiveError> {
        let done = self.complete()?;
        if abandon() {
            // The temporary file goes with `done`.
            return Ok(None);
        }
        done.commit().map(Some)
    }

    /// Ends the tar and the compression and writes the archive to disk
    /// under its temporary name; [`Completed::commit`] puts it in place.
    /// For callers that write several archives and want all or none.
    pub fn complete(self) -> Result<Completed, ArchiveError> {
        let Self {
            builder, tmp, dest, ..
        } = self;
        let path = tmp.path();
        let counting = builder.into_inner().map_err(io_err("finish tar", path))?;
        let file = counting.inner.finish().map_err(io_err("finish", path))?;
        let size = file.metadata().map_err(io_err("stat", path))?.size();
        Ok(Completed { tmp, dest, size })
    }

    /// Ends the current zstd frame here (no-op for a plain tar): what
    /// follows starts a new frame, and a reader that gets past this point
    /// has verified the checksum of everything before it.
    pub fn end_frame(&mut self) -> Result<(), ArchiveError> {
        let path = self.tmp.path.clone();
        match &mut self.builder.get_mut().inner {
            Sink::Zstd(enc) => enc.end_frame().map_err(io_err("write", &path)),
            Sink::Plain(_) => Ok(()),
        }
    }

    /// Bytes of (uncompressed) tar written so far.
    pub fn tar_bytes(&self) -> u64 {
        self.builder.get_ref().bytes
    }
}

/// Why copying a stream into an archive failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed (or it ended early).
    Read(io::Error),
    /// Writing the archive failed.
    Write(io::Error),
}

/// An archive written in full under its temporary name (removed when
/// dropped uncommitted).
#[derive(Debug)]
pub struct Completed {
    tmp: TempFile,
    dest: PathBuf,
    size: u64,
}

impl Completed {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where it goes.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames it into place and syncs the directory. Returns its size.
    pub fn commit(self) -> Result<u64, ArchiveError> {
        let Self { tmp, dest, size } = self;
        fs::rename(tmp.path(), &dest).map_err(io_err("rename into place", &dest))?;
        tmp.disarm();
        if let Some(dir) = dest.parent() {
            // Make the rename itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", dir))?;
        }
        Ok(size)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    fn entries(data: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut ar = tar::Archive::new(data);
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut buf = vec![];
                e.read_to_end(&mut buf).unwrap();
                (e.path().unwrap().display().to_string(), buf)
            })
            .collect()
    }

    #[test]
    fn zstd_archive_appears_atomically_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/pages-1.img"), vec![7u8; 300_000]).unwrap();
        fs::write(src.join("a.img"), b"a").unwrap();
        let dest = dir.path().join("out/pod.tar.zst");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let mut w = ArchiveWriter::create(
            &dest,
            Compression::Zstd {
                level: 3,
                workers: 2,
            },
        )
        .unwrap();
        w.append_bytes("manifest.json", b"{}").unwrap();
        w.append_tree("c1/checkpoint", &src).unwrap();
        assert!(!dest.exists(), "not visible before finish");
        let size = w.finish().unwrap();
        assert!(dest.exists());
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(size < 20_000, "300 KB of sevens compress: {size}");
        let data = zstd::decode_all(fs::File::open(&dest).unwrap()).unwrap();
        let names: Vec<_> = entries(&data).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "manifest.json",
                "c1/checkpoint",
                "c1/checkpoint/a.img",
                "c1/checkpoint/sub",
                "c1/checkpoint/sub/pages-1.img"
            ]
        );
        // Nothing else left in the directory.
        assert_eq!(fs::read_dir(dest.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn plain_tar_and_dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("c.tar");
        let mut w = ArchiveWriter::create(&dest, Compression::None).unwrap();
        w.append_bytes("x", b"hello").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        let mut w = ArchiveWriter::create(&dest, Compression::None).unwrap();
        w.append_dir_entry("checkpoint").unwrap();
        w.append_bytes("x", b"hello").unwrap();
        w.finish().unwrap();
        let got = entries(&fs::read(&dest).unwrap());
        assert_eq!(got[0].0, "checkpoint");
        assert_eq!(got[1], ("x".to_string(), b"hello".to_vec()));
    }
}
