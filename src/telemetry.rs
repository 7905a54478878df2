//! Tracing setup shared by the binaries: an env filter and text or JSON
//! output on stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `filter` uses EnvFilter syntax; it has
/// been validated by the caller's configuration already, so a bad filter
/// here falls back to `info`.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: journald, a log
        // file or a collector would store them as garbage.
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (e.g. tests running the daemon in-process) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
