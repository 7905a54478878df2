//! Every limit the proxy enforces, as named settings with defaults: what a
//! client (or a runtime) may make podckptd hold, and for how long. Each is a
//! flag with an environment variable; `podckptd --help` explains them.

use std::time::Duration;

use clap::Args;

use crate::config::parse_duration;

/// The proxy's limits. Both HTTP/2 sides get theirs from here: the
/// client-facing server (the kubelet, crictl) and the connection to the
/// runtime.
#[derive(Clone, Debug, Args)]
pub struct Limits {
    /// Client connections served at once. At the limit, the connection that
    /// has been idle longest (no call in flight) is closed with GOAWAY to
    /// make room; if none is idle, the new one is refused.
    #[arg(
        long,
        env = "PODCKPT_MAX_CONNECTIONS",
        default_value_t = 128,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// Accepted connections that have not sent the HTTP/2 preface yet. At
    /// the limit the oldest is dropped: a real client sends its preface at
    /// once, so only a stalled or hostile one is ever the oldest.
    #[arg(
        long,
        env = "PODCKPT_MAX_PENDING_HANDSHAKES",
        default_value_t = 64,
        value_name = "N"
    )]
    pub max_pending_handshakes: usize,

    /// Time a new connection has to send the HTTP/2 preface.
    #[arg(long, env = "PODCKPT_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// A client connection with no call in flight for this long is closed
    /// with GOAWAY (gRPC clients reconnect on their next call).
    #[arg(long, env = "PODCKPT_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Interval of HTTP/2 PINGs podckptd sends to a client to find dead
    /// connections (0: none).
    #[arg(long, env = "PODCKPT_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub keepalive_interval: Duration,

    /// How long a client has to answer a keepalive PING before its
    /// connection is closed.
    #[arg(long, env = "PODCKPT_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub keepalive_timeout: Duration,

    /// Calls one client connection may have open at once
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); more are refused with
    /// REFUSED_STREAM.
    #[arg(
        long,
        env = "PODCKPT_MAX_CONCURRENT_STREAMS",
        default_value_t = 256,
        value_name = "N"
    )]
    pub max_concurrent_streams: u32,

    /// Streams a client may open and reset before podckptd accepted them
    /// (HTTP/2 rapid reset); past it the connection gets GOAWAY
    /// ENHANCE_YOUR_CALM.
    #[arg(
        long,
        env = "PODCKPT_MAX_PENDING_RESET_STREAMS",
        default_value_t = 20,
        value_name = "N"
    )]
    pub max_pending_reset_streams: usize,

    /// Streams podckptd may reset for a client's protocol errors on one
    /// connection before it closes the connection with ENHANCE_YOUR_CALM.
    #[arg(
        long,
        env = "PODCKPT_MAX_ERROR_RESET_STREAMS",
        default_value_t = 256,
        value_name = "N"
    )]
    pub max_error_reset_streams: usize,

    /// Largest HTTP/2 frame payload accepted, from clients and the runtime
    /// (SETTINGS_MAX_FRAME_SIZE; 16384 to 16777215).
    #[arg(long, env = "PODCKPT_MAX_FRAME_SIZE", default_value_t = 16 * 1024, value_name = "BYTES")]
    pub max_frame_size: u32,

    /// Largest decoded header list of a client's request
    /// (SETTINGS_MAX_HEADER_LIST_SIZE): metadata and pseudo-headers after
    /// HPACK. Larger ones are refused with 431 before they are kept.
    #[arg(long, env = "PODCKPT_MAX_HEADER_LIST_SIZE", default_value_t = 64 * 1024, value_name = "BYTES")]
    pub max_header_list_size: u32,

    /// Largest decoded header list of the runtime's responses and trailers
    /// (error details can be larger than a request's metadata).
    #[arg(long, env = "PODCKPT_RUNTIME_MAX_HEADER_LIST_SIZE", default_value_t = 1024 * 1024, value_name = "BYTES")]
    pub runtime_max_header_list_size: u32,

    /// HTTP/2 flow-control window of each call, both sides: what a peer
    /// may send before podckptd has passed it on.
    #[arg(long, env = "PODCKPT_STREAM_WINDOW", default_value_t = 1024 * 1024, value_name = "BYTES")]
    pub stream_window: u32,

    /// HTTP/2 flow-control window of each connection, both sides: with
    /// --max-connections, what bounds the pass-through bytes podckptd holds.
    #[arg(long, env = "PODCKPT_CONNECTION_WINDOW", default_value_t = 2 * 1024 * 1024, value_name = "BYTES")]
    pub connection_window: u32,

    /// Bytes queued per call for a peer that does not read: past it,
    /// podckptd stops reading the other side of that call.
    #[arg(long, env = "PODCKPT_MAX_SEND_BUFFER", default_value_t = 256 * 1024, value_name = "BYTES")]
    pub max_send_buffer: usize,

    /// Calls podckptd serves itself (CheckpointPod, RestorePod,
    /// CheckpointContainer, CreateContainer from an archive) at once on the
    /// node; more fail with ResourceExhausted.
    #[arg(
        long,
        env = "PODCKPT_MAX_SERVED_CALLS",
        default_value_t = 16,
        value_name = "N"
    )]
    pub max_served_calls: usize,

    /// Largest request body of a call podckptd serves or inspects
    /// (containerd's gRPC limit is 16 MiB); larger: ResourceExhausted.
    #[arg(long, env = "PODCKPT_MAX_SERVED_REQUEST_BYTES", default_value_t = 16 * 1024 * 1024, value_name = "BYTES")]
    pub max_served_request_bytes: usize,

    /// Request bytes podckptd holds at once for the calls it serves or
    /// inspects, over all connections; past it such calls fail with
    /// ResourceExhausted. Pass-through calls hold no more than the windows.
    #[arg(long, env = "PODCKPT_MAX_BUFFERED_BYTES", default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    pub max_buffered_bytes: usize,
}

/// HTTP/2's bounds on SETTINGS_MAX_FRAME_SIZE (RFC 9113, 6.5.2).
const FRAME_SIZE_RANGE: std::ops::RangeInclusive<u32> = 16_384..=16_777_215;
/// The largest flow-control window HTTP/2 allows.
const MAX_WINDOW: u32 = (1 << 31) - 1;

impl Limits {
    /// Checks the limits against each other and HTTP/2's bounds; the error
    /// names the flag.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("max-connections", self.max_connections),
            ("max-pending-handshakes", self.max_pending_handshakes),
            (
                "max-concurrent-streams",
                self.max_concurrent_streams as usize,
            ),
            ("max-served-calls", self.max_served_calls),
            ("max-served-request-bytes", self.max_served_request_bytes),
            ("max-send-buffer", self.max_send_buffer),
            ("max-header-list-size", self.max_header_list_size as usize),
            (
                "runtime-max-header-list-size",
                self.runtime_max_header_list_size as usize,
            ),
        ];
        for (flag, v) in positive {
            if v == 0 {
                return Err((flag, "must be at least 1".into()));
            }
        }
        for (flag, d) in [
            ("handshake-timeout", self.handshake_timeout),
            ("idle-timeout", self.idle_timeout),
            ("keepalive-timeout", self.keepalive_timeout),
        ] {
            if d.is_zero() {
                return Err((flag, "must be greater than zero".into()));
            }
        }
        if !FRAME_SIZE_RANGE.contains(&self.max_frame_size) {
            return Err((
                "max-frame-size",
                format!(
                    "must be between {} and {}",
                    FRAME_SIZE_RANGE.start(),
                    FRAME_SIZE_RANGE.end()
                ),
            ));
        }
        for (flag, w) in [
            ("stream-window", self.stream_window),
            ("connection-window", self.connection_window),
        ] {
            if !(65_535..=MAX_WINDOW).contains(&w) {
                return Err((flag, format!("must be between 65535 and {MAX_WINDOW}")));
            }
        }
        if self.max_served_request_bytes > self.max_buffered_bytes {
            return Err((
                "max-served-request-bytes",
                format!(
                    "{} is more than --max-buffered-bytes ({})",
                    self.max_served_request_bytes, self.max_buffered_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The keepalive interval, or none when set to zero.
    pub fn keepalive(&self) -> Option<Duration> {
        (!self.keepalive_interval.is_zero()).then_some(self.keepalive_interval)
    }
}

impl Default for Limits {
    /// The defaults of the flags (what podckptd runs with when none is set).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            limits: Limits,
        }
        <Only as clap::Parser>::parse_from(["podckptd"]).limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounded() {
        let l = Limits::default();
        l.validate().unwrap();
        assert_eq!(l.max_served_request_bytes, 16 * 1024 * 1024);
        assert_eq!(l.max_frame_size, 16 * 1024);
    }

    #[test]
    fn bad_limits_name_their_flag() {
        let bad = |l: Limits| l.validate().unwrap_err().0;
        let d = Limits::default;
        assert_eq!(
            bad(Limits {
                max_frame_size: 1024,
                ..d()
            }),
            "max-frame-size"
        );
        assert_eq!(
            bad(Limits {
                stream_window: u32::MAX,
                ..d()
            }),
            "stream-window"
        );
        assert_eq!(
            bad(Limits {
                max_buffered_bytes: 1,
                ..d()
            }),
            "max-served-request-bytes"
        );
        assert_eq!(
            bad(Limits {
                max_connections: 0,
                ..d()
            }),
            "max-connections"
        );
        assert_eq!(
            bad(Limits {
                idle_timeout: Duration::ZERO,
                ..d()
            }),
            "idle-timeout"
        );
    }
}
