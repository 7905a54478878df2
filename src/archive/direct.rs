//! Sequential file output that bypasses the page cache (`O_DIRECT`), with
//! the disk writes on their own thread.
//!
//! Why: an archive is written once and read rarely, yet a buffered write
//! makes the kernel allocate (and later write back) page cache for every
//! byte of it. On a node that is a VM whose host backs guest memory lazily
//! (free page reporting, ballooning), each freshly allocated page costs a
//! hypervisor fault: measured here, buffered writes of a new file ran at
//! 0.4–2.7 GB/s depending on what the host had reclaimed, `O_DIRECT` writes
//! of the same data at 1.6–2.3 GB/s, and the `fsync` that makes the archive
//! durable then has nothing left to flush. The bytes go out in large
//! aligned chunks from a few reused buffers, so the writer's own memory is
//! bounded and touched once.
//!
//! Filesystems without `O_DIRECT` get the same chunked writes, buffered.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Size of one write; a multiple of every logical block size in use.
pub const CHUNK: usize = 4 << 20;
/// Alignment of the buffers and of every write but the last.
const ALIGN: usize = 4096;
/// Buffers in rotation: one being filled, the others queued or on disk.
const BUFFERS: usize = 3;

/// A heap buffer with an `ALIGN`-aligned window of `CHUNK` bytes, found
/// without `unsafe` by over-allocating and skipping to the first aligned
/// byte.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new() -> Self {
        let raw = vec![0u8; CHUNK + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Self { raw, start, len: 0 }
    }

    fn spare(&mut self) -> &mut [u8] {
        let (start, len) = (self.start, self.len);
        &mut self.raw[start + len..start + CHUNK]
    }

    fn filled(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// What the writer thread reports back: a buffer to reuse, or the error
/// that stopped it.
type Returned = Result<Aligned, io::Error>;

/// A new file written sequentially through `O_DIRECT` where the
/// filesystem allows it. Call [`DirectFile::finish`] to get the file back
/// (written and synced); dropping it unfinished stops the writer thread and
/// leaves the partial file to the caller's cleanup.
pub struct DirectFile {
    current: Option<Aligned>,
    to_writer: Option<SyncSender<Aligned>>,
    from_writer: Receiver<Returned>,
    writer: Option<JoinHandle<File>>,
    direct: bool,
    /// The error that stopped the writer; every later call reports it.
    failed: Option<(Option<i32>, io::ErrorKind, String)>,
}

/// A copy of `e` (io::Error is not Clone) that keeps its OS error code.
fn copy_error(e: &(Option<i32>, io::ErrorKind, String)) -> io::Error {
    match e.0 {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.1, e.2.clone()),
    }
}

impl std::fmt::Debug for DirectFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFile")
            .field("direct", &self.direct)
            .finish()
    }
}

impl DirectFile {
    /// Creates `path` exclusively with `mode`.
    pub fn create_new(path: &Path, mode: u32) -> io::Result<Self> {
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(nix::libc::O_DIRECT) {
            Ok(f) => (f, true),
            // EINVAL: this filesystem does not do O_DIRECT; nothing was
            // created (the flag is checked before the file is).
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => (open(0)?, false),
            Err(e) => return Err(e),
        };
        let (to_writer, inbox) = sync_channel::<Aligned>(BUFFERS);
        let (outbox, from_writer) = sync_channel::<Returned>(BUFFERS);
        for _ in 1..BUFFERS {
            // Spare buffers start out "returned".
            let _ = outbox.send(Ok(Aligned::new()));
        }
        let writer = std::thread::Builder::new()
            .name("archive-write".into())
            .spawn(move || write_loop(file, inbox, outbox))?;
        Ok(Self {
            current: Some(Aligned::new()),
            to_writer: Some(to_writer),
            from_writer,
            writer: Some(writer),
            direct,
            failed: None,
        })
    }

    /// Hands the full current buffer to the writer thread and takes a free
    /// one (waiting for a write to finish if all are in flight).
    fn ship(&mut self) -> io::Result<()> {
        let result = self.try_ship();
        if let Err(e) = &result {
            self.failed = Some((e.raw_os_error(), e.kind(), e.to_string()));
        }
        result
    }

    fn try_ship(&mut self) -> io::Result<()> {
        let (Some(full), Some(tx)) = (self.current.take(), &self.to_writer) else {
            return Err(io::Error::other("archive writer already stopped"));
        };
        if tx.send(full).is_err() {
            return Err(self.writer_error());
        }
        match self.from_writer.recv() {
            Ok(Ok(mut buf)) => {
                buf.len = 0;
                self.current = Some(buf);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.writer_error()),
        }
    }

    /// The error of a writer thread that went away.
    fn writer_error(&mut self) -> io::Error {
        while let Ok(r) = self.from_writer.try_recv() {
            if let Err(e) = r {
                return e;
            }
        }
        io::Error::other("archive writer thread ended")
    }

    /// Writes what is left, syncs the file to disk and returns it.
    pub fn finish(mut self) -> io::Result<File> {
        if let Some(e) = &self.failed {
            return Err(copy_error(e));
        }
        let Some(tail) = self.current.take() else {
            return Err(io::Error::other("archive writer already stopped"));
        };
        drop(self.to_writer.take());
        let file = self
            .writer
            .take()
            .expect("a writer thread")
            .join()
            .map_err(|_| io::Error::other("archive writer thread panicked"))?;
        // Every queued buffer has been written; report the first failure.
        while let Ok(r) = self.from_writer.try_recv() {
            r?;
        }
        let mut file = file;
        let data = tail.filled();
        if !data.is_empty() {
            if self.direct && data.len() % ALIGN != 0 {
                // O_DIRECT wants whole blocks: the unaligned tail goes
                // through the page cache.
                let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
                fcntl(&file, FcntlArg::F_SETFL(flags & !OFlag::O_DIRECT))?;
            }
            file.write_all(data)?;
        }
        file.sync_all()?;
        Ok(file)
    }
}

impl Write for DirectFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(copy_error(e));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let Some(cur) = self.current.as_mut() else {
            return Err(io::Error::other("archive writer already stopped"));
        };
        let spare = cur.spare();
        let n = spare.len().min(buf.len());
        spare[..n].copy_from_slice(&buf[..n]);
        cur.len += n;
        if cur.len == CHUNK {
            self.ship()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Partial chunks stay buffered until `finish`: an O_DIRECT write
        // must be whole blocks.
        Ok(())
    }
}

impl Drop for DirectFile {
    fn drop(&mut self) {
        drop(self.to_writer.take());
        if let Some(w) = self.writer.take() {
            // Drain so the thread never blocks on a full return channel.
            while self.from_writer.recv().is_ok() {}
            let _ = w.join();
        }
    }
}

/// The writer thread: writes each buffer in order and hands it back; after
/// an error it reports it and drops the rest.
fn write_loop(mut file: File, inbox: Receiver<Aligned>, outbox: SyncSender<Returned>) -> File {
    let mut failed = false;
    for buf in inbox {
        if failed {
            continue;
        }
        let r = file.write_all(buf.filled());
        match r {
            Ok(()) => {
                let _ = outbox.send(Ok(buf));
            }
            Err(e) => {
                failed = true;
                tracing::debug!(fd = file.as_raw_fd(), error = %e, "archive write failed");
                let _ = outbox.send(Err(e));
            }
        }
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    #[test]
    fn writes_everything_in_order_with_an_unaligned_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let data = pattern(3 * CHUNK + 12345);
        let mut f = DirectFile::create_new(&path, 0o600).unwrap();
        // Odd-sized writes that straddle chunk boundaries.
        for piece in data.chunks(1_000_003) {
            f.write_all(piece).unwrap();
        }
        f.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn exact_chunks_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let data = pattern(2 * CHUNK);
        let mut f = DirectFile::create_new(&a, 0o600).unwrap();
        f.write_all(&data).unwrap();
        f.finish().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), data);

        let b = dir.path().join("b");
        DirectFile::create_new(&b, 0o600).unwrap().finish().unwrap();
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 0);
    }

    #[test]
    fn refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let err = DirectFile::create_new(&a, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&a).unwrap(), b"x");
    }

    #[test]
    fn dropped_unfinished_stops_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let mut f = DirectFile::create_new(&a, 0o600).unwrap();
        f.write_all(&pattern(CHUNK + 10)).unwrap();
        drop(f);
        // The full chunk reached the file; the caller removes it.
        assert_eq!(std::fs::metadata(&a).unwrap().len(), CHUNK as u64);
    }

    #[test]
    fn a_full_disk_is_reported_as_enospc() {
        // /dev/full fails every write with ENOSPC; opened like the real
        // thing but without create_new, so build the writer by hand.
        let file = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let (to_writer, inbox) = sync_channel::<Aligned>(BUFFERS);
        let (outbox, from_writer) = sync_channel::<Returned>(BUFFERS);
        for _ in 1..BUFFERS {
            let _ = outbox.send(Ok(Aligned::new()));
        }
        let writer = std::thread::spawn(move || write_loop(file, inbox, outbox));
        let mut f = DirectFile {
            current: Some(Aligned::new()),
            to_writer: Some(to_writer),
            from_writer,
            writer: Some(writer),
            direct: false,
            failed: None,
        };
        let data = pattern(CHUNK);
        let mut err = None;
        for _ in 0..(BUFFERS + 2) {
            if let Err(e) = f.write_all(&data) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("a write fails once the writer reports ENOSPC");
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
        // And it stays failed.
        let again = f.write(b"x").unwrap_err();
        assert_eq!(again.raw_os_error(), Some(nix::libc::ENOSPC));
        assert_eq!(
            f.finish().unwrap_err().raw_os_error(),
            Some(nix::libc::ENOSPC)
        );
    }
}
