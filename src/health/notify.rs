//! systemd's side of health: `READY=1` once podckptd serves (the unit is
//! `Type=notify`, so units ordered after it, the kubelet's, start only then),
//! `WATCHDOG=1` while podckptd answers its own health check through its own
//! socket, `STOPPING=1` when it drains. Without `NOTIFY_SOCKET` (not under
//! systemd) each is a no-op.
//!
//! The watchdog check is [`super::check_daemon`], the first part of what
//! `podckpt health` asks, made the way a client makes it: a new connection
//! to the listening socket, through the proxy's accept loop, limits and
//! routing, answered on the engine's runtime. So systemd restarts a podckptd
//! that stopped answering on either of its threads, and not one whose
//! runtime is down or whose CRIU is missing (a restart would not mend
//! those, and the kubelet needs the proxy in between).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd podckptd is ready, and starts the watchdog pings when the
/// unit has `WatchdogSec=`; the task runs until aborted.
pub fn ready(socket: &Path) -> Option<tokio::task::JoinHandle<()>> {
    if let Err(err) = sd_notify::notify(false, &[NotifyState::Ready]) {
        tracing::warn!(%err, "sd_notify READY=1 failed");
    }
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec);
    tracing::info!(
        ?period,
        "systemd watchdog enabled: pinging while podckptd answers its health check"
    );
    Some(tokio::spawn(watchdog(socket.to_path_buf(), period)))
}

/// Tells systemd podckptd is stopping (draining).
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

async fn watchdog(socket: PathBuf, period: Duration) {
    // Twice per period, as sd_watchdog_enabled(3) advises; each check gets
    // a quarter of it, so a slow answer still leaves time for the next.
    let interval = period / 2;
    let timeout = (period / 4).max(Duration::from_millis(100));
    loop {
        match super::check_daemon(&socket, timeout).await {
            Ok(_) => {
                if let Err(err) = sd_notify::notify(false, &[NotifyState::Watchdog]) {
                    tracing::warn!(%err, "sd_notify WATCHDOG=1 failed");
                }
            }
            Err(err) => tracing::warn!(%err, "health check failed: no watchdog ping"),
        }
        tokio::time::sleep(interval).await;
    }
}
