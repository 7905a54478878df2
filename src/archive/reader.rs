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
/// CheckpointPod wrote it into.
pub fn locate_pod_archive(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    [POD_ARCHIVE_ZSTD, POD_ARCHIVE_PLAIN]
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
}

/// Opens an archive as a tar stream, decompressing zstd if the file starts
/// with zstd's magic number.
pub fn open_tar(path: &Path) -> Result<tar::Archive<Box<dyn Read>>, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err)?);
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
    let invalid = |reason: String| ReadError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let io_err = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut ar = open_tar(path)?;
    let mut entries = ar.entries().map_err(io_err)?;
    let first = entries
        .next()
        .ok_or_else(|| invalid("empty archive".into()))?
        .map_err(io_err)?;
    let name = first.path().map_err(io_err)?.to_string_lossy().into_owned();
    if name != MANIFEST {
        return Err(invalid(format!(
            "not a podckpt pod archive: first entry is {name:?}, not {MANIFEST}"
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
    let manifest: PodManifest =
        serde_json::from_slice(data).map_err(|e| invalid(format!("unreadable manifest: {e}")))?;
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
