//! Accepting client connections: on a thread of its own, so that relayed
//! calls never wait behind checkpoint or restore work; each connection
//! gets a handshake deadline, an idle timeout, keepalive PINGs and hyper's
//! HTTP/2 server with the [`Limits`]; their number is bounded, and on
//! shutdown every one is drained within the grace period.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinSet};

use super::status::{error_chain, h2_error};
use super::{Activity, Limits, Proxy, ServedCalls};

/// What every HTTP/2 connection starts with (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `proxy` on `listener` until `shutdown`, then drains for at most
/// `grace`: GOAWAY to every client (in two steps, so calls already on their
/// way are still answered), in-flight calls finish, the rest are cut.
///
/// The connections run on a thread of their own with a single-threaded
/// runtime (`podckptd-proxy`); the calls podckptd serves run on the
/// caller's runtime.
pub async fn serve<S: ServedCalls>(
    listener: UnixListener,
    proxy: Proxy<S>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%err, "cannot hand the socket to the proxy thread");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("podckptd-proxy".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(%err, "cannot start the proxy's runtime");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                match UnixListener::from_std(listener) {
                    Ok(listener) => accept(listener, proxy, stop_rx, grace).await,
                    Err(err) => tracing::error!(%err, "cannot serve the socket"),
                }
            });
            let _ = done_tx.send(());
        });
    if let Err(err) = spawned {
        tracing::error!(%err, "cannot start the proxy thread");
        return;
    }
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => {
            let _ = stop_tx.send(true);
            // The proxy bounds its own drain by `grace`.
            let _ = (&mut done_rx).await;
        }
        _ = &mut done_rx => tracing::error!("the proxy stopped by itself"),
    }
}

/// The connections of the proxy thread: the ones still in their handshake
/// (oldest first) and the established ones.
#[derive(Default)]
struct Registry {
    pending: VecDeque<(u64, AbortHandle)>,
    established: HashMap<u64, Established>,
}

struct Established {
    activity: Arc<Activity>,
    close: Rc<Notify>,
}

impl Registry {
    /// Makes room for one more established connection: at the limit, the
    /// one idle longest is told to close. False when all are busy.
    fn admit(&mut self, id: u64, max: usize, activity: Arc<Activity>, close: Rc<Notify>) -> bool {
        self.pending.retain(|(p, _)| *p != id);
        if self.established.len() >= max {
            let idlest = self
                .established
                .iter()
                .filter_map(|(id, e)| e.activity.idle_since().map(|t| (t, *id)))
                .min();
            let Some((since, victim)) = idlest else {
                return false;
            };
            if let Some(e) = self.established.remove(&victim) {
                tracing::warn!(idle = ?since.elapsed(), max, "connection limit reached: closing the connection idle longest");
                e.close.notify_one();
            }
        }
        self.established.insert(id, Established { activity, close });
        true
    }

    fn forget(&mut self, id: u64) {
        self.pending.retain(|(p, _)| *p != id);
        self.established.remove(&id);
    }
}

/// The proxy thread's accept loop, and its drain once `stop` turns true.
async fn accept<S: ServedCalls>(
    listener: UnixListener,
    proxy: Proxy<S>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let proxy = Rc::new(proxy);
    let builder = Rc::new(server_builder(proxy.limits()));
    let registry = Rc::new(RefCell::new(Registry::default()));
    // Every connection task lives in this set, so that the ones still open
    // when the grace period is over are cut instead of outliving the daemon.
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            biased;
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_id += 1;
                    let id = next_id;
                    let task = connection(
                        id,
                        stream,
                        proxy.clone(),
                        builder.clone(),
                        registry.clone(),
                        stop.clone(),
                    );
                    let handle = conns.spawn_local(task);
                    let oldest = {
                        let mut r = registry.borrow_mut();
                        r.pending.push_back((id, handle));
                        (r.pending.len() > proxy.limits().max_pending_handshakes)
                            .then(|| r.pending.pop_front())
                            .flatten()
                    };
                    if let Some((_, handle)) = oldest {
                        tracing::warn!(max = proxy.limits().max_pending_handshakes, "too many connections without an HTTP/2 preface: dropping the oldest");
                        handle.abort();
                    }
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    tracing::info!(grace = ?grace, connections = conns.len(), "shutting down: draining in-flight calls");
    // Every connection has seen `stop`: it sends GOAWAY and ends once its
    // calls are answered.
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(grace = ?grace, connections = conns.len(), "grace period over; closing remaining connections");
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

/// hyper's HTTP/2 server with every limit set.
fn server_builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.max_pending_reset_streams)
        .max_local_error_reset_streams(limits.max_error_reset_streams)
        .max_frame_size(limits.max_frame_size)
        .max_header_list_size(limits.max_header_list_size)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .max_send_buf_size(limits.max_send_buffer)
        .keep_alive_interval(limits.keepalive())
        .keep_alive_timeout(limits.keepalive_timeout)
        .auto_date_header(false);
    b
}

/// Takes a connection out of the registry however its task ends.
struct Forget {
    id: u64,
    registry: Rc<RefCell<Registry>>,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if let Ok(mut r) = self.registry.try_borrow_mut() {
            r.forget(self.id);
        }
    }
}

/// One client connection, from its preface to its end.
async fn connection<S: ServedCalls>(
    id: u64,
    mut stream: UnixStream,
    proxy: Rc<Proxy<S>>,
    builder: Rc<http2::Builder<TokioExecutor>>,
    registry: Rc<RefCell<Registry>>,
    mut stop: watch::Receiver<bool>,
) {
    let _forget = Forget {
        id,
        registry: registry.clone(),
    };
    let limits = proxy.limits();
    let mut preface = [0u8; PREFACE.len()];
    match tokio::time::timeout(limits.handshake_timeout, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == PREFACE => {}
        Ok(Ok(_)) => {
            tracing::warn!("client connection closed: it did not start with the HTTP/2 preface");
            return;
        }
        Ok(Err(err)) => {
            tracing::debug!(%err, "client connection closed before its HTTP/2 preface");
            return;
        }
        Err(_) => {
            tracing::warn!(timeout = ?limits.handshake_timeout, "client connection closed: no HTTP/2 preface in time (--handshake-timeout)");
            return;
        }
    }
    let (service, activity) = proxy.connection();
    let close = Rc::new(Notify::new());
    let admitted =
        registry
            .borrow_mut()
            .admit(id, limits.max_connections, activity.clone(), close.clone());
    if !admitted {
        tracing::warn!(max = limits.max_connections, "connection limit reached and every connection busy: refusing a client (--max-connections)");
        return;
    }
    let io = TokioIo::new(Prefaced::new(stream));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle_timeout = limits.idle_timeout;
    let mut closing = false;
    let result = loop {
        let idle_at = activity.idle_since().map(|t| t + idle_timeout);
        tokio::select! {
            r = conn.as_mut() => break r,
            r = stop.changed(), if !closing => {
                if r.is_err() || *stop.borrow() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = close.notified(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = sleep_until(idle_at, idle_timeout), if !closing => {
                if activity.idle_since().is_some_and(|t| t.elapsed() >= idle_timeout) {
                    tracing::debug!(?idle_timeout, "closing an idle client connection");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    };
    match result {
        Ok(()) => tracing::debug!("client connection closed"),
        // A client that hangs up with no call in flight (crictl exiting)
        // closed its connection; with calls in flight it lost them.
        Err(err) if h2_error(&err).is_none() && activity.idle_since().is_some() => {
            tracing::debug!(error = %error_chain(&err), "client closed its connection");
        }
        Err(err) => {
            let h2 = h2_error(&err);
            tracing::warn!(
                code = ?h2.and_then(h2::Error::reason),
                goaway = h2.is_some_and(h2::Error::is_go_away),
                remote = h2.is_some_and(h2::Error::is_remote),
                error = %error_chain(&err),
                "client connection lost"
            );
        }
    }
}

/// Sleeps until `at`, or for `period` when there is no such instant (a
/// connection with calls in flight is looked at again then).
async fn sleep_until(at: Option<std::time::Instant>, period: Duration) {
    let at = at.unwrap_or_else(|| std::time::Instant::now() + period);
    tokio::time::sleep_until(at.into()).await;
}

pin_project_lite::pin_project! {
    /// A client stream whose HTTP/2 preface podckptd already read and
    /// checked: hyper reads it again first.
    struct Prefaced {
        replay: usize,
        #[pin]
        inner: UnixStream,
    }
}

impl Prefaced {
    fn new(inner: UnixStream) -> Self {
        Self { replay: 0, inner }
    }
}

impl AsyncRead for Prefaced {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.replay < PREFACE.len() {
            let rest = &PREFACE[*this.replay..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            *this.replay += n;
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefaced {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
