//! The footer at the end of a podckpt zstd archive: a zstd skippable frame
//! (ignored by every zstd decoder, so `zstd -d | tar -x` still works) that
//! says how long the compressed data before it is and how much content it
//! holds.
//!
//! Why: a restore can then tell in a few microseconds, before it touches
//! the runtime, that an archive is complete (a truncated or partly copied
//! archive has no footer, or one that does not match its length), and
//! extract the bulk of it afterwards, while the containers are being
//! restored. The content itself is protected by each frame's checksum.
//! Archives without a footer (older ones, other tools') are still read, by
//! extracting them whole first.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// zstd's skippable-frame magic numbers are 0x184D2A50..=0x184D2A5F.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5C;
/// Ends the footer; versioned.
const TRAILER_MAGIC: &[u8; 8] = b"PCKFOOT1";
/// JSON is bounded: a footer is a few dozen bytes.
const MAX_JSON: u32 = 4096;

/// What the footer records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footer {
    /// zstd frames of content before the footer.
    pub frames: u64,
    /// Bytes of the archive before the footer.
    pub compressed_bytes: u64,
    /// Bytes of tar those frames decompress to.
    pub content_bytes: u64,
}

/// The footer's bytes: `[magic][len][json][json len][PCKFOOT1]`.
pub fn encode(f: &Footer) -> Vec<u8> {
    let json = serde_json::to_vec(f).unwrap_or_default();
    let payload_len = json.len() as u32 + 4 + TRAILER_MAGIC.len() as u32;
    let mut out = Vec::with_capacity(8 + payload_len as usize);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(TRAILER_MAGIC);
    out
}

/// The footer of the archive at `path`, if it has a well-formed one that
/// matches the file's length; `None` for archives without one (or cut
/// short, or damaged at the end).
pub fn read(path: &Path) -> std::io::Result<Option<Footer>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < 20 {
        return Ok(None);
    }
    let mut tail = [0u8; 12];
    file.seek(SeekFrom::Start(len - 12))?;
    file.read_exact(&mut tail)?;
    if &tail[4..] != TRAILER_MAGIC {
        return Ok(None);
    }
    let json_len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if json_len > MAX_JSON || u64::from(json_len) + 20 > len {
        return Ok(None);
    }
    let start = len - 20 - u64::from(json_len);
    let mut buf = vec![0u8; json_len as usize + 8];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut buf)?;
    let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let payload = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if magic != SKIPPABLE_MAGIC || payload != json_len + 12 {
        return Ok(None);
    }
    let Ok(footer) = serde_json::from_slice::<Footer>(&buf[8..]) else {
        return Ok(None);
    };
    Ok((footer.compressed_bytes == start).then_some(footer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zst");
        let body = zstd::encode_all(&b"hello"[..], 3).unwrap();
        let f = Footer {
            frames: 1,
            compressed_bytes: body.len() as u64,
            content_bytes: 5,
        };
        let mut data = body.clone();
        data.extend(encode(&f));
        std::fs::write(&path, &data).unwrap();
        assert_eq!(read(&path).unwrap(), Some(f));
        // Decoders skip it.
        assert_eq!(zstd::decode_all(&data[..]).unwrap(), b"hello");
        // Cut short anywhere: no footer.
        for cut in [1, 5, 12, data.len() / 2] {
            std::fs::write(&path, &data[..data.len() - cut]).unwrap();
            assert_eq!(read(&path).unwrap(), None, "cut {cut}");
        }
        // Bytes missing in the middle: the length does not match.
        let mut holed = body[1..].to_vec();
        holed.extend(encode(&f));
        std::fs::write(&path, &holed).unwrap();
        assert_eq!(read(&path).unwrap(), None);
        // No footer at all.
        std::fs::write(&path, &body).unwrap();
        assert_eq!(read(&path).unwrap(), None);
    }
}
