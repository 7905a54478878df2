//! The scrape endpoint's limits, each exceeded by a client that misbehaves
//! on purpose: too many connections, headers that never finish, a request
//! larger than the buffer, a connection kept open past its time. Each must
//! cost the endpoint a closed connection and nothing else: an honest scrape
//! is answered right after. No test node needed.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use podckpt::metrics::http::{serve, ScrapeLimits};
use podckpt::metrics::Metrics;

/// How long a test waits for the endpoint to act before calling it stuck;
/// the limits under test are all well below it.
const PATIENCE: Duration = Duration::from_secs(10);

async fn start(limits: ScrapeLimits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, Metrics::new(), limits));
    addr
}

fn limits(
    connections: usize,
    connection_timeout: Duration,
    header_timeout: Duration,
) -> ScrapeLimits {
    ScrapeLimits {
        metrics_max_connections: connections,
        metrics_connection_timeout: connection_timeout,
        metrics_header_timeout: header_timeout,
        metrics_max_request_bytes: 8192,
    }
}

/// Reads until the endpoint closes the connection (or PATIENCE passes:
/// then it panics). Returns what was read.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("the endpoint kept the connection open: {e}"),
        }
    }
}

/// Whether the connection is still open after `wait` with nothing sent.
fn still_open(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// One honest scrape on a new connection; its status line.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: podckpt\r\nConnection: close\r\n\r\n")
        .unwrap();
    let body = read_to_close(&mut s);
    String::from_utf8_lossy(&body)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_and_a_freed_slot_is_reused() {
    let addr = start(limits(2, PATIENCE * 3, PATIENCE * 3)).await;
    blocking(move || {
        // Two idle connections hold both slots.
        let mut a = TcpStream::connect(addr).unwrap();
        let mut b = TcpStream::connect(addr).unwrap();
        // Give the endpoint time to accept them before the third.
        std::thread::sleep(Duration::from_millis(200));
        let mut c = TcpStream::connect(addr).unwrap();
        assert!(
            read_to_close(&mut c).is_empty(),
            "the third connection was served"
        );
        assert!(still_open(&mut a, Duration::from_millis(200)));
        assert!(still_open(&mut b, Duration::from_millis(200)));
        // One slot freed: a scrape is served again.
        drop(a);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = scrape(addr);
            if status.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no scrape served after a slot was freed (last: {status:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(b);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_finish_are_cut_at_the_header_timeout() {
    let addr = start(limits(4, PATIENCE * 3, Duration::from_millis(300))).await;
    blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: pod").unwrap();
        let t = Instant::now();
        let got = read_to_close(&mut s);
        let took = t.elapsed();
        assert!(
            !String::from_utf8_lossy(&got).contains(" 200 "),
            "an unfinished request was answered"
        );
        eprintln!("unfinished headers closed after {took:?} (header timeout 300 ms)");
        assert!(scrape(addr).starts_with("HTTP/1.1 200"));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_buffer_is_refused() {
    let addr = start(limits(4, PATIENCE * 3, PATIENCE * 3)).await;
    blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let big = "x".repeat(32 * 1024);
        // The endpoint may close before it has read it all.
        let _ = s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: podckpt\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        );
        let got = String::from_utf8_lossy(&read_to_close(&mut s)).into_owned();
        let status = got.lines().next().unwrap_or_default().to_owned();
        assert!(
            !status.contains(" 200 "),
            "a 32 KiB request was answered: {status}"
        );
        eprintln!("32 KiB request: {status:?}");
        assert!(scrape(addr).starts_with("HTTP/1.1 200"));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dripping_its_request_is_cut_at_the_connection_timeout() {
    // The header timeout is far away; only the connection's own limit
    // can end it.
    let addr = start(limits(4, Duration::from_millis(500), PATIENCE * 3)).await;
    blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let request = b"GET /metrics HTTP/1.1\r\nHost: podckpt\r\nX-Slow: ";
        let mut closed = false;
        for i in 0.. {
            let byte = request.get(i).copied().unwrap_or(b'y');
            if s.write_all(&[byte]).is_err() {
                closed = true;
                break;
            }
            if !still_open(&mut s, Duration::from_millis(50)) {
                closed = true;
                break;
            }
            if t.elapsed() > PATIENCE {
                break;
            }
        }
        assert!(closed, "a dripping connection was kept for {PATIENCE:?}");
        eprintln!(
            "dripping connection closed after {:?} (connection timeout 500 ms)",
            t.elapsed()
        );
        assert!(scrape(addr).starts_with("HTTP/1.1 200"));
    });
}
