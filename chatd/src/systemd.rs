//! systemd's protocols: readiness and status notifications (`Type=notify`)
//! and socket activation (`LISTEN_FDS`). Outside systemd, none of this does
//! anything.

use chat_proto::ipc::Status;

#[cfg(unix)]
use sd_notify::NotifyState;

/// Tells systemd the daemon is ready, with a first status line.
#[cfg(unix)]
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the daemon is stopping.
#[cfg(unix)]
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// A STATUS= line for `systemctl status`, sent whenever the state changes.
#[cfg(unix)]
pub fn report_status(status: &Status) {
    let line = match status.peer {
        Some(peer) => format!("{}: {} with {peer}", status.id, status.state),
        None => format!("{}: {}", status.id, status.state),
    };
    notify(&[NotifyState::Status(&line)]);
}

#[cfg(unix)]
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("cannot notify systemd: {e}");
    }
}

// Without systemd (not Unix) there is no one to tell.
#[cfg(not(unix))]
pub fn notify_ready(_status: &str) {}
#[cfg(not(unix))]
pub fn notify_stopping() {}
#[cfg(not(unix))]
pub fn report_status(_status: &Status) {}

/// The control socket systemd passed us, if it started us through
/// `chatd@.socket` (or `systemd-socket-activate`).
#[cfg(unix)]
pub fn activated_listener() -> anyhow::Result<Option<interprocess::local_socket::tokio::Listener>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = sd_notify::listen_fds()?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if fds.len() > 0 {
        tracing::warn!("systemd passed {} sockets; using the first", fds.len() + 1);
    }
    // SAFETY: under the LISTEN_FDS protocol (checked by listen_fds, which
    // also verified LISTEN_PID is us), systemd passes open descriptors
    // starting at 3 for this process to own. We take the first exactly
    // once, and nothing else in the process refers to it, so it is open
    // and unowned: what `from_raw_fd` requires.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = interprocess::os::unix::uds_local_socket::tokio::Listener::try_from(owned)
        .map_err(|e| {
            anyhow::anyhow!("the socket systemd passed is not a listening Unix socket: {e}")
        })?;
    Ok(Some(interprocess::local_socket::tokio::Listener::from(
        listener,
    )))
}

#[cfg(not(unix))]
pub fn activated_listener() -> anyhow::Result<Option<interprocess::local_socket::tokio::Listener>> {
    Ok(None)
}
