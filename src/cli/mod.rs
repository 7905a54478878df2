//! The operator CLI's logic, kept out of `src/bin/podckpt.rs` so it can be
//! tested: deriving a restored pod's configuration ([`restore`]) and
//! rendering an archive inspection ([`render`]).

pub mod render;
pub mod restore;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `n` bytes in binary units, one decimal ("12.3 MiB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A time given in ms since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn human_time(unix_ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
        .replace('Z', " UTC")
}

/// How long before `now` the time `unix_ms` was, in its two largest units
/// ("3h 2m ago"), or None when it lies in the future (clock skew between
/// nodes).
pub fn age(unix_ms: u64, now: SystemTime) -> Option<String> {
    let then = UNIX_EPOCH + Duration::from_millis(unix_ms);
    let secs = now.duration_since(then).ok()?.as_secs();
    let full = humantime::format_duration(Duration::from_secs(secs)).to_string();
    let short: Vec<_> = full.split(' ').take(2).collect();
    Some(format!("{} ago", short.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(human_time(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_065_000);
        assert_eq!(age(1_700_000_000_123, now).as_deref(), Some("1m 4s ago"));
        assert_eq!(age(1_700_000_066_000, now), None);
        let later = now + Duration::from_secs(3 * 3600 + 125);
        assert_eq!(age(1_700_000_065_000, later).as_deref(), Some("3h 2m ago"));
    }
}

/// Makes sure the output directory of `checkpoint-pod` exists: created
/// (0700, with any missing parents, owned by the caller) when missing, so
/// that only the caller and the runtime (root) can read the checkpoint.
/// Returns whether it was created, so that a failed checkpoint can take it
/// away again.
pub fn ensure_output_dir(dir: &std::path::Path) -> std::io::Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(false),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod output_dir_tests {
    use super::ensure_output_dir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_missing_output_dir_is_created_0700() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("a/b");
        assert!(ensure_output_dir(&out).unwrap());
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!ensure_output_dir(&out).unwrap(), "exists: left as it is");
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(ensure_output_dir(&file).is_err());
    }
}
