//! The CRI relay: podckptd's transparent path at the HTTP/2 frame level.
//!
//! Each client connection gets its own connection to the runtime, and the
//! calls podckptd does not serve are relayed frame by frame: DATA, flow
//! control, SETTINGS and PING pass as they are, only the stream ids are
//! renumbered and the header blocks re-encoded. That keeps a passed-through
//! call to one read and one write per direction, no per-call task, no
//! message decoding, which is what the proxy bench's latency and throughput
//! targets need (a full HTTP/2 server plus client cost three times that).
//!
//! Three things make splicing streams out of a connection sound:
//! - **Stream ids.** Calls podckptd serves never reach the runtime, and a
//!   sniffed call is only forwarded once its request is complete, so the
//!   runtime gets its own dense, increasing ids, mapped back on the way out.
//! - **Header compression.** HPACK state lives per connection and direction.
//!   Both directions are decoded (keeping each sender's table) and written
//!   to the other side as literals without indexing, so dropping or adding
//!   a header block never desynchronizes a peer's table.
//! - **Connection-level flow control.** Bytes of calls podckptd serves
//!   count against the client's connection window the runtime also sends
//!   into. Request bytes podckptd consumes are given back to the client at
//!   once; response bytes it sends are deducted from the client's next
//!   window updates before they are passed on, and runtime DATA that would
//!   overrun the client's real window meanwhile waits here (at most as many
//!   bytes as podckptd has sent).
//!
//! The calls podckptd serves (the intercepted and sniffed paths of
//! [`Intercept`]) are collected and handed to the HTTP-level
//! [`CriProxy`](super::proxy::CriProxy), which answers them or forwards
//! them through its own channel.

mod frame;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::Status;
use tower::{Service, ServiceExt};

use super::client::MAX_MESSAGE_SIZE;
use super::proxy::{grpc_timeout_value, Intercept, Observer};
use frame::*;

/// How much one read takes from a socket at most.
const READ_CHUNK: usize = 64 * 1024;
/// Output buffered for a peer above which the other side is not read until
/// it drains (flow control bounds DATA; this bounds everything else).
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// Largest header block accepted (HEADERS plus CONTINUATIONs).
const MAX_HEADER_BLOCK: usize = 1024 * 1024;

/// The HTTP-level service that answers the calls podckptd serves itself
/// (in podckptd, [`CriProxy`](super::proxy::CriProxy)).
pub trait ServedCalls:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T> ServedCalls for T where
    T: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Relays client connections to the runtime socket, serving the
/// intercepted calls with `served`.
pub struct Relay<S> {
    upstream_path: Arc<Path>,
    connect_timeout: Duration,
    intercept: Intercept,
    served: S,
    /// Where served calls run (podckptd's main runtime).
    spawner: tokio::runtime::Handle,
}

impl<S: ServedCalls> Relay<S> {
    /// A relay to the runtime socket at `upstream_path`.
    pub fn new(
        upstream_path: &Path,
        connect_timeout: Duration,
        intercept: Intercept,
        served: S,
        spawner: tokio::runtime::Handle,
    ) -> Self {
        Self {
            upstream_path: upstream_path.into(),
            connect_timeout,
            intercept,
            served,
            spawner,
        }
    }

    /// Serves one client connection until the client closes it, or until
    /// `shutdown` turns true and its calls in flight are done.
    pub async fn serve(&self, client: UnixStream, shutdown: watch::Receiver<bool>) {
        let upstream = match self.connect().await {
            Ok(s) => Upstream::Up(s),
            Err(why) => {
                tracing::debug!(error = %why, "runtime not reachable; calls fail until it is");
                Upstream::Down
            }
        };
        let mut conn = Conn::new(self, client, upstream);
        if let Err(err) = conn.run(shutdown).await {
            tracing::debug!(error = %err, "client connection ended with error");
        }
        conn.abort_served();
    }

    async fn connect(&self) -> Result<UnixStream, String> {
        match tokio::time::timeout(
            self.connect_timeout,
            UnixStream::connect(&*self.upstream_path),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no connection within {:?}", self.connect_timeout)),
        }
    }

    fn unavailable(&self, why: &str) -> Status {
        Status::unavailable(format!(
            "podckptd: container runtime at {} is unavailable: {why}",
            self.upstream_path.display()
        ))
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("client socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("client broke the protocol: {0}")]
    Client(FrameError),
}

/// The runtime side of a client connection.
enum Upstream {
    /// Not connected yet: the next relayed call tries.
    Down,
    Up(UnixStream),
}

/// A call relayed to the runtime.
struct Relayed {
    /// Its stream id on the runtime connection.
    up: u32,
    client_done: bool,
    up_done: bool,
    /// The runtime's response headers went out.
    answered: bool,
    observer: Option<Observer>,
}

/// A call podckptd serves itself.
struct Served {
    request: Option<http::request::Parts>,
    body: BytesMut,
    client_done: bool,
    task: Option<tokio::task::AbortHandle>,
    /// How much the client lets this stream receive.
    window: i64,
    pending: VecDeque<Out>,
    finished: bool,
}

enum Stream {
    Relayed(Relayed),
    Served(Box<Served>),
}

/// A served call's response, piece by piece.
enum Out {
    Head(http::response::Parts, bool),
    Data(Bytes),
    Trailers(http::HeaderMap),
    End,
}

/// Where the connection is in closing.
#[derive(Clone, Copy)]
enum GoAway {
    Not,
    /// GOAWAY with the largest id sent, and a PING after it.
    Announced,
    /// The PING came back: GOAWAY with the last stream id sent.
    Final(u32),
}

/// The payload of podckptd's own PING, which follows its first GOAWAY.
const OUR_PING: &[u8; 8] = b"podckpt!";

/// What a frame did to one direction's header-block assembly.
enum Assembly {
    /// A header block is complete.
    Complete(Block),
    /// A block is under way; more CONTINUATION frames follow.
    Pending,
    /// Neither HEADERS nor the CONTINUATION of a block under way.
    Other,
}

/// Runs a frame through the header-block assembly of one direction, whose
/// block under way (if any) is `pending`: HEADERS starts a block,
/// CONTINUATION adds to it, and anything else in the middle of a block is
/// a protocol error.
fn assemble(
    pending: &mut Option<Block>,
    head: &Head,
    frame: &[u8],
) -> Result<Assembly, FrameError> {
    let payload = &frame[HEAD_LEN..];
    match pending {
        Some(block) => {
            if head.kind != CONTINUATION || head.stream != block.stream {
                return Err(FrameError::protocol("header block interrupted"));
            }
            block.bytes.extend_from_slice(payload);
            if block.bytes.len() > MAX_HEADER_BLOCK {
                return Err(FrameError::protocol("header block too large"));
            }
        }
        None if head.kind == HEADERS => {
            let range = headers_fragment(head, payload)?;
            *pending = Some(Block {
                stream: head.stream,
                end_stream: head.has(END_STREAM),
                bytes: payload[range].to_vec(),
            });
        }
        None if head.kind == CONTINUATION => {
            return Err(FrameError::protocol("CONTINUATION without HEADERS"));
        }
        None => return Ok(Assembly::Other),
    }
    Ok(match pending.take_if(|_| head.has(END_HEADERS)) {
        Some(block) => Assembly::Complete(block),
        None => Assembly::Pending,
    })
}

/// One line per frame at trace level (`podckpt::cri::relay=trace`).
fn trace_frame(from: &str, head: &Head) {
    tracing::trace!(
        kind = head.kind,
        flags = head.flags,
        stream = head.stream,
        len = head.len,
        "{from} frame"
    );
}

/// A header block being assembled from HEADERS and CONTINUATION.
struct Block {
    stream: u32,
    end_stream: bool,
    bytes: Vec<u8>,
}

struct Conn<'r, S> {
    relay: &'r Relay<S>,
    client: UnixStream,
    client_in: BytesMut,
    client_out: BytesMut,
    preface_seen: bool,
    upstream: Upstream,
    up_in: BytesMut,
    up_out: BytesMut,
    /// The client's and the runtime's HPACK state.
    client_hpack: httlib_hpack::Decoder<'static>,
    up_hpack: httlib_hpack::Decoder<'static>,
    /// What podckptd sends the runtime is its own encoding.
    up_hpack_out: httlib_hpack::Encoder<'static>,
    /// A smaller table the runtime asked for, announced in the next block.
    up_table_size: Option<u32>,
    fields: Vec<Field>,
    client_block: Option<Block>,
    up_block: Option<Block>,
    streams: HashMap<u32, Stream>,
    /// Runtime stream id → client stream id.
    from_up: HashMap<u32, u32>,
    next_up_id: u32,
    last_client_id: u32,
    /// The client's SETTINGS so far, replayed to a runtime connected late.
    client_settings: Vec<(u16, u32)>,
    client_initial_window: i64,
    /// SETTINGS ACKs from the client that answer podckptd's own SETTINGS.
    own_settings_unacked: u32,
    /// SETTINGS ACKs from the runtime that answer replayed SETTINGS.
    swallow_up_acks: u32,
    /// The client's real connection window for what it receives.
    client_window: i64,
    /// Bytes of served responses not yet deducted from the client's window
    /// updates to the runtime.
    debt: u64,
    /// Runtime frames waiting for the client's window, in order.
    held: VecDeque<(usize, Bytes)>,
    /// The client's view of how much it may still send on the connection.
    client_send_window: i64,
    /// The runtime's view of the same.
    up_window: i64,
    /// Credit the client holds that the runtime never granted (after a
    /// reconnect), taken out of the runtime's window updates.
    up_debt: u64,
    /// Client frames waiting for the runtime's window, in order.
    up_held: VecDeque<(usize, Bytes)>,
    /// The runtime said GOAWAY: no new calls go to this connection.
    up_draining: bool,
    goaway: GoAway,
    deadlines: BinaryHeap<Reverse<(Instant, u32)>>,
    served_tx: mpsc::Sender<(u32, Out)>,
    served_rx: mpsc::Receiver<(u32, Out)>,
    scratch: Vec<u8>,
}

enum Event {
    ClientReadable,
    UpReadable,
    Writable,
    Served(Option<(u32, Out)>),
    Deadline,
    Shutdown,
}

impl<'r, S: ServedCalls> Conn<'r, S> {
    fn new(relay: &'r Relay<S>, client: UnixStream, upstream: Upstream) -> Self {
        let (served_tx, served_rx) = mpsc::channel(64);
        let mut conn = Self {
            relay,
            client,
            client_in: BytesMut::with_capacity(READ_CHUNK),
            client_out: BytesMut::with_capacity(READ_CHUNK),
            preface_seen: false,
            upstream: Upstream::Down,
            up_in: BytesMut::with_capacity(READ_CHUNK),
            up_out: BytesMut::with_capacity(READ_CHUNK),
            client_hpack: httlib_hpack::Decoder::default(),
            up_hpack: httlib_hpack::Decoder::default(),
            up_hpack_out: httlib_hpack::Encoder::default(),
            up_table_size: None,
            fields: Vec::with_capacity(16),
            client_block: None,
            up_block: None,
            streams: HashMap::new(),
            from_up: HashMap::new(),
            next_up_id: 1,
            last_client_id: 0,
            client_settings: Vec::new(),
            client_initial_window: DEFAULT_WINDOW,
            own_settings_unacked: 0,
            swallow_up_acks: 0,
            client_window: DEFAULT_WINDOW,
            debt: 0,
            held: VecDeque::new(),
            client_send_window: DEFAULT_WINDOW,
            up_window: DEFAULT_WINDOW,
            up_debt: 0,
            up_held: VecDeque::new(),
            up_draining: false,
            goaway: GoAway::Not,
            deadlines: BinaryHeap::new(),
            served_tx,
            served_rx,
            scratch: Vec::with_capacity(1024),
        };
        match upstream {
            Upstream::Up(s) => conn.attach(s),
            _ => {
                // No runtime to speak for us: podckptd's own server preface
                // (all defaults), so the client can start its calls.
                write_settings(&mut conn.client_out, &[]);
                conn.own_settings_unacked += 1;
            }
        }
        conn
    }

    /// Starts the runtime connection: preface, then the client's SETTINGS
    /// so far (the runtime's ACK of those is not the client's to see).
    fn attach(&mut self, s: UnixStream) {
        self.up_out.clear();
        self.up_hpack_out = httlib_hpack::Encoder::default();
        self.up_table_size = None;
        self.up_out.extend_from_slice(PREFACE);
        write_settings(&mut self.up_out, &self.client_settings);
        self.swallow_up_acks = 1;
        self.upstream = Upstream::Up(s);
        // A fresh connection starts with the protocol's window, whatever
        // the client was granted on an earlier one: credit the client holds
        // beyond it is taken out of the runtime's next window updates (its
        // DATA waits here meanwhile), and credit it lacks is granted now.
        self.up_window = DEFAULT_WINDOW;
        self.up_held.clear();
        if self.client_send_window > DEFAULT_WINDOW {
            self.up_debt = (self.client_send_window - DEFAULT_WINDOW) as u64;
        } else {
            self.up_debt = 0;
            self.grant_client((DEFAULT_WINDOW - self.client_send_window) as u64);
        }
    }

    /// Gives the client `n` more bytes of connection window.
    fn grant_client(&mut self, n: u64) {
        self.client_send_window += n as i64;
        write_window_update(&mut self.client_out, 0, n);
    }

    /// Sends a frame to the runtime in order, holding it (and everything
    /// after it) while DATA would overrun the runtime's window.
    fn up_send(&mut self, frame: &[u8], data_len: usize) {
        if !matches!(self.upstream, Upstream::Up(_)) {
            return;
        }
        if self.up_held.is_empty() && self.up_window >= data_len as i64 {
            self.up_window -= data_len as i64;
            self.up_out.extend_from_slice(frame);
        } else {
            self.up_held
                .push_back((data_len, Bytes::copy_from_slice(frame)));
        }
    }

    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ConnError> {
        if *shutdown.borrow() {
            self.start_goaway();
        }
        loop {
            self.flush()?;
            if matches!(self.goaway, GoAway::Final(_))
                && self.streams.is_empty()
                && self.held.is_empty()
                && self.client_out.is_empty()
            {
                return Ok(());
            }
            let event = {
                let up = match &self.upstream {
                    Upstream::Up(s) => Some(s),
                    _ => None,
                };
                let read_client = self.up_out.len() < HIGH_WATER;
                let read_up = up.is_some() && self.client_out.len() < HIGH_WATER;
                let write_client = !self.client_out.is_empty();
                let write_up = up.is_some() && !self.up_out.is_empty();
                let next_deadline = self.deadlines.peek().map(|Reverse((at, _))| *at);
                tokio::select! {
                    r = self.client.readable(), if read_client => { r?; Event::ClientReadable }
                    // A readiness error shows in the read that follows.
                    _ = async { up.expect("checked").readable().await }, if read_up => Event::UpReadable,
                    r = self.client.writable(), if write_client => { r?; Event::Writable }
                    _ = async { up.expect("checked").writable().await }, if write_up => Event::Writable,
                    m = self.served_rx.recv() => Event::Served(m),
                    _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => Event::Deadline,
                    r = shutdown.changed(), if matches!(self.goaway, GoAway::Not) => match r {
                        Ok(()) if !*shutdown.borrow() => continue,
                        _ => Event::Shutdown,
                    },
                }
            };
            match event {
                Event::ClientReadable => {
                    if !self.read_client()? {
                        // The client hung up: nothing left to answer.
                        return Ok(());
                    }
                    self.on_client_input().await?;
                }
                Event::UpReadable => self.read_upstream(),
                Event::Writable => {}
                Event::Served(Some((id, out))) => self.on_served(id, out),
                Event::Served(None) => {}
                Event::Deadline => self.expire_deadlines(),
                Event::Shutdown => self.start_goaway(),
            }
        }
    }

    /// Writes what the sockets take without blocking.
    fn flush(&mut self) -> Result<(), ConnError> {
        while !self.client_out.is_empty() {
            match self.client.try_write(&self.client_out) {
                Ok(n) => self.client_out.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        let mut failed = None;
        if let Upstream::Up(s) = &self.upstream {
            while !self.up_out.is_empty() {
                match s.try_write(&self.up_out) {
                    Ok(n) => self.up_out.advance(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        if let Some(why) = failed {
            self.upstream_lost(&why);
            // The failure trailers are queued for the client.
            return self.flush();
        }
        Ok(())
    }

    /// Reads from the client; false at end of stream.
    fn read_client(&mut self) -> Result<bool, ConnError> {
        match read_some(&self.client, &mut self.client_in) {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    async fn on_client_input(&mut self) -> Result<(), ConnError> {
        if !self.preface_seen {
            if self.client_in.len() < PREFACE.len() {
                return Ok(());
            }
            if &self.client_in[..PREFACE.len()] != PREFACE {
                return Err(ConnError::Client(FrameError::protocol(
                    "not an HTTP/2 connection preface",
                )));
            }
            self.client_in.advance(PREFACE.len());
            self.preface_seen = true;
        }
        while let Some((head, frame)) = next_frame(&mut self.client_in) {
            if let Err(err) = self.on_client_frame(head, frame).await {
                write_goaway(&mut self.client_out, self.last_client_id, err.code);
                let _ = self.flush();
                return Err(ConnError::Client(err));
            }
        }
        Ok(())
    }

    async fn on_client_frame(&mut self, head: Head, mut frame: BytesMut) -> Result<(), FrameError> {
        trace_frame("client", &head);
        if self.client_block.is_none()
            && head.kind == HEADERS
            && (head.stream == 0 || head.stream % 2 == 0)
        {
            return Err(FrameError::protocol("HEADERS on an invalid stream id"));
        }
        match assemble(&mut self.client_block, &head, &frame)? {
            Assembly::Complete(block) => return self.on_client_block(block).await,
            Assembly::Pending => return Ok(()),
            Assembly::Other => {}
        }
        let payload = &frame[HEAD_LEN..];
        match head.kind {
            DATA => {
                let end = head.has(END_STREAM);
                self.client_send_window -= head.len as i64;
                match self.streams.get_mut(&head.stream) {
                    Some(Stream::Relayed(r)) if !r.client_done => {
                        set_stream(&mut frame, r.up);
                        r.client_done = end;
                        self.up_send(&frame, head.len);
                        if end {
                            self.reap(head.stream);
                        }
                    }
                    Some(Stream::Served(s)) if !s.client_done => {
                        let data = data_payload(&head, payload)?;
                        // The runtime never sees these bytes: give the
                        // client its window back here.
                        self.client_send_window += head.len as i64;
                        write_window_update(&mut self.client_out, 0, head.len as u64);
                        if !end {
                            write_window_update(&mut self.client_out, head.stream, head.len as u64);
                        }
                        if s.body.len() + data.len() > MAX_MESSAGE_SIZE + 5 {
                            self.answer_error(
                                head.stream,
                                Status::resource_exhausted("podckptd: request too large"),
                            );
                        } else {
                            s.body.extend_from_slice(data);
                            if end {
                                s.client_done = true;
                                self.spawn_served(head.stream);
                            }
                        }
                    }
                    _ => self.grant_client(head.len as u64),
                }
            }
            RST_STREAM => match self.streams.remove(&head.stream) {
                Some(Stream::Relayed(r)) => {
                    set_stream(&mut frame, r.up);
                    self.up_send(&frame, 0);
                    self.from_up.remove(&r.up);
                }
                Some(Stream::Served(s)) => {
                    if let Some(task) = s.task {
                        task.abort();
                    }
                }
                None => {}
            },
            WINDOW_UPDATE => {
                let increment = u31(payload, 0)?;
                if head.stream == 0 {
                    self.client_window += i64::from(increment);
                    let deducted = self.debt.min(u64::from(increment));
                    self.debt -= deducted;
                    if matches!(self.upstream, Upstream::Up(_)) {
                        write_window_update(&mut self.up_out, 0, u64::from(increment) - deducted);
                    }
                    self.release_held();
                    self.drive_all_served();
                } else {
                    match self.streams.get_mut(&head.stream) {
                        Some(Stream::Relayed(r)) => {
                            set_stream(&mut frame, r.up);
                            self.up_send(&frame, 0);
                        }
                        Some(Stream::Served(s)) => {
                            s.window += i64::from(increment);
                            self.drive_served(head.stream);
                        }
                        None => {}
                    }
                }
            }
            SETTINGS => {
                if head.has(ACK) {
                    if self.own_settings_unacked > 0 {
                        self.own_settings_unacked -= 1;
                    } else {
                        self.up_send(&frame, 0);
                    }
                    return Ok(());
                }
                for (id, value) in settings(payload)? {
                    if id == SETTINGS_HEADER_TABLE_SIZE {
                        allow_table_size(&mut self.up_hpack, value);
                    }
                    if id == SETTINGS_INITIAL_WINDOW_SIZE {
                        let delta = i64::from(value) - self.client_initial_window;
                        self.client_initial_window = i64::from(value);
                        for s in self.streams.values_mut() {
                            if let Stream::Served(s) = s {
                                s.window += delta;
                            }
                        }
                    }
                    match self.client_settings.iter_mut().find(|(i, _)| *i == id) {
                        Some(slot) => slot.1 = value,
                        None => self.client_settings.push((id, value)),
                    }
                }
                if matches!(self.upstream, Upstream::Up(_)) {
                    self.up_out.extend_from_slice(&frame);
                } else {
                    write_frame(&mut self.client_out, SETTINGS, ACK, 0, &[]);
                }
                self.drive_all_served();
            }
            PING => {
                if head.has(ACK) && payload == OUR_PING {
                    // The client has seen the first GOAWAY: it opens no
                    // more calls, so the last one is known now.
                    if matches!(self.goaway, GoAway::Announced) {
                        self.goaway = GoAway::Final(self.last_client_id);
                        write_goaway(&mut self.client_out, self.last_client_id, NO_ERROR);
                    }
                } else if matches!(self.upstream, Upstream::Up(_)) {
                    self.up_out.extend_from_slice(&frame);
                } else if !head.has(ACK) {
                    write_frame(&mut self.client_out, PING, ACK, 0, payload);
                }
            }
            PUSH_PROMISE => return Err(FrameError::protocol("PUSH_PROMISE from a client")),
            // GOAWAY from the client: it closes the socket when it is done.
            // PRIORITY is advisory; unknown frame types must be ignored.
            _ => {}
        }
        Ok(())
    }

    async fn on_client_block(&mut self, block: Block) -> Result<(), FrameError> {
        let id = block.stream;
        let mut bytes = block.bytes;
        self.fields.clear();
        self.client_hpack
            .decode(&mut bytes, &mut self.fields)
            .map_err(|_| FrameError {
                code: COMPRESSION_ERROR,
                what: "undecodable header block",
            })?;
        let mut path = None;
        let mut timeout = None;
        for (name, value, _) in &self.fields {
            match name.as_slice() {
                b":path" => path = Some(value.as_slice()),
                b"grpc-timeout" => timeout = grpc_timeout_value(value),
                _ => {}
            }
        }
        let path = path.and_then(|p| String::from_utf8(p.to_vec()).ok());

        // Trailers of a call under way.
        if let Some(stream) = self.streams.get_mut(&id) {
            match stream {
                Stream::Relayed(r) if !r.client_done => {
                    let up = r.up;
                    r.client_done = block.end_stream;
                    self.send_fields_up(up, block.end_stream)?;
                    if block.end_stream {
                        self.reap(id);
                    }
                }
                Stream::Served(s) if !s.client_done && block.end_stream => {
                    s.client_done = true;
                    self.spawn_served(id);
                }
                _ => {}
            }
            return Ok(());
        }
        if id <= self.last_client_id {
            // A stream that is over (answered, reset or expired).
            return Ok(());
        }
        self.last_client_id = id;
        if matches!(self.goaway, GoAway::Final(last) if id > last) {
            write_rst(&mut self.client_out, id, REFUSED_STREAM);
            return Ok(());
        }
        let Some(path) = path else {
            write_rst(&mut self.client_out, id, PROTOCOL_ERROR);
            return Ok(());
        };
        if self.relay.intercept.serves(&path) {
            return self.begin_served(id, block.end_stream);
        }
        if self.up_draining && self.from_up.is_empty() {
            // The runtime's GOAWAY left this connection with nothing to
            // finish: start over on a new one.
            self.upstream_lost("it said GOAWAY");
        }
        if self.up_draining || self.next_up_id > 0x7fff_ffff {
            let status = self.relay.unavailable("it is closing this connection");
            self.answer_error_new(id, status, block.end_stream);
            return Ok(());
        }
        if matches!(self.upstream, Upstream::Down) {
            match self.relay.connect().await {
                Ok(s) => self.attach(s),
                Err(why) => {
                    let status = self.relay.unavailable(&why);
                    self.answer_error_new(id, status, block.end_stream);
                    return Ok(());
                }
            }
        }
        let up = self.next_up_id;
        self.next_up_id += 2;
        self.from_up.insert(up, id);
        self.streams.insert(
            id,
            Stream::Relayed(Relayed {
                up,
                client_done: block.end_stream,
                up_done: false,
                answered: false,
                observer: self.relay.intercept.observer(&path),
            }),
        );
        self.send_fields_up(up, block.end_stream)?;
        if let Some(timeout) = timeout {
            // podckptd enforces the caller's deadline too: a wedged runtime
            // must not hold the call past it.
            self.deadlines.push(Reverse((Instant::now() + timeout, id)));
        }
        Ok(())
    }

    /// Sends the decoded block in `fields` to the runtime as stream `up`.
    /// Encoded with indexing: this side owns the runtime's decoder state,
    /// and indexed fields cost the runtime less to decode than literals.
    fn send_fields_up(&mut self, up: u32, end_stream: bool) -> Result<(), FrameError> {
        self.scratch.clear();
        if let Some(size) = self.up_table_size.take() {
            let _ = self
                .up_hpack_out
                .update_max_dynamic_size(size, &mut self.scratch);
        }
        for (name, value, flags) in self.fields.drain(..) {
            let how = if never_indexed(flags) {
                httlib_hpack::Encoder::NEVER_INDEXED
            } else {
                httlib_hpack::Encoder::BEST_FORMAT | httlib_hpack::Encoder::WITH_INDEXING
            };
            self.up_hpack_out
                .encode((name, value, how), &mut self.scratch)
                .map_err(|_| FrameError {
                    code: COMPRESSION_ERROR,
                    what: "header field cannot be encoded",
                })?;
        }
        let mut out = BytesMut::with_capacity(self.scratch.len() + HEAD_LEN);
        write_header_block(&mut out, up, &self.scratch, end_stream);
        self.up_send(&out, 0);
        Ok(())
    }

    /// A call podckptd serves: the request's head, from the decoded block
    /// in `fields`.
    fn begin_served(&mut self, id: u32, end_stream: bool) -> Result<(), FrameError> {
        let mut builder = http::Request::builder();
        let mut path = String::new();
        let mut authority = String::from("localhost");
        for (name, value, _) in &self.fields {
            match name.as_slice() {
                b":method" => builder = builder.method(value.as_slice()),
                b":path" => path = String::from_utf8_lossy(value).into_owned(),
                b":authority" => authority = String::from_utf8_lossy(value).into_owned(),
                n if n.starts_with(b":") => {}
                _ => builder = builder.header(name.as_slice(), value.as_slice()),
            }
        }
        let request = match builder.uri(format!("http://{authority}{path}")).body(()) {
            Ok(r) => r.into_parts().0,
            Err(err) => {
                self.answer_error_new(
                    id,
                    Status::invalid_argument(format!("podckptd: bad request headers: {err}")),
                    end_stream,
                );
                return Ok(());
            }
        };
        self.streams.insert(
            id,
            Stream::Served(Box::new(Served {
                request: Some(request),
                body: BytesMut::new(),
                client_done: end_stream,
                task: None,
                window: self.client_initial_window,
                pending: VecDeque::new(),
                finished: false,
            })),
        );
        if end_stream {
            self.spawn_served(id);
        }
        Ok(())
    }

    fn spawn_served(&mut self, id: u32) {
        let Some(Stream::Served(s)) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(parts) = s.request.take() else {
            return;
        };
        let body = s.body.split().freeze();
        let request = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(body)));
        let service = self.relay.served.clone();
        let tx = self.served_tx.clone();
        let task = self.relay.spawner.spawn(async move {
            let Ok(response) = service.oneshot(request).await;
            let (parts, mut body) = response.into_parts();
            let end = http_body::Body::is_end_stream(&body);
            if tx.send((id, Out::Head(parts, end))).await.is_err() || end {
                return;
            }
            loop {
                let out = match body.frame().await {
                    None => Out::End,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => Out::Data(data),
                        Err(frame) => match frame.into_trailers() {
                            Ok(trailers) => Out::Trailers(trailers),
                            Err(_) => continue,
                        },
                    },
                    Some(Err(err)) => {
                        let mut trailers = http::HeaderMap::new();
                        let _ =
                            Status::internal(format!("podckptd: {err}")).add_header(&mut trailers);
                        Out::Trailers(trailers)
                    }
                };
                let last = matches!(out, Out::End | Out::Trailers(_));
                if tx.send((id, out)).await.is_err() || last {
                    return;
                }
            }
        });
        s.task = Some(task.abort_handle());
    }

    fn on_served(&mut self, id: u32, out: Out) {
        if let Some(Stream::Served(s)) = self.streams.get_mut(&id) {
            s.pending.push_back(out);
            self.drive_served(id);
        }
    }

    fn drive_all_served(&mut self) {
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s, Stream::Served(s) if !s.pending.is_empty()))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.drive_served(id);
        }
    }

    /// Sends what a served call has ready, as far as the client's windows
    /// allow; runtime frames waiting for the window go first.
    fn drive_served(&mut self, id: u32) {
        let Some(Stream::Served(s)) = self.streams.get_mut(&id) else {
            return;
        };
        while let Some(front) = s.pending.front_mut() {
            match front {
                Out::Head(parts, end) => {
                    self.scratch.clear();
                    encode_literal(
                        &mut self.scratch,
                        b":status",
                        parts.status.as_str().as_bytes(),
                        false,
                    );
                    encode_fields(&mut self.scratch, &parts.headers);
                    write_header_block(&mut self.client_out, id, &self.scratch, *end);
                    s.finished = *end;
                }
                Out::Data(data) => {
                    if !self.held.is_empty() {
                        break;
                    }
                    let n = data
                        .len()
                        .min(SAFE_FRAME)
                        .min(s.window.max(0) as usize)
                        .min(self.client_window.max(0) as usize);
                    if n == 0 && !data.is_empty() {
                        break;
                    }
                    write_frame(&mut self.client_out, DATA, 0, id, &data[..n]);
                    s.window -= n as i64;
                    self.client_window -= n as i64;
                    self.debt += n as u64;
                    data.advance(n);
                    if !data.is_empty() {
                        continue;
                    }
                }
                Out::Trailers(trailers) => {
                    self.scratch.clear();
                    encode_fields(&mut self.scratch, trailers);
                    write_header_block(&mut self.client_out, id, &self.scratch, true);
                    s.finished = true;
                }
                Out::End => {
                    write_frame(&mut self.client_out, DATA, END_STREAM, id, &[]);
                    s.finished = true;
                }
            }
            s.pending.pop_front();
        }
        if s.finished {
            if !s.client_done {
                // The answer is complete; the rest of the request is moot.
                write_rst(&mut self.client_out, id, NO_ERROR);
            }
            self.streams.remove(&id);
        }
    }

    /// Answers a stream that has no state here with an error status
    /// (trailers-only).
    fn answer_error_new(&mut self, id: u32, status: Status, client_done: bool) {
        write_trailers_only(&mut self.client_out, &mut self.scratch, id, &status);
        if !client_done {
            write_rst(&mut self.client_out, id, NO_ERROR);
        }
    }

    /// Ends a served stream with an error status instead of its answer.
    fn answer_error(&mut self, id: u32, status: Status) {
        if let Some(Stream::Served(s)) = self.streams.remove(&id) {
            if let Some(task) = s.task {
                task.abort();
            }
            self.answer_error_new(id, status, s.client_done);
        }
    }

    /// Removes a relayed stream once both sides are done.
    fn reap(&mut self, id: u32) {
        if let Some(Stream::Relayed(r)) = self.streams.get(&id) {
            if r.client_done && r.up_done {
                self.from_up.remove(&r.up);
                self.streams.remove(&id);
            }
        }
    }

    fn read_upstream(&mut self) {
        let Upstream::Up(s) = &self.upstream else {
            return;
        };
        let why = match read_some(s, &mut self.up_in) {
            Ok(0) => "it closed the connection".to_string(),
            Ok(_) => {
                while let Some((head, frame)) = next_frame(&mut self.up_in) {
                    if let Err(err) = self.on_up_frame(head, frame) {
                        self.upstream_lost(&err.to_string());
                        return;
                    }
                }
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => e.to_string(),
        };
        self.upstream_lost(&why);
    }

    fn on_up_frame(&mut self, head: Head, mut frame: BytesMut) -> Result<(), FrameError> {
        trace_frame("runtime", &head);
        match assemble(&mut self.up_block, &head, &frame)? {
            Assembly::Complete(block) => return self.on_up_block(block),
            Assembly::Pending => return Ok(()),
            Assembly::Other => {}
        }
        let payload = &frame[HEAD_LEN..];
        match head.kind {
            DATA => match self.from_up.get(&head.stream).copied() {
                Some(id) => {
                    set_stream(&mut frame, id);
                    self.client_send(frame.freeze(), head.len);
                    if head.has(END_STREAM) {
                        self.up_finished(id);
                    }
                }
                // A stream the client is done with: give the runtime its
                // window back.
                None => write_window_update(&mut self.up_out, 0, head.len as u64),
            },
            RST_STREAM => {
                if let Some(id) = self.from_up.remove(&head.stream) {
                    set_stream(&mut frame, id);
                    self.client_send(frame.freeze(), 0);
                    if let Some(Stream::Relayed(r)) = self.streams.remove(&id) {
                        if let Some(observer) = r.observer {
                            observer();
                        }
                    }
                }
            }
            WINDOW_UPDATE => {
                if head.stream == 0 {
                    let increment = u31(payload, 0)?;
                    self.up_window += i64::from(increment);
                    let deducted = self.up_debt.min(u64::from(increment));
                    self.up_debt -= deducted;
                    self.release_up_held();
                    let passed = u64::from(increment) - deducted;
                    if passed > 0 {
                        self.client_send_window += passed as i64;
                        let mut wu = BytesMut::new();
                        write_window_update(&mut wu, 0, passed);
                        self.client_send(wu.freeze(), 0);
                    }
                } else if let Some(id) = self.from_up.get(&head.stream).copied() {
                    set_stream(&mut frame, id);
                    self.client_send(frame.freeze(), 0);
                }
            }
            SETTINGS => {
                if head.has(ACK) && self.swallow_up_acks > 0 {
                    self.swallow_up_acks -= 1;
                } else {
                    if !head.has(ACK) {
                        for (id, value) in settings(payload)? {
                            if id == SETTINGS_HEADER_TABLE_SIZE {
                                allow_table_size(&mut self.client_hpack, value);
                                if value < self.up_hpack_out.max_dynamic_size() {
                                    self.up_table_size = Some(value);
                                }
                            }
                        }
                    }
                    self.client_send(frame.freeze(), 0);
                }
            }
            PING => self.client_send(frame.freeze(), 0),
            GOAWAY => {
                let last = u31(payload, 0)?;
                // Calls the runtime never took are safe to retry.
                let refused: Vec<(u32, u32)> = self
                    .from_up
                    .iter()
                    .filter(|(up, _)| **up > last)
                    .map(|(up, id)| (*up, *id))
                    .collect();
                for (up, id) in refused {
                    self.from_up.remove(&up);
                    self.streams.remove(&id);
                    let mut rst = BytesMut::new();
                    write_rst(&mut rst, id, REFUSED_STREAM);
                    self.client_send(rst.freeze(), 0);
                }
                self.up_draining = true;
            }
            PUSH_PROMISE => return Err(FrameError::protocol("runtime sent PUSH_PROMISE")),
            _ => {}
        }
        Ok(())
    }

    fn on_up_block(&mut self, block: Block) -> Result<(), FrameError> {
        let mut bytes = block.bytes;
        self.fields.clear();
        self.up_hpack
            .decode(&mut bytes, &mut self.fields)
            .map_err(|_| FrameError {
                code: COMPRESSION_ERROR,
                what: "runtime sent an undecodable header block",
            })?;
        self.scratch.clear();
        for (name, value, flags) in &self.fields {
            encode_literal(&mut self.scratch, name, value, never_indexed(*flags));
        }
        // Decoded even when the stream is gone here, for the table's sake.
        let Some(id) = self.from_up.get(&block.stream).copied() else {
            return Ok(());
        };
        let mut out = BytesMut::with_capacity(self.scratch.len() + HEAD_LEN);
        write_header_block(&mut out, id, &self.scratch, block.end_stream);
        self.client_send(out.freeze(), 0);
        if let Some(Stream::Relayed(r)) = self.streams.get_mut(&id) {
            r.answered = true;
        }
        if block.end_stream {
            self.up_finished(id);
        }
        Ok(())
    }

    fn up_finished(&mut self, id: u32) {
        if let Some(Stream::Relayed(r)) = self.streams.get_mut(&id) {
            r.up_done = true;
            if let Some(observer) = r.observer.take() {
                observer();
            }
            self.reap(id);
        }
    }

    /// Queues a runtime frame for the client, holding it (and everything
    /// after it) while DATA would overrun the client's window.
    fn client_send(&mut self, frame: Bytes, data_len: usize) {
        if self.held.is_empty() && self.client_window >= data_len as i64 {
            self.client_window -= data_len as i64;
            self.client_out.extend_from_slice(&frame);
        } else {
            self.held.push_back((data_len, frame));
        }
    }

    fn release_up_held(&mut self) {
        while let Some((len, _)) = self.up_held.front() {
            if self.up_window < *len as i64 {
                break;
            }
            let (len, frame) = self.up_held.pop_front().expect("checked");
            self.up_window -= len as i64;
            self.up_out.extend_from_slice(&frame);
        }
    }

    fn release_held(&mut self) {
        while let Some((len, _)) = self.held.front() {
            if self.client_window < *len as i64 {
                break;
            }
            let (len, frame) = self.held.pop_front().expect("checked");
            self.client_window -= len as i64;
            self.client_out.extend_from_slice(&frame);
        }
    }

    /// The runtime connection failed: its calls end with Unavailable, and
    /// the next relayed call connects again (see [`Self::attach`]).
    fn upstream_lost(&mut self, why: &str) {
        if !matches!(self.upstream, Upstream::Up(_)) {
            return;
        }
        tracing::debug!(error = %why, "runtime connection lost");
        self.upstream = Upstream::Down;
        self.up_out.clear();
        self.up_in.clear();
        self.up_held.clear();
        self.up_block = None;
        self.up_draining = false;
        self.next_up_id = 1;
        // The next connection's header table starts empty.
        let allowed = self.up_hpack.max_dynamic_size();
        self.up_hpack = httlib_hpack::Decoder::with_dynamic_size(allowed);
        let status = Status::unavailable(format!(
            "podckptd: container runtime at {} went away mid-call: {why}",
            self.relay.upstream_path.display()
        ));
        let ids: Vec<u32> = self.from_up.drain().map(|(_, id)| id).collect();
        for id in ids {
            if let Some(Stream::Relayed(r)) = self.streams.remove(&id) {
                self.fail_relayed(id, &r, &status);
            }
        }
    }

    /// Ends a relayed call towards the client with `status`.
    fn fail_relayed(&mut self, id: u32, r: &Relayed, status: &Status) {
        let mut out = BytesMut::new();
        if r.answered {
            let mut trailers = http::HeaderMap::new();
            let _ = status.add_header(&mut trailers);
            self.scratch.clear();
            encode_fields(&mut self.scratch, &trailers);
            write_header_block(&mut out, id, &self.scratch, true);
        } else {
            write_trailers_only(&mut out, &mut self.scratch, id, status);
        }
        if !r.client_done {
            write_rst(&mut out, id, NO_ERROR);
        }
        self.client_send(out.freeze(), 0);
    }

    fn expire_deadlines(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(Stream::Relayed(r)) = self.streams.remove(&id) else {
                continue;
            };
            self.from_up.remove(&r.up);
            let mut rst = BytesMut::new();
            write_rst(&mut rst, r.up, CANCEL);
            self.up_send(&rst, 0);
            tracing::debug!(stream = id, "deadline expired waiting for the runtime");
            let status = Status::deadline_exceeded(format!(
                "podckptd: deadline expired waiting for the container runtime at {}",
                self.relay.upstream_path.display()
            ));
            self.fail_relayed(id, &r, &status);
        }
    }

    /// Tells the client to open no more calls here; the connection ends
    /// once the ones under way are answered. In two steps, as RFC 9113
    /// §6.8 suggests: calls the client opens before it has seen the GOAWAY
    /// are still answered, not refused.
    fn start_goaway(&mut self) {
        if matches!(self.goaway, GoAway::Not) {
            self.goaway = GoAway::Announced;
            write_goaway(&mut self.client_out, 0x7fff_ffff, NO_ERROR);
            write_frame(&mut self.client_out, PING, 0, 0, OUR_PING);
        }
    }

    fn abort_served(&mut self) {
        for s in self.streams.values() {
            if let Stream::Served(served) = s {
                if let Some(task) = &served.task {
                    task.abort();
                }
            }
        }
    }
}

/// Reads what `stream` holds into `buf`; `Ok(0)` at its end.
///
/// A read that leaves room in the buffer has drained the socket, so its
/// readiness is cleared right away (by answering `WouldBlock` to tokio's
/// `try_io`, which only clears it if no newer readiness arrived meanwhile):
/// the next wait then goes to epoll instead of costing a read that would
/// only say `EAGAIN`, two syscalls saved per relayed call.
fn read_some(stream: &UnixStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK);
    let room = buf.capacity() - buf.len();
    let mut got = 0;
    let result = stream.try_io(tokio::io::Interest::READABLE, || {
        got = stream.try_read_buf(buf)?;
        if got > 0 && got < room {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// A decoded header field: name, value, httlib's flags.
type Field = (Vec<u8>, Vec<u8>, u8);

/// Lets a peer's encoder use a dynamic table this large, as the other side
/// advertised. Never lowered: blocks sent before the peer saw a smaller
/// setting may still use the old size.
fn allow_table_size(decoder: &mut httlib_hpack::Decoder<'static>, size: u32) {
    if size > decoder.max_dynamic_size() {
        decoder.set_max_dynamic_size(size);
    }
}

fn never_indexed(flags: u8) -> bool {
    flags & httlib_hpack::Decoder::NEVER_INDEXED != 0
}

/// Appends every field of `headers` as literals.
fn encode_fields(out: &mut Vec<u8>, headers: &http::HeaderMap) {
    for (name, value) in headers {
        encode_literal(
            out,
            name.as_str().as_bytes(),
            value.as_bytes(),
            value.is_sensitive(),
        );
    }
}

/// A gRPC answer that is only a status (HEADERS with END_STREAM).
fn write_trailers_only(out: &mut BytesMut, scratch: &mut Vec<u8>, id: u32, status: &Status) {
    let mut fields = http::HeaderMap::new();
    fields.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let _ = status.add_header(&mut fields);
    scratch.clear();
    encode_literal(scratch, b":status", b"200", false);
    encode_fields(scratch, &fields);
    write_header_block(out, id, scratch, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames of `buf`, in order.
    fn frames(mut buf: BytesMut) -> Vec<(Head, BytesMut)> {
        std::iter::from_fn(|| next_frame(&mut buf)).collect()
    }

    #[test]
    fn a_block_split_over_continuations_comes_out_whole() {
        let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut out = BytesMut::new();
        write_header_block(&mut out, 7, &block, true);
        let frames = frames(out);
        assert!(frames.len() > 2, "expected CONTINUATION frames");
        let mut pending = None;
        let (last, rest) = frames.split_last().unwrap();
        for (head, frame) in rest {
            assert!(matches!(
                assemble(&mut pending, head, frame),
                Ok(Assembly::Pending)
            ));
        }
        match assemble(&mut pending, &last.0, &last.1) {
            Ok(Assembly::Complete(b)) => {
                assert_eq!((b.stream, b.end_stream), (7, true));
                assert_eq!(b.bytes, block);
            }
            _ => panic!("the last CONTINUATION completes the block"),
        }
        assert!(pending.is_none());
    }

    #[test]
    fn frames_outside_a_block_pass_and_strays_are_refused() {
        let mut out = BytesMut::new();
        write_frame(&mut out, DATA, 0, 1, b"x");
        write_frame(&mut out, CONTINUATION, END_HEADERS, 1, b"x");
        let f = frames(out);
        let mut pending = None;
        assert!(matches!(
            assemble(&mut pending, &f[0].0, &f[0].1),
            Ok(Assembly::Other)
        ));
        assert!(assemble(&mut pending, &f[1].0, &f[1].1).is_err());

        // Anything but this stream's CONTINUATION inside a block.
        let mut out = BytesMut::new();
        write_header_block(&mut out, 3, &[0u8; 20_000], false);
        write_frame(&mut out, DATA, 0, 3, b"x");
        let f = frames(out);
        let mut pending = None;
        assert!(matches!(
            assemble(&mut pending, &f[0].0, &f[0].1),
            Ok(Assembly::Pending)
        ));
        assert!(assemble(&mut pending, &f[2].0, &f[2].1).is_err());
    }
}
