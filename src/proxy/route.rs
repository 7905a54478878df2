//! Routing: which calls podckptd serves itself, which it looks at before
//! deciding, which it only observes, and the gRPC framing facts routing
//! needs (a unary request's message, the caller's `grpc-timeout`).

use std::sync::Arc;
use std::time::Duration;

/// Decides from a unary request's encoded gRPC frame whether podckptd
/// serves it.
pub type Sniffer = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Called after a forwarded call of an observed method was answered.
pub type Observer = Arc<dyn Fn() + Send + Sync>;

/// The request paths podckptd answers itself instead of forwarding.
#[derive(Clone, Default)]
pub struct Intercept {
    paths: Arc<[String]>,
    sniffed: Arc<[(String, Sniffer)]>,
    observed: Arc<[(String, Observer)]>,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("paths", &self.paths)
            .field(
                "sniffed",
                &self.sniffed.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Intercept {
    /// Intercepts exactly the given `(service, method)` pairs.
    pub fn new<'a>(methods: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let paths: Vec<String> = methods
            .into_iter()
            .map(|(service, method)| format!("/{service}/{method}"))
            .collect();
        Self {
            paths: paths.into(),
            sniffed: Arc::new([]),
            observed: Arc::new([]),
        }
    }

    /// Also serves every method of `service` (podckptd's own services,
    /// such as grpc.health.v1).
    pub fn with_service(mut self, service: &str, methods: &[&str]) -> Self {
        let mut v: Vec<String> = self.paths.iter().cloned().collect();
        v.extend(methods.iter().map(|m| format!("/{service}/{m}")));
        self.paths = v.into();
        self
    }

    /// Calls `observer` after each forwarded call of this method has been
    /// answered by the runtime (the call itself passes untouched).
    pub fn with_observer(mut self, service: &str, method: &str, observer: Observer) -> Self {
        let mut v: Vec<(String, Observer)> = self.observed.iter().cloned().collect();
        v.push((format!("/{service}/{method}"), observer));
        self.observed = v.into();
        self
    }

    /// The observer of a forwarded method, if it has one.
    pub fn observer(&self, path: &str) -> Option<Observer> {
        self.observed
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, o)| o.clone())
    }

    /// Also intercepts the requests of a unary method that `sniffer`
    /// claims; the others are forwarded byte for byte.
    pub fn with_sniffer(mut self, service: &str, method: &str, sniffer: Sniffer) -> Self {
        let mut v: Vec<(String, Sniffer)> = self.sniffed.iter().cloned().collect();
        v.push((format!("/{service}/{method}"), sniffer));
        self.sniffed = v.into();
        self
    }

    /// Whether a request with this path is served locally.
    pub fn matches(&self, path: &str) -> bool {
        // A handful of entries: a linear scan beats hashing here.
        self.paths.iter().any(|p| p == path)
    }

    /// The sniffer of a method whose requests are looked at, if any.
    pub fn sniffer(&self, path: &str) -> Option<Sniffer> {
        self.sniffed
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, s)| s.clone())
    }
}

/// The message of a single, uncompressed gRPC frame.
pub fn grpc_message(frame: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = frame.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    rest[4..].get(..len)
}

/// The caller's deadline from a `grpc-timeout` header (gRPC over HTTP/2:
/// at most 8 digits and a unit of H, M, S, m, u or n). A malformed header
/// is ignored, as gRPC servers do.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    grpc_timeout_value(headers.get("grpc-timeout")?.as_bytes())
}

/// A `grpc-timeout` header's value as a duration.
fn grpc_timeout_value(value: &[u8]) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercept_matches_exact_paths_only() {
        let i = Intercept::new([("runtime.v1.RuntimeService", "CheckpointPod")]);
        assert!(i.matches("/runtime.v1.RuntimeService/CheckpointPod"));
        assert!(!i.matches("/runtime.v1.RuntimeService/CheckpointPodX"));
        assert!(!i.matches("/runtime.v1.ImageService/CheckpointPod"));
        assert!(!i.matches("/runtime.v1.RuntimeService/Version"));
    }

    #[test]
    fn grpc_timeout_units() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("200m"), Some(Duration::from_millis(200)));
        assert_eq!(h("3S"), Some(Duration::from_secs(3)));
        assert_eq!(h("2M"), Some(Duration::from_secs(120)));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(h("5n"), Some(Duration::from_nanos(5)));
        assert_eq!(h("123456789S"), None, "more than 8 digits");
        assert_eq!(h("10x"), None);
        assert_eq!(h("m"), None);
        assert_eq!(h("-1S"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
