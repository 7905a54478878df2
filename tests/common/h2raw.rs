//! A raw HTTP/2 peer for the hostile-peer tests: frames written byte by
//! byte (so they can be wrong on purpose), header blocks encoded by hand
//! (literals, and indexed references to whatever the test inserted), and
//! the server's frames read back to see which error it answered with.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame header announcing `len` bytes.
pub fn head(len: usize, ty: u8, flags: u8, stream: u32) -> Vec<u8> {
    let len = len as u32;
    let mut h = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    h.extend_from_slice(&stream.to_be_bytes());
    h
}

/// A whole frame.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = head(payload.len(), ty, flags, stream);
    f.extend_from_slice(payload);
    f
}

pub fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::with_capacity(entries.len() * 6);
    for (id, v) in entries {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn rst(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn ping(n: u64) -> Vec<u8> {
    frame(PING, 0, 0, &n.to_be_bytes())
}

/// An HPACK integer with an `n`-bit prefix, `flags` in the first byte's
/// high bits (RFC 7541, 5.1).
pub fn hpack_int(flags: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![flags | v as u8];
    }
    let mut out = vec![flags | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
    out
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(hpack_int(0, 7, s.len()));
    out.extend_from_slice(s);
}

/// A literal header field without indexing, new name.
pub fn literal(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    string(&mut out, name.as_bytes());
    string(&mut out, value);
    out
}

/// A literal header field with incremental indexing, new name: it becomes
/// dynamic-table entry 62.
pub fn literal_indexed(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x40];
    string(&mut out, name.as_bytes());
    string(&mut out, value);
    out
}

/// A gRPC request's header block, with the given authority.
pub fn request_block(path: &str, authority: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(literal(":method", b"POST"));
    b.extend(literal(":scheme", b"http"));
    b.extend(literal(":path", path.as_bytes()));
    b.extend(literal(":authority", authority));
    b.extend(literal("content-type", b"application/grpc"));
    b.extend(literal("te", b"trailers"));
    b
}

/// One uncompressed gRPC message.
pub fn grpc_message(msg: &[u8]) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    f
}

pub const VERSION: &str = "/runtime.v1.RuntimeService/Version";
pub const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";
pub const CHECKPOINT_POD: &str = "/runtime.v1.RuntimeService/CheckpointPod";

/// A complete unary call: HEADERS then the message with END_STREAM.
pub fn call(stream: u32, path: &str, authority: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut out = frame(
        HEADERS,
        END_HEADERS,
        stream,
        &request_block(path, authority),
    );
    out.extend(frame(DATA, END_STREAM, stream, &grpc_message(msg)));
    out
}

/// What the server sent.
#[derive(Debug, Default)]
pub struct Outcome {
    /// GOAWAY's last stream id, code and debug text.
    pub goaway: Option<(u32, u32, String)>,
    /// RST_STREAM frames: stream and code.
    pub resets: Vec<(u32, u32)>,
    /// Decoded header blocks (responses and trailers): stream and fields.
    pub headers: Vec<(u32, Vec<(String, String)>)>,
    /// DATA bytes received.
    pub data: usize,
    /// Whether the server closed the connection.
    pub closed: bool,
    pub frames: usize,
    /// Connection-level window granted by WINDOW_UPDATE.
    pub conn_window_updates: u64,
}

impl Outcome {
    /// The value of a field in any header block of `stream`.
    pub fn field(&self, stream: u32, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(s, _)| *s == stream)
            .flat_map(|(_, f)| f.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn goaway_code(&self) -> Option<u32> {
        self.goaway.as_ref().map(|g| g.1)
    }

    pub fn reset_code(&self, stream: u32) -> Option<u32> {
        self.resets.iter().find(|(s, _)| *s == stream).map(|r| r.1)
    }
}

/// A raw client connection.
pub struct Peer {
    pub stream: UnixStream,
    decoder: loona_hpack::Decoder<'static>,
    buf: Vec<u8>,
    block: Option<(u32, Vec<u8>)>,
}

impl Peer {
    pub async fn connect(socket: &Path) -> Self {
        Self {
            stream: UnixStream::connect(socket)
                .await
                .expect("connect to podckptd"),
            decoder: loona_hpack::Decoder::new(),
            buf: Vec::new(),
            block: None,
        }
    }

    /// Connects and sends the preface and an empty SETTINGS.
    pub async fn open(socket: &Path) -> Self {
        let mut p = Self::connect(socket).await;
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(&[]));
        p.send(&hello).await;
        p
    }

    /// Opens a connection and waits for the server's SETTINGS and its
    /// connection window, so that the test may send up to the windows
    /// podckptd advertises.
    pub async fn settled(socket: &Path) -> Self {
        let mut p = Self::open(socket).await;
        let out = p
            .read_until(Duration::from_secs(2), |o| o.conn_window_updates > 0)
            .await;
        assert!(out.conn_window_updates > 0, "no connection window: {out:?}");
        p
    }

    /// Writes bytes; a server that closed the connection already is fine
    /// (that is often the answer being tested).
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Reads what the server sends until it closes the connection, sends
    /// GOAWAY (plus a short while for what follows it), `until` says it has
    /// seen enough, or `within` passes. SETTINGS and PINGs are acknowledged
    /// as a real client would.
    pub async fn read_until(
        &mut self,
        within: Duration,
        until: impl Fn(&Outcome) -> bool,
    ) -> Outcome {
        let mut out = Outcome::default();
        let end = Instant::now() + within;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while let Some((h, payload)) = self.next_frame() {
                self.on_frame(&mut out, h, payload).await;
            }
            if out.closed || until(&out) {
                return out;
            }
            let deadline = if out.goaway.is_some() {
                end.min(Instant::now() + Duration::from_millis(200))
            } else {
                end
            };
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => out.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return out,
            }
        }
    }

    /// Reads until the connection ends or `within` passes.
    pub async fn outcome(&mut self, within: Duration) -> Outcome {
        self.read_until(within, |_| false).await
    }

    /// Acknowledges, unless the server is not reading (a flood test that
    /// filled its buffers): then the ack is dropped rather than waited for.
    async fn ack(&mut self, f: &[u8]) {
        let _ = tokio::time::timeout(Duration::from_millis(50), self.stream.write_all(f)).await;
    }

    fn next_frame(&mut self) -> Option<([u8; 9], Vec<u8>)> {
        if self.buf.len() < 9 {
            return None;
        }
        let len = (self.buf[0] as usize) << 16 | (self.buf[1] as usize) << 8 | self.buf[2] as usize;
        if self.buf.len() < 9 + len {
            return None;
        }
        let mut h = [0u8; 9];
        h.copy_from_slice(&self.buf[..9]);
        let payload = self.buf[9..9 + len].to_vec();
        self.buf.drain(..9 + len);
        Some((h, payload))
    }

    async fn on_frame(&mut self, out: &mut Outcome, h: [u8; 9], payload: Vec<u8>) {
        out.frames += 1;
        let (ty, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        match ty {
            DATA => out.data += payload.len(),
            HEADERS | CONTINUATION => {
                let frag = if ty == HEADERS {
                    let mut p = &payload[..];
                    if flags & 0x8 != 0 {
                        let pad = p[0] as usize;
                        p = &p[1..p.len() - pad];
                    }
                    if flags & 0x20 != 0 {
                        p = &p[5..];
                    }
                    self.block = Some((stream, Vec::new()));
                    p.to_vec()
                } else {
                    payload
                };
                if let Some((_, b)) = self.block.as_mut() {
                    b.extend_from_slice(&frag);
                }
                if flags & END_HEADERS != 0 {
                    if let Some((s, block)) = self.block.take() {
                        let fields = self
                            .decoder
                            .decode(&block)
                            .expect("podckptd's header block decodes")
                            .into_iter()
                            .map(|(n, v)| {
                                (
                                    String::from_utf8_lossy(&n).into_owned(),
                                    String::from_utf8_lossy(&v).into_owned(),
                                )
                            })
                            .collect();
                        out.headers.push((s, fields));
                    }
                }
            }
            RST_STREAM if payload.len() == 4 => out
                .resets
                .push((stream, u32::from_be_bytes(payload[..4].try_into().unwrap()))),
            SETTINGS if flags & ACK == 0 => self.ack(&frame(SETTINGS, ACK, 0, &[])).await,
            PING if flags & ACK == 0 => self.ack(&frame(PING, ACK, 0, &payload)).await,
            WINDOW_UPDATE if stream == 0 && payload.len() == 4 => {
                out.conn_window_updates +=
                    u64::from(u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff);
            }
            GOAWAY if payload.len() >= 8 => {
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                out.goaway = Some((last, code, debug));
            }
            _ => {}
        }
    }
}
