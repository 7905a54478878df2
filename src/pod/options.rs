//! The `options` map of CheckpointPod/CheckpointContainer: every key podckpt
//! supports, parsed and validated. Unknown keys and bad values are refused,
//! as the CRI contract requires, never ignored.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Default zstd level: zstd's own default. Measured on 4 MiB frames, the
/// "fast" strategy of levels 1-2 is not faster on memory: incompressible
/// pages pass at 5.5-7.7 GB/s per core at levels 1-3 alike, while a page
/// pattern with a 2 KiB period compressed at 0.45 GB/s to 13% at levels
/// 1-2 and at 5.3 GB/s to almost nothing at level 3.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How CRIU locks the network while it dumps TCP connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkLock {
    /// iptables rules (CRIU's default).
    Iptables,
    /// nftables rules.
    Nftables,
    /// No locking (the caller guarantees the network is quiet).
    Skip,
}

/// Parsed checkpoint options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOptions {
    /// Dump established TCP connections (`tcp-established`).
    pub tcp_established: bool,
    /// Dump file locks (`file-locks`).
    pub file_locks: bool,
    /// Dump unix sockets connected to peers outside the container (`ext-unix-sk`).
    pub ext_unix_sk: bool,
    /// Largest deleted-but-open file CRIU keeps, in bytes (`ghost-limit`).
    pub ghost_limit: Option<u32>,
    /// Network locking method (`network-lock`).
    pub network_lock: Option<NetworkLock>,
    /// zstd level of the archive, or None for no compression (`compression`).
    pub compression: Option<i32>,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        Self {
            tcp_established: false,
            file_locks: false,
            ext_unix_sk: false,
            ghost_limit: None,
            network_lock: None,
            compression: Some(DEFAULT_ZSTD_LEVEL),
        }
    }
}

/// The keys [`CheckpointOptions::parse`] accepts, with what each takes.
pub const SUPPORTED: &[(&str, &str)] = &[
    (
        "tcp-established",
        "true|false: checkpoint established TCP connections",
    ),
    ("file-locks", "true|false: checkpoint file locks"),
    (
        "ext-unix-sk",
        "true|false: allow unix sockets connected outside the container",
    ),
    (
        "ghost-limit",
        "bytes (suffix K, M, G allowed): largest deleted-but-open file to keep",
    ),
    (
        "network-lock",
        "iptables|nftables|skip: how CRIU locks the network while dumping",
    ),
    (
        "leave-running",
        "true: containers keep running (the only mode of the alpha API)",
    ),
    (
        "compression",
        "off|none|zstd|zstd:LEVEL|LEVEL (1-19): archive compression, default zstd level 3",
    ),
];

/// An invalid option: the message names the key and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("option {key:?}: {reason}")]
pub struct OptionError {
    /// The offending key.
    pub key: String,
    /// Why it is refused.
    pub reason: String,
}

fn parse_bool(key: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(OptionError {
            key: key.into(),
            reason: format!("{v:?} is not a boolean (true or false)"),
        }),
    }
}

fn parse_size(key: &str, v: &str) -> Result<u32, OptionError> {
    let bad = || OptionError {
        key: key.into(),
        reason: format!("{v:?} is not a size in bytes (e.g. 1048576 or 1M)"),
    };
    let (num, mult) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    u32::try_from(n.checked_mul(mult).ok_or_else(bad)?).map_err(|_| OptionError {
        key: key.into(),
        reason: format!("{v:?} exceeds CRIU's limit of 4 GiB"),
    })
}

fn parse_level(key: &str, v: &str) -> Result<Option<i32>, OptionError> {
    let level = match v {
        "off" | "none" => return Ok(None),
        "zstd" => return Ok(Some(DEFAULT_ZSTD_LEVEL)),
        other => other.strip_prefix("zstd:").unwrap_or(other),
    };
    match level.parse::<i32>() {
        Ok(n) if (1..=19).contains(&n) => Ok(Some(n)),
        _ => Err(OptionError {
            key: key.into(),
            reason: format!("{v:?}: use off, zstd, or a zstd level 1-19"),
        }),
    }
}

impl CheckpointOptions {
    /// Parses and validates the request's option map.
    pub fn parse(map: &HashMap<String, String>) -> Result<Self, OptionError> {
        let mut o = Self::default();
        // Sorted, so the first error reported does not depend on hashing.
        let sorted: BTreeMap<_, _> = map.iter().collect();
        for (key, value) in sorted {
            let v = value.trim();
            match key.as_str() {
                "tcp-established" => o.tcp_established = parse_bool(key, v)?,
                "file-locks" => o.file_locks = parse_bool(key, v)?,
                "ext-unix-sk" => o.ext_unix_sk = parse_bool(key, v)?,
                "ghost-limit" => o.ghost_limit = Some(parse_size(key, v)?),
                "network-lock" => {
                    o.network_lock = Some(match v {
                        "iptables" => NetworkLock::Iptables,
                        "nftables" => NetworkLock::Nftables,
                        "skip" => NetworkLock::Skip,
                        _ => {
                            return Err(OptionError {
                                key: key.clone(),
                                reason: format!("{v:?}: use iptables, nftables or skip"),
                            })
                        }
                    })
                }
                "leave-running" => {
                    if !parse_bool(key, v)? {
                        return Err(OptionError {
                            key: key.clone(),
                            reason: "podckpt always leaves the pod running (stop it after the checkpoint if needed)".into(),
                        });
                    }
                }
                "compression" => o.compression = parse_level(key, v)?,
                _ => {
                    let known: Vec<_> = SUPPORTED.iter().map(|(k, _)| *k).collect();
                    return Err(OptionError {
                        key: key.clone(),
                        reason: format!("unknown option; supported: {}", known.join(", ")),
                    });
                }
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Result<CheckpointOptions, OptionError> {
        CheckpointOptions::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_and_every_key() {
        assert_eq!(opts(&[]).unwrap(), CheckpointOptions::default());
        let o = opts(&[
            ("tcp-established", "true"),
            ("file-locks", "1"),
            ("ext-unix-sk", "no"),
            ("ghost-limit", "2M"),
            ("network-lock", "skip"),
            ("leave-running", "true"),
            ("compression", "zstd:7"),
        ])
        .unwrap();
        assert!(o.tcp_established && o.file_locks && !o.ext_unix_sk);
        assert_eq!(o.ghost_limit, Some(2 << 20));
        assert_eq!(o.network_lock, Some(NetworkLock::Skip));
        assert_eq!(o.compression, Some(7));
        assert_eq!(opts(&[("compression", "off")]).unwrap().compression, None);
        assert_eq!(opts(&[("compression", "3")]).unwrap().compression, Some(3));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let e = opts(&[("tcp-close", "true")]).unwrap_err();
        assert!(
            e.reason.contains("unknown option") && e.reason.contains("tcp-established"),
            "{e}"
        );
        assert!(opts(&[("tcp-established", "maybe")]).is_err());
        assert!(opts(&[("ghost-limit", "5G")]).is_err());
        assert!(opts(&[("ghost-limit", "lots")]).is_err());
        assert!(opts(&[("network-lock", "pf")]).is_err());
        assert!(opts(&[("leave-running", "false")]).is_err());
        assert!(opts(&[("compression", "zstd:22")]).is_err());
        assert!(opts(&[("compression", "gzip")]).is_err());
    }
}
