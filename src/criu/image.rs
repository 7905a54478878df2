//! Reading CRIU image files offline (no CRIU needed), for `podckpt inspect`.
//!
//! A protobuf image is two little-endian u32 magics (the common or service
//! magic, then the image type's own) followed by entries, each a
//! little-endian u32 length and that many bytes of protobuf. Only the few
//! messages inspect shows are declared here, by hand, with just the fields
//! it reads: prost skips the rest, so newer CRIU images still decode.

use prost::Message;

/// First magic of every per-process image.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// First magic of service images (stats, irmap cache).
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `pstree.img`.
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
/// `core-<tid>.img`.
pub const CORE_MAGIC: u32 = 0x5505_3847;

/// The largest single entry accepted: real pstree and core entries are a
/// few KB, so anything near this is a damaged or hostile image.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024 * 1024;

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Shorter than its two magics.
    #[error("image too short for its header ({0} bytes)")]
    Truncated(usize),
    /// Not the image type expected.
    #[error("image magic {found:#010x} is not the expected {expected:#010x}")]
    Magic {
        /// The type magic wanted.
        expected: u32,
        /// What the file holds.
        found: u32,
    },
    /// An entry runs past the end of the file or is implausibly large.
    #[error("entry {index} at offset {offset}: {reason}")]
    Entry {
        /// Entry number, from 0.
        index: usize,
        /// Byte offset of its length prefix.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

/// `pstree_entry` (images/pstree.proto): one process of the dumped tree.
#[derive(Clone, PartialEq, Message)]
pub struct PstreeEntry {
    /// Pid (in the container's pid namespace).
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    /// Parent pid, 0 for the tree's root.
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    /// Process group.
    #[prost(uint32, required, tag = "3")]
    pub pgid: u32,
    /// Session.
    #[prost(uint32, required, tag = "4")]
    pub sid: u32,
    /// Thread ids, the main thread included. CRIU writes proto2 repeated
    /// scalars unpacked; prost reads both encodings.
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// `core_entry` (images/core.proto), reduced to `tc`.
#[derive(Clone, PartialEq, Message)]
pub struct CoreEntry {
    /// Architecture (`core_entry.march`).
    #[prost(uint32, required, tag = "1")]
    pub mtype: u32,
    /// Per-task state; present in the thread-group leader's core only.
    #[prost(message, optional, tag = "3")]
    pub tc: Option<TaskCoreEntry>,
}

/// `task_core_entry`, reduced to `comm`.
#[derive(Clone, PartialEq, Message)]
pub struct TaskCoreEntry {
    /// The task's comm. Read as bytes: the kernel does not promise UTF-8
    /// and one odd name must not make the whole image unreadable.
    #[prost(bytes = "vec", optional, tag = "6")]
    pub comm: Option<Vec<u8>>,
}

impl CoreEntry {
    /// The command name, if this is a leader's core.
    pub fn comm(&self) -> Option<String> {
        self.tc
            .as_ref()
            .and_then(|tc| tc.comm.as_deref())
            .map(|c| String::from_utf8_lossy(c).into_owned())
    }
}

fn le32(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decodes every entry of an image whose type magic is `magic`.
pub fn decode_entries<M: Message + Default>(data: &[u8], magic: u32) -> Result<Vec<M>, ImageError> {
    let first = le32(data, 0).ok_or(ImageError::Truncated(data.len()))?;
    // CRIU before 1.x wrote only the type magic; accept that too.
    let mut at = if first == IMG_COMMON_MAGIC || first == IMG_SERVICE_MAGIC {
        let second = le32(data, 4).ok_or(ImageError::Truncated(data.len()))?;
        if second != magic {
            return Err(ImageError::Magic {
                expected: magic,
                found: second,
            });
        }
        8
    } else if first == magic {
        4
    } else {
        return Err(ImageError::Magic {
            expected: magic,
            found: first,
        });
    };
    let mut out = Vec::new();
    while at < data.len() {
        let entry_err = |reason: String| ImageError::Entry {
            index: out.len(),
            offset: at,
            reason,
        };
        let len = le32(data, at).ok_or_else(|| entry_err("truncated length".into()))? as usize;
        if len > MAX_ENTRY_BYTES {
            return Err(entry_err(format!("length {len} is implausibly large")));
        }
        let body = data
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| entry_err(format!("length {len} runs past the end")))?;
        out.push(M::decode(body).map_err(|e| entry_err(e.to_string()))?);
        at += 4 + len;
    }
    Ok(out)
}

/// Encodes entries as an image of type `magic`: what CRIU writes. Used to
/// build test fixtures without CRIU.
pub fn encode_entries<M: Message>(magic: u32, entries: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&magic.to_le_bytes());
    for e in entries {
        let body = e.encode_to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, ppid: u32, threads: &[u32]) -> PstreeEntry {
        PstreeEntry {
            pid,
            ppid,
            pgid: 1,
            sid: 1,
            threads: threads.to_vec(),
        }
    }

    #[test]
    fn pstree_round_trips() {
        let tree = vec![entry(1, 0, &[1]), entry(7, 1, &[7, 8, 9])];
        let img = encode_entries(PSTREE_MAGIC, &tree);
        assert_eq!(&img[..4], &[0x19, 0x43, 0x56, 0x54]);
        let got: Vec<PstreeEntry> = decode_entries(&img, PSTREE_MAGIC).unwrap();
        assert_eq!(got, tree);
    }

    #[test]
    fn pstree_reads_packed_threads_and_legacy_header() {
        // Hand-encoded entry: pid 5, ppid 1, pgid 5, sid 5, threads packed
        // [5, 6] (field 5, wire type 2), as another encoder might write.
        let body = [0x08, 5, 0x10, 1, 0x18, 5, 0x20, 5, 0x2a, 2, 5, 6];
        let mut img = PSTREE_MAGIC.to_le_bytes().to_vec();
        img.extend_from_slice(&(body.len() as u32).to_le_bytes());
        img.extend_from_slice(&body);
        let got: Vec<PstreeEntry> = decode_entries(&img, PSTREE_MAGIC).unwrap();
        assert_eq!(got[0].pid, 5);
        assert_eq!(got[0].threads, vec![5, 6]);
    }

    #[test]
    fn damaged_images_are_refused() {
        let img = encode_entries(PSTREE_MAGIC, &[entry(1, 0, &[1])]);
        assert!(matches!(
            decode_entries::<PstreeEntry>(&img, CORE_MAGIC),
            Err(ImageError::Magic { .. })
        ));
        assert_eq!(
            decode_entries::<PstreeEntry>(&img[..3], PSTREE_MAGIC),
            Err(ImageError::Truncated(3))
        );
        let cut = &img[..img.len() - 1];
        assert!(matches!(
            decode_entries::<PstreeEntry>(cut, PSTREE_MAGIC),
            Err(ImageError::Entry { index: 0, .. })
        ));
        let mut huge = img[..8].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_entries::<PstreeEntry>(&huge, PSTREE_MAGIC),
            Err(ImageError::Entry { .. })
        ));
    }

    #[test]
    fn core_comm_of_leader_only() {
        let leader = CoreEntry {
            mtype: 1,
            tc: Some(TaskCoreEntry {
                comm: Some(b"sleep".to_vec()),
            }),
        };
        let thread = CoreEntry { mtype: 1, tc: None };
        let img = encode_entries(CORE_MAGIC, &[leader]);
        let got: Vec<CoreEntry> = decode_entries(&img, CORE_MAGIC).unwrap();
        assert_eq!(got[0].comm().as_deref(), Some("sleep"));
        assert_eq!(thread.comm(), None);
    }
}
