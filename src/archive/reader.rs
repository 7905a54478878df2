//! Reading podckpt archives: the manifest of a pod archive (its first
//! entry), without decompressing the rest.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use super::manifest::{PodManifest, MANIFEST, POD_ARCHIVE_PLAIN, POD_ARCHIVE_ZSTD, POD_FORMAT};

/// The largest manifest accepted (a pod of hundreds of containers fits).
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed.
    #[error("{path}: {source}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// The OS or format error.
        #[source]
        source: io::Error,
    },
    /// The archive is not a podckpt pod archive or is damaged.
    #[error("{path}: {reason}")]
    Invalid {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The pod archive at `path`: the archive file itself, or the directory
/// CheckpointPod wrote it into. Links are not followed here: a link (or
/// anything else that is not a directory) is returned as it is, for
/// [`open_tar`] to refuse with a clear message.
pub fn locate_pod_archive(path: &Path) -> Option<PathBuf> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_dir() {
        return Some(path.to_path_buf());
    }
    [POD_ARCHIVE_ZSTD, POD_ARCHIVE_PLAIN]
        .iter()
        .map(|n| path.join(n))
        .find(|p| std::fs::symlink_metadata(p).is_ok())
}

/// An error of reading an archive, safe to show: tar's and zstd's format
/// errors can quote the bytes they failed to parse (a header's name field
/// is the first 100 bytes of whatever file was handed over as an archive,
/// `/etc/shadow` say), so only OS errors keep their text; a format error
/// becomes a fixed description with the position in the stream.
pub fn sanitize(source: io::Error, at: Option<u64>) -> io::Error {
    if source.raw_os_error().is_some() {
        return source;
    }
    let kind = source.kind();
    let msg = match (kind, at) {
        (io::ErrorKind::UnexpectedEof, Some(o)) => {
            format!("archive truncated (after byte {o} of the tar stream)")
        }
        (io::ErrorKind::UnexpectedEof, None) => "archive truncated".to_string(),
        (_, Some(o)) => {
            format!("malformed tar or compressed data after byte {o} of the tar stream")
        }
        (_, None) => "malformed tar or compressed data".to_string(),
    };
    io::Error::new(kind, msg)
}

/// Opens an archive file without following a link, refusing anything but
/// a regular file (a fifo would block, a device would be read as an archive).
pub fn open_archive_file(path: &Path) -> Result<File, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let invalid = |reason: &str| ReadError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(nix::libc::ELOOP) => {
                invalid("is a symbolic link; refused (name the archive itself)")
            }
            _ => ReadError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(invalid("is not a regular file; refused"));
    }
    Ok(file)
}

/// Opens an archive as a tar stream, decompressing zstd if the file starts
/// with zstd's magic number. The file is opened with [`open_archive_file`].
pub fn open_tar(path: &Path) -> Result<tar::Archive<Box<dyn Read>>, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_path_buf(),
        source: sanitize(source, None),
    };
    let mut file = BufReader::with_capacity(1 << 20, open_archive_file(path)?);
    let magic = {
        use std::io::BufRead;
        let buf = file.fill_buf().map_err(io_err)?;
        buf.get(..4)
            .map(|b| b == [0x28, 0xb5, 0x2f, 0xfd])
            .unwrap_or(false)
    };
    let reader: Box<dyn Read> = if magic {
        Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(io_err)?)
    } else {
        Box::new(file)
    };
    Ok(tar::Archive::new(reader))
}

/// Reads and checks the manifest, the archive's first entry.
pub fn read_manifest(path: &Path) -> Result<PodManifest, ReadError> {
    let mut ar = open_tar(path)?;
    let mut entries = ar.entries().map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source: sanitize(source, Some(0)),
    })?;
    read_manifest_entry(path, &mut entries)
}

/// Reads and checks the manifest from the first entry of `entries`, the
/// stream of the archive at `path`; the rest of the stream is left to the
/// caller, so that one pass over the archive reads all of it.
pub fn read_manifest_entry<R: Read>(
    path: &Path,
    entries: &mut tar::Entries<'_, R>,
) -> Result<PodManifest, ReadError> {
    let invalid = |reason: String| ReadError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let io_err = |source| ReadError::Io {
        path: path.to_path_buf(),
        source: sanitize(source, Some(0)),
    };
    let first = entries
        .next()
        .ok_or_else(|| invalid("empty archive".into()))?
        .map_err(io_err)?;
    // The name is not quoted: in a file that is no archive, it is the
    // file's first bytes.
    if first.path_bytes().as_ref() != MANIFEST.as_bytes() {
        return Err(invalid(format!(
            "not a podckpt pod archive: the entry at byte 0 is not {MANIFEST}"
        )));
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(invalid(format!(
            "manifest of {} bytes is implausibly large",
            first.size()
        )));
    }
    let mut data = Vec::with_capacity(first.size() as usize);
    first
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut data)
        .map_err(io_err)?;
    parse_manifest(path, &data)
}

/// Parses and checks a manifest's bytes (read from the archive at `path`).
pub fn parse_manifest(path: &Path, data: &[u8]) -> Result<PodManifest, ReadError> {
    let invalid = |reason: String| ReadError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let manifest: PodManifest = serde_json::from_slice(data).map_err(|e| {
        // serde_json's messages can quote the text they choke on.
        invalid(format!(
            "unreadable manifest ({} at line {}, column {})",
            match e.classify() {
                serde_json::error::Category::Io => "read error",
                serde_json::error::Category::Syntax => "syntax error",
                serde_json::error::Category::Data => "unexpected content",
                serde_json::error::Category::Eof => "truncated",
            },
            e.line(),
            e.column()
        ))
    })?;
    if manifest.format != POD_FORMAT {
        return Err(invalid(format!(
            "manifest format {:?} is not {POD_FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.version != super::manifest::POD_FORMAT_VERSION {
        return Err(invalid(format!(
            "manifest version {} is not supported (this podckpt reads {})",
            manifest.version,
            super::manifest::POD_FORMAT_VERSION
        )));
    }
    Ok(manifest)
}
