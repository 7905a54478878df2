//! HTTP/2 framing (RFC 9113 §4, §6) as far as the relay needs it: split
//! frames off a read buffer, rewrite a frame's stream id, and write the few
//! frames podckptd originates itself. Header blocks are written as HPACK
//! literals without indexing (RFC 7541 §6.2.2), so they never touch either
//! peer's dynamic table.

use bytes::{BufMut, BytesMut};

/// What a client sends before its first frame.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
pub const HEAD_LEN: usize = 9;
/// The largest frame payload every peer must accept (the floor of
/// SETTINGS_MAX_FRAME_SIZE): what podckptd's own frames stay within.
pub const SAFE_FRAME: usize = 16_384;
/// The initial flow-control window of a connection and, unless a peer's
/// SETTINGS say otherwise, of a stream.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// Largest window a peer may grant (2^31 - 1).
pub const MAX_WINDOW: i64 = 0x7fff_ffff;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

/// END_STREAM on DATA and HEADERS; ACK on SETTINGS and PING.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;

/// SETTINGS identifiers the relay reads.
pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// A malformed frame: the connection ends with this error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (HTTP/2 error {code:#x})")]
pub struct FrameError {
    /// The RFC 9113 error code to send in GOAWAY.
    pub code: u32,
    /// What was wrong.
    pub what: &'static str,
}

impl FrameError {
    pub const fn protocol(what: &'static str) -> Self {
        Self {
            code: PROTOCOL_ERROR,
            what,
        }
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Splits the next complete frame (header and payload) off `buf`.
pub fn next_frame(buf: &mut BytesMut) -> Option<(Head, BytesMut)> {
    if buf.len() < HEAD_LEN {
        return None;
    }
    let head = Head::parse(&buf[..HEAD_LEN]);
    if buf.len() < HEAD_LEN + head.len {
        // Room for the rest, so the next read completes it.
        buf.reserve(HEAD_LEN + head.len - buf.len());
        return None;
    }
    Some((head, buf.split_to(HEAD_LEN + head.len)))
}

/// Points a whole frame at another stream.
pub fn set_stream(frame: &mut [u8], stream: u32) {
    frame[5..9].copy_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// The header block fragment of a HEADERS frame's payload, without padding
/// and priority fields.
pub fn headers_fragment(head: &Head, payload: &[u8]) -> Result<std::ops::Range<usize>, FrameError> {
    let mut start = 0;
    let mut pad = 0;
    if head.has(PADDED) {
        pad = usize::from(
            *payload
                .first()
                .ok_or(FrameError::protocol("HEADERS too short for its padding"))?,
        );
        start = 1;
    }
    if head.has(PRIORITY_FLAG) {
        start += 5;
    }
    if start + pad > payload.len() {
        return Err(FrameError::protocol("HEADERS padding exceeds the frame"));
    }
    Ok(start..payload.len() - pad)
}

/// The data of a DATA frame's payload, without padding.
pub fn data_payload<'a>(head: &Head, payload: &'a [u8]) -> Result<&'a [u8], FrameError> {
    if !head.has(PADDED) {
        return Ok(payload);
    }
    let pad = usize::from(
        *payload
            .first()
            .ok_or(FrameError::protocol("DATA too short for its padding"))?,
    );
    if 1 + pad > payload.len() {
        return Err(FrameError::protocol("DATA padding exceeds the frame"));
    }
    Ok(&payload[1..payload.len() - pad])
}

/// Reads the 31-bit value at `at` (stream ids, window increments).
pub fn u31(payload: &[u8], at: usize) -> Result<u32, FrameError> {
    payload
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
        .ok_or(FrameError {
            code: FRAME_SIZE_ERROR,
            what: "frame too short",
        })
}

/// The (identifier, value) pairs of a SETTINGS payload.
pub fn settings(payload: &[u8]) -> Result<Vec<(u16, u32)>, FrameError> {
    if payload.len() % 6 != 0 {
        return Err(FrameError {
            code: FRAME_SIZE_ERROR,
            what: "SETTINGS length is not a multiple of 6",
        });
    }
    Ok(payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect())
}

fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
}

/// Writes one frame.
pub fn write_frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.reserve(HEAD_LEN + payload.len());
    put_head(out, payload.len(), kind, flags, stream);
    out.put_slice(payload);
}

/// Writes a header block as HEADERS and as many CONTINUATION frames as
/// [`SAFE_FRAME`] needs.
pub fn write_header_block(out: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool) {
    let mut chunks = block.chunks(SAFE_FRAME).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    // An empty block still needs its HEADERS frame.
    let first: &[u8] = chunks.next().unwrap_or(&[]);
    let mut chunk = first;
    loop {
        let last = chunks.peek().is_none();
        if last {
            flags |= END_HEADERS;
        }
        write_frame(out, kind, flags, stream, chunk);
        match chunks.next() {
            Some(next) => chunk = next,
            None => break,
        }
        kind = CONTINUATION;
        flags = 0;
    }
}

pub fn write_rst(out: &mut BytesMut, stream: u32, code: u32) {
    write_frame(out, RST_STREAM, 0, stream, &code.to_be_bytes());
}

/// Grants `increment` more bytes; nothing is written for zero, which the
/// protocol forbids.
pub fn write_window_update(out: &mut BytesMut, stream: u32, increment: u64) {
    let mut left = increment;
    while left > 0 {
        let step = left.min(MAX_WINDOW as u64);
        write_frame(out, WINDOW_UPDATE, 0, stream, &(step as u32).to_be_bytes());
        left -= step;
    }
}

pub fn write_goaway(out: &mut BytesMut, last_stream: u32, code: u32) {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    payload[4..].copy_from_slice(&code.to_be_bytes());
    write_frame(out, GOAWAY, 0, 0, &payload);
}

pub fn write_settings(out: &mut BytesMut, settings: &[(u16, u32)]) {
    let mut payload = Vec::with_capacity(settings.len() * 6);
    for (id, value) in settings {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    write_frame(out, SETTINGS, 0, 0, &payload);
}

/// Appends one header field as a literal without indexing, new name, no
/// Huffman coding (RFC 7541 §6.2.2); a field its sender marked never to be
/// indexed stays so marked (§6.2.3), as intermediaries must keep it.
pub fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8], never_indexed: bool) {
    out.push(if never_indexed { 0x10 } else { 0 });
    for s in [name, value] {
        encode_length(out, s.len());
        out.extend_from_slice(s);
    }
}

/// A string length: an HPACK integer with a 7-bit prefix (§5.1), the
/// Huffman bit clear.
fn encode_length(out: &mut Vec<u8>, mut n: usize) {
    if n < 0x7f {
        out.push(n as u8);
        return;
    }
    out.push(0x7f);
    n -= 0x7f;
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_off_whole_and_only_whole() {
        let mut out = BytesMut::new();
        write_frame(&mut out, DATA, END_STREAM, 3, b"hello");
        write_rst(&mut out, 5, CANCEL);
        let mut buf = BytesMut::from(&out[..HEAD_LEN + 2]);
        assert_eq!(next_frame(&mut buf), None, "payload incomplete");
        buf.extend_from_slice(&out[HEAD_LEN + 2..]);
        let (head, frame) = next_frame(&mut buf).unwrap();
        assert_eq!(
            head,
            Head {
                len: 5,
                kind: DATA,
                flags: END_STREAM,
                stream: 3
            }
        );
        assert_eq!(&frame[HEAD_LEN..], b"hello");
        let (head, frame) = next_frame(&mut buf).unwrap();
        assert_eq!((head.kind, head.stream), (RST_STREAM, 5));
        assert_eq!(u31(&frame[HEAD_LEN..], 0).unwrap(), CANCEL);
        assert!(buf.is_empty());
    }

    #[test]
    fn stream_ids_are_rewritten_in_place() {
        let mut out = BytesMut::new();
        write_frame(&mut out, DATA, 0, 7, b"x");
        set_stream(&mut out, 1);
        assert_eq!(next_frame(&mut out).unwrap().0.stream, 1);
    }

    #[test]
    fn padding_and_priority_are_stripped() {
        let head = Head {
            len: 0,
            kind: HEADERS,
            flags: PADDED | PRIORITY_FLAG | END_HEADERS,
            stream: 1,
        };
        // pad length 2, 5 priority bytes, block "ab", 2 padding bytes
        let payload = [2, 0, 0, 0, 0, 9, b'a', b'b', 0, 0];
        let r = headers_fragment(&head, &payload).unwrap();
        assert_eq!(&payload[r], b"ab");
        let bad = [9, b'a'];
        assert!(headers_fragment(&head, &bad).is_err());
        let data = Head {
            len: 0,
            kind: DATA,
            flags: PADDED,
            stream: 1,
        };
        assert_eq!(data_payload(&data, &[1, b'z', 0]).unwrap(), b"z");
        assert!(data_payload(&data, &[5, b'z']).is_err());
    }

    #[test]
    fn large_header_blocks_continue_and_empty_ones_still_end() {
        let block = vec![7u8; SAFE_FRAME * 2 + 10];
        let mut out = BytesMut::new();
        write_header_block(&mut out, 9, &block, true);
        let frames: Vec<_> = std::iter::from_fn(|| next_frame(&mut out)).collect();
        let kinds: Vec<_> = frames.iter().map(|(h, _)| (h.kind, h.flags)).collect();
        assert_eq!(
            kinds,
            [
                (HEADERS, END_STREAM),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
        let total: usize = frames.iter().map(|(h, _)| h.len).sum();
        assert_eq!(total, block.len());

        write_header_block(&mut out, 9, &[], false);
        let (h, _) = next_frame(&mut out).unwrap();
        assert_eq!((h.kind, h.flags, h.len), (HEADERS, END_HEADERS, 0));
    }

    #[test]
    fn literals_decode_and_leave_the_table_empty() {
        let mut block = Vec::new();
        encode_literal(
            &mut block,
            b":path",
            b"/runtime.v1.RuntimeService/Version",
            false,
        );
        encode_literal(&mut block, b"x-long", &[b'v'; 300], false);
        encode_literal(&mut block, b"authorization", b"secret", true);
        let mut decoder = httlib_hpack::Decoder::default();
        let mut headers = Vec::new();
        decoder.decode(&mut block, &mut headers).unwrap();
        assert_eq!(headers[0].0, b":path");
        assert_eq!(headers[1].1.len(), 300);
        assert_eq!(headers[1].2, 0, "not indexed");
        assert_eq!(headers[2].2, httlib_hpack::Decoder::NEVER_INDEXED);
        // Indexed field 62 (the first dynamic entry) must not exist.
        assert!(decoder.decode(&mut vec![0x80 | 62], &mut headers).is_err());
    }

    #[test]
    fn window_updates_split_and_skip_zero() {
        let mut out = BytesMut::new();
        write_window_update(&mut out, 0, 0);
        assert!(out.is_empty());
        write_window_update(&mut out, 0, MAX_WINDOW as u64 + 5);
        let a = next_frame(&mut out).unwrap().1;
        let b = next_frame(&mut out).unwrap().1;
        assert_eq!(u31(&a[HEAD_LEN..], 0).unwrap(), MAX_WINDOW as u32);
        assert_eq!(u31(&b[HEAD_LEN..], 0).unwrap(), 5);
    }

    #[test]
    fn settings_parse_and_reject_odd_lengths() {
        let mut out = BytesMut::new();
        write_settings(
            &mut out,
            &[(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20), (5, 1 << 15)],
        );
        let (_, f) = next_frame(&mut out).unwrap();
        assert_eq!(
            settings(&f[HEAD_LEN..]).unwrap(),
            [(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20), (5, 1 << 15)]
        );
        assert!(settings(&[0; 5]).is_err());
    }
}
